"""Held-out evaluation of global rounds and private checkpoints, and the run's plots.

Loss is the mean next-token cross-entropy (nats) over every token of each held-out
set (`ShardedModel.score(whole=True)`: all windows and the tail once, token-weighted),
or, asked for, over the sampled `train.eval_batches` windows; every row says how
many tokens it scored. Jitted and sharded like training. Bits per byte
divide the summed loss by the UTF-8 bytes of the predicted tokens, so models
with different tokenizers compare. The per-silo table also uses what silos
published themselves (`rounds/NNNNNN/eval/silo_<id>.json`): each silo's loss on
its own private split, which never leaves the silo.
"""
import csv
import json
import math
import os

import numpy as np

from fedpt import data as data_lib
from fedpt import errors
from fedpt import ledger
from fedpt import loading
from fedpt import protocol
from fedpt import storage as storage_lib


class EvalError(errors.UserError, ValueError):
  """Bad evaluation input: the message names it and the fix."""


def parse_eval_sets(specs) -> dict[str, str]:
  """['NAME=SOURCE', ...] -> {name: source}; see `open_eval_set` for the sources."""
  out = {}
  for spec in specs:
    name, sep, path = spec.partition('=')
    if not sep or not name or not path:
      raise EvalError(f'--eval_set={spec!r} is not NAME=SOURCE. Fix: e.g. '
                      '--eval_set=web=/data/web (a prepare_data.py output), txt=notes.txt or '
                      'wiki=tfds:wikipedia:test')
    out[name] = path
  return out


def open_eval_set(name: str, source: str, cache_dir: str, model):
  """A prepare_data.py output's val split; or a text/JSONL file or tfds:NAME, tokenised whole.

  Files and tfds splits are tokenised once with the run's tokenizer into
  `cache_dir/NAME` (every document, no validation split held back).
  """
  if os.path.isfile(os.path.join(source, 'meta.json')):
    return data_lib.TokenDataset(source, 'val', model.tokenizer_sha256)
  out = os.path.join(cache_dir, name)
  data_lib.prepare_data(data_lib.read_sources([source]), model.tokenizer_path, out,
                        val_fraction=0.0, sources=[source])
  return data_lib.TokenDataset(out, 'train', model.tokenizer_sha256)


def parse_rounds(text: str, latest: int) -> list[int]:
  """'all', 'N', 'A:B' (inclusive) or 'A,B,C' -> round numbers."""
  try:
    if text == 'all':
      return list(range(latest + 1))
    if ':' in text:
      first, last = (int(x) for x in text.split(':'))
      return list(range(first, last + 1))
    return [int(x) for x in text.split(',')]
  except ValueError:
    raise EvalError(f'--rounds={text!r}: use all, N, A:B or A,B,C') from None


def bits_per_byte(mean_loss: float, tokens: int, nbytes: int) -> float:
  return mean_loss * tokens / (math.log(2) * nbytes)


def _piece_bytes(tokenizer) -> np.ndarray:
  """UTF-8 bytes each token id stands for ([vocab] int64); control and unknown pieces are 0."""
  def one(token):
    if tokenizer.is_control(token) or tokenizer.is_unknown(token):
      return 0
    if tokenizer.is_byte(token):
      return 1
    return len(tokenizer.id_to_piece(token).replace('\u2581', ' ').encode())
  return np.array([one(t) for t in range(tokenizer.get_piece_size())], np.int64)


def predicted_bytes(dataset, piece_bytes: np.ndarray, model, whole: bool) -> int:
  """UTF-8 bytes of the tokens `model.score(..., whole=whole)` predicts on `dataset`."""
  d = model.config.data
  if whole:
    return int(sum((piece_bytes[rows] * weights).sum() for rows, weights in
                   dataset.whole_batches(global_batch=d.global_batch, seq_len=d.seq_len)))
  return int(sum(piece_bytes[np.asarray(rows)[:, 1:]].sum() for rows in dataset.eval_batches(
      model.config.train.eval_batches, global_batch=d.global_batch, seq_len=d.seq_len)))


def describe_mode(whole: bool, model) -> str:
  """What a loss was measured on, for tables and logs."""
  if whole:
    return 'whole split'
  d = model.config.data
  return (f'sample of {model.config.train.eval_batches * d.global_batch} windows '
          '(train.eval_batches x data.global_batch)')


def evaluate_params(model, params, datasets: dict, nbytes: dict, whole: bool = True) -> dict:
  """{set: loss, perplexity, bits_per_byte, tokens (scored), mode} of one model."""
  out = {}
  for name, dataset in datasets.items():
    loss, tokens = model.score(params, dataset, whole=whole)
    out[name] = {'loss': loss, 'perplexity': math.exp(min(loss, 700.0)),
                 'bits_per_byte': bits_per_byte(loss, tokens, nbytes[name]), 'tokens': tokens,
                 'mode': 'whole' if whole else 'sample'}
  return out


def evaluate(config, out_dir: str, *, eval_sets: dict[str, str], storage: str | None = None,
             rounds: str = 'all', workdirs: dict[str, str] | None = None,
             whole: bool = True) -> dict:
  """Evaluates global rounds and/or private checkpoints; writes eval.json, eval.csv, plots.

  `whole`: every token of each set once (`ShardedModel.score`); else the sampled
  `train.eval_batches` windows. Every row says how many tokens it scored. Only the
  model, its tokenizer and the sets given are read: not the config's training corpus.
  """
  from fedpt import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  if not storage and not workdirs:
    raise EvalError('nothing to evaluate. Fix: pass --storage (global rounds) and/or '
                    '--workdir=NAME=DIR (private checkpoints, e.g. isolated baselines)')
  model = trainer_lib.ShardedModel(protocol.federated_config(config) if storage else config)
  piece_bytes = _piece_bytes(data_lib.load_tokenizer(model.tokenizer_path))
  datasets = {n: open_eval_set(n, p, os.path.join(out_dir, 'eval_sets'), model)
              for n, p in eval_sets.items()}
  nbytes = {n: predicted_bytes(ds, piece_bytes, model, whole) for n, ds in datasets.items()}
  rows, published, store, run = [], {}, None, None
  sources = []  # (model label, round or None, loading.Source)
  if storage:
    store = storage_lib.RunStorage(storage)
    run = store.read_run()
    protocol.check_model_matches_run(run, model.config, model.tokenizer_sha256)
    latest = store.latest_global_round()
    sources += [(f'global_round_{r}', r, loading.Source(storage=storage, round_index=r))
                for r in parse_rounds(rounds, -1 if latest is None else latest)]
  sources += [(label, None, loading.Source(workdir=workdir))
              for label, workdir in (workdirs or {}).items()]
  train_state = model.abstract_train_state()
  for label, round_index, source in sources:
    params = loading.load(model.config, source, train_state=train_state).params
    for name, m in evaluate_params(model, params, datasets, nbytes, whole).items():
      rows.append({'model': label, 'round': round_index, 'eval_set': name, **m})
    if round_index is not None:
      published[round_index] = ledger.eval_losses(store, run, round_index)
  result = {'rows': rows, 'mode': describe_mode(whole, model), 'published_by_round': published,
            'versus_baseline': versus_baseline(rows)}
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'eval.json'), 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(out_dir, 'eval.csv'), 'w', newline='', encoding='utf-8') as f:
    writer = csv.DictWriter(f, ['model', 'round', 'eval_set', 'loss', 'perplexity',
                                'bits_per_byte', 'tokens', 'mode'])
    writer.writeheader()
    writer.writerows(rows)
  if store is not None:
    result['plots'] = write_plots(store, out_dir, rows)
  return result


def versus_baseline(rows: list[dict]) -> list[dict]:
  """One line per silo: its baseline (a workdir named after its eval set) vs the newest round.

  A baseline is compared only with its own silo's held-out set (baseline NAME with
  eval set NAME): that is the member question; other pairs answer nothing.
  """
  globals_ = [r for r in rows if r['round'] is not None]
  if not globals_:
    return []
  newest = max(r['round'] for r in globals_)
  out = []
  for base in (r for r in rows if r['round'] is None and r['model'] == r['eval_set']):
    match = next((g for g in globals_ if g['round'] == newest
                  and g['eval_set'] == base['eval_set']), None)
    if match:
      out.append({'eval_set': base['eval_set'], 'baseline': base['model'],
                  'baseline_loss': base['loss'], 'global_round': newest,
                  'global_loss': match['loss'], 'gain': base['loss'] - match['loss'],
                  'tokens': base['tokens']})
  return out


def write_plots(store, out_dir: str, rows: list[dict] | None = None) -> list[str]:
  """Loss by round (each silo's own split and the mean) and loss against tokens seen."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  ledger_rows = ledger.build_ledger(store)
  initial = ledger.eval_losses(store, store.read_run(), 0)
  silos = sorted({s for row in ledger_rows for s in row['eval_loss_by_silo']} | set(initial))
  by_round = {0: initial, **{row['round'] + 1: row['eval_loss_by_silo']
                                          for row in ledger_rows}}
  tokens = np.cumsum([0] + [row['tokens'] for row in ledger_rows])
  curves = []  # (label, style, [(round, loss)])
  for silo in silos:
    curves.append((f'silo {silo} (own split)', 'o-',
                   sorted((r, v[silo]) for r, v in by_round.items() if silo in v)))
  curves.append(('global (mean over silos)', 'k--',
                 sorted((r, float(np.mean(list(v.values())))) for r, v in by_round.items() if v)))
  for eval_set in sorted({r['eval_set'] for r in rows or [] if r['round'] is not None}):
    curves.append((f'{eval_set} (evaluate.py)', 's-', sorted(
        (r['round'], r['loss']) for r in rows if r['eval_set'] == eval_set
        and r['round'] is not None)))
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for name, xlabel, to_x in (('loss_by_round', 'global round', lambda r: r),
                             ('loss_vs_tokens', 'tokens seen by the federation',
                              lambda r: int(tokens[min(r, len(tokens) - 1)]))):
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, style, points in curves:
      if points:
        ax.plot([to_x(r) for r, _ in points], [v for _, v in points], style, label=label)
    ax.set(xlabel=xlabel, ylabel='held-out loss (nats)', title=name.replace('_', ' '))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, f'{name}.png')
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
  return paths
