"""Outer step: numpy references for Nesterov and FedAvg, per-leaf == whole-tree, sharding."""
import jax
import ml_collections
import numpy as np
import optax
import pytest

from fedpt import outer
from fedpt import trees

SHAPES = {'embed_vd': (11, 6), 'blocks': {'mlp': {'up_weight_df': (2, 6, 5),
                                                  'down_weight_fd': (2, 5, 6)},
                                          'attn_norm': {'scale': (2, 6)}},
          'final_norm': {'scale': (6,)}, 'bias': ()}


def outer_config(**overrides):
  fields = dict(optimizer='diloco', lr=0.7, momentum=0.9, b1=0.9, b2=0.99, eps=1e-3)
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def random_tree(rng, scale=1.0):
  return jax.tree.map(lambda shape: np.asarray(scale * rng.standard_normal(shape), np.float32),
                      SHAPES, is_leaf=lambda x: isinstance(x, tuple))


def aggregate(global_flat, locals_flat, weights):
  """The aggregator's streaming loop: per leaf, weighted mean of the silos' deltas."""
  return {name: outer.weighted_mean(
      (outer.pseudo_gradient(global_flat[name], local[name]) for local in locals_flat), weights)
          for name in global_flat}


def test_flatten_round_trip_and_sorted_names():
  tree = random_tree(np.random.default_rng(0))
  flat = trees.flatten_params(tree)
  assert list(flat) == sorted(flat)
  assert 'blocks/mlp/up_weight_df' in flat and 'bias' in flat
  back = trees.unflatten_params(flat)
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('bad, match', [
    ({'a': [np.zeros(2)]}, 'not a dict or an array'),
    ({'a': None}, 'not a dict or an array'),
    ({'a/b': np.zeros(2)}, 'without'),
    ({1: np.zeros(2)}, 'string'),
    ({'a': {}}, 'empty'),
    ([np.zeros(2)], 'not a dict'),
])
def test_flatten_rejects_non_dict_trees(bad, match):
  with pytest.raises(trees.ParamTreeError, match=match):
    trees.flatten_params(bad)


def test_pseudo_gradient_is_float32_global_minus_local():
  rng = np.random.default_rng(1)
  g, l = random_tree(rng), random_tree(rng)
  delta = outer.pseudo_gradient(g, jax.tree.map(lambda x: x.astype(np.float16), l))
  for d, a, b in zip(jax.tree.leaves(delta), jax.tree.leaves(g), jax.tree.leaves(l)):
    assert d.dtype == np.float32
    np.testing.assert_allclose(d, a - b.astype(np.float16).astype(np.float32), rtol=1e-6)
  with pytest.raises(outer.ParamTreeError, match='structure'):
    outer.pseudo_gradient(g, {'x': np.zeros(1)})


def test_weighted_mean_equals_np_average():
  rng = np.random.default_rng(2)
  leaves = [rng.standard_normal((7, 3)).astype(np.float32) for _ in range(4)]
  weights = outer.aggregation_weights([100, 300, 0, 600])
  np.testing.assert_allclose(weights, [0.1, 0.3, 0.0, 0.6])
  expected = np.average(np.stack(leaves), axis=0, weights=weights)
  np.testing.assert_allclose(outer.weighted_mean(iter(leaves), weights), expected,
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(
      outer.aggregation_weights([100, 100], silo_weights=[1.0, 3.0]), [0.25, 0.75])
  with pytest.raises(outer.AggregationError, match='one leaf per silo'):
    outer.weighted_mean(leaves[:3], weights)
  with pytest.raises(outer.AggregationError, match='same model'):
    outer.weighted_mean([leaves[0], leaves[1][:2]], [0.5, 0.5])


@pytest.mark.parametrize('tokens, silo_weights, match', [
    ([0, 0], None, 'zero weight'),
    ([10, -1], None, '>= 0'),
    ([10, 10], [1.0, -1.0], '>= 0'),
    ([10, 10], [1.0], 'one weight per silo'),
    ([], None, 'non-empty'),
])
def test_aggregation_weights_rejects_bad_input(tokens, silo_weights, match):
  with pytest.raises(outer.AggregationError, match=match):
    outer.aggregation_weights(tokens, silo_weights)


def test_diloco_matches_hand_written_weighted_nesterov_over_three_rounds():
  lr, mu = 0.7, 0.9
  tokens = [1000, 3000, 6000]
  rng = np.random.default_rng(3)
  optimizer = outer.make_outer_optimizer(outer_config(lr=lr, momentum=mu))
  global_flat = trees.flatten_params(random_tree(rng))
  state = outer.init_outer_state(optimizer, global_flat)

  ref_global = {n: v.astype(np.float64) for n, v in global_flat.items()}
  ref_trace = {n: np.zeros_like(v) for n, v in ref_global.items()}
  w = np.array(tokens, np.float64) / sum(tokens)
  for _ in range(3):
    # Each silo drifts from the current global params.
    locals_flat = [{n: (v - 0.1 * rng.standard_normal(v.shape)).astype(np.float32)
                    for n, v in global_flat.items()} for _ in tokens]
    mean_delta = aggregate(global_flat, locals_flat, outer.aggregation_weights(tokens))
    global_flat, state = outer.outer_step(optimizer, global_flat, mean_delta, state)
    for n in ref_global:
      g = sum(w_k * (ref_global[n] - local[n]) for w_k, local in zip(w, locals_flat))
      ref_trace[n] = g + mu * ref_trace[n]
      ref_global[n] = ref_global[n] - lr * (g + mu * ref_trace[n])
      np.testing.assert_allclose(global_flat[n], ref_global[n], rtol=1e-5, atol=1e-5)
      ref_global[n] = np.asarray(global_flat[n], np.float64)  # No float32 drift across rounds.
  assert all(global_flat[n].dtype == np.float32 for n in global_flat)


def test_fedavg_gives_token_weighted_mean_of_local_params():
  tokens = [500, 1500, 3000]
  rng = np.random.default_rng(4)
  global_flat = trees.flatten_params(random_tree(rng))
  locals_flat = [trees.flatten_params(random_tree(rng)) for _ in tokens]
  optimizer = outer.make_outer_optimizer(outer_config(optimizer='fedavg', lr=123.0))
  mean_delta = aggregate(global_flat, locals_flat, outer.aggregation_weights(tokens))
  new_global, _ = outer.outer_step(optimizer, global_flat, mean_delta,
                                   outer.init_outer_state(optimizer, global_flat))
  for n in global_flat:
    expected = np.average(np.stack([l[n] for l in locals_flat]), axis=0, weights=tokens)
    np.testing.assert_allclose(new_global[n], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', ['diloco', 'fedadam', 'fedyogi', 'sgd'])
def test_per_leaf_step_equals_whole_tree_optax_step(name):
  rng = np.random.default_rng(5)
  optimizer = outer.make_outer_optimizer(outer_config(optimizer=name, lr=0.3))
  tree = random_tree(rng)
  tree_state = optimizer.init(tree)
  flat = trees.flatten_params(tree)
  flat_state = outer.init_outer_state(optimizer, flat)
  for _ in range(3):
    delta = random_tree(rng, scale=0.05)
    updates, tree_state = optimizer.update(delta, tree_state, tree)
    tree = optax.apply_updates(tree, updates)
    flat, flat_state = outer.outer_step(optimizer, flat, trees.flatten_params(delta), flat_state)
  expected = trees.flatten_params(tree)
  assert list(flat) == list(expected)
  for n in flat:
    np.testing.assert_allclose(flat[n], expected[n], rtol=1e-6, atol=1e-6)
    # The optimizer state (e.g. Adam moments, counts) matches leaf by leaf too.
    expected_leaf_state = jax.tree.map(
        lambda x: trees.flatten_params(x)[n] if isinstance(x, dict) else x, tree_state,
        is_leaf=lambda x: isinstance(x, dict))
    assert jax.tree.structure(flat_state[n]) == jax.tree.structure(expected_leaf_state)
    for a, b in zip(jax.tree.leaves(flat_state[n]), jax.tree.leaves(expected_leaf_state)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_sharded_outer_step_equals_unsharded():
  rng = np.random.default_rng(6)
  optimizer = outer.make_outer_optimizer(outer_config(optimizer='fedadam', lr=0.1))
  global_flat = trees.flatten_params(random_tree(rng))
  delta_flat = trees.flatten_params(random_tree(rng, scale=0.1))
  state = outer.init_outer_state(optimizer, global_flat)
  full_global, full_state = outer.outer_step(optimizer, global_flat, delta_flat, state)

  sizes = outer.leaf_nbytes(global_flat)
  for use_sizes in (None, sizes):
    shards = [outer.shard_leaf_names(list(global_flat), i, 3, use_sizes) for i in range(3)]
    assert sorted(sum(shards, [])) == sorted(global_flat)  # Disjoint and complete.
    merged_global, merged_state = {}, {}
    for names in shards:
      part_global, part_state = outer.outer_step(optimizer, global_flat, delta_flat, state,
                                                 leaf_names=names)
      assert set(part_global) == set(names) == set(part_state)
      merged_global.update(part_global)
      merged_state.update(part_state)
    for n in global_flat:
      np.testing.assert_array_equal(merged_global[n], full_global[n])
      for a, b in zip(jax.tree.leaves(merged_state[n]), jax.tree.leaves(full_state[n])):
        np.testing.assert_array_equal(a, b)


def test_shard_by_size_is_balanced_and_deterministic():
  sizes = {'a': 100, 'b': 90, 'c': 50, 'd': 40, 'e': 40, 'f': 30, 'g': 10, 'h': 10, 'i': 10}
  names = list(sizes)
  shards = [outer.shard_leaf_names(names[::-1], i, 3, sizes) for i in range(3)]
  loads = [sum(sizes[n] for n in s) for s in shards]
  # LPT ends at loads 130/130/120: within the smallest leaf of each other.
  assert sum(loads) == sum(sizes.values())
  assert max(loads) - min(loads) <= 10, loads
  assert shards == [outer.shard_leaf_names(names, i, 3, sizes) for i in range(3)]
  assert outer.shard_leaf_names(['b', 'a', 'c', 'd'], 1, 3) == ['b']
  assert outer.shard_leaf_names(['a'], 2, 3) == []
  with pytest.raises(outer.ParamTreeError, match='outside'):
    outer.shard_leaf_names(names, 3, 3)
  with pytest.raises(outer.ParamTreeError, match='>= 1'):
    outer.shard_leaf_names(names, 0, 0)
  with pytest.raises(outer.ParamTreeError, match='no size'):
    outer.shard_leaf_names(names, 0, 2, {'a': 1})


@pytest.mark.parametrize('overrides, field', [
    (dict(optimizer='adamw'), 'outer.optimizer'),
    (dict(lr=0.0), 'outer.lr'),
    (dict(lr=-1.0), 'outer.lr'),
    (dict(momentum=1.0), 'outer.momentum'),
    (dict(momentum=-0.1), 'outer.momentum'),
    (dict(optimizer='fedadam', eps=0.0), 'outer.eps'),
    (dict(optimizer='fedyogi', eps=-1e-3), 'outer.eps'),
    (dict(optimizer='fedadam', b2=1.0), 'outer.b2'),
    (dict(optimizer='sgd', lr='fast'), 'outer.lr'),
])
def test_bad_outer_config_names_the_field(overrides, field):
  with pytest.raises(outer.OuterConfigError, match=field) as info:
    outer.make_outer_optimizer(outer_config(**overrides))
  assert info.value.field == field
  assert 'Fix:' in str(info.value)


def test_missing_field_and_fedavg_ignores_lr():
  with pytest.raises(outer.OuterConfigError, match='outer.momentum'):
    outer.make_outer_optimizer(ml_collections.ConfigDict(dict(optimizer='diloco', lr=0.7)))
  outer.make_outer_optimizer(ml_collections.ConfigDict(dict(optimizer='fedavg', lr=-5.0)))
