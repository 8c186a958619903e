r"""Tokens/s of fedpt's DP-SGD step (privacy.dp) next to its plain step: same model and batch.

The DP step (fedpt/inner.py `private_gradients`) takes each sequence's gradient (a vmap of
per-example gradients, jax_privacy), clips it, sums and adds noise once; the plain step
takes one gradient of the batch's mean loss. Both are fedpt's own `Trainer.train_step`,
run in one process on one device and batch, interleaved trial by trial (each trial rotates
which goes first) so that machine noise hits both alike. DP/plain is the figure of merit.
sigma does not change the work: one Gaussian draw per parameter either way.

  python bench/dp_step.py                                   # tiny and demo
  python bench/dp_step.py --configs=demo --grad_accum=4 --json_out=/tmp/dp.json
"""
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import bare_step  # noqa: E402
from fedpt import cli  # noqa: E402
from fedpt import config as config_lib  # noqa: E402
from fedpt import model as model_lib  # noqa: E402
from fedpt import trainer as trainer_lib  # noqa: E402

flags.DEFINE_list('configs', ['tiny', 'demo'],
                  f'Sizes to time, from {", ".join(bare_step.SIZES)}.')
flags.DEFINE_float('noise_multiplier', 1.0, 'The DP step\'s sigma (privacy.dp.noise_multiplier).')
flags.DEFINE_integer('grad_accum', 1, 'Micro-batches per step (inner.grad_accum), for both steps.')
flags.DEFINE_integer('steps', 3, 'Timed steps per trial, at least.')
flags.DEFINE_float('min_trial_s', 3.0, 'Seconds a trial lasts at least (more steps if need be).')
flags.DEFINE_integer('trials', 3, 'Interleaved trials (plain, DP, DP, plain, ...); the median '
                     'is reported.')
flags.DEFINE_string('json_out', None, 'Also write the rows as JSON here.')
FLAGS = flags.FLAGS


def configs_to_run(names, noise_multiplier: float, grad_accum: int) -> list:
  """(plain config, DP config) per size, each validated: a bad flag stops before compiling."""
  if not names:
    raise bare_step.ThroughputError('nothing to time. Fix: give --configs, e.g. tiny,demo')
  if noise_multiplier <= 0:
    raise bare_step.ThroughputError(f'--noise_multiplier={noise_multiplier:g} must be > 0. '
                                    'Fix: use e.g. 1.0 (sigma does not change the work)')
  pairs = []
  for name in names:
    plain = bare_step.load_size(name)
    plain.inner.grad_accum = grad_accum
    private = plain.copy_and_resolve_references()
    private.privacy.dp.update(enabled=True, noise_multiplier=noise_multiplier)
    for c in (plain, private):
      try:
        config_lib.validate(c)
      except config_lib.ConfigError as e:
        flag = '--grad_accum' if e.field == 'inner.grad_accum' else f'{name} (--configs)'
        raise bare_step.ThroughputError(f'{flag}: {e}') from None
    pairs.append((plain, private))
  return pairs


def run(plain_config, dp_config, steps: int, trials: int, min_trial_s: float = 0.0) -> dict:
  """One row: tokens/s of the plain and the DP step on one device, the same batch."""
  plain, batch = bare_step.single_device(plain_config)
  devices = plain.mesh.devices.flatten().tolist()
  dp_config.mesh.update(plain_config.mesh)
  private = trainer_lib.Trainer(dp_config, devices=devices)
  with tempfile.TemporaryDirectory() as workdir:  # Its noise seed and sigma, as a silo's.
    private.open_privacy(workdir, start_step=0)
  runners, first_step_s = {}, {}
  for name, trainer in (('plain', plain), ('dp', private)):
    state, first_step_s[name] = bare_step.first_step(trainer.train_step, trainer.init_state(),
                                                     batch)
    runners[name] = (trainer.train_step, state)
  times, steps = bare_step.interleaved_times(runners, batch, steps, trials, min_trial_s)
  c = plain_config
  tokens = c.data.global_batch * c.data.seq_len
  tps = {name: tokens / statistics.median(t) for name, t in times.items()}
  return {
      'size': c.name, 'device': devices[0].device_kind, 'platform': devices[0].platform,
      'params': model_lib.param_count(plain.model_config), 'batch': c.data.global_batch,
      'seq_len': c.data.seq_len, 'grad_accum': c.inner.grad_accum,
      'compute_dtype': plain.model_config.compute_dtype,
      'noise_multiplier': dp_config.privacy.dp.noise_multiplier,
      'clip_norm': dp_config.privacy.dp.clip_norm, 'steps': steps, 'trials': trials,
      'tokens_per_s': tps, 'ratio': tps['dp'] / tps['plain'],
      'step_s': {name: sorted(t) for name, t in times.items()}, 'first_step_s': first_step_s,
  }


def markdown(rows: list[dict]) -> str:
  lines = ['| size | params | batch x seq | grad_accum | plain tokens/s | DP tokens/s | DP/plain '
           '| first step s (plain, DP) |', '|---|---|---|---|---|---|---|---|']
  for r in rows:
    tps, first = r['tokens_per_s'], r['first_step_s']
    lines.append(f"| {r['size']} | {r['params'] / 1e6:.2f}M | {r['batch']} x {r['seq_len']} | "
                 f"{r['grad_accum']} | {tps['plain']:,.0f} | {tps['dp']:,.0f} | "
                 f"**{r['ratio']:.3f}** | {first['plain']:.1f}, {first['dp']:.1f} |")
  return '\n'.join(lines)


def dp_step(names, noise_multiplier: float, grad_accum: int, steps: int, trials: int,
            min_trial_s: float = 0.0, json_out: str | None = None) -> list[dict]:
  """Times every size; prints each row as it lands, then the Markdown table."""
  if steps < 1 or trials < 1:
    raise bare_step.ThroughputError(f'--steps={steps} and --trials={trials} must both be >= 1. '
                                    'Fix: e.g. --steps=3 --trials=3')
  rows = []
  for plain_config, dp_config in configs_to_run(names, noise_multiplier, grad_accum):
    r = run(plain_config, dp_config, steps, trials, min_trial_s)
    rows.append(r)
    print(f"{r['size']} ({r['params']:,} params, {r['batch']}x{r['seq_len']}, grad_accum "
          f"{r['grad_accum']}, {r['device']}): plain {r['tokens_per_s']['plain']:,.0f}, DP "
          f"{r['tokens_per_s']['dp']:,.0f} tokens/s; DP/plain {r['ratio']:.3f}", flush=True)
  return bare_step.report(rows, markdown(rows), json_out)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cli.run_or_explain(dp_step, FLAGS.configs, FLAGS.noise_multiplier, FLAGS.grad_accum,
                     FLAGS.steps, FLAGS.trials, FLAGS.min_trial_s, FLAGS.json_out)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags_or_explain)
