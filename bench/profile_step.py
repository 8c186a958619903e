r"""Where a train step's time goes: fedpt's step against the floor and each feature added to it.

Two views, both of the compiled programs bench/throughput.py times:
- XLA's static cost analysis of each program: FLOPs, bytes accessed and fusion count. Noise
  free, so a feature's extra memory traffic shows exactly (a global-norm clip forces the
  gradients to be written out and read back). XLA counts a while loop's body once, so scanned
  programs are comparable with each other, not with unrolled ones ('bare+all' takes fedpt's
  layout, so it is always comparable with fedpt).
- A `jax.profiler` trace of --steps steps of fedpt and of the floor: device time per op
  category (fusion kind with its number stripped), per step.

  python bench/profile_step.py --size=150m
  python bench/profile_step.py --size=7m --trace_dir=/tmp/prof   # keeps the traces
"""
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, 'bench'))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402

import bare_step  # noqa: E402
from fedpt import cli  # noqa: E402
from fedpt import model as model_lib  # noqa: E402

flags.DEFINE_string('size', '150m', f'One of {", ".join(bare_step.SIZES)}.')
flags.DEFINE_list('variants', ['scan', 'clip', 'decay_mask', 'z_loss', 'schedule', 'all'],
                  'Bare variants to analyse beside the floor.')
flags.DEFINE_integer('steps', 2, 'Traced steps per program.')
flags.DEFINE_string('trace_dir', None, 'Keep the traces here (default: a temporary folder).')
flags.DEFINE_string('json_out', None, 'Also write the figures as JSON here.')
FLAGS = flags.FLAGS

# Events of the runtime around the ops, not ops: left out of the per-op times.
_NOT_OPS = ('$', 'ThunkExecutor', 'SlinkyThreadPool', 'TfrtCpu', 'PjRt', 'Execute')


def static_costs(compiled) -> dict:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  text = compiled.as_text()
  return {'gflop': cost.get('flops', 0.0) / 1e9,
          'gb_accessed': cost.get('bytes accessed', 0.0) / 1e9,
          'fusions': len(re.findall(r' fusion\(', text[text.index('ENTRY'):]))}


def op_times(step, state, batch, steps: int, trace_dir: str) -> tuple[dict, float]:
  """({op category: ms per step}, total op ms per step) from a profiler trace."""
  for _ in range(2):  # Compiled and warm.
    state, out = step(state, batch)
  jax.block_until_ready(out)
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(steps):
      state, out = step(state, batch)
    jax.block_until_ready((state, out))
  path = sorted(glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True),
                key=os.path.getmtime)[-1]
  with gzip.open(path) as f:
    events = json.load(f)['traceEvents']
  per_op = collections.Counter()
  for e in events:
    name = e.get('name', '')
    if e.get('ph') != 'X' or name.startswith(_NOT_OPS) or 'Thunk' in name:
      continue
    per_op[re.sub(r'[._]?\d+$', '', name)] += e.get('dur', 0) / 1e3 / steps
  return dict(per_op.most_common()), sum(per_op.values())


def profile(size: str, variants, steps: int, trace_dir: str) -> dict:
  config = bare_step.load_size(size)
  trainer, batch = bare_step.single_device(config)
  state = trainer.init_state()
  params = jax.device_get(state['params'])
  with trainer._rules():  # pylint: disable=protected-access
    costs = {'fedpt': static_costs(trainer._train_step.lower(state, batch).compile())}  # pylint: disable=protected-access
  floor = None
  for text in ['', *variants]:
    features = bare_step.parse_variant(text)
    step, bare = bare_step.make_bare(features, trainer, params)
    costs[bare_step.variant_name(features)] = static_costs(step.lower(bare, batch).compile())
    if not features:
      floor = (step, bare)
  traces = {}
  for name, (step, s) in (('fedpt', (trainer.train_step, state)), ('bare', floor)):
    ops, total = op_times(step, s, batch, steps, os.path.join(trace_dir, name))
    traces[name] = {'op_ms_per_step': total, 'by_category': ops}
  return {'size': size, 'params': model_lib.param_count(trainer.model_config),
          'batch': config.data.global_batch, 'seq_len': config.data.seq_len,
          'remat': config.model.remat, 'static': costs, 'trace': traces}


def report(result: dict) -> str:
  floor = result['static']['bare']
  lines = [f"{result['size']}: {result['params']:,} params, batch {result['batch']} x "
           f"{result['seq_len']}, remat {result['remat']}", '',
           '| program | GFLOP | GB accessed | vs floor | fusions |', '|---|---:|---:|---:|---:|']
  for name, c in result['static'].items():
    lines.append(f"| {name} | {c['gflop']:,.2f} | {c['gb_accessed']:,.3f} | "
                 f"{c['gb_accessed'] / floor['gb_accessed'] - 1:+.1%} | {c['fusions']} |")
  for name, t in result['trace'].items():
    lines += ['', f"{name}: {t['op_ms_per_step']:,.1f} ms of ops per step; the largest:"]
    for op, ms in list(t['by_category'].items())[:8]:
      lines.append(f'  {ms:9.1f} ms  {ms / t["op_ms_per_step"]:6.1%}  {op}')
  return '\n'.join(lines)


def main(argv):
  del argv

  def go():
    with tempfile.TemporaryDirectory() as tmp:
      result = profile(FLAGS.size, FLAGS.variants, FLAGS.steps, FLAGS.trace_dir or tmp)
    print(report(result))
    if FLAGS.json_out:
      with open(FLAGS.json_out, 'w') as f:
        json.dump(result, f, indent=1)

  cli.run_or_explain(go)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags_or_explain)
