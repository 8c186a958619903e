r"""Prints a federated run's ledger: per round who contributed, tokens, losses, bytes, rejections.

  python scripts/status.py --storage=/shared/run1
  python scripts/status.py --storage=/shared/run1 --format=json
  python scripts/status.py --storage=/shared/run1 --follow

--follow prints one line per round as the run's rounds finish (the lines
simulate.py prints: each silo's train loss, the global held-out loss, tokens,
bytes, seconds) and exits after the last round; launch/local.sh runs it.
"""
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from fedpt import cli  # noqa: E402
from fedpt import ledger  # noqa: E402
from fedpt import simulation  # noqa: E402

flags.DEFINE_string('storage', None, 'Shared storage root of the run.')
flags.DEFINE_enum('format', 'table', ['table', 'json'], 'table for people, json for tools.')
flags.DEFINE_bool('follow', False, 'Print one line per round as rounds finish, until the last.')
flags.mark_flags_as_required(['storage'])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if FLAGS.follow:
    cli.run_or_explain(simulation.follow, FLAGS.storage, functools.partial(print, flush=True))
  else:
    print(cli.run_or_explain(ledger.status, FLAGS.storage, FLAGS.format))


if __name__ == '__main__':
  cli.run(main)
