"""Lossy compression of pseudo-gradients for the silo -> aggregator upload.

Cross-silo links are the bottleneck, and a DiLoCo pseudo-gradient tolerates coarse
quantisation (Douillard et al. 2023 use 4 bits), especially with error feedback, which
carries each round's rounding error into the next round so that it does not accumulate
(Seide et al. 2014; Karimireddy et al. 2019, EF-SGD).

Formats, all operating on one leaf at a time and jit-able with `fmt`/`block_size` static:
  none: float32.  bf16: bfloat16 (round to nearest even).
  int8: symmetric absmax quantisation per block of `block_size` values, float32 scales.
  int4: the same with values in [-7, 7], two per byte (low nibble first).
Payloads hold only arrays; the leaf's shape travels with the caller's metadata.
"""
from collections.abc import Mapping
import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from fedpt import errors

FORMATS = ('none', 'bf16', 'int8', 'int4')

_QMAX = {'int8': 127, 'int4': 7}
# Relative float32 rounding slack of the quantise/dequantise arithmetic, far below any
# quantisation step; keeps `error_bound` a true bound rather than an approximate one.
_F32_SLACK = 2.0**-20


class CompressionError(errors.UserError, ValueError):
  """An unknown format, bad block size or a payload that does not match its leaf."""


def _check_format(fmt: str, block_size: int) -> None:
  if fmt not in FORMATS:
    raise CompressionError(f'unknown compression format {fmt!r}. Fix: use one of {FORMATS}')
  if fmt in _QMAX:
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral) \
        or block_size < 1:
      raise CompressionError(f'block_size={block_size!r} must be a positive integer. '
                             'Fix: use e.g. 256')
    if fmt == 'int4' and block_size % 2:
      raise CompressionError(f'int4 packs two values per byte, so block_size={block_size} must '
                             f'be even. Fix: use block_size={block_size + 1}')


def _num_blocks(size: int, block_size: int) -> int:
  return -(-size // block_size)


# Jitted so that eager calls on many leaves cost one dispatch each, not one per op.
@functools.partial(jax.jit, static_argnames=('fmt', 'block_size'))
def compress(delta_leaf, fmt: str, block_size: int = 256) -> dict:
  """The payload for one leaf; see the module docstring for the formats."""
  _check_format(fmt, block_size)
  x = jnp.asarray(delta_leaf, jnp.float32)
  if fmt == 'none':
    return {'values': x}
  if fmt == 'bf16':
    return {'values': x.astype(jnp.bfloat16)}
  qmax = _QMAX[fmt]
  flat = x.reshape(-1)
  num_blocks = _num_blocks(flat.size, block_size)
  blocks = jnp.pad(flat, (0, num_blocks * block_size - flat.size)).reshape(
      num_blocks, block_size)
  scale = jnp.max(jnp.abs(blocks), axis=1, initial=0.0) / qmax
  # XLA's max may drop a NaN: a block holding NaN or Inf gets a NaN scale, so it decompresses
  # to NaN and the aggregator's finiteness check still fires.
  scale = jnp.where(jnp.all(jnp.isfinite(blocks), axis=1), scale, jnp.nan)
  safe_scale = jnp.where(scale > 0, scale, 1.0)  # An all-zero block quantises to zeros.
  q = jnp.clip(jnp.round(blocks / safe_scale[:, None]), -qmax, qmax)
  if fmt == 'int8':
    return {'q': q.astype(jnp.int8), 'scale': scale}
  nibbles = (q + 8).astype(jnp.uint8)  # [1, 15]; offset binary is simpler than 4-bit two's.
  packed = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
  return {'q': packed.astype(jnp.uint8), 'scale': scale}


def payload_spec(shape, fmt: str, block_size: int = 256) -> dict[str, tuple[tuple, str]]:
  """key -> (shape, dtype name) of `compress`'s payload for a leaf of `shape`."""
  _check_format(fmt, block_size)
  shape = tuple(int(d) for d in shape)
  if fmt in ('none', 'bf16'):
    return {'values': (shape, 'float32' if fmt == 'none' else 'bfloat16')}
  num_blocks = _num_blocks(math.prod(shape), block_size)
  width = block_size if fmt == 'int8' else block_size // 2
  return {'q': ((num_blocks, width), 'int8' if fmt == 'int8' else 'uint8'),
          'scale': ((num_blocks,), 'float32')}


def _check_payload(payload: Mapping, fmt: str, shape: tuple, block_size: int) -> None:
  expected = {k: s for k, (s, _) in payload_spec(shape, fmt, block_size).items()}
  if set(payload) != set(expected):
    raise CompressionError(f'{fmt} payload has keys {sorted(payload)}, expected '
                           f'{sorted(expected)}. Fix: decompress with the format it was '
                           'compressed with')
  for key, want in expected.items():
    got = tuple(jnp.shape(payload[key]))
    if got != want:
      raise CompressionError(
          f'{fmt} payload {key!r} has shape {got}, expected {want} for a leaf of shape '
          f'{tuple(shape)} with block_size={block_size}. Fix: pass the leaf\'s shape and the '
          'block_size used to compress it')


def decompress(payload: Mapping, fmt: str, shape: tuple, block_size: int = 256) -> jax.Array:
  """Float32 array of `shape` from a `compress` payload."""
  _check_format(fmt, block_size)
  shape = tuple(int(d) for d in shape)
  _check_payload(payload, fmt, shape, block_size)
  return _decompress(dict(payload), fmt, shape, block_size)


@functools.partial(jax.jit, static_argnames=('fmt', 'shape', 'block_size'))
def _decompress(payload: dict, fmt: str, shape: tuple, block_size: int) -> jax.Array:
  if fmt in ('none', 'bf16'):
    return jnp.asarray(payload['values']).astype(jnp.float32)
  q = jnp.asarray(payload['q'])
  if fmt == 'int4':
    low = (q & 0x0F).astype(jnp.int8) - 8
    high = (q >> 4).astype(jnp.int8) - 8
    q = jnp.stack([low, high], axis=-1).reshape(q.shape[0], block_size)
  values = q.astype(jnp.float32) * jnp.asarray(payload['scale'], jnp.float32)[:, None]
  return values.reshape(-1)[:math.prod(shape)].reshape(shape)


def error_bound(delta_leaf, fmt: str, block_size: int = 256) -> float:
  """The largest elementwise |x - decompress(compress(x))| that is guaranteed for this leaf.

  Half a quantisation step of the coarsest block (int8/int4), half a bf16 ulp relative to
  max|x|; plus a tiny float32 arithmetic slack. Relative to the float32 value of the leaf.
  """
  _check_format(fmt, block_size)
  x = np.asarray(delta_leaf, np.float32)
  absmax = float(np.max(np.abs(x), initial=0.0))
  if fmt == 'none':
    return 0.0
  if fmt == 'bf16':
    return absmax * 2.0**-8
  return absmax / _QMAX[fmt] / 2 + absmax * _F32_SLACK


@functools.partial(jax.jit, static_argnames=('fmt', 'block_size'))
def compress_with_feedback(delta_leaf, residual_leaf, fmt: str,
                           block_size: int = 256) -> tuple[dict, jax.Array]:
  """Compresses `delta + residual`; the new residual is what that compression lost.

  Summed over rounds, the decompressed payloads then differ from the summed deltas by only
  the last residual (one round's error) instead of a sum of errors. `residual_leaf=None`
  starts from zero.
  """
  corrected = jnp.asarray(delta_leaf, jnp.float32)
  if residual_leaf is not None:
    if jnp.shape(residual_leaf) != corrected.shape:
      raise CompressionError(f'residual shape {jnp.shape(residual_leaf)} != delta shape '
                             f'{corrected.shape}. Fix: keep one residual per leaf, or pass None')
    corrected = corrected + jnp.asarray(residual_leaf, jnp.float32)
  payload = compress(corrected, fmt, block_size)
  return payload, corrected - decompress(payload, fmt, corrected.shape, block_size)


def payload_nbytes(payload: Mapping) -> int:
  """Bytes on the wire for a payload (its arrays' data)."""
  return int(sum(math.prod(jnp.shape(v)) * jnp.result_type(v).itemsize
                 for v in payload.values()))


def compressed_nbytes(shape, fmt: str, block_size: int = 256) -> int:
  """`payload_nbytes(compress(x))` for any x of `shape`, from the shape alone."""
  _check_format(fmt, block_size)
  size = math.prod(shape)
  if fmt == 'none':
    return 4 * size
  if fmt == 'bf16':
    return 2 * size
  num_blocks = _num_blocks(size, block_size)
  values_per_byte = 1 if fmt == 'int8' else 2
  return num_blocks * (block_size // values_per_byte) + 4 * num_blocks


def apply_update(base_leaf, payload: Mapping, fmt: str, block_size: int = 256) -> jax.Array:
  """Global round r+1 of one leaf: global r plus its published update, as the downlink defines it.

  The aggregator computes the next global model with this and a silo rebuilds it with it,
  bit for bit (their hashes must match). Decompression and the addition are separate jits,
  so no backend fuses them into a multiply-add that rounds differently: each step is an
  exactly rounded IEEE float32 operation. The result keeps `base_leaf`'s dtype and, on
  devices, its sharding.
  """
  update = decompress(payload, fmt, jnp.shape(base_leaf), block_size)
  if isinstance(base_leaf, jax.Array):  # Only each device's slice is sent (multi-host too).
    update = jax.device_put(np.asarray(update), base_leaf.sharding)
  return _add_update(base_leaf, update)


@jax.jit
def _add_update(base_leaf, update):
  return (jnp.asarray(base_leaf).astype(jnp.float32) + update).astype(jnp.result_type(base_leaf))
