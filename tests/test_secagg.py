"""Secure aggregation (federation.secure_aggregation): pairwise masks cancel exactly, a masked
delta looks uniform, a dropped silo's masks are removed with its peers' revealed pair keys,
a withheld recovery fails the round cleanly, forged or replayed masked deltas are rejected,
kill -9 resumes bit-identically, and every combination it cannot carry is refused.

The federation run's reference re-aggregates in numpy from the silos' private checkpoints
(the bucket holds only masked deltas): global r+1 = global r - sum_i w_i clip(delta_i),
with fedavg (sgd(1)) and the manifest's token x silo weights.
"""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import bucket_helpers
import test_federation
import test_overlap

from fedpt import aggregator as aggregator_lib
from fedpt import config as config_lib
from fedpt import inspection
from fedpt import ledger
from fedpt import protocol
from fedpt import secagg
from fedpt import signing
from fedpt import silo as silo_lib
from fedpt import storage as storage_lib

SILOS = ('a', 'b', 'c', 'd')
CLIP = 0.05


def _keys(tmp_path, silos=SILOS):
  keys = str(tmp_path / 'keys')
  signing.generate_named(keys, ['aggregator', *(signing.silo_key_name(s) for s in silos)])
  return keys


def _pairs(keys, silos=SILOS):
  pems = {s: open(os.path.join(keys, f'{signing.x25519_name(s)}.pub')).read() for s in silos}
  return {s: secagg.PairSecrets(s, signing.load_x25519_secret(keys, s), pems) for s in silos}


def _clipped(delta: dict) -> dict:
  norm = np.sqrt(sum(np.sum(np.square(v.astype(np.float64))) for v in delta.values()))
  return {n: v.astype(np.float64) * min(1.0, CLIP / norm) for n, v in delta.items()}


def test_masks_cancel_exactly_and_recovery_removes_a_dropped_silos_masks(tmp_path):
  keys = _keys(tmp_path)
  assert os.stat(os.path.join(keys, 'silo_a.x25519.key')).st_mode & 0o777 == 0o600
  assert not os.path.exists(os.path.join(keys, 'aggregator.x25519.key'))  # Silos only.
  pairs = _pairs(keys)
  assert pairs['a'].secrets['c'] == pairs['c'].secrets['a'] != pairs['a'].secrets['b']
  # b_i,r: the silo's own, per round, and rebuilt identically from its key file (resume).
  again = _pairs(keys)
  assert pairs['a'].self_key('run', 0) == again['a'].self_key('run', 0)
  assert len({pairs[s].self_key('run', r) for s in SILOS for r in (0, 1)}) == 8
  rng = np.random.default_rng(0)
  fixed = secagg.scale(len(SILOS), CLIP)
  for r in range(3):  # Four silos, three rounds: the modular sum is the plain one, bit for bit.
    deltas = {s: {'w': rng.normal(size=(3, 5)).astype(np.float32) * 0.02 * (i + 1),
                  'v': rng.normal(size=7).astype(np.float32)}
              for i, s in enumerate(SILOS)}
    weights = {s: rng.uniform() for s in SILOS}
    masked = {s: secagg.mask_delta(s, deltas[s], weights[s], CLIP, fixed,
                                   pairs[s].round_keys('run', r), pairs[s].self_key('run', r),
                                   fragment=r % 2)[0]
              for s in SILOS}
    for survivors in (SILOS, SILOS[:3]):
      dropped = sorted(set(SILOS) - set(survivors))
      revealed = {s: pairs[s].round_keys('run', r, dropped) for s in survivors}
      self_keys = {s: pairs[s].self_key('run', r) for s in survivors}
      square, size = 0.0, 0
      for leaf, shape in (('w', (3, 5)), ('v', (7,))):
        total = np.zeros(shape, np.uint32)
        for s in survivors:
          assert masked[s][leaf][secagg.MASKED].dtype == np.uint32
          total += masked[s][leaf][secagg.MASKED]
        total = total.reshape(-1)
        plain = sum(secagg.encode(_clipped(deltas[s])[leaf].reshape(-1), weights[s], fixed)
                    for s in survivors)
        # Pair masks alone do not open the sum: every survivor's self mask is still in it.
        pairs_only = total - secagg.unmasking(dict.fromkeys(survivors, bytes(32)), revealed,
                                              r % 2, leaf, total.size)
        assert np.abs(secagg.decode(pairs_only, fixed) - secagg.decode(
            plain.astype(np.uint32), fixed)).max() > 0.01 * len(SILOS) * CLIP
        total = total - secagg.unmasking(self_keys, revealed, r % 2, leaf, int(np.prod(shape)))
        np.testing.assert_array_equal(total, plain.astype(np.uint32))
        mean = secagg.decode(total, fixed)
        expected = sum(weights[s] * _clipped(deltas[s])[leaf].reshape(-1) for s in survivors)
        np.testing.assert_allclose(mean, expected, atol=len(survivors) / fixed)
        square, size = square + float(np.sum(mean ** 2)), size + mean.size
      numerators = [weights[s] for s in survivors]
      aggregator_lib.check_unmasked_sum(r, square ** 0.5, size, numerators, CLIP, len(SILOS),
                                        fixed, survivors)  # Within sum a_i C: accepted.
      if dropped:  # Without the revealed keys the sum is noise over the whole range.
        total = sum(masked[s]['v'][secagg.MASKED] for s in survivors).astype(np.uint32)
        assert np.abs(secagg.decode(total, fixed) - expected).max() > 0.01 * len(SILOS) * CLIP
        # One wrong revealed pair key (b's with d): the decoded sum is far above its bound,
        # and the aggregator refuses the round in one line naming the records' authors.
        wrong = {**revealed, 'b': {'d': bytes(32)}}
        square = 0.0
        for leaf in ('w', 'v'):
          total = sum(masked[s][leaf][secagg.MASKED].reshape(-1) for s in survivors)
          total = total.astype(np.uint32) - secagg.unmasking(self_keys, wrong, r % 2, leaf,
                                                             total.size)
          square += float(np.sum(secagg.decode(total, fixed) ** 2))
        with pytest.raises(aggregator_lib.RecoveryMissingError) as caught:
          aggregator_lib.check_unmasked_sum(r, square ** 0.5, size, numerators, CLIP,
                                            len(SILOS), fixed, survivors)
        assert f'round {r} failed: the unmasked sum has L2 norm' in str(caught.value)
        assert 'records of a, b, c' in str(caught.value) and '\n' not in str(caught.value)
  # The bound: K values of |.| <= clip decode signed, never wrap.
  extreme = sum(secagg.encode(np.full(4, CLIP), 1.0, fixed) for _ in SILOS).astype(np.uint32)
  assert secagg.decode(extreme, fixed)[0] == pytest.approx(len(SILOS) * CLIP, rel=1e-9)
  assert np.all(extreme.view(np.int32) > 0)


def _uniform_and_uncorrelated(y, delta, plain):
  counts = np.bincount((y >> 24).astype(np.int64), minlength=256)  # Top byte: 256 cells.
  expected = y.size / 256
  chi2 = float(np.sum((counts - expected) ** 2 / expected))
  assert chi2 < 255 + 6 * np.sqrt(2 * 255), chi2  # 255 dof: mean 255, sd 22.6.
  assert abs(np.corrcoef(y.astype(np.float64), plain.astype(np.float64))[0, 1]) < 0.02
  assert abs(np.corrcoef(y.astype(np.float64), delta)[0, 1]) < 0.02


def test_a_masked_delta_is_uniform_and_uncorrelated_with_the_delta(tmp_path):
  pairs = _pairs(_keys(tmp_path))
  delta = {'w': np.linspace(-1, 1, 1 << 16).astype(np.float32) * 1e-3}  # Anything but uniform.
  keys = pairs['b'].round_keys('run', 0)
  y = secagg.mask_delta('b', delta, 0.5, CLIP, secagg.scale(4, CLIP), keys,
                        pairs['b'].self_key('run', 0), 0)[0]['w'][secagg.MASKED]
  plain = secagg.encode(delta['w'], 0.5, secagg.scale(4, CLIP)).view(np.int32)
  _uniform_and_uncorrelated(y, delta['w'], plain)
  # b late or rejected: its peers reveal every pair key with it, which removes all its pair
  # masks; its self mask (never revealed for a round that left it out) keeps y uniform.
  late = y - secagg.pair_masks('b', keys, 0, 'w', y.size)
  _uniform_and_uncorrelated(late, delta['w'], plain)
  opened = late - secagg.mask_stream(pairs['b'].self_key('run', 0), 0, 'w', y.size)
  np.testing.assert_array_equal(  # What revealing b_b,r too would open: b's clipped delta.
      opened, secagg.encode(_clipped(delta)['w'], 0.5, secagg.scale(4, CLIP)))


@pytest.fixture
def secagg_config(tiny_config):
  tiny_config.train.async_checkpoints = False
  tiny_config.train.keep_checkpoints = 50
  tiny_config.federation.update(
      rounds=2, inner_steps=2, silos=SILOS, silo_weights=(1.0, 2.0, 1.0, 1.0), poll_s=0.05,
      wait_timeout_s=120.0, compression='none', reject_norm_multiple=0.0,
      secure_aggregation=True, secagg_clip=CLIP, min_silos=3, round_deadline_s=8.0,
      secagg_recovery_timeout_s=60.0, keep_last_rounds=5)
  tiny_config.outer.optimizer = 'fedavg'
  return tiny_config


def _global_reference(store, run, works):
  """Each global round re-aggregated in numpy from the included silos' private checkpoints."""
  published = {s: test_overlap._published(w) for s, w in works.items()}
  glob = bucket_helpers.global_params(store, 0)
  for r in range(run['federation']['rounds']):
    manifest = store.read_manifest(r)
    mean = {n: np.zeros(v.shape, np.float64) for n, v in glob.items()}
    for e in manifest['included']:
      delta = {n: np.asarray(glob[n], np.float32)
               - np.asarray(published[e['silo']][r]['train'][n], np.float32) for n in glob}
      for n, v in _clipped(delta).items():
        mean[n] += e['weight'] * v
    stored = bucket_helpers.global_params(store, r + 1)
    for n in glob:
      np.testing.assert_allclose(stored[n], glob[n] - mean[n], rtol=0, atol=2e-6,
                                 err_msg=f'global round {r + 1} {n}')
    glob = stored
  return published


@pytest.mark.slow
def test_a_federation_with_a_dropout_aggregates_only_the_weighted_sum(
    secagg_config, tmp_path, repo_root):
  keys = _keys(tmp_path)
  root, work = str(tmp_path / 'bucket'), str(tmp_path / 'work')
  run = aggregator_lib.init_run(secagg_config, root, keys_dir=keys)
  store = storage_lib.RunStorage(root)
  assert sorted(run['public_keys'][signing.X25519]) == list(SILOS)
  results, errors = {}, []

  def silo(name, **kwargs):
    try:
      results[name] = silo_lib.run_silo(secagg_config.copy_and_resolve_references(), name, root,
                                        f'{work}/{name}', keys_dir=keys, **kwargs)
    except Exception as e:  # pylint: disable=broad-except
      errors.append((name, e))

  # Silo d publishes round 0, then stops: it never uploads round 1, after the others masked
  # against it. It comes back once round 1 is decided without it.
  threads = [threading.Thread(target=silo, args=(s,), daemon=True) for s in SILOS[:3]]
  threads.append(threading.Thread(target=silo, args=('d',), kwargs={'stop_after_rounds': 1},
                                  daemon=True))
  for t in threads:
    t.start()

  def restart_d():
    storage_lib.wait_for(lambda: store.read_manifest(1), 'manifest 1', timeout_s=200, poll_s=0.1)
    silo('d')
  threads.append(threading.Thread(target=restart_d, daemon=True))
  threads[-1].start()
  # The aggregator starts once round 0 is complete (compiling four silos on two cores can
  # take longer than any deadline), so round 0 has every silo and round 1 drops only d.
  storage_lib.wait_for(lambda: len(store.committed_silos(0)) == 4 or None, 'round 0',
                       timeout_s=300, poll_s=0.1)
  aggregator_lib.run_aggregator(root, keys_dir=keys)
  for t in threads:
    t.join(timeout=300)
  assert not errors, errors

  m0, m1 = store.read_manifest(0), store.read_manifest(1)
  assert [e['silo'] for e in m0['included']] == list(SILOS) and m0['unmask'] == []
  assert [e['silo'] for e in m1['included']] == ['a', 'b', 'c'] and m1['unmask'] == ['d']
  assert m1['missing'] == ['d'] and store.delta_meta(1, 'd') is None  # Never uploaded late.
  meta = store.delta_meta(0, 'a')
  assert meta['compression'] == 'secagg' and meta['delta_norm'] == 0.0
  assert {k for leaf in meta['tree'].values() for k in leaf['payload']} == {'masked'}
  assert all(e['measured_norm'] == 0.0 for e in m0['included'])
  # Weights: the manifest's token x silo weights, b twice the others.
  w0 = {e['silo']: e['weight'] for e in m0['included']}
  assert w0['b'] == pytest.approx(2 * w0['a']) and sum(w0.values()) == pytest.approx(1.0)
  # Recovery records: every included silo's self-mask key of the round (round 0: all four,
  # no pair key); in round 1, a, b and c's, with their pair keys with d and only those.
  pairs = _pairs(keys)
  assert store.recovery_silos(0) == list(SILOS) and store.recovery_silos(1) == ['a', 'b', 'c']
  for r, silos in ((0, SILOS), (1, 'abc')):
    for s in silos:
      record = store.read_recovery(r, s)
      assert record['self_key'] == pairs[s].self_key(run['run_id'], r).hex()
      dropped = ['d'] if r else []
      assert record['pair_keys'] == {
          x: k.hex() for x, k in pairs[s].round_keys(run['run_id'], r, dropped).items()}
      assert signing.check_signature(record, run['public_keys']['silos'][s]) is None
      assert not any(v.hex() in str(record) for v in pairs[s].secrets.values())
  # The global model is the numpy re-aggregation of the clipped weighted deltas.
  published = _global_reference(store, run, {s: f'{work}/{s}' for s in SILOS})
  # The clip bites on some deltas and not on others (it is the bound the aggregator relies on).
  g0 = bucket_helpers.global_params(store, 0)
  norms = [np.sqrt(sum(np.sum(np.square(g0[n] - published[s][0]['train'][n])) for n in g0))
           for s in SILOS]
  assert max(norms) > CLIP, norms
  # The ledger names the format and the recovery records.
  shown = inspection.render(inspection.describe_global_round(store, 2))
  assert ('secure_aggregation: masked fixed-point deltas (secagg), summed; masks of d removed '
          'with the recovery records of a, b, c') in shown
  text = ledger.status(root)
  assert "secure aggregation: deltas are masked fixed point ('secagg')" in text
  assert f"a {signing.fingerprint(run['public_keys'][signing.X25519]['a'])}" in text
  assert 'masks of d: recovery records from a,b,c' in text


def _masked_delta(store, run, round_index, silo, keys, scale=0.01, secret=None):
  pairs = _pairs(keys)
  steps = protocol.round_steps(run, silo)
  glob = bucket_helpers.global_params(store, round_index)
  payload, _, meta = silo_lib.make_delta(
      run, round_index, silo, store.global_hash(round_index), glob,
      {n: v - scale for n, v in glob.items()}, None, _fed(run), steps=steps,
      tokens=steps * protocol.tokens_per_step(run), train_loss=1.0,
      pairs=pairs[silo])
  return payload, signing.sign(meta, secret or signing.load_secret(keys, f'silo_{silo}'))


def _fed(run):
  return config_lib.with_values(config_lib.base_config(), {
      f'federation.{k}': v for k, v in run['federation'].items()}).federation


def test_withheld_recovery_fails_the_round_and_forged_deltas_are_rejected(
    secagg_config, tmp_path, repo_root):
  keys = _keys(tmp_path)
  secagg_config.federation.update(round_deadline_s=0.2, secagg_recovery_timeout_s=0.5,
                                  secagg_clip=6.0, fragments=2)  # Masks per fragment too.
  root = str(tmp_path / 'bucket')
  run = aggregator_lib.init_run(secagg_config, root, keys_dir=keys)
  store = storage_lib.RunStorage(root)
  scales = {'a': 0.01, 'b': 0.02, 'c': 0.004}
  for s, scale in scales.items():
    store.publish_delta(0, s, *_masked_delta(store, run, 0, s, keys, scale))
  # d's slot holds a masked delta signed by a's key (a foreign delta): rejected.
  store.publish_delta(0, 'd', *_masked_delta(store, run, 0, 'd', keys, 0.3,
                                             signing.load_secret(keys, 'silo_a')))
  agg = aggregator_lib.Aggregator(root, keys_dir=keys)
  manifest = agg.decide(0)
  assert [e['silo'] for e in manifest['included']] == ['a', 'b', 'c']
  assert 'bad signature' in manifest['rejected'][0]['reason'] and manifest['unmask'] == ['d']
  # Only the aggregator's manifest of this run and round makes a silo reveal its keys: one of
  # round 0 replayed at round 1's path (signed, with its unmask list) opens nothing.
  agg_check = signing.party_identity(run, keys, 'silo_a').check_aggregator
  assert protocol.reveal_problem(run, 0, 'a', manifest, agg_check) is None
  assert protocol.reveal_problem(run, 0, 'd', manifest, agg_check) == protocol.NOT_INCLUDED
  assert 'it says run' in protocol.reveal_problem(run, 1, 'a', manifest, agg_check)
  forged_manifest = signing.sign({**manifest, 'round': 1}, signing.load_secret(keys, 'silo_a'))
  assert 'signature' in protocol.reveal_problem(run, 1, 'a', forged_manifest, agg_check)
  # a and b reveal their round-0 keys; c withholds: the round fails, nothing written.
  pairs = _pairs(keys)

  def record(s, dropped=('d',), wrong=None):
    keys_r = pairs[s].round_keys(run['run_id'], 0, dropped)
    return signing.sign(protocol.recovery_record(
        run, 0, s, pairs[s].self_key(run['run_id'], 0), {**keys_r, **(wrong or {})}),
        signing.load_secret(keys, f'silo_{s}'))
  for s in 'ab':
    store.publish_recovery(0, s, record(s))
  proc = subprocess.run([sys.executable, str(repo_root / 'scripts' / 'aggregate.py'),
                         f'--storage={root}', f'--keys={keys}'],
                        capture_output=True, text=True, timeout=120)
  lines = [line for line in proc.stderr.splitlines() if line.startswith('error')]
  assert proc.returncode == 2 and len(lines) == 1 and 'Traceback' not in proc.stderr, proc.stderr
  assert 'round 0 failed: silo c (missing)' in lines[0] and 'rerun the aggregator' in lines[0]
  assert store.latest_global_round() == 0
  # A forged record (c's, signed by b) does not count either.
  forged = protocol.recovery_record(run, 0, 'c', pairs['c'].self_key(run['run_id'], 0),
                                    pairs['c'].round_keys(run['run_id'], 0, ['d']))
  store.publish_recovery(0, 'c', signing.sign(forged, signing.load_secret(keys, 'silo_b')))
  with pytest.raises(aggregator_lib.RecoveryMissingError, match=r'silo c \(bad signature'):
    agg.aggregate(0, manifest)
  # c's own, validly signed record with a wrong pair key: refused by the sum's bound.
  store.publish_recovery(0, 'c', record('c', wrong={'d': bytes(32)}))
  with pytest.raises(aggregator_lib.RecoveryMissingError,
                     match=r'round 0 failed: the unmasked sum .* records of a, b, c'):
    agg.aggregate(0, manifest)
  assert store.latest_global_round() == 0
  store.publish_recovery(0, 'c', record('c'))
  agg.aggregate(0, manifest)  # The rerun finishes the round.
  g0, g1 = (bucket_helpers.global_params(store, r) for r in (0, 1))
  size = sum(v[0::2].size for v in g0.values())  # `scale` on every value of fragment 0.
  clipped = {s: v * min(1.0, 6.0 / (v * np.sqrt(size))) for s, v in scales.items()}
  assert clipped['b'] < scales['b'] and clipped['a'] == scales['a']  # Only b's is clipped.
  expected = sum(e['weight'] * clipped[e['silo']] for e in manifest['included'])
  for n in g0:  # Fragment 0's rows moved by the weighted mean; fragment 1's are carried over.
    np.testing.assert_allclose(g1[n][0::2], g0[n][0::2] - expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(g1[n][1::2], g0[n][1::2])

  # Round 1: c replays its (validly signed) round-0 delta; a stale copy is no delta of round 1.
  for s in 'ab':
    store.publish_delta(1, s, *_masked_delta(store, run, 1, s, keys, scales[s]))
  source = str(store.delta_dir(0, 'c'))
  for item in bucket_helpers.files(store.delta_dir(0, 'c')):
    target = store.delta_dir(1, 'c') / str(item)[len(source) + 1:]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(item.read_bytes())
  manifest = agg.decide(1)
  assert [e['silo'] for e in manifest['included']] == ['a', 'b']
  assert 'replayed' in manifest['rejected'][0]['reason'] and manifest['unmask'] == ['c', 'd']


@pytest.mark.parametrize('changes, field', [
    ({'federation.silos': ('a', 'b'), 'federation.min_silos': 0, 'federation.silo_weights': ()},
     'federation.silos'),
    ({'federation.min_silos': 2}, 'federation.min_silos'),
    ({'federation.robust': 'median'}, 'federation.robust'),
    ({'federation.clip_multiple': 2.0}, 'federation.clip_multiple'),
    ({'federation.reject_norm_multiple': 10.0}, 'federation.reject_norm_multiple'),
    ({'federation.compression': 'int8'}, 'federation.compression'),
    ({'federation.error_feedback': True}, 'federation.error_feedback'),
    ({'federation.compression': 'topk'}, 'federation.compression'),  # Not topk's own rule.
    ({'federation.secagg_clip': float('inf')}, 'federation.secagg_clip'),
    ({'federation.secagg_clip': 2e6}, 'federation.secagg_clip'),
    ({'inner.drift_correction': 'scaffold'}, 'federation.secure_aggregation'),
    ({'federation.overlap': 'eager'}, 'federation.overlap'),
    ({'federation.drop_probability': 0.5}, 'federation.drop_probability'),
    ({'federation.secagg_clip': 0.0}, 'federation.secagg_clip'),
])
def test_what_masking_cannot_carry_is_refused_in_one_line(secagg_config, changes, field):
  config = config_lib.with_values(secagg_config, changes)
  with pytest.raises(config_lib.ConfigError) as caught:
    protocol.validate_federation(protocol.federated_config(config))
  assert caught.value.field == field and '\n' not in str(caught.value)
  assert 'Fix: ' in str(caught.value)


def test_one_line_names_every_field_masking_replaces(secagg_config):
  config = config_lib.with_values(secagg_config, {
      'federation.compression': 'int8', 'federation.error_feedback': True,
      'federation.reject_norm_multiple': 10.0})
  with pytest.raises(config_lib.ConfigError) as caught:
    protocol.validate_federation(protocol.federated_config(config))
  assert ("needs compression=none, error_feedback=False, reject_norm_multiple=0" in
          str(caught.value))
  assert ('Fix: set --config.federation.compression=none --config.federation.error_feedback=False'
          ' --config.federation.reject_norm_multiple=0.') in str(caught.value)


def test_keys_adds_only_a_missing_x25519_pair(repo_root, tmp_path):
  keys = str(tmp_path / 'keys')
  script = [sys.executable, str(repo_root / 'scripts' / 'keys.py'), f'--keys={keys}',
            '--names=silo_a']
  assert subprocess.run(script, capture_output=True, timeout=60).returncode == 0
  ed25519 = open(os.path.join(keys, 'silo_a.key'), 'rb').read()
  for ext in ('key', 'pub'):
    os.remove(os.path.join(keys, f'silo_a.x25519.{ext}'))
  proc = subprocess.run(script, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert open(os.path.join(keys, 'silo_a.key'), 'rb').read() == ed25519  # Kept as it was.
  pub = open(os.path.join(keys, 'silo_a.x25519.pub')).read()
  assert f'fingerprint {signing.fingerprint(pub)}' in proc.stdout
  assert signing.load_x25519_secret(keys, 'a') is not None
  proc = subprocess.run(script, capture_output=True, text=True, timeout=60)  # Nothing missing.
  assert proc.returncode == 2 and 'never overwritten' in proc.stderr


def test_init_run_refuses_secure_aggregation_unsigned_or_with_two_silos(repo_root, corpus_dir,
                                                                         tmp_path):
  flags = ['--config.federation.secure_aggregation=True', '--config.federation.compression=none',
           '--config.federation.reject_norm_multiple=0']
  test_overlap.refused_run_setting(repo_root, corpus_dir, tmp_path, flags,
                                   'federation.secure_aggregation')
  test_overlap.refused_run_setting(
      repo_root, corpus_dir, tmp_path, flags + ["--config.federation.silos=('a','b')"],
      'federation.silos')


@pytest.mark.slow
def test_kill_9_of_a_silo_and_the_aggregator_resumes_to_the_identical_model(
    secagg_config, tmp_path, repo_root):
  fed = secagg_config.federation
  fed.update(rounds=2, silos=('a', 'b', 'c'), silo_weights=(), min_silos=0)
  keys = _keys(tmp_path, fed.silos)
  extra = ['--config.federation.secure_aggregation=True', f'--config.federation.secagg_clip={CLIP}',
           '--config.federation.reject_norm_multiple=0']
  clean = str(tmp_path / 'clean')
  aggregator_lib.init_run(secagg_config, clean, keys_dir=keys)
  threads = [threading.Thread(target=silo_lib.run_silo, args=(
      secagg_config.copy_and_resolve_references(), s, clean, str(tmp_path / 'w0' / s)),
      kwargs={'keys_dir': keys}, daemon=True) for s in fed.silos]
  for t in threads:
    t.start()
  aggregator_lib.run_aggregator(clean, keys_dir=keys)
  for t in threads:
    t.join(timeout=300)
  crashes = {'silo_b': ['silo_upload@0'], 'aggregator': ['aggregate_upload@1']}
  crashed = test_federation._run_federation(repo_root, secagg_config, str(tmp_path / 'crashy'),
                                            str(tmp_path / 'w1'), crashes, keys=keys, extra=extra)
  assert sorted(crashed) == ['aggregate_upload@1', 'silo_upload@0']
  store, again = (storage_lib.RunStorage(str(tmp_path / p)) for p in ('clean', 'crashy'))
  assert again.global_hash(2) == store.global_hash(2) != store.global_hash(0)
