"""The round protocol's rules on plain dicts: no bucket, no devices, no arrays."""
import json

import pytest

from fedpt import compression
from fedpt import config as config_lib
from fedpt import protocol
from fedpt import records
from fedpt import trees

LEAVES = {'embed_vd': (8, 4), 'final_norm/scale': (4,)}


def _config(silos=('a', 'b', 'c'), weights=(), **federation):
  config = config_lib.base_config()
  config.federation.update({'rounds': 3, 'inner_steps': 2, 'silos': tuple(silos),
                            'silo_weights': tuple(weights), 'compression': 'int8',
                            'block_size': 4, **federation})
  return config


def _run(silos=('a', 'b', 'c'), weights=(), **federation):
  """A real run.json: 16 x 256 = 4096 tokens per step, H = 2, int8 in blocks of 4."""
  return protocol.run_record(_config(silos, weights, **federation), 't' * 64, 'run-1')


def _meta(silo='a', round_index=0, tokens=100, fmt='int8', **overrides):
  layout = {name: {k: [list(s), d] for k, (s, d) in
                   compression.payload_spec(shape, fmt, 4).items()}
            for name, shape in LEAVES.items()}
  hashes = {f'{name}/{k}': f'h-{name}-{k}' for name, leaf in layout.items() for k in leaf}
  meta = protocol.delta_meta(
      _run(), round_index, silo, 'base-0', leaf_shapes=LEAVES, payload_layout=layout,
      payload_hashes=hashes, content_hash=trees.tree_hash(hashes), compression_format=fmt,
      block_size=4, topk=compression.TopK().record() if fmt == 'topk' else None,
      nbytes=sum(compression.compressed_nbytes(s, fmt, 4) for s in LEAVES.values()),
      delta_norm=1.0, steps=2, tokens=tokens, train_loss=3.0, global_eval_loss=4.0,
      inner_seconds=0.5, inner_steps=2, round_budget_s=0.0)
  meta.update(overrides)
  return meta


def _check(meta, silo='a', round_index=0, check_signature=None, run=None):
  fmt = meta.get('compression') if isinstance(meta, dict) else 'int8'
  run = run or _run(compression=fmt if fmt in compression.FORMATS else 'int8')
  return protocol.check_delta_meta(run, round_index, silo, meta, 'base-0', LEAVES,
                                   check_signature)


# -- a delta's meta.json ---------------------------------------------------------------------


def test_a_well_formed_delta_passes_in_every_format():
  for fmt in compression.FORMATS:
    assert _check(_meta(fmt=fmt)) is None, fmt


def _wrong_leaf_shape(meta):
  meta['tree']['embed_vd']['shape'] = [4, 8]
  return meta


def _wrong_layout(meta):
  meta['tree']['embed_vd']['payload']['q'][1] = 'uint8'
  return meta


def _missing_payload(meta):
  del meta['tree']['embed_vd']['payload']
  return meta


def _extra_leaf(meta):
  meta['tree']['extra'] = meta['tree']['embed_vd']
  return meta


def _forged_hash(meta):
  meta['payload_hashes']['embed_vd/q'] = 'other'
  return meta


@pytest.mark.parametrize('edit, silo, reason', [
    (lambda m: 'not a dict', 'a', 'metadata unreadable'),
    (lambda m: m, 'zz', 'unknown silo'),
    (lambda m: {**m, 'run_id': 'run-2'}, 'a', "belongs to run 'run-2'"),
    (lambda m: {**m, 'round': 1}, 'a', 'metadata says round 1'),
    (lambda m: m, 'b', "silo 'a' (a replayed or moved delta)"),
    (lambda m: {**m, 'base_global_hash': 'base-9'}, 'a', 'different global model'),
    (lambda m: {**m, 'compression': 'zip'}, 'a', "compression 'zip' with block size 4 is not"),
    (lambda m: {**m, 'block_size': 8}, 'a', "block size 8 is not the run's 'int8' with 4"),
    (lambda m: {**m, 'topk': {'density': 0.5, 'bits': 2, 'chunk': 4}}, 'a',
     "topk parameters {'density': 0.5, 'bits': 2, 'chunk': 4} are not the run's None"),
    (lambda m: {**m, 'tokens': 0}, 'a', 'bad token count 0'),
    (lambda m: {**m, 'tokens': 1.5}, 'a', 'bad token count 1.5'),
    # Numbers from the bucket: type, finiteness, plausibility against the run's contract.
    (lambda m: {**m, 'tokens': 10**400}, 'a', 'at most 8192 tokens (4096 per step)'),
    (lambda m: {**m, 'tokens': 8193}, 'a', 'bad token count 8193: 2 steps train on at most 8192'),
    (lambda m: {**m, 'tokens': True}, 'a', 'bad token count True'),
    (lambda m: {**m, 'steps': 3}, 'a', 'bad step count 3: a round is H=2 inner steps'),
    (lambda m: {**m, 'steps': 1}, 'a', 'bad step count 1'),
    (lambda m: {**m, 'steps': '2'}, 'a', "bad step count '2'"),
    (lambda m: {**m, 'inner_steps': 50}, 'a', 'declares inner_steps=50, but run.json declares 2'),
    (lambda m: {**m, 'round_budget_s': 5.0}, 'a', 'declares round_budget_s=5.0'),
    (lambda m: {**m, 'train_loss': float('nan')}, 'a', 'bad train_loss nan'),
    (lambda m: {**m, 'train_loss': 'low'}, 'a', "bad train_loss 'low'"),
    (lambda m: {**m, 'global_eval_loss': float('inf')}, 'a', 'bad global_eval_loss inf'),
    (lambda m: {**m, 'delta_norm': -1.0}, 'a', 'bad delta_norm -1.0: not a finite number >= 0'),
    (lambda m: {**m, 'inner_seconds': None}, 'a', 'bad inner_seconds None'),
    (lambda m: {**m, 'bytes': 10**12}, 'a', 'claims 1000000000000 bytes; its payload layout holds'),
    (lambda m: {**m, 'tree': {**m['tree'], 'embed_vd': {**m['tree']['embed_vd'], 'shape': [10**400]}}},
     'a', 'parameter embed_vd has shape'),
    (_extra_leaf, 'a', 'parameter tree differs'),
    (_wrong_leaf_shape, 'a', 'parameter embed_vd has shape [4, 8], expected [8, 4]'),
    (_wrong_layout, 'a', 'payload layout'),
    (_forged_hash, 'a', 'payload hashes do not match the content hash'),
    (_missing_payload, 'a', "malformed metadata (KeyError: 'payload')"),
    (lambda m: {**m, 'tree': 7}, 'a', 'malformed metadata (TypeError'),
])
def test_every_delta_rejection_reason(edit, silo, reason):
  got = _check(edit(_meta()), silo=silo)
  assert got is not None and reason in got, got


def test_signature_is_checked_before_anything_else():
  calls = []

  def check_signature(meta, silo):
    calls.append(silo)
    return 'bad signature'
  assert _check(_meta(run_id='other'), check_signature=check_signature) == 'bad signature'
  assert calls == ['a']
  assert _check(_meta(), check_signature=lambda m, s: None) is None


def test_stored_layout_and_payload_hashes():
  meta = _meta()
  stored = {f'{n}/{k}': (tuple(s), d) for n, leaf in meta['tree'].items()
            for k, (s, d) in leaf['payload'].items()}
  assert protocol.check_stored_layout(meta, stored) is None
  stored['embed_vd/q'] = ((8,), 'int8')
  assert 'stored payload embed_vd/q does not match' in protocol.check_stored_layout(meta, stored)
  assert protocol.check_payload_hash('embed_vd', 'q', meta, 'h-embed_vd-q') is None
  assert 'torn or modified' in protocol.check_payload_hash('embed_vd', 'q', meta, 'x')


def test_tree_hash_is_order_free_and_content_bound():
  assert trees.tree_hash({'a': '1', 'b': '2'}) == trees.tree_hash({'b': '2', 'a': '1'})
  assert trees.tree_hash({'a': '1', 'b': '2'}) != trees.tree_hash({'a': '2', 'b': '1'})


# -- the manifest decision ----------------------------------------------------------------


def _measured(norms, tokens=None):
  tokens = tokens or {s: 100 for s in norms}
  return {s: protocol.Measured(_meta(s, tokens=tokens[s]), norm=n) for s, n in norms.items()}


def _decide(run, committed, measured, round_index=0, previous=None, previous_committed=()):
  return protocol.decide_round(run, round_index, 'base-0', list(committed), measured,
                               previous_manifest=previous,
                               previous_committed=list(previous_committed), decided_after_s=1.5)


def test_all_silos_weighted_by_tokens_and_silo_weight():
  run = _run(weights=[1.0, 1.0, 2.0])
  m = _decide(run, 'abc', _measured({'a': 1.0, 'b': 1.0, 'c': 1.0},
                                    tokens={'a': 100, 'b': 300, 'c': 100}))
  assert [e['silo'] for e in m['included']] == ['a', 'b', 'c']
  assert [e['weight'] for e in m['included']] == pytest.approx([1 / 6, 3 / 6, 2 / 6])
  assert m['rejected'] == [] and m['missing'] == [] and m['late_from_previous_round'] == []
  entry = m['included'][0]
  assert set(protocol.MANIFEST_ENTRY_FIELDS) < set(entry)
  assert entry['measured_norm'] == 1.0 and entry['tokens'] == 100 and 'clip_factor' not in entry
  assert (m['round'], m['run_id'], m['base_global_hash'], m['decided_after_s']) == (
      0, 'run-1', 'base-0', 1.5)
  assert m['robust'] == {'method': 'mean', 'trim': 1, 'clip_multiple': 0.0}


def test_a_zero_weight_silo_is_recorded_but_moves_nothing():
  m = _decide(_run(weights=[1.0, 0.0, 1.0], clip_multiple=2.0), 'abc',
              _measured({'a': 1.0, 'b': 1.0, 'c': 1.0}, tokens={'a': 100, 'b': 300, 'c': 300}))
  assert [(e['silo'], e['weight']) for e in m['included']] == [('a', 0.25), ('b', 0.0), ('c', 0.75)]
  assert [e['silo'] for e in protocol.contributing(m['included'])] == ['a', 'c']
  m = _decide(_run(weights=[1.0, 0.0, 1.0], min_silos=1), 'b', _measured({'b': 1.0}))
  assert m['included'][0]['weight'] == 0.0 and protocol.contributing(m['included']) == []


def test_quorum_after_the_deadline_and_missing_silos():
  run = _run(min_silos=2)
  assert protocol.round_ready(run, ['a', 'b', 'c'], past_deadline=False)
  assert not protocol.round_ready(run, ['a', 'b'], past_deadline=False)
  assert protocol.round_ready(run, ['a', 'b'], past_deadline=True)
  assert not protocol.round_ready(run, ['a'], past_deadline=True)
  assert not protocol.round_ready(run, ['a', 'zz'], past_deadline=True)  # Strangers don't count.
  assert not protocol.round_ready(_run(), ['a', 'b'], past_deadline=True)  # 0: every silo.
  m = _decide(run, 'ab', _measured({'a': 1.0, 'b': 1.0}))
  assert m['missing'] == ['c'] and [e['weight'] for e in m['included']] == [0.5, 0.5]


def test_rejections_keep_committed_order_then_outliers():
  measured = _measured({'a': 1.0, 'c': 1.2, 'd': 100.0})
  measured['b'] = protocol.Measured(None, 'metadata unreadable')
  run = _run(silos=('a', 'b', 'c', 'd'))
  m = _decide(run, 'abcd', measured)
  assert [e['silo'] for e in m['included']] == ['a', 'c']
  assert [(e['silo'], e['reason'][:22]) for e in m['rejected']] == [
      ('b', 'metadata unreadable'), ('d', 'delta norm 100 is more')]
  assert 'more than 10x the median' in m['rejected'][1]['reason']
  assert sum(e['weight'] for e in m['included']) == pytest.approx(1.0)


def test_outlier_rule_off_and_a_lone_silo_is_no_outlier():
  m = _decide(_run(reject_norm_multiple=0.0), 'ab', _measured({'a': 1.0, 'b': 1000.0}))
  assert [e['silo'] for e in m['included']] == ['a', 'b']
  m = _decide(_run(silos=('a',)), 'a', _measured({'a': 1000.0}))
  assert [e['silo'] for e in m['included']] == ['a']


def test_clip_factors_bound_the_large_delta():
  run = _run(clip_multiple=2.0, reject_norm_multiple=0.0)
  m = _decide(run, 'abc', _measured({'a': 1.0, 'b': 1.0, 'c': 8.0}))
  factors = {e['silo']: e['clip_factor'] for e in m['included']}
  assert factors == pytest.approx({'a': 1.0, 'b': 1.0, 'c': 2.0 / 8.0})
  assert m['robust']['clip_multiple'] == 2.0


def test_a_manifest_without_a_silo_is_the_rule_applied_to_the_others():
  """Unlearning's replay (`without_silo`): the same weights and clip factors as deciding the
  round from the other deltas alone; `influenced_by` counts a norm outlier's rejection."""
  norms, tokens = {'a': 1.0, 'b': 2.0, 'c': 8.0, 'd': 1.5}, {'a': 100, 'b': 300, 'c': 200, 'd': 100}
  m = _decide(_run(silos='abcd', clip_multiple=2.0), 'abcd', _measured(norms, tokens))
  branch = dict(_run(silos='abd', clip_multiple=2.0), run_id='run-2')
  rest = {s: n for s, n in norms.items() if s != 'c'}
  expected = _decide(branch, 'abd', _measured(rest, tokens))
  got = protocol.without_silo(branch, dict(m, missing=['c'], signature='s'), 'c')
  assert got['included'] == expected['included'] and got['run_id'] == 'run-2'
  assert [e['weight'] for e in got['included']] == pytest.approx([0.2, 0.6, 0.2])
  assert got['missing'] == [] and 'signature' not in got
  assert protocol.check_manifest(branch, 0, got) is None
  assert protocol.influenced_by(m, 'c') and not protocol.influenced_by(got, 'c')
  measured = _measured({'a': 1.0, 'c': 1.2, 'd': 100.0})
  measured['b'] = protocol.Measured(None, 'metadata unreadable')
  m = _decide(_run(silos='abcd'), 'abcd', measured)
  assert protocol.influenced_by(m, 'd') and not protocol.influenced_by(m, 'b')


def test_random_drops_are_seeded_by_run_round_and_silo():
  run = _run(drop_probability=0.5)
  silos = [s for s in 'abc']
  dropped = [protocol.dropped(run, 0, s) for s in silos]
  assert dropped == [protocol.dropped(run, 0, s) for s in silos]  # Same on a restart.
  measured = {s: m for s, m in _measured({'a': 1.0, 'b': 1.0, 'c': 1.0}).items()
              if not protocol.dropped(run, 0, s)}
  m = _decide(run, silos, measured)
  assert [e['silo'] for e in m['rejected']] == [s for s, d in zip(silos, dropped) if d]
  assert all('dropped at random (federation.drop_probability=0.5)' == e['reason']
             for e in m['rejected'])
  assert any(protocol.dropped(run, r, 'a') for r in range(40))
  assert not all(protocol.dropped(run, r, 'a') for r in range(40))
  assert not any(protocol.dropped(_run(), r, 'a') for r in range(40))


def test_late_silos_are_those_the_previous_manifest_did_not_decide():
  previous = {'included': [{'silo': 'a'}], 'rejected': [{'silo': 'b', 'reason': 'x'}]}
  m = _decide(_run(min_silos=1), 'a', _measured({'a': 1.0}), round_index=1, previous=previous,
              previous_committed=['a', 'b', 'c'])
  assert m['late_from_previous_round'] == ['c']
  m = _decide(_run(), 'abc', _measured({'a': 1.0, 'b': 1.0, 'c': 1.0}), round_index=0,
              previous=None, previous_committed=['a'])
  assert m['late_from_previous_round'] == []


def test_nothing_valid_gives_an_empty_inclusion():
  measured = {s: protocol.Measured(None, 'parameter x has NaN or Inf values') for s in 'abc'}
  m = _decide(_run(), 'abc', measured)
  assert m['included'] == [] and len(m['rejected']) == 3


def test_a_changed_delta_is_caught_before_aggregation():
  entry = {'silo': 'a', 'content_hash': 'h1'}
  assert protocol.check_still_included(0, entry, {'content_hash': 'h1'}) is None
  reason = protocol.check_still_included(0, entry, {'content_hash': 'h2'})
  assert 'changed after the manifest included it' in reason and 'Fix:' in reason
  reason = protocol.check_still_included(0, entry, None)
  assert 'is gone although the manifest included it' in reason and 'Fix:' in reason


# -- a global round's meta ------------------------------------------------------------------


def test_global_meta_checks():
  run = _run()
  meta = protocol.global_shard_meta('run-1', 2, 0, 1, leaf_hashes={'x': 'h'},
                                    leaf_shapes={'x': [2]}, leaf_dtypes={'x': 'float32'},
                                    outer_state_hashes={'x/s0': 'm'}, contributors=['a'],
                                    tokens=5)
  assert protocol.check_global_meta(run, 2, meta) is None
  assert 'round 2' in protocol.check_global_meta(run, 3, meta)
  assert "run 'run-1'" in protocol.check_global_meta({**run, 'run_id': 'other'}, 2, meta)

  def signed(record):
    return None if record.get('signed') else 'bad signature'
  assert protocol.check_global_meta(run, 2, meta, signed) == 'bad signature'
  meta['signed'] = True
  assert 'previous round is missing' in protocol.check_global_meta(run, 2, meta, signed, None)
  assert protocol.check_global_meta(run, 2, meta, signed, {'signed': False}) == (
      'manifest of round 1: bad signature')
  assert protocol.check_global_meta(run, 2, meta, signed, {'signed': True}) is None
  assert protocol.global_leaves([meta]) == ({'x': (2,)}, {'x': 'float32'}, {'x': 'h'})


def test_a_global_meta_must_be_well_formed_before_anyone_reads_it():
  meta = protocol.global_shard_meta('run-1', 2, 0, 1, leaf_hashes={'x': 'h'},
                                    leaf_shapes={'x': [2, 3]}, leaf_dtypes={'x': 'float32'},
                                    outer_state_hashes={}, contributors=['a'], tokens=5)
  assert records.check_shard_meta_form(meta) is None
  for edit, reason in [
      ({'leaf_shapes': {'x': [10**400]}}, "describes leaf 'x' as"),
      ({'leaf_dtypes': {'x': 'object'}}, "describes leaf 'x' as [2, 3] 'object'"),
      ({'leaf_shapes': {'y': [2]}}, 'different leaves'),
      ({'num_shards': 0}, 'shard 0 of 0'), ({'tokens': -1}, 'tokens -1'),
      ({'contributors': 'a'}, 'no list of contributors'),
      ({'leaf_hashes': None}, 'different leaves'),
  ]:
    got = records.check_shard_meta_form({**meta, **edit})
    assert got is not None and reason in got, (edit, got)
  assert 'not a JSON object' in records.check_shard_meta_form([meta])
  assert 'malformed' in records.check_shard_meta_form({k: v for k, v in meta.items()
                                                          if k != 'tokens'})


def test_a_manifest_read_back_is_checked():
  run = _run()
  m = _decide(run, 'abc', _measured({'a': 1.0, 'b': 1.0, 'c': 1.0}))
  assert protocol.check_manifest(run, 0, m) is None
  first = m['included'][0]
  for edit, reason in [
      ({'round': 1}, 'round 1'),
      ({'included': [{**first, 'tokens': 10**400}] + m['included'][1:]}, "'a': bad token count"),
      ({'included': [{**first, 'steps': 1}] + m['included'][1:]}, "'a': bad step count 1"),
      ({'included': [{**first, 'weight': float('nan')}] + m['included'][1:]}, 'out of range'),
      ({'included': [{**first, 'clip_factor': -5.0}] + m['included'][1:]}, 'out of range'),
      ({'included': [{**first, 'measured_norm': 'x'}] + m['included'][1:]}, 'out of range'),
      ({'included': [{**first, 'compression': 'none'}] + m['included'][1:]}, "is not the run's"),
      ({'included': m['included'] + [first]}, 'includes a silo twice'),
      ({'robust': {'method': 'zz', 'trim': 1}}, 'robust rule'),
      ({'base_global_hash': 5}, 'base_global_hash 5'),
      ({'included': [{**first, 'silo': 'zz'}] + m['included'][1:]}, "includes 'zz'"),
      ({'included': m['included'][:2]}, 'do not sum to 1'),
      ({'missing': ['zz']}, 'not in run.json'), ({'decided_after_s': 'soon'}, "'soon'"),
      ({'rejected': [{'silo': 'a'}]}, 'malformed'),
  ]:
    got = protocol.check_manifest(run, 0, {**m, **edit})
    assert got is not None and reason in got, (edit, got)


def test_run_json_is_checked_by_every_reader():
  run = _run()
  records.check_run_form(run, 'run.json')
  protocol.check_run(run)
  fed = run['federation']
  for edit, reason in [
      ({'format_version': 2}, 'speaks protocol format 2; this fedpt speaks 3'),
      ({'federation': {**fed, 'poll_s': -1.0}}, "'federation.poll_s' must be in"),
      ({'federation': {**fed, 'silo_weights': [0.0, 0.0, 0.0]}}, 'every weight is zero'),
      ({'silos': [{**s, 'weight': 0.0} for s in run['silos']]}, 'is not what its federation'),
      ({'silos': run['silos'][:2]}, 'is not what its federation section declares'),
      ({'model': {**run['model'], 'rope_theta': 'big'}}, "'model.rope_theta' must be a finite"),
      ({'inner': {**run['inner'], 'lr_typo': 1.0}}, r"unknown contract field\(s\) \['inner.lr_typo'\]"),
      ({'federation': {k: v for k, v in fed.items() if k != 'min_silos'}},
       r"missing \['federation.min_silos'\]"),
      ({'federation': {**fed, 'silos': ['a', '../b', 'c']}}, "silo id '../b'"),
      ({'seed': None}, "'seed' must be an integer"),
  ]:
    with pytest.raises(records.RecordError, match=f'{reason}.*Fix'):
      records.check_run_form({**run, **edit}, 'run.json')
  for edit, field in [({'compression': 'zip'}, 'federation.compression'),
                      ({'robust': 'bogus'}, 'federation.robust'),
                      ({'reject_norm_multiple': 0.5}, 'federation.reject_norm_multiple')]:
    with pytest.raises(protocol.RunMismatchError, match=f'breaks a run rule: .*{field}.*Fix'):
      protocol.check_run({**run, 'federation': {**fed, **edit}})
  with pytest.raises(protocol.RunMismatchError, match="breaks a run rule: .*'outer.optimizer'"):
    protocol.check_run({**run, 'outer': {**run['outer'], 'optimizer': 'bogus'}})


def test_a_global_shards_arrays_must_be_the_ones_its_meta_lists():
  meta = protocol.global_shard_meta('run-1', 2, 0, 1, leaf_hashes={'x': 'h', 'y': 'i'},
                                    leaf_shapes={}, leaf_dtypes={},
                                    outer_state_hashes={'x/s0': 'm'}, contributors=[], tokens=0)
  assert protocol.check_shard_arrays(meta, {'x': 'h', 'y': 'i'}, {'x/s0': 'm'}) is None
  assert 'parameter y does not match its committed hash' in protocol.check_shard_arrays(
      meta, {'x': 'h', 'y': 'j'}, {'x/s0': 'm'})
  assert 'outer-optimizer state x/s0 does not match' in protocol.check_shard_arrays(
      meta, {'x': 'h', 'y': 'i'}, {'x/s0': 'n'})
  assert 'not the ones meta.json lists' in protocol.check_shard_arrays(
      meta, {'x': 'h'}, {'x/s0': 'm'})
  del meta['outer_state_hashes']
  assert 'hashes no outer-optimizer state' in protocol.check_shard_arrays(
      meta, {'x': 'h', 'y': 'i'}, {'x/s0': 'm'})


def test_a_run_of_another_format_is_refused():
  config = config_lib.base_config()
  run = protocol.run_record(config, 't' * 64, 'run-1')
  with pytest.raises(records.RecordError, match='protocol format 1.*Fix'):
    protocol.join_config({**run, 'format_version': 1}, config, 'web')


def test_a_run_json_from_before_the_later_fields_reads_with_their_defaults():
  """Format-3 runs written before drift correction and private params still load, as before."""
  config = config_lib.base_config()
  run = json.loads(json.dumps(protocol.run_record(config, 't' * 64, 'run-1')))
  for field in records.LATER_FIELDS:
    section, name = field.split('.')
    del run[section][name]
  records.check_run_form(run, 'run.json')
  recorded = records.recorded_contract(run)
  assert recorded['inner.drift_correction'] == 'none' and recorded['outer.lr_warmup_rounds'] == 0
  assert recorded['federation.downlink_compression'] == 'none' and protocol.downlink(run) is None
  assert not protocol.is_private(run, 'embed_vd') and protocol.shared_leaves(run, ['b', 'a']) == [
      'a', 'b']
  joined, _ = protocol.join_config(run, config_lib.base_config(), 'web')
  assert tuple(joined.federation.private_params) == () and joined.inner.prox_mu == 0.0


# -- run.json: the run's contract ---------------------------------------------------------------


def test_run_record_holds_the_whole_contract_and_per_silo_declarations():
  config = _config(silos=('a', 'b'), silo_inner_steps=(2, 5), silo_round_budget_s=(0.0, 30.0))
  run = protocol.run_record(config, 't' * 64, 'run-1')
  assert run['format_version'] == records.FORMAT_VERSION
  assert run['silos'] == [{'id': 'a', 'weight': 1.0, 'inner_steps': 2, 'round_budget_s': 0.0},
                          {'id': 'b', 'weight': 1.0, 'inner_steps': 5, 'round_budget_s': 30.0}]
  # The model's function, not only its shapes; the inner optimizer; what each step trains on.
  assert run['model']['rope_theta'] == 10_000.0 and run['model']['norm_eps'] == 1e-5
  assert run['model']['param_dtype'] == 'float32' and run['inner']['lr'] == 1e-3
  assert run['data'] == {'seq_len': 256, 'global_batch': 16}
  assert protocol.tokens_per_step(run) == 4096
  # What each party chooses for itself is not in the contract.
  for field in ('model.remat', 'data.corpus', 'data.tokenizer', 'inner.grad_accum', 'train.steps',
                'mesh.data'):
    assert field not in records.recorded_contract(run), field
  assert records.recorded_contract(run) == records.contract(config)
  with pytest.raises(protocol.RunMismatchError, match="silo 'zz' is not in this run"):
    protocol.join_config(run, config, 'zz')
  with pytest.raises(protocol.RunMismatchError, match='tokenizer.*Fix'):
    protocol.check_tokenizer(run, 'u' * 64)
  config.model.d_model = 8
  with pytest.raises(protocol.RunMismatchError, match='model.d_model=8 .yours. vs 256'):
    protocol.check_model_matches_run(run, config, 't' * 64)


def test_a_silo_takes_the_run_s_values_and_is_refused_for_typed_ones():
  """The config file's values give way to run.json; typed ones that disagree are refused."""
  run = protocol.run_record(_config(silos=('web', 'mine'), inner_steps=10, silo_weights=(1.0, 3.0)),
                            't' * 64, 'run-1')
  mine = config_lib.base_config()  # The silo's own file: the defaults (H = 50, other silos).
  mine.model.rope_theta = 500_000.0
  mine.model.remat = 'full'  # A party field: the silo's own choice.
  config, adopted = protocol.join_config(run, mine, 'web')
  assert config.federation.inner_steps == 10
  assert protocol.federated_config(config).train.steps == 3 * 10
  assert config.model.rope_theta == 10_000.0 and config.federation.silos == ('web', 'mine')
  assert config.federation.silo_weights == (1.0, 3.0) and config.model.remat == 'full'
  assert adopted['federation.inner_steps'] == (50, 10)
  assert adopted['model.rope_theta'] == (500_000.0, 10_000.0)
  for typed, message in [
      ({'model.rope_theta'}, 'model.rope_theta=500000.0 .yours. vs 10000.0 .run.json.'),
      ({'federation.inner_steps'}, 'federation.inner_steps=50 .yours. vs 10'),
  ]:
    with pytest.raises(protocol.RunMismatchError, match=f'{message}.*Fix: drop those'):
      protocol.join_config(run, mine, 'web', typed)
  mine.federation.update(poll_s=2.0, inner_steps=10)  # Typed and equal, or a party default.
  config, _ = protocol.join_config(run, mine, 'web', {'federation.poll_s', 'model.remat',
                                                      'federation.inner_steps'})
  assert config.federation.poll_s == 2.0 and config.federation.wait_timeout_s == 3600.0


def test_a_silo_s_declared_h_and_budget_come_from_run_json():
  run = protocol.run_record(
      _config(silos=('a', 'b'), silo_inner_steps=(2, 7), silo_round_budget_s=(0.0, 9.0)),
      't' * 64, 'run-1')
  config, _ = protocol.join_config(run, config_lib.base_config(), 'b')
  assert (config.federation.inner_steps, config.federation.round_budget_s) == (7, 9.0)
  assert protocol.federated_config(config).train.steps == 3 * 7
  with pytest.raises(protocol.RunMismatchError, match='round_budget_s=0.0 .yours. vs 9.0'):
    protocol.join_config(run, config_lib.base_config(), 'b', {'federation.round_budget_s'})


@pytest.mark.parametrize('field, value', [
    ('rounds', 0), ('inner_steps', -1), ('silos', ('a', 'a')), ('silos', ('a b',)),
    ('min_silos', 9), ('compression', 'zip'), ('block_size', 3), ('num_shards', 0),
    ('reject_norm_multiple', 0.5), ('drop_probability', 1.0), ('wait_timeout_s', 0.0),
    ('silo_weights', (0.0, 0.0, 0.0, 0.0)), ('silo_weights', (1.0, float('inf'), 1.0, 1.0)),
    ('silo_weights', (1.0, -1.0, 1.0, 1.0)), ('poll_s', 0.0), ('round_budget_s', -1.0),
    ('round_deadline_s', -5.0), ('silo_inner_steps', (5, 0, 5, 5)), ('silo_inner_steps', (5,)),
    ('silo_round_budget_s', (1.0, 1.0, -2.0, 1.0)), ('keep_last_rounds', 0),
    ('silo_weights', (1e300, 1e300, 1.0, 1.0)), ('silo_weights', (1.0, 2.0)),
])
def test_validate_federation_names_the_field(field, value):
  config = config_lib.base_config()
  config.federation[field] = value
  with pytest.raises(config_lib.ConfigError, match=f'federation.{field}.*Fix'):
    protocol.validate_federation(config)
  protocol.validate_federation(config_lib.base_config())


@pytest.mark.parametrize('fields, field, problem', [
    ({'compression': 'topk'}, 'error_feedback', "is False with compression='topk'"),
    ({'compression': 'topk', 'error_feedback': True, 'topk_bits': 3}, 'topk_bits',
     '3 bits per kept value'),
    ({'compression': 'topk', 'error_feedback': True, 'topk_density': 0.0}, 'topk_density',
     r'must be in \(0, 1\]'),
    ({'compression': 'topk', 'error_feedback': True, 'topk_chunk': 0}, 'topk_chunk', 'must be'),
    ({'downlink_compression': 'topk'}, 'downlink_compression', 'an upload format only'),
    ({'compression': 'int2', 'block_size': 6}, 'block_size', '6 with int2'),
    ({'downlink_compression': 'int2', 'block_size': 6}, 'block_size', '6 with int2'),
])
def test_topk_and_int2_run_rules(fields, field, problem):
  config = config_lib.base_config()
  config.federation.update(fields)
  with pytest.raises(config_lib.ConfigError, match=f'federation.{field}.*{problem}.*Fix'):
    protocol.validate_federation(config)


def test_a_topk_delta_carries_the_runs_topk_parameters():
  run = _run(compression='topk', error_feedback=True, topk_density=0.5, topk_chunk=4)
  topk = compression.TopK(0.5, 2, 4)
  layout = {name: {k: [list(s), d] for k, (s, d) in
                   compression.payload_spec(shape, 'topk', 4, topk).items()}
            for name, shape in LEAVES.items()}
  meta = _meta(fmt='topk', topk=topk.record(), tree={
      name: {'shape': list(LEAVES[name]), 'payload': layout[name]} for name in LEAVES},
               bytes=sum(compression.compressed_nbytes(s, 'topk', 4, topk)
                         for s in LEAVES.values()))
  assert _check(meta, run=run) is None
  assert protocol.delta_format(meta) == ('topk', 4, topk)
  # The run's other parameters: another layout, refused by the claims before the layout.
  assert "topk parameters {'density': 0.5, 'bits': 4" in _check(
      {**meta, 'topk': {**topk.record(), 'bits': 4}}, run=run)
  assert "are not the run's {'density': 0.5" in _check(_meta(fmt='topk'), run=run)


def test_silos_typed_as_a_comma_list_are_shown_as_a_tuple():
  """--config.federation.silos=web,text reaches the config as one id, 'web,text'."""
  config = config_lib.base_config()
  config.federation.silos = ('web,text',)
  with pytest.raises(config_lib.ConfigError) as raised:
    protocol.validate_federation(config)
  assert str(raised.value).endswith(
      "Fix: write several ids as a tuple: --config.federation.silos=\"('web','text')\"."), (
          str(raised.value))


def test_federated_config_sets_the_schedule_horizon():
  config = config_lib.base_config()
  config.federation.update(rounds=4, inner_steps=25)
  assert protocol.federated_config(config).train.steps == 100
  assert config.train.steps == 200  # The caller's config is untouched.
