r"""Removes a silo from a federated run: a new run branched before its first delta.

  python scripts/unlearn.py --storage=gs://bucket/run1 --silo=web --mode=retrain \
      --out=gs://bucket/run1-without-web --keys=~/keys
  python scripts/unlearn.py --storage=gs://bucket/run1 --silo=web --mode=replay \
      --out=gs://bucket/run1-replayed --keys=~/keys [--calibration_rounds=2]

retrain is exact: the remaining silos continue the new run from the last global round
the silo did not influence. replay is fast and approximate: it re-aggregates the remaining
silos' stored deltas (federation.retain_for_unlearning). README: "Unlearning a silo".
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from fedpt import cli  # noqa: E402
from fedpt import unlearning  # noqa: E402

flags.DEFINE_string('storage', None, 'Shared storage root of the run to unlearn from.')
flags.DEFINE_string('silo', None, 'The silo whose influence is removed.')
flags.DEFINE_string('mode', 'retrain', 'retrain (exact) or replay (approximate, no training).')
flags.DEFINE_string('out', None, 'A new, empty storage root for the unlearned run.')
flags.DEFINE_string('keys', None, 'Aggregator key folder: signs the new run (signed runs).')
flags.DEFINE_integer('calibration_rounds', 0,
                     'replay: real rounds the remaining silos train after the replayed ones.')
flags.mark_flags_as_required(['storage', 'silo', 'out'])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  done = cli.run_or_explain(unlearning.unlearn, FLAGS.storage, FLAGS.silo, FLAGS.mode,
                            FLAGS.out, FLAGS.keys, FLAGS.calibration_rounds)
  replayed = done['replayed_rounds']
  print(f"run {done['run_id']} at {FLAGS.out}: run {done['parent']['run_id']} without silo "
        f"{FLAGS.silo}, branched at global round {done['branch_round']}"
        + (f", rounds {replayed[0]}-{replayed[-1]} replayed" if replayed else ''))
  if done['next_round'] < done['rounds']:
    print(f"next: scripts/aggregate.py --storage={FLAGS.out}, and each of silos "
          f"{', '.join(done['silos'])} with --storage={FLAGS.out} and a fresh --workdir "
          f"(rounds {done['next_round']}-{done['rounds'] - 1})")


if __name__ == '__main__':
  cli.run(main)
