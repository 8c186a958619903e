"""evaluate.py: loss, perplexity and bits per byte of rounds and baselines; tables and plots."""
import csv
import json
import math
import subprocess
import sys

import matplotlib.image
import pytest

import bucket_helpers
from fedpt import aggregator as aggregator_lib
from fedpt import data
from fedpt import evaluation
from fedpt import protocol
from fedpt import storage as storage_lib
from fedpt import trainer as trainer_lib
from fedpt import trees


def test_evaluation_matrix_of_a_known_run(tiny_config, corpus_dir, tmp_path, repo_root):
  fed = tiny_config.federation
  fed.update(silos=('a', 'b'), rounds=2, inner_steps=1)
  tiny_config.train.eval_batches = 2
  root = str(tmp_path / 'bucket')
  run = aggregator_lib.init_run(tiny_config, root)
  store = storage_lib.RunStorage(root)
  published = {}
  for r in range(2):  # Known deltas, and the held-out losses silos would publish.
    for silo, scale, loss in (('a', 0.01, 7.0 - r), ('b', 0.02, 6.5 - r)):
      payload, meta = bucket_helpers.fake_delta(store, run, r, silo, fed, scale,
                                                tokens=500 * (r + 1))
      store.publish_delta(r, silo, payload, meta)
      store.publish_eval(r, silo, {'round': r, 'silo': silo, 'eval_loss': loss, 'step': r})
      published.setdefault(r, {})[silo] = loss
    aggregator_lib.run_aggregator(root, stop_after_rounds=1)

  # An isolated baseline: a plain run of two steps.
  tiny_config.train.update(steps=2, checkpoint_every=2, eval_every=2, log_every=1)
  trainer_lib.train_and_evaluate(tiny_config, str(tmp_path / 'alone'))

  out = tmp_path / 'eval'
  text_file = tmp_path / 'notes.txt'  # A plain text file, tokenised whole.
  text_file.write_text('\n'.join(data.stdlib_documents('text')[:3]))
  result = evaluation.evaluate(tiny_config, str(out), eval_sets={'held': corpus_dir,
                                                                 'txt': str(text_file)},
                               storage=root, rounds='all', workdirs={'held': str(tmp_path /
                                                                             'alone')})
  rows = {(r['model'], r['eval_set']): r for r in result['rows']}
  assert sorted(rows) == sorted([(m, s) for m in ('global_round_0', 'global_round_1',
                                                  'global_round_2', 'held')
                                 for s in ('held', 'txt')])
  # Each number is the trainer's own held-out loss of that exact model.
  trainer = trainer_lib.Trainer(protocol.federated_config(tiny_config))
  val = data.TokenDataset(corpus_dir, 'val', trainer.tokenizer_sha256)
  for r in range(3):
    expected, tokens = trainer.score(
        trees.unflatten_params(bucket_helpers.global_params(store, r)), val, whole=True)
    row = rows[(f'global_round_{r}', 'held')]
    assert row['loss'] == pytest.approx(expected, rel=1e-6)
    assert row['tokens'] == tokens == val.scored_tokens(tiny_config.data.seq_len)
    assert row['perplexity'] == pytest.approx(math.exp(expected), rel=1e-6)
    assert 0.5 < row['loss'] / row['bits_per_byte'] / math.log(2) < 10  # tokens ~ 1-10 bytes.
  assert rows[('global_round_2', 'held')]['loss'] != rows[('global_round_0', 'held')]['loss']
  whole = data.TokenDataset(str(out / 'eval_sets' / 'txt'), 'train', trainer.tokenizer_sha256)
  assert whole.num_tokens > 1000
  assert rows[('global_round_1', 'txt')]['loss'] == pytest.approx(trainer.evaluate(
      trees.unflatten_params(bucket_helpers.global_params(store, 1)), whole, whole=True),
      rel=1e-6)
  # Bits per byte: the summed loss over the UTF-8 bytes of the predicted text, decoded here.
  tokenizer = data.load_tokenizer(trainer.tokenizer_path)
  length = tiny_config.data.seq_len + 1
  targets = [whole.tokens[start + 1:start + length].tolist()
             for start in range(0, whole.num_tokens - 1, length)]
  nbytes = sum(len(tokenizer.decode(t).encode()) for t in targets)
  ntokens = sum(len(t) for t in targets)
  row = rows[('global_round_1', 'txt')]
  assert row['tokens'] == ntokens
  assert row['bits_per_byte'] == pytest.approx(
      row['loss'] * ntokens / (math.log(2) * nbytes), rel=0.02)
  assert result['published_by_round'] == {0: published[0], 1: published[1], 2: {}}
  assert [v['eval_set'] for v in result['versus_baseline']] == ['held']  # Not 'txt'.
  versus = result['versus_baseline'][0]
  assert versus['global_round'] == 2 and versus['baseline'] == 'held'
  assert versus['tokens'] == rows[('held', 'held')]['tokens']
  assert versus['gain'] == pytest.approx(versus['baseline_loss'] - versus['global_loss'])

  on_disk = json.loads((out / 'eval.json').read_text())
  assert len(on_disk['rows']) == 8
  with open(out / 'eval.csv', encoding='utf-8') as f:
    table = list(csv.DictReader(f))
  assert [float(r['loss']) for r in table] == pytest.approx([r['loss'] for r in result['rows']])
  for plot in result['plots']:
    image = matplotlib.image.imread(plot)
    assert image.shape[0] > 100 and image.std() > 0.01, plot

  # Bad input: one clear line, exit status 2.
  script = [sys.executable, str(repo_root / 'scripts' / 'evaluate.py'),
            f'--config={repo_root / "configs" / "tiny.py"}',
            f'--config.data.corpus={corpus_dir}', f'--out={tmp_path / "bad"}']
  for extra, expected in (([f'--storage={root}', '--rounds=9', f'--eval_set=held={corpus_dir}'],
                           'global round 9 is not committed'),
                          (['--eval_set=oops'], 'is not NAME=SOURCE')):
    done = subprocess.run(script + extra, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 2 and expected in done.stderr, done.stderr
    assert 'Traceback' not in done.stderr
