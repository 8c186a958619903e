"""Contribution values: the math on constructed rounds, then one small federation's records."""
import importlib.util
import itertools
import json
import math
import shutil
import subprocess
import sys
import threading

import jax.numpy as jnp
import matplotlib.image
import ml_collections
import numpy as np
import pytest

from conftest import child_env, load_config
from fedpt import aggregator as aggregator_lib
from fedpt import contribution
from fedpt import evaluation
from fedpt import ledger
from fedpt import outer
from fedpt import protocol
from fedpt import silo as silo_lib
from fedpt import storage as storage_lib

# -- the math, on a constructed round -------------------------------------------------------


def _optimizer(name, **kw):
  return outer.make_outer_optimizer(ml_collections.ConfigDict(dict(optimizer=name, **kw)))


def _round(optimizer, state, theta, deltas, coefficients):
  """theta_{r+1} of one leaf 'w': the aggregator's outer step of the mean."""
  return {'w': np.asarray(contribution.outer_update(optimizer, {'w': theta}, {'w': state},
                                                    deltas, coefficients)['w'])}


def _quadratic(n=6, seed=0):
  """L(x) = 1/2 (x - x*)^T A (x - x*) at x = 0; its gradient g; helpful, orthogonal and
  harmful deltas (a delta is global - local: +eps g is a local step downhill)."""
  rng = np.random.default_rng(seed)
  a = np.diag(rng.uniform(1.0, 2.0, n)).astype(np.float32)
  star = rng.normal(size=n).astype(np.float32)
  theta = np.zeros(n, np.float32)
  loss = lambda x: float(0.5 * (x - star) @ a @ (x - star))  # noqa: E731
  g = a @ (theta - star)
  orth = np.zeros(n, np.float32)
  orth[:2] = g[1], -g[0]
  deltas = {'help': {'w': 0.01 * g}, 'orth': {'w': 0.01 * orth}, 'harm': {'w': -0.005 * g}}
  return a, theta, loss, g, deltas


def test_signs_and_the_first_order_value_is_exact_up_to_the_curvature_term():
  a, theta, loss, g, deltas = _quadratic()
  coefficients = {'help': 0.5, 'orth': 0.3, 'harm': 0.2}
  optimizer = _optimizer('fedavg')
  state = {'w': optimizer.init(jnp.zeros(6))}
  nxt = _round(optimizer, state['w'], theta, deltas, coefficients)
  out = contribution.first_order(optimizer, {'w': g}, {'w': theta}, nxt, state, deltas,
                                 coefficients)
  values = out['values']
  assert values['help'] > 1e-4 and values['harm'] < -1e-5 and abs(values['orth']) < 1e-9
  # fedavg: theta' = theta - sum c_k Delta_k, so value_k = c_k g . Delta_k exactly; no carry.
  for k, c in coefficients.items():
    assert math.isclose(values[k], c * float(g @ deltas[k]['w']), rel_tol=1e-5, abs_tol=1e-9)
  assert abs(out['carry']) < 1e-7
  u = nxt['w'] - theta
  exact = loss(theta) - loss(nxt['w'])
  assert math.isclose(out['total'], -float(g @ u), rel_tol=1e-5)
  # L(x + u) = L(x) + g.u + 1/2 u^T A u exactly: first order is off by the curvature term only.
  assert math.isclose(exact, out['total'] - 0.5 * float(u @ a @ u), rel_tol=1e-4)
  # A linear loss has no such term: the first-order total is the change itself.
  b = np.arange(1.0, 7.0, dtype=np.float32)
  linear = contribution.first_order(optimizer, {'w': b}, {'w': theta}, nxt, state, deltas,
                                    coefficients)
  assert math.isclose(linear['total'], float(b @ theta - b @ nxt['w']), rel_tol=1e-5)


def test_outer_momentum_is_the_carry_and_the_parts_sum_to_the_whole():
  _, theta, _, g, deltas = _quadratic(seed=1)
  coefficients = {'help': 0.6, 'orth': 0.1, 'harm': 0.3}
  optimizer = _optimizer('diloco', lr=0.7, momentum=0.9)
  state = optimizer.init(jnp.zeros(6))
  _, state = optimizer.update(jnp.full(6, 0.02, jnp.float32), state, jnp.zeros(6))  # Momentum.
  nxt = _round(optimizer, state, theta, deltas, coefficients)
  out = contribution.first_order(optimizer, {'w': g}, {'w': theta}, nxt, {'w': state}, deltas,
                                 coefficients)
  # Nesterov is affine in the mean: u_k = -lr (1 + mu) c_k Delta_k (outer.eager_coefficient).
  coef = outer.eager_coefficient(ml_collections.ConfigDict(
      dict(optimizer='diloco', lr=0.7, momentum=0.9)), 1)
  for k, c in coefficients.items():
    assert math.isclose(out['values'][k], coef * c * float(g @ deltas[k]['w']), rel_tol=1e-4,
                        abs_tol=1e-9)
  carried = _round(optimizer, state, theta, deltas, {})['w'] - theta  # No delta at all.
  assert math.isclose(out['carry'], -float(g @ carried), rel_tol=1e-4)
  assert abs(out['carry']) > 1e-3
  assert math.isclose(sum(out['values'].values()) + out['carry'], out['total'], rel_tol=1e-6)
  # Secure aggregation: no per-silo coefficients, the total alone (carry = total).
  alone = contribution.first_order(optimizer, {'w': g}, {'w': theta}, nxt, {'w': state}, {}, {})
  assert alone['values'] == {} and math.isclose(alone['total'], out['total'], rel_tol=1e-6)


def test_loo_and_shapley_on_the_constructed_round():
  a, theta, loss, g, deltas = _quadratic(seed=2)
  entries = [{'silo': 'help', 'tokens': 300, 'measured_norm': 1.0},
             {'silo': 'orth', 'tokens': 100, 'measured_norm': 1.0},
             {'silo': 'harm', 'tokens': 100, 'measured_norm': 1.0}]
  weight = {'help': 1.0, 'orth': 1.0, 'harm': 1.0}
  optimizer = _optimizer('fedavg')
  state = {'w': optimizer.init(jnp.zeros(6))}
  game = contribution.subset_game(loss(theta), lambda flat: loss(np.asarray(flat['w'])),
                                  optimizer, {'w': theta}, state, deltas, entries, weight, 0.0)
  # By hand: theta_S = theta - sum_{k in S} (tokens_k / tokens_S) Delta_k.
  tokens = {e['silo']: e['tokens'] for e in entries}
  for subset in contribution.subsets(sorted(deltas)):
    total = sum(tokens[k] for k in subset)
    moved = theta - sum((tokens[k] / total * deltas[k]['w'] for k in subset), np.zeros(6))
    assert math.isclose(game[subset], loss(theta) - loss(moved) if subset else 0.0,
                        rel_tol=1e-4, abs_tol=1e-7), subset
  everyone = frozenset(deltas)
  loo = contribution.leave_one_out(game, sorted(deltas))
  assert loo['harm'] < 0 < loo['help']
  for k in deltas:
    assert loo[k] == game[everyone] - game[everyone - {k}]
  shapley = contribution.shapley_values(game, sorted(deltas))
  assert math.isclose(sum(shapley.values()), game[everyone], rel_tol=1e-9)  # Efficiency.
  assert shapley['help'] > 0 > shapley['harm']
  # The permutation definition: the mean marginal value over all 3! orderings.
  for k in deltas:
    marginals = []
    for order in itertools.permutations(sorted(deltas)):
      before = frozenset(order[:order.index(k)])
      marginals.append(game[before | {k}] - game[before])
    assert math.isclose(shapley[k], float(np.mean(marginals)), rel_tol=1e-9, abs_tol=1e-12)


def test_subset_weights_renormalise_as_the_aggregator_does():
  entries = [{'silo': 'a', 'tokens': 100, 'measured_norm': 1.0},
             {'silo': 'b', 'tokens': 300, 'measured_norm': 10.0},
             {'silo': 'z', 'tokens': 100, 'measured_norm': 1.0}]
  weight = {'a': 1.0, 'b': 1.0, 'z': 0.0}
  assert contribution.subset_coefficients(entries, weight, {'a', 'b', 'z'}) == {
      'a': 0.25, 'b': 0.75}
  assert contribution.subset_coefficients(entries, weight, {'b'}) == {'b': 1.0}
  assert contribution.subset_coefficients(entries, weight, {'z'}) == {}  # Carries over.
  clipped = contribution.subset_coefficients(entries, weight, {'a', 'b'}, clip_multiple=1.0)
  factors = outer.clip_factors([1.0, 10.0], [0.25, 0.75], 1.0)
  assert clipped == pytest.approx({'a': 0.25 * factors[0], 'b': 0.75 * factors[1]})


def test_what_a_silo_cannot_compute_is_refused():
  run = {'silos': [{'id': f's{i}'} for i in range(9)], 'federation': {}}
  problem, fix = contribution.unsupported(run, 'shapley')
  assert 'lists 9 silos (at most 8)' in problem and "'first_order'" in fix
  assert contribution.unsupported(run, 'first_order') is None
  problem, fix = contribution.unsupported(
      {'silos': [{'id': 'a'}], 'federation': {'fragments': 2}}, 'loo')
  assert 'fragments > 1' in problem and "'none'" in fix
  # simulate.py refuses it before any process starts, in the same words.
  from fedpt import config as config_lib  # pylint: disable=g-import-not-at-top
  from fedpt import simulation  # pylint: disable=g-import-not-at-top
  config = config_lib.base_config()
  config.federation.silos = tuple(f's{i}' for i in range(9))
  config.contribution.mode = 'shapley'
  with pytest.raises(config_lib.ConfigError, match=r'lists 9 silos \(at most 8\)'):
    simulation._check_contribution(config)  # pylint: disable=protected-access
  config.contribution.mode = 'first_order'
  simulation._check_contribution(config)  # pylint: disable=protected-access


def test_a_record_is_checked_before_the_ledger_uses_it():
  run = {'run_id': 'r1', 'silos': [{'id': 'a'}, {'id': 'b'}], 'federation': {}}
  good = protocol.contribution_record(
      run, 3, 'a', method='shapley', eval_windows=64, eval_tokens=8192, base_loss=5.0,
      next_loss=4.5, total=0.6, carry=0.1, first_order={'a': 0.3, 'b': 0.2},
      loo={'a': 0.3, 'b': 0.1}, shapley={'a': 0.3, 'b': 0.2}, seconds=1.0)
  assert good['measured_change'] == 0.5
  assert protocol.check_contribution_record(run, 3, 'a', good) is None
  bad = {
      'a replayed round': ({'round': 2}, 'a replayed or moved record'),
      'a method': ({'method': 'exact'}, "method 'exact' is not one of"),
      'an unlisted contributor': ({'shapley': {'z': 0.1}}, 'shapley is not {listed silo'),
      'a non-finite value': ({'first_order': {'a': float('nan')}}, 'first_order is not'),
      'an inconsistent change': ({'measured_change': 0.7}, 'measured_change is not'),
      'nulls without a reason': ({'first_order': None}, 'no per-silo values and no reason'),
      'a missing field': ({'carry': KeyError}, "'carry'"),
  }
  for what, (change, reason) in bad.items():
    record = {k: v for k, v in {**good, **change}.items() if v is not KeyError}
    found = protocol.check_contribution_record(run, 3, 'a', record)
    assert found is not None and reason in found, (what, found)
  assert protocol.check_contribution_record(run, 3, 'a', [1]) == 'not a JSON object'
  masked = {**good, 'first_order': None, 'loo': None, 'shapley': None, 'carry': None,
            'reason': 'secure aggregation'}
  assert protocol.check_contribution_record(run, 3, 'a', masked) is None


# -- one small federation --------------------------------------------------------------------

SILOS = ('a', 'b', 'c')
ROUNDS = 2


@pytest.fixture(scope='module')
def contrib_run(corpus_dir, tmp_path_factory):
  """3 silos x 2 rounds of H=2 with Nesterov outer steps, every silo contribution.mode=
  'shapley'; silos as threads."""
  config = load_config('tiny', corpus_dir)
  config.train.async_checkpoints = False  # Threads of one process checkpoint synchronously.
  config.train.eval_batches = 1
  config.federation.update(rounds=ROUNDS, inner_steps=2, silos=SILOS, poll_s=0.05,
                           wait_timeout_s=120.0, compression='none')
  config.outer.update(optimizer='diloco', lr=0.7, momentum=0.9)
  config.contribution.mode = 'shapley'
  tmp = tmp_path_factory.mktemp('contribution')
  root = str(tmp / 'bucket')
  aggregator_lib.init_run(config, root)
  threads = [threading.Thread(target=silo_lib.run_silo, daemon=True, args=(
      config.copy_and_resolve_references(), s, root, str(tmp / s))) for s in SILOS]
  for t in threads:
    t.start()
  aggregator_lib.run_aggregator(root)
  for t in threads:
    t.join(timeout=300)
  return config, root, tmp


@pytest.mark.slow  # The module's one federation: ~70 CPU-s, shared.
def test_each_silo_publishes_a_row_that_adds_up(contrib_run):
  config, root, _ = contrib_run
  store = storage_lib.RunStorage(root)
  run = store.read_run()
  windows = config.train.eval_batches * config.data.global_batch
  for r in range(ROUNDS):
    records = store.contribution_records(r)
    assert sorted(records) == list(SILOS)
    evals, next_evals = ledger.eval_losses(store, run, r), ledger.eval_losses(store, run, r + 1)
    for j, record in records.items():
      assert protocol.check_contribution_record(run, r, j, record) is None
      assert record['method'] == 'shapley' and record['eval_windows'] == windows
      assert record['reason'] is None
      # The same windows the silo's published held-out losses of rounds r and r+1 use.
      assert math.isclose(record['base_loss'], evals[j], abs_tol=1e-4)
      assert record['next_loss'] == next_evals[j]
      for method in ('first_order', 'loo', 'shapley'):
        assert sorted(record[method]) == list(SILOS)
      first = record['first_order']
      assert math.isclose(sum(first.values()) + record['carry'], record['total'],
                          rel_tol=1e-4, abs_tol=1e-6)
      if r == 0:  # No outer momentum before the first step: nothing to carry.
        assert abs(record['carry']) < 1e-6 * max(1.0, abs(record['total']))
      else:
        assert record['carry'] != 0.0
      # Efficiency: the Shapley values share out the update's measured effect (uncompressed
      # deltas and downlink: the silo's recomputed update is global round r+1 itself).
      assert math.isclose(sum(record['shapley'].values()), record['measured_change'],
                          abs_tol=2e-4), (r, j)
      assert abs(record['total'] - record['measured_change']) < 0.5 * abs(
          record['measured_change']) + 1e-3


@pytest.mark.slow  # The module's one federation: ~70 CPU-s, shared.
def test_status_shows_the_matrix_and_skips_a_malformed_record(contrib_run):
  _, root, tmp = contrib_run
  store = storage_lib.RunStorage(root)
  records = {r: store.contribution_records(r) for r in range(ROUNDS)}
  status = json.loads(ledger.status(root, 'json'))
  for row in status['rounds']:
    c = row['contribution']
    assert c['skipped'] == []
    assert c['value'] == {j: rec['shapley'] for j, rec in records[row['round']].items()}
    assert c['first_order'] == {j: rec['first_order'] for j, rec in records[row['round']].items()}
  for k in SILOS:
    given = sum(records[r][j]['shapley'][k] for r in range(ROUNDS) for j in SILOS if j != k)
    own = sum(records[r][k]['shapley'][k] for r in range(ROUNDS))
    received = sum(records[r][k]['shapley'][x] for r in range(ROUNDS) for x in SILOS if x != k)
    totals = status['silo_totals'][k]['contribution']
    assert totals['given_to_others'] == pytest.approx(given)
    assert totals['to_self'] == pytest.approx(own)
    assert totals['received'] == pytest.approx(received)
  text = ledger.status(root)
  assert 'value' in text.split('per-silo totals')[1].splitlines()[1]
  table = text.split('contribution: nats')[1]
  line = next(l for l in table.splitlines() if l.split()[:2] == ['1', 'b'])
  assert f"{records[1]['b']['shapley']['a']:+.4f}" in line and line.endswith('shapley')
  # A copy of the bucket with one record forged and one a silo would publish under secure
  # aggregation (per-silo values null, with the reason).
  copy = str(tmp / 'copy')
  shutil.copytree(root, copy)
  copied = storage_lib.RunStorage(copy)
  forged = {**records[1]['b'], 'first_order': {'a': 'lots'}}
  copied.publish_contribution(1, 'b', forged)
  masked = {**records[1]['c'], 'first_order': None, 'loo': None, 'shapley': None, 'carry': None,
            'reason': 'secure aggregation: the deltas are masked'}
  copied.publish_contribution(1, 'c', masked)
  # A record valuing a silo the round did not include is skipped too.
  narrowed = ledger.contributions(store, store.read_run(), 0, ['a', 'b'])
  assert sorted(narrowed['value']) == [] and {e['reason'] for e in narrowed['skipped']} == {
      "it values ['c'], not among the round's included silos ['a', 'b']"}
  (copied.round_dir(0) / 'contribution' / 'silo_a.json').write_text('{not json')
  assert json.loads(ledger.status(copy, 'json'))['rounds'][0]['contribution']['skipped'] == [
      {'silo': 'a', 'reason': 'not readable JSON'}]
  row = json.loads(ledger.status(copy, 'json'))['rounds'][1]['contribution']
  assert row['skipped'] == [{'silo': 'b', 'reason': (
      'first_order is not {listed silo: finite number} or null')}]
  assert sorted(row['value']) == ['a'] and row['reason_by_silo'] == {
      'c': 'secure aggregation: the deltas are masked'}
  assert row['total_by_silo']['c'] == records[1]['c']['total']
  text = ledger.status(copy)
  assert 'b          skipped: first_order is not' in text
  assert '(secure aggregation: the deltas are masked)' in text


@pytest.mark.slow  # The module's one federation: ~70 CPU-s, shared.
def test_evaluate_plots_the_contribution(contrib_run):
  _, root, tmp = contrib_run
  paths = evaluation.write_plots(storage_lib.RunStorage(root), str(tmp / 'plots'))
  assert [p.rsplit('/', 1)[1] for p in paths] == [
      'loss_by_round.png', 'loss_vs_tokens.png', 'contribution.png']
  image = matplotlib.image.imread(paths[-1])
  assert image.shape[0] > 100 and image.std() > 0.01


def test_a_bad_mode_is_one_line(repo_root, corpus_dir, tmp_path):
  proc = subprocess.run(
      [sys.executable, 'scripts/train.py', '--config=configs/tiny.py', f'--workdir={tmp_path}',
       f'--config.data.corpus={corpus_dir}', '--config.contribution.mode=exact'],
      cwd=repo_root, env=child_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and 'contribution.mode' in lines[0] and "'shapley'" in lines[0], lines


@pytest.mark.slow  # The module's one federation: ~70 CPU-s, shared.
def test_the_bench_summary_reads_the_records(contrib_run, repo_root):
  _, root, _ = contrib_run
  spec = importlib.util.spec_from_file_location('bench_contribution',
                                                repo_root / 'bench' / 'contribution.py')
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  store = storage_lib.RunStorage(root)
  summary = bench.summarize(store)
  assert len(summary['records']) == ROUNDS * len(SILOS)
  delta_bytes = store.delta_meta(0, 'a')['bytes']
  for r in summary['records']:
    assert r['delta_bytes_read'] == len(SILOS) * delta_bytes
    assert r['shapley_sum'] == pytest.approx(r['measured'], abs=2e-4)
    assert r['seconds'] > 0
  assert 0 <= summary['median_first_order_relative_error'] < 0.5
  assert 'median |first order - measured|' in bench.render(summary)


def test_shapley_of_nine_silos_is_refused_at_the_silos_start(repo_root, tiny_config, tmp_path):
  tiny_config.federation.silos = tuple(f's{i}' for i in range(9))
  root = str(tmp_path / 'bucket')
  aggregator_lib.init_run(tiny_config, root)
  proc = subprocess.run(
      [sys.executable, 'scripts/train.py', '--config=configs/tiny.py', '--silo=s0',
       f'--storage={root}', f'--workdir={tmp_path / "s0"}',
       f'--config.data.corpus={tiny_config.data.corpus}', '--config.contribution.mode=shapley'],
      cwd=repo_root, env=child_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
  assert 'contribution.mode' in lines[0] and 'at most 8' in lines[0], lines
  assert "'first_order'" in lines[0]
