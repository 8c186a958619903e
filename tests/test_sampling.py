"""KV-cached sampling: exact against the uncached forward, deterministic, and its CLI."""
import functools
import importlib.util
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import conftest
from fedpt import checkpoint as checkpoint_lib
from fedpt import config as config_lib
from fedpt import data as data_lib
from fedpt import loading
from fedpt import model as model_lib
from fedpt import protocol
from fedpt import sampling
from fedpt import storage as storage_lib
from fedpt import trainer as trainer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT_BP = jnp.array([[3, 5, 7, 9, 11], [3, 1, 2, 4, 8]], jnp.int32)


@functools.cache
def _model(tie_embeddings=True, n_kv_heads=2):
  """(config, jitted uncached forward, params); a large init_std makes samples seed-dependent."""
  cfg = model_lib.ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4,
                              n_kv_heads=n_kv_heads, head_dim=16, d_ff=96,
                              tie_embeddings=tie_embeddings, init_std=0.2)
  graphdef, state = nnx.split(model_lib.Transformer(cfg, nnx.Rngs(0)))
  forward = jax.jit(lambda tokens_bt: nnx.merge(graphdef, state)(tokens_bt))
  return cfg, forward, nnx.to_pure_dict(nnx.state(nnx.merge(graphdef, state), nnx.Param))


@pytest.mark.parametrize('n_kv_heads', [2, 4])  # GQA and MHA.
@pytest.mark.parametrize('tie_embeddings', [True, False])
def test_cached_logits_match_full_forward(tie_embeddings, n_kv_heads):
  cfg, model, params = _model(tie_embeddings, n_kv_heads)
  out = sampling.generate(params, PROMPT_BP, jax.random.key(0), cfg=cfg, max_new_tokens=6,
                          temperature=1.0, return_logits=True)
  full_logits = model(jnp.concatenate([PROMPT_BP, out['tokens']], axis=1))
  prompt_len = PROMPT_BP.shape[1]
  np.testing.assert_allclose(out['prompt_logits'], full_logits[:, :prompt_len], atol=1e-5)
  np.testing.assert_allclose(out['logits'], full_logits[:, prompt_len - 1:-1], atol=1e-5)


def test_greedy_is_argmax_of_full_forward_step_by_step():
  cfg, model, params = _model()
  out = sampling.generate(params, PROMPT_BP, jax.random.key(0), cfg=cfg, max_new_tokens=6)
  # Every generated token is the argmax of the uncached forward over all tokens before it.
  full_logits = model(jnp.concatenate([PROMPT_BP, out['tokens']], axis=1))
  np.testing.assert_array_equal(
      out['tokens'], jnp.argmax(full_logits[:, PROMPT_BP.shape[1] - 1:-1], axis=-1))
  np.testing.assert_array_equal(out['lengths'], [6, 6])


def test_seed_fixes_the_samples():
  cfg, _, params = _model()
  def draw(seed):
    return sampling.generate(params, PROMPT_BP, jax.random.key(seed), cfg=cfg,
                             max_new_tokens=16, temperature=1.0, top_p=0.95)['tokens']
  np.testing.assert_array_equal(draw(1), draw(1))
  assert not np.array_equal(draw(1), draw(2))


def test_top_k_one_is_greedy():
  cfg, _, params = _model()
  greedy = sampling.generate(params, PROMPT_BP, jax.random.key(0), cfg=cfg, max_new_tokens=8)
  top1 = sampling.generate(params, PROMPT_BP, jax.random.key(7), cfg=cfg, max_new_tokens=8,
                           temperature=1.5, top_k=1)
  np.testing.assert_array_equal(greedy['tokens'], top1['tokens'])


def test_stops_at_eos_and_pads():
  cfg, _, params = _model()
  greedy = sampling.generate(params, PROMPT_BP, jax.random.key(0), cfg=cfg, max_new_tokens=6)
  eos = int(greedy['tokens'][0, 2])  # Pretend row 0's third token is EOS.
  out = sampling.generate(params, PROMPT_BP, jax.random.key(0), cfg=cfg, max_new_tokens=6,
                          eos_id=eos, pad_id=0)
  first_eos = [list(row).index(eos) if eos in row else 6 for row in greedy['tokens'].tolist()]
  for row, stop in enumerate(first_eos):
    length = min(stop + 1, 6)
    assert int(out['lengths'][row]) == length
    np.testing.assert_array_equal(out['tokens'][row, :length], greedy['tokens'][row, :length])
    assert not np.any(out['tokens'][row, length:])


@pytest.mark.parametrize('p, kept', [(0.3, [0]), (0.5, [0]), (0.75, [0, 1]), (0.85, [0, 1, 2]),
                                     (0.97, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3])])
def test_top_p_keeps_the_smallest_set_reaching_p(p, kept):
  probs = np.array([[0.15, 0.5, 0.05, 0.3]])  # In order of likelihood: 1, 3, 0, 2.
  by_rank = [1, 3, 0, 2]
  filtered = sampling.top_p_filter(jnp.log(jnp.asarray(probs)), p)
  assert sorted(np.flatnonzero(np.isfinite(filtered[0]))) == sorted(by_rank[i] for i in kept)


def test_top_k_filter():
  logits = jnp.array([[0.1, 3.0, -1.0, 2.0]])
  assert np.isfinite(sampling.top_k_filter(logits, 2)[0]).tolist() == [False, True, False, True]
  np.testing.assert_array_equal(sampling.top_k_filter(logits, 0), logits)


# ------------------------------------------------------------------------ the CLI


def _tiny_config(corpus_dir):
  spec = importlib.util.spec_from_file_location('tiny_config', os.path.join(REPO, 'configs',
                                                                             'tiny.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.update(corpus=corpus_dir, global_batch=8, seq_len=32)
  config.train.update(steps=1, log_every=1, eval_every=1, eval_batches=1, checkpoint_every=1,
                      async_checkpoints=False)
  return config


@pytest.fixture(scope='module')
def trained_workdir(corpus_dir, tmp_path_factory):
  """A tiny run trained for one step; its checkpoint is what the CLI samples."""
  config = _tiny_config(corpus_dir)
  workdir = str(tmp_path_factory.mktemp('sampling') / 'run')
  trainer_lib.train_and_evaluate(config, workdir)
  return config, workdir


def _sample_cli(*args):
  env = conftest.child_env()
  env['JAX_PLATFORMS'] = 'cpu'
  return subprocess.run([sys.executable, os.path.join(REPO, 'scripts', 'sample.py'), *args],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def test_cli_prints_samples_and_refuses_bad_sources(trained_workdir, tmp_path):
  _, workdir = trained_workdir
  ok = _sample_cli(f'--workdir={workdir}', '--prompt=import os', '--max_new_tokens=8',
                   '--temperature=1.0', '--num_samples=2')  # No --config: the workdir's.
  assert ok.returncode == 0, ok.stderr
  assert ok.stdout.count('import os') == 2 and '--- sample 1 ---' in ok.stdout

  bad_workdir = _sample_cli(f'--workdir={tmp_path / "missing"}')
  assert bad_workdir.returncode == 2
  assert bad_workdir.stderr.startswith('error: ') and 'Fix:' in bad_workdir.stderr
  assert 'no checkpoint in --workdir' in bad_workdir.stderr
  assert 'Traceback' not in bad_workdir.stderr and len(bad_workdir.stderr.splitlines()) == 1

  bad_round = _sample_cli(f'--config={os.path.join(REPO, "configs", "tiny.py")}',
                          f'--storage={tmp_path / "no_run"}', '--round=3')
  assert bad_round.returncode == 2
  assert 'Traceback' not in bad_round.stderr and len(bad_round.stderr.splitlines()) == 1
  assert not (tmp_path / 'missing').exists()


def test_a_workdir_gives_the_tools_its_config(trained_workdir, tmp_path):
  """--config is optional; typed fields may change how a model is used, never the model."""
  config, workdir = trained_workdir
  assert config_lib.flat(loading.source_config(workdir=workdir)) == config_lib.flat(config)
  from_file = _tiny_config(config.data.corpus)  # As --config=configs/tiny.py would give it,
  from_file.data.global_batch = 16  # with a default that differs from the record.
  from_file.model.d_model, from_file.train.eval_batches, from_file.data.seq_len = 32, 3, 16
  with pytest.raises(config_lib.RecordedConfigError) as err:
    loading.source_config(from_file, {'model.d_model', 'train.eval_batches'}, workdir=workdir)
  assert 'model.d_model=32 (yours) vs 64 (recorded)' in str(err.value), err.value
  assert f'{workdir}/config.json' in str(err.value) and 'eval_batches' not in str(err.value)
  used = loading.source_config(from_file, {'train.eval_batches', 'data.seq_len'},
                               workdir=workdir)
  assert (used.train.eval_batches, used.data.seq_len) == (3, 16)  # Typed: how it is used.
  assert (used.model.d_model, used.data.global_batch) == (64, 8)  # Untyped: the record's.
  assert sampling.sample_text(used, 'x', workdir=workdir, max_new_tokens=2)[0].startswith('x')

  older = tmp_path / 'older'  # A workdir of an older fedpt: no config.json, --config needed.
  shutil.copytree(workdir, older)
  (older / 'config.json').unlink()
  with pytest.raises(config_lib.RecordedConfigError, match='--config is required.*Fix'):
    loading.source_config(workdir=str(older))
  assert loading.source_config(from_file, {'model.d_model'}, workdir=str(older)) is from_file


def test_refuses_another_model_or_an_uncommitted_round(trained_workdir, tmp_path):
  config, workdir = trained_workdir
  config = _tiny_config(config.data.corpus)
  config.model.d_model = 32
  with pytest.raises(checkpoint_lib.CheckpointError, match='d_model'):
    sampling.sample_text(config, 'x', workdir=workdir)
  config.model.d_model = 64
  assert sampling.sample_text(config, 'x', workdir=workdir, max_new_tokens=2)[0].startswith('x')

  tokenizer_sha256 = data_lib.file_sha256(data_lib.default_tokenizer_path())
  store = storage_lib.RunStorage(str(tmp_path / 'fed'))
  store.create_run(protocol.run_record(config, tokenizer_sha256, 'run-1'))
  with pytest.raises(storage_lib.StorageError, match='round 3 is not committed.*Fix'):
    sampling.sample_text(config, 'x', storage=str(tmp_path / 'fed'), round_index=3)
  with pytest.raises(protocol.RunMismatchError, match='tokenizer'):
    bad = dict(protocol.run_record(config, 'f' * 64, 'run-2'))
    other = storage_lib.RunStorage(str(tmp_path / 'fed2'))
    other.create_run(bad)
    sampling.sample_text(config, 'x', storage=str(tmp_path / 'fed2'), round_index=0)
