"""The compressed downlink: global r+1 := global r + the dequantised update, rebuilt bit for bit."""
import json
import shutil
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bucket_helpers
from conftest import child_env
from conftest import load_config
from conftest import needs_devices
from fedpt import aggregator as aggregator_lib
from fedpt import compression
from fedpt import inspection
from fedpt import ledger
from fedpt import loading
from fedpt import planning
from fedpt import protocol
from fedpt import silo as silo_lib
from fedpt import storage as storage_lib
from fedpt import trees

ROUNDS = 3


@pytest.fixture(scope='module')
def downlink_run(corpus_dir, tmp_path_factory):
  """2 silos x 3 rounds with an int8 downlink (FedAvg, int8 deltas), aggregated in 2 shards;
  silos and shards as threads."""
  config = load_config('tiny', corpus_dir)
  config.train.async_checkpoints = False  # Threads of one process checkpoint synchronously.
  config.federation.update(rounds=ROUNDS, inner_steps=3, silos=('a', 'b'), poll_s=0.05,
                           wait_timeout_s=120.0, downlink_compression='int8',
                           keep_last_rounds=10, num_shards=2)
  tmp = tmp_path_factory.mktemp('downlink')
  root = str(tmp / 'bucket')
  aggregator_lib.init_run(config, root)
  results = {}

  def work(silo):
    results[silo] = silo_lib.run_silo(config.copy_and_resolve_references(), silo, root,
                                      str(tmp / silo))
  threads = [threading.Thread(target=work, args=(s,), daemon=True) for s in ('a', 'b')]
  threads.append(threading.Thread(target=aggregator_lib.run_aggregator, args=(root, 1),
                                  daemon=True))
  for t in threads:
    t.start()
  aggregator_lib.run_aggregator(root, 0)
  for t in threads:
    t.join(timeout=300)
  return config, root, tmp, results


@needs_devices(8)
@pytest.mark.parametrize('fmt', compression.DENSE_FORMATS)
@pytest.mark.parametrize('dtype', [np.float32, jnp.bfloat16])
def test_the_host_and_a_sharded_silo_apply_an_update_alike(fmt, dtype):
  """The aggregator adds the update to host numpy, a silo to its sharded params: same bits."""
  rng = np.random.default_rng(0)
  base = (0.02 * rng.standard_normal((64, 96))).astype(dtype)
  change = (1e-3 * rng.standard_normal((64, 96))).astype(np.float32)
  payload = {k: np.asarray(v) for k, v in compression.compress(change, fmt, 32).items()}
  on_host = np.asarray(compression.apply_update(base, payload, fmt, 32))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ('x', 'y'))
  sharded = jax.device_put(base, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec('x', 'y')))
  on_devices = compression.apply_update(sharded, payload, fmt, 32)
  assert on_devices.sharding == sharded.sharding and on_host.dtype == dtype
  assert np.array_equal(np.asarray(on_devices), on_host)
  assert not np.array_equal(on_host, base)  # It moved, by the decompressed update.
  expected = (base.astype(np.float32) + np.asarray(
      compression.decompress(payload, fmt, base.shape, 32))).astype(dtype)
  assert np.array_equal(on_host, expected)


def _update(store, round_index):
  """{leaf: decompressed update} of a global round, and its shard metas."""
  metas = store.global_shard_metas(round_index)
  run = store.read_run()
  out = {}
  for meta in metas:
    layout, reason = protocol.update_layout(run, meta)
    assert reason is None
    abstract = {f'{n}/{k}': jax.ShapeDtypeStruct(tuple(s), np.dtype(d))
                for n, spec in layout.items() for k, (s, d) in spec.items()}
    arrays = store.read_global_update(round_index, meta['shard'], meta['num_shards'], abstract)
    for n, spec in layout.items():
      out[n] = np.asarray(compression.decompress({k: arrays[f'{n}/{k}'] for k in spec}, 'int8',
                                                 meta['leaf_shapes'][n], 256))
  return out


def test_a_silo_rebuilds_every_global_round_bit_for_bit_from_the_update(downlink_run):
  config, root, tmp, results = downlink_run
  store = storage_lib.RunStorage(root)
  run = store.read_run()
  assert results['a']['round'] == results['b']['round'] == ROUNDS
  for r in range(1, ROUNDS + 1):
    stored = bucket_helpers.global_params(store, r)
    rebuilt, nbytes = loading.global_from_update(
        store, run, r, bucket_helpers.global_params(store, r - 1))
    assert sorted(rebuilt) == sorted(stored)
    for n in stored:
      assert np.array_equal(np.asarray(rebuilt[n]), stored[n]), (r, n)
    assert not np.array_equal(stored['embed_vd'], bucket_helpers.global_params(store, r - 1)[
        'embed_vd'])
  # The silos' own reconstruction of the last round (on their 8-device mesh) is the stored one.
  final = bucket_helpers.global_params(store, ROUNDS)
  for silo in ('a', 'b'):
    mine = trees.flatten_params(jax.device_get(results[silo]['state']['params']))
    for n in final:
      assert np.array_equal(mine[n], final[n]), (silo, n)
  # ... and it read only the updates: round 0 is the full model, later rounds the int8 update.
  params_bytes = sum(v.nbytes for v in final.values())
  update_bytes = sum(m['update_bytes'] for m in store.global_shard_metas(1))
  assert 3.5 * update_bytes < params_bytes
  for silo in ('a', 'b'):
    rows = [json.loads(line) for line in (tmp / silo / 'metrics.jsonl').read_text().splitlines()]
    down = [row['bytes_down'] for row in rows if 'bytes_up' in row]
    assert down == [params_bytes] + [update_bytes] * (ROUNDS - 1), silo


def test_error_feedback_carries_what_the_update_lost(downlink_run):
  """Summed over rounds, the published updates equal the outer steps' changes up to E_R."""
  _, root, _, _ = downlink_run
  store = storage_lib.RunStorage(root)
  shards = [aggregator_lib.Aggregator(root, shard) for shard in (0, 1)]
  agg = shards[0]  # Reads any silo's delta leaf.
  names = sorted(n for a in shards for n in a.my_leaves)
  assert all(a.my_leaves for a in shards) and len(names) == len(agg.leaf_shapes)
  sum_u, sum_q = {}, {}
  for r in range(ROUNDS):
    manifest = store.read_manifest(r)
    base = bucket_helpers.global_params(store, r)
    published = _update(store, r + 1)
    for n in names:
      mean = sum(e['weight'] * np.asarray(agg.read_leaf(
          r, e['silo'], n, store.delta_meta(r, e['silo']), e))
                 for e in manifest['included'])
      change = (base[n] - mean.astype(np.float32)) - base[n]  # FedAvg: the step is -mean.
      sum_u[n] = sum_u.get(n, 0) + change.astype(np.float64)
      sum_q[n] = sum_q.get(n, 0) + published[n].astype(np.float64)
  residuals = {n: e for a in shards for n, e in a.read_shard(ROUNDS)[3].items()}
  for n in names:
    last = np.asarray(residuals[n], np.float64)
    assert np.abs(last).max() > 0  # int8 loses something every round...
    error = np.abs(sum_q[n] + last - sum_u[n]).max()
    assert error < 1e-3 * np.abs(last).max() + 1e-7, n  # ... and the residual holds all of it.


def _change_one_value(store, round_index):
  """Rewrites round `round_index`'s update as a valid tree with one int8 value moved by a step;
  returns the hashes of its arrays."""
  meta = next(m for m in store.global_shard_metas(round_index) if 'embed_vd' in m['leaf_hashes'])
  layout, _ = protocol.update_layout(store.read_run(), meta)
  abstract = {f'{n}/{k}': jax.ShapeDtypeStruct(tuple(s), np.dtype(d))
              for n, spec in layout.items() for k, (s, d) in spec.items()}
  arrays = {k: np.array(v) for k, v in store.read_global_update(
      round_index, meta['shard'], 2, abstract).items()}
  q = arrays['embed_vd/q'].reshape(-1)
  i = np.argmax(np.abs(q))
  q[i] -= np.sign(q[i])
  directory = store.shard_dir(round_index, meta['shard'], 2) / 'update'
  store._save_tree(directory, trees.unflatten_params(arrays))  # pylint: disable=protected-access
  return {k: storage_lib.array_hash(v) for k, v in arrays.items()}


def test_a_tampered_update_is_refused_and_nothing_is_loaded(downlink_run, tmp_path):
  config, root, _, _ = downlink_run
  copy = str(tmp_path / 'bucket')
  shutil.copytree(root, copy)
  store = storage_lib.RunStorage(copy)
  index = next(m['shard'] for m in store.global_shard_metas(2) if 'embed_vd' in m['leaf_hashes'])
  shard = store.shard_dir(2, index, 2)
  original = storage_lib.RunStorage(root).shard_dir(2, index, 2) / 'update'
  original_meta = (shard / storage_lib.META).read_bytes()
  silo = silo_lib._Silo(config.copy_and_resolve_references(), 'a', copy, str(tmp_path / 'a'),
                        None)  # pylint: disable=protected-access
  try:
    state = silo.load_global(1, silo.trainer.init_state())  # Full read: nothing held yet.
    held, before = silo.last_global, silo.round_io.bytes_down

    def refused(why):
      with pytest.raises(storage_lib.StorageError) as error:
        silo.load_global(2, state)
      line = str(error.value)
      assert '\n' not in line and line.startswith(f'global round 2 shard {index} under'), line
      assert why in line and 'tampered with; nothing was loaded. Fix:' in line, line
      assert silo.last_global is held and silo.round_io.bytes_down == before

    forged = _change_one_value(store, 2)  # A valid tree, one value off: its hash says so.
    refused('update array embed_vd/q does not match its committed hash')
    meta = json.loads(original_meta)  # An unsigned run's meta rewritten to vouch for it.
    meta['update_hashes'] = forged
    store.write_json(shard / storage_lib.META, meta)
    refused('parameter embed_vd rebuilt from the previous round and the update does not match')
    shutil.rmtree(shard / 'update')  # Back to the original, then one bit in every data object.
    shutil.copytree(original, shard / 'update')
    (shard / storage_lib.META).write_bytes(original_meta)
    for victim in bucket_helpers.files(shard / 'update'):
      if '/d/' in str(victim):
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
    refused('its update is unreadable')
    shutil.rmtree(shard / 'update')  # Restored: the update path loads it, and reads only it.
    shutil.copytree(original, shard / 'update')
    silo.load_global(2, state)
    assert silo.last_global[0] == 2
    assert silo.round_io.bytes_down - before == sum(
        m['update_bytes'] for m in store.global_shard_metas(2))
  finally:
    silo.close()


def test_the_ledger_and_the_plan_count_the_update_as_the_download(downlink_run):
  config, root, _, _ = downlink_run
  store = storage_lib.RunStorage(root)
  update_bytes = sum(m['update_bytes'] for m in store.global_shard_metas(1))
  model_bytes = ledger.global_nbytes(store, ROUNDS)
  assert planning.plan(config, 8)['delta']['download_bytes'] == update_bytes  # As planned.
  rows = ledger.build_ledger(store)
  assert [row['round'] for row in rows] == list(range(ROUNDS))
  for row in rows:  # Both silos published every round, so each read only the update.
    r = row['round']
    assert row['bytes_up_by_silo'] == {s: store.delta_meta(r, s)['bytes'] for s in ('a', 'b')}
    assert row['bytes_down_by_silo'] == {'a': update_bytes, 'b': update_bytes}
    assert row['bytes_down'] == 2 * update_bytes < model_bytes / 1.5
  totals = ledger.silo_totals(rows, store.read_run())
  assert totals['a']['bytes_down'] == ROUNDS * update_bytes
  table = ledger.status(root)
  assert 'bytes up      down' in table and 'bytes up bytes down' in table
  assert 'bytes per silo and round: up (its delta) / down (global round r+1)' in table
  assert 'down: the int8 update if the silo published to round r, else the whole model' in table
  fmt = ledger._fmt_bytes  # pylint: disable=protected-access
  assert f"{fmt(rows[0]['bytes_up_by_silo']['a'])} / {fmt(update_bytes)}" in table
  info = inspection.describe_global_round(store, 1)  # inspect_checkpoint.py shows it too.
  assert info['update'] == {'compression': 'int8', 'block_size': config.federation.block_size,
                            'bytes': update_bytes, 'fragment': None}
  assert (f'downlink update: int8 (block {config.federation.block_size}), '
          f'{update_bytes / 1e6:.2f} MB') in inspection.render(info)


def test_an_unknown_downlink_format_is_one_line_naming_the_field(repo_root, tmp_path):
  proc = subprocess.run(
      [sys.executable, str(repo_root / 'scripts' / 'init_run.py'),
       f'--config={repo_root / "configs" / "tiny.py"}', f'--storage={tmp_path / "bucket"}',
       '--config.federation.downlink_compression=int3'],
      capture_output=True, text=True, timeout=120, env=child_env(), check=False)
  out = (proc.stdout + proc.stderr).strip()
  assert proc.returncode == 2, out
  assert out.splitlines() == [
      "error: config field 'federation.downlink_compression': unknown format 'int3'. Fix: use "
      "one of ('none', 'bf16', 'int8', 'int4', 'int2') (none: silos download the fp32 model)."], out
  assert not (tmp_path / 'bucket').exists()
