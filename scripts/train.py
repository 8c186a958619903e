r"""Trains one silo with no federation; also the centralised baseline.

  python scripts/train.py --config=configs/demo.py --workdir=/tmp/fedpt-demo

Resumes automatically from --workdir. On SIGTERM it checkpoints and exits with
status 75 (EX_TEMPFAIL) so that a supervisor restarts it.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fedpt import cli  # noqa: E402
from fedpt import trainer  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'A configs/*.py file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Checkpoints, metrics.jsonl and TensorBoard events.')
flags.DEFINE_integer('stop_at_step', None, 'Checkpoint and stop at this step (resumable).')
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  summary = cli.run_or_explain(trainer.train_and_evaluate, FLAGS.config, FLAGS.workdir,
                               stop_at_step=FLAGS.stop_at_step)
  if summary['preempted']:
    sys.exit(trainer.PREEMPTED_EXIT_CODE)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags_or_explain)
