"""The floor fedpt's train step is measured against (fedpt's math, nothing else), and the sizes.

The bare step computes `fedpt.model.Transformer`'s forward, written out in plain jnp, on
fedpt's pure-dict params (so both start equal), its layers an unrolled Python loop, with
`optax.adamw` at a constant lr: no gradient clipping, no weight-decay mask, no z-loss, no
schedule. Each of those features can be added
to it alone, to price it (bench/throughput.py --variants). Also the timing every step
benchmark shares (interleaved trials). Flag-free, so tests and bench scripts import it.
"""
import functools
import importlib.util
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import optax

from fedpt import errors
from fedpt import inner
from fedpt import model as model_lib
from fedpt import trainer as trainer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The sizes a CPU run compares side by side: (config file, overrides). 7m is the shape an
# outside review timed against an unrolled optax step; 150m runs at a CPU-sized batch.
SIZES = {
    'tiny': ('configs/tiny.py', {}),
    'demo': ('configs/demo.py', {}),
    '7m': ('configs/demo.py', {
        'model.d_model': 256, 'model.n_layers': 4, 'model.n_heads': 4, 'model.n_kv_heads': 4,
        'model.head_dim': 64, 'model.d_ff': 682, 'model.vocab_size': 8192,
        'model.tie_embeddings': False, 'data.global_batch': 16, 'data.seq_len': 256}),
    '150m': ('configs/150m.py', {'data.global_batch': 2, 'data.seq_len': 256}),
}
# What fedpt's step does that the floor does not; each can be added to the floor alone.
FEATURES = ('scan', 'clip', 'decay_mask', 'z_loss', 'schedule')


class ThroughputError(errors.UserError, ValueError):
  """A bad size, variant or remat policy."""


def load_size(name: str):
  """configs/<file>.py of a preset in SIZES with its overrides, as a ConfigDict."""
  if name not in SIZES:
    raise ThroughputError(f'unknown size {name!r}. Fix: use --sizes from {", ".join(SIZES)}')
  path, overrides = SIZES[name]
  spec = importlib.util.spec_from_file_location(f'config_{name}', os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.update_from_flattened_dict(overrides)
  config.name = name
  return config


def single_device(config):
  """(Trainer on one device, a random batch on it): what the floor and fedpt both step on."""
  config.mesh.update(data=1, fsdp=1, tensor=1)  # The bare step is single-device.
  trainer = trainer_lib.Trainer(config, devices=jax.devices()[:1])
  tokens = jax.random.randint(jax.random.key(0),
                              (config.data.global_batch, config.data.seq_len + 1),
                              0, config.model.vocab_size)
  return trainer, jax.device_put(tokens, trainer.batch_sharding)


ALL = frozenset({'all'})  # Every feature fedpt's step has, in its config's layer layout.


def parse_variant(text: str) -> frozenset:
  """'all', '' (the floor) or features joined by '+', e.g. 'scan+clip'."""
  if text == 'all':
    return ALL
  features = frozenset(f for f in text.split('+') if f)
  unknown = sorted(features - set(FEATURES))
  if unknown:
    raise ThroughputError(f'unknown bare-step feature {unknown[0]!r}. Fix: use --variants from '
                          f'{", ".join(FEATURES)}, "all", or features joined by +')
  return features


def variant_name(features: frozenset) -> str:
  if features == ALL:
    return 'bare+all'
  return '+'.join(['bare', *sorted(features)])


# -- the bare step: fedpt's math on a dict of arrays ------------------------------------------


def bare_params(params, scan: bool):
  """fedpt's pure-dict params; unless `scan`, the stacked blocks as a list of layers."""
  if scan:
    return params
  layers = jax.tree.leaves(params['blocks'])[0].shape[0]
  return {**params, 'blocks': [jax.tree.map(lambda a, i=i: a[i], params['blocks'])
                               for i in range(layers)]}


def stacked_params(params):
  """`bare_params`' inverse: fedpt's layout, the layers stacked on a leading axis."""
  if not isinstance(params['blocks'], list):
    return params
  return {**params, 'blocks': jax.tree.map(lambda *layers: jnp.stack(layers), *params['blocks'])}


def bare_loss(params, tokens_bt1, cfg: model_lib.ModelConfig, z_loss: float = 0.0):
  """Mean next-token loss (+ z-loss) of [batch, length+1] tokens: `inner.loss_and_metrics`."""
  dt = jnp.dtype(cfg.compute_dtype)
  inputs_bt, targets_bt = tokens_bt1[:, :-1], tokens_bt1[:, 1:]
  x = jnp.take(params['embed_vd'], inputs_bt, axis=0).astype(dt)
  half = cfg.head_dim // 2
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(half, dtype=jnp.float32) / half))
  angles = jnp.arange(inputs_bt.shape[1], dtype=jnp.float32)[:, None] * inv_freq
  sin, cos = jnp.sin(angles)[None, :, None], jnp.cos(angles)[None, :, None]

  def rms(x, scale):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + cfg.norm_eps)
            * scale.astype(jnp.float32)).astype(dt)

  def rot(x):
    a, b = jnp.split(x.astype(jnp.float32), 2, -1)
    return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], -1).astype(dt)

  def layer(x, p):
    attn, mlp = p['attn'], p['mlp']
    y = rms(x, p['attn_norm']['scale'])
    q = rot(jnp.einsum('btd,dnh->btnh', y, attn['q_weight_dnh'].astype(dt)))
    k = rot(jnp.einsum('btd,dkh->btkh', y, attn['k_weight_dkh'].astype(dt)))
    v = jnp.einsum('btd,dkh->btkh', y, attn['v_weight_dkh'].astype(dt))
    o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=cfg.attention)
    x = x + jnp.einsum('btnh,nhd->btd', o, attn['o_weight_nhd'].astype(dt))
    y = rms(x, p['mlp_norm']['scale'])
    g = (jax.nn.silu(jnp.einsum('btd,df->btf', y, mlp['gate_weight_df'].astype(dt)))
         * jnp.einsum('btd,df->btf', y, mlp['up_weight_df'].astype(dt)))
    return x + jnp.einsum('btf,fd->btd', g, mlp['down_weight_fd'].astype(dt)), None

  scan = not isinstance(params['blocks'], list)
  if cfg.remat != 'none':
    layer = jax.checkpoint(layer, policy=model_lib.REMAT_POLICIES[cfg.remat],
                           prevent_cse=not scan)
  if scan:
    x, _ = jax.lax.scan(layer, x, params['blocks'])
  else:
    for p in params['blocks']:
      x, _ = layer(x, p)
  x = rms(x, params['final_norm']['scale'])
  unembed = params['embed_vd'].T if cfg.tie_embeddings else params['unembed_dv']
  logits = jnp.einsum('btd,dv->btv', x, unembed.astype(dt), preferred_element_type=jnp.float32)
  log_z = jax.nn.logsumexp(logits, -1)
  nll = jnp.mean(log_z - jnp.take_along_axis(logits, targets_bt[..., None], -1)[..., 0])
  return nll + z_loss * jnp.mean(jnp.square(log_z))


def bare_optimizer(features: frozenset, inner_config, total_steps: int):
  """optax.adamw at a constant lr; each feature adds fedpt's own piece (`inner.py`)."""
  lr = (inner.lr_schedule(inner_config, total_steps) if 'schedule' in features
        else inner_config.lr)
  tx = optax.adamw(lr, b1=inner_config.b1, b2=inner_config.b2, eps=inner_config.eps,
                   weight_decay=inner_config.weight_decay,
                   mask=inner._decay_mask if 'decay_mask' in features else None)  # pylint: disable=protected-access
  if 'clip' in features and inner_config.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(inner_config.grad_clip), tx)
  return tx


def bare_step(state, tokens_bt1, *, cfg, optimizer, z_loss):
  params, opt_state = state
  loss, grads = jax.value_and_grad(bare_loss)(params, tokens_bt1, cfg, z_loss)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return (optax.apply_updates(params, updates), opt_state), loss


def make_bare(features: frozenset, trainer, params):
  """(jitted step, initial state) of one bare variant, on copies of fedpt's initial params.

  ALL is fedpt's own computation: every feature, scanned or not as fedpt's config says.
  """
  config = trainer.config
  if features == ALL:
    features = frozenset(f for f in FEATURES
                         if f != 'scan' or trainer.model_config.scan_layers)
  optimizer = bare_optimizer(features, config.inner, trainer.total_steps)
  z_loss = config.inner.z_loss if 'z_loss' in features else 0.0
  step = jax.jit(functools.partial(bare_step, cfg=trainer.model_config, optimizer=optimizer,
                                   z_loss=z_loss), donate_argnums=(0,))
  params = jax.tree.map(jnp.copy, bare_params(params, 'scan' in features))
  return step, (params, optimizer.init(params))


# -- timing: steps side by side in one process -----------------------------------------------


def time_steps(step_fn, state, batch, steps: int):
  """(state, seconds per step) over `steps` steps after one warm (already compiled) step."""
  state, out = step_fn(state, batch)
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(steps):
    state, out = step_fn(state, batch)
  jax.block_until_ready((state, out))
  return state, (time.perf_counter() - start) / steps


def first_step(step_fn, state, batch):
  """(state after one step, seconds it took: the compile)."""
  t0 = time.perf_counter()
  state, _ = step_fn(state, batch)
  jax.block_until_ready(state)
  return state, time.perf_counter() - t0


def interleaved_times(runners: dict, batch, steps: int, trials: int, min_trial_s: float = 0.0):
  """({name: [seconds per step of each trial]}, steps per trial) of compiled `runners`.

  `runners` maps a name to (step_fn, state) and is updated with the states. A trial lasts
  at least `min_trial_s` (timed on the first runner): short trials measure the switch
  between steps (cold caches, a waking thread pool), not the steps. Each trial starts one
  runner later than the last, so that no runner always goes first and machine noise hits
  each alike.
  """
  names = list(runners)
  step_fn, state = runners[names[0]]
  state, one_step_s = time_steps(step_fn, state, batch, 1)
  runners[names[0]] = (step_fn, state)
  steps = max(steps, math.ceil(min_trial_s / one_step_s))
  times = {name: [] for name in names}
  for trial in range(trials):
    for name in names[trial % len(names):] + names[:trial % len(names)]:
      step_fn, state = runners[name]
      state, seconds = time_steps(step_fn, state, batch, steps)
      runners[name] = (step_fn, state)
      times[name].append(seconds)
  return times, steps


def report(rows: list, table: str, json_out: str | None) -> list:
  """Prints a benchmark's markdown `table` and writes its `rows` to `json_out` (if given)."""
  print(table)
  if json_out:
    with open(json_out, 'w') as f:
      json.dump(rows, f, indent=1)
  return rows
