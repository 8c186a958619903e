"""The inner (per-silo) optimisation: loss, AdamW schedule, pure train and eval steps.

Everything here is a pure function of pytrees; the caller jits it with explicit
shardings and donates the state. The state is a plain dict so that Orbax and the
federation layer can handle it without knowing about NNX.
"""
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fedpt import drift as drift_lib
from fedpt.sharding import constrain


def lr_schedule(inner_config, total_steps: int) -> optax.Schedule:
  """Linear warmup, then cosine, linear or constant; DiLoCo keeps it across rounds."""
  peak = inner_config.lr
  warmup = inner_config.warmup_steps
  decay_steps = inner_config.decay_steps or total_steps
  floor = peak * inner_config.min_lr_ratio
  if inner_config.schedule == 'constant':
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])
  if inner_config.schedule == 'linear':
    decay = optax.linear_schedule(peak, floor, max(decay_steps - warmup, 1))
  else:
    decay = optax.cosine_decay_schedule(peak, max(decay_steps - warmup, 1),
                                        alpha=inner_config.min_lr_ratio)
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def _decay_mask(params):
  """No weight decay on norm scales, as in Llama/MaxText."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(getattr(k, 'key', None) == 'scale' for k in path), params)


def make_optimizer(inner_config, total_steps: int) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(inner_config.grad_clip) if inner_config.grad_clip > 0
      else optax.identity(),
      optax.adamw(lr_schedule(inner_config, total_steps), b1=inner_config.b1,
                  b2=inner_config.b2, eps=inner_config.eps,
                  weight_decay=inner_config.weight_decay, mask=_decay_mask),
  )


def init_state(params, optimizer, drift_correction: str = 'none') -> dict:
  """{'step', 'params', 'opt_state'}, plus 'drift' (`drift.init_drift_state`) if one is on."""
  state = {'step': jnp.zeros((), jnp.int32), 'params': params,
           'opt_state': optimizer.init(params)}
  drift = drift_lib.init_drift_state(params, drift_correction)
  if drift is not None:
    state['drift'] = drift
  return state


def loss_and_metrics(params, tokens_bt1, *, graphdef, z_loss: float):
  """Next-token cross-entropy (+ optional z-loss) over a [batch, length+1] token block."""
  inputs_bt, targets_bt = tokens_bt1[:, :-1], tokens_bt1[:, 1:]
  logits_btv = nnx.merge(graphdef, params)(inputs_bt)
  log_z_bt = jax.nn.logsumexp(logits_btv, axis=-1)
  target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
  nll = jnp.mean(log_z_bt - target_logit_bt)
  z_term = z_loss * jnp.mean(jnp.square(log_z_bt))
  return nll + z_term, {'nll': nll, 'z_loss': z_term}


def train_step(state, tokens_bt1, *, graphdef, optimizer, inner_config):
  """One optimizer step over the global batch, accumulating micro-batch gradients."""
  accum = inner_config.grad_accum
  grad_fn = jax.value_and_grad(
      functools.partial(loss_and_metrics, graphdef=graphdef, z_loss=inner_config.z_loss),
      has_aux=True)
  if accum == 1:
    (loss, aux), grads = grad_fn(state['params'], tokens_bt1)
  else:
    # Micro-batch a takes rows a, a+accum, ...: each device keeps its own rows.
    batch, width = tokens_bt1.shape
    micro_abt = tokens_bt1.reshape(batch // accum, accum, width).swapaxes(0, 1)
    micro_abt = constrain(micro_abt, (None, 'batch', 'length'))

    def accumulate(carry, micro_bt1):
      (loss, aux), grads = grad_fn(state['params'], micro_bt1)
      return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, (jnp.zeros(()), {'nll': jnp.zeros(()),
                                                          'z_loss': jnp.zeros(())},
                                          state['params']))
    (loss, aux, grads), _ = jax.lax.scan(accumulate, zeros, micro_abt)
    loss, aux, grads = jax.tree.map(lambda x: x / accum, (loss, aux, grads))
  # SCAFFOLD / FedProx act on the raw gradient, before clipping and AdamW (fedpt/drift.py).
  grads, drift = drift_lib.correct_gradients(grads, state['params'], state.get('drift'),
                                             inner_config.get('prox_mu', 0.0))
  updates, opt_state = optimizer.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  metrics = {'train_loss': aux['nll'], 'loss_with_z': loss, 'grad_norm': optax.tree.norm(grads)}
  new_state = {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}
  if drift is not None:
    new_state['drift'] = drift
  return new_state, metrics


def eval_step(params, tokens_bt1, *, graphdef):
  _, aux = loss_and_metrics(params, tokens_bt1, graphdef=graphdef, z_loss=0.0)
  return aux['nll']


def eval_sums(params, tokens_bt1, weights_bt1, *, graphdef):
  """(sum of weighted next-token losses in nats, sum of weights) over a [batch, length+1] block.

  weights_bt1[:, t] weighs the prediction of token t (column 0 is never predicted);
  a whole-split evaluation uses 0 for padding, so batches of one shape cover any split.
  """
  inputs_bt, targets_bt = tokens_bt1[:, :-1], tokens_bt1[:, 1:]
  weights_bt = weights_bt1[:, 1:]
  logits_btv = nnx.merge(graphdef, params)(inputs_bt).astype(jnp.float32)
  log_z_bt = jax.nn.logsumexp(logits_btv, axis=-1)
  target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
  return jnp.sum((log_z_bt - target_logit_bt) * weights_bt), jnp.sum(weights_bt)
