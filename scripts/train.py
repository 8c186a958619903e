r"""Trains one silo: alone (the centralised baseline), or in a federated run.

  python scripts/train.py --config=configs/demo.py --workdir=/tmp/fedpt-demo
  python scripts/train.py --config=configs/demo.py --workdir=/tmp/silo-web \
      --silo=web --storage=/shared/run1 --config.data.stdlib_group=web

  python scripts/train.py --workdir=/tmp/fedpt-demo        # resumes with its recorded config
  python scripts/train.py --config=... --workdir=/tmp/alone-web --data_order_of=web \
      --config.train.steps=400   # silo web's isolated baseline (simulate --baselines does this)

Resumes automatically from --workdir with the config it recorded at its first start
(<workdir>/config.json): a changed value that would change the run is refused unless
--allow_config_change. On SIGTERM or Ctrl-C (to any host of a multi-host silo) every
host checkpoints the same step and exits with status 75 (EX_TEMPFAIL) so that a
supervisor restarts it; a second Ctrl-C stops at once. A silo spanning hosts sets
--config.distributed.mode=auto (TPU, SLURM, Open MPI) or =explicit.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fedpt import cli  # noqa: E402
from fedpt import errors  # noqa: E402
from fedpt import protocol  # noqa: E402
from fedpt import silo  # noqa: E402
from fedpt import trainer  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'A configs/*.py file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Checkpoints, metrics.jsonl and TensorBoard events.')
flags.DEFINE_integer('stop_at_step', None, 'Checkpoint and stop at this step (resumable).')
flags.DEFINE_string('silo', None, 'Join a federated run as this silo id (see run.json).')
flags.DEFINE_string('storage', None, 'The federated run\'s shared storage root.')
flags.DEFINE_string('keys', None, 'This silo\'s key folder (silo_<id>.key and the pinned '
                    'aggregator.pub); needed by signed runs.')
flags.DEFINE_bool('allow_config_change', False, 'Resume with the typed --config.* values even '
                  'where they differ from the workdir\'s recorded config; the change is recorded.')
flags.DEFINE_string('data_order_of', None, 'A plain run reads its data in this silo\'s '
                    'order (the seed the silo uses in its run): an isolated baseline then sees '
                    'the batches that silo saw. Pass it again to resume.')
flags.mark_flags_as_required(['workdir'])
FLAGS = flags.FLAGS


def _data_seed(silo_id, workdir):
  """The data seed of --data_order_of's silo, with the seed the workdir records (or --config's)."""
  if silo_id is None:
    return None
  if FLAGS.silo is not None:
    raise app.UsageError('--data_order_of is for a plain run (an isolated baseline), not --silo')
  config = trainer.resume_config(FLAGS.config, workdir, cli.config_overrides(), True)[0]
  return protocol.silo_data_seed(config.seed, silo_id)


@cli.config_resolver
def _config():
  """The config this command trains with: the workdir's record (and run.json's contract)."""
  if FLAGS.silo is not None:
    return silo.resolved_config(FLAGS.config, FLAGS.silo, FLAGS.storage, FLAGS.workdir,
                                cli.config_overrides(), FLAGS.allow_config_change)
  return trainer.resume_config(FLAGS.config, FLAGS.workdir, cli.config_overrides(),
                               FLAGS.allow_config_change)[0]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if (FLAGS.silo is None) != (FLAGS.storage is None):
    raise app.UsageError('--silo and --storage go together: pass both to join a run.')
  if FLAGS.silo is not None and FLAGS.stop_at_step is not None:
    raise app.UsageError('--stop_at_step is for a plain run; a silo stops at round boundaries. '
                         'Fix: drop it, and stop the silo with SIGTERM or Ctrl-C (it '
                         'checkpoints and resumes where it stopped)')
  if FLAGS.silo is None and FLAGS.keys is not None:
    raise app.UsageError('--keys is for a silo of a signed run (with --silo and --storage); a '
                         'plain run signs nothing. Fix: drop --keys, or add --silo and --storage')
  if FLAGS.silo is not None:
    summary = cli.run_or_explain(silo.run_silo, FLAGS.config, FLAGS.silo, FLAGS.storage,
                                 FLAGS.workdir, keys_dir=FLAGS.keys,
                                 typed=cli.config_overrides(),
                                 allow_config_change=FLAGS.allow_config_change)
  else:
    summary = cli.run_or_explain(
        trainer.train_and_evaluate, FLAGS.config, FLAGS.workdir, stop_at_step=FLAGS.stop_at_step,
        typed=cli.config_overrides(), allow_config_change=FLAGS.allow_config_change,
        data_seed=cli.run_or_explain(_data_seed, FLAGS.data_order_of, FLAGS.workdir))
  if summary['preempted']:
    sys.exit(errors.PREEMPTED_EXIT_CODE)


if __name__ == '__main__':
  cli.run(main)
