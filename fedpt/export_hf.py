"""Exports a fedpt model as a Hugging Face Llama checkpoint (safetensors + config + tokenizer).

fedpt's Transformer is architecturally a Llama: RMSNorm, SwiGLU, GQA and RoPE in
the rotate-half layout with the same inverse frequencies, so q/k need no row
permutation; only the layer stack is unstacked and weights are transposed to
torch's [out, in]. `to_hf_state_dict` and `hf_config` are pure; `write_hf` does
the I/O, and the source is read by the one model loader (`loading.py`).
"""
import json
import os
import shutil
import stat

import jax
import numpy as np

from fedpt import checkpoint as checkpoint_lib
from fedpt import data as data_lib
from fedpt import loading
from fedpt import model as model_lib
from fedpt import trees


class ExportError(checkpoint_lib.CheckpointError):
  """A source or destination that cannot be exported; a CheckpointError so CLIs print one line."""


# fedpt name (without the 'blocks/' prefix) -> (HF name in layer i, reshape to torch [out, in]).
def _layer_weights(cfg: model_lib.ModelConfig):
  d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  return {
      'attn/q_weight_dnh': ('self_attn.q_proj.weight', lambda w: w.reshape(d, n * h).T),
      'attn/k_weight_dkh': ('self_attn.k_proj.weight', lambda w: w.reshape(d, k * h).T),
      'attn/v_weight_dkh': ('self_attn.v_proj.weight', lambda w: w.reshape(d, k * h).T),
      'attn/o_weight_nhd': ('self_attn.o_proj.weight', lambda w: w.reshape(n * h, d).T),
      'mlp/gate_weight_df': ('mlp.gate_proj.weight', lambda w: w.T),
      'mlp/up_weight_df': ('mlp.up_proj.weight', lambda w: w.T),
      'mlp/down_weight_fd': ('mlp.down_proj.weight', lambda w: w.T),
      'attn_norm/scale': ('input_layernorm.weight', lambda w: w),
      'mlp_norm/scale': ('post_attention_layernorm.weight', lambda w: w),
  }


def to_hf_state_dict(flat_params: dict, cfg: model_lib.ModelConfig) -> dict[str, np.ndarray]:
  """`flatten_params` names -> LlamaForCausalLM state dict (contiguous numpy, param dtype)."""
  expected = {'embed_vd', 'final_norm/scale'} | {f'blocks/{n}' for n in _layer_weights(cfg)}
  if not cfg.tie_embeddings:
    expected.add('unembed_dv')
  if set(flat_params) != expected:
    raise ExportError(
        f'params do not match the model config: missing {sorted(expected - set(flat_params))}, '
        f'unexpected {sorted(set(flat_params) - expected)}. Fix: export with the config that '
        'trained them')
  arrays = {name: np.asarray(jax.device_get(x)) for name, x in flat_params.items()}
  out = {'model.embed_tokens.weight': arrays['embed_vd'],
         'model.norm.weight': arrays['final_norm/scale']}
  for name, (hf_name, to_torch) in _layer_weights(cfg).items():
    stacked = arrays[f'blocks/{name}']
    for i in range(cfg.n_layers):
      out[f'model.layers.{i}.{hf_name}'] = to_torch(stacked[i])
  if not cfg.tie_embeddings:
    out['lm_head.weight'] = arrays['unembed_dv'].T
  return {name: np.ascontiguousarray(x) for name, x in out.items()}


def hf_config(cfg: model_lib.ModelConfig, *, bos_id: int, eos_id: int, pad_id: int,
              max_position_embeddings: int) -> dict:
  """The LlamaConfig (config.json) of the same architecture."""
  return {
      'architectures': ['LlamaForCausalLM'],
      'model_type': 'llama',
      'vocab_size': cfg.vocab_size,
      'hidden_size': cfg.d_model,
      'intermediate_size': cfg.d_ff,
      'num_hidden_layers': cfg.n_layers,
      'num_attention_heads': cfg.n_heads,
      'num_key_value_heads': cfg.n_kv_heads,
      'head_dim': cfg.head_dim,
      'hidden_act': 'silu',
      'rms_norm_eps': cfg.norm_eps,
      'rope_theta': cfg.rope_theta,
      'rope_scaling': None,
      'max_position_embeddings': max_position_embeddings,
      'attention_bias': False,
      'mlp_bias': False,
      'attention_dropout': 0.0,
      'initializer_range': cfg.init_std,
      'tie_word_embeddings': cfg.tie_embeddings,
      'bos_token_id': bos_id,
      'eos_token_id': eos_id,
      'pad_token_id': pad_id,
      'torch_dtype': cfg.param_dtype,
      'use_cache': True,
  }


def tokenizer_config(*, bos: str, eos: str, unk: str, pad: str, model_max_length: int) -> dict:
  """LlamaTokenizer settings that reproduce fedpt's ids: no BOS/EOS added, no dummy prefix."""
  return {
      'tokenizer_class': 'LlamaTokenizer',
      'bos_token': bos, 'eos_token': eos, 'unk_token': unk, 'pad_token': pad,
      'add_bos_token': False, 'add_eos_token': False,
      # legacy=True hands text to SentencePiece unchanged (fedpt's tokenizer has no dummy prefix).
      'legacy': True, 'add_prefix_space': False,
      'clean_up_tokenization_spaces': False,
      'model_max_length': model_max_length,
  }


def _safetensors():
  """safetensors.numpy, or an ExportError naming the install command (the `hf` extra)."""
  try:
    from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ExportError(f'exporting to Hugging Face needs the hf extra ({e}). Fix: run '
                      "python3 -m pip install -e '.[hf]' in the fedpt checkout, then rerun"
                      ) from None
  return safetensors_numpy


def write_hf(out_dir: str, state_dict: dict, config_json: dict, tokenizer_path: str,
             tokenizer_json: dict) -> None:
  """Writes model.safetensors, config.json, tokenizer.model and tokenizer_config.json.

  Every file gets the umask's usual mode (e.g. 0644): the export is meant to be shared.
  """
  safetensors_numpy = _safetensors()
  os.makedirs(out_dir, exist_ok=True)
  weights = os.path.join(out_dir, 'model.safetensors')
  safetensors_numpy.save_file(state_dict, weights, metadata={'format': 'pt'})
  shutil.copyfile(tokenizer_path, os.path.join(out_dir, 'tokenizer.model'))
  for name, obj in (('config.json', config_json), ('tokenizer_config.json', tokenizer_json),
                    ('special_tokens_map.json', {k: tokenizer_json[k] for k in (
                        'bos_token', 'eos_token', 'unk_token', 'pad_token')}),
                    ('generation_config.json', {
                        'bos_token_id': config_json['bos_token_id'],
                        'eos_token_id': config_json['eos_token_id'],
                        'pad_token_id': config_json['pad_token_id']})):
    with open(os.path.join(out_dir, name), 'w') as f:
      json.dump(obj, f, indent=2)
      f.write('\n')
  # safetensors writes 0600; a new file's usual mode (0666 less the umask) is config.json's.
  os.chmod(weights, stat.S_IMODE(os.stat(os.path.join(out_dir, 'config.json')).st_mode))


# -- sources ------------------------------------------------------------------


def export(config, out_dir: str, *, workdir: str | None = None, step: int | None = None,
           storage: str | None = None, round_index: int | None = None) -> dict:
  """Exports a workdir's checkpoint or a federated round (`loading.Source`) to `out_dir`.

  Returns {'out', 'parameters', 'source'}.
  """
  source = loading.Source(workdir=workdir, step=step, storage=storage, round_index=round_index)
  _safetensors()  # Before the model is read: a missing extra is one line, not a late traceback.
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
    raise ExportError(f'--out={out_dir} exists and is not an empty folder. Fix: pass a new '
                      'folder; an export never overwrites')
  loaded = loading.load(config, source)
  model_config, tok_path = loaded.model_config, loaded.tokenizer_path
  flat = trees.flatten_params(loaded.params)
  tokenizer = data_lib.load_tokenizer(tok_path)
  if tokenizer.get_piece_size() > model_config.vocab_size:
    raise ExportError(f'the tokenizer has {tokenizer.get_piece_size()} pieces but the model '
                      f'only {model_config.vocab_size}. Fix: pass the run\'s tokenizer')
  ids = {name: getattr(tokenizer, f'{name}_id')() for name in ('bos', 'eos', 'unk', 'pad')}
  config_json = hf_config(model_config, bos_id=ids['bos'], eos_id=ids['eos'],
                          pad_id=ids['pad'], max_position_embeddings=config.data.seq_len)
  tokenizer_json = tokenizer_config(
      **{name: tokenizer.id_to_piece(i) for name, i in ids.items()},
      model_max_length=config.data.seq_len)
  write_hf(out_dir, to_hf_state_dict(flat, model_config), config_json, tok_path, tokenizer_json)
  return {'out': out_dir, 'parameters': int(sum(np.size(x) for x in flat.values())),
          'source': loaded.source}
