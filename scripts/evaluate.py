r"""Evaluates global rounds and private checkpoints on held-out sets; writes tables and plots.

  python scripts/evaluate.py --config=configs/demo.py --storage=gs://bucket/run1 --rounds=all \
      --eval_set=web=/data/web --workdir=web=/private/web-alone --out=/tmp/eval
  python scripts/evaluate.py --workdir=alone=/tmp/fedpt-demo --eval_set=held=/data/web \
      --out=/tmp/eval

--config is optional when the (first) --workdir recorded its config (<workdir>/config.json);
typed --config.* values may change how it is evaluated (eval batches, sequence length) but
not the model.

At least one --eval_set is needed. Scores every token of each set once (--sampled: only the
train.eval_batches sampled windows) and says how many. Writes <out>/eval.json, eval.csv
(loss, perplexity, bits per byte and tokens scored per model and set) and
loss_by_round.png / loss_vs_tokens.png (the global model on each silo's private split, as
the silo published it, their mean, the sets evaluated here and the --workdir baselines).
--rounds=all and ranges skip the rounds the aggregator garbage-collected and say which. A
--workdir named after an eval set is that silo's isolated baseline; eval.json's
`versus_baseline` compares the newest global round to it on that set only (one line per
silo). For the full member question see member_gain.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fedpt import cli  # noqa: E402
from fedpt import evaluation  # noqa: E402
from fedpt import loading  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'The config the model was trained with; '
                                'optional when the first --workdir recorded it.',
                                lock_config=True)
flags.DEFINE_string('out', None, 'Output folder.')
flags.DEFINE_string('storage', None, 'A federated run\'s storage root (its global rounds).')
flags.DEFINE_string('rounds', 'all', 'Global rounds: all, N, A:B or A,B,C.')
flags.DEFINE_multi_string('eval_set', [], 'NAME=DIR: a prepare_data.py output (its val split).')
flags.DEFINE_multi_string('workdir', [], 'NAME=DIR: a private checkpoint to evaluate too.')
flags.DEFINE_bool('sampled', False, 'Score only the train.eval_batches x data.global_batch '
                  'sampled windows (fast, what silos publish each round) instead of every token '
                  'of each set.')
flags.mark_flags_as_required(['out'])
FLAGS = flags.FLAGS


@cli.config_resolver
def _config():
  """The run's config (run.json) or the first --workdir's record, with the typed overrides."""
  workdirs = evaluation.parse_eval_sets(FLAGS.workdir)
  if not workdirs and not FLAGS.storage:  # evaluate() says there is nothing to evaluate.
    return FLAGS.config
  source = ({'storage': FLAGS.storage} if FLAGS.storage else
            {'workdir': next(iter(workdirs.values()))})
  return loading.source_config(FLAGS.config, cli.config_overrides(), **source)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  eval_sets = cli.run_or_explain(evaluation.parse_eval_sets, FLAGS.eval_set)
  workdirs = cli.run_or_explain(evaluation.parse_eval_sets, FLAGS.workdir)
  config = cli.run_or_explain(_config)
  result = cli.run_or_explain(
      evaluation.evaluate, config, FLAGS.out, eval_sets=eval_sets, storage=FLAGS.storage,
      rounds=FLAGS.rounds, workdirs=workdirs, whole=not FLAGS.sampled)
  for row in result['rows']:
    print(f"{row['model']:<20} {row['eval_set']:<14} loss {row['loss']:.4f}  "
          f"ppl {row['perplexity']:9.2f}  bpb {row['bits_per_byte']:.4f}  "
          f"on {row['tokens']:,} tokens")
  for row in result['versus_baseline']:
    print(f"{row['eval_set']}: global round {row['global_round']} {row['global_loss']:.4f} vs "
          f"baseline {row['baseline']} {row['baseline_loss']:.4f} (gain {row['gain']:+.4f}) "
          f"on {row['tokens']:,} tokens")
  if result['garbage_collected_rounds']:
    print(f"skipped global rounds {evaluation.spans(result['garbage_collected_rounds'])}: "
          'garbage-collected by the aggregator (federation.keep_last_rounds, '
          'keep_every_rounds)')
  print(f"losses on each set's {result['mode']}; wrote {FLAGS.out}/eval.json, eval.csv"
        + (' and plots' if result.get('plots') else ''))


if __name__ == '__main__':
  cli.run(main)
