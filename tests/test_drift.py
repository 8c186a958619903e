"""Drift correction (SCAFFOLD, FedProx) and the outer warm-up schedules."""
import threading

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import bucket_helpers
from fedpt import aggregator as aggregator_lib
from fedpt import config as config_lib
from fedpt import drift
from fedpt import faults
from fedpt import outer
from fedpt import protocol
from fedpt import silo as silo_lib
from fedpt import storage as storage_lib
from fedpt import trainer as trainer_lib
from conftest import load_config


# -- a quadratic toy problem on which FedAvg drifts ----------------------------------------

A = [np.diag([1.0, 10.0]), np.array([[8.0, 1.0], [1.0, 0.5]])]
OPTIMA = [np.array([1.0, -1.0]), np.array([-2.0, 3.0])]
W_STAR = np.linalg.solve(A[0] + A[1], A[0] @ OPTIMA[0] + A[1] @ OPTIMA[1])
ETA, K, ROUNDS = 0.03, 10, 100


def _fedpt_rounds(kind, mu=0.0):
  """Local SGD on f_i(w) = 1/2 (w-a_i)^T A_i (w-a_i), 2 silos, corrected by fedpt's drift.py."""
  x = {'w': jnp.zeros(2, jnp.float32)}
  server = {'w': jnp.zeros(2, jnp.float32)}
  controls = [{'w': jnp.zeros(2, jnp.float32)} for _ in A]
  for _ in range(ROUNDS):
    deltas, control_deltas = [], []
    for i, (a_mat, a_vec) in enumerate(zip(A, OPTIMA)):
      y = x
      state = (drift.scaffold_state(server, controls[i]) if kind == 'scaffold'
               else drift.fedprox_state(x) if kind == 'fedprox' else None)
      for _ in range(K):
        g = {'w': jnp.asarray(a_mat, jnp.float32) @ (y['w'] - jnp.asarray(a_vec, jnp.float32))}
        g, state = drift.correct_gradients(g, y, state, mu)
        y = {'w': y['w'] - ETA * g['w']}
      deltas.append(x['w'] - y['w'])
      if kind == 'scaffold':
        dc = drift.control_delta(state['grad_sum'], K, controls[i])
        controls[i] = drift.apply_control_delta(controls[i], dc)
        control_deltas.append(dc)
    x = {'w': x['w'] - (deltas[0] + deltas[1]) / 2}  # FedAvg outer step (eta_g = 1).
    if kind == 'scaffold':
      server = drift.server_control_update(server, control_deltas, len(A))
  return np.asarray(x['w'], np.float64)


def _numpy_scaffold():
  """Algorithm 1 of arXiv 1910.06378 (option II, eta_g = 1, all silos), in float64."""
  x, c, ci = np.zeros(2), np.zeros(2), [np.zeros(2) for _ in A]
  for _ in range(ROUNDS):
    dy, dc = [], []
    for i, (a_mat, a_vec) in enumerate(zip(A, OPTIMA)):
      y = x.copy()
      for _ in range(K):
        y = y - ETA * (a_mat @ (y - a_vec) + c - ci[i])
      new_ci = ci[i] - c + (x - y) / (K * ETA)
      dy.append(y - x)
      dc.append(new_ci - ci[i])
      ci[i] = new_ci
    x = x + np.mean(dy, axis=0)
    c = c + np.sum(dc, axis=0) / len(A)
  return x


def test_scaffold_reaches_the_true_optimum_where_fedavg_and_fedprox_drift():
  fedavg = _fedpt_rounds('none')
  scaffold = _fedpt_rounds('scaffold')
  fedprox = _fedpt_rounds('fedprox', mu=1.0)
  reference = _numpy_scaffold()
  np.testing.assert_allclose(reference, W_STAR, atol=1e-6)  # The paper's algorithm converges.
  np.testing.assert_allclose(scaffold, reference, atol=1e-4)  # fedpt's is that algorithm.
  err = {k: np.linalg.norm(v - W_STAR) for k, v in
         (('fedavg', fedavg), ('scaffold', scaffold), ('fedprox', fedprox))}
  assert err['fedavg'] > 0.1  # FedAvg's fixed point is not w*: client drift.
  # FedProx shrinks the drift but does not remove it (its fixed point is biased too).
  assert 0.05 < err['fedprox'] < err['fedavg']
  assert err['scaffold'] < 1e-4


def test_control_delta_is_the_paper_s_option_ii_with_sgd():
  """With SGD, c_i+ = c_i - c + (x - y)/(K eta) is the mean raw gradient (drift.py's claim)."""
  rng = np.random.default_rng(0)
  c, ci, x = (rng.normal(size=3).astype(np.float32) for _ in range(3))
  state = drift.scaffold_state({'w': c}, {'w': ci})
  y, raw = x.astype(np.float64), []
  for _ in range(4):
    g = rng.normal(size=3).astype(np.float32)
    raw.append(g)
    corrected, state = drift.correct_gradients({'w': jnp.asarray(g)}, {'w': y}, state)
    y = y - 0.1 * np.asarray(corrected['w'], np.float64)
  option_ii = ci - c + (x - y) / (4 * 0.1)
  new_ci = drift.apply_control_delta({'w': ci}, drift.control_delta(state['grad_sum'], 4, {'w': ci}))
  np.testing.assert_allclose(new_ci['w'], option_ii, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new_ci['w'], np.mean(raw, axis=0), rtol=1e-6, atol=1e-6)


def test_equal_controls_leave_the_gradient_bit_identical():
  g = {'w': jnp.asarray([1e-30, -3.5, 7.25e8], jnp.float32)}
  c = {'w': jnp.asarray([0.1, 0.2, 0.3], jnp.float32)}
  out, _ = drift.correct_gradients(g, g, drift.scaffold_state(c, c))
  assert np.asarray(out['w']).tobytes() == np.asarray(g['w']).tobytes()


# -- federated runs ----------------------------------------------------------------------------


def _config(corpus_dir, **inner):
  config = load_config('tiny', corpus_dir)
  config.train.update(async_checkpoints=False, eval_batches=1)
  config.federation.update(rounds=3, inner_steps=2, silos=('a', 'b'), poll_s=0.05,
                           wait_timeout_s=120.0, compression='none')
  config.inner.update(**inner)
  return config


def _run(config, root, workdir, crash=None):
  """Silos as threads, the aggregator here; `crash` {point@round} kills (raises in) a silo."""
  aggregator_lib.init_run(config, root)

  class Killed(BaseException):
    pass

  def die():
    raise Killed

  for key in crash or ():
    point, round_index = key.split('@')
    faults.set_hook(point, int(round_index), die)
  killed = []

  def work(silo):
    while True:
      try:
        silo_lib.run_silo(config.copy_and_resolve_references(), silo, root, f'{workdir}/{silo}')
        return
      except Killed:  # What a kill -9 leaves: the bucket and the last private checkpoint.
        killed.append(silo)

  threads = [threading.Thread(target=work, args=(s,), daemon=True)
             for s in config.federation.silos]
  for t in threads:
    t.start()
  aggregator_lib.run_aggregator(root)
  for t in threads:
    t.join(timeout=300)
  faults.clear()
  return storage_lib.RunStorage(root), killed


PRIVATE = 'final_norm/scale'


def _identical_config(corpus_dir, kind):
  config = _config(corpus_dir, drift_correction=kind)
  config.federation.rounds = 2  # Round 1 already steps with a nonzero c.
  # A private leaf has no drift: its correction must stay 0, or the two runs part.
  config.federation.private_params = (PRIVATE,)
  return config


@pytest.fixture
def same_data_order(monkeypatch):
  # The data order is (seed, silo id)'s; seeding it by the run seed alone makes silo a's
  # batches silo b's.
  monkeypatch.setattr(protocol, 'silo_data_seed', lambda seed, silo_id: seed)


@pytest.fixture(scope='module')
def identical_runs(corpus_dir, tmp_path_factory):
  """FedAvg and SCAFFOLD with two identical silos: same corpus, same data order."""
  tmp = tmp_path_factory.mktemp('identical')
  patch = pytest.MonkeyPatch()
  patch.setattr(protocol, 'silo_data_seed', lambda seed, silo_id: seed)
  try:
    return {kind: _run(_identical_config(corpus_dir, kind), str(tmp / kind),
                       str(tmp / f'w_{kind}'))[0]
            for kind in ('none', 'scaffold')}
  finally:
    patch.undo()


@pytest.mark.slow
def test_identical_silos_scaffold_is_fedavg_bit_for_bit(identical_runs):
  plain, scaffold = identical_runs['none'], identical_runs['scaffold']
  for r in range(1, 3):
    ours, theirs = (bucket_helpers.global_params(s, r) for s in (scaffold, plain))
    assert all(np.array_equal(ours[n], theirs[n]) for n in theirs), r
  assert not np.array_equal(*(bucket_helpers.global_params(plain, r)['embed/embedding']
                              if 'embed/embedding' in bucket_helpers.global_params(plain, r)
                              else next(iter(bucket_helpers.global_params(plain, r).values()))
                              for r in (0, 2)))
  # The server's c is there and nonzero (the mean gradient), and deltas carry delta_c_i.
  meta = scaffold.global_shard_metas(2)[0]
  assert any(k.endswith('/control') for k in meta['outer_state_hashes'])
  assert not any(k.endswith('/control')
                 for k in plain.global_shard_metas(2)[0]['outer_state_hashes'])
  names = sorted(meta['leaf_hashes'])
  controls = scaffold.read_global_outer_arrays(2, 0, 1, {
      protocol.control_name(n): jax.ShapeDtypeStruct(tuple(meta['leaf_shapes'][n]), np.float32)
      for n in names})
  assert any(float(np.abs(np.asarray(v)).max()) > 0 for v in controls.values())
  assert not np.any(np.asarray(controls[protocol.control_name(PRIVATE)]))
  ours, theirs = scaffold.delta_meta(1, 'a'), plain.delta_meta(1, 'a')
  params_bytes = sum(4 * int(np.prod(m['shape'])) for m in theirs['tree'].values())
  assert ours['bytes'] == theirs['bytes'] + params_bytes  # One fp32 params-sized upload more.
  assert PRIVATE not in ours['tree'] and PRIVATE in names
  assert set(ours['tree'][names[0]]['payload']) == {'values', protocol.CONTROL} or (
      protocol.CONTROL in ours['tree'][names[0]]['payload'])


@pytest.mark.slow
def test_scaffold_silo_killed_mid_round_redoes_it_bit_for_bit(identical_runs, same_data_order,
                                                              corpus_dir, tmp_path):
  clean = identical_runs['scaffold']  # The same run, never killed.
  crashy, killed = _run(_identical_config(corpus_dir, 'scaffold'), str(tmp_path / 'crashy'),
                        str(tmp_path / 'w_crashy'), crash=['silo_published@0', 'silo_inner@1'])
  assert len(killed) == 2
  assert crashy.global_hash(2) == clean.global_hash(2) != clean.global_hash(1)
  for r in range(2):
    for s in ('a', 'b'):
      assert crashy.delta_meta(r, s)['content_hash'] == clean.delta_meta(r, s)['content_hash']


def test_drift_settings_are_validated(corpus_dir, tmp_path):
  config = _config(corpus_dir, drift_correction='fedprox')
  with pytest.raises(config_lib.ConfigError, match='inner.prox_mu'):
    config_lib.validate(config)
  config.inner.drift_correction = 'scafold'
  with pytest.raises(config_lib.ConfigError, match='inner.drift_correction'):
    config_lib.validate(config)
  config.inner.update(drift_correction='scaffold')
  with pytest.raises(config_lib.ConfigError, match='a plain run'):
    trainer_lib.train_and_evaluate(config, str(tmp_path / 'plain'))


# -- outer warm-up ---------------------------------------------------------------------------


def _outer(**kw):
  base = dict(optimizer='diloco', lr=0.7, momentum=0.9, b1=0.9, b2=0.99, eps=0.1,
              momentum_warmup_rounds=0, lr_warmup_rounds=0)
  return ml_collections.ConfigDict({**base, **kw})


def test_outer_momentum_and_lr_follow_their_warmup_schedules():
  opt = outer.make_outer_optimizer(_outer(momentum_warmup_rounds=4, lr_warmup_rounds=2))
  flat = {'w': jnp.zeros(3, jnp.float32)}
  state = outer.init_outer_state(opt, flat)
  for r in range(7):
    flat, state = outer.outer_step(opt, flat, {'w': jnp.ones(3, jnp.float32)}, state)
    used = outer.last_hyperparams(state['w'])
    assert used['momentum'] == pytest.approx(0.9 * min(r / 4, 1.0), abs=1e-6), r
    assert used['learning_rate'] == pytest.approx(0.7 * min(r / 2, 1.0), abs=1e-6), r
  # Nesterov with momentum 0 in round 0, lr 0: the model has not moved after round 0 alone.
  first, s0 = outer.outer_step(opt, {'w': jnp.zeros(3)}, {'w': jnp.ones(3)},
                               outer.init_outer_state(opt, flat))
  assert float(jnp.abs(first['w']).max()) == 0.0 and outer.last_hyperparams(s0['w'])


@pytest.mark.parametrize('name', ['diloco', 'sgd', 'fedadam'])
def test_zero_warmup_is_today_s_optimizer_bit_for_bit(name):
  opt = outer.make_outer_optimizer(_outer(optimizer=name))
  today = {'diloco': optax.sgd(0.7, momentum=0.9, nesterov=True),
           'sgd': optax.sgd(0.7, momentum=0.9),
           'fedadam': optax.adam(0.7, b1=0.9, b2=0.99, eps=0.1)}[name]
  rng = np.random.default_rng(1)
  flat = {'w': jnp.asarray(rng.normal(size=5), jnp.float32)}
  ours, theirs = outer.init_outer_state(opt, flat), outer.init_outer_state(today, flat)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)  # The stored layout.
  a = b = flat
  for _ in range(3):
    delta = {'w': jnp.asarray(rng.normal(size=5), jnp.float32)}
    a, ours = outer.outer_step(opt, a, delta, ours)
    b, theirs = outer.outer_step(today, b, delta, theirs)
  assert np.asarray(a['w']).tobytes() == np.asarray(b['w']).tobytes()
  # An older run.json (no warm-up fields) builds the same transform.
  old = _outer(optimizer=name)
  del old['momentum_warmup_rounds'], old['lr_warmup_rounds']
  assert jax.tree.structure(outer.init_outer_state(outer.make_outer_optimizer(old), flat)) == \
      jax.tree.structure(theirs)


def test_warmup_settings_are_validated():
  with pytest.raises(outer.OuterConfigError, match='fedavg'):
    outer.make_outer_optimizer(_outer(optimizer='fedavg', lr_warmup_rounds=3))
  with pytest.raises(outer.OuterConfigError, match='nothing to warm up'):
    outer.make_outer_optimizer(_outer(momentum=0.0, momentum_warmup_rounds=3))
  with pytest.raises(outer.OuterConfigError, match='no outer.momentum'):
    outer.make_outer_optimizer(_outer(optimizer='fedadam', momentum_warmup_rounds=3))
