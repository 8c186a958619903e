"""Overlapped rounds (federation.overlap): the update rules of arXiv 2502.12996, resumes, errors.

The reference is a numpy re-implementation of the paper's rules, fed only with what
the bucket holds (global round 0, every silo's exact delta, the manifests): each
silo's round base and every global round must match it.
"""
import os
import subprocess
import sys
import threading

import numpy as np
import orbax.checkpoint as ocp
import pytest

import bucket_helpers
from fedpt import aggregator as aggregator_lib
from fedpt import checkpoint as checkpoint_lib
from fedpt import compression
from fedpt import faults
from fedpt import outer
from fedpt import protocol
from fedpt import storage as storage_lib
from fedpt import trees

import test_federation

LR, MU = 0.7, 0.9  # diloco: optax.sgd(LR, momentum=MU, nesterov=True).


@pytest.fixture
def overlap_config(tiny_config):
  tiny_config.train.async_checkpoints = False  # Silos are threads of this process.
  tiny_config.train.keep_checkpoints = 50  # Every round's 'published' checkpoint stays.
  tiny_config.federation.update(rounds=3, inner_steps=2, silos=('a', 'b'), poll_s=0.05,
                                wait_timeout_s=120.0, compression='none')
  tiny_config.outer.update(optimizer='diloco', lr=LR, momentum=MU)
  return tiny_config


def _nesterov(x, m, g):
  """optax.sgd(LR, MU, nesterov=True) in numpy: (new params, new momentum)."""
  m = g + MU * m
  return x - LR * (g + MU * m), m


def _published(workdir):
  """{round: flat private checkpoint items} of a silo's 'published' checkpoints."""
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  ckpt = checkpoint_lib.Checkpointer(ckpt_dir, keep=50, async_save=False, clean_up=False)
  out = {}
  try:
    for step in ckpt.all_steps():
      meta = ckpt.read_meta(step)
      if meta['phase'] == 'published':
        state = ocp.PyTreeCheckpointer().restore(os.path.join(ckpt_dir, str(step), 'state'))
        out[meta['round']] = {k: trees.flatten_params(v['params'] if k == 'train' else v)
                              for k, v in state.items()}
  finally:
    ckpt.close()
  return out


def _deltas(store, run, rounds):
  """{(round, silo): exact fp32 delta} from the bucket (compression 'none')."""
  out = {}
  for r in range(rounds):
    for silo in protocol.silo_ids(run):
      meta = store.delta_meta(r, silo)
      out[r, silo] = {n: np.asarray(compression.decompress(
          store.read_delta_leaf(r, silo, n, meta['tree'][n]['payload']), 'none',
          tuple(meta['tree'][n]['shape']), meta['block_size'])) for n in meta['tree']}
  return out


def _check_update_rules(mode, root, work):
  """Every global round and each silo's base of every round equal the paper's rules in numpy."""
  store = storage_lib.RunStorage(root)
  run = store.read_run()
  rounds, silos = 3, ('a', 'b')
  deltas = _deltas(store, run, rounds)
  stored = {r: bucket_helpers.global_params(store, r) for r in range(rounds + 1)}
  weights = {r: {e['silo']: e['weight'] for e in store.read_manifest(r)['included']}
             for r in range(rounds)}
  assert all(w == {'a': 0.5, 'b': 0.5} for w in weights.values())

  # The synchronized global rounds: G[r+1] = OuterOpt(G[r], sum_k w_k delta_k,r), always.
  glob = {0: {n: np.asarray(v, np.float32) for n, v in stored[0].items()}}
  mom = {0: {n: np.zeros_like(v) for n, v in glob[0].items()}}
  for r in range(rounds):
    glob[r + 1], mom[r + 1] = {}, {}
    for n in glob[r]:
      mean = sum(weights[r][k] * deltas[r, k][n] for k in silos)
      glob[r + 1][n], mom[r + 1][n] = _nesterov(glob[r][n], mom[r][n], mean)
  for r in range(1, rounds + 1):
    for n in glob[r]:
      np.testing.assert_allclose(stored[r][n], glob[r][n], rtol=2e-5, atol=2e-6)

  # Each silo's base of round q, as the paper defines it.
  def expected_base(silo, q):
    if mode == 'none':
      return glob[q]
    if mode == 'delayed' or q == 0:
      return glob[max(q - 1, 0)]
    # Eager (q >= 1): theta_m = OuterOpt(theta^(t-1), (1/M) Delta_m^(t) + (1/M) sum_{m' != m}
    # Delta_m'^(t-1)), theta^(t-1) the synchronized global round before the newest one.
    prev = q - 2  # The round whose deltas the newest global round G[q-1] applied.
    x, m = (glob[0], mom[0]) if prev < 0 else (glob[prev], mom[prev])
    out = {}
    for n in x:
      others = 0.0 if prev < 0 else sum(
          weights[prev][k] * deltas[prev, k][n] for k in silos if k != silo)
      out[n] = _nesterov(x[n], m[n], others + 0.5 * deltas[q - 1, silo][n])[0]
    return out

  for silo in silos:
    published = _published(os.path.join(work, silo))
    assert sorted(published) == list(range(rounds))
    for q in range(rounds):
      base = {n: published[q]['train'][n] + deltas[q, silo][n] for n in deltas[q, silo]}
      want = expected_base(silo, q)
      for n in base:
        np.testing.assert_allclose(base[n], want[n], rtol=1e-4, atol=2e-6,
                                   err_msg=f'{mode}: silo {silo} round {q} leaf {n}')
      assert ('eager_base' in published[q]) == (mode == 'eager')
    if mode != 'none':  # Overlapped: round 2 is not trained from global round 2.
      assert not np.allclose(published[2]['train']['embed_vd'] + deltas[2, silo]['embed_vd'],
                             glob[2]['embed_vd'], rtol=1e-4, atol=2e-6)


def test_an_overlapped_silo_trains_on_while_its_upload_and_download_are_in_flight(
    overlap_config, tmp_path):
  """Round 0's upload is held until round 1 is half trained: it must be in the background;
  the rounds still commit in order, each from the right base."""
  overlap_config.federation.update(silos=('a',), rounds=2, overlap='delayed')
  root = str(tmp_path / 'bucket')
  aggregator_lib.init_run(overlap_config, root)
  trained, waited = threading.Event(), []
  faults.set_hook('silo_inner', 1, trained.set)
  faults.set_hook('silo_upload', 0, lambda: waited.append(trained.wait(60)))
  try:
    results = test_federation._run_in_threads(overlap_config, root, str(tmp_path / 'work'))
  finally:
    faults.clear()
  assert waited == [True]  # Round 1 trained while round 0's delta was still uploading.
  store = storage_lib.RunStorage(root)
  assert [e['silo'] for e in store.read_manifest(0)['included']] == ['a']
  assert store.read_manifest(1)['base_global_hash'] == store.global_hash(0)
  rounds = results['a']['rounds']
  assert [r['round'] for r in rounds] == [0, 1]
  assert all(r['seconds']['upload'] > 0 and r['bytes_down'] > 0 for r in rounds)


# Each mode's kill points; in the overlapped ones the aggregator's crash in round 0 holds
# global round 1 back while the silos train round 1 from global round 0: silo a is killed
# there, a round ahead: after its commit (delayed) and mid-round (eager, which shares
# delayed's resume path and adds its own state, the eager base and the sent parts).
# Synchronous rounds are killed mid-round and mid-write in test_fragments.py.
KILLS = {
    'none': None,
    'delayed': {'silo_a': ['silo_published@1'], 'silo_b': ['silo_upload_begin@0'],
                'aggregator': ['aggregate_upload@0']},
    'eager': {'silo_a': ['silo_inner@1'], 'aggregator': ['aggregate_upload@0']},
}


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['none', 'delayed', 'eager'])
def test_each_mode_follows_its_rule_and_survives_kill_9_anywhere(
    overlap_config, tmp_path, repo_root, mode):
  """Synchronous DiLoCo and the rules of arXiv 2502.12996 on an uninterrupted run; then the
  same run killed at every crash point (uploads in flight included) ends bit-identical."""
  overlap_config.federation.overlap = mode
  clean, work = str(tmp_path / 'clean'), str(tmp_path / 'w0')
  aggregator_lib.init_run(overlap_config, clean)
  test_federation._run_in_threads(overlap_config, clean, work)
  _check_update_rules(mode, clean, work)
  crashes = KILLS[mode]
  if crashes is None:
    return
  crashed = test_federation._run_federation(repo_root, overlap_config, str(tmp_path / 'crashy'),
                                            str(tmp_path / 'w1'), crashes)
  assert sorted(crashed) == sorted(p for points in crashes.values() for p in points)
  reference = storage_lib.RunStorage(clean)
  store = storage_lib.RunStorage(str(tmp_path / 'crashy'))
  run = store.read_run()
  assert store.global_hash(3) == reference.global_hash(3) != reference.global_hash(0)
  for r in range(3):
    assert [e['silo'] for e in store.read_manifest(r)['included']] == ['a', 'b']
    assert store.read_manifest(r)['base_global_hash'] == reference.global_hash(
        protocol.base_round(run, r))


def test_eager_coefficient_is_the_outer_steps_slope():
  """OuterOpt(x, s, g + e) - OuterOpt(x, s, g) = -coef * e for every linear outer optimizer."""
  import jax.numpy as jnp
  import ml_collections
  rng = np.random.default_rng(0)
  x, g, e = (jnp.asarray(rng.normal(size=(5,)), jnp.float32) for _ in range(3))
  for name, extra in [('diloco', {}), ('sgd', {}), ('fedavg', {}),
                      ('diloco', {'lr_warmup_rounds': 4, 'momentum_warmup_rounds': 3})]:
    cfg = ml_collections.ConfigDict({**dict(
        optimizer=name, lr=0.7, momentum=0.9, b1=0.9, b2=0.99, eps=0.1, lr_warmup_rounds=0,
        momentum_warmup_rounds=0), **extra})
    opt = outer.make_outer_optimizer(cfg)
    state = opt.init(x)
    for step in range(3):
      moved = {}
      for tag, grad in (('g', g), ('ge', g + e)):
        upd, _ = opt.update(grad, state, x)
        moved[tag] = x + upd
      np.testing.assert_allclose(moved['ge'] - moved['g'],
                                 -outer.eager_coefficient(cfg, step) * e, rtol=1e-5, atol=1e-6)
      state = opt.update(g, state, x)[1]
  with pytest.raises(outer.OuterConfigError, match='not linear'):
    outer.eager_coefficient(ml_collections.ConfigDict(dict(optimizer='fedadam')), 0)


@pytest.mark.parametrize('flags, field', [
    (['--config.federation.overlap=eagre'], 'federation.overlap'),
    (['--config.federation.overlap=eager', '--config.outer.optimizer=fedadam'],
     'federation.overlap'),
    (['--config.federation.overlap=eager', '--config.federation.robust=median'],
     'federation.overlap'),
    (['--config.federation.overlap=delayed', '--config.inner.drift_correction=scaffold'],
     'federation.overlap'),
])
def test_bad_overlap_settings_are_one_line_errors(repo_root, corpus_dir, tmp_path, flags, field):
  refused_run_setting(repo_root, corpus_dir, tmp_path, flags, field)


def refused_run_setting(repo_root, corpus_dir, tmp_path, flags, field):
  """init_run.py with `flags` exits 2 with one line naming `field` and a fix; no run.json."""
  proc = subprocess.run(
      [sys.executable, str(repo_root / 'scripts' / 'init_run.py'),
       f'--config={repo_root / "configs" / "tiny.py"}', f'--config.data.corpus={corpus_dir}',
       f'--storage={tmp_path / "b"}'] + flags, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and field in lines[0] and 'Traceback' not in proc.stderr, proc.stderr
  assert 'use ' in lines[0]
  assert not (tmp_path / 'b' / 'run.json').exists()
