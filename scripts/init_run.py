r"""Creates a federated run: global round 0 (every silo's bit-identical start) and run.json.

  python scripts/init_run.py --config=configs/tiny.py --storage=gs://bucket/run1 --keys=~/keys
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fedpt import aggregator  # noqa: E402
from fedpt import cli  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'A configs/*.py file.', lock_config=True)
flags.DEFINE_string('storage', None, 'Shared storage root of the new run.')
flags.DEFINE_string('run_id', None, 'Run id (default: random).')
flags.DEFINE_string('keys', None, 'Aggregator key folder (aggregator.key + every silo_<id>.pub): '
                    'signs the run. Without it the run is unsigned (local experiments only).')
flags.mark_flags_as_required(['config', 'storage'])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  info = cli.run_or_explain(aggregator.init_run, FLAGS.config, FLAGS.storage, FLAGS.run_id,
                            FLAGS.keys)
  print(f"created run {info['run_id']} at {FLAGS.storage} with silos "
        f"{[s['id'] for s in info['silos']]}")


if __name__ == '__main__':
  cli.run(main)
