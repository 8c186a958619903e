"""Lossy compression of pseudo-gradients for the silo -> aggregator upload.

Cross-silo links are the bottleneck, and a DiLoCo pseudo-gradient tolerates coarse
quantisation (Douillard et al. 2023 use 4 bits), especially with error feedback, which
carries each round's rounding error into the next round so that it does not accumulate
(Seide et al. 2014; Karimireddy et al. 2019, EF-SGD).

Formats, all operating on one leaf at a time and jit-able with their parameters static:
  none: float32.  bf16: bfloat16 (round to nearest even).
  int8: symmetric absmax quantisation per block of `block_size` values, float32 scales.
  int4: the same with values in [-7, 7], two per byte (low nibble first).
  int2: per block, the 4 levels (q + 1/2) * s, q in {-2, -1, 0, 1}, s = absmax / 1.5,
    four per byte (lowest bits first). Midrise rather than {-1, 0, 1} * absmax: all four
    codes are used and the worst error is absmax / 3 instead of absmax / 2; zero is not a
    level, so a zero becomes +-s/2, which error feedback carries into the next round.
  topk: SparseLoCo (Sarfi et al. 2025, arXiv 2508.15706), parameters in `TopK`. The flat
    leaf is cut into chunks of `chunk` values; each chunk keeps its k = round(density x
    length) (at least 1) largest-magnitude values, quantised to `bits` bits with the midrise
    levels above (2**bits of them, s = chunk absmax / (2**(bits-1) - 1/2)); every other
    value is dropped, and error feedback carries it in the residual. The last chunk of a
    leaf may be short; its k follows its own length, so padding is never selected.
    Payload: 'idx' (every chunk's k indices within the chunk, uint16 for chunks up to
    65536), 'q' (their codes, packed like int2/int4) and 'scale' (float32 per chunk); all
    fixed by the leaf's shape, so layouts and byte counts stay shape-only. SparseLoCo's
    notation in fedpt's names: Delta_r = the silo's delta (global - local), e_r = the
    residual (`compress_with_feedback`, the silo's private state), beta =
    `federation.error_feedback_decay` (default 1: no decay, the outer momentum lives in
    `outer.*`; SparseLoCo's recipe is 0.95 with a momentum-free outer step, outer.optimizer=
    fedavg, the decayed residual playing the momentum's part), Top-k = the
    per-chunk selection, Q = the `bits`-bit quantiser, Delta-hat_r = `decompress(compress(
    Delta_r + e_r))`. Their chunks are 64x64 tiles of a matrix; here they are runs of
    `chunk` consecutive values of the flattened leaf.
Payloads hold only arrays; the leaf's shape travels with the caller's metadata.
"""
from collections.abc import Mapping
import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from fedpt import errors

DENSE_FORMATS = ('none', 'bf16', 'int8', 'int4', 'int2')
FORMATS = DENSE_FORMATS + ('topk',)
TOPK_BITS = (2, 4, 8)

_QMAX = {'int8': 127, 'int4': 7}
# Relative float32 rounding slack of the quantise/dequantise arithmetic, far below any
# quantisation step; keeps `error_bound` a true bound rather than an approximate one.
_F32_SLACK = 2.0**-20


class CompressionError(errors.UserError, ValueError):
  """An unknown format, bad block size or a payload that does not match its leaf."""


@dataclasses.dataclass(frozen=True)
class TopK:
  """The topk format's parameters (`federation.topk_*`): they fix a payload's layout."""
  density: float = 0.01
  bits: int = 2
  chunk: int = 4096

  @classmethod
  def of(cls, fed) -> 'TopK':
    """From a federation config or run.json's federation section (defaults where absent)."""
    default = cls()
    return cls(fed.get('topk_density', default.density), fed.get('topk_bits', default.bits),
               fed.get('topk_chunk', default.chunk))

  def record(self) -> dict:
    """What a delta's meta.json and manifest entry say of a topk payload."""
    return {'density': self.density, 'bits': self.bits, 'chunk': self.chunk}

  def k(self, length: int) -> int:
    """Values kept of a chunk of `length`: SparseLoCo's k, never more than the chunk holds."""
    return min(length, max(1, round(self.density * length)))

  def layout(self, size: int) -> tuple[int, int, int]:
    """(chunks, k of a full chunk, k of the last) for a flat leaf of `size` values."""
    chunks = _num_blocks(size, self.chunk)
    if not chunks:
      return 0, 0, 0
    last = size - (chunks - 1) * self.chunk
    return chunks, self.k(self.chunk) if chunks > 1 else self.k(last), self.k(last)

  def index_dtype(self):
    return jnp.uint16 if self.chunk <= 2**16 else jnp.uint32


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_format(fmt: str, block_size: int, topk: TopK = TopK()) -> None:
  if fmt not in FORMATS:
    raise CompressionError(f'unknown compression format {fmt!r}. Fix: use one of {FORMATS}')
  if fmt in ('int8', 'int4', 'int2'):
    if not _is_int(block_size) or block_size < 1:
      raise CompressionError(f'block_size={block_size!r} must be a positive integer. '
                             'Fix: use e.g. 256')
    per_byte = _VALUES_PER_BYTE[fmt]
    if block_size % per_byte:
      raise CompressionError(
          f'{fmt} packs {per_byte} values per byte, so block_size={block_size} must be a '
          f'multiple of {per_byte}. Fix: use block_size={-(-block_size // per_byte) * per_byte}')
  if fmt == 'topk':
    if not isinstance(topk, TopK):
      raise CompressionError(f'topk={topk!r} is not a compression.TopK. Fix: pass '
                             'compression.TopK(density, bits, chunk)')
    if (isinstance(topk.density, bool) or not isinstance(topk.density, numbers.Real)
        or not 0 < topk.density <= 1):
      raise CompressionError(f'topk density {topk.density!r} must be in (0, 1]. Fix: use e.g. '
                             '0.01 (1% of each chunk)')
    if topk.bits not in TOPK_BITS or not _is_int(topk.bits):
      raise CompressionError(f'topk bits {topk.bits!r} must be one of {TOPK_BITS}. Fix: use 2')
    if not _is_int(topk.chunk) or not 1 <= topk.chunk <= 2**31:
      raise CompressionError(f'topk chunk {topk.chunk!r} must be an integer in [1, 2**31]. '
                             'Fix: use e.g. 4096')


_VALUES_PER_BYTE = {'int8': 1, 'int4': 2, 'int2': 4}


def _num_blocks(size: int, block_size: int) -> int:
  return -(-size // block_size)


def _midrise(x, absmax, bits: int):
  """(codes in [0, 2**bits), scale s) of `x` on the levels (q + 1/2) s, s = absmax / (2**(bits-1)
  - 1/2): the nearest level to every |x| <= absmax, so the error is at most s / 2."""
  half = 2 ** (bits - 1)
  scale = absmax / (half - 0.5)
  safe = jnp.where(scale > 0, scale, 1.0)  # All zeros: q = 0, times a zero scale.
  q = jnp.clip(jnp.floor(x / jnp.expand_dims(safe, -1)), -half, half - 1)
  return (q + half).astype(jnp.uint8), scale


def _from_midrise(codes, scale, bits: int):
  """The levels of `_midrise`'s codes; `scale` broadcasts against them."""
  return (codes.astype(jnp.float32) - (2 ** (bits - 1) - 0.5)) * scale


def _pack(codes, bits: int):
  """uint8 codes of `bits` bits along the last axis, 8 // bits per byte, lowest bits first."""
  per_byte = 8 // bits
  if per_byte == 1:
    return codes.astype(jnp.uint8)
  pad = -codes.shape[-1] % per_byte
  codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
  codes = codes.reshape(*codes.shape[:-1], -1, per_byte).astype(jnp.uint8)
  packed = codes[..., 0]
  for j in range(1, per_byte):
    packed = packed | (codes[..., j] << (bits * j))
  return packed.astype(jnp.uint8)


def _unpack(packed, bits: int, count: int):
  """The first `count` codes along the last axis of `_pack`'s bytes."""
  per_byte = 8 // bits
  packed = jnp.asarray(packed, jnp.uint8)
  if per_byte == 1:
    return packed[..., :count]
  mask = (1 << bits) - 1
  codes = jnp.stack([(packed >> (bits * j)) & mask for j in range(per_byte)], axis=-1)
  return codes.reshape(*packed.shape[:-1], -1)[..., :count]


def _nonfinite_to_nan(scale, values_2d):
  """XLA's max may drop a NaN: a block or chunk holding NaN or Inf gets a NaN scale, so it
  decompresses to NaN and the aggregator's finiteness check still fires."""
  return jnp.where(jnp.all(jnp.isfinite(values_2d), axis=1), scale, jnp.nan)


# Jitted so that eager calls on many leaves cost one dispatch each, not one per op.
@functools.partial(jax.jit, static_argnames=('fmt', 'block_size', 'topk'))
def compress(delta_leaf, fmt: str, block_size: int = 256, topk: TopK = TopK()) -> dict:
  """The payload for one leaf; see the module docstring for the formats."""
  _check_format(fmt, block_size, topk)
  x = jnp.asarray(delta_leaf, jnp.float32)
  if fmt == 'none':
    return {'values': x}
  if fmt == 'bf16':
    return {'values': x.astype(jnp.bfloat16)}
  if fmt == 'topk':
    return _compress_topk(x.reshape(-1), topk)
  flat = x.reshape(-1)
  num_blocks = _num_blocks(flat.size, block_size)
  blocks = jnp.pad(flat, (0, num_blocks * block_size - flat.size)).reshape(
      num_blocks, block_size)
  absmax = jnp.max(jnp.abs(blocks), axis=1, initial=0.0)
  if fmt == 'int2':
    codes, scale = _midrise(blocks, absmax, 2)
    return {'q': _pack(codes, 2), 'scale': _nonfinite_to_nan(scale, blocks)}
  qmax = _QMAX[fmt]
  scale = _nonfinite_to_nan(absmax / qmax, blocks)
  safe_scale = jnp.where(scale > 0, scale, 1.0)  # An all-zero block quantises to zeros.
  q = jnp.clip(jnp.round(blocks / safe_scale[:, None]), -qmax, qmax)
  if fmt == 'int8':
    return {'q': q.astype(jnp.int8), 'scale': scale}
  nibbles = (q + 8).astype(jnp.uint8)  # [1, 15]; offset binary is simpler than 4-bit two's.
  packed = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
  return {'q': packed.astype(jnp.uint8), 'scale': scale}


def _compress_topk(flat, topk: TopK) -> dict:
  size = flat.size
  chunks, k, k_last = topk.layout(size)
  if not chunks:
    return {'idx': jnp.zeros((0,), topk.index_dtype()), 'q': jnp.zeros((0,), jnp.uint8),
            'scale': jnp.zeros((0,), jnp.float32)}
  padded = jnp.pad(flat, (0, chunks * topk.chunk - size)).reshape(chunks, topk.chunk)
  valid = jnp.arange(chunks * topk.chunk).reshape(chunks, topk.chunk) < size
  # Padding ranks below every value (|x| >= 0) and NaN above, so the last chunk's first
  # k_last <= its length picks are never padding, and a NaN is sent (and then refused).
  magnitude = jnp.where(valid, jnp.nan_to_num(jnp.abs(padded), nan=jnp.inf), -1.0)
  _, idx = jax.lax.top_k(magnitude, k)  # Largest first, per chunk.
  values = jnp.take_along_axis(padded, idx, axis=1)
  absmax = jnp.max(jnp.abs(values), axis=1, initial=0.0)
  codes, scale = _midrise(values, absmax, topk.bits)
  scale = _nonfinite_to_nan(scale, padded)
  # The last chunk keeps only its own k; the flat layout is every chunk's picks in order.
  idx = jnp.concatenate([idx[:-1].reshape(-1), idx[-1, :k_last]])
  codes = jnp.concatenate([codes[:-1].reshape(-1), codes[-1, :k_last]])
  return {'idx': idx.astype(topk.index_dtype()), 'q': _pack(codes, topk.bits), 'scale': scale}


def payload_spec(shape, fmt: str, block_size: int = 256,
                 topk: TopK = TopK()) -> dict[str, tuple[tuple, str]]:
  """key -> (shape, dtype name) of `compress`'s payload for a leaf of `shape`.

  The one statement of which arrays a payload holds: byte counts, layout checks and
  the planner all derive from it.
  """
  _check_format(fmt, block_size, topk)
  shape = tuple(int(d) for d in shape)
  if fmt in ('none', 'bf16'):
    return {'values': (shape, 'float32' if fmt == 'none' else 'bfloat16')}
  if fmt == 'topk':
    chunks, k, k_last = topk.layout(math.prod(shape))
    selected = (chunks - 1) * k + k_last if chunks else 0
    return {'idx': ((selected,), np.dtype(topk.index_dtype()).name),
            'q': ((_num_blocks(selected * topk.bits, 8),), 'uint8'),
            'scale': ((chunks,), 'float32')}
  num_blocks = _num_blocks(math.prod(shape), block_size)
  width = block_size // _VALUES_PER_BYTE[fmt]
  return {'q': ((num_blocks, width), 'int8' if fmt == 'int8' else 'uint8'),
          'scale': ((num_blocks,), 'float32')}


def _check_payload(payload: Mapping, fmt: str, shape: tuple, block_size: int,
                   topk: TopK) -> None:
  expected = {k: s for k, (s, _) in payload_spec(shape, fmt, block_size, topk).items()}
  if set(payload) != set(expected):
    raise CompressionError(f'{fmt} payload has keys {sorted(payload)}, expected '
                           f'{sorted(expected)}. Fix: decompress with the format it was '
                           'compressed with')
  for key, want in expected.items():
    got = tuple(jnp.shape(payload[key]))
    if got != want:
      raise CompressionError(
          f'{fmt} payload {key!r} has shape {got}, expected {want} for a leaf of shape '
          f'{tuple(shape)} with block_size={block_size}' + (f' and {topk}' if fmt == 'topk'
                                                            else '') +
          '. Fix: pass the leaf\'s shape and the format parameters used to compress it')


def decompress(payload: Mapping, fmt: str, shape: tuple, block_size: int = 256,
               topk: TopK = TopK()) -> jax.Array:
  """Float32 array of `shape` from a `compress` payload.

  A topk payload from elsewhere must pass `payload_problem` first: an index out of
  range is dropped here and a repeated one written once, not refused.
  """
  _check_format(fmt, block_size, topk)
  shape = tuple(int(d) for d in shape)
  _check_payload(payload, fmt, shape, block_size, topk)
  return _decompress(dict(payload), fmt, shape, block_size, topk)


@functools.partial(jax.jit, static_argnames=('fmt', 'shape', 'block_size', 'topk'))
def _decompress(payload: dict, fmt: str, shape: tuple, block_size: int,
                topk: TopK) -> jax.Array:
  if fmt in ('none', 'bf16'):
    return jnp.asarray(payload['values']).astype(jnp.float32)
  size = math.prod(shape)
  if fmt == 'topk':
    return _decompress_topk(payload, size, topk).reshape(shape)
  q = jnp.asarray(payload['q'])
  scale = jnp.asarray(payload['scale'], jnp.float32)
  if fmt == 'int2':
    values = _from_midrise(_unpack(q, 2, block_size), scale[:, None], 2)
    return values.reshape(-1)[:size].reshape(shape)
  if fmt == 'int4':
    low = (q & 0x0F).astype(jnp.int8) - 8
    high = (q >> 4).astype(jnp.int8) - 8
    q = jnp.stack([low, high], axis=-1).reshape(q.shape[0], block_size)
  values = q.astype(jnp.float32) * scale[:, None]
  return values.reshape(-1)[:size].reshape(shape)


def _chunk_of_each_index(size: int, topk: TopK) -> np.ndarray:
  """The chunk that each entry of a topk payload's flat 'idx' belongs to (static)."""
  chunks, k, k_last = topk.layout(size)
  return np.repeat(np.arange(chunks), [k] * (chunks - 1) + [k_last] * bool(chunks))


def _decompress_topk(payload: dict, size: int, topk: TopK) -> jax.Array:
  chunk_of = _chunk_of_each_index(size, topk)
  codes = _unpack(payload['q'], topk.bits, chunk_of.size)
  scale = jnp.asarray(payload['scale'], jnp.float32)[chunk_of]
  values = _from_midrise(codes, scale, topk.bits)
  where = chunk_of * topk.chunk + jnp.asarray(payload['idx']).astype(jnp.int32)
  dense = jnp.zeros(_num_blocks(size, topk.chunk) * topk.chunk, jnp.float32)
  return dense.at[where].set(values, mode='drop')[:size]


def payload_problem(payload: Mapping, fmt: str, shape: tuple, block_size: int = 256,
                    topk: TopK = TopK()) -> str | None:
  """Why a payload read from elsewhere (matching `payload_spec`) must not be decompressed.

  topk: an index past its chunk or into the padding of the last one, or one chosen twice
  in a chunk (`decompress` would silently drop or merge them), or a non-finite scale
  (every value of its chunk would be NaN or Inf). Dense formats need no check here: every
  code is a valid value, and non-finite values are found after decompressing.
  """
  if fmt != 'topk':
    return None
  shape = tuple(int(d) for d in shape)
  size = math.prod(shape)
  chunk_of = _chunk_of_each_index(size, topk)
  idx = np.asarray(payload['idx']).astype(np.int64)
  # Chunk c holds min(chunk, size - c * chunk) values.
  limit = np.minimum(topk.chunk, size - chunk_of * topk.chunk)
  bad = np.flatnonzero(idx >= limit)
  if bad.size:
    i = bad[0]
    return (f'index {idx[i]} in chunk {chunk_of[i]} is out of range (the chunk holds '
            f'{limit[i]} values)')
  position = np.sort(chunk_of * topk.chunk + idx)  # Sorted flat positions: repeats adjacent.
  repeated = np.flatnonzero(position[1:] == position[:-1])
  if repeated.size:
    where = position[repeated[0]]
    return f'index {where % topk.chunk} of chunk {where // topk.chunk} is sent twice'
  scale = np.asarray(payload['scale'], np.float32)
  bad = np.flatnonzero(~np.isfinite(scale))
  if bad.size:
    return f'chunk {bad[0]} has a non-finite scale {scale[bad[0]]}'
  return None


def error_bound(delta_leaf, fmt: str, block_size: int = 256, topk: TopK = TopK()) -> float:
  """The largest elementwise |x - decompress(compress(x))| that is guaranteed for this leaf.

  Half a quantisation step of the coarsest block (int8/int4/int2), half a bf16 ulp
  relative to max|x|; topk: the larger of the biggest value any chunk drops and half a
  step of its kept values; plus a tiny float32 arithmetic slack. Relative to the float32
  value of the leaf.
  """
  _check_format(fmt, block_size, topk)
  x = np.asarray(delta_leaf, np.float32)
  absmax = float(np.max(np.abs(x), initial=0.0))
  if fmt == 'none':
    return 0.0
  if fmt == 'bf16':
    return absmax * 2.0**-8
  if fmt == 'int2':
    return absmax / 3 + absmax * _F32_SLACK
  if fmt == 'topk':
    return _topk_error_bound(x.reshape(-1), topk) + absmax * _F32_SLACK
  return absmax / _QMAX[fmt] / 2 + absmax * _F32_SLACK


def _topk_error_bound(flat: np.ndarray, topk: TopK) -> float:
  worst = 0.0
  for start in range(0, flat.size, topk.chunk):
    magnitude = np.sort(np.abs(flat[start:start + topk.chunk]))[::-1]
    k = topk.k(magnitude.size)
    dropped = float(magnitude[k]) if k < magnitude.size else 0.0
    worst = max(worst, dropped, float(magnitude[0]) / (2**topk.bits - 1))
  return worst


@functools.partial(jax.jit, static_argnames=('fmt', 'block_size', 'topk'))
def compress_with_feedback(delta_leaf, residual_leaf, fmt: str, block_size: int = 256,
                           topk: TopK = TopK(), decay: float = 1.0) -> tuple[dict, jax.Array]:
  """Compresses `delta + decay * residual`; the new residual is what that compression lost.

  Summed over rounds (decay 1), the decompressed payloads then differ from the summed
  deltas by only the last residual (one round's error) instead of a sum of errors.
  `residual_leaf=None` starts from zero. topk's residual holds every value it did not send:
  SparseLoCo's e_r, and `decay` its beta (e <- beta e + Delta, Algorithm 1), which bounds
  how long a coordinate that is never sent keeps pushing (`federation.error_feedback_decay`).
  """
  corrected = jnp.asarray(delta_leaf, jnp.float32)
  if residual_leaf is not None:
    if jnp.shape(residual_leaf) != corrected.shape:
      raise CompressionError(f'residual shape {jnp.shape(residual_leaf)} != delta shape '
                             f'{corrected.shape}. Fix: keep one residual per leaf, or pass None')
    corrected = corrected + jnp.float32(decay) * jnp.asarray(residual_leaf, jnp.float32)
  payload = compress(corrected, fmt, block_size, topk)
  return payload, corrected - decompress(payload, fmt, corrected.shape, block_size, topk)


def payload_nbytes(payload: Mapping) -> int:
  """Bytes on the wire for a payload (its arrays' data)."""
  return int(sum(math.prod(jnp.shape(v)) * jnp.result_type(v).itemsize
                 for v in payload.values()))


def compressed_nbytes(shape, fmt: str, block_size: int = 256, topk: TopK = TopK()) -> int:
  """`payload_nbytes(compress(x))` for any x of `shape`, from the shape alone."""
  return sum(math.prod(s) * np.dtype(d).itemsize
             for s, d in payload_spec(shape, fmt, block_size, topk).values())


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
