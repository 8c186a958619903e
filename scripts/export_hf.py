r"""Exports a trained model as a Hugging Face Llama checkpoint (transformers can load it).

  python scripts/export_hf.py --workdir=/tmp/fedpt-demo --out=/tmp/fedpt-demo-hf
  python scripts/export_hf.py --config=configs/demo.py --storage=/shared/run1 --round=20 \
      --out=/tmp/run1-round20-hf

--workdir exports the newest (or --step) checkpoint of a plain or silo run; --storage
exports committed global round --round (the newest when left out) of a federated run:
the sources sample.py, evaluate.py and inspect_checkpoint.py take too. --config is
optional for a workdir that recorded its config (<workdir>/config.json). --out must
be new or empty.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fedpt import cli  # noqa: E402
from fedpt import export_hf  # noqa: E402
from fedpt import loading  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'The configs/*.py file that trained the model; '
                                'optional for a workdir that recorded it.', lock_config=True)
flags.DEFINE_string('out', None, 'New or empty folder for the Hugging Face files.')
flags.mark_flags_as_required(['out'])
cli.define_source_flags('export')
FLAGS = flags.FLAGS


@cli.config_resolver
def _config():
  """The source's recorded config (its workdir's or run's), with the typed overrides."""
  return loading.source_config(FLAGS.config, cli.config_overrides(), **cli.source_flags())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = cli.run_or_explain(_config)
  summary = cli.run_or_explain(export_hf.export, config, FLAGS.out, **cli.source_flags())
  print(f"exported {summary['parameters']:,} parameters of {summary['source']} to "
        f"{summary['out']} (load with transformers.LlamaForCausalLM.from_pretrained)")


if __name__ == '__main__':
  cli.run(main)
