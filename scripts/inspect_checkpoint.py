r"""Shows a checkpoint's parameters (shape, dtype, bytes, hash) and its provenance.

  python scripts/inspect_checkpoint.py --storage=gs://bucket/run1 --round=8   # a global round
  python scripts/inspect_checkpoint.py --workdir=/private/web [--step=3]      # a private one

A global round is described from its signed metadata alone (no arrays are read):
round, contributing silos, their weights and tokens, rejected silos, signature check.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from fedpt import cli  # noqa: E402
from fedpt import inspection  # noqa: E402
from fedpt import loading  # noqa: E402

flags.DEFINE_enum('format', 'table', ['table', 'json'], 'table for people, json for tools.')
cli.define_source_flags('inspect')
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  info = cli.run_or_explain(lambda: inspection.describe(loading.Source(**cli.source_flags())))
  print(json.dumps(info, indent=1) if FLAGS.format == 'json' else inspection.render(info))


if __name__ == '__main__':
  cli.run(main)
