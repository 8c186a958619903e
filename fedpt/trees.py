"""Flat parameter names: the one naming of a parameter tree shared by files, shards and state.

`{'blocks': {'attn': {'q_weight_dnh': x}}}` <-> `{'blocks/attn/q_weight_dnh': x}`. The
names are the keys of deltas, global rounds, outer-optimizer state and aggregation
shards, so they must be stable: sorted, '/'-joined pure-dict keys (`nnx.to_pure_dict`).
"""
from collections.abc import Mapping
import hashlib

from fedpt import errors

SEPARATOR = '/'


class ParamTreeError(errors.UserError, ValueError):
  """A parameter tree, flat dict or leaf set that cannot be named or stepped."""


def flatten_params(tree) -> dict:
  """`{'a/b/c': leaf}` in sorted order: stable names for files, shards and state."""
  flat = {}

  def visit(node, prefix):
    for key in node:
      if not isinstance(key, str) or not key or SEPARATOR in key:
        raise ParamTreeError(
            f'param key {key!r} under {prefix or "<root>"!r} is not a non-empty string without '
            f'{SEPARATOR!r}. Fix: pass a pure dict of params (nnx.to_pure_dict) with string keys')
      name = f'{prefix}{SEPARATOR}{key}' if prefix else key
      child = node[key]
      if isinstance(child, Mapping):
        if not child:
          raise ParamTreeError(f'param subtree {name!r} is empty. Fix: drop it from the tree')
        visit(child, name)
      elif isinstance(child, (list, tuple)) or child is None or not hasattr(child, 'shape'):
        raise ParamTreeError(
            f'param {name!r} is a {type(child).__name__}, not a dict or an array. '
            'Fix: pass a nested dict of arrays (nnx.to_pure_dict of the params)')
      else:
        flat[name] = child

  if not isinstance(tree, Mapping):
    raise ParamTreeError(f'params are a {type(tree).__name__}, not a dict. '
                         'Fix: pass a nested dict of arrays (nnx.to_pure_dict of the params)')
  visit(tree, '')
  return dict(sorted(flat.items()))


def unflatten_params(flat: Mapping) -> dict:
  """Inverse of `flatten_params`."""
  tree = {}
  for name in sorted(flat):
    *parents, leaf_key = name.split(SEPARATOR)
    node = tree
    for depth, key in enumerate(parents):
      node = node.setdefault(key, {})
      if not isinstance(node, dict):
        raise ParamTreeError(f'{SEPARATOR.join(parents[:depth + 1])!r} is both a leaf and a '
                             f'subtree (of {name!r}). Fix: leaf names must not prefix each other')
    if leaf_key in node:
      raise ParamTreeError(f'{name!r} is both a leaf and a subtree. '
                           'Fix: leaf names must not prefix each other')
    node[leaf_key] = flat[name]
  return tree


def tree_hash(leaf_hashes: dict[str, str]) -> str:
  """One sha256 over {name: sha256}: a delta's content hash and a global round's hash."""
  h = hashlib.sha256()
  for name in sorted(leaf_hashes):
    h.update(f'{name}={leaf_hashes[name]};'.encode())
  return h.hexdigest()
