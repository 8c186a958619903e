"""Free riders and copies: count sketches of deltas, and the rules that flag them.

The aggregator reads every delta whole once (`Aggregator.measure`); while it does, it
folds each leaf into a count sketch of `SKETCH_SIZE` numbers (Charikar et al. 2002):
coordinate i of leaf `name` adds sign(i) x value to bucket(i), both from a public hash of
(name, i). The sketch is linear, so the sketch of a x delta is a x its sketch and the sketch
of a global update is the sum of its shards' sketches; and <S(x), S(y)> estimates <x, y>, so
cosines of sketches estimate cosines of deltas (error below, `docs/protocol.md`). Deltas are
garbage-collected; their sketches stay in the bucket (rounds/r/sketches.json), so a delta
can be compared with every earlier one of the run.

The rules (`flag`) are pure: numbers in, reasons out. `protocol.decide_round` records them.
"""
import dataclasses
import hashlib

import numpy as np

# Numbers per sketch (about 13 KB of JSON per delta). The cosine estimate's standard error is
# about (1 - cos^2) / sqrt(SKETCH_SIZE) for spread-out deltas: 0.03 at cos 0, 0.006 at
# cos 0.9, 0 for an exact scaled copy (bench/honest_similarity.py measures it).
SKETCH_SIZE = 1024
_CHUNK = 1 << 20  # Coordinates hashed at once: bounds the hashing's temporary memory.


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a public, seedless hash of uint64 values."""
  with np.errstate(over='ignore'):
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(0xFFFFFFFFFFFFFFFF)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def leaf_sketch(name: str, values, size: int = SKETCH_SIZE) -> np.ndarray:
  """The count sketch (float64, `size`) of one leaf's values, flattened in C order."""
  x = np.asarray(values, np.float32).reshape(-1)
  salt = np.uint64(int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], 'little'))
  out = np.zeros(size, np.float64)
  for start in range(0, x.size, _CHUNK):
    part = x[start:start + _CHUNK].astype(np.float64)
    h = _mix(np.arange(start, start + part.size, dtype=np.uint64) ^ salt)
    signed = np.where((h >> np.uint64(63)) == 1, -part, part)
    out += np.bincount((h % np.uint64(size)).astype(np.int64), weights=signed, minlength=size)
  return out


def cosine(a, b) -> float | None:
  """cos(a, b), or None where either is zero (no direction to compare)."""
  na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
  if na == 0 or nb == 0:
    return None
  return float(np.dot(a, b) / (na * nb))


def encode(sketch) -> list[float]:
  """A sketch as JSON holds it: its numbers at float32 precision (7 significant digits).

  A list of numbers, not an encoded blob: the bucket's privacy scan (tests/test_privacy.py)
  refuses long strings in JSON objects.
  """
  return [float(f'{x:.7g}') for x in np.asarray(sketch, np.float32)]


def decode(values, size: int = SKETCH_SIZE) -> np.ndarray | None:
  """`encode`'s inverse, or None for anything but `size` finite numbers."""
  if not isinstance(values, list) or len(values) != size or not all(
      isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
    return None
  out = np.asarray(values, np.float64)
  return out if np.all(np.isfinite(out)) else None


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One delta of the round that passed every check: its measured norm, steps and sketch.

  `seen`: the aggregator's poll in which it first saw the delta committed. A copy of a
  delta of the same round is made after its original was committed, so it is compared
  only with the deltas seen no later than itself: the original is not flagged for a
  copier seen after it; two seen in the same poll (both arrived between two polls, or
  the aggregator restarted) are both flagged.
  """
  silo: str
  norm: float
  steps: int
  sketch: np.ndarray | None
  seen: int = 0


@dataclasses.dataclass(frozen=True)
class Thresholds:
  """`federation.copy_cosine` and `federation.min_norm_ratio` (0: that rule is off)."""
  copy_cosine: float
  min_norm_ratio: float

  @classmethod
  def of(cls, fed: dict) -> 'Thresholds':
    return cls(fed.get('copy_cosine', 0.0), fed.get('min_norm_ratio', 0.0))


def _best(sketch, others: dict):
  """(key, cosine, scale) of the entry of `others` ({key: sketch}) most parallel to `sketch`."""
  best = (None, None, None)
  for key, other in others.items():
    c = cosine(sketch, other)
    if c is not None and (best[1] is None or c > best[1]):
      best = (key, c, float(np.dot(sketch, other) / np.dot(other, other)))
  return best


def _per_step(c: Candidate) -> float:
  return c.norm / c.steps


def flag(candidates: list[Candidate], earlier_deltas: dict, earlier_updates: dict,
         limits: Thresholds) -> tuple[dict, dict]:
  """({silo: statistics}, {silo: [reasons]}) of a round's candidates.

  `earlier_deltas` {(round, silo): sketch} and `earlier_updates` {round: sketch of the
  pseudo-gradient theta_r - theta_{r+1} of global round r+1} hold what the run kept of
  earlier rounds of the same fragment. Statistics, each None where undefined:
    round_cosine     max cosine with another candidate of this round seen no later
    update_cosine    max cosine with an earlier global update
    earlier_cosine   max cosine with any earlier delta (any silo, its own included)
    norm_ratio       (norm / steps) / median over the other candidates of (norm / steps)
  A delta is flagged when a cosine is >= copy_cosine, or its norm ratio is < min_norm_ratio,
  or its norm is 0 (with min_norm_ratio > 0).
  """
  stats, flags = {}, {}
  for c in candidates:
    reasons, row = [], {}
    this_round = {o.silo: o.sketch for o in candidates if o.silo != c.silo
                  and o.sketch is not None and o.seen <= c.seen}
    checks = (('round_cosine', this_round, 'silo {}\'s delta of this round'),
              ('update_cosine', earlier_updates, 'the global update of round {}'),
              ('earlier_cosine', earlier_deltas, 'silo {0[1]}\'s delta of round {0[0]}'))
    for key, others, what in checks:
      found, cos, scale = _best(c.sketch, others) if c.sketch is not None else (None,) * 3
      row[key] = cos
      if limits.copy_cosine and cos is not None and cos >= limits.copy_cosine:
        reasons.append(f'nearly parallel to {what.format(found)} (cosine {cos:.4f} >= '
                       f'copy_cosine {limits.copy_cosine:g}; {scale:.3g} x it)')
    others = [_per_step(o) for o in candidates if o.silo != c.silo]
    median = float(np.median(others)) if others else 0.0
    row['norm_ratio'] = _per_step(c) / median if median > 0 else None
    if limits.min_norm_ratio and c.norm == 0:
      reasons.append('a zero delta')
    elif (limits.min_norm_ratio and row['norm_ratio'] is not None
          and row['norm_ratio'] < limits.min_norm_ratio):
      reasons.append(f'norm per inner step {_per_step(c):.3g} is {row["norm_ratio"]:.3g} x the '
                     f'median of the other silos\' (< min_norm_ratio {limits.min_norm_ratio:g})')
    stats[c.silo] = row
    if reasons:
      flags[c.silo] = reasons
  return stats, flags
