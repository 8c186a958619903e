"""Model and inner-step math against straightforward references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedpt import config as config_lib
from fedpt import inner
from fedpt import model as model_lib

pytestmark = pytest.mark.gpu  # Numerics that must hold on an accelerator too.


def _tiny(**overrides):
  c = config_lib.base_config()
  c.model.update({**dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         head_dim=8, d_ff=64, compute_dtype='float32', attention='xla'),
                  **overrides})
  return model_lib.ModelConfig.from_config(c.model, 'cpu')


def _reference_forward(params, cfg, tokens):
  """The same transformer written as plain loops over layers, heads repeated for GQA."""
  def norm(x, scale):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * scale

  def rope(x):  # x: [t, n, h]
    t, _, h = x.shape
    inv = 1.0 / cfg.rope_theta ** (np.arange(h // 2) / (h // 2))
    ang = np.arange(t)[:, None] * inv
    sin, cos = np.sin(ang)[:, None], np.cos(ang)[:, None]
    x1, x2 = x[..., :h // 2], x[..., h // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

  p = jax.tree.map(np.asarray, params)
  x = p['embed_vd'][tokens]
  t = len(tokens)
  mask = np.tril(np.ones((t, t), bool))
  for layer in range(cfg.n_layers):
    blk = jax.tree.map(lambda a: a[layer], p['blocks'])
    h = norm(x, blk['attn_norm']['scale'])
    q = rope(np.einsum('td,dnh->tnh', h, blk['attn']['q_weight_dnh']))
    k = rope(np.einsum('td,dkh->tkh', h, blk['attn']['k_weight_dkh']))
    v = np.einsum('td,dkh->tkh', h, blk['attn']['v_weight_dkh'])
    group = cfg.n_heads // cfg.n_kv_heads
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = np.einsum('tnh,snh->nts', q, k) / np.sqrt(cfg.head_dim)
    scores = np.where(mask, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attn = np.einsum('nts,snh->tnh', probs, v)
    x = x + np.einsum('tnh,nhd->td', attn, blk['attn']['o_weight_nhd'])
    h = norm(x, blk['mlp_norm']['scale'])
    gate = h @ blk['mlp']['gate_weight_df']
    swiglu = gate / (1 + np.exp(-gate)) * (h @ blk['mlp']['up_weight_df'])
    x = x + swiglu @ blk['mlp']['down_weight_fd']
  x = norm(x, p['final_norm']['scale'])
  unembed = p['embed_vd'].T if cfg.tie_embeddings else p['unembed_dv']
  return x @ unembed


@pytest.mark.parametrize('tie', [True, False])
def test_forward_matches_reference(tie):
  cfg = _tiny(tie_embeddings=tie)
  model = model_lib.Transformer(cfg, nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  # Make norms non-trivial so their placement is tested too.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x * 1.5 + 0.1 if 'scale' in jax.tree_util.keystr(path) else x, params)
  tokens = np.array([3, 17, 42, 5, 96, 0, 11, 7], np.int32)
  got = nnx.merge(nnx.graphdef(model), params)(tokens[None])[0]
  want = _reference_forward(params, cfg, tokens)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)
  assert model_lib.param_count(cfg) == sum(x.size for x in jax.tree.leaves(params))


def test_causal_future_tokens_do_not_change_past_logits():
  cfg = _tiny()
  model = model_lib.Transformer(cfg, nnx.Rngs(1))
  a = model(jnp.array([[1, 2, 3, 4, 5, 6]]))
  b = model(jnp.array([[1, 2, 3, 9, 9, 9]]))
  np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-6)
  assert not np.allclose(a[:, 3:], b[:, 3:])


@pytest.mark.parametrize('tie, n_kv_heads, remat', [
    (True, 2, 'none'), (False, 2, 'none'), (True, 4, 'none'), (False, 4, 'none'),
    (True, 2, 'full')])
def test_cached_decoding_matches_full_forward(tie, n_kv_heads, remat):
  """Prefill, then one token at a time: the logits of the same forward without a cache."""
  cfg = _tiny(tie_embeddings=tie, n_kv_heads=n_kv_heads, remat=remat)
  graphdef, state = nnx.split(model_lib.Transformer(cfg, nnx.Rngs(0)))
  full_forward = jax.jit(lambda tokens_bt: nnx.merge(graphdef, state)(tokens_bt))
  cached_forward = jax.jit(lambda tokens_bt, cache, index: nnx.merge(graphdef, state)(
      tokens_bt, cache=cache, cache_index=index))
  tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, 97)
  # Junk in the unwritten slots: the causal mask over the cache must hide it.
  junk = model_lib.init_cache(cfg, 2, 13)
  junk = jax.tree.map(lambda x: jax.random.normal(jax.random.key(3), x.shape, x.dtype), junk)
  logits, cache = cached_forward(tokens[:, :4], junk, 0)
  pieces = [logits]
  for i in range(4, 10):
    logits, cache = cached_forward(tokens[:, i:i + 1], cache, i)
    pieces.append(logits)
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), full_forward(tokens),
                             rtol=1e-5, atol=1e-5)
  # The step-by-step cache holds what one prefill of all ten tokens writes.
  _, prefilled = cached_forward(tokens, model_lib.init_cache(cfg, 2, 13), 0)
  assert cache['k'].shape == (cfg.n_layers, 2, 13, n_kv_heads, cfg.head_dim)
  for name in ('k', 'v'):
    np.testing.assert_allclose(cache[name][:, :, :10], prefilled[name][:, :, :10],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(cache[name][:, :, 10:], junk[name][:, :, 10:])
    np.testing.assert_array_equal(prefilled[name][:, :, 10:], 0.0)


@pytest.mark.parametrize('policy', ['full', 'dots', 'dots_no_batch'])
def test_remat_policies_do_not_change_gradients(policy):
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 97)
  grads = {}
  for name in ('none', policy):
    cfg = _tiny(remat=name)
    model = model_lib.Transformer(cfg, nnx.Rngs(0))
    graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model, nnx.Param))
    grads[name] = jax.jit(jax.grad(lambda p: inner.loss_and_metrics(  # One compile, not
        p, tokens, graphdef=graphdef, z_loss=0.0)[0]))(params)  # one per eager op.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               grads['none'], grads[policy])


@pytest.mark.parametrize('remat', ['none', 'full'])
def test_unrolled_layers_compute_what_the_scan_computes(remat):
  """model.scan_layers=False: the same params, loss, gradients and KV cache."""
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 97)
  out = {}
  for scan in (True, False):
    cfg = _tiny(remat=remat, scan_layers=scan)
    model = model_lib.Transformer(cfg, nnx.Rngs(0))
    graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model, nnx.Param))
    loss, grads = jax.jit(jax.value_and_grad(lambda p: inner.loss_and_metrics(
        p, tokens, graphdef=graphdef, z_loss=1e-3)[0]))(params)
    state = nnx.state(model)
    _, cache = jax.jit(lambda state: nnx.merge(graphdef, state)(
        tokens, cache=model_lib.init_cache(cfg, 2, 12), cache_index=0))(state)
    out[scan] = (params, loss, grads, cache)
  jax.tree.map(np.testing.assert_array_equal, out[True][0], out[False][0])  # One layout.
  np.testing.assert_allclose(out[False][1], out[True][1], rtol=1e-6)
  assert float(out[True][1]) > 4.0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               out[False][2:], out[True][2:])


def test_z_loss_adds_mean_squared_log_partition():
  cfg = _tiny()
  model = model_lib.Transformer(cfg, nnx.Rngs(0))
  graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model, nnx.Param))
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 97)
  loss, aux = inner.loss_and_metrics(params, tokens, graphdef=graphdef, z_loss=1e-2)
  logits = model(tokens[:, :-1])
  log_z = jax.nn.logsumexp(logits, -1)
  nll = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))
  np.testing.assert_allclose(aux['nll'], nll, rtol=1e-5)
  np.testing.assert_allclose(loss, nll + 1e-2 * jnp.mean(log_z ** 2), rtol=1e-5)


def test_lr_schedule_warms_up_then_decays_to_floor():
  c = config_lib.base_config().inner
  c.update(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, schedule='cosine')
  sched = inner.lr_schedule(c, total_steps=110)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(5)), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(float(sched(10)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(sched(110)), 1e-4, rtol=1e-5)
  c.schedule = 'constant'
  np.testing.assert_allclose(float(inner.lr_schedule(c, 110)(100)), 1e-3, rtol=1e-6)


def test_weight_decay_skips_norm_scales():
  cfg = _tiny()
  params = nnx.to_pure_dict(nnx.state(model_lib.Transformer(cfg, nnx.Rngs(0)), nnx.Param))
  c = config_lib.base_config().inner
  c.update(lr=1.0, warmup_steps=0, schedule='constant', weight_decay=0.5, grad_clip=0.0)
  opt = inner.make_optimizer(c, 10)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = opt.update(zero_grads, opt.init(params), params)
  np.testing.assert_array_equal(updates['final_norm']['scale'], 0.0)
  np.testing.assert_allclose(updates['embed_vd'], -0.5 * params['embed_vd'], rtol=1e-6)
