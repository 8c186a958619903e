"""What every entry point shares: user errors become one clear line, not a traceback."""
import os
import sys

from absl import flags
from absl import logging

from fedpt import errors


def run_or_explain(fn, *args, **kwargs):
  """Calls fn; a user error exits with status 2 and its message."""
  try:
    return fn(*args, **kwargs)
  except errors.UserError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(2)  # Skip atexit hooks of half-initialised libraries (e.g. Orbax threads).


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
