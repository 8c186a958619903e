"""The inner (per-silo) optimisation: loss, AdamW or Muon, schedule, pure train and eval steps.

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
from fedpt import sharding
from fedpt.sharding import constrain


def lr_schedule(inner_config, total_steps: int, peak: float | None = None) -> optax.Schedule:
  """Linear warmup, then cosine, linear or constant; DiLoCo keeps it across rounds.

  `peak` (default `inner.lr`): Muon's matrices follow the same shape to `inner.muon_lr`.
  """
  peak = inner_config.lr if peak is None else peak
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


# One layer's hidden matrices in the scanned stack ([layers, ...] leaves: axis 0 is a batch
# axis, one matrix per layer), as Muon's (reduction axes, output axes) of x @ W. An attention
# kernel is one d_model x (heads * head_dim) matrix, as a fused Linear(d, n*h) is in Keller
# Jordan's Muon, Moonlight and MuLoCo: it is one map of the residual stream, and so Muon's
# published learning rates carry over; per-head matrices would orthogonalise n small blocks.
MUON_MATRICES = {
    'q_weight_dnh': ((1,), (2, 3)), 'k_weight_dkh': ((1,), (2, 3)),
    'v_weight_dkh': ((1,), (2, 3)), 'o_weight_nhd': ((1, 2), (3,)),
    'gate_weight_df': ((1,), (2,)), 'up_weight_df': ((1,), (2,)),
    'down_weight_fd': ((1,), (2,)),
}


def muon_dimension_numbers(params):
  """`MuonDimensionNumbers` for each hidden matrix, None for the leaves AdamW trains.

  AdamW keeps the embeddings, the unembedding and the norm scales, as optax, Keller Jordan
  and MuLoCo do: they are lookups, a classifier and vectors, not hidden matmuls.
  """
  def leaf(path, x):
    axes = MUON_MATRICES.get(getattr(path[-1], 'key', None))
    if axes is None:
      return None
    if x.ndim != 1 + len(axes[0]) + len(axes[1]):
      raise ValueError(f'{jax.tree_util.keystr(path)} has shape {x.shape}, not a stack of '
                       'layer matrices: update inner.MUON_MATRICES with the model')
    return optax.contrib.MuonDimensionNumbers(*axes)
  return jax.tree_util.tree_map_with_path(leaf, params)


def _muon_labels(params):
  return jax.tree_util.tree_map_with_path(
      lambda path, _: 'muon' if getattr(path[-1], 'key', None) in MUON_MATRICES else 'adamw',
      params)


def make_optimizer(inner_config, total_steps: int) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW; or with inner.optimizer='muon', Muon for the hidden
  matrices and the same AdamW for the rest, both on the one warmup/decay schedule."""
  step = optax.adamw(lr_schedule(inner_config, total_steps), b1=inner_config.b1,
                      b2=inner_config.b2, eps=inner_config.eps,
                      weight_decay=inner_config.weight_decay, mask=_decay_mask)
  if inner_config.optimizer == 'muon':
    muon = optax.contrib.muon(
        lr_schedule(inner_config, total_steps, peak=inner_config.muon_lr),
        ns_steps=inner_config.muon_ns_steps, beta=inner_config.muon_beta,
        weight_decay=inner_config.muon_weight_decay,
        muon_weight_dimension_numbers=muon_dimension_numbers)
    step = optax.partition({'muon': muon, 'adamw': step}, _muon_labels)
  return optax.chain(
      optax.clip_by_global_norm(inner_config.grad_clip) if inner_config.grad_clip > 0
      else optax.identity(),
      step,
  )


def opt_state_shardings(optimizer, abstract_opt_state, param_shardings, replicated):
  """Each moment sharded as its parameter, every scalar (counts, Muon's coefficients) replicated.

  With Muon each part's moments hold `MaskedNode`s where the other part's params are.
  """
  masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
  return optax.tree_map_params(
      optimizer, lambda moment, s: moment if masked(moment) else s, abstract_opt_state,
      param_shardings, transform_non_params=lambda _: replicated, is_leaf=masked)


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


def private_gradients(params, tokens_bt1, step, noise, *, graphdef, inner_config, clip_norm):
  """DP-SGD's gradient (Abadi et al. 2016): (mean loss, aux, noisy mean of clipped grads).

  Each sequence's gradient (its loss with z-loss) is clipped to `clip_norm` in L2 over the
  whole tree (jax_privacy.clipped_grad: a vmap over examples whose axis keeps the batch's
  sharding), the clipped gradients of the global batch are summed (with grad_accum, over
  its micro-batches: same rows as the plain step's), Gaussian noise of std
  noise_multiplier x clip_norm is added once (jax_privacy's gaussian_privatizer keyed by
  the silo's secret seed and the step), and the sum is divided by the global batch.
  `noise` is (the key's data, uint32[2], and the noise std); `step` the state's.
  """
  # Imported here: only a DP step needs it, and it would add ~1 s to every process's start.
  import jax_privacy  # pylint: disable=g-import-not-at-top
  from jax_privacy import noise_addition  # pylint: disable=g-import-not-at-top
  batch, accum = tokens_bt1.shape[0], inner_config.grad_accum
  loss_fn = functools.partial(loss_and_metrics, graphdef=graphdef, z_loss=inner_config.z_loss)
  with sharding.per_example() as batch_axes:
    grad_fn = jax_privacy.clipped_grad(
        loss_fn, has_aux=True, l2_clip_norm=clip_norm, batch_argnums=1, return_values=True,
        microbatch_size=None if accum == 1 else batch // accum, spmd_axis_name=batch_axes,
        dtype=jnp.float32)
    summed, per_example = grad_fn(params, tokens_bt1)
  key_data, std = noise
  key = jax.random.fold_in(jax.random.wrap_key_data(key_data), step)
  privatizer = noise_addition.gaussian_privatizer(stddev=std, prng_key=key)
  noisy, _ = privatizer.update(summed, privatizer.init(summed))
  grads = jax.tree.map(lambda g, p: (g / batch).astype(p.dtype), noisy, params)
  aux = jax.tree.map(jnp.mean, per_example.aux)
  return jnp.mean(per_example.values), aux, grads


def train_step(state, tokens_bt1, noise=None, *, graphdef, optimizer, inner_config,
               dp_clip_norm=None):
  """One optimizer step over the global batch, accumulating micro-batch gradients.

  `dp_clip_norm` (privacy.dp): the gradient is `private_gradients`' with `noise`; the
  rest (drift correction, the optimizer) is post-processing of it.
  """
  accum = inner_config.grad_accum
  grad_fn = jax.value_and_grad(
      functools.partial(loss_and_metrics, graphdef=graphdef, z_loss=inner_config.z_loss),
      has_aux=True)
  if dp_clip_norm is not None:
    loss, aux, grads = private_gradients(state['params'], tokens_bt1, state['step'], noise,
                                         graphdef=graphdef,
                                         inner_config=inner_config, clip_norm=dp_clip_norm)
  elif accum == 1:
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
  # SCAFFOLD / FedProx act on the raw gradient (DP: the private one), before clipping and
  # AdamW (fedpt/drift.py); SCAFFOLD's control variate sums these gradients.
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


def row_losses(params, tokens_bt1, *, graphdef):
  """Each row's mean next-token loss in nats, [batch]: one score per sequence (watermark.py)."""
  inputs_bt, targets_bt = tokens_bt1[:, :-1], tokens_bt1[:, 1:]
  logits_btv = nnx.merge(graphdef, params)(inputs_bt).astype(jnp.float32)
  log_z_bt = jax.nn.logsumexp(logits_btv, axis=-1)
  target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
  return jnp.mean(log_z_bt - target_logit_bt, axis=-1)
