"""Unlearning a silo (fedpt/unlearning.py): retrain's exact branch and replay's re-aggregation.

One signed run is built once for the file: silos a, b, x and y (y never publishes), known
deltas (bucket_helpers.fake_delta, signed by their silo) through the real aggregator, x first
included in round 1. Then x's deltas are deleted from the parent's bucket: neither mode may
read them.
"""
import json
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

import bucket_helpers
import conftest
from fedpt import aggregator as aggregator_lib
from fedpt import checkpoint as checkpoint_lib
from fedpt import protocol
from fedpt import signing
from fedpt import silo as silo_lib
from fedpt import storage as storage_lib
from fedpt import unlearning

TOKENS = {'a': 1000, 'b': 3000, 'x': 2000}
SCALES = {'a': 0.01, 'b': 0.02, 'x': 0.05}
LR, MU = 0.7, 0.9  # outer.optimizer='diloco': Nesterov SGD (configs' defaults).


@pytest.fixture(scope='module')
def parent(corpus_dir, tmp_path_factory):
  """(config, bucket root, key folder) of a finished 3-round signed run; x joined in round 1.

  One key folder serves every party here (each party's own in real use).
  """
  config = conftest.load_config('tiny', corpus_dir)
  config.train.async_checkpoints = False  # Silos run as threads below.
  config.federation.update(rounds=3, inner_steps=4, silos=('a', 'b', 'x', 'y'), poll_s=0.05,
                           wait_timeout_s=120.0, min_silos=2, round_deadline_s=0.0,
                           compression='none', retain_for_unlearning=True)
  config.outer.optimizer = 'diloco'
  work = tmp_path_factory.mktemp('unlearn')
  root, keys = str(work / 'parent'), str(work / 'keys')
  signing.generate_named(keys, ['aggregator', *(f'silo_{s}' for s in 'abxy')])
  run = aggregator_lib.init_run(config, root, keys_dir=keys)
  store = storage_lib.RunStorage(root)
  agg = aggregator_lib.Aggregator(root, keys_dir=keys)
  for r in range(3):
    for silo in ('a', 'b') + (('x',) if r else ()):
      payload, meta = bucket_helpers.fake_delta(
          store, run, r, silo, config.federation, SCALES[silo] * (r + 1), tokens=TOKENS[silo])
      store.publish_delta(r, silo, payload, signing.sign(
          meta, signing.load_secret(keys, f'silo_{silo}')))
    agg.aggregate(r, agg.decide(r))
    agg.collect_garbage(r + 1)
  assert store.committed_global_rounds() == [0, 1, 2, 3]  # retain_for_unlearning: no GC.
  assert [e['silo'] for e in store.read_manifest(0)['included']] == ['a', 'b']
  assert [e['silo'] for e in store.read_manifest(1)['included']] == ['a', 'b', 'x']
  for r in (1, 2):
    store.remove_delta(r, 'x')
  return config, root, keys


def _deltas(store, r, silo):
  """{leaf: the fp32 delta} of a stored delta (compression='none')."""
  meta = store.delta_meta(r, silo)
  return {n: store.read_delta_leaf(r, silo, n, meta['tree'][n]['payload'])['values']
          for n in meta['tree']}


def _files(directory):
  return {str(p)[len(str(directory)):]: p.read_bytes() for p in bucket_helpers.files(directory)
          if p.name != 'meta.json'}


@pytest.mark.slow  # Two silos train two rounds (~25 s on 2 cores).
def test_retrain_branches_before_x_and_the_others_continue_without_it(parent, tmp_path):
  config, root, keys = parent
  store, out = storage_lib.RunStorage(root), str(tmp_path / 'retrain')
  done = unlearning.unlearn(root, 'x', 'retrain', out, keys)
  assert done['branch_round'] == 1 and done['replayed_rounds'] == []
  branch, run = storage_lib.RunStorage(out), storage_lib.RunStorage(out).read_run()
  parent_run = store.read_run()
  assert run['run_id'] != parent_run['run_id'] and protocol.silo_ids(run) == ['a', 'b', 'y']
  assert run['federation']['silos'] == ['a', 'b', 'y']
  assert signing.check_signature(run, run['public_keys']['aggregator']) is None
  assert sorted(run['public_keys']['silos']) == ['a', 'b', 'y']
  assert run['parent'] == {'run_id': parent_run['run_id'], 'round': 1, 'storage': root,
                           'silo': 'x', 'mode': 'retrain'}
  # History up to the branch: the same arrays, byte for byte, and the same decisions.
  assert branch.committed_global_rounds() == [0, 1]
  for r in (0, 1):
    assert branch.global_hash(r) == store.global_hash(r)
    assert _files(branch.global_dir(r)) == _files(store.global_dir(r))
    assert all(m['run_id'] == run['run_id'] for m in branch.global_shard_metas(r))
  old, new = store.read_manifest(0), branch.read_manifest(0)
  assert new['included'] == old['included'] and new['run_id'] == run['run_id']
  assert old['missing'] == ['x', 'y'] and new['missing'] == ['y']
  assert branch.read_manifest(1) is None

  # The remaining silos continue from global round 1 (x's deltas are gone from the parent).
  workers = [threading.Thread(target=silo_lib.run_silo,
                              args=(config, s, out, str(tmp_path / f'silo_{s}')),
                              kwargs={'keys_dir': keys})  # They vet the re-issued history.
             for s in ('a', 'b')]
  for w in workers:
    w.start()
  aggregator_lib.run_aggregator(out, keys_dir=keys)
  for w in workers:
    w.join(timeout=300)
  assert branch.committed_global_rounds() == [0, 1, 2, 3]
  for r in (1, 2):
    assert sorted(e['silo'] for e in branch.read_manifest(r)['included']) == ['a', 'b']
  assert branch.global_hash(3) != store.global_hash(3)

  # A branch of the branch (b leaves too): a's workdir holds its state in the first branch,
  # which b influenced from round 0 on; started there, it is told to use a fresh workdir.
  again = str(tmp_path / 'again')
  assert unlearning.unlearn(out, 'b', 'retrain', again, keys)['branch_round'] == 0
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=rf"silo_a holds silo a's state in run {run['run_id']}, which silo b "
                           r'influenced; .* Fix: start this silo with a fresh --workdir'):
    silo_lib.run_silo(config, 'a', again, str(tmp_path / 'silo_a'), keys_dir=keys)


def test_replay_equals_a_numpy_reaggregation_without_x(parent, tmp_path):
  _, root, keys = parent
  store, out = storage_lib.RunStorage(root), str(tmp_path / 'replay')
  done = unlearning.unlearn(root, 'x', 'replay', out, keys, calibration_rounds=1)
  assert done['branch_round'] == 1 and done['replayed_rounds'] == [1, 2]
  assert done['next_round'] == 3 and done['rounds'] == 4  # One calibration round is left.
  branch = storage_lib.RunStorage(out)
  # DiLoCo's outer step (Nesterov SGD on the token-weighted mean delta), in numpy, from
  # global round 0 with zero momentum: round 0 as the parent decided it, then rounds 1 and 2
  # from a's and b's stored deltas alone.
  params = bucket_helpers.global_params(store, 0)
  momentum = {n: np.zeros_like(v) for n, v in params.items()}
  for r in range(3):
    total = TOKENS['a'] + TOKENS['b']
    da, db = _deltas(store, r, 'a'), _deltas(store, r, 'b')
    for n in params:
      mean = (TOKENS['a'] * da[n] + TOKENS['b'] * db[n]) / total
      momentum[n] = MU * momentum[n] + mean
      params[n] = params[n] - LR * (mean + MU * momentum[n])
    replayed = bucket_helpers.global_params(branch, r + 1)
    for n in params:
      np.testing.assert_allclose(replayed[n], params[n], rtol=1e-5, atol=1e-6, err_msg=n)
  assert branch.global_hash(1) == store.global_hash(1)
  assert branch.global_hash(3) != store.global_hash(3)
  for r in (1, 2):
    manifest = branch.read_manifest(r)
    assert [e['silo'] for e in manifest['included']] == ['a', 'b']
    np.testing.assert_allclose([e['weight'] for e in manifest['included']], [0.25, 0.75])
    assert manifest['base_global_hash'] == branch.global_hash(r)


def test_unlearning_refuses_cleanly(parent, tmp_path):
  _, root, keys = parent
  cases = [(dict(silo='z'), r"--silo='z' is not a silo of run .* Fix: pass one of those"),
           (dict(silo='y'), r'silo y was never included .*: nothing to unlearn'),
           (dict(mode='forget'), r"--mode='forget' is not one of"),
           (dict(calibration_rounds=2), r'only with --mode=replay')]
  for change, expected in cases:
    args = {'silo': 'x', 'mode': 'retrain', 'calibration_rounds': 0, **change}
    with pytest.raises(unlearning.UnlearnError, match=expected):
      unlearning.unlearn(root, args['silo'], args['mode'], str(tmp_path / 'out'), keys,
                         calibration_rounds=args['calibration_rounds'])
  with pytest.raises(signing.KeyFileError, match='this run is signed'):  # The branch is signed.
    unlearning.unlearn(root, 'x', 'retrain', str(tmp_path / 'out'))
  assert not (tmp_path / 'out').exists()
  # Secure aggregation: replay cannot read single deltas (a run.json that says so, re-signed).
  masked = tmp_path / 'masked'
  shutil.copytree(root, masked)
  run = storage_lib.RunStorage(str(masked)).read_run()
  run['federation'].update(secure_aggregation=True, min_silos=0, reject_norm_multiple=0.0)
  (masked / 'run.json').write_text(json.dumps(signing.sign(
      {k: v for k, v in run.items() if k != 'signature'}, signing.load_secret(keys, 'aggregator'))))
  with pytest.raises(unlearning.UnlearnError, match='uses secure aggregation: .* --mode=retrain'):
    unlearning.unlearn(str(masked), 'x', 'replay', str(tmp_path / 'out'), keys)
  (tmp_path / 'taken').mkdir()
  (tmp_path / 'taken' / 'notes.txt').write_text('mine')
  with pytest.raises(unlearning.UnlearnError, match='already exists and is not empty'):
    unlearning.unlearn(root, 'x', 'retrain', str(tmp_path / 'taken'), keys)
  # Garbage-collected: global round 1 (both modes), or a delta replay needs (replay only).
  collected = tmp_path / 'collected'
  shutil.copytree(root, collected)
  storage_lib.RunStorage(str(collected)).delete_round(1)
  for mode in unlearning.MODES:
    with pytest.raises(unlearning.UnlearnError,
                       match=r'global round 1, the last before silo x.*garbage-collected .*'
                             r'retain_for_unlearning=True'):
      unlearning.unlearn(str(collected), 'x', mode, str(tmp_path / f'gc_{mode}'), keys)
  shutil.rmtree(collected)
  shutil.copytree(root, collected)
  storage_lib.RunStorage(str(collected)).remove_delta(2, 'a')
  with pytest.raises(unlearning.UnlearnError,
                     match=r"silo a's delta of round 2, which replay re-aggregates, was garbage"):
    unlearning.unlearn(str(collected), 'x', 'replay', str(tmp_path / 'gc_delta'), keys)
  assert unlearning.unlearn(str(collected), 'x', 'retrain', str(tmp_path / 'gc_retrain'),
                            keys)['branch_round'] == 1

  done = subprocess.run(
      [sys.executable, str(conftest.REPO / 'scripts' / 'unlearn.py'), f'--storage={root}',
       '--silo=z', f'--out={tmp_path / "cli"}'],
      capture_output=True, text=True, timeout=180, check=False, env=conftest.child_env())
  assert done.returncode == 2 and done.stderr.strip().startswith(
      "error: --silo='z' is not a silo of run"), done.stderr
  assert len(done.stderr.strip().splitlines()) == 1, done.stderr
