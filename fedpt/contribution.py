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
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from fedpt import outer
from fedpt import protocol

MAX_SUBSET_SILOS = 8  # loo / shapley evaluate up to 2^K updates: 256 at K = 8.


def unsupported(run: dict, mode: str) -> str | None:
  """Why a silo of `run` cannot compute `contribution.mode=mode`, or None."""
  if mode in ('loo', 'shapley') and len(protocol.silo_ids(run)) > MAX_SUBSET_SILOS:
    return (f'{mode!r} evaluates 2^K subsets of a round\'s deltas, and this run lists '
            f'{len(protocol.silo_ids(run))} silos (at most {MAX_SUBSET_SILOS})')
  if protocol.fragments(run) > 1:
    return 'a run with federation.fragments > 1 (one fragment a round) is not supported'
  if protocol.overlap(run) != 'none':
    return (f'federation.overlap={protocol.overlap(run)!r} is not supported (round r\'s deltas '
            'are not based on global round r)')
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


def step_fn(optimizer, base_leaf, leaf_state) -> Callable:
  """mean pseudo-gradient -> the new leaf: the aggregator's outer step, state fixed."""
  return lambda mean: outer.outer_step_leaf(optimizer, base_leaf, mean, leaf_state)[0]


def mean_delta(deltas: Mapping[str, jax.Array], coefficients: Mapping[str, float], like):
  """sum_k c_k Delta_k of one leaf, in float32 (`outer.weighted_mean`'s order and dtype)."""
  names = sorted(coefficients)
  if not names:
    return jnp.zeros(jnp.shape(like), jnp.float32)
  return outer.weighted_mean((deltas[k] for k in names), [coefficients[k] for k in names])


def first_order(grad_flat: Mapping, base_flat: Mapping, next_flat: Mapping,
                deltas_flat: Mapping[str, Mapping], coefficients: Mapping[str, float],
                step_for: Callable[[str], Callable], names: Sequence[str]) -> dict:
  """{'values': {k: -g . u_k}, 'total': -g . (theta_{r+1} - theta_r), 'carry'} over leaves
  `names` (the shared ones: private leaves are no part of the global update).

  `step_for(leaf)` is that leaf's outer step (`step_fn`); `coefficients` are the
  manifest's weight x clip factor per contributor ({} with secure aggregation: only
  the total is computed).
  """
  values = {k: 0.0 for k in coefficients}
  total = 0.0
  for name in names:
    g = jnp.asarray(grad_flat[name], jnp.float32)
    change = (jnp.asarray(next_flat[name], jnp.float32)
              - jnp.asarray(base_flat[name], jnp.float32))
    total -= float(jnp.vdot(g, change))
    if not coefficients:
      continue
    leaf_deltas = {k: deltas_flat[k][name] for k in coefficients}
    _, linear = jax.linearize(step_for(name), mean_delta(leaf_deltas, coefficients, g))
    for k, c in coefficients.items():
      share = linear(jnp.float32(c) * jnp.asarray(leaf_deltas[k], jnp.float32))
      values[k] -= float(jnp.vdot(g, jnp.asarray(share, jnp.float32)))
  return {'values': values, 'total': total, 'carry': total - sum(values.values())}


def subset_params(base_flat: Mapping, deltas_flat: Mapping[str, Mapping],
                  coefficients: Mapping[str, float], step_for: Callable[[str], Callable],
                  names: Sequence[str]) -> dict:
  """theta_S: `base_flat` with leaves `names` stepped by the mean of the deltas in
  `coefficients` (the model carries over when it is empty)."""
  if not coefficients:
    return dict(base_flat)
  out = dict(base_flat)
  for name in names:
    leaf_deltas = {k: deltas_flat[k][name] for k in coefficients}
    out[name] = step_for(name)(mean_delta(leaf_deltas, coefficients, base_flat[name]))
  return out


def subset_game(base_loss: float, loss_of: Callable[[dict], float], base_flat: Mapping,
                deltas_flat: Mapping[str, Mapping], entries: Sequence[dict],
                silo_weight: Mapping[str, float], clip_multiple: float,
                step_for: Callable[[str], Callable], names: Sequence[str]
                ) -> dict[frozenset, float]:
  """v(S) = L(theta_r) - L(theta_S) for every subset S of the contributors (2^K losses)."""
  players = sorted(deltas_flat)
  value = {}
  for subset in subsets(players):
    coefficients = subset_coefficients(entries, silo_weight, subset, clip_multiple)
    value[subset] = (0.0 if not coefficients else base_loss - loss_of(
        subset_params(base_flat, deltas_flat, coefficients, step_for, names)))
  return value


def matrix(records_by_silo: Mapping[str, dict], method: str) -> dict[str, dict[str, float]]:
  """{evaluating silo j: {contributor k: value}} of one round from the silos' records
  (`method`: 'first_order', 'loo' or 'shapley'; a record without it is left out)."""
  return {j: dict(r[method]) for j, r in sorted(records_by_silo.items())
          if isinstance(r.get(method), dict)}


def totals(matrices: Sequence[Mapping[str, Mapping[str, float]]],
           silos: Sequence[str]) -> dict[str, dict]:
  """Per silo over rounds: value its deltas gave the others and itself, and what it received.

  Null values (secure aggregation) count as nothing; `rows` counts the rounds in which
  that silo published a row.
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
