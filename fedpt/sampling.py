"""Autoregressive sampling with a KV cache, on the pure param dict of `model.Transformer`.

The cached forward repeats the training forward's math (RMSNorm, RoPE, GQA,
SwiGLU, tied or untied unembedding) on `nnx.to_pure_dict` params, so any
checkpoint or federated global round can be sampled without rebuilding the
NNX module, and the training path stays untouched. The prompt is prefilled in
one call; then one token per `lax.while_loop` step until `max_new_tokens` or
every sample has emitted EOS.
"""
import functools
import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from fedpt import checkpoint as checkpoint_lib
from fedpt import config as config_lib
from fedpt import data as data_lib
from fedpt import inner
from fedpt import model as model_lib
from fedpt import outer
from fedpt import silo as silo_lib
from fedpt import storage as storage_lib


def _rms_norm(x, scale, eps: float):
  """model.RMSNorm on a bare scale vector."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def init_cache(cfg: model_lib.ModelConfig, batch: int, max_len: int) -> dict:
  """Keys (after RoPE) and values of every layer: [layers, batch, max_len, kv_heads, head_dim]."""
  shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
  dtype = jnp.dtype(cfg.compute_dtype)
  return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}


def forward_cached(params, cfg: model_lib.ModelConfig, tokens_bt, cache: dict, start):
  """Logits of `tokens_bt` at positions start.. given the cached earlier positions.

  Returns (float32 logits [batch, length, vocab], the cache with these positions written).
  """
  dtype = jnp.dtype(cfg.compute_dtype)
  batch, length = tokens_bt.shape
  max_len = cache['k'].shape[2]
  positions_t = start + jnp.arange(length)
  positions_bt = jnp.broadcast_to(positions_t, (batch, length))
  # Each query sees the cached keys at or before its own position; later slots are empty.
  mask_11ts = (jnp.arange(max_len)[None, :] <= positions_t[:, None])[None, None]
  x_btd = jnp.take(params['embed_vd'], tokens_bt, axis=0).astype(dtype)

  def layer(x_btd, inputs):
    block, k_cache, v_cache = inputs
    attn, mlp = block['attn'], block['mlp']
    h_btd = _rms_norm(x_btd, block['attn_norm']['scale'], cfg.norm_eps)
    q_btnh = jnp.einsum('btd,dnh->btnh', h_btd, attn['q_weight_dnh'].astype(dtype))
    k_btkh = jnp.einsum('btd,dkh->btkh', h_btd, attn['k_weight_dkh'].astype(dtype))
    v_btkh = jnp.einsum('btd,dkh->btkh', h_btd, attn['v_weight_dkh'].astype(dtype))
    q_btnh = model_lib.rope(q_btnh, positions_bt, cfg.rope_theta)
    k_btkh = model_lib.rope(k_btkh, positions_bt, cfg.rope_theta)
    k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k_btkh.astype(k_cache.dtype),
                                                  start, axis=1)
    v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v_btkh.astype(v_cache.dtype),
                                                  start, axis=1)
    out_btnh = jax.nn.dot_product_attention(q_btnh, k_cache, v_cache, mask=mask_11ts)
    x_btd = x_btd + jnp.einsum('btnh,nhd->btd', out_btnh, attn['o_weight_nhd'].astype(dtype))
    h_btd = _rms_norm(x_btd, block['mlp_norm']['scale'], cfg.norm_eps)
    gate_btf = jnp.einsum('btd,df->btf', h_btd, mlp['gate_weight_df'].astype(dtype))
    up_btf = jnp.einsum('btd,df->btf', h_btd, mlp['up_weight_df'].astype(dtype))
    x_btd = x_btd + jnp.einsum('btf,fd->btd', jax.nn.silu(gate_btf) * up_btf,
                               mlp['down_weight_fd'].astype(dtype))
    return x_btd, (k_cache, v_cache)

  x_btd, (k, v) = jax.lax.scan(layer, x_btd, (params['blocks'], cache['k'], cache['v']))
  x_btd = _rms_norm(x_btd, params['final_norm']['scale'], cfg.norm_eps)
  unembed_dv = params['embed_vd'].T if cfg.tie_embeddings else params['unembed_dv']
  logits_btv = jnp.einsum('btd,dv->btv', x_btd, unembed_dv.astype(dtype),
                          preferred_element_type=jnp.float32)
  return logits_btv, {'k': k, 'v': v}


# ------------------------------------------------------------------- sampling


def top_k_filter(logits_bv, k: int):
  """Logits outside the k largest become -inf; k=0 keeps all."""
  if k <= 0 or k >= logits_bv.shape[-1]:
    return logits_bv
  kth_b1 = jax.lax.top_k(logits_bv, k)[0][..., -1:]
  return jnp.where(logits_bv < kth_b1, -jnp.inf, logits_bv)


def top_p_filter(logits_bv, p: float):
  """Keeps the smallest set of most likely tokens whose probability mass is >= p (nucleus)."""
  if p >= 1.0:
    return logits_bv
  sorted_bv = jnp.sort(logits_bv, axis=-1)[..., ::-1]
  probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
  mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
  # A token is needed while the more likely ones have not reached p; the top one always is.
  threshold_b1 = jnp.min(jnp.where(mass_before_bv < p, sorted_bv, jnp.inf), axis=-1,
                         keepdims=True)
  return jnp.where(logits_bv < threshold_b1, -jnp.inf, logits_bv)


def sample_token(logits_bv, key, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0):
  """One token per row: argmax at temperature 0, else from the tempered, filtered softmax."""
  if temperature == 0.0:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  logits_bv = logits_bv.astype(jnp.float32) / temperature
  logits_bv = top_p_filter(top_k_filter(logits_bv, top_k), top_p)
  return jax.random.categorical(key, logits_bv, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=(
    'cfg', 'max_new_tokens', 'temperature', 'top_k', 'top_p', 'eos_id', 'pad_id',
    'return_logits'))
def generate(params, prompt_bp, key, *, cfg: model_lib.ModelConfig, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             eos_id: int | None = None, pad_id: int = 0, return_logits: bool = False):
  """Continues each row of `prompt_bp`; a pure function of (params, prompt, key).

  Returns {'tokens': [batch, max_new_tokens] (pad_id after a row's EOS),
  'lengths': [batch] tokens generated including EOS}, and with `return_logits`
  the logits every token was drawn from ('logits') and those of the prompt.
  """
  batch, prompt_len = prompt_bp.shape
  cache = init_cache(cfg, batch, prompt_len + max_new_tokens)
  prompt_logits_bpv, cache = forward_cached(params, cfg, prompt_bp, cache, 0)
  vocab = prompt_logits_bpv.shape[-1]
  logits_bnv = jnp.zeros((batch, max_new_tokens if return_logits else 0, vocab), jnp.float32)
  carry = dict(step=jnp.int32(0), logits_bv=prompt_logits_bpv[:, -1], cache=cache,
               tokens_bn=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
               done_b=jnp.zeros((batch,), bool), lengths_b=jnp.zeros((batch,), jnp.int32),
               logits_bnv=logits_bnv)

  def keep_going(c):
    return (c['step'] < max_new_tokens) & ~jnp.all(c['done_b'])

  def step(c):
    i = c['step']
    token_b = sample_token(c['logits_bv'], jax.random.fold_in(key, i), temperature, top_k,
                           top_p)
    token_b = jnp.where(c['done_b'], pad_id, token_b)
    lengths_b = c['lengths_b'] + (~c['done_b']).astype(jnp.int32)
    done_b = c['done_b'] | ((token_b == eos_id) if eos_id is not None else False)
    logits_bnv = c['logits_bnv']
    if return_logits:
      logits_bnv = logits_bnv.at[:, i].set(c['logits_bv'])
    next_logits_b1v, cache = forward_cached(params, cfg, token_b[:, None], c['cache'],
                                            prompt_len + i)
    return dict(step=i + 1, logits_bv=next_logits_b1v[:, 0], cache=cache,
                tokens_bn=c['tokens_bn'].at[:, i].set(token_b), done_b=done_b,
                lengths_b=lengths_b, logits_bnv=logits_bnv)

  carry = jax.lax.while_loop(keep_going, step, carry)
  out = {'tokens': carry['tokens_bn'], 'lengths': carry['lengths_b']}
  if return_logits:
    out.update(logits=carry['logits_bnv'], prompt_logits=prompt_logits_bpv)
  return out


# ------------------------------------------------------------ loading a model


def resolve_tokenizer(data_config) -> str:
  """The .model path of `data.tokenizer`, without touching the corpus (sampling needs none)."""
  path = data_config.tokenizer
  if path == 'default':
    return data_lib.default_tokenizer_path()
  if not os.path.isfile(path):
    raise data_lib.DataError(
        f'data.tokenizer={path!r} does not exist. Fix: set --config.data.tokenizer to the '
        '.model file the run was trained with.')
  return path


def _abstract_params(cfg: model_lib.ModelConfig, device) -> dict:
  abstract = nnx.eval_shape(lambda: model_lib.Transformer(cfg, nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  single = jax.sharding.SingleDeviceSharding(device)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=single), params)


def load_from_workdir(config, workdir: str, cfg: model_lib.ModelConfig,
                      tokenizer_sha256: str, device) -> tuple[dict, str]:
  """Params of the newest private checkpoint of a plain or silo training run.

  The checkpoint's metadata (model spec, tokenizer hash) is checked before any
  array is read, so a checkpoint of another model or tokenizer is refused.
  """
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    raise checkpoint_lib.CheckpointError(
        f'no checkpoints in --workdir={workdir} ({directory} is missing). Fix: pass the '
        '--workdir of a training run, or --storage/--round for a federated global model.')
  checkpointer = checkpoint_lib.Checkpointer(directory, keep=1, async_save=False)
  try:
    step = checkpointer.latest_step()
    if step is None:
      raise checkpoint_lib.CheckpointError(
          f'{directory} holds no finished checkpoint. Fix: train until the first '
          'checkpoint is written (train.checkpoint_every), or pass another --workdir.')
    params = _abstract_params(cfg, device)
    optimizer = inner.make_optimizer(config.inner, config.train.steps)
    train_state = jax.eval_shape(lambda p: inner.init_state(p, optimizer), params)
    train_state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=params['embed_vd'].sharding),
        train_state)
    meta = checkpointer.read_meta(step)
    abstract = train_state
    if 'silo' in meta:  # A federated silo's checkpoint: see silo.run_silo.
      abstract = {'train': train_state}
      fed = config.federation
      if fed.error_feedback and fed.compression != 'none':
        abstract['residual'] = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding), params)
    state, _ = checkpointer.restore(
        step, abstract, checkpoint_lib.expected_meta(config, tokenizer_sha256))
  finally:
    checkpointer.close()
  state = state['train'] if 'silo' in meta else state
  return state['params'], f'{workdir} step {step}'


def load_from_storage(config, storage_root: str, round_index: int | None,
                      cfg: model_lib.ModelConfig, tokenizer_sha256: str,
                      device) -> tuple[dict, str]:
  """Params of a committed global round of a federated run (the newest when None)."""
  store = storage_lib.RunStorage(storage_root)
  run = store.read_run()
  spec = config_lib.model_spec(config)
  if spec != run['model_spec']:
    diff = {k: (spec.get(k), v) for k, v in run['model_spec'].items() if spec.get(k) != v}
    raise silo_lib.RunMismatchError(
        f'this config\'s model differs from the run\'s (field: (yours, run\'s)) {diff}. Fix: '
        'use the config the run was created with.')
  if tokenizer_sha256 != run['tokenizer_sha256']:
    raise silo_lib.RunMismatchError(
        f'tokenizer sha256 {tokenizer_sha256[:12]}... differs from the run\'s '
        f'{run["tokenizer_sha256"][:12]}.... Fix: set --config.data.tokenizer to the run\'s '
        'tokenizer.')
  latest = store.latest_global_round()
  if round_index is None:
    round_index = latest
  if latest is None or store.global_shard_metas(round_index) is None:
    have = 'no round is committed yet' if latest is None else f'the newest is {latest}'
    raise storage_lib.StorageError(
        f'global round {round_index} is not committed under {storage_root} ({have}). '
        'Fix: pass a committed --round, or leave --round out for the newest.')
  abstract_flat = outer.flatten_params(_abstract_params(cfg, device))
  flat = store.read_global_params(
      round_index, abstract_flat,
      check_meta=silo_lib.global_checker(run, None, store, round_index))
  return outer.unflatten_params(flat), f'{storage_root} global round {round_index}'


def sample_text(config, prompt: str, *, workdir: str | None = None,
                storage: str | None = None, round_index: int | None = None,
                max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                top_p: float = 1.0, seed: int = 0, num_samples: int = 1) -> list[str]:
  """Prompt + continuation, decoded with the run's tokenizer, for each of `num_samples`."""
  device = jax.devices()[0]
  cfg = model_lib.ModelConfig.from_config(config.model, device.platform)
  tokenizer_path = resolve_tokenizer(config.data)
  tokenizer = data_lib.load_tokenizer(tokenizer_path)
  tokenizer_sha256 = data_lib.file_sha256(tokenizer_path)
  if tokenizer.vocab_size() > cfg.vocab_size:
    raise config_lib.ConfigError(
        'model.vocab_size', f'{cfg.vocab_size} is smaller than the tokenizer vocabulary '
        f'({tokenizer.vocab_size()})', 'use the config the model was trained with')
  if storage is not None:
    params, source = load_from_storage(config, storage, round_index, cfg, tokenizer_sha256,
                                       device)
  else:
    params, source = load_from_workdir(config, workdir, cfg, tokenizer_sha256, device)
  print(f'sampling from {source}', file=sys.stderr, flush=True)
  # Training documents are separated by EOS, so a prompt starts right after one.
  prompt_ids = [tokenizer.eos_id()] + tokenizer.encode(prompt)
  prompt_bp = jnp.tile(jnp.asarray(prompt_ids, jnp.int32)[None], (num_samples, 1))
  out = jax.device_get(generate(
      params, jax.device_put(prompt_bp, device), jax.random.key(seed), cfg=cfg,
      max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k,
      top_p=float(top_p), eos_id=tokenizer.eos_id(), pad_id=max(tokenizer.pad_id(), 0)))
  texts = []
  for tokens, length in zip(out['tokens'], out['lengths']):
    new = [int(t) for t in tokens[:length] if t != tokenizer.eos_id()]
    texts.append(tokenizer.decode(prompt_ids[1:] + new))
  return texts
