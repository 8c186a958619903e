r"""Runs the aggregator (or one slice of it) of a federated run until its last round.

  python scripts/aggregate.py --storage=/shared/run1            # everything
  python scripts/aggregate.py --storage=/shared/run1 --shard=1/2 # one of two slices
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from fedpt import aggregator  # noqa: E402
from fedpt import cli  # noqa: E402

flags.DEFINE_string('storage', None, 'Shared storage root of the run.')
flags.DEFINE_string('shard', '0/1', 'i/n: aggregate parameter slice i of n (n from run.json).')
flags.DEFINE_string('keys', None,
                    'Aggregator key folder (aggregator.key); needed by signed runs.')
flags.mark_flags_as_required(['storage'])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  shard, num_shards = cli.run_or_explain(aggregator.parse_shard, FLAGS.shard)
  cli.run_or_explain(aggregator.run_aggregator, FLAGS.storage, shard, num_shards,
                     keys_dir=FLAGS.keys)


if __name__ == '__main__':
  cli.run(main)
