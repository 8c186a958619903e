r"""Fine-tunes a federated run's global model on one silo's own data: its personal model.

  python scripts/personalize.py --config=configs/demo.py --workdir=/tmp/silo-web --silo=web \
      --storage=/shared/run1 --config.personal.steps=200 [--round=8] [--force]

Trains global round --round (the newest when left out), with the silo's own private
parameters, for personal.steps AdamW steps on the silo's training batches that its
federated rounds did not use, and writes <workdir>/personal/ (config.json and
checkpoints/, as scripts/train.py writes a workdir), so evaluate.py, sample.py and
export_hf.py take --workdir=<workdir>/personal. Nothing is published to the bucket.
Killed, it resumes; once finished, a rerun does nothing unless --round, personal.*
or --force ask for another. The silo's config comes from its workdir (config.json);
typed --config.personal.* values set the phase. A run whose silos set personal.steps
runs this phase by itself after the last round (scripts/train.py --silo).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fedpt import cli  # noqa: E402
from fedpt import errors  # noqa: E402
from fedpt import silo  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'A configs/*.py file; optional when the silo\'s '
                                'workdir recorded its config.', lock_config=True)
flags.DEFINE_string('workdir', None, 'The silo\'s workdir (its private checkpoints).')
flags.DEFINE_string('silo', None, 'The silo id (see run.json).')
flags.DEFINE_string('storage', None, 'The federated run\'s shared storage root.')
flags.DEFINE_string('keys', None, 'The silo\'s key folder; needed by signed runs.')
flags.DEFINE_integer('round', None, 'The global round to personalise; the newest by default.')
flags.DEFINE_bool('force', False, 'Redo a finished personal phase.')
flags.mark_flags_as_required(['workdir', 'silo', 'storage'])
FLAGS = flags.FLAGS


@cli.config_resolver
def _config():
  """The silo's config: its workdir's record under run.json's contract, typed personal.*."""
  return silo.resolved_config(FLAGS.config, FLAGS.silo, FLAGS.storage, FLAGS.workdir,
                              cli.config_overrides())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  summary = cli.run_or_explain(silo.personalize, FLAGS.config, FLAGS.silo, FLAGS.storage,
                               FLAGS.workdir, round_index=FLAGS.round, force=FLAGS.force,
                               keys_dir=FLAGS.keys, typed=cli.config_overrides())
  if summary['preempted']:
    sys.exit(errors.PREEMPTED_EXIT_CODE)
  print(f"personal model of global round {summary['round']} in {summary['workdir']}: held-out "
        f"loss {summary['eval_loss']:.4f} (global {summary['global_eval_loss']:.4f})")


if __name__ == '__main__':
  cli.run(main)
