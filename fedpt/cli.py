"""What every entry point shares: user errors become one clear line, not a traceback."""
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from fedpt import errors


def run_or_explain(fn, *args, **kwargs):
  """Calls fn; a user error or an OS refusal (disk full, read-only, permission) exits with
  status 2 and one line, a Ctrl-C with 75 and a line."""
  try:
    return fn(*args, **kwargs)
  except errors.UserError as e:
    _exit(f'error: {e}', 2)
  except OSError as e:  # Disk full, read-only, permission: wherever a tool writes or reads.
    refused = errors.os_refusal(e, e.filename or 'the path it names')
    if refused is None:
      raise
    _exit(f'error: {refused}', 2)
  except KeyboardInterrupt:  # Where no checkpoint was due; training loops handle it themselves.
    _exit('interrupted (Ctrl-C): nothing half-written is kept; rerun the same command to resume',
          errors.PREEMPTED_EXIT_CODE)


def _exit(line: str, status: int):
  print(line, file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(status)  # Skip atexit hooks of half-initialised libraries (e.g. Orbax threads).


def run(main) -> None:
  """`app.run(main)` for every entry point: flag errors and usage errors are one line, status 2.

  (absl prints the whole flag help and exits 1 for an `app.UsageError`.)
  """
  def checked(argv):
    try:
      return main(argv)
    except app.UsageError as e:
      _exit(f'error: {e}', 2)
  app.run(checked, flags_parser=parse_flags_or_explain)


def parse_flags_or_explain(argv):
  """absl's flag parser, but a bad --config.x override is one line, not a traceback."""
  try:
    remaining = flags.FLAGS(argv)
    if not flags.FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)  # Orbax's INFO chatter would drown the progress line.
    if 'config' in flags.FLAGS and flags.FLAGS['config'].present:
      flags.FLAGS.config.keys()  # Config files load lazily; surface their errors now.
    return remaining
  except Exception as e:  # pylint: disable=broad-except
    message = ' '.join(str(e).replace('\\n', ' ').replace("\\'", "'").strip("'").split())
    print(f'error: bad command-line flag: {message}\n'
          f'Fix: check the flag name and value; see --helpfull for the fields.',
          file=sys.stderr, flush=True)
    sys.exit(2)


def config_overrides(name: str = 'config') -> set[str]:
  """The config fields set on this command line (--config.inner.lr=...), not by the file.

  Recorded configs (a workdir's, a run's run.json) win over a config file's
  defaults, but a field the user typed and that disagrees is refused.
  """
  if name not in flags.FLAGS or not flags.FLAGS[name].present:
    return set()
  return set(config_flags.get_override_values(flags.FLAGS[name]))


def define_source_flags(verb: str) -> None:
  """--workdir/--step/--storage/--round: a model's source, the same in every tool (`loading`)."""
  flags.DEFINE_string('workdir', None, f'A training run\'s or silo\'s workdir: {verb} its newest '
                      'checkpoint (or --step).')
  flags.DEFINE_integer('step', None, 'The checkpoint step in --workdir; default: the newest.')
  flags.DEFINE_string('storage', None, 'A federated run\'s shared storage root.')
  flags.DEFINE_integer('round', None, f'The global round of --storage to {verb}; default: the '
                       'newest committed one.')


def source_flags() -> dict:
  """The values of `define_source_flags`' flags, as keyword arguments."""
  f = flags.FLAGS
  return {'workdir': f.workdir, 'step': f.step, 'storage': f.storage, 'round_index': f['round'].value}
