r"""Trains a SentencePiece tokenizer for fedpt.

  python scripts/train_tokenizer.py --model_prefix=out/sp --vocab_size=4096 \
      [--input='data/*.txt' --input=corpus.jsonl --input=data/dir \
       --input=tfds:NAME:train] [--on_bad_text=error|replace|skip]

Without --input it trains on the default corpus (the Python stdlib sources);
that is how fedpt/assets/stdlib_sp4k.model was made. A user error prints one
line `error: ...` and exits with status 2.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags

from fedpt import cli
from fedpt import data

_INPUT = flags.DEFINE_multi_string(
    'input', None, 'Text/JSONL file or glob, directory (its '
    f'{"/".join(data.TEXT_EXTENSIONS)} files, recursively), or '
    'tfds:NAME[/CONFIG][:SPLIT]. Repeatable. Default: the stdlib corpus (all '
    'groups).')
_TEXT_FIELD = flags.DEFINE_string('text_field', 'text',
                                  'Field holding the text in JSONL/TFDS.')
_MODEL_PREFIX = flags.DEFINE_string('model_prefix', None,
                                    'Writes MODEL_PREFIX.model.', required=True)
_VOCAB_SIZE = flags.DEFINE_integer('vocab_size', data.DEFAULT_VOCAB_SIZE,
                                   'Number of pieces.')
_ON_BAD_TEXT = flags.DEFINE_enum(
    'on_bad_text', 'error', data.BAD_TEXT_POLICIES,
    'An --input record (JSONL line, text file, TFDS record) whose text is not '
    'UTF-8, holds a lone surrogate or NUL, or is missing: error stops naming '
    'its file and line; replace puts U+FFFD for each bad byte or character; '
    'skip drops the record.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _INPUT.value:
    documents = cli.run_or_explain(data.read_sources, _INPUT.value,
                                   _TEXT_FIELD.value,
                                   on_bad_text=_ON_BAD_TEXT.value)
  else:
    documents = data.stdlib_documents('all')
  path = cli.run_or_explain(data.train_tokenizer, documents,
                            _MODEL_PREFIX.value, _VOCAB_SIZE.value)
  if _INPUT.value:
    bad = documents.bad_text
    print(f'bad text (--on_bad_text={_ON_BAD_TEXT.value}): {bad["replaced"]} '
          f'records replaced, {bad["skipped"]} skipped')
  print(f'wrote {path} (sha256 {data.file_sha256(path)})')


if __name__ == '__main__':
  cli.run(main)
