r"""Tokenises a corpus into the shard format fedpt trains on (docs/data.md).

  python scripts/prepare_data.py --source='data/*.txt' --source=more.jsonl \
      --out=/data/mycorpus [--tokenizer=out/sp.model] [--val_fraction=0.02]

Then train with data.corpus=/data/mycorpus (and data.tokenizer set to the same
.model if it is not the shipped default).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags

from fedpt import data

_SOURCE = flags.DEFINE_multi_string(
    'source', None, 'Text/JSONL file or glob, or tfds:NAME[/CONFIG][:SPLIT]. '
    'Repeatable.', required=True)
_TOKENIZER = flags.DEFINE_string('tokenizer', data.default_tokenizer_path(),
                                 'SentencePiece .model file.')
_OUT = flags.DEFINE_string('out', None, 'Output data dir.', required=True)
_VAL_FRACTION = flags.DEFINE_float('val_fraction', 0.02,
                                   'Fraction of documents for validation.')
_TEXT_FIELD = flags.DEFINE_string('text_field', 'text',
                                  'Field holding the text in JSONL/TFDS.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    meta = data.prepare_data(
        data.read_sources(_SOURCE.value, _TEXT_FIELD.value),
        _TOKENIZER.value, _OUT.value, _VAL_FRACTION.value,
        sources=_SOURCE.value)
  except data.DataError as e:
    sys.exit(f'error: {e}')
  for split, counts in meta['splits'].items():
    print(f'{split}: {counts["documents"]} documents, '
          f'{counts["tokens"]} tokens')
  print(f'wrote {_OUT.value} (vocab {meta["vocab_size"]}, {meta["dtype"]})')


if __name__ == '__main__':
  app.run(main)
