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
from fedpt import loading
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


def _known_run(config, root, rounds, **fed_fields):
  """A run of `rounds` aggregated rounds of known deltas from silos a and b, with their losses."""
  fed = config.federation
  fed.update(silos=('a', 'b'), rounds=rounds, inner_steps=1, **fed_fields)
  run = aggregator_lib.init_run(config, root)
  store = storage_lib.RunStorage(root)
  for r in range(rounds):
    for silo, scale, loss in (('a', 0.01, 7.0 - r), ('b', 0.02, 6.5 - r)):
      payload, meta = bucket_helpers.fake_delta(store, run, r, silo, fed, scale)
      store.publish_delta(r, silo, payload, meta)
      store.publish_eval(r, silo, {'round': r, 'silo': silo, 'eval_loss': loss, 'step': r})
    aggregator_lib.run_aggregator(root, stop_after_rounds=1)
  return store


def test_garbage_collected_rounds_are_skipped_by_ranges_and_named_when_asked_for(
    tiny_config, corpus_dir, tmp_path, repo_root):
  tiny_config.train.eval_batches = 1
  root = str(tmp_path / 'bucket')
  store = _known_run(tiny_config, root, 4, keep_last_rounds=2, keep_every_rounds=0)
  assert store.committed_global_rounds() == [3, 4]  # 0-2 collected by the aggregator.
  assert evaluation.select_rounds(store, 'all') == ([3, 4], [0, 1, 2])
  assert evaluation.select_rounds(store, '1:3') == ([3], [1, 2])
  assert evaluation.select_rounds(store, '3,4') == ([3, 4], [])
  for text, expected in (('1', 'global round 1 was garbage-collected'),
                         ('0,3', 'global round 0 was garbage-collected'),
                         ('5', 'global round 5 is not committed'),
                         ('0:2', 'global round 0-2 was garbage-collected'),  # None left.
                         ('3:2', 'names no round')):
    with pytest.raises(evaluation.EvalError, match=expected) as e:
      evaluation.select_rounds(store, text)
    assert 'stored rounds: 3-4' in str(e.value) or 'names no round' in str(e.value)

  result = evaluation.evaluate(tiny_config, str(tmp_path / 'eval'),
                               eval_sets={'held': corpus_dir}, storage=root, rounds='all',
                               whole=False)
  assert [r['round'] for r in result['rows']] == [3, 4]
  assert result['garbage_collected_rounds'] == [0, 1, 2]

  script = [sys.executable, str(repo_root / 'scripts' / 'evaluate.py'), f'--storage={root}',
            f'--config={repo_root / "configs" / "tiny.py"}', f'--config.data.corpus={corpus_dir}',
            '--config.train.eval_batches=1', '--sampled', f'--out={tmp_path / "cli"}']
  done = subprocess.run(script + [f'--eval_set=held={corpus_dir}', '--rounds=all'],
                        capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr
  assert ('skipped global rounds 0-2: garbage-collected by the aggregator' in done.stdout)
  assert 'global_round_3' in done.stdout and 'global_round_4' in done.stdout
  for extra, expected in (
      ([f'--eval_set=held={corpus_dir}', '--rounds=2'],
       'error: --rounds=2: global round 2 was garbage-collected by the aggregator'),
      (['--rounds=all'], 'error: no held-out set to evaluate on. Fix: pass --eval_set=NAME=DIR '
       '(a prepare_data.py output')):
    done = subprocess.run(script + extra, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 2 and done.stderr.strip().startswith(expected), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
  assert not (tmp_path / 'cli' / 'eval.json').exists() or json.loads(
      (tmp_path / 'cli' / 'eval.json').read_text())['garbage_collected_rounds'] == [0, 1, 2]


def test_plots_name_the_run_and_what_each_line_is(tiny_config, corpus_dir, tmp_path):
  root = str(tmp_path / 'bucket')
  store = _known_run(tiny_config, root, 2)
  rows = [{'model': f'global_round_{r}', 'round': r, 'eval_set': 'a', 'loss': 6.0 - r}
          for r in range(3)]
  rows += [{'model': 'a', 'round': None, 'eval_set': 'a', 'loss': 5.5},  # a's baseline.
           {'model': 'other', 'round': None, 'eval_set': 'a', 'loss': 5.8}]
  figures = evaluation.loss_figures(store, rows, config_name='tiny')
  run_id = store.read_run()['run_id']
  assert sorted(figures) == ['loss_by_round', 'loss_vs_tokens']
  for name, fig in figures.items():
    ax = fig.axes[0]
    assert ax.get_title().startswith(f'run {run_id} (tiny): held-out loss'), ax.get_title()
    assert ax.get_ylabel() == 'held-out loss (nats/token)'
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["global model on a's split (published by a)",
                      "global model on b's split (published by b)",
                      "global model, mean over the silos' splits",
                      'global model on a (evaluate.py)',
                      'a alone (isolated baseline) on a', 'other (checkpoint) on a']
    assert [l.get_text() for l in ax.get_legend().get_texts()] == labels
    lines = ax.get_lines()
    styles = [(l.get_marker(), l.get_linestyle()) for l in lines[:4]]
    assert len(set(styles)) == 4, styles  # No curve drawn exactly like another.
    assert len({l.get_zorder() for l in lines[:4]}) == 4
    published_a = lines[0]
    assert list(published_a.get_ydata()) == [7.0, 6.0]  # Global rounds 0 and 1: 7 - r.
    assert list(lines[4].get_ydata()) == [5.5, 5.5]  # The baseline: a horizontal line.
  assert figures['loss_by_round'].axes[0].get_xlabel() == 'global round'
  figures['loss_by_round'].canvas.draw()  # Rounds are whole numbers: no 0.25 ticks.
  ticks = [t for t in figures['loss_by_round'].axes[0].get_xticks() if 0 <= t <= 1]
  assert ticks and all(float(t).is_integer() for t in ticks), ticks
  # No config file (a reader of run.json alone): no config name, rather than the defaults' 'base'.
  untitled = evaluation.loss_figures(store, rows)['loss_by_round'].axes[0].get_title()
  assert untitled == f'run {run_id}: held-out loss by global round', untitled
  assert loading.run_config(store.read_run()).name == ''
  by_tokens = figures['loss_vs_tokens'].axes[0]
  assert by_tokens.get_xlabel() == 'tokens seen (per silo, cumulative)'
  tokens_per_round = protocol.tokens_per_step(store.read_run())  # H=1 step per silo a round.
  assert list(by_tokens.get_lines()[0].get_xdata()) == [0, tokens_per_round]
  paths = evaluation.write_plots(store, str(tmp_path / 'plots'), rows, config_name='tiny')
  for plot in paths:
    image = matplotlib.image.imread(plot)
    assert image.shape[0] > 100 and image.std() > 0.01, plot
