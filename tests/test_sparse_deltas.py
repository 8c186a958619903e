"""Sparse top-k deltas (federation.compression='topk') through a real bucket and aggregator."""
import importlib.util
import json
import re
import subprocess
import sys

import numpy as np
import pytest

import bucket_helpers
import conftest
import test_federation
from fedpt import aggregator as aggregator_lib
from fedpt import compression
from fedpt import fragments as fragments_lib
from fedpt import ledger
from fedpt import model as model_lib
from fedpt import planning
from fedpt import protocol
from fedpt import storage as storage_lib
from fedpt import trees

LEAF = 'embed_vd'
HONEST = ('a', 'b')


@pytest.fixture
def topk_config(tiny_config):
  tiny_config.train.async_checkpoints = False  # Silos as threads of one process.
  tiny_config.federation.update(
      rounds=2, inner_steps=3, silos=('a', 'b'), poll_s=0.05, wait_timeout_s=120.0,
      compression='topk', error_feedback=True, topk_density=0.1, topk_chunk=64)
  tiny_config.outer.optimizer = 'fedavg'
  return tiny_config


def _resigned(payload, meta):
  """The payload's hashes, layout and byte count made true again, as a silo that signs a
  malformed payload of its own would write them: only the sparse checks can catch it."""
  meta = dict(meta, tree={n: dict(leaf, payload={k: [list(v.shape), str(v.dtype)] for k, v in
                                                 payload[n].items()})
                          for n, leaf in meta['tree'].items()})
  meta['payload_hashes'] = {f'{n}/{k}': storage_lib.array_hash(v)
                            for n, leaf in payload.items() for k, v in leaf.items()}
  meta['content_hash'] = trees.tree_hash(meta['payload_hashes'])
  meta['bytes'] = sum(compression.payload_nbytes(leaf) for leaf in payload.values())
  return payload, meta


def _edit_idx(edit):
  def mutate(payload, meta):
    payload[LEAF] = dict(payload[LEAF], idx=edit(np.array(payload[LEAF]['idx'])))
    return _resigned(payload, meta)
  return mutate


def _duplicate(idx):
  idx[1] = idx[0]
  return idx


def _out_of_range(idx):
  idx[0] = 64  # Chunks of 64: indices 0..63.
  return idx


def _one_too_many(idx):
  return np.concatenate([idx, idx[-1:] ^ 1]).astype(idx.dtype)


def _nan_leaf(local_flat):
  return dict(local_flat, **{LEAF: local_flat[LEAF] * np.nan})


MALFORMED = {
    'dup': (dict(mutate=_edit_idx(_duplicate)), f'parameter {LEAF}: index .* of chunk 0 is '
                                                 'sent twice'),
    'range': (dict(mutate=_edit_idx(_out_of_range)), f'parameter {LEAF}: index 64 in chunk 0 is '
                                                     r'out of range \(the chunk holds 64 values\)'),
    'many': (dict(mutate=_edit_idx(_one_too_many)), f'parameter {LEAF} payload layout .* is not '
                                                     r'the topk layout .*\(wrong shape or dtype\)'),
    # A NaN delta that claims a sane norm: its NaN reaches the payload as a NaN scale.
    'nan': (dict(local_fn=_nan_leaf, mutate=lambda p, m: (p, dict(m, delta_norm=0.5))),
            f'parameter {LEAF}: chunk 0 has a non-finite scale nan'),
}


def _round_zero(config, root, silos, extra=None):
  """Round 0 of a run whose silos `silos` publish honest deltas and `extra` malformed ones."""
  config = config.copy_and_resolve_references()
  config.federation.update(silos=tuple(silos) + tuple(extra or ()), min_silos=len(silos),
                           round_deadline_s=0.0)
  run = aggregator_lib.init_run(config, root, run_id='same')
  store = storage_lib.RunStorage(root)
  for k, silo in enumerate(silos):
    test_federation._publish_fake_delta(  # pylint: disable=protected-access
        store, run, 0, silo, config.federation, 0.01 * (k + 1), tokens=1000 * (k + 1),
        local_fn=lambda flat, k=k: {n: v + 0.003 * k * np.cos(np.arange(v.size)).reshape(
            v.shape).astype(v.dtype) for n, v in flat.items()})
  for silo, (how, _) in (extra or {}).items():
    test_federation._publish_fake_delta(  # pylint: disable=protected-access
        store, run, 0, silo, config.federation, 0.02, **how)
  agg = aggregator_lib.Aggregator(root)
  manifest = agg.decide(0)
  agg.aggregate(0, manifest)
  return store, manifest


def test_malformed_sparse_deltas_are_rejected_as_if_never_sent(topk_config, tmp_path):
  """Duplicated, out-of-range or too many indices and NaN values: each rejected with its
  reason, and the global model is bit for bit the one aggregated without them."""
  store, manifest = _round_zero(topk_config, str(tmp_path / 'with'), HONEST, MALFORMED)
  clean, reference = _round_zero(topk_config, str(tmp_path / 'without'), HONEST)
  assert [e['silo'] for e in manifest['included']] == list(HONEST)
  reasons = {e['silo']: e['reason'] for e in manifest['rejected']}
  assert sorted(reasons) == sorted(MALFORMED)
  for silo, (_, reason) in MALFORMED.items():
    assert re.fullmatch(reason, reasons[silo]), (silo, reasons[silo])
  assert reference['missing'] == [] and [e['silo'] for e in reference['included']] == list(HONEST)
  assert [e['weight'] for e in manifest['included']] == [e['weight']
                                                          for e in reference['included']]
  assert manifest['included'][0]['topk'] == {'density': 0.1, 'bits': 2, 'chunk': 64}
  ours, theirs = (bucket_helpers.global_params(s, 1) for s in (store, clean))
  before = bucket_helpers.global_params(store, 0)
  for name in ours:
    np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
  assert not np.array_equal(ours[LEAF], before[LEAF])  # The honest deltas moved it.
  # Sparse: FedAvg moved only the coordinates some silo sent, about 2 x 10% of them.
  moved = np.mean(ours[LEAF] != before[LEAF])
  assert 0.1 <= moved <= 0.2, moved


@pytest.mark.slow
def test_silos_train_and_publish_topk_deltas(topk_config, tmp_path):
  """Real silos, the three of issue 20 at once (SparseLoCo's deltas of Streaming DiLoCo's
  fragments, Muon inside): every delta included, each holding its fragment's rows."""
  fragments = 2
  topk_config.federation.update(fragments=fragments, inner_steps=4)
  topk_config.inner.optimizer = 'muon'
  root = str(tmp_path / 'bucket')
  run = aggregator_lib.init_run(topk_config, root)
  results = test_federation._run_in_threads(  # pylint: disable=protected-access
      topk_config, root, str(tmp_path))
  store = storage_lib.RunStorage(root)
  shapes = {n: tuple(s) for m in store.global_shard_metas(0) for n, s in m['leaf_shapes'].items()}
  topk = compression.TopK(0.1, 2, 64)
  sent = 0
  for r in range(2):
    rows = fragments_lib.fragment_shapes(shapes, protocol.round_fragment(run, r), fragments)
    expected = sum(compression.compressed_nbytes(s, 'topk', topk=topk) for s in rows.values())
    dense = sum(4 * int(np.prod(s)) for s in rows.values())
    # 10% of chunks of 64: 6 uint16 indices, 6 two-bit codes and a scale per 256 fp32 bytes.
    assert expected < dense / 14, (expected, dense)
    manifest = store.read_manifest(r)
    assert [e['silo'] for e in manifest['included']] == ['a', 'b'], manifest['rejected']
    assert all(e['bytes'] == expected for e in manifest['included'])
    assert all(e['topk'] == topk.record() for e in manifest['included'])
    sent += 2 * expected
  assert results['a']['round'] == 2 and np.isfinite(results['a']['final_eval_loss'])
  assert json.loads(ledger.status(root, 'json'))['bytes_up'] == sent
  first, last = (bucket_helpers.global_params(store, r)[LEAF] for r in (0, 2))
  assert 0 < np.mean(first != last) < 0.5  # Sparse updates: most coordinates never moved.


@pytest.mark.parametrize('flags, message', [
    (['--config.federation.compression=topk'],
     "error: config field 'federation.error_feedback': is False with compression='topk', which "
     "would lose every value it does not send. Fix: set federation.error_feedback=True."),
    (['--config.federation.downlink_compression=topk'],
     "error: config field 'federation.downlink_compression': 'topk' is an upload format only "
     "(the global update has no sender-side residual to keep what it drops). Fix: use one of "
     "('none', 'bf16', 'int8', 'int4', 'int2') (none: silos download the fp32 model)."),
    (['--config.federation.compression=topk', '--config.federation.error_feedback=True',
      '--config.federation.topk_bits=3'],
     "error: config field 'federation.topk_bits': 3 bits per kept value. Fix: use one of "
     "(2, 4, 8)."),
    (['--config.federation.compression=topk', '--config.federation.error_feedback=True',
      '--config.federation.robust=median'],
     "error: config field 'federation.robust': 'median' with compression='topk': a "
     "coordinate-wise median or trimmed mean of sparse deltas zeroes every coordinate few silos "
     "kept, and no residual keeps it. Fix: use federation.robust=mean (clip_multiple and "
     "reject_norm_multiple still apply), or a dense compression."),
])
def test_a_bad_topk_run_is_one_line_naming_the_fix(repo_root, tmp_path, flags, message):
  proc = subprocess.run(
      [sys.executable, str(repo_root / 'scripts' / 'init_run.py'),
       f'--config={repo_root / "configs" / "tiny.py"}', f'--storage={tmp_path / "bucket"}',
       *flags], capture_output=True, text=True, timeout=120, env=conftest.child_env(),
      check=False)
  out = (proc.stdout + proc.stderr).strip()
  assert proc.returncode == 2, out
  assert out.splitlines() == [message], out
  assert not (tmp_path / 'bucket').exists()


def test_the_planner_counts_topk_bytes_of_the_1b_model(repo_root):
  """1% at 2 bits in chunks of 4096: over 100x fewer upload bytes than fp32 (BENCHMARKS)."""
  spec = importlib.util.spec_from_file_location('one_b', repo_root / 'configs' / '1b.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  model_config = model_lib.ModelConfig.from_config(module.get_config().model, 'cpu')
  _, params, _ = model_lib.abstract_model(model_config)
  sizes = planning.delta_sizes(params, 256, (), compression.TopK(0.01, 2, 4096))
  assert sizes['none'] / sizes['topk'] > 100, sizes
  assert sizes['int2'] / sizes['none'] == pytest.approx(1 / 16 + 1 / 256, rel=1e-3)  # + scales.
  three = planning.delta_sizes(params, 256, (), compression.TopK(0.03, 2, 4096))['topk']
  assert 2.5 < three / sizes['topk'] < 3.5
