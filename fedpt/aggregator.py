"""The aggregation loop: quorum or deadline, validation, token-weighted mean, outer step.

Work is split over `num_shards` processes by parameter leaves. Shard 0 decides
who is in a round and writes the create-once manifest; every shard follows the
manifest, so a restarted or replayed round gives the identical global model.
Deltas are read one leaf at a time: memory holds one leaf per silo at most.
"""
import dataclasses
import itertools
import time
import uuid

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedpt import compression
from fedpt import config as config_lib
from fedpt import copies
from fedpt import drift as drift_lib
from fedpt import errors
from fedpt import fragments as fragments_lib
from fedpt import metrics as metrics_lib
from fedpt import outer
from fedpt import protocol
from fedpt import records
from fedpt import secagg
from fedpt import signing
from fedpt import storage as storage_lib
from fedpt import trees


class ShardSpecError(errors.UserError, ValueError):
  """A malformed --shard, or one that does not match the run's num_shards."""


class MalformedPayload(errors.UserError, ValueError):
  """A delta's payload matches its layout but not its format (`compression.payload_problem`)."""


class RecoveryMissingError(errors.UserError, RuntimeError):
  """Secure aggregation: an included silo's recovery record is missing, invalid or wrong."""


def check_unmasked_sum(round_index: int, norm: float, size: int, numerators, clip: float,
                       num_silos: int, fixed_scale: float, authors) -> None:
  """Refuses a round whose unmasked sum (L2 `norm` over `size` values) is above what clipped
  deltas can sum to (`secagg.sum_bound`): a recovery record revealed a wrong key, which would
  otherwise move the model by noise over the whole fixed-point range."""
  bound = secagg.sum_bound(numerators, clip, num_silos, fixed_scale, size)
  if not norm <= bound:
    raise RecoveryMissingError(
        f'round {round_index} failed: the unmasked sum has L2 norm {norm:.4g} > {bound:.4g} '
        f'(sum a_i x secagg_clip + rounding): one of the recovery records of {", ".join(authors)} '
        f'revealed a wrong key; nothing of global round {round_index + 1} was written. Fix: '
        f'delete rounds/{round_index:06d}/recovery/ and restart silos {", ".join(authors)} '
        'so that they publish their records again, then rerun the aggregator; a silo whose '
        'record is wrong again is faulty or malicious.')


def parse_shard(text: str) -> tuple[int, int]:
  """'i/n' -> (i, n)."""
  try:
    index, count = (int(x) for x in text.split('/'))
  except ValueError:
    raise ShardSpecError(
        f'--shard={text!r} is not of the form i/n. Fix: e.g. --shard=0/2') from None
  if not 0 <= index < count:
    raise ShardSpecError(f'--shard={text!r}: need 0 <= i < n. Fix: e.g. --shard=1/2')
  return index, count


def read_delta_leaf(store: storage_lib.RunStorage, round_index: int, silo: str, name: str,
                    meta: dict, form: dict, shape: tuple, with_control: bool = False):
  """One parameter of a delta (its rows of `shape`), checked against the hashes the silo
  signed, decompressed: the aggregator's read, and a silo's for its contribution values.

  The format (`protocol.delta_format`) comes from the caller's `form`: meta.json when
  deciding, the manifest entry when aggregating. A payload its format cannot hold (a
  topk index out of range or sent twice, a non-finite scale) raises MalformedPayload.
  `with_control`: (delta, SCAFFOLD's delta_c_i or None) from the same payload read.
  """
  try:
    payload = store.read_delta_leaf(round_index, silo, name, meta['tree'][name]['payload'])
  except Exception as e:  # pylint: disable=broad-except  # Corrupt chunks fail in many ways.
    raise storage_lib.StorageError(
        f'payload {name} unreadable (missing or corrupt objects): {errors.one_line(e)}'
    ) from None
  for key, value in payload.items():
    reason = protocol.check_payload_hash(name, key, meta, storage_lib.array_hash(value))
    if reason:
      raise storage_lib.StorageError(reason)
  control = payload.pop(protocol.CONTROL, None)
  fmt, block_size, topk = protocol.delta_format(form)
  if fmt == secagg.FORMAT:  # Its layout was checked against the meta: uint32 of `shape`.
    values = np.asarray(payload[secagg.MASKED], np.uint32)
    return (values, control) if with_control else values
  problem = compression.payload_problem(payload, fmt, shape, block_size, topk)
  if problem:
    raise MalformedPayload(f'parameter {name}: {problem}')
  values = compression.decompress(payload, fmt, shape, block_size, topk)
  return (values, control) if with_control else values


class Aggregator:
  """Everything one aggregation shard needs about the run."""

  def __init__(self, storage_root: str, shard: int = 0, num_shards: int | None = None,
               keys_dir: str | None = None, deltas: storage_lib.RunStorage | None = None):
    self.store = storage_lib.RunStorage(storage_root)
    # Where deltas are read: this run's bucket, or (unlearning's replay) the parent run's.
    self.deltas = deltas or self.store
    self.run = self.store.read_run()
    self.identity = signing.party_identity(self.run, keys_dir, signing.AGGREGATOR)
    fed = self.run['federation']
    self.fed = fed
    self.num_shards = fed['num_shards'] if num_shards is None else num_shards
    if self.num_shards != fed['num_shards']:
      raise ShardSpecError(
          f'this run is aggregated in {fed["num_shards"]} shards (run.json), not '
          f'{self.num_shards}. Fix: pass --shard=i/{fed["num_shards"]}.')
    self.shard = shard
    protocol.check_run(self.run)
    self.optimizer = outer.make_outer_optimizer(ml_collections.ConfigDict(self.run['outer']))
    self.scaffold = protocol.scaffold(self.run)
    self.fragments = protocol.fragments(self.run)  # Streaming DiLoCo's P (fedpt/fragments.py).
    self.downlink = protocol.downlink(self.run)  # None, or the format of the published update.
    self.feedback = protocol.downlink_feedback(self.run)  # Its residual E is kept.
    self.secure = protocol.secure_aggregation(self.run)  # Masked deltas: only their sum is read.
    # Free riders and copies: sketch every delta and global update (fedpt/copies.py).
    self.sketching = protocol.copy_checks(self.run) == protocol.COPY_CHECKS_ON
    self._sketches: dict[int, dict] = {}  # Earlier rounds' delta sketches, read once.
    self._update_sketches: dict[int, np.ndarray] = {}  # Earlier global updates' sketches.
    newest = self.store.latest_global_round()  # Round 0 may be garbage-collected.
    if newest is None:
      raise storage_lib.StorageError(
          f'no global round is committed under {self.store.root}. Fix: run '
          'scripts/init_run.py.')
    metas = self.store.global_shard_metas(newest)
    for meta in metas:
      self.check_own(meta, f'global round {newest} shard {meta.get("shard")}')
    self.leaf_shapes, self.leaf_dtypes, _ = protocol.global_leaves(metas)
    protocol.check_private_params(fed.get('private_params', ()), sorted(self.leaf_shapes))
    self.my_leaves = sorted(k for m in metas if m['shard'] == shard for k in m['leaf_hashes'])
    self._collected: set[int] = set()  # Rounds already garbage-collected by this process.
    self.lease: storage_lib.Lease | None = None

  def sign(self, record: dict) -> dict:
    return self.identity.sign(record) if self.identity else record

  def check_own(self, record: dict, what: str) -> None:
    """Refuses an aggregator record (global meta, manifest) that we did not sign."""
    reason = self.identity.check_aggregator(record) if self.identity else None
    if reason:
      raise storage_lib.StorageError(
          f'{what} under {self.store.root}: {reason}. The bucket was tampered with. Fix: '
          'restore the object from your own records or a bucket version, or recreate the run.')

  def check_manifest(self, round_index: int, manifest: dict) -> dict:
    """A manifest read back (ours, or shard 0's): signed by us and well-formed, or refused."""
    what = f'the manifest of round {round_index}'
    self.check_own(manifest, what)
    reason = protocol.check_manifest(self.run, round_index, manifest)
    if reason:
      raise storage_lib.StorageError(
          f'{what} under {self.store.root}: {reason}. The bucket was tampered with. Fix: '
          'delete it while the round\'s global model is not yet written (shard 0 decides the '
          'round again), or recreate the run.')
    return manifest

  # -- state of this shard -----------------------------------------------------

  def _abstract(self):
    params = {n: jax.ShapeDtypeStruct(self.leaf_shapes[n], np.dtype(self.leaf_dtypes[n]))
              for n in self.my_leaves}
    state = jax.eval_shape(lambda: outer.init_outer_state(
        self.optimizer, outer_units(params, self.fragments)))
    return params, state

  def rows_shape(self, round_index: int, name: str) -> tuple:
    """The shape of leaf `name`'s rows that round `round_index`'s deltas hold."""
    return fragments_lib.rows_shape(self.leaf_shapes[name],
                                    protocol.round_fragment(self.run, round_index), self.fragments)

  def _abstract_arrays(self, abstract_state) -> dict:
    """The outer-state arrays of this shard: the optax states, and per leaf c (SCAFFOLD) and
    the downlink's residual E (a compressed downlink)."""
    arrays = state_to_arrays(abstract_state)
    for name, wanted in ((protocol.control_name, self.scaffold),
                         (protocol.downlink_residual_name, self.feedback)):
      if wanted:
        arrays.update({name(n): jax.ShapeDtypeStruct(self.leaf_shapes[n], np.float32)
                       for n in self.my_leaves})
    return arrays

  def read_shard(self, round_index: int):
    """(params, outer state, {leaf: c} or {}, {leaf: E} or {}) of a global round, vetted like
    a silo's read: c is SCAFFOLD's, E the compressed downlink's residual.

    The aggregator trusts none of its own earlier output: the shard meta must be
    this run's and round's and (signed runs) carry its signature, and every
    params and outer-state array must hash to what that meta lists.
    """
    meta = self.store.read_json(
        self.store.shard_dir(round_index, self.shard, self.num_shards) / storage_lib.META)
    check_aggregator = self.identity.check_aggregator if self.identity else None
    previous = (self.store.read_manifest(round_index - 1)
                if check_aggregator is not None and round_index > 0 else None)
    reason = ('its meta.json is missing' if meta is None else protocol.check_global_meta(
        self.run, round_index, meta, check_aggregator, previous))
    abstract_params, abstract_state = self._abstract()
    if reason is None:
      params, state_arrays = self.store.read_global_shard(
          round_index, self.shard, self.num_shards, abstract_params,
          self._abstract_arrays(abstract_state))
      reason = protocol.check_shard_arrays(
          meta, {n: storage_lib.array_hash(v) for n, v in params.items()},
          {n: storage_lib.array_hash(v) for n, v in state_arrays.items()})
    if reason:
      raise storage_lib.tampered(self.store.root, round_index, self.shard, reason)
    controls = ({n: state_arrays[protocol.control_name(n)] for n in self.my_leaves}
                if self.scaffold else {})
    residuals = ({n: state_arrays[protocol.downlink_residual_name(n)] for n in self.my_leaves}
                 if self.feedback else {})
    return params, arrays_to_state(state_arrays, abstract_state), controls, residuals

  def next_round(self) -> int:
    """The round this shard aggregates next: the newest global round it has committed.

    Read from what is committed, never from gaps: garbage collection leaves gaps
    below the kept rounds, and a round is only collected after it was aggregated.
    """
    own = [r for r in self.store.global_round_dirs() if self.store.read_json(
        self.store.shard_dir(r, self.shard, self.num_shards) / storage_lib.META) is not None]
    if not own:
      raise storage_lib.StorageError(
          f'no committed global round of shard {self.shard}/{self.num_shards} under '
          f'{self.store.root}. Fix: run scripts/init_run.py, or pass the run\'s --storage.')
    return max(own)

  # -- the decision (shard 0) ----------------------------------------------------

  def measure(self, round_index: int, silo: str, base_hash: str | None) -> protocol.Measured:
    """Reads one committed delta whole, checking it against its meta.json; takes its norm.

    Every leaf is read and decompressed (one at a time), so a torn, tampered or
    non-finite delta is found before the manifest can include it.
    """
    meta = self.deltas.delta_meta(round_index, silo)
    reason = protocol.check_delta_meta(
        self.run, round_index, silo, meta, base_hash, self.leaf_shapes,
        self.identity.check_silo if self.identity else None)
    if reason:
      return protocol.Measured(meta, reason)
    try:
      stored = self.deltas.delta_tree_metadata(round_index, silo)
    except storage_lib.StorageError as e:
      return protocol.Measured(meta, f'payload unreadable (missing or torn objects): {e}')
    reason = protocol.check_stored_layout(meta, stored)
    if reason:
      return protocol.Measured(meta, reason)
    norm_sq = 0.0
    sketch = np.zeros(copies.SKETCH_SIZE) if self.sketching else None
    for name in sorted(meta['tree']):
      try:
        values, control = self.read_leaf(round_index, silo, name, meta, meta,
                                         with_control=True)
      except (storage_lib.StorageError, MalformedPayload) as e:
        return protocol.Measured(meta, str(e))
      if self.secure:  # Masked uint32: its hashes are all there is to check; no norm.
        continue
      if not bool(jnp.all(jnp.isfinite(values))):
        return protocol.Measured(meta, f'parameter {name} has NaN or Inf values')
      if control is not None and not bool(jnp.all(jnp.isfinite(control))):
        return protocol.Measured(meta, f'control variate update of {name} has NaN or Inf values')
      norm_sq += float(jnp.sum(jnp.square(values)))
      if sketch is not None:
        sketch += copies.leaf_sketch(name, values)
    return protocol.Measured(meta, norm=norm_sq ** 0.5, sketch=sketch)

  def read_leaf(self, round_index: int, silo: str, name: str, meta: dict, form: dict,
                with_control: bool = False):
    """`read_delta_leaf` of this run: the rows the round's fragment holds."""
    return read_delta_leaf(self.deltas, round_index, silo, name, meta, form,
                           self.rows_shape(round_index, name), with_control)

  def decide(self, round_index: int) -> dict:
    """Waits for every silo, or for a quorum after the deadline; writes the manifest."""
    existing = self.store.read_manifest(round_index)
    if existing is not None:
      return self.check_manifest(round_index, existing)
    fed = self.run['federation']
    expected = protocol.silo_ids(self.run)
    started = time.monotonic()
    seen, polls = {}, itertools.count()  # silo -> the poll that first saw its commit.

    def ready():
      have = self.store.committed_silos(round_index)
      poll = next(polls)
      for silo in have:
        seen.setdefault(silo, poll)
      past_deadline = time.monotonic() >= started + fed['round_deadline_s']
      return have if protocol.round_ready(self.run, have, past_deadline) else None

    try:
      committed = storage_lib.wait_for(
          ready, f'round {round_index} deltas: need all of {sorted(expected)}, or '
          f'{fed["min_silos"] or len(expected)} after the {fed["round_deadline_s"]:.0f}s deadline',
          timeout_s=fed['wait_timeout_s'], poll_s=fed['poll_s'],
          notify=lambda waited: self.log_waiting(round_index, waited))
    except storage_lib.WaitTimeout as e:
      have = self.store.committed_silos(round_index)
      raise storage_lib.WaitTimeout(
          f'{e}; have {have}, missing {sorted(set(expected) - set(have))}') from None
    base_hash = self.store.global_hash(protocol.base_round(self.run, round_index))
    measured = {}
    for silo in committed:
      if not protocol.dropped(self.run, round_index, silo):
        try:
          measured[silo] = dataclasses.replace(self.measure(round_index, silo, base_hash),
                                               seen=seen[silo])
        except records.MALFORMED as e:
          measured[silo] = protocol.Measured(None, records.malformed(e))
    earlier = ({}, {})
    if self.sketching:
      earlier = self.earlier_sketches(round_index)
      sketches = {s: m.sketch for s, m in measured.items() if m.sketch is not None}
      self.lease_check()
      self.store.write_json(self.store.sketches_path(round_index), self.sign(
          protocol.sketch_record(self.run, round_index, 'deltas', sketches)))
      self._sketches[round_index] = sketches
    manifest = protocol.decide_round(
        self.run, round_index, base_hash, committed, measured,
        previous_manifest=self.store.read_manifest(round_index - 1) if round_index else None,
        previous_committed=self.store.committed_silos(round_index - 1) if round_index else [],
        decided_after_s=time.monotonic() - started, earlier=earlier)
    manifest = self.sign(manifest)
    self.lease_check()
    self.store.write_manifest(round_index, manifest)
    return manifest

  def read_sketches(self, round_index: int, part: str, path) -> dict | None:
    """A sketch record of ours read back ({key: sketch}), None if absent; tampered: refused."""
    record = self.store.read_json(path)
    if record is None:
      return None
    self.check_own(record, str(path))
    sketches, reason = protocol.read_sketch_record(self.run, round_index, part, record)
    if reason:
      raise storage_lib.StorageError(
          f'{path}: {reason}. The bucket was tampered with. Fix: delete it (the copy checks '
          'then skip that round) or restore it from a bucket version.')
    return sketches

  def earlier_sketches(self, round_index: int) -> tuple[dict, dict]:
    """({(round, silo): sketch} of earlier deltas, {round: sketch} of earlier global updates)
    of the rounds before `round_index` that exchanged the same fragment, as far as stored.

    A global update's sketch is the sum of its shards'; one with a shard's part missing
    (written by a shard that has not yet finished that round) is left out.
    """
    fragment = protocol.round_fragment(self.run, round_index)
    deltas, updates = {}, {}
    for r in range(round_index):
      if protocol.round_fragment(self.run, r) != fragment:
        continue
      if r not in self._sketches:  # Absent in runs from before the checks and in a branch's
        # copied rounds (fedpt/unlearning.py), whose global updates may still have theirs.
        self._sketches[r] = self.read_sketches(r, 'deltas', self.store.sketches_path(r)) or {}
      deltas.update({(r, silo): v for silo, v in self._sketches[r].items()})
      if r not in self._update_sketches:
        parts = [self.read_sketches(r, f'update {i}/{self.num_shards}',
                                    self.store.update_sketch_path(r, i, self.num_shards))
                 for i in range(self.num_shards)]
        if any(p is None for p in parts):
          continue
        self._update_sketches[r] = sum(p['update'] for p in parts)
      updates[r] = self._update_sketches[r]
    return deltas, updates

  def log_waiting(self, round_index: int, waited: float) -> None:
    """Which silos round `round_index` still lacks: when the wait begins and every minute."""
    listed = protocol.silo_ids(self.run)
    missing = protocol.missing_silos(self.run, self.store.committed_silos(round_index))
    metrics_lib.log(f'aggregator: round {round_index} has {len(listed) - len(missing)} of '
                    f'{len(listed)} deltas; waiting for {", ".join(missing) or "the deadline"}'
                    + (f' ({metrics_lib.duration(waited)} so far)' if waited else ''))

  def lease_check(self) -> None:
    if self.lease is not None:
      self.lease.check()

  # -- the outer step -------------------------------------------------------------

  def aggregate(self, round_index: int, manifest: dict, inputs=None) -> dict:
    """Steps this shard's leaves with the manifest's deltas; `inputs` is `read_shard`'s.

    SCAFFOLD: c <- c + (1/N) sum of the contributing silos' delta_c_i
    (`drift.server_control_update`), read from the same payloads as the deltas.
    A compressed downlink then redefines each stepped leaf (`downlink_step`).
    """
    params, outer_state, controls, residuals = inputs or self.read_shard(round_index)
    included = protocol.contributing(manifest['included'])
    # Masked deltas: every included one carries masks, a weight-0 silo's too.
    read_from = manifest['included'] if self.secure else included
    # Loop invariants: each silo's payload layout (its meta.json, read once) and the method.
    metas = {e['silo']: self.deltas.delta_meta(round_index, e['silo']) for e in read_from}
    for e in read_from:  # The delta read now must be the one validated when deciding.
      reason = protocol.check_still_included(round_index, e, metas[e['silo']])
      if reason:
        raise storage_lib.StorageError(reason)
    robust = manifest.get('robust', {'method': 'mean', 'trim': 1})
    factors = ([e['clip_factor'] for e in included]
               if included and 'clip_factor' in included[0] else None)
    new_params, new_state, new_controls = {}, {}, {}
    new_residuals, update = dict(residuals), {}
    num_silos = len(protocol.silo_ids(self.run))
    fragment, count = protocol.round_fragment(self.run, round_index), self.fragments
    new_state = dict(outer_state)  # Every other fragment's state carries over.
    means = {}  # Secure aggregation: every leaf's unmasked mean, checked before any step.
    # The sketch of this shard's part of the update, as a pseudo-gradient (old - new).
    update_sketch = np.zeros(copies.SKETCH_SIZE) if self.sketching and included else None
    if self.secure and included:
      self_keys, revealed = self.revealed_keys(round_index, manifest)
      numerators = [protocol.secagg_numerator(self.run, e['silo'], e['tokens'])
                    for e in manifest['included']]
      square, size = 0.0, 0
      for name in self.my_leaves:
        if (not protocol.is_private(self.run, name)
            and fragments_lib.unit_name(name, fragment, count) in outer_state):
          total = self.unmasked_sum(round_index, name, manifest['included'], metas, self_keys,
                                    revealed)
          square, size = square + float(np.sum(np.square(total))), size + total.size
          means[name] = (total / sum(numerators)).astype(np.float32)
      check_unmasked_sum(round_index, square ** 0.5, size, numerators, self.fed['secagg_clip'],
                         num_silos, protocol.secagg_scale(self.run), sorted(self_keys))
    for name in self.my_leaves:
      unit = fragments_lib.unit_name(name, fragment, count)
      # Nothing valid arrived, a private leaf (no silo uploads it), or a leaf without rows in
      # this round's fragment: carry it over as it is.
      if not included or protocol.is_private(self.run, name) or unit not in outer_state:
        new_params[name] = params[name]
        if self.scaffold:
          new_controls[name] = controls[name]
        continue
      if self.secure:
        mean_delta = means.pop(name)
      else:
        read = (self.read_leaf(round_index, e['silo'], name, metas[e['silo']], e,
                               with_control=True) for e in included)
        if self.scaffold:  # Both from one read of each payload: K leaves held, not one.
          read = list(read)
          new_controls[name] = np.asarray(drift_lib.server_control_update(
              controls[name], (c for _, c in read), num_silos))
        mean_delta = outer.robust_mean((d for d, _ in read), [e['weight'] for e in included],
                                       robust['method'], trim=robust['trim'], factors=factors)
      base = fragments_lib.take(params[name], fragment, count)
      step_params, step_state = outer.outer_step(
          self.optimizer, {unit: base}, {unit: mean_delta}, {unit: outer_state[unit]})
      stepped = np.asarray(step_params[unit])
      new_state[unit] = jax.tree.map(np.asarray, step_state[unit])
      if self.downlink:
        stepped, payload, rows_residual = self.downlink_step(
            base, stepped, fragments_lib.take(residuals[name], fragment, count)
            if self.feedback else None)
        if self.feedback:
          new_residuals[name] = fragments_lib.put(residuals[name], fragment, count,
                                                  rows_residual)
        update.update({f'{name}/{k}': v for k, v in payload.items()})
      if update_sketch is not None:
        update_sketch += copies.leaf_sketch(name, np.asarray(base, np.float32) - stepped)
      new_params[name] = fragments_lib.put(np.asarray(params[name]), fragment, count, stepped)
    if update_sketch is not None:
      self.lease_check()
      part = f'update {self.shard}/{self.num_shards}'
      self.store.write_json(
          self.store.update_sketch_path(round_index, self.shard, self.num_shards),
          self.sign(protocol.sketch_record(self.run, round_index, part,
                                           {'update': update_sketch})))
    state_arrays = state_to_arrays(new_state)
    state_arrays.update({protocol.control_name(n): c for n, c in new_controls.items()})
    state_arrays.update({protocol.downlink_residual_name(n): e for n, e in new_residuals.items()})
    meta = self.sign(global_shard_meta(
        self.run['run_id'], round_index + 1, self.shard, self.num_shards, new_params,
        state_arrays, contributors=[e['silo'] for e in included],
        tokens=sum(e['tokens'] for e in included),
        update=self.downlink and {
            'hashes': {k: storage_lib.array_hash(v) for k, v in update.items()},
            'compression': self.downlink, 'block_size': self.fed['block_size'],
            'bytes': compression.payload_nbytes(update)}))
    self.lease_check()
    self.store.publish_global_shard(round_index + 1, self.shard, self.num_shards, new_params,
                                    state_arrays, meta, update)
    return meta

  def unmasked_sum(self, round_index: int, name: str, entries: list[dict], metas: dict,
                   self_keys: dict, revealed: dict) -> np.ndarray:
    """sum_i a_i clip(delta_i) of leaf `name` of the masked deltas `entries` (manifest entries).

    The modular sum of the y_i, less their self masks (`self_keys`) and the dropped silos'
    masks (`revealed`), is the plain fixed-point sum exactly; / scale is the sum of the
    weighted clipped deltas, and / sum a_i their token x silo weighted mean (the manifest's
    weights, `outer.aggregation_weights`). One leaf of one silo is read at a time.
    """
    shape = self.rows_shape(round_index, name)
    size = int(np.prod(shape))
    total = np.zeros(size, np.uint32)
    for e in entries:
      total += self.read_leaf(round_index, e['silo'], name, metas[e['silo']], e).reshape(-1)
    total -= secagg.unmasking(self_keys, revealed,
                              protocol.round_fragment(self.run, round_index), name, size)
    return secagg.decode(total, protocol.secagg_scale(self.run)).reshape(shape)

  def revealed_keys(self, round_index: int, manifest: dict) -> tuple[dict, dict]:
    """({included silo: b_i,r}, {included silo: {dropped silo: k_iX,r}}) from every included
    silo's recovery record.

    Waits up to `federation.secagg_recovery_timeout_s`; then the round fails with one line
    naming the silos whose record is missing or invalid, before anything of it is written.
    A rerun of the aggregator after they publish finishes the round.
    """
    unmask = manifest['unmask']
    survivors = [e['silo'] for e in manifest['included']]
    check = self.identity.check_silo if self.identity else None
    problems = {}

    def collect():
      problems.clear()
      found = {}
      for silo in survivors:
        found[silo] = record = self.store.read_recovery(round_index, silo)
        reason = ('missing' if record is None else protocol.check_recovery(
            self.run, round_index, silo, record, unmask, check))
        if reason:
          problems[silo] = reason
      if problems:
        return None
      return ({silo: bytes.fromhex(r['self_key']) for silo, r in found.items()},
              {silo: {peer: bytes.fromhex(key) for peer, key in r['pair_keys'].items()}
               for silo, r in found.items()})

    timeout = self.fed['secagg_recovery_timeout_s']
    dropped = f' and pair keys with dropped {", ".join(unmask)}' if unmask else ''
    try:
      return storage_lib.wait_for(
          collect, f'round {round_index}\'s recovery records (self keys{dropped})',
          timeout_s=timeout, poll_s=self.fed['poll_s'])
    except storage_lib.WaitTimeout:
      raise RecoveryMissingError(
          f'round {round_index} failed: {", ".join(f"silo {s} ({r})" for s, r in problems.items())}'
          f' did not publish a valid recovery record (its self-mask key{dropped}) within '
          f'secagg_recovery_timeout_s={timeout:g}s; nothing of global round {round_index + 1} '
          f'was written. Fix: restart {", ".join(problems)} (a silo publishes it while it waits '
          'and when it starts), then rerun the aggregator: it finishes the round.') from None

  def downlink_step(self, base, stepped, residual):
    """(next global leaf, its published update payload, next residual E') of one leaf.

    U = stepped - base in float32; q = compress(U + E); the next global is
    `compression.apply_update(base, q)`, the very function a silo rebuilds it with, and
    E' = U + E - decompress(q) carries what q lost into the next round. A float32 update
    (fragments without downlink compression) loses nothing: `residual` is None then.
    """
    fmt, block_size = self.downlink, self.fed['block_size']
    change = np.asarray(stepped, np.float32) - np.asarray(base, np.float32)
    payload, new_residual = compression.compress_with_feedback(change, residual, fmt, block_size)
    payload = {k: np.asarray(v) for k, v in payload.items()}
    return (np.asarray(compression.apply_update(base, payload, fmt, block_size)), payload,
            None if residual is None else np.asarray(new_residual))

  def collect_garbage(self, newest_round: int) -> None:
    """Keeps the last N global rounds plus every M-th; manifests stay as the ledger.

    `federation.retain_for_unlearning` keeps everything: unlearning a silo re-reads the
    global round before its first delta, and (replay) every later delta.
    """
    if self.fed.get('retain_for_unlearning', False):
      return
    # A lagging shard may still read r-1; an overlapped silo resuming a round reads its base, r-2.
    keep_last = max(self.fed['keep_last_rounds'], 2 if protocol.overlap(self.run) == 'none' else 3)
    every = self.fed['keep_every_rounds']
    for r in range(0, newest_round - keep_last + 1):
      if (every and r % every == 0) or r in self._collected:
        continue
      self.store.delete_round(r)
      self._collected.add(r)


def state_to_arrays(state_by_leaf: dict) -> dict:
  """Per-leaf optax states as flat named arrays, the form Orbax stores."""
  return {f'{name}/s{i}': x for name, state in state_by_leaf.items()
          for i, x in enumerate(jax.tree.leaves(state))}


def arrays_to_state(arrays: dict, abstract_state_by_leaf: dict) -> dict:
  out = {}
  for name, abstract in abstract_state_by_leaf.items():
    leaves, treedef = jax.tree.flatten(abstract)
    out[name] = jax.tree.unflatten(treedef, [arrays[f'{name}/s{i}'] for i in range(len(leaves))])
  return out


def global_shard_meta(run_id, round_index, shard, num_shards, params_flat, state_arrays,
                      contributors, tokens, update=None) -> dict:
  """`protocol.global_shard_meta` of host arrays: their hashes, shapes and dtypes."""
  return protocol.global_shard_meta(
      run_id, round_index, shard, num_shards,
      leaf_hashes={n: storage_lib.array_hash(v) for n, v in params_flat.items()},
      leaf_shapes={n: list(np.shape(v)) for n, v in params_flat.items()},
      leaf_dtypes={n: str(np.asarray(v).dtype) for n, v in params_flat.items()},
      outer_state_hashes={n: storage_lib.array_hash(v) for n, v in state_arrays.items()},
      contributors=contributors, tokens=tokens, update=update)


def run_aggregator(storage_root: str, shard: int = 0, num_shards: int | None = None,
                   stop_after_rounds: int | None = None, keys_dir: str | None = None) -> dict:
  """Aggregates rounds until the run's last one; resumes where this shard left off."""
  agg = Aggregator(storage_root, shard, num_shards, keys_dir)
  if agg.next_round() >= agg.fed['rounds']:
    metrics_lib.log(f'aggregator {shard}/{agg.num_shards}: run {agg.run["run_id"]} is finished '
                    f'(global round {agg.fed["rounds"]} is committed); nothing to do')
    return {'round': agg.fed['rounds'], 'finished': True}
  with storage_lib.Lease(agg.store, f'aggregator_{shard:03d}') as lease:
    agg.lease = lease
    return _aggregate_rounds(agg, shard, stop_after_rounds)


def _aggregate_rounds(agg: Aggregator, shard: int, stop_after_rounds: int | None) -> dict:
  total = agg.fed['rounds']
  r = agg.next_round()
  done = 0
  while r < total:
    inputs = agg.read_shard(r)  # Vetted before anything of round r is decided or written.
    if shard == 0:
      manifest = agg.decide(r)
    else:
      manifest = storage_lib.wait_for(
          lambda: agg.store.read_manifest(r), f'the manifest of round {r} (written by shard 0)',
          timeout_s=agg.fed['wait_timeout_s'], poll_s=agg.fed['poll_s'])
      agg.check_manifest(r, manifest)
    agg.aggregate(r, manifest, inputs)
    metrics_lib.log(
        f'aggregator {shard}/{agg.num_shards}: round {r} -> global {r + 1} from '
        f'{[e["silo"] for e in manifest["included"]]}'
        + (f', rejected {[(e["silo"], e["reason"]) for e in manifest["rejected"]]}'
           if manifest['rejected'] else ''))
    if shard == 0:
      agg.collect_garbage(r + 1)
    r += 1
    done += 1
    if stop_after_rounds is not None and done >= stop_after_rounds:
      break
  if r >= total:
    metrics_lib.log(f'aggregator {shard}/{agg.num_shards}: finished: global round {total}, the '
                    f'last, is committed; the ledger: scripts/status.py --storage={agg.store.root}')
  return {'round': r}


def init_run(config, storage_root: str, run_id: str | None = None,
             keys_dir: str | None = None) -> dict:
  """Writes global round 0 (bit-identical start for every silo), then run.json last.

  With `keys_dir` (the aggregator's key folder, holding every silo's .pub) the
  run is signed: run.json lists the public keys and everything the aggregator
  writes carries its signature. Without it the run is unsigned (local use).

  Needs the model config, the tokenizer file and nothing else: no corpus, no
  AdamW state. The params are born sharded on this host's devices
  (`trainer.ShardedModel`, the silos' own init) and written shard by shard; a
  shard's outer-optimizer state is made only once its params are written and
  freed, and Orbax copies at most ~1 GiB of device arrays to the host at once. So
  host memory peaks near one copy of the params, whatever the outer optimizer.
  """
  from fedpt import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  config = protocol.federated_config(config)
  protocol.validate_federation(config)
  optimizer = outer.make_outer_optimizer(config.outer)
  store = storage_lib.RunStorage(storage_root, save_host_gb=1)
  store.check_no_run()
  secure = config.federation.secure_aggregation
  config_lib.require(
      keys_dir or not secure, 'federation.secure_aggregation',
      'True in an unsigned run: the silos\' X25519 keys in run.json and their recovery records '
      'must be signed', 'use a signed run: pass --keys, the aggregator\'s folder with every '
      'silo_<id>.pub and silo_<id>.x25519.pub')
  secret = signing.load_secret(keys_dir, signing.AGGREGATOR) if keys_dir else None
  public_keys = (signing.run_public_keys(keys_dir, config.federation.silos, secure)
                 if keys_dir else None)
  sign = (lambda record: signing.sign(record, secret)) if secret else (lambda record: record)
  model = trainer_lib.ShardedModel(config)
  abstract = trees.flatten_params(model.abstract_params())
  protocol.check_private_params(config.federation.private_params, sorted(abstract))
  info = protocol.run_record(config, model.tokenizer_sha256, run_id or uuid.uuid4().hex)
  if public_keys:
    info['public_keys'] = public_keys
  store.remove_tree(store.global_dir(0))  # Left by an init that crashed before run.json.
  params = model.init_params()
  sizes = outer.leaf_nbytes(abstract)
  num_shards = config.federation.num_shards
  scaffold = config.inner.drift_correction == 'scaffold'
  for shard in range(num_shards):
    names = outer.shard_leaf_names(sorted(abstract), shard, num_shards, sizes)
    shard_params = {n: params.pop(n) for n in names}
    store.write_global_part(0, shard, num_shards, 'params', shard_params)
    leaf_hashes = _hash_and_free(shard_params)
    state_arrays = initial_outer_arrays(
        optimizer, {n: abstract[n] for n in names}, scaffold,
        protocol.downlink_feedback({'federation': config.federation}),
        config.federation.fragments)
    if state_arrays:
      store.write_global_part(0, shard, num_shards, 'outer_state', state_arrays)
    store.commit_global_shard(0, shard, num_shards, sign(protocol.global_shard_meta(
        info['run_id'], 0, shard, num_shards, leaf_hashes=leaf_hashes,
        leaf_shapes={n: list(abstract[n].shape) for n in names},
        leaf_dtypes={n: str(np.dtype(abstract[n].dtype)) for n in names},
        outer_state_hashes=_hash_and_free(state_arrays), contributors=[], tokens=0)))
  info = sign(info)
  store.create_run(info)
  return info


def _hash_and_free(arrays: dict) -> dict:
  """{name: `storage.array_hash`}, emptying `arrays` as it goes.

  Hashing copies an array to the host and JAX keeps that copy with the array: each
  is dropped once hashed, so at most one leaf's host copy is alive.
  """
  return {name: storage_lib.array_hash(arrays.pop(name)) for name in sorted(arrays)}


def outer_units(params: dict, fragments: int) -> dict:
  """What the outer optimizer steps: {unit: rows of a leaf}, one state per (leaf, fragment)
  (`fragments.units`; the leaves themselves when P = 1). Abstract leaves give abstract rows,
  on the leaf's sharding where the rows divide evenly over it (replicated otherwise)."""
  if fragments == 1:
    return dict(params)
  out = {}
  for unit, (name, _, shape) in fragments_lib.units(
      {n: tuple(p.shape) for n, p in params.items()}, fragments).items():
    p = params[name]
    placed = getattr(p, 'sharding', None)
    if placed is not None:
      mesh_shape = tuple(-(-a // b) for a, b in zip(p.shape, placed.shard_shape(p.shape)))
      if any(s % m for s, m in zip(shape, mesh_shape)):
        placed = jax.sharding.NamedSharding(placed.mesh, jax.sharding.PartitionSpec())
    out[unit] = jax.ShapeDtypeStruct(shape, p.dtype, sharding=placed)
  return out


def initial_outer_arrays(optimizer, abstract_params: dict, scaffold: bool,
                         downlink: bool = False, fragments: int = 1) -> dict:
  """Round 0's outer-state arrays of some leaves (`state_to_arrays` names), born sharded.

  The values of `outer.init_outer_state` on `outer_units` (plus SCAFFOLD's c = 0 and the
  downlink's residual E = 0, per leaf), made by one jit whose params-shaped outputs take
  their params' shardings (`abstract_params` carries them): no host copy of the whole
  state is ever made.
  """
  units = outer_units(abstract_params, fragments)

  def make():
    zeros = {n: jnp.zeros(p.shape, jnp.float32) for n, p in abstract_params.items()}
    arrays = state_to_arrays(outer.init_outer_state(
        optimizer, {u: jnp.zeros(p.shape, jnp.float32) for u, p in units.items()}))
    if scaffold:
      arrays.update({protocol.control_name(n): z for n, z in zeros.items()})
    if downlink:
      arrays.update({protocol.downlink_residual_name(n): z for n, z in zeros.items()})
    return arrays
  replicated = jax.sharding.NamedSharding(
      next(iter(abstract_params.values())).sharding.mesh, jax.sharding.PartitionSpec())

  def placed(unit, x):  # A params-shaped entry is sharded as its parameter (rows).
    p = units[unit]
    return p.sharding if x.shape == p.shape and p.sharding is not None else replicated
  state = jax.eval_shape(lambda: outer.init_outer_state(optimizer, units))
  shardings = state_to_arrays({u: jax.tree.map(lambda x, u=u: placed(u, x), unit_state)
                               for u, unit_state in state.items()})
  for wanted, name in ((scaffold, protocol.control_name),
                       (downlink, protocol.downlink_residual_name)):
    if wanted:
      shardings.update({name(n): p.sharding for n, p in abstract_params.items()})
  return jax.jit(make, out_shardings=shardings)()
