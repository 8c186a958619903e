r"""Simulates a whole federated run on one machine: every silo and aggregator is a process.

  python scripts/simulate.py --config=configs/demo.py --workdir=/tmp/fedpt-demo
  python scripts/simulate.py --config=configs/tiny.py --workdir=/tmp/sim \
      --config.federation.silos="('web','text')" --config.federation.rounds=3

  python scripts/simulate.py --config=configs/tiny.py --workdir=/tmp/own \
      --silo_data=web=/data/web.jsonl,code=/data/code_dir,news=/data/news_prepared \
      [--tokenizer=train]

Prints one line per round and a summary. Run it again with the same flags to
resume an interrupted run; a finished run is refused. --silo_data gives each
silo its own corpus (a prepared dir, a text/JSONL file or a directory of text
files; docs/data.md); raw ones are tokenised once into <workdir>/data/<silo>/.
--baselines then trains each
silo's isolated baseline with the same compute and data order, one process at a
time (resumable too), and prints the member-gain table: does joining pay, per silo?
--link=100MB/s,50ms gives each silo process its own simulated wide-area link to
the bucket (real sleeps: latency per operation, bytes over bandwidth); the
aggregators sit by the bucket.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fedpt import cli  # noqa: E402
from fedpt import corpora  # noqa: E402
from fedpt import data  # noqa: E402
from fedpt import simulation  # noqa: E402
from fedpt import storage  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'A configs/*.py file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Logs, the silos\' private checkpoints, rounds.jsonl.')
flags.DEFINE_string('storage', None, 'The run\'s shared storage root (default <workdir>/bucket).')
flags.DEFINE_multi_string(
    'silo_data', None, 'NAME=PATH,...: each silo\'s own corpus, a prepared dir '
    '(prepare_data.py), a text/JSONL file or a directory of text files. Repeatable. '
    'The silos are these names unless --config.federation.silos is given.')
flags.DEFINE_enum('tokenizer', 'config', corpora.TOKENIZER_CHOICES,
                  'With --silo_data: config uses --config.data.tokenizer; train trains a '
                  'SentencePiece model of model.vocab_size pieces on the union of the '
                  'silos\' raw text into <workdir>/tokenizer/, for every silo and init.')
flags.DEFINE_string('text_field', 'text', 'With --silo_data: the text field of JSONL sources.')
flags.DEFINE_enum('on_bad_text', 'error', data.BAD_TEXT_POLICIES,
                  'With --silo_data: a record whose text is not UTF-8 (or holds a NUL or lone '
                  'surrogate) stops the run (error), gets U+FFFD (replace) or is dropped (skip).')
flags.DEFINE_bool('baselines', False, 'After the run, train each silo\'s isolated baseline '
                  '(<workdir>/baselines/<id>: its own corpus, data order and inner steps) and '
                  'print the member-gain report (<workdir>/member_gain/).')
flags.DEFINE_string('link', None, 'BANDWIDTH,LATENCY, e.g. 100MB/s,50ms: each silo\'s own '
                    'simulated link to the bucket (sleeps of latency per operation plus bytes '
                    'over bandwidth; FEDPT_LINK in its process). Not the bucket\'s limits; the '
                    'aggregators get none. none: no link.')
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS


@cli.config_resolver
def _config():
  return simulation.resolved_config(FLAGS.config, _storage(), cli.config_overrides(),
                                    FLAGS.silo_data)


def _storage():
  return FLAGS.storage or os.path.join(FLAGS.workdir, 'bucket')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  with storage.party_link(None):  # The simulator (init, progress) sits by the bucket.
    cli.run_or_explain(simulation.simulate, FLAGS.config,
                       config_flags.get_config_filename(FLAGS['config']), _storage(),
                       FLAGS.workdir, typed=cli.config_overrides(), silo_data=FLAGS.silo_data,
                       tokenizer=FLAGS.tokenizer, text_field=FLAGS.text_field,
                       on_bad_text=FLAGS.on_bad_text, baselines=FLAGS.baselines,
                       link=FLAGS.link)


if __name__ == '__main__':
  cli.run(main)
