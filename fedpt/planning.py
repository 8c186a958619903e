"""Will a config fit, and what will a silo upload? Answered from abstract shapes alone.

`plan` sizes one silo's training on a mesh before any hardware is reserved:
  * parameters, optimizer state (AdamW, or Muon's momentum and AdamW's moments, from the
    optimizer's own abstract state) and gradients: each leaf's per-device shard on a
    `jax.sharding.AbstractMesh`, with the Trainer's sharding rules and divisibility
    checks, so a mesh the Trainer would reject is rejected here with the same message;
  * activations: an estimate (below);
  * the published delta in every compression format, from `compression.payload_spec`;
  * the aggregator's host memory per aggregation shard (`aggregator_memory`).
Nothing is allocated and no devices are needed: a 70B model on 256 devices plans in
about a second on a laptop.

Activation estimate (peak bytes per device during the forward and backward pass):
  saved: what JAX keeps from the forward pass for the backward pass (its "residuals";
    which ones depends on `model.remat`), counted exactly by tracing the loss's VJP at
    per-device shapes without compiling: micro-batch per device = global_batch /
    grad_accum / (mesh axes of 'batch'); heads, d_ff and vocab divided by the mesh axes
    of 'act_heads', 'act_mlp' and 'act_vocab'. Residual bytes are affine in the batch:
    the part that grows with it is activations, the constant part compute-dtype copies
    of weights, counted as sharded like the weights;
  plus the larger of two transients:
    a layer's backward: its activations without remat (recomputed, or cotangents) and
      its weights all-gathered over the FSDP axes (the 'embed' rule): two compute-dtype
      copies (this layer and the prefetched next) and its unreduced gradient;
    the loss: two float32 logits-sized buffers (softmax and its cotangent) and the
      all-gathered unembedding with its unreduced gradient.
The optimizer step needs two float32 parameter-sized trees (clipped gradients and
updates) after the activations are freed, so the peak counts the larger of the two; Muon
adds its largest Newton-Schulz working set (`newton_schulz_nbytes`).
cuDNN's fused attention cannot be traced without a GPU; while tracing, a stand-in keeps
flash attention's residuals (q, k, v, output, float32 log-sum-exp). XLA's fusion and
scheduling are not modelled; against XLA's own buffer assignment for the compiled step
(`compiled_memory`; CPU, 8 devices, 1B shapes, every remat policy) the total was 0-12%
high. Leave headroom: "fits" means under 90% of --hbm_gib.
"""
import contextlib
import dataclasses
import functools
import math
from unittest import mock

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

from fedpt import aggregator
from fedpt import compression
from fedpt import config as config_lib
from fedpt import fragments as fragments_lib
from fedpt import inner
from fedpt import model as model_lib
from fedpt import outer
from fedpt import protocol
from fedpt import sharding
from fedpt import trees

GIB = 2**30
# Below this fraction of HBM a plan "fits"; XLA needs workspace and suffers fragmentation.
HEADROOM = 0.9
# Weakest to strongest: each saves fewer activations and recomputes more.
REMAT_ORDER = ('none', 'dots', 'dots_no_batch', 'full')


def parse_mesh(text: str) -> dict[str, int]:
  """'data=1,fsdp=16,tensor=4' -> mesh sizes; axes left out are 1, one may be -1."""
  sizes = dict.fromkeys(sharding.MESH_AXES, 1)
  seen = set()
  example = 'e.g. --mesh=data=1,fsdp=-1,tensor=4'
  for item in (text or '').split(','):
    name, sep, value = (s.strip() for s in item.partition('='))
    if name not in sizes:
      raise config_lib.ConfigError(
          'mesh', f'unknown mesh axis {name!r} in {text!r}',
          f'name axes among {sharding.MESH_AXES}, {example}')
    try:
      size = int(value) if sep else None
    except ValueError:
      size = None
    if size is None or name in seen:
      raise config_lib.ConfigError(
          'mesh', f'cannot read {item.strip()!r} in {text!r}',
          f'give each axis once as axis=size (an integer, or -1 for the rest), {example}')
    seen.add(name)
    sizes[name] = size
  return sizes


def device_count(mesh_config, devices: int | None) -> int:
  """--devices, else the mesh's product, else (a -1 axis) this host's devices."""
  sizes = [int(mesh_config[name]) for name in sharding.MESH_AXES]
  if devices is None:
    if -1 not in sizes:
      return math.prod(sizes)
    fixed = math.prod(s for s in sizes if s != -1)
    if jax.device_count() % fixed:
      raise config_lib.ConfigError(
          'mesh', f'with an axis of -1 and no --devices, the plan is for this host\'s '
          f'{jax.device_count()} device(s), which the fixed axes (product {fixed}) cannot '
          'divide', 'pass --devices=N, the device count of the silo you plan for')
    return jax.device_count()
  if devices < 1:
    raise config_lib.ConfigError(
        'mesh', f'--devices={devices} is not a device count',
        'pass the number of accelerators of the silo, e.g. --devices=256')
  return devices


@dataclasses.dataclass(frozen=True)
class Memory:
  """Bytes per device; every device holds equal shards (the rules require divisibility).

  `update` (the optimizer step's temporaries) is live only once the backward pass has
  freed `activations`, so the peak counts the larger of the two.
  """
  params: int
  opt_state: int
  grads: int
  grad_accum: int
  activations: int
  update: int
  drift: int = 0  # SCAFFOLD's c - c_i and gradient sum (fp32), or FedProx's anchor.
  round_state: int = 0  # What a silo keeps across its inner steps: `silo_round_state_nbytes`.

  @property
  def total(self) -> int:
    return (self.params + self.opt_state + self.grads + self.grad_accum + self.drift
            + self.round_state + max(self.activations, self.update))


# -- parameters, optimizer state, gradients -----------------------------------------


def state_shardings(config, params, logical, mesh) -> tuple:
  """(optimizer, abstract opt state, param shardings, opt-state shardings), as the Trainer."""
  param_shardings = sharding.tree_shardings(mesh, logical, params, tuple(config.sharding.rules))
  optimizer = inner.make_optimizer(config.inner, config.train.steps)
  opt_state = jax.eval_shape(optimizer.init, params)
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_shardings = inner.opt_state_shardings(optimizer, opt_state, param_shardings, replicated)
  return optimizer, opt_state, param_shardings, opt_shardings


def shard_nbytes(leaf, named_sharding: NamedSharding) -> int:
  return math.prod(named_sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize


def _tree_shard_nbytes(abstract_tree, shardings) -> int:
  return sum(jax.tree.leaves(jax.tree.map(shard_nbytes, abstract_tree, shardings)))


# -- activations --------------------------------------------------------------------


def _mesh_axes(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _ways(rules, logical_name: str, mesh_sizes: dict) -> int:
  """How many devices split an array dimension with this logical name."""
  entry = sharding.logical_to_spec((logical_name,), rules)[0]
  return math.prod(mesh_sizes[n] for n in _mesh_axes(entry))


def _gathered_elements(params, logical, rules, mesh_sizes: dict) -> tuple[int, int]:
  """(one layer's, the largest vocab matrix's) elements per device once FSDP gathered them."""
  fsdp_axes = set(_mesh_axes(sharding.logical_to_spec(('embed',), rules)[0]))
  layer, vocab = 0, 0
  for leaf, axes in zip(jax.tree.leaves(params), jax.tree.leaves(
      logical, is_leaf=lambda x: isinstance(x, PartitionSpec))):
    spec = sharding.logical_to_spec(tuple(axes), rules)
    ways = math.prod(mesh_sizes[n] for entry in spec for n in _mesh_axes(entry)
                     if n not in fsdp_axes)
    elements = math.prod(leaf.shape) // ways
    if 'layers' in tuple(axes):
      layer += elements // leaf.shape[tuple(axes).index('layers')]
    elif 'vocab' in tuple(axes):
      vocab = max(vocab, elements)
  return layer, vocab


@jax.custom_vjp
def _flash_stand_in(q_btnh, k_btkh, v_btkh):
  del k_btkh, v_btkh
  return jnp.zeros_like(q_btnh)  # Only traced: the output's shape and dtype are what count.


def _flash_fwd(q_btnh, k_btkh, v_btkh):
  out_btnh = jnp.zeros_like(q_btnh)
  lse_bnt = jnp.zeros(q_btnh.shape[:1] + q_btnh.shape[2:3] + q_btnh.shape[1:2], jnp.float32)
  return out_btnh, (q_btnh, k_btkh, v_btkh, out_btnh, lse_bnt)


def _flash_bwd(residuals, g_btnh):
  q_btnh, k_btkh, v_btkh, _, _ = residuals
  del g_btnh
  return jnp.zeros_like(q_btnh), jnp.zeros_like(k_btkh), jnp.zeros_like(v_btkh)


_flash_stand_in.defvjp(_flash_fwd, _flash_bwd)


def _stand_in_attention(q_btnh, k_btkh, v_btkh, *args, **kwargs):
  del args, kwargs
  return _flash_stand_in(q_btnh, k_btkh, v_btkh)


@functools.lru_cache(maxsize=64)
def _residual_nbytes(model_config: model_lib.ModelConfig, batch: int, seq_len: int) -> int:
  """Bytes of what the loss's backward pass keeps from its forward pass, by tracing."""
  graphdef, params, _ = model_lib.abstract_model(model_config)
  tokens = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32)
  loss = functools.partial(inner.loss_and_metrics, graphdef=graphdef, z_loss=0.0)

  def residuals(params, tokens):  # The VJP function's leaves are the residuals.
    return jax.vjp(lambda p: loss(p, tokens), params, has_aux=True)[1]

  patch = contextlib.nullcontext()
  if model_config.attention == 'cudnn':  # Untraceable without a GPU; see the docstring.
    patch = mock.patch.object(jax.nn, 'dot_product_attention', _stand_in_attention)
  with patch:
    jaxpr = jax.make_jaxpr(residuals)(params, tokens).jaxpr
  inputs = set(jaxpr.invars)  # Parameters and tokens are in memory anyway.
  kept = {v for v in jaxpr.outvars if not isinstance(v, jax_core.Literal) and v not in inputs}
  return sum(math.prod(v.aval.shape) * np.dtype(v.aval.dtype).itemsize for v in kept)


def _affine_in_batch(model_config, seq_len: int) -> tuple[int, int]:
  """(bytes per sequence, bytes independent of the batch) of the residuals."""
  one = _residual_nbytes(model_config, 1, seq_len)
  per_sequence = _residual_nbytes(model_config, 2, seq_len) - one
  return per_sequence, one - per_sequence


def _local_model(model_config, rules, mesh_sizes: dict) -> model_lib.ModelConfig:
  """The model one device computes activations for: its share of heads, d_ff and vocab."""
  heads = _ways(rules, 'act_heads', mesh_sizes)
  n_heads = -(-model_config.n_heads // heads)
  n_kv_heads = max(1, model_config.n_kv_heads // heads)
  if n_heads % n_kv_heads:
    n_kv_heads = n_heads
  return dataclasses.replace(
      model_config, n_heads=n_heads, n_kv_heads=n_kv_heads,
      d_ff=-(-model_config.d_ff // _ways(rules, 'act_mlp', mesh_sizes)),
      vocab_size=-(-model_config.vocab_size // _ways(rules, 'act_vocab', mesh_sizes)))


def micro_batch_per_device(config, mesh_sizes: dict) -> int:
  rules = tuple(config.sharding.rules)
  micro = config.data.global_batch // config.inner.grad_accum
  return -(-micro // _ways(rules, 'batch', mesh_sizes))


def activation_memory(config, model_config, mesh_sizes: dict, params, logical) -> dict:
  """Peak activation bytes per device, an estimate (see the module docstring)."""
  rules = tuple(config.sharding.rules)
  local = _local_model(model_config, rules, mesh_sizes)
  batch = micro_batch_per_device(config, mesh_sizes)
  seq_len = -(-config.data.seq_len // _ways(rules, 'length', mesh_sizes))
  per_sequence, weight_copies = _affine_in_batch(local, seq_len)
  saved = batch * per_sequence + weight_copies // _ways(rules, 'embed', mesh_sizes)
  compute = np.dtype(model_config.compute_dtype).itemsize
  param = np.dtype(model_config.param_dtype).itemsize
  layer_weights, vocab_weights = _gathered_elements(params, logical, rules, mesh_sizes)
  one, two = (_affine_in_batch(dataclasses.replace(local, n_layers=n, remat='none'), seq_len)[0]
              for n in (1, 2))  # One layer without remat: what a second one adds.
  layer = batch * (two - one) + layer_weights * (2 * compute + param)
  loss = 2 * 4 * batch * seq_len * local.vocab_size + vocab_weights * (compute + param)
  return {'saved': saved, 'transient': max(layer, loss), 'total': saved + max(layer, loss),
          'micro_batch_per_device': batch}


# -- the plan -----------------------------------------------------------------------


def _memory(config, num_devices: int, platform: str) -> tuple[Memory, dict]:
  sharding.validate_config(config, num_devices=num_devices)
  sizes = sharding.mesh_shape(config.mesh, num_devices)
  mesh = AbstractMesh(sizes, sharding.MESH_AXES)
  model_config = model_lib.ModelConfig.from_config(config.model, platform)
  _, params, logical = model_lib.abstract_model(model_config)
  _, opt_state, param_shardings, opt_shardings = state_shardings(config, params, logical, mesh)
  param_bytes = _tree_shard_nbytes(params, param_shardings)
  param_elements = param_bytes // np.dtype(model_config.param_dtype).itemsize
  acts = activation_memory(config, model_config, dict(zip(sharding.MESH_AXES, sizes)),
                           params, logical)
  memory = Memory(params=param_bytes, opt_state=_tree_shard_nbytes(opt_state, opt_shardings),
                  grads=param_bytes,
                  grad_accum=param_bytes if config.inner.grad_accum > 1 else 0,
                  activations=acts['total'],
                  update=2 * 4 * param_elements + (
                      newton_schulz_nbytes(params, logical, tuple(config.sharding.rules),
                                           dict(zip(sharding.MESH_AXES, sizes)))
                      if config.inner.optimizer == 'muon' else 0),
                  drift=drift_state_nbytes(config.inner.drift_correction, param_bytes,
                                           param_elements),
                  round_state=silo_round_state_nbytes(config, param_bytes, param_elements))
  return memory, acts


def newton_schulz_nbytes(params, logical, rules, mesh_sizes: dict) -> int:
  """Bytes per device Muon's orthogonalisation adds to the optimizer update, an estimate.

  optax orthogonalises a leaf's `layers` matrices at once, in float32: the Nesterov
  momentum, X and B @ X (leaf-sized each), A = X X^T and B (layers x m x m each, m the
  smaller of fan-in and fan-out). Newton-Schulz contracts over the 'embed' side, which FSDP
  splits, so XLA gathers every Muon leaf over the FSDP axes (the tensor-parallel side stays
  split): all of them gathered, plus the largest leaf's working set at that size. Against
  XLA's buffer assignment (CPU, 8 devices, 4 layers of d_model 512, batch 8 x 16) the peak
  total was 4% low at fsdp=8 and 9% high at fsdp=4 x tensor=2 (XLA's temporaries grew 3.5x
  and 2.5x over AdamW's: the gathers are real, and every device repeats the same work).
  """
  fsdp_axes = set(_mesh_axes(sharding.logical_to_spec(('embed',), rules)[0]))
  is_dims = lambda x: x is None or isinstance(x, optax.contrib.MuonDimensionNumbers)  # noqa: E731
  gathered, largest = 0, 0
  for dims, leaf, axes in zip(
      jax.tree.leaves(inner.muon_dimension_numbers(params), is_leaf=is_dims),
      jax.tree.leaves(params),
      jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, PartitionSpec))):
    if dims is None:
      continue
    names = [n for entry in sharding.logical_to_spec(tuple(axes), rules) for n in _mesh_axes(entry)]
    ways = math.prod(mesh_sizes[n] for n in names)
    split = math.prod(mesh_sizes[n] for n in names if n not in fsdp_axes)
    size = math.prod(leaf.shape)
    fan_in, fan_out = (math.prod(leaf.shape[i] for i in ((a,) if isinstance(a, int) else a))
                       for a in dims)
    gathered += 4 * size // split - 4 * size // ways
    working_set = 4 * (3 * size + 2 * (size // (fan_in * fan_out)) * min(fan_in, fan_out)**2)
    largest = max(largest, working_set // split)
  return gathered + largest


def silo_round_state_nbytes(config, param_bytes: int, param_elements: int) -> int:
  """Bytes per device a silo holds on its devices through a round's inner steps (`silo._Silo`).

  The round's base (a params copy, for the delta); with error feedback the residual
  and the one the last delta was built with (fp32 each); SCAFFOLD's c_i and the one
  before the last publish (fp32 each); with a compressed downlink the last global round
  loaded (a params copy; with fragments it is the round's base, counted once); with overlapped rounds the prefetched next global
  round (a params copy) and, eager, the dequantised deltas of this round and the one
  before (fp32 each). Private leaves are counted as shared: an upper bound.
  """
  fed, fp32 = config.federation, 4 * param_elements
  total = param_bytes
  if fed.compression != 'none' and fed.error_feedback:
    total += 2 * fp32
  if config.inner.drift_correction == 'scaffold':
    total += 2 * fp32
  if fed.downlink_compression != 'none' and fed.fragments == 1:  # Fragments: it is the base.
    total += param_bytes
  if fed.overlap != 'none':
    total += param_bytes + (2 * fp32 if fed.overlap == 'eager' else 0)
  return total


def drift_state_nbytes(kind: str, param_bytes: int, param_elements: int) -> int:
  """Bytes per device of the train state's 'drift' entry (`drift.init_drift_state`)."""
  return {'scaffold': 2 * 4 * param_elements, 'fedprox': param_bytes}.get(kind, 0)


def delta_sizes(params_tree, block_size: int, private_params=(),
                topk: compression.TopK = compression.TopK()) -> dict[str, int]:
  """Bytes of the whole published delta in each format, from the payload layout.

  Private leaves (`federation.private_params`) are not published, so not counted.
  topk is counted with the run's `federation.topk_*`.
  """
  shared = _shared(params_tree, private_params)
  return {fmt: sum(compression.compressed_nbytes(leaf.shape, fmt, block_size, topk)
                   for leaf in shared.values()) for fmt in compression.FORMATS}


def exchange_sizes(params_tree, fmt: str, block_size: int, private_params=(),
                   topk: compression.TopK = compression.TopK(), fragments: int = 1) -> list[int]:
  """Bytes of one exchange of each fragment (`fedpt/fragments.py`) in `fmt`: a round's
  delta of fragment p is its rows of every shared leaf. [the whole delta] when P = 1."""
  shapes = {n: leaf.shape for n, leaf in _shared(params_tree, private_params).items()}
  return [sum(compression.compressed_nbytes(shape, fmt, block_size, topk) for shape in
              fragments_lib.fragment_shapes(shapes, p, fragments).values())
          for p in range(fragments)]


def _shared(params_tree, private_params) -> dict:
  flat = trees.flatten_params(params_tree)
  return {n: flat[n] for n in protocol.shared_leaves(
      {'federation': {'private_params': tuple(private_params)}}, flat)}


def round_traffic(params_tree, fed, drift_correction: str, delta_bytes: dict) -> dict:
  """Bytes one silo moves per round: its upload, and the global round it downloads.

  With fragments (P > 1) a round moves one fragment's rows: `upload_bytes` and
  `download_bytes` are the largest fragment's (the peak of one exchange; the download is
  the float32 or `downlink_compression` update of those rows), `*_per_h_bytes` the sum
  over the P rounds of H steps that exchange every fragment once.

  SCAFFOLD adds one fp32 control-variate leaf per shared leaf each way (delta_c_i up,
  the server's c down; docs/protocol.md). With a compressed downlink an up-to-date
  silo downloads the update (`downlink_bytes`: the shared leaves in
  `federation.downlink_compression`); a silo that missed a round reads the whole model
  (`full_download_bytes`).
  """
  control = (sum(4 * math.prod(leaf.shape) for leaf in
                 _shared(params_tree, fed.private_params).values())
             if drift_correction == 'scaffold' else 0)
  params = sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
               for leaf in jax.tree.leaves(params_tree))
  downlink, count = fed.downlink_compression, fed.fragments
  topk = compression.TopK.of(fed)
  ups = (exchange_sizes(params_tree, fed.compression, fed.block_size, fed.private_params,
                        topk, count) if count > 1 else [delta_bytes[fed.compression]])
  downs = (exchange_sizes(params_tree, downlink, fed.block_size, fed.private_params, topk,
                          count) if downlink != 'none' or count > 1 else [params])
  return {'control_bytes': control, 'fragments': count, 'upload_bytes': max(ups) + control,
          'upload_per_h_bytes': sum(ups) + count * control,
          'downlink_compression': downlink, 'downlink_bytes': max(downs),
          'download_bytes': max(downs) + control,
          'download_per_h_bytes': sum(downs) + count * control,
          'full_download_bytes': params + control}


def _fixes(config, num_devices: int, platform: str, budget: float) -> list[dict]:
  """Changes that bring the peak under `budget` bytes: single ones, else all together."""

  def memory_with(edits) -> Memory | None:
    trial = config.copy_and_resolve_references()
    for edit in edits:
      edit(trial)
    try:
      return _memory(trial, num_devices, platform)[0]
    except config_lib.ConfigError:  # E.g. a grad_accum the batch cannot be split into.
      return None

  mesh = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, num_devices)))
  knobs = []  # Per knob, its settings from the least to the most recomputation or memory.
  if mesh['data'] > 1:
    fsdp = mesh['data'] * mesh['fsdp']
    knobs.append([(f"mesh data=1,fsdp={fsdp},tensor={mesh['tensor']}",
                   lambda c: c.mesh.update(data=1, fsdp=fsdp))])
  knobs.append([(f'model.remat={p!r}', lambda c, p=p: c.model.update(remat=p))
                for p in REMAT_ORDER[REMAT_ORDER.index(config.model.remat) + 1:]])
  accums = [config.inner.grad_accum * 2**i for i in range(1, 20)]
  knobs.append([(f'inner.grad_accum={a}', lambda c, a=a: c.inner.update(grad_accum=a))
                for a in accums if config.data.global_batch % a == 0])
  fixes = []
  for settings in knobs:
    for change, edit in settings:
      memory = memory_with([edit])
      if memory is not None and memory.total <= budget:
        fixes.append({'change': change, 'total_bytes': memory.total})
        break
  if fixes:
    return fixes
  strongest = []
  for settings in knobs:
    valid = [(change, edit) for change, edit in settings if memory_with([edit]) is not None]
    strongest += valid[-1:]
  memory = memory_with([edit for _, edit in strongest])
  changes = ', '.join(change for change, _ in strongest) or 'no change'
  if memory is not None and memory.total <= budget:
    return [{'change': f'all of {changes}', 'total_bytes': memory.total}]
  memory = memory or memory_with([])
  transient = max(memory.activations, memory.update)
  if transient >= budget:
    what, fix = (('activations', 'shorten data.seq_len, or split heads and d_ff over more '
                  'devices with mesh tensor') if memory.activations >= memory.update else
                 ('optimizer update', 'split the matrices over more devices with mesh tensor'
                  + (', or use inner.optimizer=adamw (Muon gathers each matrix for '
                     'Newton-Schulz)' if config.inner.optimizer == 'muon' else '')))
    return [{'change': f'even with {changes}, one device\'s {what} need '
                       f'{human_bytes(transient)}: {fix}', 'total_bytes': None}]
  needed = math.ceil(num_devices * (memory.total - transient) / (budget - transient))
  return [{'change': f'about {needed} devices (the state shrinks with the device count), '
                     f'with {changes}', 'total_bytes': None}]


def plan(config, num_devices: int, *, platform: str = 'gpu', hbm_gib: float = 80.0,
         num_shards: int | None = None) -> dict:
  """Per-device memory, verdict against `hbm_gib`, delta sizes, aggregator host memory.

  `num_shards`: the aggregation shards to plan the aggregator for (default
  `federation.num_shards`). JSON-ready.
  """
  protocol.validate_federation(config)  # The formats sized below name their field when bad.
  memory, acts = _memory(config, num_devices, platform)
  model_config = model_lib.ModelConfig.from_config(config.model, platform)
  _, params, _ = model_lib.abstract_model(model_config)
  sizes = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, num_devices)))
  hbm = int(hbm_gib * GIB)
  used = memory.total / hbm
  verdict = 'fits' if used <= HEADROOM else 'tight' if used <= 1 else 'does not fit'
  fed = config.federation
  deltas = delta_sizes(params, fed.block_size, fed.private_params, compression.TopK.of(fed))
  return {
      'config': config.name,
      'devices': num_devices,
      'mesh': sizes,
      'platform': platform,
      'model': {
          'param_count': model_lib.param_count(model_config),
          'param_dtype': model_config.param_dtype,
          'compute_dtype': model_config.compute_dtype,
          'attention': model_config.attention,
          'remat': model_config.remat,
          'seq_len': config.data.seq_len,
          'micro_batch_per_device': acts['micro_batch_per_device'],
          'grad_accum': config.inner.grad_accum,
          'inner_optimizer': config.inner.optimizer,
      },
      'per_device_bytes': {**dataclasses.asdict(memory), 'total': memory.total},
      'activation_bytes': {'saved': acts['saved'], 'transient': acts['transient']},
      'hbm_bytes': hbm,
      'hbm_used': used,
      'verdict': verdict,
      'fixes': ([] if verdict == 'fits' else
                _fixes(config, num_devices, platform, HEADROOM * hbm)),
      'delta': {'compression': fed.compression, 'block_size': fed.block_size,
                'topk': compression.TopK.of(fed).record(),
                'bytes': deltas,
                'ratio_to_float32': {k: v / deltas['none'] for k, v in deltas.items()},
                'drift_correction': config.inner.drift_correction,
                'private_params': list(fed.private_params),
                **round_traffic(params, fed, config.inner.drift_correction, deltas)},
      'aggregator': aggregator_memory(config, num_shards),
  }


def compiled_memory(config, devices) -> dict:
  """XLA's own per-device bytes for the real train step, compiled (not run) on `devices`.

  The ground truth the estimate approximates, for a host that has the silo's devices.
  """
  sharding.validate_config(config, num_devices=len(devices))
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = tuple(config.sharding.rules)
  model_config = model_lib.ModelConfig.from_config(config.model, devices[0].platform)
  graphdef, params, logical = model_lib.abstract_model(model_config)
  optimizer, opt_state, param_shardings, opt_shardings = state_shardings(
      config, params, logical, mesh)
  replicated = NamedSharding(mesh, PartitionSpec())
  shardings = {'step': replicated, 'params': param_shardings, 'opt_state': opt_shardings}
  state = {'step': jax.ShapeDtypeStruct((), jnp.int32), 'params': params,
           'opt_state': opt_state}
  batch = jax.ShapeDtypeStruct((config.data.global_batch, config.data.seq_len + 1), jnp.int32)
  step = jax.jit(
      functools.partial(inner.train_step, graphdef=graphdef, optimizer=optimizer,
                        inner_config=config.inner),
      in_shardings=(shardings,
                    NamedSharding(mesh, sharding.logical_to_spec(('batch', 'length'), rules))),
      out_shardings=(shardings, replicated), donate_argnums=(0,))
  with sharding.activation_rules(mesh, rules):
    analysis = step.lower(state, batch).compile().memory_analysis()
  arguments, temp = analysis.argument_size_in_bytes, analysis.temp_size_in_bytes
  extra_outputs = analysis.output_size_in_bytes - analysis.alias_size_in_bytes
  return {'arguments': arguments, 'temp': temp, 'total': arguments + extra_outputs + temp,
          'platform': devices[0].platform, 'devices': len(devices)}


# -- the aggregator ------------------------------------------------------------------

# Orbax's tensorstore writes copy host (numpy) arrays about twice while saving them
# (measured: +1.75-1.9x the tree, fedpt/storage.py): the aggregator saves numpy arrays.
ORBAX_SAVE_COPIES = 2
# Python, JAX, Orbax and tensorstore themselves, before any array (measured ~0.4 GiB).
AGGREGATOR_RUNTIME_BYTES = GIB


def aggregator_memory(config, num_shards: int | None = None) -> dict:
  """Host bytes one aggregation shard holds at its peak, per shard (`aggregator.aggregate`).

  It holds the round it read (`read_shard`: its leaves' params, outer-optimizer state
  and, with SCAFFOLD, control variates), the next round it builds beside them
  (`new_*`), the deltas of one leaf at a time (the token-weighted mean streams the
  silos: a running sum, its update and one silo's decompressed delta plus its
  payload; SCAFFOLD, trimmed_mean and median hold every silo's at once, the robust
  rules also stacked and sorted), and Orbax's copies while it writes the next round.
  """
  fed = config.federation
  num_shards = fed.num_shards if num_shards is None else num_shards
  if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
    raise config_lib.ConfigError('federation.num_shards', f'{num_shards!r} is not >= 1',
                                 'pass --num_shards=N with N >= 1')
  model_config = model_lib.ModelConfig.from_config(config.model)
  params = trees.flatten_params(model_lib.abstract_model(model_config)[1])
  optimizer = outer.make_outer_optimizer(config.outer)
  silos = len(fed.silos)
  scaffold = config.inner.drift_correction == 'scaffold'
  robust = fed.robust in ('trimmed_mean', 'median')
  private = set(params) - set(protocol.shared_leaves(
      {'federation': {'private_params': tuple(fed.private_params)}}, params))
  nbytes = lambda x: math.prod(x.shape) * np.dtype(x.dtype).itemsize  # noqa: E731
  shards = []
  for shard in range(num_shards):
    names = outer.shard_leaf_names(sorted(params), shard, num_shards, outer.leaf_nbytes(params))
    mine = {n: params[n] for n in names}
    state = aggregator.state_to_arrays(jax.eval_shape(
        lambda mine=mine: outer.init_outer_state(optimizer, mine)))
    held = {'params': sum(nbytes(x) for x in mine.values()),
            'outer_state': sum(nbytes(x) for x in state.values()),
            'controls': 4 * sum(math.prod(x.shape) for x in mine.values()) if scaffold else 0}
    held['next_round'] = sum(held.values())
    deltas = 0
    for n in sorted(set(names) - private):
      rows = fragments_lib.rows_shape(params[n].shape, 0, fed.fragments)  # The most rows.
      leaf_f32 = 4 * math.prod(rows)
      payload = compression.compressed_nbytes(rows, fed.compression, fed.block_size,
                                              compression.TopK.of(fed))
      if robust or scaffold:  # Every silo's delta (and control) at once; robust: stacked, sorted.
        one = silos * leaf_f32 * ((2 if scaffold else 1) + (2 if robust else 0)) + payload
      else:
        one = 3 * leaf_f32 + payload
      deltas = max(deltas, one)
    held['deltas'] = deltas
    held['orbax_save'] = ORBAX_SAVE_COPIES * held['next_round']
    held['runtime'] = AGGREGATOR_RUNTIME_BYTES
    shards.append({'shard': shard, 'leaves': len(names), **held,
                   'total': sum(held.values())})
  return {'num_shards': num_shards, 'silos': silos, 'outer_optimizer': config.outer.optimizer,
          'robust': fed.robust, 'drift_correction': config.inner.drift_correction,
          'shards': shards, 'max_total': max(s['total'] for s in shards)}


# -- rendering ----------------------------------------------------------------------


def human_bytes(n: float) -> str:
  for unit, scale in (('TiB', 2**40), ('GiB', GIB), ('MiB', 2**20), ('KiB', 2**10)):
    if abs(n) >= scale:
      return f'{n / scale:.2f} {unit}'
  return f'{int(n)} B'


def render(info: dict) -> str:
  """The plan as a table for people."""
  m, mem, mesh = info['model'], info['per_device_bytes'], info['mesh']
  mesh_text = ','.join(f'{k}={v}' for k, v in mesh.items())
  lines = [
      f"plan for {info['config']}: {m['param_count']:,} parameters on {info['devices']} "
      f"{info['platform']} device{'s' if info['devices'] != 1 else ''}, mesh {mesh_text}",
      f"  micro-batch {m['micro_batch_per_device']} x {m['seq_len']} tokens per device, "
      f"grad_accum {m['grad_accum']}, remat {m['remat']}, {m['param_dtype']} params, "
      f"{m['compute_dtype']} compute, {m['attention']} attention",
      '',
      'memory per device (every device holds an equal shard)',
  ]
  state = 'Muon+AdamW' if m['inner_optimizer'] == 'muon' else 'AdamW'
  rows = [('parameters', mem['params']), (f'optimizer state ({state})', mem['opt_state']),
          ('gradients', mem['grads'])]
  if mem['grad_accum']:
    rows.append(('gradient accumulator', mem['grad_accum']))
  if mem['drift']:
    rows.append((f"drift state ({info['delta']['drift_correction']})", mem['drift']))
  rows.append(('silo round state', mem['round_state']))
  acts = info['activation_bytes']
  rows += [('activations (estimate)', mem['activations']),
           ('  saved for the backward', acts['saved']),
           ('  largest transient', acts['transient']),
           ('optimizer update', mem['update']), ('peak total', mem['total'])]
  lines += [f'  {name:<28}{human_bytes(value):>12}' for name, value in rows]
  lines[-2] += '  (after the backward: the peak counts it or activations)'
  lines.append(f"  of {human_bytes(info['hbm_bytes'])} HBM: {info['hbm_used']:.0%} used, "
               f"{info['verdict']}")
  for fix in info['fixes']:
    total = '' if fix['total_bytes'] is None else (
        f" (total {human_bytes(fix['total_bytes'])})")
    lines.append(f"  fix: {fix['change']}{total}")
  if 'compiled' in info:
    xla = info['compiled']
    lines.append(f"  XLA, compiling the step on {xla['devices']} {xla['platform']} "
                 f"device{'s' if xla['devices'] != 1 else ''}: "
                 f"arguments {human_bytes(xla['arguments'])}, temporaries "
                 f"{human_bytes(xla['temp'])}, total {human_bytes(xla['total'])}")
  delta = info['delta']
  topk = delta['topk']
  lines += ['', f"published delta of the whole model (block_size {delta['block_size']}; topk "
                f"{topk['density']:g} of each {topk['chunk']} at {topk['bits']} bits)"]
  for fmt, nbytes in delta['bytes'].items():
    mark = '  <- federation.compression' if fmt == delta['compression'] else ''
    lines.append(f"  {fmt:<6}{human_bytes(nbytes):>12}  {delta['ratio_to_float32'][fmt]:.3f}x "
                 f"float32 (1/{1 / delta['ratio_to_float32'][fmt]:.0f}){mark}")
  if delta['private_params']:
    lines.append(f"  private leaves {delta['private_params']} are not published")
  if delta['control_bytes']:
    lines.append(f"  + SCAFFOLD control variates {human_bytes(delta['control_bytes'])} each way")
  downlink, count = delta['downlink_compression'], delta['fragments']
  lines.append(f"  per round: upload {human_bytes(delta['upload_bytes'])}, download "
               f"{human_bytes(delta['download_bytes'])}"
               + (f' (the {downlink} global update: federation.downlink_compression)'
                  if downlink != 'none' else ''))
  if count > 1:
    lines.append(f"  {count} fragments: the largest fragment's rows per round (the peak of one "
                 f"exchange); per H steps (every fragment once): upload "
                 f"{human_bytes(delta['upload_per_h_bytes'])}, download "
                 f"{human_bytes(delta['download_per_h_bytes'])}")
  if downlink != 'none' or count > 1:
    lines.append(f"  a silo that missed a round downloads the whole model: "
                 f"{human_bytes(delta['full_download_bytes'])}")
  agg = info['aggregator']
  lines += ['', f"aggregator host memory per shard ({agg['num_shards']} shard(s), "
                f"{agg['silos']} silos, outer {agg['outer_optimizer']}, {agg['robust']})"]
  for shard in agg['shards']:
    parts = ', '.join(f"{k.replace('_', ' ')} {human_bytes(shard[k])}" for k in (
        'params', 'outer_state', 'controls', 'next_round', 'deltas', 'orbax_save', 'runtime')
                      if shard[k])
    lines.append(f"  shard {shard['shard']}: {human_bytes(shard['total'])} ({shard['leaves']} "
                 f"leaves: {parts})")
  return '\n'.join(lines)
