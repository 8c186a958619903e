r"""Held-out loss per silo of DiLoCo, FedAvg, data-parallel and each silo alone.

The issue's claim, after the DiLoCo paper (arXiv 2311.08105): on non-IID silos,
DiLoCo <= data-parallel < a single silo, at the same total tokens T. Every
method here spends T = R * H * K * B tokens:

  diloco / fedavg  K silos (stdlib groups), R rounds of H inner steps at batch B,
                   silos as threads and the aggregator in this process, over a
                   local directory bucket (no process start-up in the timing);
  dp               one trainer on the union of the K silos' training data,
                   R * H steps at batch K * B;
  single:GROUP     one trainer on one silo's data, R * H steps at batch K * B.

Every run uses the same inner config and an LR schedule over R * H steps. Each
final model (for the federated ones, the final global model) is scored by one
evaluator on the same fixed windows of every silo's own `val` split.

  python bench/convergence.py --config=configs/tiny.py --rounds=10 --inner_steps=12  # ~8 min
"""
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402
import numpy as np  # noqa: E402

from fedpt import aggregator  # noqa: E402
from fedpt import data as data_lib  # noqa: E402
from fedpt import metrics as metrics_lib  # noqa: E402
from fedpt import model as model_lib  # noqa: E402
from fedpt import silo  # noqa: E402
from fedpt import trainer as trainer_lib  # noqa: E402

GROUPS = ('web', 'concurrency', 'text', 'tools')

config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Model config.', lock_config=True)
flags.DEFINE_integer('rounds', 10, 'R: rounds of the federated methods.')
flags.DEFINE_integer('inner_steps', 12, 'H: inner steps per round.')
flags.DEFINE_integer('batch', 8, 'B: per-silo batch; the centralised runs use K * B.')
flags.DEFINE_integer('seq_len', 128, 'Sequence length of every run.')
flags.DEFINE_list('methods', ['diloco', 'fedavg', 'dp'] + [f'single:{g}' for g in GROUPS],
                  'Subset of diloco, fedavg, dp, single:GROUP.')
flags.DEFINE_integer('eval_batches', 8, 'Fixed eval batches (of B rows) per silo val split.')
flags.DEFINE_integer('seed', 0, 'Init and data-order seed.')
FLAGS = flags.FLAGS

def base_config(config, rounds, inner_steps, batch, seq_len, seed):
  """The config every method shares; only batch, corpus and outer optimizer vary."""
  c = config.copy_and_resolve_references()
  c.seed = seed
  c.data.update(seq_len=seq_len, global_batch=batch)
  # Silos evaluate the global model each round; the table uses the evaluator's
  # numbers instead, so keep that per-round cost to one batch.
  c.train.update(steps=rounds * inner_steps, eval_batches=1)
  c.train.async_checkpoints = False  # A save must be done before the lock is released.
  c.federation.update(silos=GROUPS, rounds=rounds, inner_steps=inner_steps, poll_s=0.02,
                      wait_timeout_s=600.0, compression='none', error_feedback=False)
  return c


def _with(config, **data):
  c = config.copy_and_resolve_references()
  c.data.update(**data)
  return c


def union_corpus_dir(groups) -> str:
  """The K groups' documents tokenised as one corpus, cached like the stdlib groups.

  Splits are by document hash, so the union's train split is exactly the union
  of the silos' train splits.
  """
  tokenizer = data_lib.default_tokenizer_path()
  sha = data_lib.file_sha256(tokenizer)
  version = '.'.join(map(str, sys.version_info[:3]))
  cache = os.environ.get('FEDPT_CACHE') or os.path.join(os.path.expanduser('~'), '.cache',
                                                        'fedpt')
  out = os.path.join(cache, f'stdlib-py{version}-union-{"+".join(groups)}-{sha[:12]}')
  try:
    data_lib.TokenDataset(out, 'train', sha)
  except (data_lib.DataError, OSError):
    docs = [d for g in groups for d in data_lib.stdlib_documents(g)]
    data_lib.prepare_data(docs, tokenizer, out,
                          sources=[f'python{version} stdlib groups {list(groups)}'])
  return out


def run_federated(config, optimizer: str) -> tuple[dict, int]:
  """K silo threads + the aggregator; the final global params and bytes sent per silo."""
  config = config.copy_and_resolve_references()
  config.outer.optimizer = optimizer
  with tempfile.TemporaryDirectory() as tmp:
    root = os.path.join(tmp, 'bucket')
    aggregator.init_run(_with(config, stdlib_group=GROUPS[0]), root)
    results, errors = {}, {}

    def work(group):
      try:
        results[group] = silo.run_silo(_with(config, stdlib_group=group), group, root,
                                       os.path.join(tmp, group))
      except BaseException as e:  # pylint: disable=broad-except
        errors[group] = e

    threads = [threading.Thread(target=work, args=(g,), daemon=True) for g in GROUPS]
    for t in threads:
      t.start()
    aggregator.run_aggregator(root)
    for t in threads:
      t.join()
  if errors:
    raise next(iter(errors.values()))
  sent = [sum(r['bytes'] for r in results[g]['rounds']) for g in GROUPS]
  return results[GROUPS[0]]['state']['params'], max(sent)


def run_central(config, steps: int) -> dict:
  """Plain training with the Trainer: `steps` steps, no federation."""
  trainer = trainer_lib.Trainer(config)
  state = trainer.init_state()
  for step in range(steps):
    state, metrics = trainer.train_step(state, trainer.batch(step))
  loss = float(metrics['train_loss'])
  if not np.isfinite(loss):
    raise trainer_lib.TrainingDivergedError(f'final train loss {loss}')
  return state['params']


def measure(config, methods, rounds, inner_steps, batch, seq_len, eval_batches, seed) -> dict:
  """Trains each method on T tokens and scores its final model on every silo's val split."""
  known = ['diloco', 'fedavg', 'dp'] + [f'single:{g}' for g in GROUPS]
  if set(methods) - set(known):
    raise app.UsageError(f'unknown methods {sorted(set(methods) - set(known))}; use {known}')
  config = base_config(config, rounds, inner_steps, batch, seq_len, seed)
  k = len(GROUPS)
  steps = rounds * inner_steps
  eval_config = _with(config, stdlib_group=GROUPS[0])
  eval_config.train.eval_batches = eval_batches
  evaluator = trainer_lib.Trainer(eval_config)
  sha = evaluator.tokenizer_sha256
  vals = {g: data_lib.TokenDataset(data_lib.default_corpus_dir(g), 'val', sha) for g in GROUPS}
  param_bytes = 4 * model_lib.param_count(evaluator.model_config)
  union = union_corpus_dir(GROUPS) if 'dp' in methods else None  # Tokenised before timing.
  rows = []
  for method in methods:
    start = time.monotonic()
    sent = None
    if method in ('diloco', 'fedavg'):
      params, sent = run_federated(config, method)
    elif method == 'dp':
      params = run_central(_with(config, corpus=union, global_batch=k * batch), steps)
    else:
      params = run_central(_with(config, stdlib_group=method.split(':', 1)[1],
                                 global_batch=k * batch), steps)
    seconds = time.monotonic() - start
    losses = {g: evaluator.evaluate(params, dataset=vals[g]) for g in GROUPS}
    rows.append({'method': method, 'steps': steps, 'tokens': steps * k * batch * seq_len,
                 'losses': losses, 'mean': float(np.mean(list(losses.values()))),
                 'sent': sent, 'seconds': seconds})
    metrics_lib.log(f'{method}: mean held-out loss {rows[-1]["mean"]:.4f} ({seconds:.0f}s)')
  return {'rows': rows, 'param_bytes': param_bytes, 'steps': steps,
          'val_windows': {g: vals[g].num_windows(seq_len) for g in GROUPS}}


def report(result, config_name, rounds, inner_steps, batch, seq_len, eval_batches, seed):
  """The Markdown table, per-step all-reduce bytes for contrast, and the ordering."""
  rows, steps = result['rows'], result['steps']
  print(f'\nconfig={config_name} K={len(GROUPS)} R={rounds} H={inner_steps} B={batch} '
        f'seq_len={seq_len} seed={seed}; held-out loss on {eval_batches} fixed batches of '
        f'{batch} windows per silo val split (windows per split: {result["val_windows"]})\n')
  print('| method | tokens | steps | ' + ' | '.join(GROUPS) +
        ' | mean held-out loss | bytes sent per silo | train s |')
  print('|---|---:|---:|' + '---:|' * len(GROUPS) + '---:|---:|---:|')
  for r in rows:
    sent = f'{r["sent"]:,}' if r['sent'] is not None else '-'
    steps_text = f'{rounds}x{inner_steps}' if r['sent'] is not None else str(r['steps'])
    print(f'| {r["method"]} | {r["tokens"]:,} | {steps_text} | ' +
          ' | '.join(f'{r["losses"][g]:.4f}' for g in GROUPS) +
          f' | **{r["mean"]:.4f}** | {sent} | {r["seconds"]:.0f} |')
  print(f'\nData-parallel over K silos would all-reduce one fp32 gradient per step: '
        f'{steps} x {result["param_bytes"]:,} = {steps * result["param_bytes"]:,} bytes per '
        f'silo (H = {inner_steps}x the federated pseudo-gradients).')
  by = {r['method']: r['mean'] for r in rows}
  singles = {m: v for m, v in by.items() if m.startswith('single:')}
  if 'diloco' in by and 'dp' in by:
    print(f'DiLoCo / DP loss ratio: {by["diloco"] / by["dp"]:.4f} '
          f'(perplexity ratio {np.exp(by["diloco"] - by["dp"]):.4f})')
  if 'fedavg' in by and 'diloco' in by:
    print(f'FedAvg / DiLoCo loss ratio: {by["fedavg"] / by["diloco"]:.4f}')
  if singles:
    best = min(singles, key=singles.get)
    mean_single = float(np.mean(list(singles.values())))
    for m in ('diloco', 'fedavg', 'dp'):
      if m in by:
        print(f'{m} / best single silo ({best}) loss ratio: {by[m] / singles[best]:.4f}; '
              f'/ mean of single silos: {by[m] / mean_single:.4f}')
  if 'diloco' in by and 'dp' in by and singles:
    best_single = min(singles.values())
    holds = by['diloco'] <= by['dp'] < best_single
    print(f'Ordering DiLoCo <= DP < every single silo: {"HOLDS" if holds else "DOES NOT HOLD"} '
          f'(DiLoCo {by["diloco"]:.4f}, DP {by["dp"]:.4f}, best single {best_single:.4f})')
  print('Ranking by mean held-out loss: ' +
        ' < '.join(f'{m} {v:.4f}' for m, v in sorted(by.items(), key=lambda kv: kv[1])))


def main(argv):
  del argv
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax's INFO chatter would drown the table.
  start = time.monotonic()
  args = dict(rounds=FLAGS.rounds, inner_steps=FLAGS.inner_steps, batch=FLAGS.batch,
              seq_len=FLAGS.seq_len, eval_batches=FLAGS.eval_batches, seed=FLAGS.seed)
  result = measure(FLAGS.config, FLAGS.methods, **args)
  report(result, FLAGS.config.name, **args)
  print(f'wall time {time.monotonic() - start:.0f}s')


if __name__ == '__main__':
  app.run(main)
