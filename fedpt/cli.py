"""What every entry point shares: user errors become one clear line, not a traceback."""
import os
import sys

from absl import logging

from fedpt import checkpoint
from fedpt import config
from fedpt import data
from fedpt import trainer

USER_ERRORS = (config.ConfigError, data.DataError, checkpoint.CheckpointError,
               trainer.TrainingDivergedError)


def run_or_explain(fn, *args, **kwargs):
  """Calls fn; a user error exits with status 2 and its message."""
  try:
    return fn(*args, **kwargs)
  except USER_ERRORS as e:
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(2)  # Skip atexit hooks of half-initialised libraries (e.g. Orbax threads).
