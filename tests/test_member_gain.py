"""The member question: whole-split evaluation, one gain per silo, simulate --baselines."""
import csv
import functools
import json
import os
import subprocess
import sys

import jax
import matplotlib.image
import numpy as np
import pytest

import conftest
from fedpt import data
from fedpt import evaluation
from fedpt import inner
from fedpt import loading
from fedpt import member_gain
from fedpt import protocol
from fedpt import simulation
from fedpt import storage as storage_lib
from fedpt import trainer as trainer_lib


def test_whole_split_scores_every_token_once(tiny_config, tmp_path):
  # A split whose size is no multiple of batch x window: 2 full batches of 16 would be 2,080.
  out = tmp_path / 'small'
  docs = [d[:3000] for d in data.stdlib_documents('text')[:12]]
  data.prepare_data(docs, data.default_tokenizer_path(), str(out),
                    val_fraction=0.5)
  tiny_config.data.corpus = str(out)
  trainer = trainer_lib.Trainer(tiny_config)
  val = trainer.val_data
  length = tiny_config.data.seq_len + 1
  full, tail = divmod(val.num_tokens, length)
  assert full % tiny_config.data.global_batch and tail >= 2, (full, tail)  # Pad rows and a tail.
  params = trainer.init_state()['params']
  loss, tokens = trainer.score(params, val, whole=True)
  assert tokens == val.num_tokens - full - 1 == val.scored_tokens(tiny_config.data.seq_len)
  # Reference: the plain training loss of all full windows in one block, and of the tail alone.
  host = jax.device_get(params)
  loss_fn = jax.jit(functools.partial(inner.loss_and_metrics, graphdef=trainer.graphdef,
                                      z_loss=0.0))
  nll = lambda block: float(loss_fn(host, np.asarray(block, np.int32))[1]['nll'])  # noqa: E731
  total = (nll(val.tokens[:full * length].reshape(full, length)) * full * (length - 1)
           + nll(val.tokens[full * length:][None]) * (tail - 1))
  assert loss == pytest.approx(total / tokens, rel=1e-5)
  # Weights: every scored position once, none of the padding.
  weights = sum(w.sum() for _, w in val.whole_batches(global_batch=16, seq_len=64))
  assert weights == tokens
  # Two processes each read their own rows; together they are the one-process batches.
  halves = [list(val.whole_batches(global_batch=16, seq_len=64, process_index=i, process_count=2))
            for i in range(2)]
  whole = list(val.whole_batches(global_batch=16, seq_len=64))
  for (a, wa), (b, wb), (t, wt) in zip(*halves, whole):
    np.testing.assert_array_equal(np.concatenate([a, b]), t)
    np.testing.assert_array_equal(np.concatenate([wa, wb]), wt)
  # The sampled mode says how many tokens its sample holds.
  assert trainer.score(params, val)[1] == tiny_config.train.eval_batches * 16 * 64


def test_versus_baseline_is_one_line_per_silo():
  rows = [{'model': m, 'round': r, 'eval_set': s, 'loss': loss, 'tokens': 100}
          for m, r, loss in (('global_round_1', 1, 5.0), ('global_round_2', 2, 4.0),
                             ('web', None, 4.5), ('code', None, 3.5))
          for s in ('web', 'code', 'wiki')]
  lines = evaluation.versus_baseline(rows)
  assert [(v['baseline'], v['eval_set'], v['global_round']) for v in lines] == [
      ('web', 'web', 2), ('code', 'code', 2)]
  assert [v['gain'] for v in lines] == [0.5, -0.5]


# -- one tiny federation with its baselines, shared by the tests below ----------------------

SILOS, ROUNDS, H = ('web', 'text'), 2, 2


@pytest.fixture(scope='module')
def sim(corpus_dir, tmp_path_factory, repo_root):
  """`simulate --baselines` of 2 silos x 2 rounds x H=2 on the small corpus (real processes)."""
  config = conftest.load_config('tiny', corpus_dir)
  config.federation.update(silos=SILOS, rounds=ROUNDS, inner_steps=H, poll_s=0.2)
  config.train.update(log_every=1, eval_batches=2)
  work = tmp_path_factory.mktemp('sim')
  flags_before = os.environ.get('XLA_FLAGS')
  os.environ['XLA_FLAGS'] = conftest.CHILD_XLA_FLAGS  # Children need one CPU device each.
  try:
    lines = []
    summary = simulation.simulate(config, str(repo_root / 'configs' / 'tiny.py'),
                                  str(work / 'bucket'), str(work), log=lines.append,
                                  baselines=True)
  finally:
    os.environ['XLA_FLAGS'] = flags_before or ''
  return {'config': config, 'work': work, 'summary': summary, 'lines': lines,
          'storage': str(work / 'bucket')}


@pytest.mark.slow
def test_baselines_match_their_silos_steps_and_batches(sim, corpus_dir):
  store = storage_lib.RunStorage(sim['storage'])
  run = store.read_run()
  first = {}
  for silo in SILOS:
    base = sim['summary']['baselines'][silo]
    assert base['steps'] == ROUNDS * H == member_gain.checkpoint_step(base['workdir'])
    assert member_gain.silo_steps(store, ROUNDS)[silo] == ROUNDS * H
    # The baseline process saw the silo's first batches: from the same initial model, the
    # same two batches give the same losses as the silo's round 0 (the mean it published).
    with open(os.path.join(base['workdir'], 'metrics.jsonl'), encoding='utf-8') as f:
      losses = {r['step']: r['train_loss'] for r in map(json.loads, f) if 'train_loss' in r}
    assert sorted(losses) == list(range(1, ROUNDS * H + 1))
    assert np.mean([losses[1], losses[2]]) == pytest.approx(
        next(e['train_loss'] for e in store.read_manifest(0)['included'] if e['silo'] == silo),
        rel=1e-5)
    # And the batches themselves, as each config and data seed make them.
    seed = protocol.silo_data_seed(run['seed'], silo)
    silo_trainer = trainer_lib.Trainer(member_gain.silo_config(sim['work'], silo),
                                       data_seed=seed)
    base_trainer = trainer_lib.Trainer(loading.source_config(workdir=base['workdir']),
                                       data_seed=seed)
    for step in range(2):
      np.testing.assert_array_equal(np.asarray(silo_trainer.batch(step)),
                                    np.asarray(base_trainer.batch(step)))
    first[silo] = np.asarray(base_trainer.batch(0))
  assert not np.array_equal(*first.values())  # Each silo has its own order.


@pytest.mark.slow
def test_member_gain_table_is_the_trainers_own_scores(sim, corpus_dir):
  result = sim['summary']['member_gain']
  rows = {r['silo']: r for r in result['rows']}
  assert sorted(rows) == sorted(SILOS) and result['global_round'] == ROUNDS
  trainer = trainer_lib.Trainer(loading.run_config(storage_lib.RunStorage(
      sim['storage']).read_run(), sim['config'], {'data.corpus', 'train.eval_batches'}))
  val = data.TokenDataset(corpus_dir, 'val', trainer.tokenizer_sha256)
  global_loss, tokens = trainer.score(loading.load(trainer.config, loading.Source(
      storage=sim['storage'])).params, val, whole=True)
  assert tokens == val.scored_tokens(trainer.config.data.seq_len)
  for silo in SILOS:
    row = rows[silo]
    base = loading.load(trainer.config, loading.Source(
        workdir=sim['summary']['baselines'][silo]['workdir'])).params
    assert row['tokens'] == tokens
    assert row['global_loss'] == pytest.approx(global_loss, rel=1e-5)
    assert row['isolated_loss'] == pytest.approx(trainer.score(base, val, whole=True)[0],
                                                 rel=1e-5)
    assert row['personal_loss'] is None and row['best'] == 'global'
    assert row['gain'] == pytest.approx(row['isolated_loss'] - row['global_loss'])
    assert (row['silo_steps'], row['personal_steps'], row['baseline_steps']) == (4, 0, 4)
    assert row['compute_warning'] == ''
  # One verdict per silo, printed by simulate and written with the table.
  verdicts = [line for line in sim['lines'] if line.startswith(tuple(f'{s}: ' for s in SILOS))]
  assert len(verdicts) == len(SILOS) == len(result['verdicts'])
  for line in verdicts:
    assert 'joining' in line and f'on {tokens:,} held-out tokens' in line
  out = sim['work'] / 'member_gain'
  with open(out / 'member_gain.csv', encoding='utf-8') as f:
    table = list(csv.DictReader(f))
  assert [float(r['isolated_loss']) for r in table] == pytest.approx(
      [rows[s]['isolated_loss'] for s in SILOS])
  markdown = (out / 'member_gain.md').read_text()
  assert markdown.count('\n| ') == 2 + len(SILOS) and f'{tokens:,}' in markdown  # Head, rule.
  image = matplotlib.image.imread(out / 'member_gain.png')
  assert image.shape[0] > 100 and image.std() > 0.01


@pytest.mark.slow
def test_member_gain_script_for_one_member(sim, corpus_dir, repo_root, tmp_path):
  """A member with no simulate workdir: its own set, baseline and (here) a 'personal' model."""
  base = sim['summary']['baselines']['web']['workdir']
  script = [sys.executable, str(repo_root / 'scripts' / 'member_gain.py'),
            f'--storage={sim["storage"]}', f'--out={tmp_path}']
  done = subprocess.run(script + ['--silo=web', f'--eval_set={corpus_dir}', f'--baseline={base}',
                                  f'--personal={base}', '--sampled', '--round=1'],
                        capture_output=True, text=True, timeout=300, check=False,
                        env=conftest.child_env())
  assert done.returncode == 0, done.stderr
  result = json.loads((tmp_path / 'member_gain.json').read_text())
  (row,) = result['rows']
  d = sim['config'].data
  assert row['tokens'] == 2 * d.global_batch * d.seq_len and 'sample of 32 windows' in result['mode']
  assert row['global_round'] == 1 and row['silo_steps'] == 2  # Round 0's inner steps only.
  assert row['personal_loss'] == pytest.approx(row['isolated_loss'])
  assert row['personal_steps'] == 4 and 'unequal compute' in row['compute_warning']
  assert 'web: joining' in done.stdout and 'warning: unequal compute' in done.stdout
  bad = subprocess.run(script + ['--silo=web'], capture_output=True, text=True, timeout=120,
                       check=False)
  assert bad.returncode == 2 and 'name the member' in bad.stderr, bad.stderr
  assert 'Traceback' not in bad.stderr
