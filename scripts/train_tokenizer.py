r"""Trains a SentencePiece tokenizer for fedpt.

  python scripts/train_tokenizer.py --model_prefix=out/sp --vocab_size=4096 \
      [--input='data/*.txt' --input=corpus.jsonl --input=tfds:NAME:train]

Without --input it trains on the default corpus (the Python stdlib sources);
that is how fedpt/assets/stdlib_sp4k.model was made.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags

from fedpt import data

_INPUT = flags.DEFINE_multi_string(
    'input', None, 'Text/JSONL file or glob, or tfds:NAME[/CONFIG][:SPLIT]. '
    'Repeatable. Default: the stdlib corpus (all groups).')
_TEXT_FIELD = flags.DEFINE_string('text_field', 'text',
                                  'Field holding the text in JSONL/TFDS.')
_MODEL_PREFIX = flags.DEFINE_string('model_prefix', None,
                                    'Writes MODEL_PREFIX.model.', required=True)
_VOCAB_SIZE = flags.DEFINE_integer('vocab_size', data.DEFAULT_VOCAB_SIZE,
                                   'Number of pieces.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    if _INPUT.value:
      documents = data.read_sources(_INPUT.value, _TEXT_FIELD.value)
    else:
      documents = data.stdlib_documents('all')
    path = data.train_tokenizer(documents, _MODEL_PREFIX.value,
                                _VOCAB_SIZE.value)
  except data.DataError as e:
    sys.exit(f'error: {e}')
  print(f'wrote {path} (sha256 {data.file_sha256(path)})')


if __name__ == '__main__':
  app.run(main)
