r"""Tests whether a model was trained on a silo's data, by the data watermark it planted.

  python scripts/watermark.py --verify --workdir=/private/web                  # its own model
  python scripts/watermark.py --verify --workdir=/private/web --storage=gs://bucket/run1 \
      --round=8                                                               # a global round
  python scripts/watermark.py --verify --workdir=/private/web --model_workdir=/tmp/suspect

--workdir is the silo's (or plain run's) private workdir that trained with
data.watermark.enabled=True: its watermark.json holds the secret. The model tested is its
newest checkpoint (--step), a global round of --storage (--round, default the newest), or
another run's checkpoint (--model_workdir, --step). It prints the secret sequences' losses,
those of --null_samples fresh random sequences of the same distribution (from --null_seed,
independent of the secret), the z-score, the one-sided p-value and a verdict at --alpha
(fedpt/watermark.py; docs/data.md "Data watermarks"). Nothing is written; the secret and
the sequences are never printed. --config is optional where the model's workdir recorded
its config.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fedpt import cli  # noqa: E402
from fedpt import loading  # noqa: E402
from fedpt import watermark  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'The config the model was trained with; '
                                'optional where its workdir recorded it.', lock_config=True)
flags.DEFINE_bool('verify', False, 'Test the model for the watermark (the only action).')
flags.DEFINE_string('workdir', None, 'The private workdir holding watermark.json (the secret).')
flags.DEFINE_string('model_workdir', None, 'Test this run\'s checkpoint instead of --workdir\'s.')
flags.DEFINE_integer('step', None, 'The checkpoint step of the model\'s workdir; default: newest.')
flags.DEFINE_string('storage', None, 'Test a global round of this federated run instead.')
flags.DEFINE_integer('round', None, 'The global round of --storage; default: the newest.')
flags.DEFINE_integer('null_samples', 1000, 'Fresh random sequences forming the null.')
flags.DEFINE_integer('null_seed', 0, 'Seed of the null sequences (public; not the secret).')
flags.DEFINE_float('alpha', 0.01, 'Significance level of the verdict.')
flags.DEFINE_enum('format', 'text', ['text', 'json'], 'Output: lines for people, or JSON.')
flags.mark_flags_as_required(['workdir'])
FLAGS = flags.FLAGS


def _source() -> loading.Source:
  return watermark.model_source(FLAGS.workdir, model_workdir=FLAGS.model_workdir,
                                step=FLAGS.step, storage=FLAGS.storage,
                                round_index=FLAGS['round'].value)


@cli.config_resolver
def _config():
  """The model's recorded config (its workdir's or run's), with the typed overrides."""
  source = _source()
  return loading.source_config(FLAGS.config, cli.config_overrides(), workdir=source.workdir,
                               step=source.step, storage=source.storage,
                               round_index=source.round_index)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS.verify:
    raise app.UsageError('nothing to do. Fix: pass --verify to test a model for the watermark '
                         'kept in --workdir')
  source = cli.run_or_explain(_source)
  config = cli.run_or_explain(_config)
  result = cli.run_or_explain(watermark.verify, config, FLAGS.workdir, source,
                              null_samples=FLAGS.null_samples, null_seed=FLAGS.null_seed,
                              alpha=FLAGS.alpha)
  print(json.dumps(result, indent=1) if FLAGS.format == 'json' else watermark.render(result),
        flush=True)


if __name__ == '__main__':
  cli.run(main)
