r"""Simulates a whole federated run on one machine: every silo and aggregator is a process.

  python scripts/simulate.py --config=configs/demo.py --workdir=/tmp/fedpt-demo
  python scripts/simulate.py --config=configs/tiny.py --workdir=/tmp/sim \
      --config.federation.silos="('web','text')" --config.federation.rounds=3

Prints one line per round and a summary. Run it again with the same flags to
resume an interrupted run; a finished run is refused. --baselines then trains each
silo's isolated baseline with the same compute and data order, one process at a
time (resumable too), and prints the member-gain table: does joining pay, per silo?
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fedpt import cli  # noqa: E402
from fedpt import simulation  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'A configs/*.py file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Logs, the silos\' private checkpoints, rounds.jsonl.')
flags.DEFINE_string('storage', None, 'The run\'s shared storage root (default <workdir>/bucket).')
flags.DEFINE_bool('baselines', False, 'After the run, train each silo\'s isolated baseline '
                  '(<workdir>/baselines/<id>: its own corpus, data order and inner steps) and '
                  'print the member-gain report (<workdir>/member_gain/).')
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  storage = FLAGS.storage or os.path.join(FLAGS.workdir, 'bucket')
  cli.run_or_explain(simulation.simulate, FLAGS.config,
                     config_flags.get_config_filename(FLAGS['config']), storage, FLAGS.workdir,
                     typed=cli.config_overrides(), baselines=FLAGS.baselines)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags_or_explain)
