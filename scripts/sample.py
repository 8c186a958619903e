r"""Samples text from a trained model: a training run's checkpoint or a federated global round.

  python scripts/sample.py --workdir=/tmp/fedpt-tiny \
      --prompt='def main(' --temperature=0.8 --top_p=0.95 --num_samples=2
  python scripts/sample.py --config=configs/demo.py --storage=/shared/run1 --round=3 \
      --prompt='import os'

--workdir reads the newest (or --step) private checkpoint of a plain or silo run;
--storage reads global round --round (the newest committed one when left out).
These are the sources evaluate.py, export_hf.py and inspect_checkpoint.py take
too (fedpt/loading.py). A workdir's model is read with the config it recorded
(<workdir>/config.json), so --config is optional there; a typed --config.* value
that would change the model is refused. Elsewhere --config must be the one the
model was trained with: checkpoints of another model shape or tokenizer are refused.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fedpt import cli  # noqa: E402
from fedpt import loading  # noqa: E402
from fedpt import sampling  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'The configs/*.py file the model was '
                                'trained with; optional for a workdir that recorded it.',
                                lock_config=True)
flags.DEFINE_string('prompt', '', 'Text the samples continue.')
flags.DEFINE_integer('max_new_tokens', 64, 'Tokens to generate (fewer if EOS comes first).',
                     lower_bound=1)
flags.DEFINE_float('temperature', 0.0, 'Softmax temperature; 0 is greedy.', lower_bound=0.0)
flags.DEFINE_integer('top_k', 0, 'Sample from the k most likely tokens only; 0: all.',
                     lower_bound=0)
flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling: the smallest set of tokens with this '
                   'probability mass; 1: all.', lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_integer('seed', 0, 'Sampling seed: the same seed gives the same samples.')
flags.DEFINE_integer('num_samples', 1, 'Independent samples of the prompt.', lower_bound=1)
cli.define_source_flags('sample')
FLAGS = flags.FLAGS


@cli.config_resolver
def _config():
  """The source's recorded config (its workdir's or run's), with the typed overrides."""
  return loading.source_config(FLAGS.config, cli.config_overrides(), **cli.source_flags())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = cli.run_or_explain(_config)
  texts = cli.run_or_explain(
      sampling.sample_text, config, FLAGS.prompt, **cli.source_flags(),
      max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_k=FLAGS.top_k,
      top_p=FLAGS.top_p, seed=FLAGS.seed, num_samples=FLAGS.num_samples)
  for i, text in enumerate(texts):
    if len(texts) > 1:
      print(f'--- sample {i} ---')
    print(text, flush=True)


if __name__ == '__main__':
  cli.run(main)
