"""Resume and integrity: what the bucket and a silo's own state may never silently lose."""
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

import bucket_helpers
from fedpt import aggregator as aggregator_lib
from fedpt import silo as silo_lib
from fedpt import storage as storage_lib
from fedpt import trainer as trainer_lib
from fedpt import trees


@pytest.fixture
def fed_config(tiny_config):
  tiny_config.train.async_checkpoints = False
  tiny_config.data.update(global_batch=8, seq_len=32)
  tiny_config.train.eval_batches = 1
  tiny_config.federation.update(rounds=2, inner_steps=2, silos=('a', 'b'), poll_s=0.05,
                                wait_timeout_s=60.0)
  return tiny_config


def test_a_silo_refuses_to_publish_a_non_finite_model(fed_config, tmp_path, monkeypatch):
  """NaN in a leaf the loss never touches (an unused embedding row) is still refused."""
  fed_config.model.update(vocab_size=4160, tie_embeddings=False)  # Rows >= 4096 are unused.
  root = str(tmp_path / 'bucket')
  aggregator_lib.init_run(fed_config, root)
  real_step = trainer_lib.Trainer.train_step

  def poisoned_step(self, state, batch):
    state, metrics = real_step(self, state, batch)
    params = dict(state['params'])
    params['embed_vd'] = params['embed_vd'].at[4100, 3].set(jnp.nan)
    return {**state, 'params': params}, metrics
  monkeypatch.setattr(trainer_lib.Trainer, 'train_step', poisoned_step)
  with pytest.raises(trainer_lib.TrainingDivergedError,
                     match=r"round 0: the local model has NaN or Inf in \['embed_vd'\].*Fix"):
    silo_lib.run_silo(fed_config, 'a', root, str(tmp_path / 'a'))
  assert storage_lib.RunStorage(root).committed_silos(0) == []


def _bucket_files(root):
  return {str(p): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in pathlib.Path(root).rglob('*') if p.is_file()}


def _run_rounds(config, root, rounds, gc):
  """Rounds of fake deltas, each aggregated by a fresh process per shard (a restart each time)."""
  fed = config.federation
  fed.update(keep_last_rounds=2 if gc else 100, keep_every_rounds=0)
  run = aggregator_lib.init_run(config, root)
  store = storage_lib.RunStorage(root)
  for r in range(rounds):
    for s, scale in (('a', 0.01), ('b', 0.03)):
      store.publish_delta(r, s, *bucket_helpers.fake_delta(store, run, r, s, fed, scale * (r + 1)))
    for shard in range(fed.num_shards):
      assert aggregator_lib.Aggregator(root, shard).next_round() == r
      aggregator_lib.run_aggregator(root, shard, stop_after_rounds=1)
  return store


def test_a_restarted_aggregator_resumes_after_garbage_collection(fed_config, tmp_path):
  fed_config.federation.update(rounds=5, num_shards=2)
  store = _run_rounds(fed_config, str(tmp_path / 'gc'), 5, gc=True)
  # Rounds 0..2 were collected before rounds 3 and 4 were aggregated by restarted processes.
  assert store.global_round_dirs() == [4, 5]
  reference = _run_rounds(fed_config, str(tmp_path / 'kept'), 5, gc=False)
  assert reference.global_round_dirs() == [0, 1, 2, 3, 4, 5]
  assert store.global_hash(5) == reference.global_hash(5)  # Bit-identical to no collection.

  # A finished run: every shard says so, exits cleanly, and writes nothing (not even a lease).
  before = _bucket_files(tmp_path / 'gc')
  for shard in range(2):
    assert aggregator_lib.run_aggregator(str(tmp_path / 'gc'), shard) == {
        'round': 5, 'finished': True}
  assert silo_lib.run_silo(fed_config, 'a', str(tmp_path / 'gc'),
                           str(tmp_path / 'late_silo'))['finished']
  assert _bucket_files(tmp_path / 'gc') == before
  assert not (tmp_path / 'late_silo' / 'checkpoints').exists() or not any(
      (tmp_path / 'late_silo' / 'checkpoints').iterdir())


@pytest.mark.parametrize('item', ['params', 'outer_state'])
def test_the_aggregator_refuses_its_own_tampered_output(fed_config, tmp_path, item):
  """A valid Orbax tree with one value off by 1e-3, meta.json untouched: nothing is built on it."""
  fed_config.outer.optimizer = 'diloco'  # Momentum: the outer state is not all zeros.
  fed_config.federation.update(rounds=4)
  root = str(tmp_path / 'bucket')
  store = _run_rounds(fed_config, root, 2, gc=False)
  run = store.read_run()
  for s in ('a', 'b'):
    store.publish_delta(2, s, *bucket_helpers.fake_delta(store, run, 2, s,
                                                         fed_config.federation, 0.02))
  agg = aggregator_lib.Aggregator(root)
  params, state = agg.read_shard(2)
  arrays = params if item == 'params' else aggregator_lib.state_to_arrays(state)
  name = sorted(arrays)[-1]
  arrays = {n: np.asarray(v) + (1e-3 if n == name else 0.0) for n, v in arrays.items()}
  store._save_tree(store.shard_dir(2, 0, 1) / item, trees.unflatten_params(arrays))  # pylint: disable=protected-access
  what = 'parameter' if item == 'params' else 'outer-optimizer state'
  with pytest.raises(storage_lib.StorageError,
                     match=f'global round 2 shard 0 .*{what} {name} does not match its committed '
                     'hash.*tampered.*Fix'):
    aggregator_lib.run_aggregator(root, stop_after_rounds=1)
  assert store.read_manifest(2) is None and store.latest_global_round() == 2
