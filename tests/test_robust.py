"""Robust aggregation: numpy references, the poisoning bounds, and config validation."""
import ml_collections
import numpy as np
import pytest

from fedpt import outer

K = 5
POISONED = 2
LR, MOMENTUM = 0.7, 0.9
SHAPES = {'embed_vd': (7, 4), 'mlp/up_weight_df': (4, 6), 'norm/scale': (4,)}


def diloco():
  return outer.make_outer_optimizer(ml_collections.ConfigDict(
      dict(optimizer='diloco', lr=LR, momentum=MOMENTUM)))


def honest_deltas(rng, noise=0.01):
  """K silos pushing the same direction, each with its own small noise."""
  direction = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
  return [{n: (d + noise * rng.standard_normal(d.shape)).astype(np.float32)
           for n, d in direction.items()} for _ in range(K)]


def poison(deltas, scale):
  out = list(deltas)
  out[POISONED] = {n: np.float32(scale) * leaf for n, leaf in deltas[POISONED].items()}
  return out


def aggregate(deltas, weights, method, trim=1, factors=None):
  """The aggregator's loop: per leaf, the chosen aggregate of the silos' deltas."""
  return {n: np.asarray(outer.robust_mean([d[n] for d in deltas], weights, method, trim=trim,
                                          factors=factors)) for n in SHAPES}


def distance(a, b):
  return float(np.sqrt(sum(np.sum((np.float64(a[n]) - b[n]) ** 2) for n in SHAPES)))


def norms(deltas):
  return np.array([outer.delta_norm(d.values()) for d in deltas])


def weights():
  return outer.aggregation_weights([100, 200, 150, 120, 180])


# ------------------------------------------------------------------- references


@pytest.mark.parametrize('k, trim', [(3, 1), (4, 1), (5, 2), (6, 2), (7, 1), (7, 3)])
def test_trimmed_mean_and_median_equal_numpy(k, trim):
  x = np.random.default_rng(k * 10 + trim).standard_normal((k, 3, 5)).astype(np.float32)
  want = np.sort(x, axis=0)[trim:k - trim].mean(axis=0)
  np.testing.assert_allclose(outer.trimmed_mean(list(x), trim), want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(outer.coordinate_median(list(x)), np.median(x, axis=0),
                             rtol=1e-6, atol=1e-6)


def test_robust_mean_dispatch():
  x = np.random.default_rng(0).standard_normal((K, 6)).astype(np.float32)
  w, c = weights(), np.array([1, 1, 0.5, 1, 0.25])
  np.testing.assert_allclose(outer.robust_mean(iter(x), w, 'mean'), outer.weighted_mean(x, w))
  np.testing.assert_allclose(outer.robust_mean(iter(x), w, 'mean', factors=c),
                             np.einsum('k,kd->d', w * c, x), rtol=1e-6, atol=1e-6)
  # Trimmed mean and median are unweighted: weights cannot buy influence.
  skewed = np.array([1e-6, 1e-6, 1 - 4e-6, 1e-6, 1e-6])
  np.testing.assert_allclose(outer.robust_mean(x, skewed, 'trimmed_mean', trim=2),
                             np.median(x, axis=0), rtol=1e-6)
  np.testing.assert_allclose(outer.robust_mean(x, w, 'median', factors=c),
                             np.median(x * c[:, None], axis=0), rtol=1e-6)


def test_clip_factors():
  np.testing.assert_allclose(outer.clip_factors([1, 2, 3, 100], multiple=3.0),
                             [1, 1, 1, 7.5 / 100])
  assert outer.clip_bound([1, 2, 3, 100], 3.0) == 7.5
  np.testing.assert_array_equal(outer.clip_factors([0.0, 1.0, 1.0], multiple=1.0), [1, 1, 1])
  # A silo with weight 0 (not in the round) does not set the median.
  assert outer.clip_bound([1, 1, 50, 50], 2.0, weights=[1, 1, 1, 0]) == 2.0


def test_envelope_holds_for_arbitrary_poison():
  rng = np.random.default_rng(3)
  for k in (3, 4, 5, 6, 7):
    for f in range(1, (k - 1) // 2 + 1):
      honest = rng.standard_normal((k - f, 50)).astype(np.float32)
      bad = (rng.choice([-1e6, 1e6], (f, 50)) * rng.random((f, 50))).astype(np.float32)
      x = np.concatenate([bad, honest])
      lo, hi = outer.honest_envelope(honest)
      for out in (outer.trimmed_mean(x, f), outer.coordinate_median(x)):
        assert np.all(lo <= out) and np.all(out <= hi)


# ------------------------------------------------------------ the poisoning bound


def apply_diloco(global_flat, mean_delta):
  opt = diloco()
  new, _ = outer.outer_step(opt, global_flat, mean_delta, outer.init_outer_state(opt,
                                                                                 global_flat))
  # Nesterov's first step: trace = g, update = -lr * (g + momentum * g).
  for n in SHAPES:
    np.testing.assert_allclose(new[n] - global_flat[n], -LR * (1 + MOMENTUM) * mean_delta[n],
                               rtol=1e-5, atol=1e-6)
  return new


@pytest.mark.parametrize('scale', [100.0, -1.0, -100.0])
@pytest.mark.parametrize('method', ['trimmed_mean', 'median'])
def test_coordinate_methods_bound_a_poisoned_silo(method, scale):
  rng = np.random.default_rng(7)
  clean = honest_deltas(rng)
  bad = poison(clean, scale)
  w = weights()
  honest = [d for k, d in enumerate(clean) if k != POISONED]
  robust_clean, robust_bad = aggregate(clean, w, method), aggregate(bad, w, method)
  bound_sq = 0.0
  for n in SHAPES:
    lo, hi = outer.honest_envelope([d[n] for d in honest])
    assert np.all(lo <= robust_bad[n]) and np.all(robust_bad[n] <= hi)
    bound_sq += outer.coordinate_shift_bound([d[n] for d in honest], K, method, trim=1) ** 2
  bound = np.sqrt(bound_sq)
  assert distance(robust_bad, robust_clean) <= bound * (1 + 1e-6)
  plain = distance(aggregate(bad, w, 'mean'), aggregate(clean, w, 'mean'))
  np.testing.assert_allclose(plain, w[POISONED] * abs(scale - 1) * norms(clean)[POISONED],
                             rtol=1e-4)
  assert plain > 10 * bound

  global_flat = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
  g_clean, g_bad = apply_diloco(global_flat, robust_clean), apply_diloco(global_flat, robust_bad)
  assert distance(g_bad, g_clean) <= LR * (1 + MOMENTUM) * bound * (1 + 1e-5)
  plain_g = distance(apply_diloco(global_flat, aggregate(bad, w, 'mean')),
                     apply_diloco(global_flat, aggregate(clean, w, 'mean')))
  assert plain_g > 10 * LR * (1 + MOMENTUM) * bound


@pytest.mark.parametrize('scale', [100.0, -1.0, -100.0])
def test_norm_clipping_bounds_a_poisoned_silo(scale):
  rng = np.random.default_rng(11)
  multiple = 2.0
  clean = honest_deltas(rng)
  bad = poison(clean, scale)
  w = weights()
  n_clean, n_bad = norms(clean), norms(bad)
  c_clean = outer.clip_factors(n_clean, w, multiple)
  c_bad = outer.clip_factors(n_bad, w, multiple)
  honest = np.arange(K) != POISONED
  np.testing.assert_array_equal(c_bad[honest], 1.0)  # Honest silos are never clipped here.
  agg_clean = aggregate(clean, w, 'mean', factors=c_clean)
  agg_bad = aggregate(bad, w, 'mean', factors=c_bad)

  # The poisoned silo's contribution: w_k * c_k * ||p_k|| <= w_k * m * median(norms), with
  # the median between the honest norms' min and max (f = 1 < K/2).
  median = float(np.median(n_bad))
  assert n_clean[honest].min() <= median <= n_clean[honest].max()
  assert w[POISONED] * c_bad[POISONED] * n_bad[POISONED] <= (
      w[POISONED] * multiple * median * (1 + 1e-9))
  bound = w[POISONED] * (multiple * median + n_clean[POISONED])
  exact = outer.clip_shift_bound(n_clean, n_bad, w, [POISONED], multiple)
  assert exact <= bound * (1 + 1e-9)
  assert distance(agg_bad, agg_clean) <= exact * (1 + 1e-5)

  plain = distance(aggregate(bad, w, 'mean'), aggregate(clean, w, 'mean'))
  if abs(scale) > 1:
    assert plain > 10 * bound
  else:
    # A same-norm sign flip is not clipped: norm bounding only caps the size of a silo's
    # push (<= the bound), not its direction. Coordinate methods handle that case.
    np.testing.assert_allclose(distance(agg_bad, agg_clean), plain, rtol=1e-4)
    assert plain <= bound

  global_flat = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
  g_clean, g_bad = apply_diloco(global_flat, agg_clean), apply_diloco(global_flat, agg_bad)
  assert distance(g_bad, g_clean) <= LR * (1 + MOMENTUM) * bound * (1 + 1e-5)


# ------------------------------------------------------------------- validation


@pytest.mark.parametrize('call, match', [
    (lambda: outer.trimmed_mean(np.zeros((4, 3)), 2), 'trim <= 1'),
    (lambda: outer.trimmed_mean(np.zeros((4, 3)), -1), 'integer >= 0'),
    (lambda: outer.trimmed_mean([np.zeros(3), np.zeros(2), np.zeros(3)], 1), 'same model'),
    (lambda: outer.coordinate_median([]), 'no silo leaves'),
    (lambda: outer.robust_mean(np.zeros((3, 2)), [1, 1, 1], 'krum'), 'one of'),
    (lambda: outer.robust_mean(np.zeros((3, 2)), [1, 1], 'median'), 'one leaf per silo'),
    (lambda: outer.robust_mean(np.zeros((3, 2)), [1, 1, 1], 'mean', factors=[1]),
     'one factor per silo'),
    (lambda: outer.clip_factors([1.0, np.nan]), 'NaN/Inf'),
    (lambda: outer.clip_factors([1.0, 2.0], multiple=0), 'e.g. 3.0'),
    (lambda: outer.clip_factors([1.0, 2.0], weights=[1.0]), 'one weight per silo'),
    (lambda: outer.coordinate_shift_bound(np.zeros((3, 2)), 6, 'trimmed_mean', trim=1),
     'tolerates 1 poisoned silos, not 3'),
])
def test_aggregation_errors_name_the_fix(call, match):
  with pytest.raises(outer.AggregationError, match=match) as info:
    call()
  assert 'Fix:' in str(info.value)


@pytest.mark.parametrize('args, field, match', [
    (('krum', 1, 5, None), 'federation.robust', 'unknown method'),
    (('trimmed_mean', 0, 5, None), 'federation.trim', 'integer >= 1'),
    (('trimmed_mean', 2, 4, None), 'federation.trim', 'trim <= 1'),
    (('trimmed_mean', True, 5, None), 'federation.trim', 'integer'),
    (('median', 1, 2, None), 'federation.robust', 'at least 3 silos'),
    (('mean', 1, 0, None), 'federation.silos', 'at least one silo'),
    (('mean', 1, 5, 0.5), 'federation.clip_multiple', '>= 1'),
    (('mean', 1, 5, float('inf')), 'federation.clip_multiple', 'finite'),
])
def test_check_robust_config_names_field_and_fix(args, field, match):
  with pytest.raises(outer.OuterConfigError, match=match) as info:
    outer.check_robust_config(*args)
  assert info.value.field == field and 'Fix:' in str(info.value)


def test_check_robust_config_accepts_good_settings():
  outer.check_robust_config('mean', 0, 1, None)
  outer.check_robust_config('mean', 0, 4, 3.0)
  outer.check_robust_config('trimmed_mean', 2, 5, 2.0)
  outer.check_robust_config('median', 1, 3, None)
