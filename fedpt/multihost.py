"""What the hosts of one multi-host silo must agree on, and what only one of them does.

A silo is one JAX program over many hosts. Every host runs the same steps and
reaches every collective; decisions that depend on the outside world (the
bucket's contents, a clock, a signal) are taken by process 0 or agreed through
JAX, so no host is left waiting in a collective the others skipped. Only
process 0 writes JSON (metadata, manifests, metrics); Orbax writes array shards
from every host in parallel.
"""
import contextlib
import functools
import os
import signal
import socket
import sys
import threading
import time

import jax
import numpy as np
from jax._src import distributed as jax_distributed  # The coordination key-value store.
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from fedpt import errors


def is_multihost() -> bool:
  # Checked first so that single-process tools never start a backend just to ask.
  return jax.distributed.is_initialized() and jax.process_count() > 1


def is_leader() -> bool:
  """Process 0 writes what must be written once: JSON objects, metrics, logs of record."""
  return not jax.distributed.is_initialized() or jax.process_index() == 0


def agree_int(value: int | None) -> int | None:
  """Process 0's value on every host (e.g. the newest global round it saw in the bucket).

  Each host may poll the bucket at a slightly different moment; the bucket only
  grows, so adopting the leader's answer is always something every host can load.
  """
  if not is_multihost():
    return value
  encoded = -1 if value is None else int(value)
  agreed = int(multihost_utils.broadcast_one_to_all(np.int32(encoded)))
  return None if agreed == -1 else agreed


def agree_flag(flag: bool) -> bool:
  """Process 0's boolean on every host (e.g. "the round's time budget is spent")."""
  return bool(agree_int(int(flag)))


def barrier(name: str) -> None:
  if is_multihost():
    multihost_utils.sync_global_devices(name)


def host_copy(x) -> np.ndarray:
  """The whole array on this host, gathering the shards that live on other hosts."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def spread(x: jax.Array, mesh) -> jax.Array:
  """`x` split along its first axis over every device of `mesh` where it divides.

  A published array laid out like this is written by all hosts at once, each
  its own slice; one that does not divide is replicated and written by one.
  """
  axes = tuple(mesh.axis_names)
  if x.ndim and x.shape[0] % mesh.size == 0:
    target = NamedSharding(mesh, PartitionSpec(axes))
  else:
    target = NamedSharding(mesh, PartitionSpec())
  if getattr(x, 'sharding', None) == target:
    return x
  return _reshard(target)(x)


@functools.lru_cache(maxsize=None)
def _reshard(target):
  """One jitted identity per layout: a fresh lambda would be traced and compiled every call."""
  return jax.jit(lambda a: a, out_shardings=target)


class StartupError(errors.UserError, RuntimeError):
  """Another host of this multi-host silo could not start; the message names it and why."""


@contextlib.contextmanager
def startup(what: str, timeout_s: float = 600.0):
  """Every host of a multi-host silo gets through `what`, or every host stops with one line.

  A host whose start-up raises a UserError (a missing corpus, a bad path) posts
  it to jax.distributed's key-value store before exiting; the others, instead of
  blocking in their first collective until JAX aborts them, read it and stop
  with that host's name and reason (StartupError, exit status 2).
  """
  if not is_multihost():
    yield
    return
  client = jax_distributed.global_state.client
  me, count = jax.process_index(), jax.process_count()
  prefix = f'fedpt/startup/{what}'
  try:
    yield
  except errors.UserError as e:
    client.key_value_set(f'{prefix}/status/{me}', f'failed: host {socket.gethostname()} '
                         f'(process {me}): {e}')
    _wait_for_keys(client, f'{prefix}/ack', count - 1, 30.0)  # Let them read it first.
    client.key_value_set(f'{prefix}/exiting/{me}', 'bye')
    raise
  client.key_value_set(f'{prefix}/status/{me}', 'ready')
  deadline = time.monotonic() + timeout_s
  while True:
    statuses = {k.rsplit('/', 1)[-1]: v for k, v in client.key_value_dir_get(f'{prefix}/status/')}
    failed = sorted(v for v in statuses.values() if v.startswith('failed'))
    if failed:
      client.key_value_set(f'{prefix}/ack/{me}', 'seen')
      if me == 0:  # Process 0 hosts the coordination service: outlive the failing hosts.
        _wait_for_keys(client, f'{prefix}/exiting', len(failed), 30.0)
        time.sleep(2.0)
      raise StartupError(f'another host of this silo could not start ({failed[0][8:]}). Fix: '
                         'fix that host, then restart every host of the silo')
    if len(statuses) == count:
      return
    if time.monotonic() > deadline:
      raise StartupError(
          f'only {len(statuses)} of {count} hosts finished starting ({what}) within '
          f'{timeout_s:.0f}s. Fix: check the logs of the others, then restart every host')
    time.sleep(0.2)


def _wait_for_keys(client, prefix: str, count: int, timeout_s: float) -> None:
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if len(client.key_value_dir_get(f'{prefix}/')) >= count:
      return
    time.sleep(0.2)


class Preemption:
  """A SIGTERM or a Ctrl-C to any host -> every host checkpoints the same step and stops.

  SIGTERM is how TPU maintenance, SLURM and Kubernetes preempt. One process
  polls a flag set by a Python handler. Several processes use the preemption
  service of `jax.distributed`, which catches SIGTERM itself and picks a step
  every host reaches; it does not watch SIGINT, so a Ctrl-C sends this process a
  SIGTERM. A second Ctrl-C stops at once without a checkpoint (status 130): the
  last complete checkpoint stays the one a rerun resumes from.
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous = {}
    self._shared = is_multihost()
    self.cause = 'SIGTERM'  # For the last log line: 'SIGINT' if a Ctrl-C came to this host.
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGINT,) if self._shared else (signal.SIGINT, signal.SIGTERM):
        self._previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self._event.is_set():
      if signum == signal.SIGINT:
        print('second interrupt: stopping now, without a checkpoint; a rerun resumes from the '
              'last complete one', file=sys.stderr, flush=True)
        os._exit(130)  # pylint: disable=protected-access
      return
    self.cause = signal.Signals(signum).name
    self._event.set()
    if self._shared:
      os.kill(os.getpid(), signal.SIGTERM)

  def reached(self, step: int) -> bool:
    """Whether to checkpoint and exit after `step`; call it with every step, in order."""
    if self._shared:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._event.is_set()

  def restore(self) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}
