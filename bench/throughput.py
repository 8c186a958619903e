r"""Tokens/s of fedpt's train step next to a bare hand-written JAX step of the same model.

Both run in one process on the same devices and batch, interleaved A/B/A/B so that
machine noise hits both; the ratio fedpt/bare is the figure of merit (target >= 0.95).

  python bench/throughput.py --config=configs/demo.py
  python bench/throughput.py --config=configs/1b.py --config.data.global_batch=8  # GPU
"""
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fedpt import metrics as metrics_lib  # noqa: E402
from fedpt import model as model_lib  # noqa: E402
from fedpt import trainer as trainer_lib  # noqa: E402

config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Model config.', lock_config=True)
flags.DEFINE_integer('steps', 10, 'Timed steps per trial.')
flags.DEFINE_integer('trials', 3, 'A/B trials; the median is reported.')
FLAGS = flags.FLAGS


# -- the bare baseline: plain jnp, a dict of arrays, hand-written AdamW --------------------

def _bare_init(cfg: model_lib.ModelConfig, key):
  d, f, n, k, h, layers = (cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                           cfg.n_layers)
  keys = iter(jax.random.split(key, 16))
  normal = lambda shape, std=cfg.init_std: std * jax.random.normal(next(keys), shape)
  params = {
      'embed': normal((cfg.vocab_size, d)),
      'final_norm': jnp.ones((d,)),
      'layers': {
          'attn_norm': jnp.ones((layers, d)), 'mlp_norm': jnp.ones((layers, d)),
          'wq': normal((layers, d, n, h)), 'wk': normal((layers, d, k, h)),
          'wv': normal((layers, d, k, h)), 'wo': normal((layers, n, h, d)),
          'w_gate': normal((layers, d, f)), 'w_up': normal((layers, d, f)),
          'w_down': normal((layers, f, d)),
      },
  }
  if not cfg.tie_embeddings:
    params['unembed'] = normal((d, cfg.vocab_size))
  return params


def _bare_loss(params, tokens, cfg: model_lib.ModelConfig):
  dt = jnp.dtype(cfg.compute_dtype)
  x = params['embed'][tokens[:, :-1]].astype(dt)
  t = x.shape[1]
  half = cfg.head_dim // 2
  ang = jnp.arange(t)[:, None] / cfg.rope_theta ** (jnp.arange(half) / half)
  sin, cos = jnp.sin(ang)[None, :, None], jnp.cos(ang)[None, :, None]

  def rms(x, w):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt((x32 ** 2).mean(-1, keepdims=True) + cfg.norm_eps) * w).astype(dt)

  def rot(x):
    a, b = jnp.split(x.astype(jnp.float32), 2, -1)
    return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], -1).astype(dt)

  def layer(x, p):
    y = rms(x, p['attn_norm'])
    q = rot(jnp.einsum('btd,dnh->btnh', y, p['wq'].astype(dt)))
    k = rot(jnp.einsum('btd,dkh->btkh', y, p['wk'].astype(dt)))
    v = jnp.einsum('btd,dkh->btkh', y, p['wv'].astype(dt))
    o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=cfg.attention)
    x = x + jnp.einsum('btnh,nhd->btd', o, p['wo'].astype(dt))
    y = rms(x, p['mlp_norm'])
    g = jax.nn.silu(y @ p['w_gate'].astype(dt)) * (y @ p['w_up'].astype(dt))
    return x + g @ p['w_down'].astype(dt), None

  if cfg.remat != 'none':
    layer = jax.checkpoint(layer, policy=model_lib.REMAT_POLICIES[cfg.remat],
                           prevent_cse=False)
  x, _ = jax.lax.scan(layer, x, params['layers'])
  x = rms(x, params['final_norm'])
  unembed = params['embed'].T if cfg.tie_embeddings else params['unembed']
  logits = jnp.einsum('btd,dv->btv', x, unembed.astype(dt), preferred_element_type=jnp.float32)
  logz = jax.nn.logsumexp(logits, -1)
  return jnp.mean(logz - jnp.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0])


def _bare_step(state, tokens, cfg, lr=1e-3, b1=0.9, b2=0.95, eps=1e-8, wd=0.1, clip=1.0):
  params, mu, nu, count = state
  loss, grads = jax.value_and_grad(_bare_loss)(params, tokens, cfg)
  norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
  grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, clip / (norm + 1e-6)), grads)
  count = count + 1
  mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, mu, grads)
  nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, nu, grads)
  def update(p, m, v):
    m_hat, v_hat = m / (1 - b1 ** count), v / (1 - b2 ** count)
    return p - lr * (m_hat / (jnp.sqrt(v_hat) + eps) + wd * p)
  return (jax.tree.map(update, params, mu, nu), mu, nu, count), loss


# -- timing ----------------------------------------------------------------------------------

def _time_steps(step_fn, state, batch, steps):
  state, out = step_fn(state, batch)  # Warm (already compiled).
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(steps):
    state, out = step_fn(state, batch)
  jax.block_until_ready((state, out))
  return state, (time.perf_counter() - start) / steps


def run(config, steps: int, trials: int) -> dict:
  config.mesh.update(data=1, fsdp=1, tensor=1)  # The bare step is single-device.
  devices = jax.devices()[:1]
  trainer = trainer_lib.Trainer(config, devices=devices)
  cfg = trainer.model_config
  batch = jax.device_put(
      jax.random.randint(jax.random.key(0), (config.data.global_batch, config.data.seq_len + 1),
                         0, config.model.vocab_size), trainer.batch_sharding)

  fedpt_state = trainer.init_state()
  bare_params = jax.jit(functools.partial(_bare_init, cfg))(jax.random.key(0))
  zeros = jax.tree.map(jnp.zeros_like, bare_params)
  bare_state = (bare_params, zeros, jax.tree.map(jnp.zeros_like, bare_params), jnp.zeros(()))
  bare_step = jax.jit(functools.partial(_bare_step, cfg=cfg), donate_argnums=(0,))

  t0 = time.perf_counter()
  fedpt_state, _ = trainer.train_step(fedpt_state, batch)
  jax.block_until_ready(fedpt_state)
  compile_fedpt = time.perf_counter() - t0
  t0 = time.perf_counter()
  bare_state, _ = bare_step(bare_state, batch)
  jax.block_until_ready(bare_state)
  compile_bare = time.perf_counter() - t0

  fedpt_times, bare_times = [], []
  for _ in range(trials):
    fedpt_state, seconds = _time_steps(trainer.train_step, fedpt_state, batch, steps)
    fedpt_times.append(seconds)
    bare_state, seconds = _time_steps(bare_step, bare_state, batch, steps)
    bare_times.append(seconds)

  tokens = config.data.global_batch * config.data.seq_len
  fedpt_tps = tokens / statistics.median(fedpt_times)
  bare_tps = tokens / statistics.median(bare_times)
  peak = metrics_lib.peak_flops_per_device(config.train.peak_tflops_per_device)
  flops_per_token = model_lib.flops_per_token(cfg, config.data.seq_len)
  return {
      'device': devices[0].device_kind, 'params': model_lib.param_count(cfg),
      'batch': config.data.global_batch, 'seq_len': config.data.seq_len,
      'compute_dtype': cfg.compute_dtype, 'remat': cfg.remat,
      'fedpt_tokens_per_s': fedpt_tps, 'bare_tokens_per_s': bare_tps,
      'ratio': fedpt_tps / bare_tps,
      'fedpt_mfu': flops_per_token * fedpt_tps / peak if peak else None,
      'bare_mfu': flops_per_token * bare_tps / peak if peak else None,
      'first_step_s': {'fedpt': compile_fedpt, 'bare': compile_bare},
  }


def main(argv):
  del argv
  result = run(FLAGS.config, FLAGS.steps, FLAGS.trials)
  mfu = lambda x: 'n/a (no peak for this device)' if x is None else f'{x:.1%}'
  print(f"config={FLAGS.config.name} device={result['device']} params={result['params']:,} "
        f"batch={result['batch']}x{result['seq_len']} dtype={result['compute_dtype']} "
        f"remat={result['remat']}")
  print(f"fedpt train step : {result['fedpt_tokens_per_s']:12,.0f} tokens/s   "
        f"MFU {mfu(result['fedpt_mfu'])}")
  print(f"bare JAX step    : {result['bare_tokens_per_s']:12,.0f} tokens/s   "
        f"MFU {mfu(result['bare_mfu'])}")
  print(f"ratio fedpt/bare : {result['ratio']:.3f}  (target >= 0.95)")


if __name__ == '__main__':
  app.run(main)
