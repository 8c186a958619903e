"""The shared bucket: the run's layout, Orbax I/O, commit markers and polling.

This is the only module that knows bucket paths. Layout under the run root:

  run.json                                  written once by init_run
  global/round_NNNNNN/shard_III_of_NNN/     Orbax items `params`, `outer_state`; meta.json last
  rounds/NNNNNN/silo_<id>/                  Orbax item `payload` (compressed delta); meta.json last
  rounds/NNNNNN/manifest.json               the aggregator's decision, written once

An Orbax directory counts only once its small meta.json has been written after
it, so a reader never sees a half-written upload. Nothing relies on an atomic
directory rename, which GCS and S3 do not have.
"""
import hashlib
import json
import random
import time
from typing import Any, Callable

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from fedpt import faults
from fedpt.checkpoint import ORBAX_LOCK
from fedpt.outer import flatten_params
from fedpt.outer import unflatten_params

META = 'meta.json'


class StorageError(RuntimeError):
  """A problem with the shared run storage; the message names the object."""


class WaitTimeout(StorageError):
  """Something expected in the bucket did not appear in time."""


def array_hash(x) -> str:
  """sha256 over dtype, shape and bytes: identical arrays hash identically on every host."""
  x = np.ascontiguousarray(np.asarray(jax.device_get(x)))
  h = hashlib.sha256(f'{x.dtype.str}{x.shape}'.encode())
  h.update(x.tobytes())
  return h.hexdigest()


def tree_hash(leaf_hashes: dict[str, str]) -> str:
  h = hashlib.sha256()
  for name in sorted(leaf_hashes):
    h.update(f'{name}={leaf_hashes[name]};'.encode())
  return h.hexdigest()


def wait_for(check: Callable[[], Any], what: str, timeout_s: float, poll_s: float = 0.5,
             max_poll_s: float | None = None):
  """Polls `check` with jittered exponential backoff until it returns non-None.

  The backoff stops at 4 x poll_s by default: a round's wait is long, and a late
  poll adds straight to it, while a listing every few seconds costs nothing.
  """
  deadline = time.monotonic() + timeout_s
  max_poll_s = 4 * poll_s if max_poll_s is None else max_poll_s
  delay = poll_s
  while True:
    result = check()
    if result is not None:
      return result
    if time.monotonic() >= deadline:
      raise WaitTimeout(f'timed out after {timeout_s:.0f}s waiting for {what}')
    time.sleep(min(delay * (0.75 + 0.5 * random.random()), max(deadline - time.monotonic(), 0)))
    delay = min(delay * 1.5, max_poll_s)


class RunStorage:
  """Reads and writes one federated run under `root` (a directory; gs:// in a later step)."""

  def __init__(self, root: str):
    self.root = epath.Path(root)
    self._checkpointer = ocp.PyTreeCheckpointer()

  # -- paths -------------------------------------------------------------------

  @property
  def run_path(self) -> epath.Path:
    return self.root / 'run.json'

  def global_dir(self, round_index: int) -> epath.Path:
    return self.root / 'global' / f'round_{round_index:06d}'

  def shard_dir(self, round_index: int, shard: int, num_shards: int) -> epath.Path:
    return self.global_dir(round_index) / f'shard_{shard:03d}_of_{num_shards:03d}'

  def round_dir(self, round_index: int) -> epath.Path:
    return self.root / 'rounds' / f'{round_index:06d}'

  def delta_dir(self, round_index: int, silo: str) -> epath.Path:
    return self.round_dir(round_index) / f'silo_{silo}'

  def manifest_path(self, round_index: int) -> epath.Path:
    return self.round_dir(round_index) / 'manifest.json'

  # -- JSON objects ------------------------------------------------------------

  @staticmethod
  def read_json(path: epath.Path) -> dict | None:
    """The object at `path`, or None if it is absent or not (yet) valid JSON."""
    try:
      return json.loads(path.read_text())
    except FileNotFoundError:
      return None
    except (json.JSONDecodeError, UnicodeDecodeError):
      return None  # A torn write of a small object reads as absent.

  @staticmethod
  def write_json(path: epath.Path, obj: dict, exclusive: bool = False) -> None:
    """Writes a small JSON object; a single-object write is atomic on GCS and S3.

    Locally we write a temporary file and rename it, the POSIX equivalent.
    `exclusive` refuses to replace an existing object (create-once objects).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if exclusive and path.exists():
      raise StorageError(f'{path} already exists and is written only once')
    text = json.dumps(obj, indent=1, sort_keys=True)
    if '://' not in str(path):
      tmp = path.parent / f'.{path.name}.tmp{random.getrandbits(32):08x}'
      tmp.write_text(text)
      tmp.replace(path)
    else:
      path.write_text(text)

  # -- run.json ----------------------------------------------------------------

  def check_no_run(self) -> None:
    if self.run_path.exists():
      raise StorageError(
          f'{self.run_path} already exists: this storage root holds a run. Fix: choose a new '
          '--storage root, or delete the old run on purpose.')

  def create_run(self, run_info: dict) -> None:
    self.check_no_run()
    self.write_json(self.run_path, run_info, exclusive=True)

  def read_run(self) -> dict:
    run = self.read_json(self.run_path)
    if run is None:
      raise StorageError(
          f'no run at {self.root} ({self.run_path} is missing). Fix: create it with '
          f'scripts/init_run.py --storage={self.root}, or pass the right --storage.')
    return run

  # -- Orbax trees ---------------------------------------------------------------

  def _save_tree(self, directory: epath.Path, tree: dict) -> None:
    if directory.exists():
      directory.rmtree()  # Our own uncommitted leftovers from a crash.
    with ORBAX_LOCK:
      self._checkpointer.save(directory, args=ocp.args.PyTreeSave(tree))

  def _restore_tree(self, directory: epath.Path, abstract: dict, partial: bool):
    def restore_args(x):
      if getattr(x, 'sharding', None) is not None:
        return ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype)
      return ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype)
    try:
      with ORBAX_LOCK:
        return self._checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
            item=abstract, restore_args=jax.tree.map(restore_args, abstract),
            partial_restore=partial))
    except (FileNotFoundError, ValueError, KeyError) as e:
      raise StorageError(f'cannot read {directory}: {e}') from e

  def tree_metadata(self, directory: epath.Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of every array stored under an Orbax directory."""
    with ORBAX_LOCK:
      meta = self._checkpointer.metadata(directory)
    tree = meta.item_metadata.tree if hasattr(meta, 'item_metadata') else meta
    return {name: (tuple(m.shape), str(np.dtype(m.dtype)))
            for name, m in flatten_params(tree).items()}

  # -- deltas ------------------------------------------------------------------

  def publish_delta(self, round_index: int, silo: str, payload_flat: dict, meta: dict) -> None:
    """Uploads a silo's compressed delta, then commits it by writing meta.json last."""
    directory = self.delta_dir(round_index, silo)
    committed = self.delta_meta(round_index, silo)
    if committed is not None:
      if committed.get('content_hash') == meta.get('content_hash'):
        return  # Already published (we crashed after the commit): idempotent.
      raise StorageError(
          f'{directory} already holds a different committed delta. A silo id must be used '
          'by one process only. Fix: check that two silos do not share --silo.')
    self._save_tree(directory / 'payload', unflatten_params(payload_flat))
    faults.crash_point('silo_upload', round_index)
    self.write_json(directory / META, meta)

  def delta_meta(self, round_index: int, silo: str) -> dict | None:
    return self.read_json(self.delta_dir(round_index, silo) / META)

  def committed_silos(self, round_index: int) -> list[str]:
    directory = self.round_dir(round_index)
    if not directory.exists():
      return []
    return sorted(p.name[len('silo_'):] for p in directory.iterdir()
                  if p.name.startswith('silo_') and (p / META).exists())

  def read_delta_leaf(self, round_index: int, silo: str, name: str, spec: dict) -> dict:
    """One parameter's payload arrays from a committed delta (a partial Orbax read)."""
    abstract = unflatten_params({f'{name}/{k}': jax.ShapeDtypeStruct(tuple(s), np.dtype(d))
                                 for k, (s, d) in spec.items()})
    tree = self._restore_tree(self.delta_dir(round_index, silo) / 'payload', abstract,
                              partial=True)
    return _get(tree, name)

  def delta_tree_metadata(self, round_index: int, silo: str):
    return self.tree_metadata(self.delta_dir(round_index, silo) / 'payload')

  # -- global model ------------------------------------------------------------

  def publish_global_shard(self, round_index: int, shard: int, num_shards: int,
                           params_flat: dict, outer_state: dict, meta: dict) -> None:
    directory = self.shard_dir(round_index, shard, num_shards)
    if self.read_json(directory / META) is not None:
      raise StorageError(f'{directory} is already committed; rounds are written once')
    self._save_tree(directory / 'params', unflatten_params(params_flat))
    if outer_state:
      self._save_tree(directory / 'outer_state', unflatten_params(outer_state))
    faults.crash_point('aggregate_upload', round_index - 1)
    self.write_json(directory / META, meta)

  def global_shard_metas(self, round_index: int) -> list[dict] | None:
    """All shard metas of a global round once every shard is committed, else None."""
    directory = self.global_dir(round_index)
    if not directory.exists():
      return None
    metas = [self.read_json(p / META) for p in sorted(directory.iterdir())
             if p.name.startswith('shard_')]
    if not metas or any(m is None for m in metas) or len(metas) != metas[0]['num_shards']:
      return None
    return metas

  def global_hash(self, round_index: int) -> str | None:
    metas = self.global_shard_metas(round_index)
    if metas is None:
      return None
    return tree_hash({k: v for m in metas for k, v in m['leaf_hashes'].items()})

  def latest_global_round(self) -> int | None:
    directory = self.root / 'global'
    if not directory.exists():
      return None
    rounds = sorted((int(p.name[len('round_'):]) for p in directory.iterdir()
                     if p.name.startswith('round_')), reverse=True)
    for r in rounds:
      if self.global_shard_metas(r) is not None:
        return r
    return None

  def read_global_params(self, round_index: int, abstract_flat: dict,
                         verify: bool = True) -> dict:
    """All parameters of a committed global round, restored into `abstract_flat`'s shardings."""
    metas = self.global_shard_metas(round_index)
    if metas is None:
      raise StorageError(f'global round {round_index} is not committed under {self.root}')
    out = {}
    for meta in metas:
      names = sorted(meta['leaf_hashes'])
      missing = [n for n in names if n not in abstract_flat]
      if missing:
        raise StorageError(
            f'global round {round_index} has parameters {missing[:3]} that this model lacks. '
            'Fix: use the config the run was created with (see run.json).')
      directory = self.shard_dir(round_index, meta['shard'], meta['num_shards']) / 'params'
      abstract = unflatten_params({n: abstract_flat[n] for n in names})
      tree = self._restore_tree(directory, abstract, partial=False)
      restored = flatten_params(tree)
      if verify:
        for n in names:
          if array_hash(restored[n]) != meta['leaf_hashes'][n]:
            raise StorageError(f'{directory} parameter {n} does not match its committed hash: '
                               'the object was modified or torn after commit')
      out.update(restored)
    if set(out) != set(abstract_flat):
      raise StorageError(
          f'global round {round_index} lacks parameters '
          f'{sorted(set(abstract_flat) - set(out))[:3]}. Fix: use the run\'s config.')
    return out

  def read_global_shard(self, round_index: int, shard: int, num_shards: int,
                        abstract_params: dict, abstract_outer: dict) -> tuple[dict, dict]:
    """One shard's parameters and outer-optimizer arrays (the aggregator's own input)."""
    directory = self.shard_dir(round_index, shard, num_shards)
    params = flatten_params(self._restore_tree(
        directory / 'params', unflatten_params(abstract_params), partial=False))
    outer_arrays = {}
    if abstract_outer:
      outer_arrays = flatten_params(self._restore_tree(
          directory / 'outer_state', unflatten_params(abstract_outer), partial=False))
    return params, outer_arrays

  # -- evaluations ----------------------------------------------------------------

  def publish_eval(self, round_index: int, silo: str, record: dict) -> None:
    """A silo's held-out metrics of a global round: only numbers leave the silo."""
    self.write_json(self.round_dir(round_index) / 'eval' / f'silo_{silo}.json', record)

  def eval_losses(self, round_index: int) -> dict[str, float]:
    """silo -> held-out loss of global round `round_index` on that silo's private split."""
    directory = self.round_dir(round_index) / 'eval'
    if not directory.exists():
      return {}
    out = {}
    for p in sorted(directory.iterdir()):
      if p.name.startswith('silo_') and p.name.endswith('.json'):
        record = self.read_json(p)
        if record is not None and record.get('eval_loss') is not None:
          out[record['silo']] = float(record['eval_loss'])
    return out

  # -- manifests ----------------------------------------------------------------

  def write_manifest(self, round_index: int, manifest: dict) -> None:
    self.write_json(self.manifest_path(round_index), manifest, exclusive=True)

  def read_manifest(self, round_index: int) -> dict | None:
    return self.read_json(self.manifest_path(round_index))

  # -- garbage collection --------------------------------------------------------

  def delete_round(self, round_index: int) -> None:
    """Removes a global round and its deltas; the manifest stays as the run's ledger."""
    global_dir = self.global_dir(round_index)
    if global_dir.exists():
      global_dir.rmtree()
    round_dir = self.round_dir(round_index)
    if round_dir.exists():
      for p in round_dir.iterdir():
        if p.name.startswith('silo_'):
          p.rmtree()


def _get(tree: dict, name: str):
  for part in name.split('/'):
    tree = tree[part]
  return tree

