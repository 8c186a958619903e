"""The shared bucket: the run's layout, Orbax I/O, commit markers and polling.

This is the only module that knows bucket paths. Layout under the run root:

  run.json                                  written once by init_run
  global/round_NNNNNN/shard_III_of_NNN/     Orbax items `params`, `outer_state` and, with a
                                            compressed downlink, `update`; meta.json last
  rounds/NNNNNN/silo_<id>/                  Orbax item `payload` (compressed delta); meta.json last
  rounds/NNNNNN/manifest.json               the aggregator's decision, written once
  rounds/NNNNNN/sketches.json               count sketches of its deltas (fedpt/copies.py)
  rounds/NNNNNN/update_sketch_III_of_NNN.json  shard III's sketch of the global update

  lease_aggregator_III.json                 which process aggregates shard III, until when

An Orbax directory counts only once its small meta.json has been written after
it, so a reader never sees a half-written upload. Nothing relies on an atomic
directory rename, which GCS and S3 do not have, nor on create-if-absent
preconditions, which not every GCS-protocol server enforces: every object has
exactly one writer.

Roots are local paths or gs:// (s3:// where fsspec's s3fs is installed). JSON
objects go through etils.epath (gcsfs), arrays through Orbax (tensorstore);
both retry single requests, and `_retry` retries whole operations on top, with
bounded backoff, so a short outage stalls a party instead of failing it.

A `Link` (FEDPT_LINK, or `party_link` in a thread) makes every operation of a
party wait as over a wide-area link: latency, then bytes / bandwidth.
"""
import contextlib
import contextvars
import errno
import hashlib
import json
import math
import os
import random
import re
import socket
import threading
import time
from typing import Any, Callable

from absl import logging
from etils import epath
import fsspec
import jax
import numpy as np
import orbax.checkpoint as ocp

from fedpt import errors
from fedpt import faults
from fedpt import multihost
from fedpt import records
from fedpt.checkpoint import ORBAX_LOCK
from fedpt.trees import flatten_params
from fedpt.trees import tree_hash
from fedpt.trees import unflatten_params

META = 'meta.json'


class StorageError(errors.UserError, RuntimeError):
  """A problem with the shared run storage; the message names the object."""


def tampered(root, round_index: int, shard, reason: str) -> StorageError:
  """What every party says when a global round is not what its signed meta.json vouches for."""
  return StorageError(
      f'global round {round_index} shard {shard} under {root}: {reason}. The bucket was '
      'tampered with; nothing was loaded. Fix: ask the run\'s operator to restore the round.')


class WaitTimeout(StorageError):
  """Something expected in the bucket did not appear in time."""


class LeaseHeldError(StorageError):
  """Another live process holds the aggregation lease of this run."""


REMOTE_SCHEMES = ('gs://', 's3://')
# gcsfs and s3fs cache directory listings forever by default, so a poller would never see
# another party's new objects. The bucket is written by many processes: never cache.
for _protocol in ('gs', 'gcs', 's3', 's3a'):
  fsspec.config.conf.setdefault(_protocol, {})['use_listings_cache'] = False
_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError,
                        NotADirectoryError, FileExistsError)
_PERMANENT_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)
_TRANSIENT_MARKERS = ('UNAVAILABLE', 'DEADLINE_EXCEEDED', 'RESOURCE_EXHAUSTED', 'ABORTED',
                      'Connection reset', 'Connection refused', 'timed out', 'Timeout',
                      'Service Unavailable', 'Internal Server Error', 'Bad Gateway',
                      'Too Many Requests', 'Cannot connect')


def is_remote(root: str) -> bool:
  return str(root).startswith(REMOTE_SCHEMES)


def is_transient(error: BaseException) -> bool:
  """Worth retrying: 5xx/429/408 answers, timeouts and broken connections; not 4xx."""
  code = getattr(error, 'code', None)
  if isinstance(code, int):
    return code >= 500 or code in (408, 429)
  if isinstance(error, _PERMANENT_OS_ERRORS) or getattr(error, 'errno', None) in _PERMANENT_ERRNOS:
    return False
  if isinstance(error, (ConnectionError, TimeoutError)):
    return True
  if isinstance(error, OSError) and error.errno in (errno.ECONNRESET, errno.ECONNREFUSED,
                                                    errno.ETIMEDOUT, errno.EPIPE, None):
    return True
  return any(marker in str(error) for marker in _TRANSIENT_MARKERS)


def retry_delays(budget_s: float, first_s: float = 0.5, max_s: float = 8.0):
  """Jittered exponential backoff delays whose sum stays within `budget_s`."""
  spent, delay = 0.0, first_s
  while spent < budget_s:
    step = min(delay * (0.75 + 0.5 * random.random()), budget_s - spent)
    yield step
    spent += step
    delay = min(delay * 2, max_s)


def write_atomically(path: epath.Path, text: str) -> None:
  """A small object, whole or not at all: one object write remotely, a renamed file locally.

  A local write that fails (a full disk) removes its temporary file.
  """
  if is_remote(str(path)):
    path.write_text(text)
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f'.{path.name}.tmp{random.getrandbits(32):08x}'
  try:
    tmp.write_text(text)
    tmp.replace(path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def array_hash(x) -> str:
  """sha256 over dtype, shape and bytes: identical arrays hash identically on every host."""
  x = np.ascontiguousarray(multihost.host_copy(x))
  h = hashlib.sha256(f'{x.dtype.str}{x.shape}'.encode())
  h.update(x.reshape(-1).view(np.uint8))  # The bytes in place: no second copy of a big leaf.
  return h.hexdigest()


# A silo's published arrays say nothing about its hardware: no `_sharding` file (device
# ids and mesh) and no per-process array metadata; restores take the reader's shardings.
_SHARED_ARRAY_HANDLERS = ocp.type_handlers.create_type_handler_registry(
    (int, ocp.type_handlers.ScalarHandler()),
    (float, ocp.type_handlers.ScalarHandler()),
    (np.number, ocp.type_handlers.ScalarHandler()),
    (np.ndarray, ocp.type_handlers.NumpyHandler()),
    (jax.Array, ocp.type_handlers.ArrayHandler(enable_write_sharding_file=False,
                                               array_metadata_store=None)),
)


WAIT_NOTICE_S = 60.0  # A waiting party says what it waits on this often (FEDPT_WAIT_NOTICE_S).


def wait_for(check: Callable[[], Any], what: str, timeout_s: float, poll_s: float = 0.5,
             max_poll_s: float | None = None, stop: Callable[[], bool] | None = None,
             notify: Callable[[float], None] | None = None):
  """Polls `check` with jittered exponential backoff until it returns non-None.

  The backoff stops at 4 x poll_s by default: a round's wait is long, and a late
  poll adds straight to it, while a listing every few seconds costs nothing.
  Returns None early if `stop()` becomes true (a preemption notice).
  `notify(seconds_waited)` is called when the wait begins (the first check came
  back empty) and every WAIT_NOTICE_S seconds after, for a line saying what it waits on.
  """
  start = time.monotonic()
  deadline = start + timeout_s
  max_poll_s = 4 * poll_s if max_poll_s is None else max_poll_s
  notice_s = float(os.environ.get('FEDPT_WAIT_NOTICE_S', WAIT_NOTICE_S))
  next_notice = start
  delay = poll_s
  while True:
    result = check()
    if result is not None:
      return result
    if stop is not None and stop():
      return None
    now = time.monotonic()
    if now >= deadline:
      raise WaitTimeout(f'timed out after {timeout_s:.0f}s waiting for {what}')
    if notify is not None and now >= next_notice:
      notify(0.0 if next_notice == start else now - start)
      next_notice = now + notice_s
    time.sleep(min(delay * (0.75 + 0.5 * random.random()), max(deadline - time.monotonic(), 0),
                   max(next_notice - time.monotonic(), 0.01) if notify else delay))
    delay = min(delay * 1.5, max_poll_s)


# -- a simulated wide-area link ----------------------------------------------------

LINK_ENV = 'FEDPT_LINK'
LINK_FORMAT = ('BANDWIDTH,LATENCY such as 100MB/s,50ms (bandwidth in B, KB, MB, GB, KiB, MiB '
               'or GiB per s; latency in ms or s), or none')
_BYTE_UNITS = {'B': 1, 'KB': 10**3, 'MB': 10**6, 'GB': 10**9, 'KiB': 2**10, 'MiB': 2**20,
               'GiB': 2**30}
_NUMBER = r'((?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*'


class LinkError(errors.UserError, ValueError):
  """A link spec that does not parse; the message names the flag or variable and the form."""


class Link:
  """One party's simulated wide-area link to the bucket, for benchmarks and tests.

  Every storage operation of the party pays the latency once, then its bytes over
  the bandwidth, as real sleeps: writes before the object appears, reads before
  the caller has it. Bytes are what actually moves: the arrays of an Orbax tree,
  the text of a JSON record; a listing, lookup or delete pays latency only.
  Latencies of concurrent operations overlap; their bytes share the bandwidth,
  one transfer at a time. It models the party's own path to the bucket (a silo
  in another region), not the bucket's limits, which serve every party at once.
  """

  def __init__(self, bandwidth_bytes_per_s: float, latency_s: float, spec: str = ''):
    self.bandwidth_bytes_per_s = float(bandwidth_bytes_per_s)
    self.latency_s = float(latency_s)
    self.spec = spec or f'{self.bandwidth_bytes_per_s:g}B/s,{self.latency_s * 1e3:g}ms'
    self._wire = threading.Lock()  # One transfer at a time: they share the bandwidth.
    self._count = threading.Lock()
    self.bytes_up = self.bytes_down = self.operations = 0
    self.seconds = 0.0  # Time this party's operations spent on the link, waits included.

  @classmethod
  def parse(cls, spec: str | None, what: str = '--link') -> 'Link | None':
    """'100MB/s,50ms' -> Link; None, '' or 'none' -> None (no link). `what` names the source."""
    if spec is None or spec.strip().lower() in ('', 'none'):
      return None
    shown = ' '.join(spec.split())  # One line, whatever the variable held.
    parts = [p.strip() for p in spec.split(',')]
    if len(parts) != 2:
      raise LinkError(f'{what}={shown}: expected two parts, bandwidth and latency. Fix: give '
                      f'{LINK_FORMAT}')
    bandwidth = re.fullmatch(_NUMBER + r'(B|KB|MB|GB|KiB|MiB|GiB)/s', parts[0])
    rate = float(bandwidth.group(1)) * _BYTE_UNITS[bandwidth.group(2)] if bandwidth else 0.0
    if not 0 < rate < math.inf:
      raise LinkError(f'{what}={shown}: bandwidth {parts[0]!r} is not a positive number of '
                      f'bytes per second. Fix: give {LINK_FORMAT}')
    latency = re.fullmatch(_NUMBER + r'(ms|s)', parts[1])
    delay = (float(latency.group(1)) * (1e-3 if latency.group(2) == 'ms' else 1) if latency
             else math.inf)
    if not delay < math.inf:
      raise LinkError(f'{what}={shown}: latency {parts[1]!r} is not a number of ms or s. Fix: '
                      f'give {LINK_FORMAT}')
    return cls(rate, delay, ','.join(parts))

  def transfer(self, nbytes: int, up: bool) -> None:
    """Waits as this link would for one operation moving `nbytes`."""
    start = time.monotonic()
    time.sleep(self.latency_s)
    if nbytes:
      with self._wire:
        time.sleep(nbytes / self.bandwidth_bytes_per_s)
    with self._count:
      self.operations += 1
      self.seconds += time.monotonic() - start
      if up:
        self.bytes_up += nbytes
      else:
        self.bytes_down += nbytes

  def totals(self) -> dict:
    return {'link': self.spec, 'bytes_up': self.bytes_up, 'bytes_down': self.bytes_down,
            'operations': self.operations, 'seconds': self.seconds}


_FROM_ENV = object()
_PARTY_LINK = contextvars.ContextVar('fedpt_party_link', default=_FROM_ENV)
_ENV_LINKS: dict[str, Link | None] = {}  # One link per process (per party), however many stores.
_ENV_LINKS_LOCK = threading.Lock()


@contextlib.contextmanager
def party_link(link: Link | None):
  """Gives the RunStorage objects made inside (in this thread) `link`, None for none: one
  party of several that share a process (bench/round_overhead.py, bench/study.py)."""
  token = _PARTY_LINK.set(link)
  try:
    yield link
  finally:
    _PARTY_LINK.reset(token)


def current_link() -> Link | None:
  """This party's link: `party_link`'s, else FEDPT_LINK's (shared by the whole process)."""
  link = _PARTY_LINK.get()
  if link is not _FROM_ENV:
    return link
  spec = os.environ.get(LINK_ENV, '')
  with _ENV_LINKS_LOCK:
    if spec not in _ENV_LINKS:
      _ENV_LINKS[spec] = Link.parse(spec, LINK_ENV)
    return _ENV_LINKS[spec]


def tree_nbytes(tree) -> int:
  """The array bytes of a pytree of arrays, scalars or jax.ShapeDtypeStructs."""
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize if hasattr(x, 'dtype')
             else np.asarray(x).nbytes for x in jax.tree.leaves(tree))


class RunStorage:
  """Reads and writes one federated run under `root`: a directory, gs://bucket/path or s3://.

  `retry_s` bounds how long one operation keeps retrying transient errors
  (FEDPT_STORAGE_RETRY_S overrides the default of 300 s). `save_host_gb` caps the
  GiB of arrays Orbax copies to the host and has in flight to storage at once
  while saving (round 0 of a big model: measured ~0.9x the tree without it).
  `link` simulates this party's wide-area link (`Link`); default `current_link()`.
  """

  def __init__(self, root: str, retry_s: float | None = None, save_host_gb: int | None = None,
               link: Link | None = None):
    root = str(root)
    self.link = link or current_link()
    self.remote = is_remote(root)
    self.root = epath.Path(root if self.remote else os.path.abspath(root))
    self.retry_s = float(os.environ.get('FEDPT_STORAGE_RETRY_S', 300.0)
                         if retry_s is None else retry_s)
    self._checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(
        type_handler_registry=_SHARED_ARRAY_HANDLERS, save_concurrent_gb=save_host_gb,
        save_device_host_concurrent_gb=save_host_gb))

  def _over_link(self, nbytes: int = 0, up: bool = False) -> None:
    """Waits as this party's link would for one operation (nothing without a link)."""
    if self.link is not None:
      self.link.transfer(nbytes, up)

  def _retry(self, what: str, fn: Callable[[], Any]):
    """fn(), retried on transient errors; a persistent one names the object and the fix."""
    delays = retry_delays(self.retry_s)
    attempts, started = 0, time.monotonic()
    while True:
      attempts += 1
      try:
        return fn()
      except StorageError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        transient = is_transient(e)
        delay = next(delays, None) if transient else None
        if delay is None:
          if isinstance(e, FileNotFoundError):
            raise  # Callers read absence as an answer.
          refused = errors.os_refusal(e, str(self.root))
          if refused:
            raise StorageError(f'{what}: {refused}') from None
          kind = 'a transient error persisted' if transient else 'failed'
          raise StorageError(
              f'{what} {kind} after {attempts} attempt(s) over '
              f'{time.monotonic() - started:.0f}s: {type(e).__name__}: {errors.one_line(e)}. '
              f'Fix: check that {self.root} is reachable and that your credentials may read '
              'and write it; then rerun: every party resumes where it stopped.') from e
        if attempts == 1:  # Once per operation: the reason, not a log line per retry.
          logging.warning(f'storage: {what}: {type(e).__name__}: {errors.one_line(e)}; '
                          f'retrying for up to {self.retry_s:.0f}s')
        time.sleep(delay)

  def check_access(self) -> None:
    """Fails early, naming the fix, if the bucket is missing or the credentials are bad."""
    if not self.remote:
      return
    bucket = str(self.root).split('/')[2]
    scheme = str(self.root)[:5]
    credentials = os.environ.get('GOOGLE_APPLICATION_CREDENTIALS')
    if scheme == 'gs://' and credentials:
      try:
        import google.auth  # pylint: disable=g-import-not-at-top
        google.auth.load_credentials_from_file(credentials)
      except Exception as e:  # pylint: disable=broad-except
        raise StorageError(
            f'GOOGLE_APPLICATION_CREDENTIALS={credentials} is not usable: {errors.one_line(e)}. Fix: '
            'point it at a valid service-account JSON key, or unset it and run '
            '`gcloud auth application-default login`.') from None
    exists = self._retry(f'checking bucket {scheme}{bucket}',
                         epath.Path(f'{scheme}{bucket}').exists)
    if not exists:
      raise StorageError(
          f'bucket {scheme}{bucket} does not exist (or your credentials cannot see it). Fix: '
          f'create it (gcloud storage buckets create {scheme}{bucket}) or fix --storage.')

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

  def read_json(self, path: epath.Path) -> dict | None:
    """The object at `path`, or None if it is absent or not (yet) valid JSON."""
    def read():
      try:
        data = path.read_bytes()
      except FileNotFoundError:
        return None, 0
      try:
        return json.loads(data.decode()), len(data)
      except (ValueError, RecursionError):  # JSONDecodeError, bad UTF-8, 5000-digit ints.
        return None, len(data)  # A torn write of a small object reads as absent.
    obj, nbytes = self._retry(f'reading {path}', read)
    self._over_link(nbytes)
    return obj

  def write_json(self, path: epath.Path, obj: dict, exclusive: bool = False) -> None:
    """Writes a small JSON object; a single-object write is atomic on GCS and S3.

    Locally we write a temporary file and rename it, the POSIX equivalent.
    `exclusive` refuses to replace an existing object (create-once objects).
    In a multi-host silo only process 0 writes.
    """
    if not multihost.is_leader():
      return
    if exclusive and self.exists(path):
      raise StorageError(f'{path} already exists and is written only once')
    text = json.dumps(obj, indent=1, sort_keys=True)
    self._over_link(len(text.encode()), up=True)
    self._retry(f'writing {path}', lambda: write_atomically(path, text))

  def exists(self, path: epath.Path) -> bool:
    found = self._retry(f'looking up {path}', path.exists)
    self._over_link()
    return found

  def list_dir(self, path: epath.Path) -> list[epath.Path]:
    """The children of `path` (empty if it does not exist), sorted by name."""
    def listing():
      try:
        return sorted(path.iterdir(), key=lambda p: p.name)
      except FileNotFoundError:
        return []
    children = self._retry(f'listing {path}', listing)
    self._over_link()
    return children

  def remove_tree(self, path: epath.Path) -> None:
    def remove():
      if path.exists():
        path.rmtree()
    self._over_link()
    self._retry(f'deleting {path}', remove)

  def delete(self, path: epath.Path) -> None:
    def remove():
      try:
        path.unlink()
      except FileNotFoundError:
        pass
    self._over_link()
    self._retry(f'deleting {path}', remove)

  # -- run.json ----------------------------------------------------------------

  def check_no_run(self) -> None:
    self.check_access()
    if self.exists(self.run_path):
      raise StorageError(
          f'{self.run_path} already exists: this storage root holds a run. Fix: choose a new '
          '--storage root, or delete the old run on purpose.')

  def create_run(self, run_info: dict) -> None:
    self.check_no_run()
    self.write_json(self.run_path, run_info, exclusive=True)

  def read_run(self) -> dict:
    run = self.read_json(self.run_path)
    if run is None:
      self.check_access()
      raise StorageError(
          f'no run at {self.root} ({self.run_path} is missing). Fix: create it with '
          f'scripts/init_run.py --storage={self.root}, or pass the right --storage.')
    records.check_run_form(run, str(self.run_path))
    return run

  # -- Orbax trees ---------------------------------------------------------------

  def _save_tree(self, directory: epath.Path, tree: dict) -> None:
    def save():
      if multihost.is_leader() and directory.exists():
        directory.rmtree()  # Our own uncommitted leftovers from a crash or a failed attempt.
      multihost.barrier(f'fedpt_save_{directory}')
      with ORBAX_LOCK:
        self._checkpointer.save(directory, args=ocp.args.PyTreeSave(tree))
    self._over_link(tree_nbytes(tree), up=True)  # Every host of a silo pays it, at once.
    self._retry(f'uploading {directory}', save)

  def _restore_tree(self, directory: epath.Path, abstract: dict, partial: bool):
    def restore_args(x):
      if getattr(x, 'sharding', None) is not None:
        return ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype)
      return ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype)
    def restore():
      with ORBAX_LOCK:
        return self._checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
            item=abstract, restore_args=jax.tree.map(restore_args, abstract),
            partial_restore=partial))
    try:
      tree = self._retry(f'reading {directory}', restore)
    except (FileNotFoundError, ValueError, KeyError) as e:
      raise StorageError(f'cannot read {directory}: {errors.one_line(e)}') from e
    self._over_link(tree_nbytes(abstract))
    return tree

  def tree_metadata(self, directory: epath.Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of every array stored under an Orbax directory."""
    def read():
      with ORBAX_LOCK:
        return self._checkpointer.metadata(directory)
    try:
      meta = self._retry(f'reading the layout of {directory}', read)
    except (FileNotFoundError, ValueError, KeyError) as e:
      raise StorageError(f'cannot read {directory}: {errors.one_line(e)}') from e
    self._over_link()
    item = meta.item_metadata if hasattr(meta, 'item_metadata') else meta
    tree = getattr(item, 'tree', item)
    if tree is None:
      raise StorageError(f'cannot read {directory}: its array metadata is missing or corrupt')
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
    faults.crash_point('silo_upload_begin', round_index)
    self._save_tree(directory / 'payload', unflatten_params(payload_flat))
    faults.crash_point('silo_upload', round_index)
    self.write_json(directory / META, meta)

  def remove_delta(self, round_index: int, silo: str) -> None:
    """Removes whatever is at a silo's delta path: meta.json first, so it reads as uncommitted."""
    directory = self.delta_dir(round_index, silo)
    if multihost.is_leader():
      self.delete(directory / META)
      self.remove_tree(directory)
    multihost.barrier(f'fedpt_remove_{directory}')

  def delta_meta(self, round_index: int, silo: str) -> dict | None:
    return self.read_json(self.delta_dir(round_index, silo) / META)

  def committed_silos(self, round_index: int) -> list[str]:
    return sorted(p.name[len('silo_'):] for p in self.list_dir(self.round_dir(round_index))
                  if p.name.startswith('silo_') and self.exists(p / META))

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
                           params_flat: dict, outer_state: dict, meta: dict,
                           update: dict | None = None) -> None:
    """`update`: the compressed downlink's arrays (`leaf/key`), written before meta.json."""
    self.write_global_part(round_index, shard, num_shards, 'params', params_flat)
    if outer_state:
      self.write_global_part(round_index, shard, num_shards, 'outer_state', outer_state)
    if update:
      self.write_global_part(round_index, shard, num_shards, 'update', update)
    self.commit_global_shard(round_index, shard, num_shards, meta)

  def write_global_part(self, round_index: int, shard: int, num_shards: int, item: str,
                        arrays_flat: dict) -> None:
    """Uploads one Orbax item ('params', 'outer_state', 'update') of an uncommitted global shard.

    Separate calls let a writer free one item's arrays before it makes the next
    (`aggregator.init_run`); `commit_global_shard` then makes the shard visible.
    """
    directory = self.shard_dir(round_index, shard, num_shards)
    if self.read_json(directory / META) is not None:
      raise StorageError(f'{directory} is already committed; rounds are written once')
    self._save_tree(directory / item, unflatten_params(arrays_flat))

  def commit_global_shard(self, round_index: int, shard: int, num_shards: int,
                          meta: dict) -> None:
    faults.crash_point('aggregate_upload', round_index - 1)
    self.write_json(self.shard_dir(round_index, shard, num_shards) / META, meta)

  def copy_global_shard(self, source: 'RunStorage', round_index: int, shard: int,
                        num_shards: int, meta: dict) -> None:
    """Copies a committed global shard of `source`'s run here object by object (params,
    outer state, update: bit for bit), then commits it with `meta`: the shared history of a
    run branched from another (fedpt/unlearning.py)."""
    src = source.shard_dir(round_index, shard, num_shards)
    dst = self.shard_dir(round_index, shard, num_shards)
    if self.read_json(dst / META) is not None:
      raise StorageError(f'{dst} is already committed; rounds are written once')

    def copy():
      if dst.exists():
        dst.rmtree()  # Our own uncommitted leftovers from a crash.
      pending = [src]
      while pending:
        for path in pending.pop().iterdir():
          if path.is_dir():
            pending.append(path)
          elif path.name != META or path.parent != src:
            target = dst / str(path)[len(str(src)) + 1:]
            target.parent.mkdir(parents=True, exist_ok=True)
            path.copy(target, overwrite=True)
    self._retry(f'copying {src} to {dst}', copy)
    self.commit_global_shard(round_index, shard, num_shards, meta)

  def global_shard_metas(self, round_index: int) -> list[dict] | None:
    """All shard metas of a global round once every shard is committed, else None."""
    metas = [self.read_json(p / META) for p in self.list_dir(self.global_dir(round_index))
             if p.name.startswith('shard_')]
    if not metas or any(m is None for m in metas):
      return None
    for i, meta in enumerate(metas):  # Written once and atomically: malformed is tampered.
      reason = records.check_shard_meta_form(meta)
      if reason:
        raise tampered(self.root, round_index, meta.get('shard', i) if isinstance(
            meta, dict) else i, reason)
    if len({m['num_shards'] for m in metas}) != 1:
      raise tampered(self.root, round_index, 'metas', 'its shards disagree on num_shards')
    return metas if len(metas) == metas[0]['num_shards'] else None

  def global_hash(self, round_index: int) -> str | None:
    metas = self.global_shard_metas(round_index)
    if metas is None:
      return None
    return tree_hash({k: v for m in metas for k, v in m['leaf_hashes'].items()})

  def global_round_dirs(self) -> list[int]:
    """Round numbers that have a global/round_NNNNNN folder (committed or not), ascending."""
    return sorted(int(p.name[len('round_'):]) for p in self.list_dir(self.root / 'global')
                  if p.name.startswith('round_'))

  def latest_global_round(self) -> int | None:
    for r in reversed(self.global_round_dirs()):
      if self.global_shard_metas(r) is not None:
        return r
    return None

  def committed_global_rounds(self) -> list[int]:
    """Global rounds stored and committed, ascending: garbage collection leaves gaps."""
    return [r for r in self.global_round_dirs() if self.global_shard_metas(r) is not None]

  def read_global_params(self, round_index: int, abstract_flat: dict, verify: bool = True,
                         check_meta: Callable[[dict], str | None] | None = None) -> dict:
    """All parameters of a committed global round, restored into `abstract_flat`'s shardings.

    `check_meta` vets each shard's meta.json first (e.g. the aggregator's
    signature): the leaf hashes it vouches for are then checked on every array.
    """
    metas = self.global_shard_metas(round_index)
    if metas is None:
      raise StorageError(f'global round {round_index} is not committed under {self.root}')
    out = {}
    for meta in metas:
      reason = check_meta(meta) if check_meta else None
      if reason:
        raise tampered(self.root, round_index, meta.get('shard'), reason)
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
            raise tampered(self.root, round_index, meta['shard'], (
                f'parameter {n} does not match its committed hash: the object was modified '
                'or torn after commit'))
      out.update(restored)
    if set(out) != set(abstract_flat):
      raise StorageError(
          f'global round {round_index} lacks parameters '
          f'{sorted(set(abstract_flat) - set(out))[:3]}. Fix: use the run\'s config.')
    return out

  def read_global_arrays(self, round_index: int, verify: bool = True) -> dict:
    """Every parameter of a committed global round, with the shapes its metas state (hashes
    checked unless `verify` is False): for tools and tests that hold no model."""
    metas = self.global_shard_metas(round_index)
    if metas is None:
      raise StorageError(f'global round {round_index} is not committed under {self.root}')
    abstract = {n: jax.ShapeDtypeStruct(tuple(m['leaf_shapes'][n]), np.dtype(m['leaf_dtypes'][n]))
                for m in metas for n in m['leaf_hashes']}
    return self.read_global_params(round_index, abstract, verify=verify)

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

  def read_global_update(self, round_index: int, shard: int, num_shards: int,
                         abstract_arrays: dict) -> dict:
    """One shard's published global update (`leaf/key` host arrays): the compressed downlink."""
    directory = self.shard_dir(round_index, shard, num_shards) / 'update'
    return flatten_params(self._restore_tree(directory, unflatten_params(abstract_arrays),
                                             partial=False))

  def read_global_outer_arrays(self, round_index: int, shard: int, num_shards: int,
                               abstract_arrays: dict) -> dict:
    """Some of one shard's outer-state arrays (a partial read: SCAFFOLD's c for a silo)."""
    directory = self.shard_dir(round_index, shard, num_shards) / 'outer_state'
    return flatten_params(self._restore_tree(directory, unflatten_params(abstract_arrays),
                                             partial=True))

  # -- evaluations ----------------------------------------------------------------

  def publish_eval(self, round_index: int, silo: str, record: dict) -> None:
    """A silo's held-out metrics of a global round: only numbers leave the silo."""
    self.write_json(self.round_dir(round_index) / 'eval' / f'silo_{silo}.json', record)

  def eval_records(self, round_index: int) -> dict[str, dict | None]:
    """silo (from the object's name) -> its published evaluation record of a global round.

    Unvetted: `ledger.eval_losses` checks them (`protocol.check_eval_record`).
    """
    return {p.name[len('silo_'):-len('.json')]: self.read_json(p)
            for p in self.list_dir(self.round_dir(round_index) / 'eval')
            if p.name.startswith('silo_') and p.name.endswith('.json')}

  def contribution_path(self, round_index: int, silo: str) -> epath.Path:
    return self.round_dir(round_index) / 'contribution' / f'silo_{silo}.json'

  def publish_contribution(self, round_index: int, silo: str, record: dict) -> None:
    """A silo's row of round `round_index`'s contribution matrix: only numbers leave it."""
    self.write_json(self.contribution_path(round_index, silo), record)

  def contribution_records(self, round_index: int) -> dict[str, dict | None]:
    """silo (from the object's name) -> its contribution record of round `round_index`.

    Unvetted: `ledger.contributions` checks them (`protocol.check_contribution_record`).
    """
    return {p.name[len('silo_'):-len('.json')]: self.read_json(p)
            for p in self.list_dir(self.round_dir(round_index) / 'contribution')
            if p.name.startswith('silo_') and p.name.endswith('.json')}

  # -- manifests ----------------------------------------------------------------

  def write_manifest(self, round_index: int, manifest: dict) -> None:
    self.write_json(self.manifest_path(round_index), manifest, exclusive=True)

  def read_manifest(self, round_index: int) -> dict | None:
    return self.read_json(self.manifest_path(round_index))

  # -- the copy checks' sketches (fedpt/copies.py); kept when a round is collected -----

  def sketches_path(self, round_index: int) -> epath.Path:
    return self.round_dir(round_index) / 'sketches.json'

  def update_sketch_path(self, round_index: int, shard: int, num_shards: int) -> epath.Path:
    return self.round_dir(round_index) / f'update_sketch_{shard:03d}_of_{num_shards:03d}.json'

  # -- secure aggregation's recovery records ----------------------------------------

  def recovery_path(self, round_index: int, silo: str) -> epath.Path:
    return self.round_dir(round_index) / 'recovery' / f'silo_{silo}.json'

  def publish_recovery(self, round_index: int, silo: str, record: dict) -> None:
    """A survivor's signed pair keys with the round's dropped silos (`protocol.recovery_record`)."""
    self.write_json(self.recovery_path(round_index, silo), record)

  def read_recovery(self, round_index: int, silo: str) -> dict | None:
    """Unvetted: `protocol.check_recovery` decides whether it may unmask anything."""
    return self.read_json(self.recovery_path(round_index, silo))

  def recovery_silos(self, round_index: int) -> list[str]:
    """The silos with a recovery record in round `round_index` (the ledger's listing)."""
    return sorted(p.name[len('silo_'):-len('.json')]
                  for p in self.list_dir(self.round_dir(round_index) / 'recovery')
                  if p.name.startswith('silo_') and p.name.endswith('.json'))

  # -- leases ---------------------------------------------------------------------

  def lease_path(self, name: str) -> epath.Path:
    return self.root / f'lease_{name}.json'

  # -- garbage collection --------------------------------------------------------

  def delete_round(self, round_index: int) -> None:
    """Removes a global round and its deltas; the manifest stays as the run's ledger."""
    self.remove_tree(self.global_dir(round_index))
    for p in self.list_dir(self.round_dir(round_index)):
      if p.name.startswith('silo_') or p.name == 'recovery':  # Pair keys: no longer needed.
        self.remove_tree(p)


class Lease:
  """Makes one process the only one doing `name` (an aggregator shard) for a run.

  The lease is an object naming its holder and a heartbeat counter that the
  holder bumps every ttl/3. No party compares its wall clock with another
  host's: a claimant judges a holder alive if the record changes while it
  watches, timed on its own monotonic clock, and dead if it stays the same for
  1.5 x the holder's ttl. Only a holder on this very machine and pid namespace
  (`_machine_id`: not merely the same hostname, which containers share) is judged
  by its pid at once. Create-if-absent preconditions are not relied on: a
  claimant writes, waits `settle_s` and reads back, so of two racing claimants
  only the last writer proceeds and the other stops with a clear error.
  """

  def __init__(self, store: RunStorage, name: str, ttl_s: float = 60.0, settle_s: float = 1.0):
    self.store, self.name, self.ttl_s, self.settle_s = store, name, ttl_s, settle_s
    self.path = store.lease_path(name)
    self.holder = {'id': os.urandom(8).hex(), 'host': socket.gethostname(),
                   'machine': _machine_id(), 'pid': os.getpid()}
    self._beat = 0
    self._stop = threading.Event()
    self._thread = None
    self.lost: str | None = None

  def _record(self) -> dict:
    self._beat += 1
    return {**self.holder, 'name': self.name, 'ttl_s': self.ttl_s, 'beat': self._beat}

  def _holder_alive(self, current: dict) -> bool:
    """Whether the holder of `current` (not us) is alive; may watch it for up to 1.5 ttl."""
    if current.get('machine') == self.holder['machine']:
      return _pid_alive(current.get('pid'))
    ttl = current.get('ttl_s')
    ttl = float(ttl) if isinstance(ttl, (int, float)) and 0 < ttl < 3600 else self.ttl_s
    deadline = time.monotonic() + 1.5 * ttl
    while time.monotonic() < deadline:
      time.sleep(min(ttl / 6, max(deadline - time.monotonic(), 0.0)))
      if self.store.read_json(self.path) != current:
        return True  # Renewed (or taken) meanwhile: someone is alive.
    return False

  def _refusal(self, current: dict) -> LeaseHeldError:
    return LeaseHeldError(
        f'another aggregator (host {current.get("host")}, pid {current.get("pid")}) holds '
        f'{self.path} and is alive (it renews it): two aggregators on one run would race. Fix: '
        'stop the other one (its lease is taken over once it stops renewing), or point this '
        'one at its own run.')

  def acquire(self) -> 'Lease':
    current = self.store.read_json(self.path)
    if current is not None and not isinstance(current, dict):
      current = {}  # Not a lease record: nobody we could recognise holds it; watch it once.
    if current is not None and current.get('id') != self.holder['id']:
      if self._holder_alive(current):
        raise self._refusal(current)
    self.store.write_json(self.path, self._record())
    time.sleep(self.settle_s)
    current = self.store.read_json(self.path)
    if not isinstance(current, dict) or current.get('id') != self.holder['id']:
      raise self._refusal(current if isinstance(current, dict) else {})
    self._thread = threading.Thread(target=self._renew, daemon=True, name=f'lease-{self.name}')
    self._thread.start()
    return self

  def _renew(self) -> None:
    while not self._stop.wait(self.ttl_s / 3):
      try:
        current = self.store.read_json(self.path)
        current = current if isinstance(current, dict) else {}
        if current.get('id') != self.holder['id']:
          self.lost = (f'lost the lease {self.path} to host {current.get("host")} pid '
                       f'{current.get("pid")}')
          return
        self.store.write_json(self.path, self._record())
      except StorageError as e:
        logging.warning('lease %s: renewal failed: %s', self.path, e)

  def check(self) -> None:
    """Raises before a write if another process took the lease over."""
    if self.lost:
      raise LeaseHeldError(f'{self.lost}. Fix: make sure only one aggregator runs per shard.')

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    current = self.store.read_json(self.path)
    if isinstance(current, dict) and current.get('id') == self.holder['id']:
      self.store.delete(self.path)

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def _machine_id() -> str:
  """This machine's boot and pid namespace: where a pid means the same process."""
  parts = [socket.gethostname()]
  try:
    with open('/proc/sys/kernel/random/boot_id', encoding='ascii') as f:
      parts.append(f.read().strip())
    parts.append(str(os.stat('/proc/self/ns/pid').st_ino))
  except OSError:
    parts.append(f'pid{os.getpid()}')  # Unknown namespace: never judge a pid across processes.
  return '/'.join(parts)


def _pid_alive(pid) -> bool:
  """Whether process `pid` (read from the bucket: any JSON value) runs on this machine."""
  if not records.is_int(pid) or not 0 < pid < 2**31:  # 0 and -n would name process groups.
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _get(tree: dict, name: str):
  for part in name.split('/'):
    tree = tree[part]
  return tree

