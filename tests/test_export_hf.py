"""Hugging Face export: transformers' Llama reproduces fedpt's logits and tokenizer ids."""
import json
import os
import stat
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import bucket_helpers
from fedpt import aggregator as aggregator_lib
from fedpt import checkpoint as checkpoint_lib
from fedpt import data as data_lib
from fedpt import export_hf
from fedpt import model as model_lib
from fedpt import storage as storage_lib
from fedpt import trainer as trainer_lib
from fedpt import trees

TOLERANCE = 1e-4


def _model_config(tie_embeddings, n_kv_heads):
  # A wide init so that logits (and any layout mistake) are far from zero.
  return model_lib.ModelConfig(vocab_size=4160, d_model=64, n_layers=2, n_heads=4,
                               n_kv_heads=n_kv_heads, head_dim=16, d_ff=96,
                               tie_embeddings=tie_embeddings, init_std=0.2, rope_theta=500.0)


def _tokens(vocab_size, shape=(2, 48), seed=0):
  return np.random.default_rng(seed).integers(0, vocab_size, shape)


def _hf_logits(out_dir, tokens):
  hf = transformers.LlamaForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()
  with torch.no_grad():
    return hf(torch.tensor(tokens)).logits.numpy()


def _fedpt_logits(cfg, flat_params, tokens):
  model = nnx.eval_shape(lambda: model_lib.Transformer(cfg, nnx.Rngs(0)))
  nnx.update(model, trees.unflatten_params(flat_params))
  return np.asarray(model(jnp.asarray(tokens)))


def _write(cfg, flat, out_dir, seq_len=64):
  tok_path = data_lib.default_tokenizer_path()
  tok = data_lib.load_tokenizer(tok_path)
  export_hf.write_hf(
      str(out_dir), export_hf.to_hf_state_dict(flat, cfg),
      export_hf.hf_config(cfg, bos_id=tok.bos_id(), eos_id=tok.eos_id(), pad_id=tok.pad_id(),
                          max_position_embeddings=seq_len),
      tok_path, export_hf.tokenizer_config(
          bos=tok.id_to_piece(tok.bos_id()), eos=tok.id_to_piece(tok.eos_id()),
          unk=tok.id_to_piece(tok.unk_id()), pad=tok.id_to_piece(tok.pad_id()),
          model_max_length=seq_len))


@pytest.mark.parametrize('tie_embeddings', [True, False], ids=['tied', 'untied'])
@pytest.mark.parametrize('n_kv_heads', [2, 4], ids=['gqa', 'mha'])
def test_llama_logits_match_fedpt(tmp_path, tie_embeddings, n_kv_heads):
  cfg = _model_config(tie_embeddings, n_kv_heads)
  model = model_lib.Transformer(cfg, nnx.Rngs(1))
  flat = trees.flatten_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  _write(cfg, flat, tmp_path / 'hf')
  tokens = _tokens(cfg.vocab_size)
  want = np.asarray(model(jnp.asarray(tokens)))
  got = _hf_logits(tmp_path / 'hf', tokens)
  assert np.abs(want).max() > 1.0  # Not a trivially small comparison.
  np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=0)
  names = set(export_hf.to_hf_state_dict(flat, cfg))
  assert ('lm_head.weight' in names) != tie_embeddings


def test_llama_tokenizer_gives_fedpt_ids(tmp_path):
  cfg = _model_config(True, 2)
  model = model_lib.Transformer(cfg, nnx.Rngs(1))
  _write(cfg, trees.flatten_params(nnx.to_pure_dict(nnx.state(model, nnx.Param))), tmp_path)
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  tok = data_lib.load_tokenizer(data_lib.default_tokenizer_path())
  texts = data_lib.stdlib_documents('all')[:20] + [
      '  leading spaces\n\ttabs, digits 12345, unicode h\u00e9llo \u6f22\u5b57 \U0001F600 ']
  for text in texts:
    ids = tok.encode(text)
    assert hf_tok.encode(text) == ids, text[:80]
    assert hf_tok.decode(ids) == text
  assert hf_tok.eos_token_id == tok.eos_id() and hf_tok.bos_token_id == tok.bos_id()


def _run(repo_root, *args):
  proc = subprocess.run([sys.executable, str(repo_root / 'scripts' / 'export_hf.py'),
                         *map(str, args)], capture_output=True, text=True, timeout=120)
  return proc.returncode, proc.stdout + proc.stderr


def test_cli_exports_a_trained_workdir(tiny_config, tmp_path, repo_root):
  tiny_config.train.update(steps=3, checkpoint_every=3, log_every=3, eval_every=1000,
                           async_checkpoints=False)
  workdir = tmp_path / 'work'
  summary = trainer_lib.train_and_evaluate(tiny_config, str(workdir))
  flat = trees.flatten_params(summary['state']['params'])
  out = tmp_path / 'hf'
  code, log = _run(repo_root, f'--workdir={workdir}', f'--out={out}')  # Its config.json says all.
  assert code == 0, log
  config_json = json.loads((out / 'config.json').read_text())
  assert config_json['num_key_value_heads'] == 2 and config_json['tie_word_embeddings']
  assert config_json['max_position_embeddings'] == tiny_config.data.seq_len
  cfg = model_lib.ModelConfig.from_config(tiny_config.model, 'cpu')
  tokens = _tokens(cfg.vocab_size, (2, tiny_config.data.seq_len))
  diff = np.abs(_hf_logits(out, tokens) - _fedpt_logits(cfg, flat, tokens)).max()
  assert diff < TOLERANCE

  with pytest.raises(export_hf.ExportError, match='not an empty folder'):
    export_hf.export(tiny_config, str(out), workdir=str(workdir))
  tiny_config.model.d_model = 32
  with pytest.raises(checkpoint_lib.CheckpointError, match='model_spec'):
    export_hf.export(tiny_config, str(tmp_path / 'other'), workdir=str(workdir))


def test_cli_exports_a_federated_round_and_explains_a_bad_round(tiny_config, tmp_path,
                                                                  repo_root):
  root = tmp_path / 'bucket'
  aggregator_lib.init_run(tiny_config, str(root))
  out = tmp_path / 'hf'
  summary = export_hf.export(tiny_config, str(out), storage=str(root), round_index=0)
  assert summary['parameters'] == model_lib.param_count(
      model_lib.ModelConfig.from_config(tiny_config.model, 'cpu'))
  assert (out / 'model.safetensors').exists() and (out / 'tokenizer.model').exists()

  code, log = _run(repo_root, f'--config={repo_root / "configs" / "tiny.py"}', f'--storage={root}',
                   '--round=7', f'--out={tmp_path / "x"}',
                   f'--config.data.corpus={tiny_config.data.corpus}')
  errors = [line for line in log.splitlines() if line.startswith('error:')]
  assert code == 2 and len(errors) == 1 and 'Traceback' not in log, log
  assert 'round 7 is not committed' in errors[0] and '--round=0' in errors[0], log
  assert not (tmp_path / 'x').exists()


def test_export_defaults_to_the_newest_round_writes_shareable_files_and_names_the_extra(
    tiny_config, tmp_path, repo_root):
  fed = tiny_config.federation
  fed.update(silos=('a', 'b'), rounds=2, inner_steps=1)
  root = str(tmp_path / 'bucket')
  run = aggregator_lib.init_run(tiny_config, root)
  store = storage_lib.RunStorage(root)
  for silo in ('a', 'b'):
    store.publish_delta(0, silo, *bucket_helpers.fake_delta(store, run, 0, silo, fed, 0.01))
  aggregator_lib.run_aggregator(root, stop_after_rounds=1)
  assert store.latest_global_round() == 1

  out = tmp_path / 'hf'
  code, log = _run(repo_root, f'--storage={root}', f'--out={out}')  # No --round, no --config.
  assert code == 0 and 'global round 1' in log, log
  flat = bucket_helpers.global_params(store, 1)
  cfg = model_lib.ModelConfig.from_config(tiny_config.model, 'cpu')
  tokens = _tokens(cfg.vocab_size, (1, 16))
  assert np.abs(_hf_logits(out, tokens) - _fedpt_logits(cfg, flat, tokens)).max() < TOLERANCE
  umask = os.umask(0o022)
  os.umask(umask)
  modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
  assert 'model.safetensors' in modes and 'tokenizer.model' in modes
  assert set(modes.values()) == {0o666 & ~umask}, modes  # Not safetensors' 0600.

  # Without the hf extra (safetensors cannot be imported): one line with the install command.
  blocked = (f"import runpy, sys; sys.modules['safetensors'] = None; "
             f"sys.argv = ['export_hf.py', '--storage={root}', '--out={tmp_path / 'y'}']; "
             f"runpy.run_path({str(repo_root / 'scripts' / 'export_hf.py')!r}, "
             "run_name='__main__')")
  done = subprocess.run([sys.executable, '-c', blocked], capture_output=True, text=True,
                        timeout=120, check=False)
  assert done.returncode == 2, done.stderr
  assert done.stderr.strip() == (
      "error: exporting to Hugging Face needs the hf extra (import of safetensors halted; None "
      "in sys.modules). Fix: run python3 -m pip install -e '.[hf]' in the fedpt checkout, "
      'then rerun'), done.stderr
  assert not (tmp_path / 'y').exists()
