"""Pseudo-gradient compression: error bounds, byte counts, int4 packing, error feedback."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedpt import compression

SHAPES = [(), (1,), (7,), (256,), (1000,), (33, 17), (3, 5, 128)]


def sample(kind, shape, seed=0):
  rng = np.random.default_rng(seed)
  if kind == 'normal':
    x = rng.standard_normal(shape)
  else:  # Heavy tails: one block's outliers must not hurt other blocks' precision.
    x = rng.standard_t(df=1.5, size=shape) * 1e-3
  return np.asarray(x, np.float32)


@pytest.mark.parametrize('fmt', compression.FORMATS)
@pytest.mark.parametrize('kind', ['normal', 'heavy'])
@pytest.mark.parametrize('block_size', [256, 64])
def test_round_trip_within_error_bound(fmt, kind, block_size):
  for i, shape in enumerate(SHAPES):
    x = sample(kind, shape, seed=i)
    payload = compression.compress(x, fmt, block_size)
    y = compression.decompress(payload, fmt, shape, block_size)
    assert y.shape == shape and y.dtype == jnp.float32
    error = np.max(np.abs(np.asarray(y, np.float64) - x), initial=0.0)
    bound = compression.error_bound(x, fmt, block_size)
    assert error <= bound, (shape, error, bound)
    if fmt == 'none':
      np.testing.assert_array_equal(y, x)
    elif kind == 'normal' and fmt in ('int8', 'int4') and x.size >= 256:
      # The bound is tight: some value in the widest block is rounded by nearly half a step.
      assert error > 0.5 * bound, (shape, error, bound)
    assert compression.payload_nbytes(payload) == compression.compressed_nbytes(
        shape, fmt, block_size)


def test_per_block_scales_keep_small_blocks_precise():
  x = np.full(512, 1e-3, np.float32)
  x[300] = 1e3  # An outlier in the second block only.
  y = np.asarray(compression.decompress(compression.compress(x, 'int8'), 'int8', x.shape))
  np.testing.assert_allclose(y[:256], x[:256], rtol=1 / 254)


def test_int8_exact_values():
  x = np.array([1.0, -0.5, 0.25, 0.0, -1.0], np.float32)
  payload = compression.compress(x, 'int8', block_size=4)
  np.testing.assert_array_equal(payload['q'], [[127, -64, 32, 0], [-127, 0, 0, 0]])
  np.testing.assert_allclose(payload['scale'], [1 / 127, 1 / 127])
  assert payload['q'].dtype == jnp.int8 and payload['scale'].dtype == jnp.float32


def test_int4_packs_two_values_per_byte():
  x = np.array([7, -7, 1, 0, -3, 2, 0, 7], np.float32)  # absmax 7 per block: scale 1, q == x.
  payload = compression.compress(x, 'int4', block_size=4)
  assert payload['q'].dtype == jnp.uint8 and payload['q'].shape == (2, 2)
  # Offset-binary nibbles (q + 8), low nibble first: (7,-7) -> 15 | 1<<4.
  np.testing.assert_array_equal(payload['q'], [[15 | 1 << 4, 9 | 8 << 4],
                                               [5 | 10 << 4, 8 | 15 << 4]])
  np.testing.assert_array_equal(compression.decompress(payload, 'int4', x.shape, 4), x)
  shape = (1000, 37)
  assert compression.payload_nbytes(compression.compress(np.ones(shape), 'int4')) == (
      145 * (128 + 4))  # 145 blocks of 256 (88 values padded): 128 bytes + a scale each.


def test_byte_ratios_versus_float32():
  shape = (1024, 1024)
  fp32 = compression.compressed_nbytes(shape, 'none')
  assert fp32 == 4 * 1024 * 1024
  assert compression.compressed_nbytes(shape, 'bf16') / fp32 == 0.5
  assert compression.compressed_nbytes(shape, 'int8') / fp32 == pytest.approx(1 / 4 + 1 / 256)
  assert compression.compressed_nbytes(shape, 'int4') / fp32 == pytest.approx(1 / 8 + 1 / 256)
  assert compression.compressed_nbytes(shape, 'int4', 64) / fp32 == pytest.approx(
      1 / 8 + 1 / 64)


def test_jit_and_zero_leaves():
  x = sample('normal', (40, 9))
  compress = jax.jit(compression.compress, static_argnums=(1, 2))
  decompress = jax.jit(compression.decompress, static_argnums=(1, 2, 3))
  for fmt in compression.FORMATS:
    eager = compression.decompress(compression.compress(x, fmt), fmt, x.shape)
    jitted = decompress(compress(jnp.asarray(x), fmt, 256), fmt, x.shape, 256)
    np.testing.assert_array_equal(eager, jitted)
    zeros = compression.decompress(compression.compress(np.zeros(5), fmt), fmt, (5,))
    np.testing.assert_array_equal(zeros, np.zeros(5))
    assert compression.error_bound(np.zeros(5), fmt) == 0.0


@pytest.mark.parametrize('fmt', ['bf16', 'int8', 'int4'])
def test_error_feedback_keeps_accumulated_error_bounded(fmt):
  delta = sample('normal', (3, 300), seed=7) * 1e-2
  bound = compression.error_bound(delta, fmt)
  rounds = 50
  residual = None
  total_fb = np.zeros(delta.shape, np.float64)
  total_plain = np.zeros(delta.shape, np.float64)
  plain = np.asarray(compression.decompress(compression.compress(delta, fmt), fmt, delta.shape))
  worst_fb = 0.0
  for t in range(1, rounds + 1):
    payload, residual = compression.compress_with_feedback(delta, residual, fmt)
    total_fb += np.asarray(compression.decompress(payload, fmt, delta.shape), np.float64)
    total_plain += plain
    worst_fb = max(worst_fb, np.max(np.abs(t * delta.astype(np.float64) - total_fb)))
  one_round = np.max(np.abs(plain.astype(np.float64) - delta))
  error_fb = np.max(np.abs(rounds * delta.astype(np.float64) - total_fb))
  error_plain = np.max(np.abs(rounds * delta.astype(np.float64) - total_plain))
  # With feedback the sum is off by only the last residual: one round's error, at every t.
  # (The compressed value is delta + residual, whose absmax exceeds delta's by <= one error.)
  assert worst_fb <= 1.05 * bound, (worst_fb, bound)
  np.testing.assert_allclose(error_fb, np.max(np.abs(residual)), rtol=1e-4)
  # Without it the same rounding error is made every round: linear growth.
  np.testing.assert_allclose(error_plain, rounds * one_round, rtol=1e-4)
  assert error_plain > 10 * error_fb


def test_bad_input_raises():
  with pytest.raises(compression.CompressionError, match="'none', 'bf16', 'int8', 'int4'"):
    compression.compress(np.ones(3), 'fp8')
  with pytest.raises(compression.CompressionError, match='even'):
    compression.compress(np.ones(3), 'int4', block_size=5)
  with pytest.raises(compression.CompressionError, match='positive'):
    compression.compressed_nbytes((3,), 'int8', block_size=0)
  payload = compression.compress(np.ones(300), 'int8')
  with pytest.raises(compression.CompressionError, match='shape'):
    compression.decompress(payload, 'int8', (600,))
  with pytest.raises(compression.CompressionError, match='keys'):
    compression.decompress(payload, 'bf16', (300,))
  with pytest.raises(compression.CompressionError, match='residual'):
    compression.compress_with_feedback(np.ones(3), np.ones(4), 'int8')


def _leaf_shapes(config_name):
  import importlib.util  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  from fedpt import model as model_lib  # pylint: disable=g-import-not-at-top
  from fedpt import trees  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(__file__).resolve().parents[1] / 'configs' / f'{config_name}.py'
  spec = importlib.util.spec_from_file_location(config_name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = model_lib.ModelConfig.from_config(module.get_config().model, 'cpu')
  _, params, _ = model_lib.abstract_model(cfg)
  return sorted({tuple(x.shape) for x in trees.flatten_params(params).values()})


@pytest.mark.parametrize('config_name', ['tiny', 'demo'])
@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_non_finite_values_survive_every_format_on_every_leaf_shape(config_name, bad):
  """A NaN or Inf anywhere in a delta must reach the aggregator's finiteness check."""
  shapes = _leaf_shapes(config_name)
  assert len(shapes) >= 6, shapes
  rng = np.random.default_rng(0)
  for shape in shapes:
    x = np.full(shape, 0.01, np.float32)
    where = tuple(int(rng.integers(0, d)) for d in shape)
    for index in (tuple(0 for _ in shape), where):
      x_bad = x.copy()
      x_bad[index] = bad
      for fmt in compression.FORMATS:
        for block_size in (256, 64):
          y = compression.decompress(compression.compress(x_bad, fmt, block_size), fmt, shape,
                                     block_size)
          assert not bool(jnp.all(jnp.isfinite(y))), (shape, index, fmt, block_size)
          if fmt in ('int8', 'int4'):  # Blocks without the bad value are unharmed.
            flat = np.asarray(y).reshape(-1)
            bad_block = int(np.ravel_multi_index(index, shape)) // block_size if shape else 0
            others = np.arange(flat.size) // block_size != bad_block
            np.testing.assert_allclose(flat[others], 0.01, atol=1e-3)
