"""Decoder-only transformer in Flax NNX: RMSNorm, RoPE, SwiGLU, grouped-query attention.

Parameters are annotated with logical axis names only; `sharding.py` maps them
onto the mesh. The layer stack is one vmapped Block scanned with `lax.scan`, so
compile time does not grow with depth (`scan_layers=False` unrolls the same stacked
params into a Python loop, as MaxText's `scan_layers`). The same forward serves training
and sampling: given a KV cache (`init_cache`) it also returns the updated cache.
"""
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from fedpt.sharding import constrain

REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  d_ff: int
  tie_embeddings: bool = True
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-5
  init_std: float = 0.02
  param_dtype: str = 'float32'
  compute_dtype: str = 'float32'
  remat: str = 'none'
  attention: str = 'xla'
  scan_layers: bool = True

  @classmethod
  def from_config(cls, model_config, platform: str | None = None):
    fields = {f.name: model_config[f.name] for f in dataclasses.fields(cls)}
    platform = platform or jax.default_backend()
    if fields['compute_dtype'] == 'auto':
      fields['compute_dtype'] = 'float32' if platform == 'cpu' else 'bfloat16'
    if fields['attention'] == 'auto':
      fields['attention'] = 'cudnn' if platform == 'gpu' else 'xla'
    return cls(**fields)


def _param(rngs, shape, logical_axes, std, dtype):
  # Logical names only: eager sharding would read them as mesh axes.
  value = jax.nn.initializers.normal(std)(rngs.params(), shape, dtype)
  return nnx.Param(value, out_sharding=logical_axes, eager_sharding=False)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, dtype):
    self.scale = nnx.Param(jnp.ones((dim,), dtype), out_sharding=('norm',),
                           eager_sharding=False)
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope(x_btnh, positions_bt, theta: float):
  """Rotary embedding in the rotate-half layout (the Hugging Face Llama convention)."""
  half = x_btnh.shape[-1] // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
  angles_bth = positions_bt[..., None].astype(jnp.float32) * inv_freq
  sin, cos = jnp.sin(angles_bth)[:, :, None, :], jnp.cos(angles_bth)[:, :, None, :]
  x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_btnh.dtype)


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
    self.q_weight_dnh = _param(rngs, (d, n, h), ('embed', 'heads', 'head_dim'),
                               cfg.init_std, cfg.param_dtype)
    self.k_weight_dkh = _param(rngs, (d, k, h), ('embed', 'kv_heads', 'head_dim'),
                               cfg.init_std, cfg.param_dtype)
    self.v_weight_dkh = _param(rngs, (d, k, h), ('embed', 'kv_heads', 'head_dim'),
                               cfg.init_std, cfg.param_dtype)
    self.o_weight_nhd = _param(rngs, (n, h, d), ('heads', 'head_dim', 'embed'),
                               out_std, cfg.param_dtype)

  def __call__(self, x_btd, positions_bt, cache=None, cache_index=None):
    """Returns ([batch, length, d_model], the layer's cache with this step written, or None).

    cache: None, or {'k', 'v'} of [batch, max_len, kv_heads, head_dim] holding the
    keys (after RoPE) and values of earlier positions; this step's go in at slot
    `cache_index`, and each query attends to the slots at or before its position.
    """
    dtype = x_btd.dtype
    q_btnh = jnp.einsum('btd,dnh->btnh', x_btd, self.q_weight_dnh[...].astype(dtype))
    k_btkh = jnp.einsum('btd,dkh->btkh', x_btd, self.k_weight_dkh[...].astype(dtype))
    v_btkh = jnp.einsum('btd,dkh->btkh', x_btd, self.v_weight_dkh[...].astype(dtype))
    q_btnh = constrain(rope(q_btnh, positions_bt, self.cfg.rope_theta),
                       ('batch', 'length', 'act_heads', None))
    k_btkh = rope(k_btkh, positions_bt, self.cfg.rope_theta)
    if cache is None:
      out_btnh = jax.nn.dot_product_attention(
          q_btnh, k_btkh, v_btkh, is_causal=True, implementation=self.cfg.attention)
    else:
      k_bskh = jax.lax.dynamic_update_slice_in_dim(
          cache['k'], k_btkh.astype(cache['k'].dtype), cache_index, axis=1)
      v_bskh = jax.lax.dynamic_update_slice_in_dim(
          cache['v'], v_btkh.astype(cache['v'].dtype), cache_index, axis=1)
      cache = {'k': k_bskh, 'v': v_bskh}
      # Slots after a query's position are empty (or stale), so the mask hides them.
      mask_b1ts = (jnp.arange(k_bskh.shape[1]) <= positions_bt[..., None])[:, None]
      # XLA's attention, not cfg.attention: decode steps are one query over an explicitly
      # masked cache, not the long causal sequences the fused kernels are for.
      out_btnh = jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=mask_b1ts)
    out_btd = jnp.einsum('btnh,nhd->btd', out_btnh, self.o_weight_nhd[...].astype(dtype))
    return constrain(out_btd, ('batch', 'length', 'act_embed')), cache


class Mlp(nnx.Module):
  """SwiGLU feed-forward."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, f = cfg.d_model, cfg.d_ff
    out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
    self.gate_weight_df = _param(rngs, (d, f), ('embed', 'mlp'), cfg.init_std, cfg.param_dtype)
    self.up_weight_df = _param(rngs, (d, f), ('embed', 'mlp'), cfg.init_std, cfg.param_dtype)
    self.down_weight_fd = _param(rngs, (f, d), ('mlp', 'embed'), out_std, cfg.param_dtype)

  def __call__(self, x_btd):
    dtype = x_btd.dtype
    gate_btf = jnp.einsum('btd,df->btf', x_btd, self.gate_weight_df[...].astype(dtype))
    up_btf = jnp.einsum('btd,df->btf', x_btd, self.up_weight_df[...].astype(dtype))
    hidden_btf = constrain(jax.nn.silu(gate_btf) * up_btf, ('batch', 'length', 'act_mlp'))
    out_btd = jnp.einsum('btf,fd->btd', hidden_btf, self.down_weight_fd[...].astype(dtype))
    return constrain(out_btd, ('batch', 'length', 'act_embed'))


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype)
    self.mlp = Mlp(cfg, rngs)

  def __call__(self, x_btd, positions_bt, cache=None, cache_index=None):
    """Returns ([batch, length, d_model], the updated layer cache or None); see Attention."""
    attn_btd, cache = self.attn(self.attn_norm(x_btd), positions_bt, cache, cache_index)
    x_btd = x_btd + attn_btd
    return x_btd + self.mlp(self.mlp_norm(x_btd)), cache


class Transformer(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed_vd = _param(rngs, (cfg.vocab_size, cfg.d_model), ('vocab', 'embed'),
                           cfg.init_std, cfg.param_dtype)

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make_blocks(block_rngs):
      return Block(cfg, block_rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype)
    if not cfg.tie_embeddings:
      self.unembed_dv = _param(rngs, (cfg.d_model, cfg.vocab_size), ('embed', 'vocab'),
                               cfg.init_std, cfg.param_dtype)

  def __call__(self, tokens_bt, positions_bt=None, cache=None, cache_index=0):
    """Float32 logits [batch, length, vocab] of `tokens_bt`.

    Without a cache this is the training forward over the whole sequence. With
    one (`init_cache`), the tokens sit at positions cache_index.. after the
    cached ones, and the result is (logits, the cache with these positions written).
    """
    cfg = self.cfg
    dtype = jnp.dtype(cfg.compute_dtype)
    if positions_bt is None:
      positions_t = jnp.arange(tokens_bt.shape[1])
      if cache is not None:
        positions_t = cache_index + positions_t
      positions_bt = jnp.broadcast_to(positions_t, tokens_bt.shape)
    x_btd = jnp.take(self.embed_vd[...], tokens_bt, axis=0).astype(dtype)
    x_btd = constrain(x_btd, ('batch', 'length', 'act_embed'))

    block_graph, block_state = nnx.split(self.blocks)

    def apply_block(x_btd, layer):
      layer_state, layer_cache = layer
      return nnx.merge(block_graph, layer_state)(x_btd, positions_bt, layer_cache, cache_index)

    if cfg.remat != 'none':  # CSE is only safe to allow inside a scan.
      apply_block = jax.checkpoint(apply_block, policy=REMAT_POLICIES[cfg.remat],
                                   prevent_cse=not cfg.scan_layers)
    # The cache's leading axis is the layer, so it is scanned with the blocks.
    if cfg.scan_layers:
      x_btd, cache_out = jax.lax.scan(apply_block, x_btd, (block_state, cache))
    else:  # The same stacked params, one layer at a time: no stacked buffers for the
      # scan's residuals and gradients, at a compile time that grows with depth.
      caches = []
      for i in range(cfg.n_layers):
        x_btd, layer_cache = apply_block(x_btd, jax.tree.map(lambda a, i=i: a[i],
                                                             (block_state, cache)))
        caches.append(layer_cache)
      cache_out = None if cache is None else jax.tree.map(lambda *c: jnp.stack(c), *caches)
    x_btd = self.final_norm(x_btd)
    unembed_dv = (self.embed_vd[...].T if cfg.tie_embeddings else self.unembed_dv[...])
    logits_btv = jnp.einsum('btd,dv->btv', x_btd, unembed_dv.astype(dtype),
                            preferred_element_type=jnp.float32)
    logits_btv = constrain(logits_btv, ('batch', 'length', 'act_vocab'))
    return logits_btv if cache is None else (logits_btv, cache_out)


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> dict:
  """Empty keys (after RoPE) and values, the form `Transformer.__call__` carries.

  Returns {'k', 'v'} of [layers, batch, max_len, kv_heads, head_dim] in compute_dtype.
  """
  shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
  dtype = jnp.dtype(cfg.compute_dtype)
  return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}


def abstract_model(cfg: ModelConfig):
  """(graphdef, abstract params, logical axes): the model's shapes without allocating it.

  Params and axes are pure dicts (`nnx.to_pure_dict`), the form checkpoints,
  deltas and global rounds use; the axes are the logical names of `_param`.
  """
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
  return graphdef, nnx.to_pure_dict(state), nnx.to_pure_dict(nnx.get_partition_spec(state))


def param_count(cfg: ModelConfig, include_embeddings: bool = True) -> int:
  d, f, n, k, h = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  per_layer = d * h * (2 * n + 2 * k) + 3 * d * f + 2 * d
  embeddings = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
  return cfg.n_layers * per_layer + d + (embeddings if include_embeddings else 0)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward), as in the PaLM/MaxText MFU accounting."""
  matmul_params = param_count(cfg, include_embeddings=False) + cfg.vocab_size * cfg.d_model
  attention = 2 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len  # QK^T and AV, causal half.
  return 6 * matmul_params + 6 * attention
