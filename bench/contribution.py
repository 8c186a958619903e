r"""What contribution values cost a silo per round, and how far first order is from exact.

Simulates a federation (`scripts/simulate.py`'s processes) with every silo at
`contribution.mode` (default shapley), then reads the silos' records from the bucket:
per round and silo, the measured change of its held-out loss, the first-order total
(sum of the per-contributor values + carry), the sum of the Shapley values (which must
equal the change of the recomputed update), the seconds each record took, and the
bytes of deltas each silo read for it (K x a delta).

  python bench/contribution.py --config=configs/demo.py --rounds=3 --mode=shapley
"""
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fedpt import cli  # noqa: E402
from fedpt import ledger  # noqa: E402
from fedpt import simulation  # noqa: E402
from fedpt import storage as storage_lib  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
  """At start only: tests import `summarize` beside other modules' flags."""
  config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Model config.',
                                  lock_config=True)
  flags.DEFINE_integer('rounds', 3, 'Rounds of the federation.')
  flags.DEFINE_string('mode', 'shapley', 'contribution.mode of every silo.')
  flags.DEFINE_string('workdir', None, 'Where to simulate (default: a temporary directory).')
  flags.DEFINE_string('out', None, 'Also write the summary as JSON here.')


def summarize(store: storage_lib.RunStorage) -> dict:
  """Per round and evaluating silo: the record's numbers and the delta bytes it read."""
  rows = ledger.build_ledger(store)
  out = []
  for row in rows:
    c = row['contribution']
    read = sum(row['bytes_up_by_silo'].get(s, 0) for s in row['contributors'])
    for j in c['method_by_silo']:
      record = store.contribution_records(row['round'])[j]
      first = record['first_order'] or {}
      out.append({
          'round': row['round'], 'silo': j, 'method': record['method'],
          'measured': record['measured_change'], 'first_order_total': record['total'],
          'carry': record['carry'], 'first_order_sum': sum(first.values()) if first else None,
          'shapley_sum': sum(record['shapley'].values()) if record['shapley'] else None,
          'seconds': record['seconds'], 'delta_bytes_read': read})
  relative = [abs(r['first_order_total'] - r['measured']) / abs(r['measured'])
              for r in out if abs(r['measured']) > 1e-9]
  return {'records': out, 'rounds': len(rows),
          'median_first_order_relative_error': float(np.median(relative)) if relative else None,
          'mean_seconds': float(np.mean([r['seconds'] for r in out])) if out else None}


def render(summary: dict) -> str:
  header = (f"{'round':>5} {'silo':<12} {'measured':>9} {'1st total':>9} {'carry':>9} "
            f"{'shapley':>9} {'seconds':>7} {'read':>9}")
  lines = [header, '-' * len(header)]
  for r in summary['records']:
    fmt = lambda x: f'{x:>+9.4f}' if x is not None else f"{'-':>9}"  # noqa: E731
    lines.append(f"{r['round']:>5} {r['silo']:<12} {fmt(r['measured'])} "
                 f"{fmt(r['first_order_total'])} {fmt(r['carry'])} {fmt(r['shapley_sum'])} "
                 f"{r['seconds']:>7.2f} {r['delta_bytes_read'] / 1e6:>7.1f}MB")
  lines.append(f"median |first order - measured| / |measured|: "
               f"{summary['median_first_order_relative_error']}; mean seconds per record: "
               f"{summary['mean_seconds']}")
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = FLAGS.config
  config.federation.rounds = FLAGS.rounds
  config.contribution.mode = FLAGS.mode
  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix='fedpt-contribution-')
  root = os.path.join(workdir, 'bucket')
  cli.run_or_explain(simulation.simulate, config,
                     config_flags.get_config_filename(FLAGS['config']), root, workdir)
  summary = summarize(storage_lib.RunStorage(root))
  print(render(summary))
  if FLAGS.out:
    with open(FLAGS.out, 'w') as f:
      json.dump(summary, f, indent=1)


if __name__ == '__main__':
  define_flags()
  cli.run(main)
