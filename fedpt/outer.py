"""The outer (cross-silo) DiLoCo step: pseudo-gradients, weighted averaging, outer optimiser.

Each silo publishes `delta_k = global - local_k`. The aggregator averages the deltas
weighted by tokens processed and feeds the mean to an optax "outer" optimiser as if it
were a gradient (Douillard et al. 2023, DiLoCo; Reddi et al. 2021, FedOpt).

The aggregator streams one parameter leaf at a time, so memory stays at a few leaves
whatever the number of silos, and the leaves can be split over processes. For that the
outer optimiser state is kept per leaf, as a flat `{leaf_name: optax_state}` dict. All
outer optimisers here are elementwise, so stepping each leaf separately is exactly the
whole-tree step.
"""
from collections.abc import Iterable, Mapping, Sequence
import hashlib
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedpt import errors
from fedpt.trees import ParamTreeError

OUTER_OPTIMIZERS = ('diloco', 'fedavg', 'fedadam', 'fedyogi', 'sgd')

_MISSING = object()


class OuterConfigError(errors.UserError, ValueError):
  """A bad `outer.*` config value; the message names the field and the fix."""

  def __init__(self, field: str, problem: str, fix: str):
    self.field, self.problem = field, problem
    super().__init__(f'config field {field!r}: {problem}. Fix: {fix}.')


class AggregationError(errors.UserError, ValueError):
  """Bad silo weights or leaves for averaging."""


# ----------------------------------------------------------------------------- config


def _field(outer_config, name: str):
  value = getattr(outer_config, name, _MISSING)
  if value is _MISSING or value is None:
    raise OuterConfigError(f'outer.{name}', 'is missing',
                           f'set outer.{name} in the config (see configs/*.py)')
  return value


def _number(outer_config, name: str) -> float:
  value = _field(outer_config, name)
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
    raise OuterConfigError(f'outer.{name}', f'{value!r} is not a finite number',
                           f'set outer.{name} to a number')
  return float(value)


def _in_unit_interval(outer_config, name: str, why: str) -> float:
  value = _number(outer_config, name)
  if not 0.0 <= value < 1.0:
    raise OuterConfigError(f'outer.{name}', f'{value} is outside [0, 1)',
                           f'set outer.{name} in [0, 1) ({why})')
  return value


def _warmup_rounds(outer_config, name: str) -> int:
  """`outer.<name>` (0 when absent: a run.json from before the field)."""
  value = getattr(outer_config, name, 0)
  value = 0 if value is None else value
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
    raise OuterConfigError(f'outer.{name}', f'{value!r} is not an integer >= 0',
                           f'set outer.{name} to 0 (off) or a number of rounds')
  return int(value)


def warmup_schedule(peak: float, rounds: int) -> optax.Schedule:
  """peak * min(r / rounds, 1) at the r-th outer step (r = 0, 1, ...): 0 first, peak from `rounds` on."""
  return optax.linear_schedule(0.0, peak, rounds)


def make_outer_optimizer(outer_config) -> optax.GradientTransformation:
  """The optax transform that treats the weighted mean pseudo-gradient as a gradient.

  `outer.lr_warmup_rounds` / `momentum_warmup_rounds` > 0 wrap it in
  `optax.inject_hyperparams` with `warmup_schedule`s, whose step count is the
  number of outer steps taken (kept in each leaf's outer state). Momentum
  warm-up is a tuning knob (no DiLoCo/FedOpt paper prescribes it): early
  pseudo-gradients of a fresh model are large and change direction fast, and a
  momentum of 0.9 keeps replaying them. 0 (the default) builds the plain
  transform, so the outer-state layout and the results of earlier runs are unchanged.
  """
  name = _field(outer_config, 'optimizer')
  if name not in OUTER_OPTIMIZERS:
    raise OuterConfigError('outer.optimizer', f'unknown optimizer {name!r}',
                           f'use one of {OUTER_OPTIMIZERS}')
  lr_warmup = _warmup_rounds(outer_config, 'lr_warmup_rounds')
  momentum_warmup = _warmup_rounds(outer_config, 'momentum_warmup_rounds')
  if name == 'fedavg':
    for field, value in (('lr_warmup_rounds', lr_warmup),
                         ('momentum_warmup_rounds', momentum_warmup)):
      if value:
        raise OuterConfigError(f'outer.{field}', f'{value} with fedavg, which has no outer '
                               'lr or momentum (it averages the silos)',
                               f'set outer.{field}=0, or use outer.optimizer=diloco or sgd')
    # Plain averaging of the silos' params: lr 1 makes global - mean(delta) = mean(local).
    return optax.sgd(1.0)

  lr = _number(outer_config, 'lr')
  if lr <= 0:
    raise OuterConfigError('outer.lr', f'{lr} is not positive',
                           'set outer.lr > 0 (DiLoCo uses 0.7 with Nesterov momentum 0.9)')
  lr_arg = warmup_schedule(lr, lr_warmup) if lr_warmup else lr
  if name in ('diloco', 'sgd'):
    momentum = _in_unit_interval(outer_config, 'momentum', 'DiLoCo uses 0.9; 0 disables it')
    if momentum_warmup and not momentum:
      raise OuterConfigError('outer.momentum_warmup_rounds',
                             f'{momentum_warmup} with outer.momentum=0: nothing to warm up',
                             'set outer.momentum > 0, or momentum_warmup_rounds=0')
    momentum_arg = warmup_schedule(momentum, momentum_warmup) if momentum_warmup else momentum
    nesterov = name == 'diloco'
    if lr_warmup or momentum_warmup:
      return optax.inject_hyperparams(optax.sgd, static_args=('nesterov',))(
          learning_rate=lr_arg, momentum=momentum_arg if momentum else None, nesterov=nesterov)
    if nesterov:
      return optax.sgd(lr, momentum=momentum, nesterov=True)
    return optax.sgd(lr, momentum=momentum or None)
  if momentum_warmup:
    raise OuterConfigError('outer.momentum_warmup_rounds',
                           f'{momentum_warmup} with {name}, which has no outer.momentum',
                           'set it to 0, or use outer.optimizer=diloco or sgd')

  b1 = _in_unit_interval(outer_config, 'b1', 'the first-moment decay, typically 0.9')
  b2 = _in_unit_interval(outer_config, 'b2', 'the second-moment decay, typically 0.99')
  eps = _number(outer_config, 'eps')
  if eps <= 0:
    raise OuterConfigError('outer.eps', f'{eps} is not positive',
                           'set outer.eps > 0; FedOpt uses ~1e-3 for the outer Adam/Yogi')
  make = optax.adam if name == 'fedadam' else optax.yogi
  if lr_warmup:
    make = optax.inject_hyperparams(make)
  return make(lr_arg, b1=b1, b2=b2, eps=eps)


# Outer optimizers whose update is linear in the pseudo-gradient given their state:
# OuterOpt(x, s, g + e) = OuterOpt(x, s, g) - eager_coefficient(step) * e.
LINEAR_OUTER_OPTIMIZERS = ('diloco', 'fedavg', 'sgd')


def eager_coefficient(outer_config, step: int) -> float:
  """d(new params)/d(pseudo-gradient) of outer step `step` (0-based), negated: a scalar.

  optax.sgd's update is -lr * g without momentum or with heavy-ball momentum
  (m' = g + mu m), and -lr * (g + mu m') = -lr (1 + mu) g - ... with Nesterov
  (diloco); fedavg is sgd(1). lr and mu are their warm-up schedules' values at
  `step` (the outer state's count). Raises OuterConfigError for Adam/Yogi,
  whose step is not linear in g. Used by federation.overlap='eager'.
  """
  name = _field(outer_config, 'optimizer')
  if name not in LINEAR_OUTER_OPTIMIZERS:
    raise OuterConfigError('outer.optimizer', f'{name!r} is not linear in the pseudo-gradient',
                           f'use one of {LINEAR_OUTER_OPTIMIZERS}')
  if name == 'fedavg':
    return 1.0
  lr = _number(outer_config, 'lr')
  momentum = _number(outer_config, 'momentum')
  lr_warmup = _warmup_rounds(outer_config, 'lr_warmup_rounds')
  momentum_warmup = _warmup_rounds(outer_config, 'momentum_warmup_rounds')
  lr_t = float(warmup_schedule(lr, lr_warmup)(step)) if lr_warmup else lr
  mu_t = float(warmup_schedule(momentum, momentum_warmup)(step)) if momentum_warmup else momentum
  return lr_t * (1.0 + mu_t) if name == 'diloco' else lr_t


def last_hyperparams(leaf_state) -> dict:
  """{'learning_rate', 'momentum', ...} the last outer step of a warmed-up leaf used.

  After the outer step of the r-th aggregated round (r = 0, 1, ...) that is
  `warmup_schedule(peak, rounds)(r)`; {} for a plain (no warm-up) state.
  """
  return {k: float(v) for k, v in getattr(leaf_state, 'hyperparams', {}).items()
          if v is not None}


# ---------------------------------------------------------------------- aggregation


def pseudo_gradient(global_params, local_params):
  """`global - local` in float32: what a silo publishes after its H inner steps."""
  global_struct = jax.tree.structure(global_params)
  local_struct = jax.tree.structure(local_params)
  if global_struct != local_struct:
    raise ParamTreeError(f'global and local params differ in structure: {global_struct} vs '
                         f'{local_struct}. Fix: pass params of the same model')
  return jax.tree.map(
      lambda g, l: jnp.asarray(g, jnp.float32) - jnp.asarray(l, jnp.float32),
      global_params, local_params)


def aggregation_weights(tokens: Sequence[int],
                        silo_weights: Sequence[float] | None = None) -> np.ndarray:
  """Per-silo weights `tokens * silo_weight`, normalised to sum to 1 (float64)."""
  tokens = np.asarray(tokens, np.float64)
  if tokens.ndim != 1 or tokens.size == 0:
    raise AggregationError(f'tokens must be a non-empty list, one count per silo; got shape '
                           f'{tokens.shape}. Fix: pass the tokens each silo processed')
  raw = tokens
  if silo_weights is not None:
    silo_weights = np.asarray(silo_weights, np.float64)
    if silo_weights.shape != tokens.shape:
      raise AggregationError(f'{silo_weights.size} silo weights for {tokens.size} silos. '
                             'Fix: pass one weight per silo, or None')
    raw = tokens * silo_weights
  if not np.all(np.isfinite(raw)) or np.any(tokens < 0) or np.any(raw < 0):
    raise AggregationError(f'tokens and silo weights must be finite and >= 0; got tokens '
                           f'{tokens.tolist()}, weights '
                           f'{None if silo_weights is None else silo_weights.tolist()}. '
                           'Fix: check the silos\' reported token counts')
  total = raw.sum()
  if total <= 0:
    raise AggregationError('all silos have zero weight (no tokens, or zero silo weights). '
                           'Fix: aggregate only rounds in which some silo trained')
  return raw / total


def weighted_mean(leaves: Iterable, weights) -> jax.Array:
  """`sum_k w_k * leaf_k` in float32, adding one silo at a time so that only one is held.

  `leaves` may be a generator (e.g. reading each silo's delta from disk in turn).
  """
  weights = np.asarray(weights, np.float64)
  total = None
  count = 0
  for count, leaf in enumerate(leaves, start=1):
    if count > weights.size:
      raise AggregationError(f'more leaves than the {weights.size} weights. '
                             'Fix: pass one weight per silo')
    leaf = jnp.asarray(leaf, jnp.float32)
    if total is None:
      total = jnp.zeros(leaf.shape, jnp.float32)
    elif leaf.shape != total.shape:
      raise AggregationError(f'silo {count - 1} leaf has shape {leaf.shape}, the first '
                             f'{total.shape}. Fix: all silos must train the same model')
    total = total + jnp.float32(weights[count - 1]) * leaf
  if count != weights.size:
    raise AggregationError(f'{count} leaves for {weights.size} weights. '
                           'Fix: pass one leaf per silo')
  return total


# ----------------------------------------------------------------------- outer step


def init_outer_state(optimizer: optax.GradientTransformation, params_flat: Mapping) -> dict:
  """Per-leaf optax state, kept in float32 so small outer updates are not lost."""
  return {name: optimizer.init(jnp.zeros(jnp.shape(leaf), jnp.float32))
          for name, leaf in params_flat.items()}


def outer_step_leaf(optimizer, global_leaf, mean_delta_leaf, leaf_state):
  """One outer-optimiser step on one leaf; returns the leaf in its own dtype and new state."""
  global_f32 = jnp.asarray(global_leaf, jnp.float32)
  updates, new_state = optimizer.update(jnp.asarray(mean_delta_leaf, jnp.float32), leaf_state,
                                        global_f32)
  new_global = optax.apply_updates(global_f32, updates)
  return new_global.astype(jnp.result_type(global_leaf)), new_state


# Compiled once per (optimizer, leaf shape); the optimizer is a hashable NamedTuple.
_outer_step_leaf_jit = jax.jit(outer_step_leaf, static_argnums=0)


def outer_step(optimizer, global_flat: Mapping, mean_delta_flat: Mapping, state: Mapping,
               leaf_names: Sequence[str] | None = None) -> tuple[dict, dict]:
  """Steps every leaf, or only `leaf_names` (one process's shard); returns those leaves."""
  names = sorted(global_flat) if leaf_names is None else list(leaf_names)
  for where, mapping in (('global params', global_flat), ('mean deltas', mean_delta_flat),
                         ('outer state', state)):
    missing = [n for n in names if n not in mapping]
    if missing:
      raise ParamTreeError(f'{len(missing)} leaves missing from the {where}, e.g. '
                           f'{missing[:3]}. Fix: use the same model and shard for all inputs '
                           '(init_outer_state on the global params)')
  new_global, new_state = {}, {}
  for name in names:
    if jnp.shape(global_flat[name]) != jnp.shape(mean_delta_flat[name]):
      raise ParamTreeError(f'leaf {name!r}: global shape {jnp.shape(global_flat[name])} vs '
                           f'delta shape {jnp.shape(mean_delta_flat[name])}. '
                           'Fix: all silos must train the same model')
    new_global[name], new_state[name] = _outer_step_leaf_jit(
        optimizer, global_flat[name], mean_delta_flat[name], state[name])
  return new_global, new_state


def shard_leaf_names(names: Sequence[str], shard_index: int, num_shards: int,
                     sizes: Mapping[str, int] | None = None) -> list[str]:
  """This process's leaves: a deterministic partition, balanced by bytes when `sizes` given.

  Without sizes, leaves go round-robin in sorted order. With sizes, largest first (ties by
  name) to the least-loaded shard (ties by lowest index): the classic LPT greedy.
  """
  if isinstance(num_shards, bool) or not isinstance(num_shards, numbers.Integral) \
      or num_shards < 1:
    raise ParamTreeError(f'num_shards={num_shards!r} must be an integer >= 1. '
                         'Fix: pass --shard=i/n with n >= 1')
  if isinstance(shard_index, bool) or not isinstance(shard_index, numbers.Integral) \
      or not 0 <= shard_index < num_shards:
    raise ParamTreeError(f'shard index {shard_index!r} is outside [0, {num_shards}). '
                         f'Fix: pass --shard=i/{num_shards} with 0 <= i < {num_shards}')
  ordered = sorted(names)
  if len(set(ordered)) != len(ordered):
    raise ParamTreeError('duplicate leaf names. Fix: pass each leaf name once')
  if sizes is None:
    return ordered[shard_index::num_shards]
  missing = [n for n in ordered if n not in sizes]
  if missing:
    raise ParamTreeError(f'no size for leaves {missing[:3]}. Fix: pass a size for every leaf')
  if any(sizes[n] < 0 for n in ordered):
    raise ParamTreeError('leaf sizes must be >= 0. Fix: pass sizes in bytes')
  loads = [0] * num_shards
  mine = []
  for name in sorted(ordered, key=lambda n: (-sizes[n], n)):
    target = min(range(num_shards), key=lambda i: (loads[i], i))
    loads[target] += sizes[name]
    if target == shard_index:
      mine.append(name)
  return sorted(mine)


def leaf_nbytes(params_flat: Mapping) -> dict:
  """`{name: bytes}` for `shard_leaf_names(sizes=...)`."""
  return {name: int(np.prod(jnp.shape(leaf), dtype=np.int64)) * jnp.result_type(leaf).itemsize
          for name, leaf in params_flat.items()}



# ------------------------------------------------------------------ robust aggregation
#
# Byzantine-robust alternatives to the token-weighted mean (Yin et al. 2018,
# arXiv 1803.01498; norm bounding: Sun et al. 2019, arXiv 1911.07963). The guarantees,
# for f poisoned silos out of K, whatever values the poisoned silos send:
#
#   trimmed_mean, trim >= f, per coordinate j:   min_H x_kj <= out_j <= max_H x_kj
#   coordinate_median, f < K/2: the same (it is trimmed_mean with trim = (K-1)//2).
#
# H is the honest silos. Both the clean and the poisoned outputs lie in that envelope, so
# ||out_poisoned - out_clean||_2 <= ||max_H x - min_H x||_2 (`coordinate_shift_bound`).
# Norm clipping (`clip_factors`, then the weighted mean with weights w_k * c_k) caps the
# poisoned silo k's contribution at w_k * multiple * median(norms) in L2, and with
# f < K/2 that median lies within the honest norms (`clip_shift_bound`).

ROBUST_METHODS = ('mean', 'trimmed_mean', 'median')


def _check_norms(norms) -> np.ndarray:
  norms = np.asarray(norms, np.float64)
  if norms.ndim != 1 or norms.size == 0:
    raise AggregationError(f'norms must be a non-empty list, one per silo; got shape '
                           f'{norms.shape}. Fix: pass each silo\'s full-delta L2 norm')
  if not np.all(np.isfinite(norms)) or np.any(norms < 0):
    raise AggregationError(f'norms must be finite and >= 0; got {norms.tolist()}. '
                           'Fix: reject silos with NaN/Inf deltas before clipping')
  return norms


def _check_multiple(multiple) -> float:
  if isinstance(multiple, bool) or not isinstance(multiple, numbers.Real) \
      or not math.isfinite(multiple) or multiple <= 0:
    raise AggregationError(f'clip multiple {multiple!r} is not a finite number > 0. '
                           'Fix: use e.g. 3.0 (clip at 3x the median silo norm)')
  return float(multiple)


def delta_norm(leaves: Iterable) -> float:
  """Full-delta L2 norm, streamed leaf by leaf (the aggregator's validation pass)."""
  total = 0.0
  for leaf in leaves:
    leaf = np.asarray(leaf, np.float64)
    total += float(np.vdot(leaf, leaf))
  return math.sqrt(total)


def clip_bound(norms, multiple: float = 3.0, weights=None) -> float:
  """`multiple * median(norms)`: a bound the honest majority sets, not any one silo.

  The median is unweighted, so a silo claiming huge token counts cannot move it; silos
  with weight 0 (not in this round) do not take part.
  """
  norms = _check_norms(norms)
  multiple = _check_multiple(multiple)
  if weights is not None:
    weights = np.asarray(weights, np.float64)
    if weights.shape != norms.shape:
      raise AggregationError(f'{weights.size} weights for {norms.size} norms. '
                             'Fix: pass one weight per silo, or None')
    if not np.any(weights > 0):
      raise AggregationError('all silos have zero weight. '
                             'Fix: aggregate only rounds in which some silo trained')
    norms = norms[weights > 0]
  return multiple * float(np.median(norms))


def clip_factors(norms, weights=None, multiple: float = 3.0) -> np.ndarray:
  """Per-silo `min(1, bound / norm_k)` (1 for a zero delta), bound = `clip_bound`.

  Scale silo k's delta by factor_k, i.e. call `weighted_mean(leaves, weights * factors)`:
  a 100x-scaled delta then weighs no more than one at the bound. The norms must be of the
  full delta (all leaves), so the aggregator computes them in its validation pass.
  """
  bound = clip_bound(norms, multiple, weights)
  norms = np.asarray(norms, np.float64)
  safe = np.where(norms > 0, norms, 1.0)
  return np.where(norms > bound, bound / safe, 1.0)


def norm_outliers(norms, multiple: float) -> list[bool]:
  """Which deltas have a norm above `multiple` x the median norm of the *other* silos.

  Leave-one-out, so that with two silos the big one is caught and the small one is not
  (a median including the outlier itself would be halfway up). A lone silo is never an
  outlier: there is nothing to compare it with.
  """
  norms = np.asarray(norms, np.float64)
  if len(norms) < 2:
    return [False] * len(norms)
  return [bool(norms[k] > multiple * np.median(np.delete(norms, k)))
          for k in range(len(norms))]


def randomly_dropped(run_id: str, round_index: int, silo: str, probability: float) -> bool:
  """Whether the delta of (run, round, silo) is lost, as DiLoCo's communication-drop ablation.

  A hash rather than an RNG so that the decision is the same after an aggregator restart
  and differs between runs (seeds) without any state.
  """
  if probability <= 0:
    return False
  digest = hashlib.sha256(f'{run_id}/{round_index}/{silo}'.encode()).digest()
  return int.from_bytes(digest[:8], 'little') / 2.0**64 < probability


def _stack(leaves: Iterable) -> jax.Array:
  leaves = [jnp.asarray(leaf, jnp.float32) for leaf in leaves]
  if not leaves:
    raise AggregationError('no silo leaves. Fix: aggregate only rounds with included silos')
  shapes = {leaf.shape for leaf in leaves}
  if len(shapes) != 1:
    raise AggregationError(f'silo leaves have different shapes {sorted(shapes)}. '
                           'Fix: all silos must train the same model')
  return jnp.stack(leaves)


def _check_trim(trim, num_silos: int) -> int:
  if isinstance(trim, bool) or not isinstance(trim, numbers.Integral) or trim < 0:
    raise AggregationError(f'trim={trim!r} is not an integer >= 0. '
                           'Fix: trim by the number of Byzantine silos to tolerate, e.g. 1')
  if 2 * trim >= num_silos:
    raise AggregationError(
        f'trim={trim} drops all {num_silos} silos (need 2 * trim < {num_silos}). '
        f'Fix: use trim <= {(num_silos - 1) // 2}, or wait for more silos')
  return int(trim)


def trimmed_mean(leaves: Sequence, trim: int) -> jax.Array:
  """Per coordinate, drops the `trim` largest and smallest silo values; averages the rest.

  Unweighted on purpose: token weights are self-reported, so a Byzantine silo claiming
  huge token counts would otherwise regain the influence that trimming takes away.
  It needs the K leaves of one parameter at once (K x leaf memory, not K x model).
  With trim >= f poisoned silos each output coordinate lies in the honest [min, max].
  """
  stacked = _stack(leaves)
  trim = _check_trim(trim, stacked.shape[0])
  kept = jnp.sort(stacked, axis=0)[trim:stacked.shape[0] - trim]
  return jnp.mean(kept, axis=0)


def coordinate_median(leaves: Sequence) -> jax.Array:
  """Per-coordinate median (mean of the middle two for even K); robust to f < K/2."""
  stacked = _stack(leaves)
  # The median is the trimmed mean with trim = (K-1)//2, hence the same honest envelope.
  return trimmed_mean(stacked, (stacked.shape[0] - 1) // 2)


def robust_mean(leaves: Iterable, weights, method: str = 'mean', *, trim: int = 1,
                factors=None) -> jax.Array:
  """One leaf's aggregate by `method` in ROBUST_METHODS.

  'mean' is `weighted_mean` and still streams one silo at a time; the others hold all
  K leaves. `factors` (from `clip_factors`) scale each silo's delta first; for 'mean'
  that is the clipped weighted mean. `weights` only weigh 'mean' but must match K always.
  """
  if method not in ROBUST_METHODS:
    raise AggregationError(f'unknown robust method {method!r}. '
                           f'Fix: use one of {ROBUST_METHODS}')
  weights = np.asarray(weights, np.float64)
  if factors is not None:
    factors = np.asarray(factors, np.float64)
    if factors.shape != weights.shape:
      raise AggregationError(f'{factors.size} clip factors for {weights.size} weights. '
                             'Fix: pass one factor per silo (clip_factors), or None')
  if method == 'mean':
    return weighted_mean(leaves, weights if factors is None else weights * factors)
  stacked = _stack(leaves)
  if stacked.shape[0] != weights.size:
    raise AggregationError(f'{stacked.shape[0]} leaves for {weights.size} weights. '
                           'Fix: pass one leaf per silo')
  if factors is not None:
    stacked = stacked * jnp.asarray(factors, jnp.float32).reshape(
        (-1,) + (1,) * (stacked.ndim - 1))
  if method == 'trimmed_mean':
    return trimmed_mean(stacked, trim)
  return coordinate_median(stacked)


def tolerated_byzantine(method: str, num_silos: int, trim: int = 1) -> int:
  """The largest f for which the envelope guarantee holds (0 for the plain mean)."""
  if method == 'trimmed_mean':
    return _check_trim(trim, num_silos)
  if method == 'median':
    return (num_silos - 1) // 2
  if method == 'mean':
    return 0
  raise AggregationError(f'unknown robust method {method!r}. Fix: use one of {ROBUST_METHODS}')


def honest_envelope(honest_leaves: Sequence) -> tuple[jax.Array, jax.Array]:
  """Per-coordinate (min, max) over the honest silos: where robust outputs must lie."""
  stacked = _stack(honest_leaves)
  return jnp.min(stacked, axis=0), jnp.max(stacked, axis=0)


def coordinate_shift_bound(honest_leaves: Sequence, num_silos: int, method: str,
                           trim: int = 1) -> float:
  """`||max_H x - min_H x||_2`: how far f poisoned silos can move a robust aggregate.

  Bounds `||agg(poisoned) - agg(clean)||_2` for trimmed_mean / median, since both lie in
  the honest envelope. Raises if f = num_silos - |H| exceeds what the method tolerates.
  """
  honest = _stack(honest_leaves)
  f = num_silos - honest.shape[0]
  if f < 0:
    raise AggregationError(f'{honest.shape[0]} honest leaves for {num_silos} silos. '
                           'Fix: pass at most one leaf per silo')
  tolerated = tolerated_byzantine(method, num_silos, trim)
  if f > tolerated:
    raise AggregationError(f'{method} with {num_silos} silos (trim={trim}) tolerates '
                           f'{tolerated} poisoned silos, not {f}; there is no bound. '
                           'Fix: raise trim, use median, or add silos')
  lo, hi = jnp.min(honest, axis=0), jnp.max(honest, axis=0)
  return float(jnp.linalg.norm((hi - lo).ravel()))


def clip_shift_bound(clean_norms, poisoned_norms, weights, poisoned: Sequence[int],
                     multiple: float = 3.0) -> float:
  """Bound on `||clipped_mean(poisoned) - clipped_mean(clean)||_2` (same weights).

  With B = multiple * median(norms) and n_k the clean norms (B', n'_k when poisoned):
    sum_{k poisoned} w_k (min(n'_k, B') + min(n_k, B))
    + sum_{k honest} w_k |min(n_k, B') - min(n_k, B)|.
  The poisoned term is at most w_k (B' + n_k); the honest term is 0 when no honest silo
  is clipped (max honest norm <= min(B, B')). With f < K/2, median(poisoned_norms) lies
  in the honest norms' [min, max], so B' <= multiple * max honest norm whatever is sent.
  """
  clean_norms, poisoned_norms = _check_norms(clean_norms), _check_norms(poisoned_norms)
  weights = np.asarray(weights, np.float64)
  if not clean_norms.shape == poisoned_norms.shape == weights.shape:
    raise AggregationError(f'{clean_norms.size} clean norms, {poisoned_norms.size} poisoned '
                           f'norms, {weights.size} weights. Fix: pass one of each per silo')
  bad = np.zeros(weights.shape, bool)
  bad[list(poisoned)] = True
  b_clean = clip_bound(clean_norms, multiple, weights)
  b_poison = clip_bound(poisoned_norms, multiple, weights)
  cap_clean = np.minimum(clean_norms, b_clean)
  poison_term = weights * (np.minimum(poisoned_norms, b_poison) + cap_clean)
  honest_term = weights * np.abs(np.minimum(clean_norms, b_poison) - cap_clean)
  return float(np.sum(np.where(bad, poison_term, honest_term)))


def check_robust_config(method, trim, num_silos: int, clip_multiple=None) -> None:
  """Config-time checks of `federation.robust/trim/clip_multiple` (None: no clipping).

  `num_silos` is the fewest silos a round may include (the quorum), since trimming must
  leave at least one value even then.
  """
  if method not in ROBUST_METHODS:
    raise OuterConfigError('federation.robust', f'unknown method {method!r}',
                           f'use one of {ROBUST_METHODS}')
  if isinstance(num_silos, bool) or not isinstance(num_silos, numbers.Integral) \
      or num_silos < 1:
    raise OuterConfigError('federation.silos', f'{num_silos!r} silos per round',
                           'list at least one silo (and min_silos >= 1 if set)')
  if method == 'trimmed_mean':
    if isinstance(trim, bool) or not isinstance(trim, numbers.Integral) or trim < 1:
      raise OuterConfigError('federation.trim', f'{trim!r} is not an integer >= 1',
                             'set trim to the number of Byzantine silos to tolerate '
                             "(trim 0 is an unweighted mean; use robust='mean' instead)")
    if 2 * trim >= num_silos:
      raise OuterConfigError(
          'federation.trim', f'trim={trim} drops all of a round of {num_silos} silos',
          f'use trim <= {(num_silos - 1) // 2}, or raise federation.min_silos')
  if method == 'median' and num_silos < 3:
    raise OuterConfigError('federation.robust',
                           f'the median of {num_silos} silos tolerates no poisoned silo',
                           "use robust='mean' with clip_multiple, or at least 3 silos")
  if clip_multiple is not None:
    if isinstance(clip_multiple, bool) or not isinstance(clip_multiple, numbers.Real) \
        or not math.isfinite(clip_multiple):
      raise OuterConfigError('federation.clip_multiple',
                             f'{clip_multiple!r} is not a finite number',
                             'set it to e.g. 3.0, or None to disable clipping')
    if clip_multiple < 1:
      raise OuterConfigError('federation.clip_multiple',
                             f'{clip_multiple} < 1 clips the median honest silo itself',
                             'use >= 1 (e.g. 2 or 3), or None to disable clipping')
