r"""Tokenises a corpus into the shard format fedpt trains on (docs/data.md).

  python scripts/prepare_data.py --source='data/*.txt' --source=more.jsonl \
      --source=data/dir --out=/data/mycorpus [--tokenizer=out/sp.model] \
      [--val_fraction=0.02 | --val=heldout.txt ...] [--on_bad_text=error|replace|skip]

Then train with data.corpus=/data/mycorpus (and data.tokenizer set to the same
.model if it is not the shipped default). Validation is held out from the
sources by document hash (--val_fraction), or is exactly the --val sources.
A split that would be empty is refused; one of fewer than
data.TINY_SPLIT_WINDOWS windows of --seq_len+1 tokens gets a `warning:` line
on stderr. A user error (a missing source, text that is not UTF-8 under
--on_bad_text=error, an empty split, ...) prints one line `error: ...` and
exits with status 2.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags

from fedpt import cli
from fedpt import data

_SOURCE = flags.DEFINE_multi_string(
    'source', None, 'Text/JSONL file or glob, directory (its '
    f'{"/".join(data.TEXT_EXTENSIONS)} files, recursively), or '
    'tfds:NAME[/CONFIG][:SPLIT]. Repeatable.', required=True)
_TOKENIZER = flags.DEFINE_string('tokenizer', data.default_tokenizer_path(),
                                 'SentencePiece .model file.')
_OUT = flags.DEFINE_string('out', None, 'Output data dir.', required=True)
_VAL_FRACTION = flags.DEFINE_float('val_fraction', 0.02,
                                   'Fraction of documents for validation (without --val).')
_VAL = flags.DEFINE_multi_string(
    'val', None, 'Held-out validation text, the same kinds as --source. Repeatable. Then '
    'every --source document is train and val is exactly these.')
_SEQ_LEN = flags.DEFINE_integer(
    'seq_len', 256, 'The data.seq_len you will train with: a split of fewer than '
    f'{data.TINY_SPLIT_WINDOWS} windows of seq_len+1 tokens gets a warning.')
_TEXT_FIELD = flags.DEFINE_string('text_field', 'text',
                                  'Field holding the text in JSONL/TFDS.')
_ON_BAD_TEXT = flags.DEFINE_enum(
    'on_bad_text', 'error', data.BAD_TEXT_POLICIES,
    'A record (JSONL line, text file, TFDS record) whose text is not UTF-8, '
    'holds a lone surrogate or NUL, or is missing: error stops naming its '
    'file and line; replace puts U+FFFD for each bad byte or character; skip '
    'drops the record.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  documents = cli.run_or_explain(data.read_sources, _SOURCE.value,
                                 _TEXT_FIELD.value,
                                 on_bad_text=_ON_BAD_TEXT.value)
  val_documents = _VAL.value and cli.run_or_explain(
      data.read_sources, _VAL.value, _TEXT_FIELD.value, on_bad_text=_ON_BAD_TEXT.value)
  meta = cli.run_or_explain(data.prepare_data, documents, _TOKENIZER.value,
                            _OUT.value, _VAL_FRACTION.value,
                            sources=_SOURCE.value, val_documents=val_documents or None,
                            val_sources=_VAL.value, require_splits=True)
  for line in data.tiny_split_warnings(meta, _SEQ_LEN.value):
    print(f'warning: {line}', file=sys.stderr)
  for split, counts in meta['splits'].items():
    origin = ('' if split == 'train' else
              f' (from --val {", ".join(_VAL.value)})' if _VAL.value else
              f' (held out at --val_fraction={_VAL_FRACTION.value})')
    print(f'{split}: {counts["documents"]} documents, '
          f'{counts["tokens"]} tokens{origin}')
  bad = meta['bad_text']
  print(f'bad text (--on_bad_text={_ON_BAD_TEXT.value}): {bad["replaced"]} '
        f'records replaced, {bad["skipped"]} skipped')
  print(f'wrote {_OUT.value} (vocab {meta["vocab_size"]}, {meta["dtype"]})')


if __name__ == '__main__':
  cli.run(main)
