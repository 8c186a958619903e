"""What the hosts of one multi-host silo must agree on, and what only one of them does.

A silo is one JAX program over many hosts. Every host runs the same steps and
reaches every collective; decisions that depend on the outside world (the
bucket's contents, a clock, a signal) are taken by process 0 or agreed through
JAX, so no host is left waiting in a collective the others skipped. Only
process 0 writes JSON (metadata, manifests, metrics); Orbax writes array shards
from every host in parallel.
"""
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec


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
  return jax.jit(lambda a: a, out_shardings=target)(x)


class Preemption:
  """SIGTERM on any host (TPU maintenance, SLURM, Kubernetes) -> all hosts stop at one step.

  One process polls a flag set by a Python handler. Several processes use the
  preemption service of `jax.distributed`, which catches SIGTERM itself and
  picks a step every host reaches, so that all of them checkpoint the same one.
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous = None
    self._shared = is_multihost()
    if not self._shared and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())

  def reached(self, step: int) -> bool:
    """Whether to checkpoint and exit after `step`; call it with every step, in order."""
    if self._shared:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._event.is_set()

  def restore(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
