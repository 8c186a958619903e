"""Client-drift correction for non-IID silos: SCAFFOLD and FedProx, as pure pytree math.

On non-IID silos, H local steps pull each silo towards its own optimum, and the
average of those is not the global optimum (Karimireddy et al. 2019, arXiv
1910.06378, section 3). Both remedies change only the gradient an inner step
feeds to clipping and AdamW (`correct_gradients`, called by `inner.train_step`).

SCAFFOLD (Algorithm 1), paper notation -> fedpt:
  x = the round's global params, y_i = silo i's params, c_i = silo i's control
  variate (its private checkpoint), c = the server control variate (stored with
  every global round), K = H (`federation.inner_steps`, or the steps run when a
  round's time budget ends), eta_l = `inner.lr`, eta_g = `outer.lr`, N = silos in
  the run, S = silos that contribute to the round.
  - inner step (line 10): g <- g + (c - c_i); `correction = c - c_i` is computed
    once per round (`scaffold_state`), so c == c_i gives g + 0 == g bit for bit.
  - control update (line 12, option II): with SGD inner steps
    c_i+ = c_i - c + (x - y_i) / (K eta_l) = (1/K) sum_k (g_k + c - c_i) - c + c_i
    = (1/K) sum_k g_k, the mean of the round's raw stochastic gradients. fedpt's
    inner optimizer is AdamW (its update is not eta_l * g), so the mean raw
    gradient is accumulated directly (`grad_sum`): the same quantity in gradient
    units, at no extra cost. Option I (the gradient at x on a fresh batch) would
    cost an extra pass per round.
  - the silo uploads delta_c_i = c_i+ - c_i (fp32) with its delta and keeps
    c_i + delta_c_i (`control_delta`, `apply_control_delta`), the very float sum
    the server forms, so identical silos keep c == c_i exactly.
  - server (line 17): c <- c + (1/N) sum_{i in S} delta_c_i (`server_control_update`).

FedProx (Li et al. 2018, arXiv 1812.06127, eq. 2): silo i minimises
F_i(w) + mu/2 ||w - w^t||^2, i.e. g <- g + mu (w - w^t), with w^t the round's
global params (the 'anchor', one params copy in the train state) and
mu = `inner.prox_mu`. No protocol change.
"""
import jax
import jax.numpy as jnp


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def init_drift_state(params, kind: str) -> dict | None:
  """The train state's 'drift' entry for `inner.drift_correction` = kind (None for 'none').

  scaffold: {'correction': c - c_i, 'grad_sum': sum of raw grads this round}, fp32;
  fedprox: {'anchor': w^t}, in the params' dtype.
  """
  if kind == 'scaffold':
    zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    return {'correction': zeros, 'grad_sum': jax.tree.map(jnp.copy, zeros)}
  if kind == 'fedprox':
    return {'anchor': jax.tree.map(jnp.copy, params)}
  return None


def scaffold_state(server_control, control) -> dict:
  """A round's start: correction = c - c_i (once per round) and a zero gradient sum."""
  correction = jax.tree.map(lambda c, ci: _f32(c) - _f32(ci), server_control, control)
  return {'correction': correction,
          'grad_sum': jax.tree.map(jnp.zeros_like, correction)}


def fedprox_state(global_params) -> dict:
  """A round's start: the anchor w^t is a copy of the round's global params."""
  return {'anchor': jax.tree.map(jnp.copy, global_params)}


def correct_gradients(grads, params, drift: dict | None, prox_mu: float = 0.0):
  """(the gradient AdamW sees, the next drift state) of one inner step.

  `grads` are the raw minibatch gradients at `params`. SCAFFOLD adds the round's
  correction and adds the raw gradients to `grad_sum`; FedProx adds
  mu (w - w^t). `drift` None: the gradients unchanged.
  """
  if drift is None:
    return grads, None
  if 'correction' in drift:
    corrected = jax.tree.map(lambda g, c: g + c.astype(g.dtype), grads, drift['correction'])
    grad_sum = jax.tree.map(lambda s, g: s + _f32(g), drift['grad_sum'], grads)
    return corrected, {'correction': drift['correction'], 'grad_sum': grad_sum}
  mu = jnp.float32(prox_mu)
  corrected = jax.tree.map(
      lambda g, w, a: (_f32(g) + mu * (_f32(w) - _f32(a))).astype(g.dtype),
      grads, params, drift['anchor'])
  return corrected, drift


def control_delta(grad_sum, steps: int, control):
  """delta_c_i = c_i+ - c_i, with c_i+ = grad_sum / K (option II in gradient units), fp32."""
  if steps < 1:
    raise ValueError(f'a SCAFFOLD round needs at least one inner step, got {steps}')
  return jax.tree.map(lambda s, ci: _f32(s) / jnp.float32(steps) - _f32(ci), grad_sum, control)


def apply_control_delta(control, delta):
  """c_i <- c_i + delta_c_i: the silo's side of the sum the server forms for c."""
  return jax.tree.map(lambda ci, d: _f32(ci) + _f32(d), control, delta)


def server_control_update(server_control, deltas, num_silos: int):
  """c <- c + (1/N) sum_{i in S} delta_c_i (Algorithm 1 line 17); `deltas` may be a generator.

  One leaf (or pytree) per included silo; N is every silo of the run, not |S|.
  """
  weight = jnp.float32(1.0 / num_silos)
  total = None
  for d in deltas:
    term = jax.tree.map(lambda x: weight * _f32(x), d)
    total = term if total is None else jax.tree.map(jnp.add, total, term)
  if total is None:
    return jax.tree.map(_f32, server_control)
  return jax.tree.map(lambda c, t: _f32(c) + t, server_control, total)
