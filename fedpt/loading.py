"""One model loader: a model's params from a workdir (plain or silo run) or a global round.

`sample.py`, `evaluate.py`, `export_hf.py` and `inspect_checkpoint.py` resolve
their `--workdir [--step]` or `--storage [--round]` through here, so they accept
the same sources and refuse bad ones with the same one-line errors. Nothing is
read into memory before it is vetted: a private checkpoint's metadata (model
spec, tokenizer hash) is checked against the config; a global round's run.json
against the config (`protocol.check_model_matches_run`), its shard metas by
`protocol.check_global_meta` (run, round, aggregator signatures), and every
array against the hash the aggregator committed.
"""
import contextlib
import dataclasses
import json
import os

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from fedpt import aggregator as aggregator_lib
from fedpt import checkpoint as checkpoint_lib
from fedpt import compression
from fedpt import config as config_lib
from fedpt import data as data_lib
from fedpt import drift as drift_lib
from fedpt import errors
from fedpt import fragments as fragments_lib
from fedpt import inner
from fedpt import model as model_lib
from fedpt import multihost
from fedpt import outer as outer_lib
from fedpt import protocol
from fedpt import signing
from fedpt import storage as storage_lib
from fedpt import trees


@dataclasses.dataclass(frozen=True)
class Source:
  """Where a model is: a workdir's checkpoint (newest, or `step`) or a run's global round.

  `round_index=None` means the newest committed round. Raises CheckpointError when
  the combination is not one of those two.
  """
  workdir: str | None = None
  step: int | None = None
  storage: str | None = None
  round_index: int | None = None

  def __post_init__(self):
    problem = None
    if (self.workdir is None) == (self.storage is None):
      problem = 'pass exactly one source'
    elif self.step is not None and self.workdir is None:
      problem = '--step goes with --workdir'
    elif self.round_index is not None and self.storage is None:
      problem = '--round goes with --storage'
    elif min(x for x in (self.step, self.round_index, 0) if x is not None) < 0:
      problem = f'--step/--round must be >= 0, got {self.step if self.step is not None else self.round_index}'
    if problem:
      raise checkpoint_lib.CheckpointError(
          f'{problem}. Fix: --workdir=DIR [--step=N] for a training run\'s or silo\'s '
          'checkpoint, or --storage=ROOT [--round=N] for a federated global round')

  def describe(self) -> str:
    return self.workdir if self.workdir is not None else self.storage


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A loaded model: pure-dict params (as `nnx.to_pure_dict`) and what they are."""
  params: dict
  model_config: model_lib.ModelConfig
  tokenizer_path: str
  source: str  # For people: '<workdir> step N', '<silo workdir> checkpoint N (round R, phase)'
  # or '<root> global round N'.


# -- the config a workdir recorded -----------------------------------------------------

CONFIG_RECORD = 'config.json'


def config_record_path(workdir: str) -> epath.Path:
  return epath.Path(workdir) / CONFIG_RECORD


def read_config_record(workdir: str) -> dict | None:
  """A workdir's config.json (`config.flat`, plus `config_changes` for a plain run), or None.

  A plain run writes it at its first start; a federated silo at every start (its
  run.json contract over its own fields). None for a new workdir and one trained
  by an older fedpt.
  """
  path = config_record_path(workdir)
  with errors.refusals(f'reading {path}', str(path)):
    try:
      raw = path.read_bytes()
    except FileNotFoundError:
      return None
  try:
    record = json.loads(raw)
    if not isinstance(record, dict):
      raise ValueError('not a JSON object')
    return record
  except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, ...
    raise config_lib.RecordedConfigError(
        f'{path} is not valid JSON ({errors.one_line(e)}). Fix: restore it from a backup, or '
        'delete it and pass --config with the values the run was started with') from None


def write_config_record(workdir: str, record: dict, note=lambda: '') -> None:
  """Writes config.json whole or not at all (process 0 of a multi-host silo only)."""
  if not multihost.is_leader():
    return
  path = config_record_path(workdir)
  with errors.refusals(f'writing {path}', workdir, note=note):
    storage_lib.write_atomically(path, json.dumps(record, indent=1, sort_keys=True) + '\n')


def source_config(config=None, typed=frozenset(), *, workdir: str | None = None,
                  step: int | None = None, storage: str | None = None,
                  round_index: int | None = None):
  """The config a tool reads a source's model with: the one the source recorded, else --config.

  A workdir's config.json is its model's config, so --config (`config`) is then
  optional. Of the fields typed on the command line (`typed`), one that would change
  the model (`config.MODEL_FIELDS`) is refused, naming both values; the others (eval
  batches, the data) apply. A global round's config is its run's (`run_config`). A
  workdir without a record (an older fedpt's) takes --config.
  """
  source = Source(workdir=workdir, step=step, storage=storage, round_index=round_index)
  if source.storage is not None:
    return run_config(storage_lib.RunStorage(source.storage).read_run(), config, typed)
  record = read_config_record(source.workdir)
  if record is None:
    if config is None:
      if source.workdir is not None:
        with open_checkpoint(source.workdir, source.step):  # No checkpoint at all says so first.
          pass
      raise config_lib.RecordedConfigError(
          f'--config is required: {source.describe()} records no config (only plain runs '
          f'started by this fedpt write {CONFIG_RECORD}). Fix: pass --config=<the configs/*.py '
          'file it was trained with> and the overrides it was trained with')
    return config
  changed = {} if config is None else config_lib.differences(
      record, config, fields=[f for f in typed if f in config_lib.MODEL_FIELDS])
  if changed:
    raise config_lib.RecordedConfigError(
        f'{config_lib.describe(changed, "recorded")}: the model at {source.workdir} was '
        f'trained with the recorded values. Fix: drop those overrides; the tools read the '
        f'model\'s config from {config_record_path(source.workdir)}')
  return config_lib.over_record(record, config, typed)


def run_config(run: dict, config=None, typed=frozenset()):
  """The config a reader of `run`'s global rounds uses: the run's contract, typed usage fields.

  As for a workdir: the contract (run.json) replaces what a config file sets
  (`config` may be None: the defaults), a typed field that changes the model is
  refused, and other typed fields (eval batches, data) apply.
  """
  protocol.check_run(run)
  if config is None:
    config = config_lib.base_config()
    config.name = ''  # run.json records no config name: the defaults' 'base' would mislabel it.
  typed = set(typed or ())
  adopted, _ = protocol.adopt_run_config(run, config, None, typed & set(config_lib.MODEL_FIELDS))
  mine = config_lib.flat(config)
  return protocol.federated_config(config_lib.with_values(
      adopted, {k: mine[k] for k in typed - set(config_lib.MODEL_FIELDS) if k in mine}))


# -- abstract trees -------------------------------------------------------------------


def abstract_params(model_config: model_lib.ModelConfig, device=None) -> dict:
  """The model's params as ShapeDtypeStructs on one device (the first by default)."""
  single = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
  _, params, _ = model_lib.abstract_model(model_config)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=single), params)


def train_state_abstract(config, params: dict) -> dict:
  """The single-silo train state {'step', 'params', 'opt_state'} around `params`' placement."""
  optimizer = inner.make_optimizer(config.inner, config.train.steps)
  state = jax.eval_shape(lambda p: inner.init_state(p, optimizer), params)
  placement = jax.tree.leaves(params)[0].sharding
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placement), state)


# The fp32 params-shaped items a silo's private checkpoint may hold besides 'train':
# error feedback's residual after and before the last publish, SCAFFOLD's c_i likewise, and
# federation.overlap='eager''s round base and its last two dequantised deltas (silo.py).
SILO_EXTRAS = ('residual', 'residual_base', 'control', 'control_base', 'eager_base',
               'eager_sent', 'eager_sent_next')


def silo_checkpoint_abstract(train_state: dict, extras=()) -> dict:
  """A federated silo's private checkpoint: {'train': state, **{item: fp32 params}}.

  `extras` names the `SILO_EXTRAS` the checkpoint holds.
  """
  tree = {'train': train_state}
  fp32 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding),
                      train_state['params'])
  for name in extras:
    tree[name] = fp32
  return tree


# -- private checkpoints ----------------------------------------------------------------


@contextlib.contextmanager
def open_checkpoint(workdir: str, step: int | None = None):
  """(Checkpointer, step) of a workdir's newest or given checkpoint; CheckpointError if none."""
  directory = os.path.join(workdir, 'checkpoints')
  fix = ('Fix: pass the --workdir of a training run or silo (it holds checkpoints/), or '
         '--storage for a federated global round')
  if not epath.Path(directory).is_dir():
    raise checkpoint_lib.CheckpointError(
        f'no checkpoint in --workdir={workdir} ({directory} is missing). {fix}.')
  checkpointer = checkpoint_lib.Checkpointer(directory, keep=1, async_save=False, clean_up=False)
  try:
    steps = checkpointer.all_steps()
    if not steps or (step is not None and step not in steps):
      raise checkpoint_lib.CheckpointError(
          f'no checkpoint {"" if step is None else f"at step {step} "}in {directory} (steps '
          f'there: {sorted(steps)}). {fix}, train until a checkpoint is written, or pass one '
          'of those steps.')
    yield checkpointer, (max(steps) if step is None else step)
  finally:
    checkpointer.close()


def params_layout(state_layout: dict) -> dict:
  """The params subtree of a saved state's layout, for a plain run or a silo alike."""
  return state_layout['train']['params'] if 'train' in state_layout else state_layout['params']


def _restore_workdir(config, source: Source, train_state: dict, tokenizer_sha256: str):
  with open_checkpoint(source.workdir, source.step) as (checkpointer, step):
    layout = checkpointer.state_layout(step)
    abstract = train_state
    if 'train' in layout:  # A federated silo's checkpoint (silo.run_silo).
      if 'drift' in layout['train']:  # SCAFFOLD's or FedProx's round state (fedpt/drift.py).
        kind = 'scaffold' if 'correction' in layout['train']['drift'] else 'fedprox'
        drift = jax.eval_shape(lambda p: drift_lib.init_drift_state(p, kind),
                               train_state['params'])
        train_state = {**train_state, 'drift': jax.tree.map(
            lambda d, p: jax.ShapeDtypeStruct(d.shape, d.dtype, sharding=p.sharding),
            drift, {k: train_state['params'] for k in drift})}
      abstract = silo_checkpoint_abstract(train_state,
                                          [n for n in SILO_EXTRAS if n in layout])
    try:
      state, meta = checkpointer.restore(
          step, abstract, checkpoint_lib.expected_meta(config, tokenizer_sha256))
    except checkpoint_lib.CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # Damage fails in many ways.
      older = [s for s in checkpointer.all_steps() if s < step]
      raise checkpoint_lib.CheckpointError(
          f'checkpoint step {step} in {source.workdir} is unreadable ({type(e).__name__}: '
          f'{errors.one_line(e, 160)}). Fix: '
          + (f'pass --step={max(older)} (an older one)' if older else 'retrain it')
          + '; resuming training there moves it aside by itself.') from None
  label = checkpoint_label(source.workdir, step, meta)
  return (state['train'] if 'train' in layout else state)['params'], label


def checkpoint_label(workdir: str, step: int, meta: dict) -> str:
  """'<workdir> step N', or for a silo's private checkpoint (its meta has the round's
  'phase'), numbered by save rather than by train step, '<workdir> checkpoint N (round R,
  phase)'."""
  if meta.get('phase') is None:
    return f'{workdir} step {step}'
  return f"{workdir} checkpoint {step} (round {meta.get('round')}, {meta['phase']})"


# -- global rounds -----------------------------------------------------------------------


def committed_round(store: storage_lib.RunStorage, round_index: int | None) -> tuple[int, list]:
  """(round, shard metas) of a committed global round, the newest when None."""
  latest = store.latest_global_round()
  if round_index is None:
    round_index = latest
  metas = None if round_index is None else store.global_shard_metas(round_index)
  if metas is None:
    if latest is None:
      raise storage_lib.StorageError(
          f'global round {round_index} is not committed under {store.root}: no round is '
          'committed yet. Fix: wait for scripts/init_run.py to finish, or check --storage.')
    raise storage_lib.StorageError(
        f'global round {round_index} is not committed under {store.root} (the newest is '
        f'{latest}; old rounds are garbage-collected). Fix: pass --round={latest} or another '
        'round scripts/status.py lists, or leave --round out for the newest.')
  return round_index, metas


def _aggregator_check(run: dict, identity=None):
  """The aggregator-signature check of a reader: `identity`'s pinned key (a party), else
  the key run.json lists (a researcher); None in an unsigned run."""
  return (identity.check_aggregator if identity is not None
          else signing.listed_aggregator_check(run))


def global_meta_check(store: storage_lib.RunStorage, run: dict, round_index: int,
                      identity=None):
  """meta -> reason or None: `protocol.check_global_meta` of a shard of global round
  `round_index`, with the previous round's manifest read once for all shards."""
  check_aggregator = _aggregator_check(run, identity)
  previous = (store.read_manifest(round_index - 1)
              if check_aggregator is not None and round_index > 0 else None)
  return lambda meta: protocol.check_global_meta(run, round_index, meta, check_aggregator,
                                                 previous)


def read_global_params(store: storage_lib.RunStorage, run: dict, round_index: int,
                       abstract_flat: dict, identity=None) -> dict:
  """A committed global round's flat params, vetted, restored into `abstract_flat`'s placement.

  `identity` is a party's signing identity (silos); without one (a researcher
  reading a round) signatures are checked against the key run.json lists.
  """
  return store.read_global_params(round_index, abstract_flat,
                                  check_meta=global_meta_check(store, run, round_index, identity))


def read_decided_manifest(store: storage_lib.RunStorage, run: dict, round_index: int,
                          identity=None) -> dict:
  """Round `round_index`'s manifest, signed by the aggregator (signed runs) and well-formed.

  A missing, unsigned or malformed one stops the reader with the one-line tampered error.
  """
  check_aggregator = _aggregator_check(run, identity)
  manifest = store.read_manifest(round_index)
  reason = 'it is missing' if manifest is None else (
      (check_aggregator(manifest) if check_aggregator is not None else None)
      or protocol.check_manifest(run, round_index, manifest))
  if reason:
    raise storage_lib.StorageError(
        f'the manifest of round {round_index} under {store.root}: {reason}. The bucket was '
        'tampered with; nothing was loaded. Fix: ask the run\'s operator to restore the round.')
  return manifest


def global_from_update(store: storage_lib.RunStorage, run: dict, round_index: int,
                       base_flat: dict, identity=None) -> tuple[dict, int] | None:
  """(global round `round_index`'s flat params, bytes read) from global round - 1 and the
  round's published update (the compressed downlink); None if the round has no update.

  `base_flat` must be the verified previous round. Each shard meta is vetted as
  `read_global_params` vets it, every update array against its `update_hashes`, and
  every rebuilt leaf (`compression.apply_update`; a leaf without an update is carried
  over) against the meta's `leaf_hashes`: a mismatch is `storage.tampered`, and nothing
  is returned.
  """
  metas = store.global_shard_metas(round_index)
  if metas is None:
    raise storage_lib.StorageError(
        f'global round {round_index} is not committed under {store.root}')
  if any('update_hashes' not in m for m in metas):
    return None
  check = global_meta_check(store, run, round_index, identity)
  out, nbytes = {}, 0
  for meta in metas:
    shard = meta.get('shard')
    layout, reason = None, check(meta)
    if reason is None:
      layout, reason = protocol.update_layout(run, meta)
    if reason is None and any(tuple(meta['leaf_shapes'][n]) != tuple(base_flat[n].shape)
                              for n in meta['leaf_hashes'] if n in base_flat):
      reason = 'its leaf shapes are not those of the previous round'
    if reason is None and not set(meta['leaf_hashes']) <= set(base_flat):
      reason = 'it lists parameters the previous round lacks'
    if reason:
      raise storage_lib.tampered(store.root, round_index, shard, reason)
    arrays = {}
    if layout:
      abstract = {f'{n}/{k}': jax.ShapeDtypeStruct(tuple(s), np.dtype(d))
                  for n, spec in layout.items() for k, (s, d) in spec.items()}
      try:
        arrays = store.read_global_update(round_index, shard, meta['num_shards'], abstract)
      except Exception as e:  # pylint: disable=broad-except  # Corrupt chunks fail in many ways.
        raise storage_lib.tampered(store.root, round_index, shard,
                                   f'its update is unreadable ({errors.one_line(e)})') from None
    for k in sorted(arrays):
      if storage_lib.array_hash(arrays[k]) != meta['update_hashes'][k]:
        raise storage_lib.tampered(store.root, round_index, shard, (
            f'update array {k} does not match its committed hash: the object was modified or '
            'torn after commit'))
      nbytes += int(arrays[k].nbytes)
    fmt, block_size = meta['update_format']['compression'], meta['update_format']['block_size']
    fragment, count = protocol.round_fragment(run, round_index - 1), protocol.fragments(run)
    for n in sorted(meta['leaf_hashes']):
      leaf = base_flat[n]
      if n in layout:  # With fragments the update holds the exchanged fragment's rows.
        leaf = fragments_lib.put(leaf, fragment, count, compression.apply_update(
            fragments_lib.take(leaf, fragment, count),
            {k: arrays[f'{n}/{k}'] for k in layout[n]}, fmt, block_size))
      if storage_lib.array_hash(leaf) != meta['leaf_hashes'][n]:
        raise storage_lib.tampered(store.root, round_index, shard, (
            f'parameter {n} rebuilt from the previous round and the update does not match its '
            'committed hash'))
      out[n] = leaf
  if set(out) != set(base_flat):
    raise storage_lib.StorageError(
        f'global round {round_index} lacks parameters {sorted(set(base_flat) - set(out))[:3]}. '
        'Fix: use the run\'s config.')
  return out, nbytes


def read_global_controls(store: storage_lib.RunStorage, run: dict, round_index: int,
                         abstract_flat: dict, identity=None) -> dict:
  """SCAFFOLD's server control variate c of a committed global round, {leaf: fp32 array}.

  Vetted as `read_global_params` is: each shard meta by `protocol.check_global_meta`,
  each array against the hash that meta lists for it; restored in `abstract_flat`'s
  placement.
  """
  metas = store.global_shard_metas(round_index)
  if metas is None:
    raise storage_lib.StorageError(
        f'global round {round_index} is not committed under {store.root}')
  check = global_meta_check(store, run, round_index, identity)
  out = {}
  for meta in metas:
    reason = check(meta)
    names = sorted(meta['leaf_hashes'])
    wanted = {protocol.control_name(n): n for n in names}
    hashes = meta['outer_state_hashes']
    if reason is None and any(k not in hashes for k in wanted):
      reason = 'its meta.json lists no SCAFFOLD control variates (protocol.CONTROL)'
    if reason:
      raise storage_lib.tampered(store.root, round_index, meta.get('shard'), reason)
    abstract = {k: jax.ShapeDtypeStruct(abstract_flat[n].shape, jnp.float32,
                                        sharding=abstract_flat[n].sharding)
                for k, n in wanted.items()}
    arrays = store.read_global_outer_arrays(round_index, meta['shard'], meta['num_shards'],
                                            abstract)
    for k, n in wanted.items():
      if storage_lib.array_hash(arrays[k]) != hashes[k]:
        raise storage_lib.tampered(store.root, round_index, meta['shard'], (
            f'control variate {k} does not match its committed hash: the object was modified '
            'or torn after commit'))
      out[n] = arrays[k]
  if set(out) != set(abstract_flat):
    raise storage_lib.StorageError(
        f'global round {round_index} lacks control variates of '
        f'{sorted(set(abstract_flat) - set(out))[:3]}. Fix: use the run\'s config.')
  return out


def read_global_outer_state(store: storage_lib.RunStorage, run: dict, round_index: int,
                            optimizer, leaf_shapes: dict, identity=None) -> dict:
  """{leaf: optax state} of a committed global round's outer optimizer, on the host, vetted as
  `read_global_controls` vets c: each shard meta checked, each array against its hash.

  `leaf_shapes` names the leaves wanted; a stateless optimizer (fedavg) gives empty states.
  """
  metas = store.global_shard_metas(round_index)
  if metas is None:
    raise storage_lib.StorageError(
        f'global round {round_index} is not committed under {store.root}')
  check = global_meta_check(store, run, round_index, identity)
  abstract_state = jax.eval_shape(lambda: outer_lib.init_outer_state(
      optimizer, {n: jax.ShapeDtypeStruct(tuple(s), jnp.float32)
                  for n, s in leaf_shapes.items()}))
  out = {}
  for meta in metas:
    reason = check(meta)
    names = sorted(n for n in meta['leaf_hashes'] if n in leaf_shapes) if not reason else []
    wanted = aggregator_lib.state_to_arrays({n: abstract_state[n] for n in names})
    hashes = meta['outer_state_hashes']
    if reason is None and any(k not in hashes for k in wanted):
      reason = 'its meta.json lacks outer-optimizer state arrays'
    if reason:
      raise storage_lib.tampered(store.root, round_index, meta.get('shard'), reason)
    arrays = (store.read_global_outer_arrays(round_index, meta['shard'], meta['num_shards'],
                                             wanted) if wanted else {})
    for k in wanted:
      if storage_lib.array_hash(arrays[k]) != hashes[k]:
        raise storage_lib.tampered(store.root, round_index, meta['shard'], (
            f'outer-state array {k} does not match its committed hash: the object was '
            'modified or torn after commit'))
    out.update(aggregator_lib.arrays_to_state(arrays, {n: abstract_state[n] for n in names}))
  if set(out) != set(leaf_shapes):
    raise storage_lib.StorageError(
        f'global round {round_index} lacks the outer state of '
        f'{sorted(set(leaf_shapes) - set(out))[:3]}. Fix: use the run\'s config.')
  return out


# -- the loader ---------------------------------------------------------------------------


def load(config, source: Source, *, train_state: dict | None = None) -> Loaded:
  """The params at `source`, checked against `config` (model shapes, tokenizer).

  `train_state` is the abstract train state to restore into (a Trainer's
  sharded `abstract_state()`); by default everything goes to the first device.
  Raises CheckpointError, StorageError, RunMismatchError or DataError, each
  with its fix.
  """
  model_config = model_lib.ModelConfig.from_config(config.model)
  tokenizer_path = data_lib.resolve_tokenizer(config.data)
  tokenizer_sha256 = data_lib.file_sha256(tokenizer_path)
  if train_state is None:
    train_state = train_state_abstract(config, abstract_params(model_config))
  if source.workdir is not None:
    params, where = _restore_workdir(config, source, train_state, tokenizer_sha256)
  else:
    store = storage_lib.RunStorage(source.storage)
    run = store.read_run()
    protocol.check_model_matches_run(run, config, tokenizer_sha256)
    round_index, _ = committed_round(store, source.round_index)
    flat = read_global_params(store, run, round_index,
                              trees.flatten_params(train_state['params']))
    params, where = trees.unflatten_params(flat), f'{source.storage} global round {round_index}'
  return Loaded(params, model_config, tokenizer_path, where)

