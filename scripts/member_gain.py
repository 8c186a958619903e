r"""Per silo, on its own held-out data: does the federation beat training alone?

  python scripts/member_gain.py --storage=/tmp/sim/bucket --workdir=/tmp/sim --out=/tmp/gain
  python scripts/member_gain.py --storage=gs://consortium/run1 --silo=web \
      --eval_set=/data/web --baseline=/private/web-alone --personal=/private/web-personal \
      --out=/tmp/gain

The first reads a `simulate.py --baselines` workdir (every silo's corpus, baseline
and personalised model); the second is one member on its own machine. Scores the
isolated baseline, the global model (newest round, or --round) and the personalised
model (if any) on the silo's held-out split, every token once (--sampled: only the
train.eval_batches windows), and says how many tokens. Writes <out>/member_gain.json,
.csv, .md and .png, prints the table and one verdict per silo, and warns when the
baseline's steps differ from the silo's (inner steps in the run + personalisation).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fedpt import cli  # noqa: E402
from fedpt import member_gain  # noqa: E402
from fedpt import protocol  # noqa: E402
from fedpt import storage as storage_lib  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'Optional: how to evaluate (batch size); the '
                                'model is the run\'s.', lock_config=True)
flags.DEFINE_string('storage', None, 'The run\'s storage root (bucket).')
flags.DEFINE_string('workdir', None, 'A simulate.py workdir: every silo\'s inputs.')
flags.DEFINE_string('silo', None, 'Report on this silo only (with --eval_set and --baseline: '
                    'a member without a simulate workdir).')
flags.DEFINE_string('eval_set', None, 'The silo\'s held-out set: a prepare_data.py output (its '
                    'val split), a text/JSONL file or tfds:NAME.')
flags.DEFINE_string('baseline', None, 'The silo\'s isolated baseline (a train.py workdir).')
flags.DEFINE_string('personal', None, 'The silo\'s personalised model (a train.py workdir).')
flags.DEFINE_integer('round', None, 'The global round; default: the newest committed.')
flags.DEFINE_bool('sampled', False, 'Score only the sampled train.eval_batches windows.')
flags.DEFINE_string('out', None, 'Output folder (default <workdir>/member_gain).')
flags.mark_flags_as_required(['storage'])
FLAGS = flags.FLAGS


def members():
  """The Members the flags name: a workdir's silos, with --silo/--eval_set/... over them."""
  explicit = {'eval_set': FLAGS.eval_set, 'baseline': FLAGS.baseline, 'personal': FLAGS.personal}
  if FLAGS.workdir is None:
    if FLAGS.silo is None or FLAGS.eval_set is None:
      raise member_gain.MemberGainError(
          'without --workdir, name the member: --silo=ID --eval_set=DIR [--baseline=DIR] '
          '[--personal=DIR]')
    return [member_gain.Member(FLAGS.silo, **explicit)]
  silos = [FLAGS.silo] if FLAGS.silo else protocol.silo_ids(
      storage_lib.RunStorage(FLAGS.storage).read_run())
  found = member_gain.members_from_workdir(FLAGS.workdir, silos)
  return [member_gain.Member(m.silo, **{k: explicit[k] or getattr(m, k) for k in explicit})
          for m in found]


@cli.config_resolver
def _config():
  """The config the members' models are scored with (the run's model, --config's usage)."""
  run = storage_lib.RunStorage(FLAGS.storage).read_run()
  return member_gain.eval_config(run, members(), FLAGS.config)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  out = FLAGS.out or (os.path.join(FLAGS.workdir, 'member_gain') if FLAGS.workdir else None)
  if out is None:
    raise app.UsageError('--out is required without --workdir')
  result = cli.run_or_explain(
      lambda: member_gain.member_gain(FLAGS.storage, members(), out, config=FLAGS.config,
                                      round_index=FLAGS['round'].value,
                                      whole=not FLAGS.sampled))
  print(f"wrote {', '.join(result['files'])}")


if __name__ == '__main__':
  cli.run(main)
