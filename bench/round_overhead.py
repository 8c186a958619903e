r"""Seconds a silo spends outside its inner steps per round, and bytes published per format.

One silo and the aggregator run in this process over a local directory bucket,
so 'wait' is the aggregator's own compute (no network). Overhead is everything
but the inner steps, as a fraction of the inner compute.

  python bench/round_overhead.py --config=configs/demo.py --inner_steps=25 --rounds=3
"""
import os
import statistics
import sys
import tempfile
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fedpt import aggregator  # noqa: E402
from fedpt import silo  # noqa: E402

config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Model config.', lock_config=True)
flags.DEFINE_integer('inner_steps', 25, 'H.')
flags.DEFINE_integer('rounds', 3, 'Rounds per format; the first is dropped (compilation).')
flags.DEFINE_list('formats', ['none', 'bf16', 'int8', 'int4'], 'Compression formats.')
FLAGS = flags.FLAGS


def measure(config, fmt: str, rounds: int, inner_steps: int) -> dict:
  config = config.copy_and_resolve_references()
  config.federation.update(rounds=rounds, inner_steps=inner_steps, silos=('bench',),
                           compression=fmt, error_feedback=fmt != 'none', poll_s=0.01)
  with tempfile.TemporaryDirectory() as tmp:
    root = os.path.join(tmp, 'bucket')
    aggregator.init_run(config, root)
    result = {}
    worker = threading.Thread(target=lambda: result.update(
        silo.run_silo(config, 'bench', root, os.path.join(tmp, 'silo'))))
    worker.start()
    aggregator.run_aggregator(root)
    worker.join()
  steady = result['rounds'][1:]  # Round 0 includes compilation.
  parts = {k: statistics.median(r['seconds'][k] for r in steady)
           for k in steady[0]['seconds']}
  outside = sum(v for k, v in parts.items() if k != 'inner')
  return {'format': fmt, 'bytes': steady[0]['bytes'], 'seconds': parts,
          'overhead': outside / parts['inner']}


def main(argv):
  del argv
  rows = [measure(FLAGS.config, fmt, FLAGS.rounds, FLAGS.inner_steps) for fmt in FLAGS.formats]
  dense = rows[0]['bytes'] if rows[0]['format'] == 'none' else None
  print(f'config={FLAGS.config.name} H={FLAGS.inner_steps} (median of rounds 1..'
        f'{FLAGS.rounds - 1}; seconds per round)')
  print(f"{'format':7s} {'bytes/silo/round':>17s} {'vs fp32':>8s} {'inner':>7s} {'eval':>6s} "
        f"{'publish':>8s} {'wait(agg)':>9s} {'load+ckpt':>9s} {'overhead':>9s}")
  for r in rows:
    s = r['seconds']
    ratio = f"{r['bytes'] / dense:.3f}" if dense else 'n/a'
    print(f"{r['format']:7s} {r['bytes']:17,d} {ratio:>8s} {s['inner']:7.2f} {s['eval']:6.2f} "
          f"{s['publish']:8.2f} {s['wait']:9.2f} {s['load']:9.2f} {r['overhead']:9.1%}")


if __name__ == '__main__':
  app.run(main)
