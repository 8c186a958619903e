r"""Checks and tokenises each silo's own corpus for a one-machine run (launch/local.sh).

  python scripts/prepare_silos.py --config=configs/tiny.py --workdir=/tmp/fedpt-local \
      --silo_data=web=/data/web.jsonl,code=/data/code_dir [--tokenizer=train] \
      [--config.federation.silos="('web','code')"]

What simulate.py --silo_data does before it starts any process (fedpt/corpora.py):
a raw source (text/JSONL file, directory of text files) is tokenised once into
<workdir>/data/<silo>/, a prepared dir is checked against the run's tokenizer,
and with --tokenizer=train a tokenizer is trained on the silos' text into
<workdir>/tokenizer/sp.model. Prints `silo ID: DIR` per silo and `tokenizer:
PATH`. The silos are federation.silos; a bad setting is one line `error: ...`,
exit status 2.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from ml_collections import config_flags

from fedpt import cli
from fedpt import corpora
from fedpt import data

config_flags.DEFINE_config_file('config', None, 'A configs/*.py file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Raw sources go to WORKDIR/data/<silo>/.',
                               required=True)
_SILO_DATA = flags.DEFINE_multi_string(
    'silo_data', None, 'NAME=PATH,...: each silo\'s own corpus. Repeatable.', required=True)
_TOKENIZER = flags.DEFINE_enum('tokenizer', 'config', corpora.TOKENIZER_CHOICES,
                               'config: --config.data.tokenizer; train: trained on the silos\' '
                               'raw text into WORKDIR/tokenizer/.')
_TEXT_FIELD = flags.DEFINE_string('text_field', 'text', 'The text field of JSONL sources.')
_ON_BAD_TEXT = flags.DEFINE_enum('on_bad_text', 'error', data.BAD_TEXT_POLICIES,
                                 'A record with bad text: stop, replace (U+FFFD) or skip it.')
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  silo_data = cli.run_or_explain(corpora.parse, _SILO_DATA.value)
  dirs, tokenizer = cli.run_or_explain(
      corpora.prepare, flags.FLAGS.config, silo_data, _WORKDIR.value, tokenizer=_TOKENIZER.value,
      text_field=_TEXT_FIELD.value, on_bad_text=_ON_BAD_TEXT.value)
  for silo, corpus in dirs.items():
    print(f'silo {silo}: {corpus}')
  print(f'tokenizer: {tokenizer}')


if __name__ == '__main__':
  cli.run(main)
