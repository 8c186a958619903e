"""Streaming DiLoCo's fragments: which rows of which parameter a fragment round exchanges.

Streaming DiLoCo (Douillard, Donchev et al. 2025, arXiv 2501.18512, Algorithm 2) splits
the model into P fragments and synchronises fragment p every H inner steps at an offset
of p·H/P, so one exchange moves 1/P of the model and the peak bandwidth falls by P at the
same total bytes. fedpt maps that onto its rounds (docs/protocol.md, "Fragments"):

  paper                          fedpt
  M workers, replica m           the silos, silo k
  H inner steps                  federation.inner_steps (each silo's declared H)
  P fragments, fragment p        federation.fragments, fragment p = r mod P
  sync of fragment p at t_p      round r: every silo trains H/P steps, then publishes the
                                 pseudo-gradient of fragment r mod P only
  outer optimizer per fragment   one outer-optimizer state per (leaf, fragment) unit
  alpha (mixing)                 0: the silo's fragment is replaced by the global one
  tau (overlap)                  federation.overlap='delayed': tau = H/P steps

The split rule is stable and part of the protocol: row i of every parameter's leading
axis belongs to fragment i mod P. The transformer blocks are stored scanned
([layers, ...]), so for them this is the paper's strided pattern (fragment p holds layers
p, p+P, p+2P, ...; the paper found it better than sequential groups). The leaves outside
the blocks (the embedding [vocab, d], the final norm [d]) are split by rows the same way,
as MaxText's bucketed non-scanned leaves: in a small model the embedding alone is more
than 1/P of the parameters, and a fragment holding it whole would set the peak. A leaf
with fewer rows than P is absent from the fragments past its rows. With P = 1 the one
fragment is the whole model, and every function here is the identity: today's rounds.
Pure: no I/O, no devices beyond the arrays passed in.
"""

import jax
import jax.numpy as jnp
import numpy as np

from fedpt import errors


class FragmentError(errors.UserError, ValueError):
  """A fragment index or count that does not fit the model."""


def _check(fragment: int, fragments: int) -> None:
  if not 0 <= fragment < fragments:
    raise FragmentError(f'fragment {fragment} is not in [0, {fragments}). Fix: use '
                        'fragment_of(round, fragments)')


def fragment_of(round_index: int, fragments: int) -> int:
  """The fragment round `round_index` exchanges: r mod P (fragment p's offset is p·H/P)."""
  return round_index % fragments


def rows_shape(shape, fragment: int, fragments: int) -> tuple | None:
  """The shape of `leaf[fragment::fragments]` for a leaf of `shape`; None if it is empty."""
  _check(fragment, fragments)
  shape = tuple(int(d) for d in shape)
  if fragments == 1:
    return shape
  if not shape or shape[0] <= fragment:
    return None
  return (-(-(shape[0] - fragment) // fragments),) + shape[1:]


def fragment_shapes(leaf_shapes: dict, fragment: int, fragments: int) -> dict:
  """{leaf: rows shape} of the leaves fragment `fragment` holds rows of, in leaf order."""
  out = {}
  for name, shape in leaf_shapes.items():
    rows = rows_shape(shape, fragment, fragments)
    if rows is not None:
      out[name] = rows
  return out


def take(leaf, fragment: int, fragments: int):
  """Fragment `fragment`'s rows of `leaf` (the leaf itself when P = 1)."""
  if fragments == 1:
    return leaf
  return leaf[fragment::fragments]


def put(leaf, fragment: int, fragments: int, rows):
  """`leaf` with fragment `fragment`'s rows replaced by `rows`, in `leaf`'s dtype.

  numpy in, numpy out; a jax.Array keeps its sharding (the train step's jit wants every
  leaf as it was).
  """
  if fragments == 1:
    return rows.astype(leaf.dtype) if hasattr(rows, 'astype') else rows
  if isinstance(leaf, np.ndarray):
    out = leaf.copy()
    out[fragment::fragments] = np.asarray(rows, leaf.dtype)
    return out
  out = jnp.asarray(leaf).at[fragment::fragments].set(jnp.asarray(rows, leaf.dtype))
  return jax.device_put(out, leaf.sharding) if isinstance(leaf, jax.Array) else out


def unit_name(leaf: str, fragment: int, fragments: int) -> str:
  """The outer-optimizer state's key of one leaf's fragment: the leaf's name when P = 1."""
  return leaf if fragments == 1 else f'{leaf}/fragment_{fragment:03d}'


def units(leaf_shapes: dict, fragments: int) -> dict:
  """{unit name: (leaf, fragment, rows shape)} of every non-empty (leaf, fragment) pair."""
  out = {}
  for name, shape in leaf_shapes.items():
    for p in range(fragments):
      rows = rows_shape(shape, p, fragments)
      if rows is not None:
        out[unit_name(name, p, fragments)] = (name, p, rows)
  return out


def round_steps(inner_steps: int, fragments: int) -> int:
  """Inner steps of one fragment round: H/P (each fragment is still exchanged every H)."""
  return inner_steps // fragments

