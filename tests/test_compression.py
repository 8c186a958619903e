"""Pseudo-gradient compression: error bounds, byte counts, packing, top-k, error feedback."""
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
    elif kind == 'normal' and fmt in ('int8', 'int4', 'int2') and x.size >= 256:
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


@pytest.mark.parametrize('fmt', ['bf16', 'int8', 'int4', 'int2'])
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
  # (The compressed value is delta + residual, whose absmax exceeds delta's by <= one error
  # e; so e <= c (absmax + e) for the format's relative bound c: e <= bound / (1 - c).)
  c = bound / np.max(np.abs(delta))
  assert worst_fb <= bound / (1 - c) * (1 + 1e-4), (worst_fb, bound)
  np.testing.assert_allclose(error_fb, np.max(np.abs(residual)), rtol=1e-4)
  # Without it the same rounding error is made every round: linear growth.
  np.testing.assert_allclose(error_plain, rounds * one_round, rtol=1e-4)
  assert error_plain > 10 * error_fb


def test_bad_input_raises():
  with pytest.raises(compression.CompressionError, match="'none', 'bf16', 'int8', 'int4'"):
    compression.compress(np.ones(3), 'fp8')
  with pytest.raises(compression.CompressionError, match='multiple of 2. Fix: use block_size=6'):
    compression.compress(np.ones(3), 'int4', block_size=5)
  with pytest.raises(compression.CompressionError, match='multiple of 4. Fix: use block_size=8'):
    compression.compress(np.ones(3), 'int2', block_size=6)
  for topk, problem in [(compression.TopK(bits=3), 'bits 3 must be one of'),
                        (compression.TopK(density=0.0), r'density 0.0 must be in \(0, 1\]'),
                        (compression.TopK(density=1.5), 'density 1.5'),
                        (compression.TopK(chunk=0), 'chunk 0 must be')]:
    with pytest.raises(compression.CompressionError, match=f'{problem}.*Fix'):
      compression.compressed_nbytes((10,), 'topk', topk=topk)
  with pytest.raises(compression.CompressionError, match='positive'):
    compression.compressed_nbytes((3,), 'int8', block_size=0)
  payload = compression.compress(np.ones(300), 'int8')
  with pytest.raises(compression.CompressionError, match='shape'):
    compression.decompress(payload, 'int8', (600,))
  with pytest.raises(compression.CompressionError, match='keys'):
    compression.decompress(payload, 'bf16', (300,))
  with pytest.raises(compression.CompressionError, match='residual'):
    compression.compress_with_feedback(np.ones(3), np.ones(4), 'int8')


def test_int2_packs_four_midrise_values_per_byte():
  # absmax 1.5 per block: s = 1, levels +-0.5 and +-1.5, codes floor(x / s) + 2.
  x = np.array([1.5, -1.5, 0.5, -0.5, 0.0, 0.2, -1.2, 1.5], np.float32)
  payload = compression.compress(x, 'int2', block_size=4)
  assert payload['q'].dtype == jnp.uint8 and payload['q'].shape == (2, 1)
  np.testing.assert_array_equal(payload['q'], [[3 | 0 << 2 | 2 << 4 | 1 << 6],
                                               [2 | 2 << 2 | 0 << 4 | 3 << 6]])
  np.testing.assert_array_equal(payload['scale'], [1.0, 1.0])
  np.testing.assert_array_equal(compression.decompress(payload, 'int2', x.shape, 4),
                                [1.5, -1.5, 0.5, -0.5, 0.5, 0.5, -1.5, 1.5])
  assert compression.error_bound(x, 'int2', 4) == pytest.approx(0.5, rel=1e-5)  # absmax / 3.


def _numpy_top_k(x, topk):
  """[(chunk start, set of kept positions within it)] by numpy's sort: the reference."""
  flat = x.reshape(-1)
  out = []
  for start in range(0, flat.size, topk.chunk):
    chunk = flat[start:start + topk.chunk]
    k = min(chunk.size, max(1, round(topk.density * chunk.size)))
    out.append((start, set(np.argsort(-np.abs(chunk), kind='stable')[:k].tolist())))
  return out


@pytest.mark.parametrize('shape, topk', [
    ((4, 64), compression.TopK(0.05, 2, 64)),  # A multiple of the chunk.
    ((1000,), compression.TopK(0.05, 2, 64)),  # Not: the last chunk holds 40 values.
    ((4097,), compression.TopK(0.01, 2, 4096)),  # The last chunk holds one value, k = 1.
    ((3, 700), compression.TopK(0.03, 4, 512)),
    ((33, 17), compression.TopK(0.1, 8, 100)),
    ((10,), compression.TopK(0.01, 2, 4096)),  # One short chunk.
    ((130,), compression.TopK(1.0, 2, 64)),  # Everything: the last chunk's 2 values, no padding.
])
def test_topk_keeps_exactly_the_k_largest_per_chunk(shape, topk):
  x = sample('normal', shape, seed=3)
  payload = compression.compress(x, 'topk', topk=topk)
  assert payload['idx'].dtype == jnp.uint16 and payload['scale'].dtype == jnp.float32
  assert compression.payload_problem(payload, 'topk', shape, topk=topk) is None
  y = np.asarray(compression.decompress(payload, 'topk', shape, topk=topk)).reshape(-1)
  flat = x.reshape(-1)
  reference = _numpy_top_k(x, topk)
  assert payload['scale'].shape == (len(reference),)
  for (start, kept), scale in zip(reference, np.asarray(payload['scale'])):
    chunk_y = y[start:start + topk.chunk]
    assert set(np.flatnonzero(chunk_y).tolist()) == kept, start
    chunk_x = flat[start:start + topk.chunk]
    absmax = np.max(np.abs(chunk_x))
    np.testing.assert_allclose(scale, absmax / (2**(topk.bits - 1) - 0.5), rtol=1e-6)
    # Kept values are on the midrise levels, within half a step of the truth.
    levels = chunk_y[sorted(kept)] / scale + 0.5
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
    assert np.all(np.abs(chunk_y - chunk_x)[sorted(kept)] <= scale / 2 * (1 + 1e-5))
  error = np.max(np.abs(y - flat))
  assert error <= compression.error_bound(x, 'topk', topk=topk)
  assert compression.payload_nbytes(payload) == compression.compressed_nbytes(
      shape, 'topk', topk=topk)


def test_topk_bytes_one_percent_at_two_bits_is_over_100x_smaller():
  shape = (4096, 1024)
  fp32 = compression.compressed_nbytes(shape, 'none')
  topk = compression.compressed_nbytes(shape, 'topk', topk=compression.TopK(0.01, 2, 4096))
  # Per chunk of 4096: 41 uint16 indices and a float32 scale; every 2-bit code, 4 per byte.
  assert topk == 1024 * (41 * 2 + 4) + 1024 * 41 // 4
  assert fp32 / topk >= 100, fp32 / topk
  assert compression.compressed_nbytes(shape, 'int2') / fp32 == pytest.approx(1 / 16 + 1 / 256)
  for bits in (4, 8):
    assert compression.compressed_nbytes(shape, 'topk', topk=compression.TopK(
        0.01, bits, 4096)) == 1024 * (41 * 2 + 4) + 1024 * 41 * bits // 8
  # Chunks past 65536 need 32-bit indices.
  big = compression.TopK(0.01, 2, 2**17)
  assert compression.payload_spec((2**17,), 'topk', topk=big)['idx'] == ((1311,), 'uint32')


def test_topk_error_feedback_sends_everything_eventually():
  """SparseLoCo's e_r: what is not sent stays in the residual, so the sum of what was sent
  is the sum of the deltas minus one bounded residual; its relative error vanishes."""
  topk = compression.TopK(0.05, 2, 64)
  delta = sample('normal', (3, 300), seed=7) * 1e-2
  plain = np.asarray(compression.decompress(compression.compress(delta, 'topk', topk=topk),
                                            'topk', delta.shape, topk=topk), np.float64)
  residual, total = None, np.zeros(delta.shape, np.float64)
  largest = []
  for t in range(1, 201):
    payload, residual = compression.compress_with_feedback(delta, residual, 'topk', topk=topk)
    total += np.asarray(compression.decompress(payload, 'topk', delta.shape, topk=topk))
    # Exactly: sent so far + what is still held = every delta so far.
    np.testing.assert_allclose(total + np.asarray(residual), t * delta.astype(np.float64),
                               atol=1e-5 * t)
    largest.append(float(np.max(np.abs(residual))))
  # The residual stops growing (it is as large late as early), so the sum's error stays put
  # while the sum grows; without feedback 95% of the coordinates are never sent, and the
  # error grows with every round.
  assert max(largest[100:]) <= 1.1 * max(largest[:100]), (max(largest[:100]), max(largest[100:]))
  error_fb = np.max(np.abs(200 * delta.astype(np.float64) - total))
  assert error_fb / (200 * np.max(np.abs(delta))) < 0.05
  assert np.mean(plain == 0) > 0.9
  assert np.max(np.abs(200 * (delta - plain))) > 10 * error_fb


def test_payload_problem_names_each_malformed_topk_payload():
  topk = compression.TopK(0.1, 2, 64)
  shape = (100,)  # Chunks of 64 and 36 values; k = 6 and 4.
  payload = {k: np.asarray(v) for k, v in compression.compress(
      sample('normal', shape), 'topk', topk=topk).items()}
  assert payload['idx'].shape == (10,)
  assert compression.payload_problem(payload, 'topk', shape, topk=topk) is None

  def edited(key, index, value):
    out = {k: v.copy() for k, v in payload.items()}
    out[key][index] = value
    return out

  for bad, reason in [
      (edited('idx', 0, 64), 'index 64 in chunk 0 is out of range (the chunk holds 64 values)'),
      (edited('idx', 9, 36), 'index 36 in chunk 1 is out of range (the chunk holds 36 values)'),
      (edited('idx', 1, payload['idx'][0]), f'index {payload["idx"][0]} of chunk 0 is sent twice'),
      (edited('idx', 9, payload['idx'][6]), f'index {payload["idx"][6]} of chunk 1 is sent twice'),
      (edited('scale', 1, np.nan), 'chunk 1 has a non-finite scale nan'),
      (edited('scale', 0, np.inf), 'chunk 0 has a non-finite scale inf'),
  ]:
    assert compression.payload_problem(bad, 'topk', shape, topk=topk) == reason
  # The same index in two chunks is two coordinates, not a repeat.
  assert compression.payload_problem(edited('idx', 9, payload['idx'][0] % 36), 'topk', shape,
                                     topk=topk) in (None, f'index {payload["idx"][0] % 36} of '
                                                    'chunk 1 is sent twice')


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


@pytest.mark.parametrize('config_name', ['tiny'])  # Every kind of leaf; demo's are larger.
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
        for block_size in (256, 64) if fmt in ('int8', 'int4', 'int2') else (256,):
          y = compression.decompress(compression.compress(x_bad, fmt, block_size), fmt, shape,
                                     block_size)
          assert not bool(jnp.all(jnp.isfinite(y))), (shape, index, fmt, block_size)
          if fmt in ('int8', 'int4'):  # Blocks without the bad value are unharmed.
            flat = np.asarray(y).reshape(-1)
            bad_block = int(np.ravel_multi_index(index, shape)) // block_size if shape else 0
            others = np.arange(flat.size) // block_size != bad_block
            np.testing.assert_allclose(flat[others], 0.01, atol=1e-3)


def test_error_feedback_decay_is_sparselocos_beta():
  """e <- beta e + Delta (SparseLoCo, Algorithm 1): decay scales the residual carried in."""
  rng = np.random.default_rng(3)
  delta, residual = (rng.normal(size=(3, 300)).astype(np.float32) for _ in range(2))
  topk = compression.TopK(0.05, 2, 128)
  payload, kept = compression.compress_with_feedback(delta, residual, 'topk', 256, topk, 0.95)
  direct, kept_direct = compression.compress_with_feedback(delta + np.float32(0.95) * residual,
                                                           None, 'topk', 256, topk)
  for key in ('idx', 'q'):  # The same picks and codes; the scales up to a fused multiply-add.
    np.testing.assert_array_equal(payload[key], direct[key])
  np.testing.assert_allclose(payload['scale'], direct['scale'], rtol=1e-6)
  np.testing.assert_allclose(kept, kept_direct, rtol=1e-5, atol=1e-5)
  plain, _ = compression.compress_with_feedback(delta, residual, 'topk', 256, topk)
  assert not np.array_equal(plain['q'], payload['q']) or not np.array_equal(
      plain['idx'], payload['idx'])
