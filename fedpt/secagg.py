"""Secure aggregation by pairwise additive masks (Bonawitz et al. 2017, arXiv 1611.04482, Sec. 4).

Every pair of silos i < j shares s_ij = X25519(i, j) (`PairSecrets`); in round r they
derive k_ij,r = HKDF-SHA256(s_ij, 'fedpt-secagg|run|r') and expand it per (fragment, leaf)
into a ChaCha20 keystream read as uint32 (`mask_stream`). Silo i uploads
y_i = encode(a_i clip(delta_i)) + PRG(b_i,r) + sum_{j>i} PRG(k_ij,r) - sum_{j<i} PRG(k_ij,r)
mod 2^32. Over every listed silo the pair masks cancel. b_i,r (`self_key`) is silo i's own
(Bonawitz's double masking): it publishes b_i,r only once the round's manifest includes it,
with the pair keys k_iX,r of every dropped silo X (never s_iX: they open that one round only),
so the modular sum less those masks is the plain fixed-point sum exactly, while a late or
rejected y_X keeps PRG(b_X,r) and stays uniform to everyone. Only the primitives are here (no
bucket, no run.json): the rules about the records are `protocol.py`'s; docs/protocol.md
"Secure aggregation" has the steps, the bounds and the paper's notation.
"""
import hashlib

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.ciphers import Cipher
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

FORMAT = 'secagg'  # A masked delta's `compression` in its meta.json and manifest entry.
MASKED = 'masked'  # The payload key of a leaf's uint32 masked values.
KEY_BYTES = 32


def scale(num_silos: int, clip: float) -> float:
  """The fixed-point scale of every silo: K values of |.| <= clip * scale (rounded) sum to at
  most 2^31 - 1, so the modular sum of K encodings decodes as a signed int32 exactly."""
  return ((2**31 - 1) // num_silos - 1) / clip


def clip_factor(norm: float, clip: float) -> float:
  """min(1, clip / ||delta||): the silo-side bound that stands in for the aggregator's checks."""
  return 1.0 if norm <= clip else clip / norm


def encode(values, weight: float, fixed_scale: float) -> np.ndarray:
  """round(weight * values * scale) mod 2^32 as uint32 (two's complement), in float64."""
  ints = np.rint(np.asarray(values, np.float64) * (weight * fixed_scale)).astype(np.int64)
  return (ints & 0xFFFFFFFF).astype(np.uint32)


def decode(total: np.ndarray, fixed_scale: float) -> np.ndarray:
  """The signed value of a modular sum of encodings, / scale (float64)."""
  return np.asarray(total, np.uint32).view(np.int32).astype(np.float64) / fixed_scale


def pair_secret(own_secret, peer_public_pem: str) -> bytes:
  """s_ij: the X25519 shared secret of this silo's key and a peer's public key (run.json)."""
  return own_secret.exchange(serialization.load_pem_public_key(peer_public_pem.encode()))


def round_key(secret: bytes, run_id: str, round_index: int) -> bytes:
  """k_ij,r = HKDF-SHA256(s_ij, info=run|round): one round's pair key (a recovery
  record reveals it for a dropped peer X, never s_iX)."""
  return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
              info=f'fedpt-secagg|{run_id}|{round_index}'.encode()).derive(secret)


def self_key(own_secret, run_id: str, round_index: int) -> bytes:
  """b_i,r = HKDF-SHA256(silo i's raw X25519 private key, info=self|run|round): secret to the
  silo until it reveals it, and deterministic, so a resumed silo rebuilds the same y_i."""
  raw = own_secret.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
  return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
              info=f'fedpt-secagg-self|{run_id}|{round_index}'.encode()).derive(raw)


def mask_stream(key: bytes, fragment: int, leaf: str, size: int) -> np.ndarray:
  """PRG(k_ij,r) for one (fragment, leaf): the ChaCha20 keystream as `size` uint32 values.

  The 16-byte ChaCha20 nonce is a zero block counter and 12 bytes of sha256(fragment|leaf),
  so each leaf of a round has its own stream under the round's key.
  """
  nonce = bytes(4) + hashlib.sha256(f'{fragment}|{leaf}'.encode()).digest()[:12]
  encryptor = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
  return np.frombuffer(encryptor.update(bytes(4 * size)), '<u4').astype(np.uint32)


def mask_sign(own: str, peer: str) -> int:
  """+1 if silo `own` adds PRG(k_own,peer) (peer sorts after it), -1 if it subtracts it."""
  return 1 if peer > own else -1


def pair_masks(own: str, keys: dict, fragment: int, leaf: str, size: int) -> np.ndarray:
  """sum over peers j of sign(own, j) PRG(k_own,j) mod 2^32, flat uint32 of `size`."""
  total = np.zeros(size, np.uint32)
  for peer in sorted(keys):
    stream = mask_stream(keys[peer], fragment, leaf, size)
    total = total + stream if mask_sign(own, peer) > 0 else total - stream
  return total


def joint_norm(deltas: dict) -> float:
  """The L2 norm of a round's delta over all its leaves (what `secagg_clip` bounds)."""
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(d, np.float64)))
                           for d in deltas.values())))


def mask_delta(own: str, deltas: dict, weight: float, clip: float, fixed_scale: float,
               keys: dict, own_key: bytes, fragment: int) -> tuple[dict, float, float]:
  """({leaf: {MASKED: uint32 of the leaf's shape}}, norm, clip factor): y_i of a round's delta.

  `deltas` are the float rows of the round's shared leaves; their joint L2 norm is
  clipped to `clip`, then weighted by this silo's numerator a_i (|a_i| <= 1), encoded
  and masked with its self key `own_key` (b_i,r) and the pair keys `keys`
  ({peer: k_own,peer,r}) of every other listed silo.
  """
  norm = joint_norm(deltas)
  factor = clip_factor(norm, clip)
  out = {}
  for name, delta in deltas.items():
    shape = np.shape(delta)
    size = int(np.prod(shape))
    encoded = encode(np.asarray(delta, np.float64).reshape(-1) * factor, weight, fixed_scale)
    masks = pair_masks(own, keys, fragment, name, size) + mask_stream(own_key, fragment, name, size)
    out[name] = {MASKED: (encoded + masks).reshape(shape)}
  return out, norm, factor


def unmasking(self_keys: dict, revealed: dict, fragment: int, leaf: str, size: int) -> np.ndarray:
  """What to subtract from the included silos' modular sum: each one's self mask PRG(b_i,r)
  (`self_keys` = {i: b_i,r}) and its masks with each dropped silo X, sign(i, X) PRG(k_iX,r),
  from `revealed` = {i: {X: k_iX,r}}."""
  total = np.zeros(size, np.uint32)
  for silo in sorted(self_keys):
    total = total + mask_stream(self_keys[silo], fragment, leaf, size)
    total = total + pair_masks(silo, revealed.get(silo, {}), fragment, leaf, size)
  return total


def sum_bound(numerators, clip: float, num_silos: int, fixed_scale: float, size: int) -> float:
  """The largest L2 norm the decoded sum of `size` values can have: sum a_i C, plus each
  value's rounding, K / (2 S). Above it a revealed key was wrong."""
  return float(sum(numerators)) * clip + np.sqrt(size) * num_silos / (2 * fixed_scale)


class PairSecrets:
  """One silo's X25519 key and its shared secrets with every other listed silo, made once at
  its start."""

  def __init__(self, own: str, own_secret, public_pems: dict):
    self.own = own
    self.own_secret = own_secret
    self.secrets = {peer: pair_secret(own_secret, pem)
                    for peer, pem in public_pems.items() if peer != own}

  def round_keys(self, run_id: str, round_index: int, peers=None) -> dict:
    """{peer: k_own,peer,r} for `peers` (default: every other listed silo)."""
    peers = sorted(self.secrets) if peers is None else sorted(peers)
    return {p: round_key(self.secrets[p], run_id, round_index) for p in peers}

  def self_key(self, run_id: str, round_index: int) -> bytes:
    """b_own,r: this silo's self-mask key of round `round_index`."""
    return self_key(self.own_secret, run_id, round_index)
