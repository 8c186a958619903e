"""Resume and integrity: what the bucket and a silo's own state may never silently lose."""
import jax.numpy as jnp
import pytest

from fedpt import aggregator as aggregator_lib
from fedpt import silo as silo_lib
from fedpt import storage as storage_lib
from fedpt import trainer as trainer_lib


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
