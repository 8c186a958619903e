"""Mesh construction and logical-axis -> mesh-axis mapping.

Model code names logical axes only ('batch', 'embed', 'mlp', ...). The config's
`sharding.rules` maps them onto the mesh axes ('data', 'fsdp', 'tensor'), so the
same model runs data-parallel, FSDP or tensor-parallel by changing the config.
"""
import contextlib
import contextvars
import math
import os
import re
from typing import Any, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.experimental import mesh_utils
import numpy as np

from fedpt import config as config_lib

MESH_AXES = ('data', 'fsdp', 'tensor')

Rules = Sequence[tuple[str, Any]]

_ACTIVE = contextvars.ContextVar('fedpt_sharding_rules', default=None)


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
  """Resolves the config's mesh sizes; a single -1 takes the remaining devices."""
  sizes = [int(mesh_config[name]) for name in MESH_AXES]
  if sizes.count(-1) > 1:
    raise config_lib.ConfigError(
        'mesh', f'at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}',
        'set all but one of mesh.data/mesh.fsdp/mesh.tensor to explicit sizes')
  if any(s == 0 or s < -1 for s in sizes):
    raise config_lib.ConfigError(
        'mesh', f'mesh sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}',
        'use positive sizes, with at most one -1 to fill the rest')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise config_lib.ConfigError(
          'mesh', f'{num_devices} devices are not divisible by the fixed mesh axes '
          f'({dict(zip(MESH_AXES, sizes))})',
          f'choose fixed axis sizes whose product divides {num_devices}')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise config_lib.ConfigError(
        'mesh', f'mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices '
        f'but {num_devices} are available',
        'make the product of mesh sizes equal the device count, or set one axis to -1')
  return tuple(sizes)


def validate_config(config, num_devices: int) -> None:
  """The whole config check: its own fields, then that batch and model split over the mesh."""
  config_lib.validate(config)
  require = config_lib.require
  m, d, i = config.model, config.data, config.inner
  shape = dict(zip(MESH_AXES, mesh_shape(config.mesh, num_devices)))
  batch_ways = shape['data'] * shape['fsdp']
  micro = d.global_batch // i.grad_accum
  require(micro % batch_ways == 0, 'data.global_batch',
          f'the micro-batch of {micro} sequences (global_batch / grad_accum) cannot be '
          f'split over data x fsdp = {batch_ways} devices',
          f'make global_batch / grad_accum a multiple of {batch_ways}')
  tp = shape['tensor']
  for field in ('n_heads', 'n_kv_heads', 'd_ff', 'vocab_size'):
    require(m[field] % tp == 0, f'model.{field}', f'{m[field]} is not divisible by mesh.tensor={tp}',
            f'use a multiple of {tp}, or a smaller mesh.tensor')
  require(m.d_model % shape['fsdp'] == 0, 'model.d_model',
          f'{m.d_model} is not divisible by mesh.fsdp={shape["fsdp"]}',
          f'use a multiple of {shape["fsdp"]}, or a smaller mesh.fsdp')


def make_mesh(mesh_config, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  try:
    device_array = mesh_utils.create_device_mesh(
        shape, devices=devices, allow_split_physical_axes=True)
  except Exception:  # Non-TPU topologies: plain row-major order is as good.
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once."""
  table = dict(rules)
  used = set()
  spec = []
  for name in logical_axes:
    target = table.get(name) if name is not None else None
    if target is None:
      spec.append(None)
      continue
    targets = (target,) if isinstance(target, str) else tuple(target)
    targets = tuple(t for t in targets if t not in used)
    used.update(targets)
    spec.append(targets[0] if len(targets) == 1 else (targets or None))
  return PartitionSpec(*spec)


def _axis_size(mesh: Mesh, entry) -> int:
  if entry is None:
    return 1
  names = (entry,) if isinstance(entry, str) else entry
  return math.prod(mesh.shape[n] for n in names)


def named_sharding(mesh: Mesh, logical_axes, rules: Rules, shape=None, what='array'):
  spec = logical_to_spec(logical_axes, rules)
  if shape is not None:
    for dim, entry, name in zip(shape, spec, logical_axes):
      size = _axis_size(mesh, entry)
      if dim % size:
        raise config_lib.ConfigError(
            'sharding.rules',
            f'{what} has dimension {name}={dim}, which mesh axes {entry} of size {size} '
            'cannot divide',
            f'change the model size so {name} is a multiple of {size}, or map '
            f'{name!r} to a smaller mesh axis in sharding.rules')
  return NamedSharding(mesh, spec)


def tree_shardings(mesh: Mesh, logical_tree, abstract_tree, rules: Rules):
  """Shardings for a pytree from a matching tree of logical-axis tuples."""
  paths_and_axes = jax.tree_util.tree_flatten_with_path(
      logical_tree, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]
  leaves, treedef = jax.tree_util.tree_flatten(abstract_tree)
  out = []
  for (path, axes), leaf in zip(paths_and_axes, leaves):
    out.append(named_sharding(mesh, tuple(axes), rules, leaf.shape,
                              what=jax.tree_util.keystr(path)))
  return jax.tree_util.tree_unflatten(treedef, out)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Rules):
  """Lets model code constrain activations by logical names while tracing."""
  token = _ACTIVE.set((mesh, tuple(rules)))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def constrain(x, logical_axes: Sequence[str | None]):
  """with_sharding_constraint by logical names; a no-op outside activation_rules."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, logical_to_spec(logical_axes, rules)))


@contextlib.contextmanager
def per_example():
  """For a `vmap` over examples (DP-SGD's per-example gradients): yields the mesh axes of
  'batch' (the vmap's `spmd_axis_name`, so the example axis stays sharded as the batch
  was) while the model inside sees a batch of one, unsharded. None outside the rules."""
  active = _ACTIVE.get()
  if active is None:
    yield None
    return
  mesh, rules = active
  axes = dict(rules).get('batch')
  token = _ACTIVE.set((mesh, tuple((n, None if n == 'batch' else a) for n, a in rules)))
  try:
    yield tuple(axes) if isinstance(axes, (tuple, list)) else axes
  finally:
    _ACTIVE.reset(token)


def _cpu_devices_requested() -> int:
  """Local CPU devices this process will have (jax_num_cpu_devices or the XLA flag)."""
  configured = getattr(jax.config, 'jax_num_cpu_devices', -1)
  if configured and configured > 0:
    return configured
  found = re.search(r'--xla_force_host_platform_device_count=(\d+)',
                    os.environ.get('XLA_FLAGS', ''))
  return int(found.group(1)) if found else 1


def maybe_initialize_distributed(dist_config) -> None:
  """Joins a multi-host silo. 'auto' lets JAX detect TPU, SLURM or Open MPI.

  Must run before anything touches a JAX backend; the entry points call it first.
  """
  mode = dist_config.mode
  if mode == 'off' or jax.distributed.is_initialized():
    return
  if mode not in ('auto', 'explicit'):
    raise config_lib.ConfigError(
        'distributed.mode', f'unknown value {mode!r}', "use 'off', 'auto' or 'explicit'")
  kwargs = {}
  if mode == 'explicit':
    address, n, pid = (dist_config.coordinator_address, dist_config.num_processes,
                       dist_config.process_id)
    if not re.fullmatch(r'[^:\s]+:\d+', address or ''):
      raise config_lib.ConfigError(
          'distributed.coordinator_address', f'{address!r} is not HOST:PORT',
          'give process 0\'s address, e.g. --config.distributed.coordinator_address=10.0.0.2:8476')
    if n < 1 or not 0 <= pid < n:
      raise config_lib.ConfigError(
          'distributed.process_id', f'process_id={pid} with num_processes={n}',
          'number the processes 0..num_processes-1, one per host')
    kwargs = dict(coordinator_address=address, num_processes=n, process_id=pid,
                  local_device_ids=(list(dist_config.local_device_ids)
                                    if dist_config.local_device_ids else None))
  # Hosts of a CPU silo (and the tests' loopback silos) talk through gloo, whose
  # collectives each block a thread of XLA's CPU pool (sized to the cores by default):
  # with a few threads per local device a collective inside a loop cannot starve.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  os.environ.setdefault('PJRT_NPROC',
                        str(max(os.cpu_count() or 1, 4 * _cpu_devices_requested())))
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, ValueError) as e:
    detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:300].rstrip('.')
    fix = ('run under a TPU VM, SLURM (srun) or Open MPI (mpirun), or use '
           '--config.distributed.mode=explicit with coordinator_address, num_processes and '
           'process_id' if mode == 'auto' else
           'check that process 0 runs and listens at coordinator_address, that every host '
           'got the same num_processes, and that jax.distributed starts before any JAX work')
    raise config_lib.ConfigError('distributed', f'jax.distributed could not start: {detail}',
                                 fix) from e
