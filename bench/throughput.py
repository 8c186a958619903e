r"""Tokens/s of fedpt's train step next to the plainest JAX step of the same model (the floor).

The plain step ('bare', bench/bare_step.py): fedpt's forward math on a dict of arrays, its
layers an unrolled Python loop, `optax.adamw` at a constant lr, no gradient clipping, no
weight-decay mask, no z-loss. 'bare+scan' is the same under `lax.scan`; the floor is the
faster of the two. Each other fedpt feature can be added to the plain step alone
(--variants) to price it, and 'all' adds every one (fedpt's exact work, minus the framework).
All steps run in one process on one device and batch, interleaved trial by trial so that
machine noise hits each alike (each trial rotates which goes first); fedpt/floor is the
figure of merit (target >= 0.97).

  python bench/throughput.py                               # tiny, demo, 7m, 150m side by side
  python bench/throughput.py --sizes=7m --variants=scan,clip,decay_mask,z_loss,all
  python bench/throughput.py --sizes= --config=configs/1b.py --config.data.global_batch=8 \
      --remats=dots_no_batch,full --json_out=/tmp/1b.json  # GPU
"""
import ast
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import bare_step  # noqa: E402
from fedpt import cli  # noqa: E402
from fedpt import metrics as metrics_lib  # noqa: E402
from fedpt import model as model_lib  # noqa: E402
from fedpt import planning  # noqa: E402
from fedpt import trainer as trainer_lib  # noqa: E402

flags.DEFINE_list('sizes', list(bare_step.SIZES),
                  f'Sizes to compare, from {", ".join(bare_step.SIZES)}; empty for --config.')
config_flags.DEFINE_config_file('config', None, 'A config to compare besides --sizes.',
                                lock_config=False)
flags.DEFINE_list('variants', ['scan'], 'Bare steps besides the plain one: a feature of '
                  f'{", ".join(bare_step.FEATURES)} added alone, "all" (every one), or a+b.')
flags.DEFINE_list('fedpt_overrides', [], 'More fedpt steps beside the config\'s own, one per '
                  'FIELD=VALUE[+FIELD=VALUE], e.g. model.scan_layers=False+inner.grad_clip=0.0.')
flags.DEFINE_list('remats', [], 'Remat policies to time each size at (default: its own).')
flags.DEFINE_integer('steps', 3, 'Timed steps per trial, at least.')
flags.DEFINE_float('min_trial_s', 3.0, 'Seconds a trial lasts at least (more steps if need be).')
flags.DEFINE_integer('trials', 3, 'Interleaved trials; the median is reported.')
flags.DEFINE_string('json_out', None, 'Also write the rows as JSON here.')
FLAGS = flags.FLAGS


ThroughputError = bare_step.ThroughputError


def _peak_bytes(device) -> int | None:
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  return (stats or {}).get('peak_bytes_in_use')


def parse_override(text: str) -> tuple[tuple[str, object], ...]:
  """'model.scan_layers=False+inner.grad_clip=0.0' -> ((field, value), ...): one fedpt step."""
  pairs = []
  for part in re.split(r'\+(?=[A-Za-z_][\w.]*=)', text):
    field, sep, value = part.partition('=')
    try:
      if sep and field.strip():
        pairs.append((field.strip(), ast.literal_eval(value.strip())))
        continue
    except (ValueError, SyntaxError):
      pass
    raise ThroughputError(f'--fedpt_overrides={text!r} is not FIELD=VALUE[+FIELD=VALUE] with '
                          'Python literal values. Fix: e.g. --fedpt_overrides=model.scan_layers='
                          'False+inner.grad_clip=0.0')
  return tuple(pairs)


def _with_override(config, pairs):
  config = config.copy_and_resolve_references()
  for field, value in pairs:
    try:
      config.update_from_flattened_dict({field: value})
    except (KeyError, TypeError) as e:
      raise ThroughputError(f'--fedpt_overrides={field}={value!r}: {e}. Fix: name a config '
                            'field and give a value of its type') from None
  return config


def run(config, steps: int, trials: int, variants=(), fedpt_overrides=(),
        min_trial_s: float = 0.0) -> dict:
  """One row: tokens/s of fedpt's step (and each override), the floor and each variant."""
  trainer, batch = bare_step.single_device(config)
  devices = trainer.mesh.devices.flatten().tolist()
  cfg = trainer.model_config

  runners, first_step_s = {}, {}
  state, first_step_s['fedpt'] = bare_step.first_step(trainer.train_step, trainer.init_state(),
                                                      batch)
  runners['fedpt'] = (trainer.train_step, state)
  fedpt_peak = _peak_bytes(devices[0])  # fedpt's state and step alone: plan.py's estimate.
  init_params = trainer.init_state()['params']  # Deterministic: the params fedpt started from.
  for pairs in fedpt_overrides:
    name = 'fedpt[' + ', '.join(f'{field}={value}' for field, value in pairs) + ']'
    other = trainer_lib.Trainer(_with_override(config, pairs), devices=devices)
    state, first_step_s[name] = bare_step.first_step(other.train_step, other.init_state(), batch)
    runners[name] = (other.train_step, state)
  for features in [frozenset(), *variants]:
    name = bare_step.variant_name(features)
    step, state = bare_step.make_bare(features, trainer, init_params)
    state, first_step_s[name] = bare_step.first_step(step, state, batch)
    runners[name] = (step, state)

  times, steps = bare_step.interleaved_times(runners, batch, steps, trials, min_trial_s)

  tokens = config.data.global_batch * config.data.seq_len
  tps = {name: tokens / statistics.median(t) for name, t in times.items()}
  # The floor is the faster layout of the plain step: unrolled, or scanned as fedpt's.
  floor = max(('bare', 'bare+scan'), key=lambda n: tps.get(n, 0.0))
  peak = metrics_lib.peak_flops_per_device(config.train.peak_tflops_per_device)
  flops_per_token = model_lib.flops_per_token(cfg, config.data.seq_len)
  platform = devices[0].platform
  estimate = planning.plan(config, 1, platform=platform)['per_device_bytes']['total']
  return {
      'size': config.name, 'device': devices[0].device_kind, 'platform': platform,
      'params': model_lib.param_count(cfg), 'batch': config.data.global_batch,
      'seq_len': config.data.seq_len, 'compute_dtype': cfg.compute_dtype, 'remat': cfg.remat,
      'attention': cfg.attention, 'steps': steps, 'trials': trials,
      'tokens_per_s': tps, 'floor': floor, 'ratio': tps['fedpt'] / tps[floor],
      'ratio_to_floor': {name: v / tps[floor] for name, v in tps.items()},
      'mfu': {name: flops_per_token * v / peak for name, v in tps.items()} if peak else None,
      'first_step_s': first_step_s,
      'fedpt_peak_bytes': fedpt_peak, 'plan_bytes': estimate,
      'peak_over_plan': fedpt_peak / estimate if fedpt_peak else None,
  }


def configs_to_run(sizes, config, remats) -> list:
  """(size, remat) rows: each of `sizes` (then --config) at each remat policy."""
  for remat in remats:
    if remat not in model_lib.REMAT_POLICIES and remat != 'none':
      raise ThroughputError(f'unknown remat policy {remat!r}. Fix: use --remats from none, '
                            f'{", ".join(model_lib.REMAT_POLICIES)}')
  bases = [bare_step.load_size(s) for s in sizes] + ([config] if config is not None else [])
  if not bases:
    raise ThroughputError('nothing to time. Fix: give --sizes or --config')
  out = []
  for base in bases:
    for remat in remats or [base.model.remat]:
      c = base.copy_and_resolve_references()
      c.model.remat = remat
      out.append(c)
  return out


def markdown(rows: list[dict]) -> str:
  names = list(rows[0]['tokens_per_s'])
  head = ('| size | params | batch x seq | dtype | remat | '
          + ' | '.join(f'{n} tokens/s' for n in names) + ' | fedpt/floor | MFU fedpt |')
  lines = [head, '|' + '---|' * (head.count('|') - 1)]
  for r in rows:
    mfu = f"{r['mfu']['fedpt']:.1%}" if r['mfu'] else 'n/a'
    lines.append(
        f"| {r['size']} | {r['params'] / 1e6:.2f}M | {r['batch']} x {r['seq_len']} | "
        f"{r['compute_dtype']} | {r['remat']} | "
        + ' | '.join(f"{r['tokens_per_s'][n]:,.0f}" for n in names)
        + f" | **{r['ratio']:.3f}** ({r['floor']}) | {mfu} |")
  return '\n'.join(lines)


def throughput(sizes, config, variants, remats, steps, trials, json_out=None,
               fedpt_overrides=(), min_trial_s=0.0) -> list[dict]:
  """Times every (size, remat) row; prints each as it lands, then the Markdown table."""
  variants = [bare_step.parse_variant(v) for v in variants]
  overrides = [parse_override(o) for o in fedpt_overrides]
  configs = configs_to_run(sizes, config, remats)
  for c in configs:  # Every bad override is refused before anything compiles.
    for pairs in overrides:
      _with_override(c, pairs)
  rows = []
  for c in configs:
    rows.append(run(c, steps, trials, variants, overrides, min_trial_s))
    r = rows[-1]
    print(f"{r['size']} ({r['params']:,} params, {r['batch']}x{r['seq_len']}, "
          f"{r['compute_dtype']}, remat {r['remat']}, {r['device']}): " + ', '.join(
              f'{n} {v:,.0f}' for n, v in r['tokens_per_s'].items())
          + f" tokens/s; fedpt/floor {r['ratio']:.3f} (floor: {r['floor']})", flush=True)
  return bare_step.report(rows, markdown(rows), json_out)


def main(argv):
  del argv
  cli.run_or_explain(throughput, FLAGS.sizes, FLAGS.config, FLAGS.variants, FLAGS.remats,
                     FLAGS.steps, FLAGS.trials, FLAGS.json_out, FLAGS.fedpt_overrides,
                     FLAGS.min_trial_s)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags_or_explain)
