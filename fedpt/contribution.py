"""What each included delta of a round did to one silo's held-out loss (pure: no bucket I/O).

Silo j scores round r's global update theta_r -> theta_{r+1} on its own held-out sample
(`Trainer.evaluate`'s windows) and splits it between the round's contributors k:

* first order (every mode): value_{k->j} = -g_j . u_k, g_j the gradient of silo j's
  held-out loss L_j at theta_r and u_k silo k's share of the update, the outer step
  linearised at the round's aggregated pseudo-gradient Delta and outer state
  (`jax.linearize` of `outer.outer_step_leaf`): u_k = J(Delta) (c_k Delta_k), c_k its
  weight x clip factor. Exact for fedavg/sgd/diloco, whose step is affine in Delta. What is
  not linear in this round's deltas (the outer momentum's carry, the compressed downlink's
  rounding, Adam's curvature) is `carry`, so sum_k value + carry = -g_j . (theta_{r+1} -
  theta_r). Assumes a small step on a locally linear loss (Koh & Liang 2017's influence
  argument; TracIn, Pruthi et al. 2020, sums such dot products over steps); the measured
  change L_j(theta_r) - L_j(theta_{r+1}) beside it shows how good that is.
* leave-one-out and Shapley (K <= 8 contributors): v(S) = L_j(theta_r) - L_j(theta_S),
  theta_S the outer step from the same theta_r and outer state with only the deltas of S,
  weights renormalised over S as the aggregator does for an included set (v of the empty
  set is 0: the model carries over). LOO_k = v(N) - v(N \\ k); Shapley (Shapley 1953) is
  the exact average of k's marginal v(S + k) - v(S) over orderings, so the values sum to
  v(N) (efficiency). Data Shapley (Ghorbani & Zou 2019) and federated Shapley (Wang et al.
  2020, "A principled approach to data valuation for federated learning") value
  contributors the same way; this is their exact form for one round with the silo's
  held-out loss as the utility. Assumes the aggregator would have produced theta_S had
  only S been included, with the same outer state: what the round did, not what a run
  without k would have done over later rounds.

Values are nats of silo j's held-out loss; positive = the delta lowered it (helped).
"""
from collections.abc import Callable, Mapping, Sequence
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedpt import outer
from fedpt import protocol

MAX_SUBSET_SILOS = 8  # loo / shapley evaluate up to 2^K updates: 256 at K = 8.


def unsupported(run: dict, mode: str) -> tuple[str, str] | None:
  """(why, the fix) if a silo of `run` cannot compute `contribution.mode=mode`, else None."""
  if mode in ('loo', 'shapley') and len(protocol.silo_ids(run)) > MAX_SUBSET_SILOS:
    return (f'it evaluates 2^K subsets of a round\'s deltas, and this run lists '
            f'{len(protocol.silo_ids(run))} silos (at most {MAX_SUBSET_SILOS})',
            "use contribution.mode='first_order', which has no such limit")
  if protocol.fragments(run) > 1:
    return ('a run with federation.fragments > 1 (one fragment a round) is not supported',
            "use contribution.mode='none' in this run")
  if protocol.overlap(run) != 'none':
    return (f'federation.overlap={protocol.overlap(run)!r} is not supported (round r\'s deltas '
            'are not based on global round r)', "use contribution.mode='none' in this run")
  return None


def subset_coefficients(entries: Sequence[dict], silo_weight: Mapping[str, float],
                        subset, clip_multiple: float = 0.0) -> dict[str, float]:
  """{silo: weight x clip factor} the aggregator would give the deltas of `subset` alone.

  `entries` are the manifest's included entries (tokens, measured_norm); a silo of
  weight 0 moves nothing, as in `protocol.decide_round`. {} when nothing in `subset`
  contributes: the model then carries over.
  """
  active = [e for e in entries if e['silo'] in subset and silo_weight[e['silo']] > 0]
  if not active:
    return {}
  weights = outer.aggregation_weights([e['tokens'] for e in active],
                                      [silo_weight[e['silo']] for e in active])
  factors = (outer.clip_factors([e['measured_norm'] for e in active], weights, clip_multiple)
             if clip_multiple else np.ones(len(active)))
  return {e['silo']: float(w * f) for e, w, f in zip(active, weights, factors)}


def shapley_values(value: Mapping[frozenset, float], players: Sequence[str]) -> dict[str, float]:
  """Exact Shapley values of the game `value` (every subset of `players`, {} included).

  phi_k = sum over S not holding k of |S|! (n - |S| - 1)! / n! (v(S + k) - v(S)).
  """
  n = len(players)
  out = {}
  for k in players:
    others = [p for p in players if p != k]
    total = 0.0
    for size in range(n):
      weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
      for subset in itertools.combinations(others, size):
        s = frozenset(subset)
        total += weight * (value[s | {k}] - value[s])
    out[k] = total
  return out


def leave_one_out(value: Mapping[frozenset, float], players: Sequence[str]) -> dict[str, float]:
  """v(N) - v(N \\ k) per player: what the round would have lost without k alone."""
  everyone = frozenset(players)
  return {k: value[everyone] - value[everyone - {k}] for k in players}


def subsets(players: Sequence[str]) -> list[frozenset]:
  return [frozenset(c) for size in range(len(players) + 1)
          for c in itertools.combinations(players, size)]


def _mean(deltas: Mapping[str, Mapping], coefficients: Mapping, like: Mapping) -> dict:
  """{leaf: sum_k c_k Delta_k} in float32, over every silo of `deltas` (c_k 0 outside S)."""
  return {n: sum((coefficients[k] * jnp.asarray(deltas[k][n], jnp.float32)
                  for k in sorted(deltas)), jnp.zeros(jnp.shape(like[n]), jnp.float32))
          for n in like}


@functools.lru_cache(maxsize=8)
def _optimizer(items: tuple):
  return outer.make_outer_optimizer(ml_collections.ConfigDict(dict(items)))


def outer_optimizer(outer_config):
  """`outer.make_outer_optimizer(outer_config)`, one object per distinct config: the jitted
  programs below are keyed by it, so silos sharing a process (threads) compile them once."""
  return _optimizer(tuple(sorted(outer_config.items())))


def _step(optimizer, base: Mapping, state: Mapping, mean: Mapping) -> dict:
  """The aggregator's outer step of every leaf (`outer.outer_step_leaf`), state held fixed."""
  return {n: outer.outer_step_leaf(optimizer, base[n], mean[n], state[n])[0] for n in base}


@functools.partial(jax.jit, static_argnums=0)
def _update(optimizer, base, state, deltas, coefficients):
  return _step(optimizer, base, state, _mean(deltas, coefficients, base))


def outer_update(optimizer, base: Mapping, state: Mapping, deltas: Mapping[str, Mapping],
                 coefficients: Mapping[str, float]) -> dict:
  """theta_S: the leaves of `base` after the outer step of sum_{k in S} c_k Delta_k, S the
  silos of `coefficients` (others weigh 0: one compiled program serves every subset)."""
  return _update(optimizer, dict(base), dict(state), {k: dict(d) for k, d in deltas.items()},
                 {k: jnp.float32(coefficients.get(k, 0.0)) for k in deltas})


@functools.partial(jax.jit, static_argnums=0)
def _first_order(optimizer, grad, base, nxt, state, deltas, coefficients):
  dot = lambda a, b: sum(jnp.vdot(jnp.asarray(a[n], jnp.float32),  # noqa: E731
                                  jnp.asarray(b[n], jnp.float32)) for n in base)
  change = {n: jnp.asarray(nxt[n], jnp.float32) - jnp.asarray(base[n], jnp.float32)
            for n in base}
  if not deltas:
    return {}, -dot(grad, change)
  _, linear = jax.linearize(lambda mean: _step(optimizer, base, state, mean),
                            _mean(deltas, coefficients, base))
  values = {k: -dot(grad, linear({n: coefficients[k] * jnp.asarray(d[n], jnp.float32)
                                  for n in base}))
            for k, d in deltas.items()}
  return values, -dot(grad, change)


def first_order(optimizer, grad: Mapping, base: Mapping, nxt: Mapping, state: Mapping,
                deltas: Mapping[str, Mapping], coefficients: Mapping[str, float]) -> dict:
  """{'values': {k: -g . u_k}, 'total': -g . (theta_{r+1} - theta_r), 'carry'} over the leaves
  of `base` (the shared ones: private leaves are no part of the global update).

  u_k = J(Delta) (c_k Delta_k), J the outer step's Jacobian at the round's mean Delta and
  outer `state`; `coefficients` are the manifest's weight x clip factor per contributor.
  Without `deltas` (secure aggregation) only the total is computed.
  """
  values, total = _first_order(
      optimizer, {n: grad[n] for n in base}, dict(base), {n: nxt[n] for n in base},
      dict(state), {k: dict(d) for k, d in deltas.items()},
      {k: jnp.float32(coefficients[k]) for k in deltas})
  values = {k: float(v) for k, v in values.items()}
  return {'values': values, 'total': float(total), 'carry': float(total) - sum(values.values())}


def subset_game(base_loss: float, loss_of: Callable[[dict], float], optimizer, base: Mapping,
                state: Mapping, deltas: Mapping[str, Mapping], entries: Sequence[dict],
                silo_weight: Mapping[str, float], clip_multiple: float
                ) -> dict[frozenset, float]:
  """v(S) = L(theta_r) - L(theta_S) for every subset S of the contributors (2^K losses);
  `loss_of` scores the leaves of `base` (the shared ones), stepped."""
  value = {}
  for subset in subsets(sorted(deltas)):
    coefficients = subset_coefficients(entries, silo_weight, subset, clip_multiple)
    value[subset] = (0.0 if not coefficients else base_loss - loss_of(
        outer_update(optimizer, base, state, deltas, coefficients)))
  return value


def matrix(records_by_silo: Mapping[str, dict], method: str) -> dict[str, dict[str, float]]:
  """{evaluating silo j: {contributor k: value}} of one round from the silos' records
  (`method`: 'first_order', 'loo' or 'shapley'; a record without it is left out)."""
  return {j: dict(r[method]) for j, r in sorted(records_by_silo.items())
          if isinstance(r.get(method), dict)}


def totals(matrices: Sequence[Mapping[str, Mapping[str, float]]],
           silos: Sequence[str]) -> dict[str, dict]:
  """Per silo over rounds: value its deltas gave the others and itself, and what it received.

  Null values count as nothing; `rows` counts the rounds in which that silo published a
  row with per-silo values (not one under secure aggregation).
  """
  out = {s: {'given_to_others': 0.0, 'to_self': 0.0, 'received': 0.0, 'rows': 0}
         for s in silos}
  for m in matrices:
    for j, row in m.items():
      if j in out:
        out[j]['rows'] += 1
      for k, v in row.items():
        if v is None or k not in out:
          continue
        if k == j:
          out[k]['to_self'] += v
        else:
          out[k]['given_to_others'] += v
          if j in out:
            out[j]['received'] += v
  return out
