"""Streaming DiLoCo's fragments (federation.fragments, arXiv 2501.18512): the split rule,
every fragment's outer step against numpy, coverage, kill -9 and bad settings.

The reference re-implements the rules in numpy from what the bucket holds (global round
0, every silo's exact delta, the manifests): fragment r mod P's rows of global round r+1
are OuterOpt(its rows of global round r, the mean of round r's deltas) with that
fragment's own outer state; every other row is carried over.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bucket_helpers
from fedpt import aggregator as aggregator_lib
from fedpt import fragments
from fedpt import inspection
from fedpt import planning
from fedpt import protocol
from fedpt import storage as storage_lib
from fedpt import trees

import test_federation
import test_overlap

P = 2  # Fragments; H = 4, so a fragment round is two inner steps.
H = 4
ROUNDS = 4  # Each fragment exchanged twice.


def test_the_split_rule_covers_every_row_exactly_once():
  rng = np.random.default_rng(0)
  shapes = {'blocks/w': (5, 3, 2), 'embed_vd': (7, 4), 'final_norm/scale': (3,), 'one': (1,)}
  for count in (1, 2, 3, 4):
    leaves = {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}
    seen = {n: np.zeros(s[0], int) for n, s in shapes.items()}
    rebuilt = {n: np.zeros_like(x) for n, x in leaves.items()}
    for p in range(count):
      for name, rows in fragments.fragment_shapes(shapes, p, count).items():
        got = fragments.take(leaves[name], p, count)
        assert got.shape == rows
        seen[name][p::count] += 1
        rebuilt[name] = fragments.put(rebuilt[name], p, count, got)
    for name in shapes:
      assert (seen[name] == 1).all(), (count, name)
      np.testing.assert_array_equal(rebuilt[name], leaves[name])
    units = fragments.units(shapes, count)
    assert sum(np.prod(s) for _, _, s in units.values()) == sum(
        np.prod(s) for s in shapes.values())
  # Layers p, p+P, ... of a scanned leaf: the paper's strided pattern.
  np.testing.assert_array_equal(fragments.take(np.arange(8), 1, 4), [1, 5])
  assert fragments.rows_shape((1,), 1, 2) is None  # 'one' has no row in fragment 1.
  assert fragments.unit_name('embed_vd', 0, 1) == 'embed_vd'
  # On devices the rows come back in the leaf's own sharding.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ('x',))
  sharded = jax.device_put(jnp.ones((6, 4)), jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, 'x')))
  put = fragments.put(sharded, 1, 4, jnp.zeros((2, 4)))
  assert put.sharding == sharded.sharding and float(put.sum()) == 16.0
  with pytest.raises(fragments.FragmentError, match='not in'):
    fragments.rows_shape((4,), 2, 2)


@pytest.fixture
def fragment_config(tiny_config):
  tiny_config.train.async_checkpoints = False
  tiny_config.train.keep_checkpoints = 50
  tiny_config.federation.update(rounds=ROUNDS, inner_steps=H, fragments=P, silos=('a', 'b'),
                                poll_s=0.05, wait_timeout_s=120.0, compression='none',
                                keep_last_rounds=ROUNDS + 1)
  tiny_config.outer.update(optimizer='diloco', lr=test_overlap.LR, momentum=test_overlap.MU)
  return tiny_config


def _check_fragment_rules(mode, root, work):
  """Each round's deltas hold exactly its fragment's rows, P rounds cover every parameter
  once, every global round and each silo's delta base follow the numpy reference."""
  store = storage_lib.RunStorage(root)
  run = store.read_run()
  silos = ('a', 'b')
  deltas = test_overlap._deltas(store, run, ROUNDS)
  stored = {r: bucket_helpers.global_params(store, r) for r in range(ROUNDS + 1)}
  shapes = {n: v.shape for n, v in stored[0].items()}
  for r in range(ROUNDS):
    f = r % P
    manifest = store.read_manifest(r)
    assert manifest['fragment'] == f
    assert [e['silo'] for e in manifest['included']] == list(silos)
    for silo in silos:
      meta = store.delta_meta(r, silo)
      assert meta['fragment'] == f and meta['steps'] == H // P  # Per fragment round.
      assert {n: tuple(t['shape']) for n, t in meta['tree'].items()} == (
          fragments.fragment_shapes(shapes, f, P))
  # Over any P consecutive rounds (P x H/P = H steps) every row is exchanged exactly once.
  for start in range(ROUNDS - P + 1):
    for name, shape in shapes.items():
      hits = np.zeros(shape[0], int)
      for r in range(start, start + P):
        if name in deltas[r, 'a']:
          hits[r % P::P] += 1
      assert (hits == 1).all(), (start, name)

  # Global rounds: fragment f's rows stepped with their own Nesterov momentum.
  glob = {0: {n: np.asarray(v, np.float32) for n, v in stored[0].items()}}
  mom = {(n, p): 0.0 for n in shapes for p in range(P)}
  for r in range(ROUNDS):
    f = r % P
    glob[r + 1] = {n: v.copy() for n, v in glob[r].items()}
    for n in deltas[r, 'a']:
      mean = sum(0.5 * deltas[r, k][n] for k in silos)
      rows, mom[n, f] = test_overlap._nesterov(glob[r][n][f::P], mom[n, f], mean)
      glob[r + 1][n][f::P] = rows
    for n in shapes:
      np.testing.assert_allclose(stored[r + 1][n], glob[r + 1][n], rtol=2e-5, atol=2e-6)
      other = [p for p in range(P) if p != f]
      for p in other:  # Rows of the other fragments are carried over bit for bit.
        np.testing.assert_array_equal(stored[r + 1][n][p::P], stored[r][n][p::P])

  # A silo's delta is its base round's rows of the fragment minus its own rows after the round.
  for silo in silos:
    published = test_overlap._published(os.path.join(work, silo))
    assert sorted(published) == list(range(ROUNDS))
    for q in range(ROUNDS):
      base_round = protocol.base_round(run, q)
      for n, d in deltas[q, silo].items():
        own_rows = fragments.take(published[q]['train'][n], q % P, P)
        np.testing.assert_allclose(own_rows + d, stored[base_round][n][q % P::P], rtol=1e-4,
                                   atol=2e-6, err_msg=f'{mode}: silo {silo} round {q} {n}')
      if q >= 1:  # The silo keeps training the rows it did not just merge: they are its own.
        prev = published[q - 1]['train']['embed_vd']
        now_rows = published[q]['train']['embed_vd'][(q + 1) % P::P]
        assert not np.allclose(now_rows, stored[base_round]['embed_vd'][(q + 1) % P::P])
        assert not np.array_equal(now_rows, prev[(q + 1) % P::P])


@pytest.mark.slow
def test_fragment_rounds_follow_streaming_diloco_and_survive_kill_9(
    fragment_config, tmp_path, repo_root):
  clean, work = str(tmp_path / 'clean'), str(tmp_path / 'w0')
  aggregator_lib.init_run(fragment_config, clean)
  results = test_federation._run_in_threads(fragment_config, clean, work)
  _check_fragment_rules('none', clean, work)
  store = storage_lib.RunStorage(clean)
  model = sum(v.nbytes for v in bucket_helpers.global_params(store, 0).values())
  rounds = results['a']['rounds']
  # One exchange moves about 1/P of the model up, and (the float32 update) down: as planned.
  sizes = planning.exchange_sizes(
      trees.unflatten_params(bucket_helpers.global_params(store, 0)), 'none', 256, (),
      fragments=P)
  assert sum(sizes) == model and all(0.3 * model < n < 0.7 * model for n in sizes)
  assert [r['bytes'] for r in rounds] == [sizes[r['round'] % P] for r in rounds]
  assert [r['bytes_down'] for r in rounds[1:]] == [sizes[(r['round'] - 1) % P]
                                                   for r in rounds[1:]]
  final = trees.flatten_params(jax.device_get(results['a']['state']['params']))
  for n, v in bucket_helpers.global_params(store, ROUNDS).items():  # The run's output, whole.
    np.testing.assert_array_equal(final[n], v)
  shown = inspection.render(inspection.describe_global_round(store, 3))
  assert f'downlink update: float32, the rows of fragment 0, {sizes[0] / 1e6:.2f} MB' in shown
  planned = planning.plan(fragment_config, 8, platform='cpu')['delta']
  assert planned['upload_bytes'] == planned['download_bytes'] == max(sizes)
  assert planned['upload_per_h_bytes'] == model
  crashes = {'silo_a': ['silo_inner@1'], 'aggregator': ['aggregate_upload@2']}  # Mid-fragment,
  # mid-write. (After a commit: test_overlap's delayed run.)
  crashed = test_federation._run_federation(repo_root, fragment_config, str(tmp_path / 'crashy'),
                                            str(tmp_path / 'w1'), crashes)
  assert sorted(crashed) == sorted(p for points in crashes.values() for p in points)
  again = storage_lib.RunStorage(str(tmp_path / 'crashy'))
  assert again.global_hash(ROUNDS) == store.global_hash(ROUNDS) != store.global_hash(0)


def test_fragments_with_delayed_overlap_follow_the_rule(fragment_config, tmp_path):
  """Streaming DiLoCo's overlapped exchange: round r trains from global round r-1 and the
  fragment it sends is unchanged between the two, so no step applies a stale fragment."""
  fragment_config.federation.overlap = 'delayed'
  root, work = str(tmp_path / 'bucket'), str(tmp_path / 'work')
  aggregator_lib.init_run(fragment_config, root)
  test_federation._run_in_threads(fragment_config, root, work)
  _check_fragment_rules('delayed', root, work)


@pytest.mark.parametrize('flags, field', [
    (['--config.federation.fragments=3'], 'federation.inner_steps'),  # H=2.
    (['--config.federation.fragments=2', '--config.federation.silos=(\'a\',\'b\')',
      '--config.federation.silo_inner_steps=(2,3)'], 'federation.silo_inner_steps'),
    (['--config.federation.fragments=0'], 'federation.fragments'),
    (['--config.federation.fragments=2', '--config.federation.overlap=eager'],
     'federation.fragments'),
    (['--config.federation.fragments=2', '--config.inner.drift_correction=scaffold'],
     'federation.fragments'),
])
def test_bad_fragment_settings_are_one_line_errors(repo_root, corpus_dir, tmp_path, flags, field):
  test_overlap.refused_run_setting(repo_root, corpus_dir, tmp_path,
                                   ['--config.federation.inner_steps=2'] + flags, field)
