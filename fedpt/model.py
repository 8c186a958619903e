"""Decoder-only transformer in Flax NNX: RMSNorm, RoPE, SwiGLU, grouped-query attention.

Parameters are annotated with logical axis names only; `sharding.py` maps them
onto the mesh. The layer stack is one vmapped Block scanned with `lax.scan`, so
compile time does not grow with depth.
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

  def __call__(self, x_btd, positions_bt):
    dtype = x_btd.dtype
    q_btnh = jnp.einsum('btd,dnh->btnh', x_btd, self.q_weight_dnh[...].astype(dtype))
    k_btkh = jnp.einsum('btd,dkh->btkh', x_btd, self.k_weight_dkh[...].astype(dtype))
    v_btkh = jnp.einsum('btd,dkh->btkh', x_btd, self.v_weight_dkh[...].astype(dtype))
    q_btnh = constrain(rope(q_btnh, positions_bt, self.cfg.rope_theta),
                       ('batch', 'length', 'act_heads', None))
    k_btkh = rope(k_btkh, positions_bt, self.cfg.rope_theta)
    out_btnh = jax.nn.dot_product_attention(
        q_btnh, k_btkh, v_btkh, is_causal=True, implementation=self.cfg.attention)
    out_btd = jnp.einsum('btnh,nhd->btd', out_btnh, self.o_weight_nhd[...].astype(dtype))
    return constrain(out_btd, ('batch', 'length', 'act_embed'))


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

  def __call__(self, x_btd, positions_bt):
    x_btd = x_btd + self.attn(self.attn_norm(x_btd), positions_bt)
    return x_btd + self.mlp(self.mlp_norm(x_btd))


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

  def __call__(self, tokens_bt, positions_bt=None):
    """Returns float32 logits [batch, length, vocab]."""
    cfg = self.cfg
    dtype = jnp.dtype(cfg.compute_dtype)
    if positions_bt is None:
      positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
    x_btd = jnp.take(self.embed_vd[...], tokens_bt, axis=0).astype(dtype)
    x_btd = constrain(x_btd, ('batch', 'length', 'act_embed'))

    block_graph, block_state = nnx.split(self.blocks)

    def apply_block(x_btd, layer_state):
      return nnx.merge(block_graph, layer_state)(x_btd, positions_bt), None

    if cfg.remat != 'none':
      apply_block = jax.checkpoint(apply_block, policy=REMAT_POLICIES[cfg.remat],
                                   prevent_cse=False)
    x_btd, _ = jax.lax.scan(apply_block, x_btd, block_state)
    x_btd = self.final_norm(x_btd)
    unembed_dv = (self.embed_vd[...].T if cfg.tie_embeddings else self.unembed_dv[...])
    logits_btv = jnp.einsum('btd,dv->btv', x_btd, unembed_dv.astype(dtype),
                            preferred_element_type=jnp.float32)
    return constrain(logits_btv, ('batch', 'length', 'act_vocab'))


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
