"""Free riders and copies: count sketches against exact cosines, the flag rules, and one
in-process run whose silos republish, replay and free-ride (fedpt/copies.py)."""
import dataclasses
import json
import re
import subprocess
import sys

import numpy as np
import pytest

import bucket_helpers
from conftest import child_env
from conftest import load_config
from fedpt import aggregator as aggregator_lib
from fedpt import copies
from fedpt import ledger
from fedpt import protocol
from fedpt import storage as storage_lib

# -- the sketch: pure numpy ---------------------------------------------------------------


def _pair(rng, n, cos):
  """Two spread-out vectors of `n` values with cosine `cos` (exactly, up to rounding)."""
  x, z = rng.standard_normal(n), rng.standard_normal(n)
  z -= x * np.dot(x, z) / np.dot(x, x)
  x, z = x / np.linalg.norm(x), z / np.linalg.norm(z)
  return x, cos * x + np.sqrt(1 - cos ** 2) * z


def test_sketch_cosines_estimate_exact_cosines_within_the_stated_error():
  rng = np.random.default_rng(0)
  errors = {}
  for cos in (0.0, 0.5, 0.9, 0.99):
    diffs = []
    for _ in range(20):
      x, y = _pair(rng, 6000, cos)
      diffs.append(copies.cosine(copies.leaf_sketch('w', x), copies.leaf_sketch('w', y)) - cos)
    errors[cos] = float(np.sqrt(np.mean(np.square(diffs))))
    # The stated standard error, (1 - cos^2) / sqrt(SKETCH_SIZE), with a margin of 2.
    assert errors[cos] < 2 * (1 - cos ** 2) / np.sqrt(copies.SKETCH_SIZE) + 1e-4, errors
  assert errors[0.0] > 0.01  # A real estimate, not exact by accident.


def test_a_sketch_is_linear_so_a_scaled_copy_has_cosine_one_and_its_scale():
  rng = np.random.default_rng(1)
  leaves = {'embed_vd': rng.standard_normal((30, 8)), 'mlp/w': rng.standard_normal(77)}
  sketch = sum(copies.leaf_sketch(n, v) for n, v in leaves.items())
  copy = sum(copies.leaf_sketch(n, -0.5 * v) for n, v in leaves.items())
  np.testing.assert_allclose(copy, -0.5 * sketch, rtol=1e-6, atol=1e-9)
  assert copies.cosine(sketch, copy) == pytest.approx(-1.0, abs=1e-6)
  # A leaf's name salts its hash: the same values in another leaf land elsewhere.
  assert not np.allclose(copies.leaf_sketch('a', leaves['mlp/w']),
                         copies.leaf_sketch('b', leaves['mlp/w']))
  # Chunked hashing equals one pass, and the sketch survives its JSON encoding as float32.
  big = rng.standard_normal(copies._CHUNK + 5)  # pylint: disable=protected-access
  np.testing.assert_allclose(copies.leaf_sketch('x', big),
                             copies.leaf_sketch('x', big[:copies._CHUNK])  # noqa
                             + copies.leaf_sketch('x', np.r_[np.zeros(copies._CHUNK), big[-5:]]),
                             rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(copies.decode(copies.encode(sketch)), sketch, rtol=1e-6)
  assert copies.decode([1.0] * 3) is None and copies.decode('AAAA') is None
  assert copies.decode([float('nan')] * copies.SKETCH_SIZE) is None
  assert copies.cosine(np.zeros(4), np.ones(4)) is None


def test_flag_rules_on_plain_numbers():
  rng = np.random.default_rng(2)
  a, b, c = (rng.standard_normal(copies.SKETCH_SIZE) for _ in range(3))
  old = rng.standard_normal(copies.SKETCH_SIZE)
  limits = copies.Thresholds(copy_cosine=0.99, min_norm_ratio=0.05)
  candidates = [copies.Candidate('a', 10.0, 10, a), copies.Candidate('b', 5.0, 10, 0.5 * a),
                copies.Candidate('c', 10.0, 10, c), copies.Candidate('d', 0.1, 5, 3 * old),
                copies.Candidate('e', 0.0, 10, None)]
  stats, flags = copies.flag(candidates, {(3, 'x'): old}, {2: b}, limits)
  assert sorted(flags) == ['a', 'b', 'd', 'e']
  assert flags['b'] == ["nearly parallel to silo a's delta of this round (cosine 1.0000 >= "
                        'copy_cosine 0.99; 0.5 x it)']
  assert "silo b's delta of this round" in flags['a'][0]
  assert flags['d'][0].startswith("nearly parallel to silo x's delta of round 3 (cosine 1.0000")
  # Norm per step 0.02 against the median of the others' 1, 0.5, 1 and 0.
  assert stats['d']['norm_ratio'] == pytest.approx(0.02 / 0.75)
  assert 'norm per inner step 0.02 is 0.0267 x the median' in flags['d'][1]
  assert flags['e'] == ['a zero delta'] and stats['e']['round_cosine'] is None
  assert abs(stats['c']['round_cosine']) < 0.15 and abs(stats['c']['update_cosine']) < 0.15
  assert stats['c']['norm_ratio'] == pytest.approx(1.0 / np.median([1.0, 0.5, 0.02, 0.0]))
  # Rules off: the numbers stay, nothing is flagged.
  stats_off, flags_off = copies.flag(candidates, {(3, 'x'): old}, {2: b}, copies.Thresholds(0, 0))
  assert flags_off == {} and stats_off == stats
  # The aggregator saw b's commit a poll after a's: the copier alone is flagged.
  ordered = [dataclasses.replace(c, seen=int(c.silo == 'b')) for c in candidates]
  stats_ordered, flags_ordered = copies.flag(ordered, {(3, 'x'): old}, {2: b}, limits)
  assert sorted(flags_ordered) == ['b', 'd', 'e'] and flags_ordered['b'] == flags['b']
  assert stats['a']['round_cosine'] == pytest.approx(1.0)
  assert abs(stats_ordered['a']['round_cosine']) < 0.15  # Compared with c and d only.


def _run(**federation):
  from fedpt import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.base_config()
  config.federation.update(rounds=3, inner_steps=2, silos=('a', 'b', 'c'), **federation)
  return protocol.run_record(config, 't' * 64, 'run-1')


def test_decide_round_records_flags_rejects_with_reject_copies_and_says_when_masked():
  rng = np.random.default_rng(3)
  a = rng.standard_normal(copies.SKETCH_SIZE)
  meta = {'tokens': 100, 'steps': 2, 'train_loss': 1.0, 'bytes': 1, 'compression': 'int8',
          'block_size': 256, 'topk': None, 'delta_norm': 1.0, 'content_hash': 'h'}
  measured = {'a': protocol.Measured(dict(meta, silo='a'), norm=1.0, sketch=a),
              'b': protocol.Measured(dict(meta, silo='b'), norm=0.5, sketch=0.5 * a),
              'c': protocol.Measured(dict(meta, silo='c'), norm=1.0,
                                     sketch=rng.standard_normal(copies.SKETCH_SIZE))}

  def decide(run):
    return protocol.decide_round(run, 0, 'h', ['a', 'b', 'c'], measured, previous_manifest=None,
                                 previous_committed=[], decided_after_s=0.0)
  warned = decide(_run())
  assert [e['silo'] for e in warned['included']] == ['a', 'b', 'c']
  assert sorted(warned['flags']) == ['a', 'b'] and warned['copy_checks'] == 'on'
  assert warned['similarity']['c']['norm_ratio'] == pytest.approx(1 / 0.75)
  rejected = decide(_run(reject_copies=True))
  assert [e['silo'] for e in rejected['included']] == ['c']
  assert rejected['included'][0]['weight'] == 1.0
  assert [e['reason'] for e in rejected['rejected'] if e['silo'] == 'b'] == [
      'flagged as a copy or free rider (federation.reject_copies): ' + warned['flags']['b'][0]]
  # Unlearning: a delta rejected as a copy passed every check, so it influenced the round
  # (its norm and sketch were in the others' checks); a replay of the round drops the
  # others' copy-check numbers, computed against it.
  assert protocol.influenced_by(rejected, 'b') and not protocol.influenced_by(warned, 'd')
  branch = dict(_run(), run_id='run-2')
  replayed = protocol.without_silo(branch, warned, 'b', replayed=True)
  assert replayed['similarity'] == {} and replayed['flags'] == {}
  assert replayed['copy_checks'] == protocol.REPLAYED_COPY_CHECKS
  copied = protocol.without_silo(branch, warned, 'b')
  assert sorted(copied['flags']) == ['a'] and sorted(copied['similarity']) == ['a', 'c']
  masked = decide(_run(secure_aggregation=True, compression='none', reject_norm_multiple=0.0))
  assert masked['copy_checks'] == protocol.COPY_CHECKS_MASKED
  assert masked['flags'] == {} and masked['similarity'] == {}
  assert decide(_run(copy_cosine=0.0, min_norm_ratio=0.0))['copy_checks'] == 'off: ' \
      'federation.copy_cosine and min_norm_ratio are 0'

  # A manifest from before the checks (no such fields) still validates; junk in them does not.
  run = _run()
  old = {k: v for k, v in warned.items() if k not in ('flags', 'similarity', 'copy_checks')}
  assert protocol.check_manifest(run, 0, old) is None
  assert protocol.check_manifest(run, 0, warned) is None
  for field, junk in (('flags', {'a': 'reason'}), ('flags', {'zz': ['x']}),
                      ('similarity', {'a': {'round_cosine': 'high'}}), ('copy_checks', 1)):
    assert protocol.check_manifest(run, 0, dict(warned, **{field: junk})), (field, junk)
  # Runs from before the checks (run.json without the fields) have them off.
  legacy = {k: v for k, v in run['federation'].items()
            if k not in ('copy_cosine', 'min_norm_ratio', 'reject_copies')}
  assert protocol.copy_checks(dict(run, federation=legacy)) == protocol.COPY_CHECKS_OFF


def test_the_status_table_shows_flags_that_were_not_rejections():
  row = {'round': 0, 'status': 'done', 'contributors': ['a', 'b', 'c'], 'tokens': 30,
         'train_loss': 1.0, 'bytes_up': 3, 'bytes_down': 3, 'global_hash': 'f' * 64,
         'eval_loss': 2.0, 'base_eval_loss': 3.0, 'missing': [], 'unmask': [],
         'waiting_for': [], 'rejected': [{'silo': 'c', 'reason': 'flagged as a copy ...'}],
         'flags': {'b': ['a zero delta', 'nearly parallel ...'], 'c': ['nearly parallel ...']}}
  line = ledger.render_table([row], _run()).splitlines()[-1]
  assert line.endswith('c: flagged as a copy ...; flagged b: a zero delta, nearly parallel ...')


# -- one in-process run: real deltas in a real bucket, aggregated for real ----------------


@pytest.fixture(scope='module')
def copy_run(corpus_dir, tmp_path_factory):
  """Three silos, three rounds, reject_copies on, the deltas below; round 0's deltas are
  garbage-collected before round 2 replays one of them.

    round 0: a, c honest; b republishes 0.5 x a's delta
    round 1: a honest; b sends 1e-4 x an honest delta; c sends 2 x a's round-0 delta
    round 2: a replays 0.7 x its own round-0 delta; b sends the previous global update; c honest
  """
  config = load_config('tiny', corpus_dir)
  config.model.n_layers = 1  # Fewer leaves to write, read and step: the checks are per leaf.
  config.federation.update(rounds=3, inner_steps=2, silos=('a', 'b', 'c'), poll_s=0.05,
                           wait_timeout_s=60.0, keep_last_rounds=1, keep_every_rounds=0,
                           reject_copies=True, compression='int8')
  fed = config.federation
  root = str(tmp_path_factory.mktemp('copies') / 'bucket')
  run = aggregator_lib.init_run(config, root)
  store = storage_lib.RunStorage(root)
  agg = aggregator_lib.Aggregator(root)
  rng = np.random.default_rng(4)
  shapes = {n: v.shape for n, v in bucket_helpers.global_params(store, 0).items()}

  def honest():
    return {n: 0.01 * rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}

  def publish(r, silo, delta):
    def local_fn(local):  # fake_delta's local is global - 0.01: make it global - delta.
      return {n: v + np.float32(0.01) - delta[n] for n, v in local.items()}
    store.publish_delta(r, silo, *bucket_helpers.fake_delta(store, run, r, silo, fed, 0.01,
                                                            local_fn=local_fn))

  a0 = honest()
  plan = {0: {'a': a0, 'b': {n: 0.5 * v for n, v in a0.items()}, 'c': honest()},
          1: {'a': honest(), 'b': {n: 1e-4 * v for n, v in honest().items()},
              'c': {n: 2 * v for n, v in a0.items()}}}
  manifests, collected = [], None
  for r in range(3):
    if r == 2:
      collected = store.committed_silos(0)
      g1, g2 = bucket_helpers.global_params(store, 1), bucket_helpers.global_params(store, 2)
      plan[2] = {'a': {n: 0.7 * v for n, v in a0.items()},
                 'b': {n: 3 * (g1[n] - g2[n]) for n in shapes}, 'c': honest()}
    for silo, delta in plan[r].items():
      publish(r, silo, delta)
    manifests.append(agg.decide(r))
    agg.aggregate(r, manifests[-1])
    agg.collect_garbage(r + 1)
  return {'root': root, 'store': store, 'run': run, 'manifests': manifests,
          'collected': collected}


def _rejected(manifest):
  return {e['silo']: e['reason'] for e in manifest['rejected']}


@pytest.mark.slow  # The module's one run (copy_run): ~15 s on 2 quiet cores.
def test_a_scaled_republication_is_flagged_and_rejected(copy_run):
  m = copy_run['manifests'][0]
  assert m['copy_checks'] == 'on'
  assert [e['silo'] for e in m['included']] == ['c']
  # Who copied whom is not in the bucket: both of the parallel pair are flagged.
  assert sorted(m['flags']) == ['a', 'b']
  assert m['flags']['b'][0].startswith("nearly parallel to silo a's delta of this round (cosine")
  assert '; 0.5 x it)' in m['flags']['b'][0]
  assert _rejected(m)['b'].startswith('flagged as a copy or free rider')
  assert m['similarity']['b']['round_cosine'] > 0.999
  assert abs(m['similarity']['c']['round_cosine']) < 0.1  # Honest: independent directions.


@pytest.mark.slow
def test_a_near_zero_delta_and_a_replay_of_another_silo_s_are_flagged(copy_run):
  m = copy_run['manifests'][1]
  assert [e['silo'] for e in m['included']] == ['a'] and 'a' not in m['flags']
  assert m['flags']['b'] == [m['flags']['b'][0]] and 'norm per inner step' in m['flags']['b'][0]
  assert m['similarity']['b']['norm_ratio'] < 1e-3
  # 2 x a's round-0 delta: as parallel to b's copy of it (0.5 x a's), so either is named.
  assert re.match(r"nearly parallel to silo [ab]'s delta of round 0 \(cosine (0\.99\d\d|1\.0000) "
                  r'>= copy_cosine 0\.99; [24] x it\)$', m['flags']['c'][0]), m['flags']['c']


@pytest.mark.slow
def test_replays_are_found_by_sketch_after_the_deltas_are_collected(copy_run):
  assert copy_run['collected'] == []  # Round 0's deltas were gone when round 2 was decided.
  store = copy_run['store']
  assert store.exists(store.sketches_path(0))  # Its sketches are kept, like its manifest.
  m = copy_run['manifests'][2]
  assert [e['silo'] for e in m['included']] == ['c'] and sorted(m['flags']) == ['a', 'b']
  # 0.7 x a's round-0 delta (or of its copies in rounds 0 and 1).
  assert any(re.match(r"nearly parallel to silo [abc]'s delta of round [01] ", f)
             for f in m['flags']['a']), m['flags']['a']
  assert any(f.startswith('nearly parallel to the global update of round 1')
             for f in m['flags']['b']), m['flags']['b']
  for r, manifest in enumerate(copy_run['manifests']):
    honest = [s for s in manifest['similarity'] if s not in manifest['flags']]
    assert honest, r
    for silo in honest:  # Honest random deltas: far from every threshold.
      row = manifest['similarity'][silo]
      assert all(abs(v) < 0.2 for k, v in row.items() if k != 'norm_ratio' and v is not None)


@pytest.mark.slow
def test_status_shows_the_flags_and_a_tampered_sketch_is_refused(copy_run):
  root, store = copy_run['root'], copy_run['store']
  as_json = json.loads(ledger.status(root, 'json'))
  for row, manifest in zip(as_json['rounds'], copy_run['manifests']):
    assert row['flags'] == manifest['flags'] and row['copy_checks'] == 'on'
    assert row['similarity'] == manifest['similarity']
  assert as_json['silo_totals']['a']['rounds_flagged'] == 2
  assert as_json['silo_totals']['c']['rounds_flagged'] == 1
  table = ledger.status(root)
  assert "b: flagged as a copy or free rider (federation.reject_copies): nearly parallel" in table
  record = store.read_json(store.sketches_path(1))
  try:
    store.write_json(store.sketches_path(1), dict(record, round=0))
    with pytest.raises(storage_lib.StorageError, match=r'sketches.json: it says run .* round 0'
                       r'.*tampered with\. Fix: delete it'):
      aggregator_lib.Aggregator(root).earlier_sketches(2)
  finally:
    store.write_json(store.sketches_path(1), record)


def test_a_bad_threshold_or_reject_copies_under_secure_aggregation_is_one_line(repo_root,
                                                                                tmp_path):
  proc = subprocess.run(
      [sys.executable, str(repo_root / 'scripts' / 'init_run.py'),
       f'--config={repo_root / "configs" / "tiny.py"}', f'--storage={tmp_path / "bucket"}',
       '--config.federation.copy_cosine=1.5'],
      capture_output=True, text=True, timeout=120, env=child_env(), check=False)
  out = (proc.stdout + proc.stderr).strip()
  assert proc.returncode == 2, out
  assert out.splitlines() == [
      "error: config field 'federation.copy_cosine': must be in [0, 1], got 1.5. Fix: use 0 "
      '(off) or a cosine near 1, e.g. 0.99.'], out
  from fedpt import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.base_config()
  config.federation.update(silos=('a', 'b', 'c'), secure_aggregation=True, compression='none',
                           reject_norm_multiple=0.0, reject_copies=True)
  with pytest.raises(config_lib.ConfigError, match='reject_copies.*no single delta is readable'):
    protocol.validate_federation(config)
