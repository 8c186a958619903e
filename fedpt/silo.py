"""The silo worker: rounds of H inner steps, publish a pseudo-gradient, wait, rebase.

A silo keeps its inner AdamW state, data position and error-feedback residual in
its private checkpoint, tagged with where in the round it was taken. Every step
of a round is deterministic, so a silo killed anywhere in a round redoes it bit
for bit, and publishing is idempotent. The records it reads and writes, and the
rules about them, are `protocol.py`'s.
"""
import concurrent.futures
import dataclasses
import enum
import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from fedpt import aggregator as aggregator_lib
from fedpt import checkpoint as checkpoint_lib
from fedpt import compression
from fedpt import contribution as contribution_lib
from fedpt import config as config_lib
from fedpt import drift as drift_lib
from fedpt import errors
from fedpt import faults
from fedpt import fragments as fragments_lib
from fedpt import loading
from fedpt import metrics as metrics_lib
from fedpt import model as model_lib
from fedpt import multihost
from fedpt import outer
from fedpt import personal
from fedpt import protocol
from fedpt import secagg
from fedpt import sharding
from fedpt import signing
from fedpt import storage as storage_lib
from fedpt import trainer as trainer_lib
from fedpt import trees


def _compress_delta(global_flat, local_flat, residual_flat, fed, names, mesh=None,
                    control_flat=None, fragment=0, count=1):
  """The payload of leaves `names` (the shared ones with rows in `fragment`): the rows of
  `fragment` (fedpt/fragments.py), whole leaves when P = 1; other residuals are kept."""
  payload, nbytes, norm_sq = {}, 0, 0.0
  new_residual = dict(residual_flat) if residual_flat is not None else {}
  topk = compression.TopK.of(fed)
  for name in names:
    delta = (fragments_lib.take(global_flat[name], fragment, count).astype(jnp.float32)
             - fragments_lib.take(local_flat[name], fragment, count).astype(jnp.float32))
    norm_sq += float(jnp.sum(jnp.square(delta)))
    if residual_flat is not None:
      leaf_payload, rows_residual = compression.compress_with_feedback(
          delta, fragments_lib.take(residual_flat[name], fragment, count), fed.compression,
          fed.block_size, topk, fed.get('error_feedback_decay', 1.0))
      new_residual[name] = fragments_lib.put(residual_flat[name], fragment, count,
                                             rows_residual)
    else:
      leaf_payload = compression.compress(delta, fed.compression, fed.block_size, topk)
    if control_flat is not None:  # SCAFFOLD's delta_c_i, in fp32 (protocol.CONTROL).
      leaf_payload = {**leaf_payload, protocol.CONTROL: control_flat[name].astype(jnp.float32)}
    if mesh is None:
      payload[name] = {k: np.asarray(jax.device_get(v)) for k, v in leaf_payload.items()}
    else:  # Stays on the devices, split so that every host uploads its own slice.
      payload[name] = {k: multihost.spread(v, mesh) for k, v in leaf_payload.items()}
    nbytes += compression.payload_nbytes(payload[name])
  return payload, (new_residual if residual_flat is not None else None), nbytes, norm_sq ** 0.5


def _diverged(silo_id, round_index, bad):
  return trainer_lib.TrainingDivergedError(
      f'silo {silo_id} round {round_index}: the local model has NaN or Inf in '
      f'{bad or "its delta"}. Fix: lower inner.lr or raise inner.grad_clip and restart from '
      'the last checkpoint; the delta was not published.')


def _masked_delta(run, round_index, silo_id, global_flat, local_flat, names, fragment, tokens,
                  pairs, log):
  """Secure aggregation's payload of leaves `names`: y_i per leaf (`secagg.mask_delta`), on
  the host. Its norm is not disclosed (the meta's delta_norm is 0): `log` shows it here only."""
  count = protocol.fragments(run)
  deltas = {name: np.asarray(jax.device_get(
      fragments_lib.take(global_flat[name], fragment, count).astype(jnp.float32)
      - fragments_lib.take(local_flat[name], fragment, count).astype(jnp.float32)))
            for name in names}
  bad = [n for n in sorted(deltas) if not np.all(np.isfinite(deltas[n]))]
  if bad:  # Stops as the unmasked path does (`_Silo.build_delta`), before anything is masked.
    raise _diverged(silo_id, round_index, bad)
  clip = run['federation']['secagg_clip']
  payload, norm, factor = secagg.mask_delta(
      silo_id, deltas, protocol.secagg_numerator(run, silo_id, tokens), clip,
      protocol.secagg_scale(run), pairs.round_keys(run['run_id'], round_index),
      pairs.self_key(run['run_id'], round_index), fragment)
  if log is not None:
    log(f'round {round_index}: delta norm {norm:.4g} before clipping to secagg_clip={clip:g}, '
        f'clip factor {factor:.3g}' + (' (WARNING: clipped; if most rounds are, the global '
        'model moves less than plain averaging would: see README "Secure aggregation" to '
        'pick secagg_clip)' if factor < 1 else ''))
  return payload, None, sum(compression.payload_nbytes(p) for p in payload.values()), 0.0


def make_delta(run, round_index, silo_id, base_hash, global_flat, local_flat, residual_flat,
               fed, *, steps, tokens, train_loss, global_eval_loss=None, inner_seconds=0.0,
               mesh=None, control_flat=None, dp=None, pairs=None, log=None):
  """The compressed pseudo-gradient, the next error-feedback residual and the delta's meta.json.

  `dp` (privacy.dp): the silo's spent {'epsilon', 'delta'}; its train loss is then not
  published (a non-private statistic of its training data).

  With `mesh` the payload stays sharded on the silo's devices (a multi-host
  silo writes it from every host); without, it is host numpy. Private leaves
  (`protocol.is_private`) are not in it at all. `control_flat` (SCAFFOLD) is the
  silo's delta_c_i per shared leaf, added to each leaf's payload. With secure
  aggregation the payload is masked with this silo's keys `pairs` (`secagg.PairSecrets`), and
  `log` shows its norm and clip factor.
  """
  fragment = protocol.round_fragment(run, round_index)
  names = fragments_lib.fragment_shapes(
      {n: global_flat[n].shape for n in protocol.shared_leaves(run, global_flat)}, fragment,
      protocol.fragments(run))
  if protocol.secure_aggregation(run):
    payload, new_residual, nbytes, delta_norm = _masked_delta(
        run, round_index, silo_id, global_flat, local_flat, names, fragment, tokens, pairs, log)
  else:
    payload, new_residual, nbytes, delta_norm = _compress_delta(
        global_flat, local_flat, residual_flat, fed, names, mesh, control_flat, fragment,
        protocol.fragments(run))
  hashes = {f'{name}/{k}': storage_lib.array_hash(v)
            for name, leaf in payload.items() for k, v in leaf.items()}
  meta = protocol.delta_meta(
      run, round_index, silo_id, base_hash,
      leaf_shapes=names,
      payload_layout={name: {k: [list(v.shape), str(v.dtype)] for k, v in leaf.items()}
                      for name, leaf in payload.items()},
      payload_hashes=hashes, content_hash=trees.tree_hash(hashes),
      compression_format=protocol.upload_format(run), block_size=fed.block_size,
      topk=protocol.topk_record(fed), nbytes=nbytes,
      delta_norm=delta_norm, steps=steps, tokens=tokens, train_loss=train_loss,
      global_eval_loss=global_eval_loss, inner_seconds=inner_seconds,
      inner_steps=fed.inner_steps, round_budget_s=fed.round_budget_s, dp=dp)
  return payload, new_residual, meta


_EAGER_ITEMS = ('eager_base', 'eager_sent', 'eager_sent_next')
REPUBLISH = -1  # `_Silo.wait_for_next`: this silo's committed delta vanished; publish it again.


@jax.jit
def _eager_leaf(global_leaf, base, local, sent_before, coef, own_weight, own_before):
  """One leaf of an eager round base (arXiv 2502.12996; docs/protocol.md, Overlapped rounds).

  OuterOpt(x, s, mean + e) = OuterOpt(x, s, mean) - coef * e for the linear outer
  optimizers, so swapping the silo's stale part of the mean (own_before x its
  dequantised delta sent_before) for its fresh one (own_weight x (base - local))
  moves the committed global round by -coef times the difference.
  """
  fresh = base.astype(jnp.float32) - local.astype(jnp.float32)
  swap = own_weight * fresh - own_before * sent_before
  return (global_leaf.astype(jnp.float32) - coef * swap).astype(global_leaf.dtype)


class Phase(str, enum.Enum):
  """Where in a round a private checkpoint was taken (its meta.json's 'phase')."""
  START = 'start'  # The round's global model is loaded; no inner step taken yet.
  TRAINING = 'training'  # Preempted after some inner steps of the round.
  PUBLISHED = 'published'  # The round's delta is committed; next: wait for the next global.


@dataclasses.dataclass
class Position:
  """The silo's place in the protocol: what a private checkpoint records besides arrays."""
  round: int
  phase: Phase = Phase.START
  losses: list = dataclasses.field(default_factory=list)  # Inner losses of this round so far.
  global_eval: float | None = None  # Held-out loss of this round's global model.

  def record(self) -> dict:
    out = {'round': self.round, 'phase': self.phase.value}
    if self.phase != Phase.START:  # A published delta can be rebuilt: see _Silo.republish.
      out.update(steps_done=len(self.losses), global_eval=self.global_eval,
                 losses=[float(x) for x in self.losses])
    return out

  @classmethod
  def from_record(cls, meta: dict) -> 'Position':
    return cls(meta['round'], Phase(meta.get('phase', 'start')), list(meta.get('losses', [])),
               meta.get('global_eval'))


@dataclasses.dataclass
class _RoundIO:
  """What a round cost besides its inner steps, for its metrics.jsonl row."""
  bytes_down: int = 0  # Global params (and SCAFFOLD's c) read for this round.
  wait_s: float = 0.0  # Waiting for this round's global model after the last publish.
  load_s: float = 0.0
  round_starts: list = dataclasses.field(default_factory=list)  # monotonic s, this start.

  def mean_round_s(self) -> float | None:
    """Wall seconds per round (inner steps, publishing, waiting), measured in this start."""
    starts = self.round_starts
    return (starts[-1] - starts[0]) / (len(starts) - 1) if len(starts) > 1 else None


class _Private:
  """The silo's private checkpoints: train state, residual and its `Position`.

  Keys count saves, so every save is newer than the one before.
  """

  def __init__(self, trainer, workdir, expected_meta, required, async_save):
    self._trainer = trainer
    self._ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                             keep=trainer.config.train.keep_checkpoints,
                                             async_save=async_save)
    self._expected = expected_meta
    self._required = tuple(required)  # `loading.SILO_EXTRAS` every save of this silo holds.

  def latest(self) -> int | None:
    return self._ckpt.latest_step()

  def newest_run_id(self) -> str | None:
    """The run id the newest save was made in; None without one (or unreadable: `restore`
    moves such a save aside)."""
    step = self._ckpt.latest_step()
    try:
      return None if step is None else self._ckpt.read_meta(step).get('run_id')
    except Exception:  # pylint: disable=broad-except  # Damage fails in many ways.
      return None

  def restore(self):
    """(state, {extra: flat dict}, Position) of the newest save, or None for a fresh silo."""
    def abstract_for(key):
      layout = self._ckpt.state_layout(key)
      return loading.silo_checkpoint_abstract(
          self._trainer.abstract_state(),
          [n for n in loading.SILO_EXTRAS if n in self._required or n in layout])
    restored = self._ckpt.restore_newest_intact(abstract_for, self._expected)
    if restored is None:
      return None
    _, private, meta = restored
    extras = {n: trees.flatten_params(private[n]) for n in loading.SILO_EXTRAS if n in private}
    return private['train'], extras, Position.from_record(meta)

  def save(self, state, position: Position, extras: dict):
    """`extras`: {`loading.SILO_EXTRAS` item: flat dict, or None for absent}."""
    tree = {'train': state}
    tree.update({n: trees.unflatten_params(v) for n, v in extras.items() if v is not None})
    key = (self._ckpt.latest_step() or 0) + 1
    self._ckpt.save(key, tree, {**self._expected, **position.record()})

  def note(self) -> str:
    """Where a rerun resumes from: for an error line about a path the OS refused."""
    return checkpoint_lib.last_good_note(self._ckpt.directory)

  def close(self):
    self._ckpt.close()


def _own_config(config, workdir, typed, allow_config_change):
  """The silo's own fields (corpus, tokenizer path, grad_accum, ...) resume as recorded."""
  return trainer_lib.resume_config(
      config if config is not None or loading.read_config_record(workdir) is not None
      else config_lib.base_config(), workdir, typed, allow_config_change)


def resolved_config(config, silo_id: str, storage_root: str, workdir: str, typed=None,
                    allow_config_change: bool = False):
  """The config `run_silo` would train with (run.json's contract over the workdir's record).

  Reads only: --print_config shows it.
  """
  config, _, _ = _own_config(config, workdir, typed, allow_config_change)
  run = storage_lib.RunStorage(storage_root).read_run()
  protocol.check_silo_listed(run, silo_id)
  return protocol.federated_config(
      protocol.join_config(run, config, silo_id, typed or frozenset())[0])


class _Silo:
  """One silo's parts: the run, its trainer, the bucket, its checkpoints; one method a phase."""

  def __init__(self, config, silo_id, storage_root, workdir, keys_dir, typed=None,
               allow_config_change=False):
    self.silo_id = silo_id
    self.workdir = workdir
    config, record, changed = _own_config(config, workdir, typed, allow_config_change)
    self.config_record = record  # As before this start: did the workdir train with DP?
    sharding.maybe_initialize_distributed(config.distributed)
    self.store = storage_lib.RunStorage(storage_root)
    self.run = self.store.read_run()
    protocol.check_silo_listed(self.run, silo_id)
    self.identity = signing.party_identity(self.run, keys_dir, signing.silo_key_name(silo_id))
    self.pairs = self._pair_secrets(keys_dir) if protocol.secure_aggregation(self.run) else None
    self.revealed = set()  # Secure aggregation: rounds whose recovery this silo has settled.
    self.config = config = self._join_config(config, typed or frozenset(), record, changed)
    self.fed = config.federation
    self.drift = config.inner.drift_correction
    self.contribution = config.contribution.mode
    if self.contribution != 'none':
      problem = contribution_lib.unsupported(self.run, self.contribution)
      if problem:
        raise config_lib.ConfigError('contribution.mode', f'{self.contribution!r}: {problem[0]}',
                                     problem[1])
    self.contribution_base = None  # (round, flat base params) of the last round begun.
    # One object for every round: contribution's jitted programs are keyed by it.
    self.outer_optimizer = (contribution_lib.outer_optimizer(config.outer)
                            if self.contribution != 'none' else None)
    self.trainer = trainer_lib.Trainer(
        config, data_seed=protocol.silo_data_seed(config.seed, silo_id),
        drift_correction=self.drift)
    self.trainer.log_prefix = f'silo {silo_id}: '
    protocol.check_tokenizer(self.run, self.trainer.tokenizer_sha256)
    protocol.check_private_params(self.fed.private_params, sorted(trees.flatten_params(
        self.trainer.abstract_state()['params'])))
    self.total_rounds = self.run['federation']['rounds']
    self.use_feedback = self.fed.error_feedback and self.fed.compression != 'none'
    self.overlap = protocol.overlap(self.run)
    self.fragmented = protocol.fragments(self.run) > 1
    self.round_steps = protocol.round_steps(self.run, silo_id)  # H, or H/P with fragments.
    self.private = _Private(
        self.trainer, workdir,
        {**checkpoint_lib.expected_meta(config, self.trainer.tokenizer_sha256),
         'run_id': self.run['run_id'], 'silo': silo_id},
        ('residual',) * self.use_feedback + ('control',) * (self.drift == 'scaffold'),
        config.train.async_checkpoints)
    self.preemption = multihost.Preemption()
    self.logger = None  # trainer.StepLogger, once the resumed step is known.
    self.restored = False  # Whether `join_or_resume` restored a private checkpoint (DP).
    self.round_io = _RoundIO()
    self.summary = {'silo': silo_id, 'rounds': [], 'preempted': False}
    self.residual_base = None  # Error feedback: the residual the last delta was built with.
    self.control = self.control_base = None  # SCAFFOLD: c_i now, and before the last publish.
    # federation.overlap='eager' (flat fp32 dicts or None): this round's base, and the
    # dequantised deltas this silo published in the round before it and in this round.
    self.eager = dict.fromkeys(_EAGER_ITEMS)
    self.eval_params = None  # Eager: the global round a round's base was derived from.
    self.last_global = None  # Compressed downlink: (round, flat copy) of the last global loaded.
    # Overlapped rounds in a one-process silo: bucket I/O off the training thread. Uploads
    # (deltas, eval records) run in order on one thread, the next global round's download
    # on another. A multi-host silo's uploads are collective: they stay on this thread.
    background = self.overlap != 'none' and not multihost.is_multihost()
    self.uploader = (concurrent.futures.ThreadPoolExecutor(1, 'fedpt-upload')
                     if background else None)
    self.downloader = (concurrent.futures.ThreadPoolExecutor(1, 'fedpt-download')
                       if background else None)
    self.pending = []  # (future, then) of uploads not yet settled, in order.
    self.prefetched = None  # (round, stop event, future) of the next global round's download.
    self.base_hashes = {}  # {global round: hash}, read with a prefetched round.

  def save(self, state, residual, position, residual_base=None, control_base=None):
    """A private checkpoint of the silo's state, with its control variates (SCAFFOLD).

    Background uploads finish first: a checkpoint never runs ahead of the bucket. DP: the
    privacy record's high water goes first (before a delta is published, too).
    """
    self.settle()
    if self.trainer.budget is not None:
      self.trainer.budget.reach(int(state['step']))
    self.private.save(state, position, {
        'residual': residual, 'residual_base': residual_base, 'control': self.control,
        'control_base': control_base, **self.eager})

  def _pair_secrets(self, keys_dir):
    """Secure aggregation: this silo's X25519 shared secrets with every other listed silo."""
    if multihost.is_multihost():
      raise config_lib.ConfigError(
          'federation.secure_aggregation', 'True in a multi-host silo: masking runs on one '
          'host\'s copy of the delta', 'run the silo on one host, or create the run without '
          'secure aggregation')
    if self.identity is None:
      raise signing.KeyFileError(
          'this run uses secure aggregation, which needs a signed run and this silo\'s keys. '
          'Fix: pass --keys, the folder with silo_<id>.key and silo_<id>.x25519.key.')
    listed = (self.run.get('public_keys') or {}).get(signing.X25519) or {}
    own = signing.load_x25519_secret(keys_dir, self.silo_id)
    if sorted(listed) != sorted(protocol.silo_ids(self.run)) or ''.join(
        listed[self.silo_id].split()) != ''.join(signing.public_pem(own).split()):
      raise signing.KeyFileError(
          f'run.json does not list the X25519 key of {keys_dir}/'
          f'{signing.x25519_name(self.silo_id)}.key for every silo. Fix: send '
          f'{signing.x25519_name(self.silo_id)}.pub to the run\'s operator before the run is '
          'created, or pass the --keys folder with the right key.')
    return secagg.PairSecrets(self.silo_id, own, listed)

  def reveal_pair_keys(self, round_index: int) -> None:
    """Publishes this silo's recovery records of rounds up to `round_index` that need one.

    Each round whose manifest includes this silo needs its self-mask key b_i,r and its pair
    keys with the dropped silos (`unmask`), and only those; only a manifest the aggregator
    signed for this run and round counts (`protocol.reveal_problem`: a replayed one would
    open another round's masks). Idempotent (a record already there and valid is kept), so
    it runs on every wait poll and at every start.
    """
    if self.pairs is None:
      return
    for r in range(max(0, round_index - 2), round_index + 1):
      if r in self.revealed:
        continue
      manifest = self.store.read_manifest(r)
      if manifest is None:
        continue
      problem = protocol.reveal_problem(self.run, r, self.silo_id, manifest,
                                        self.identity.check_aggregator)
      if problem == protocol.NOT_INCLUDED:
        self.revealed.add(r)
      elif problem is None:
        unmask = manifest['unmask']
        found = self.store.read_recovery(r, self.silo_id)
        if found is None or protocol.check_recovery(
            self.run, r, self.silo_id, found, unmask, self.identity.check_silo):
          run_id = self.run['run_id']
          record = protocol.recovery_record(self.run, r, self.silo_id,
                                            self.pairs.self_key(run_id, r),
                                            self.pairs.round_keys(run_id, r, unmask))
          self.store.publish_recovery(r, self.silo_id, self.identity.sign(record))
          if unmask:
            self.log(f'round {r}: published the pair keys of that round with dropped silo(s) '
                     f'{", ".join(unmask)} so that the aggregator can remove their masks')
        self.revealed.add(r)  # An invalid (e.g. replayed) manifest is read again next poll.

  def upload_delta(self, round_index, payload, meta) -> bool:
    """Commits a delta, except with secure aggregation once its round was decided: this
    silo was dropped, and its y_i would never count (it keeps its self mask either way)."""
    if self.pairs is not None and self.store.read_manifest(round_index) is not None:
      self.log(f'round {round_index} was decided without this silo; its masked delta is not '
               'uploaded (it would not count)')
      return False
    self.store.publish_delta(round_index, self.silo_id, payload, meta)
    return True

  def model_round(self, round_index: int) -> int:
    """The global round a silo in round `round_index` starts from; the last one after the end."""
    if round_index >= self.total_rounds:
      return round_index
    return protocol.base_round(self.run, round_index)

  def _join_config(self, config, typed, record, changed):
    """The run's contract over `config`, recorded in the workdir (for resumes and tools)."""
    config, adopted = protocol.join_config(self.run, config, self.silo_id, typed)
    steps = protocol.federated_config(config).train.steps
    if 'train.steps' in typed and config.train.steps != steps:
      raise config_lib.ConfigError(
          'train.steps', f'{config.train.steps} was typed, but a silo of run '
          f'{self.run["run_id"]} trains federation.rounds x inner_steps = {steps} steps',
          'drop --config.train.steps: the run fixes it')
    if adopted:
      self.log(f'run.json fixes {len(adopted)} field(s) this silo\'s config file sets '
               f'otherwise; using the run\'s: '
               f'{config_lib.describe(adopted, "run.json", "config file")}')
    trainer_lib.record_config(self.workdir, config, record, changed, None)
    return protocol.federated_config(config)

  def publish_eval(self, round_index, eval_loss, step):
    """The held-out loss of a global round on this silo's split: only the number leaves.

    A cheap sample (`Trainer.evaluate`: train.eval_batches x data.global_batch windows)
    as it runs every round; member_gain.py scores the whole split.
    """
    d = self.config.data
    self.log(f'global round {round_index}: held-out loss {eval_loss:.4f} on a sample of '
             f'{self.config.train.eval_batches * d.global_batch} windows '
             f'({self.config.train.eval_batches * d.global_batch * d.seq_len:,} tokens) '
             'of its own split')
    record = protocol.eval_record(self.run, round_index, self.silo_id, eval_loss, step)
    record = self.identity.sign(record) if self.identity else record
    self.in_background(lambda: self.store.publish_eval(round_index, self.silo_id, record))

  def publish_contribution(self, round_index, next_params, next_loss):
    """This silo's row of round `round_index`'s contribution matrix (fedpt/contribution.py),
    once it has evaluated global round `round_index + 1` (`next_params`, `next_loss`).

    Reads the round's manifest, outer state and every included delta (K x the upload);
    only numbers are published. Skipped, with a line, when the round's deltas or base
    are gone from the bucket (garbage-collected) or unreadable: nothing is published then.
    """
    if self.contribution == 'none' or round_index < 0:
      return
    if self.store.read_json(self.store.contribution_path(round_index, self.silo_id)) is not None:
      return  # Published before a restart.
    start = time.monotonic()
    try:
      values = self.contribution_values(round_index, next_params)
    except (storage_lib.StorageError, aggregator_lib.MalformedPayload) as e:
      self.log(f'round {round_index}: no contribution record ({errors.one_line(e)})')
      return
    if values is None:
      return
    d, batches = self.config.data, self.config.train.eval_batches
    record = protocol.contribution_record(
        self.run, round_index, self.silo_id, method=self.contribution,
        eval_windows=batches * d.global_batch, eval_tokens=batches * d.global_batch * d.seq_len,
        next_loss=next_loss, seconds=time.monotonic() - start, **values)
    shown = record['shapley'] or record['loo'] or record['first_order']
    kind = 'shapley' if record['shapley'] else 'loo' if record['loo'] else 'first order'
    self.log(f'round {round_index}: its update lowered this silo\'s held-out loss by '
             f'{record["measured_change"]:+.4g} nats (first order {record["total"]:+.4g}); '
             + (f'{kind} per contributor: ' + ', '.join(f'{k} {v:+.4g}' for k, v in
                                                        sorted(shown.items()))
                if shown else f'per contributor: not computed ({record["reason"]})')
             + f' ({record["seconds"]:.1f}s)')
    record = self.identity.sign(record) if self.identity else record
    self.in_background(
        lambda: self.store.publish_contribution(round_index, self.silo_id, record))

  def contribution_values(self, round_index, next_params) -> dict | None:
    """The numbers of round `round_index`'s contribution record but the next round's loss, or
    None (logged) when the round's base or deltas are no longer stored."""
    store, run = self.store, self.run
    manifest = loading.read_decided_manifest(store, run, round_index, self.identity)
    next_flat = trees.flatten_params(next_params)
    if self.contribution_base is not None and self.contribution_base[0] == round_index:
      base_flat = dict(self.contribution_base[1])
    elif store.global_shard_metas(round_index) is not None:
      base_flat, _ = self.read_global(round_index, None, trees.flatten_params(
          self.trainer.abstract_state()['params']))
    else:
      self.log(f'round {round_index}: no contribution record (global round {round_index} was '
               'garbage-collected)')
      return None
    # Private leaves (protocol.is_private) as the silo holds them now, in both models: the
    # values measure the shared update alone, the same with or without a restart.
    base_flat.update({n: next_flat[n] for n in base_flat if protocol.is_private(run, n)})
    names = protocol.shared_leaves(run, base_flat)
    base_loss, grad = self.trainer.score_gradient(trees.unflatten_params(base_flat))
    grad_flat = trees.flatten_params(grad)
    optimizer = self.outer_optimizer
    outer_state = loading.read_global_outer_state(
        store, run, round_index, optimizer, {n: base_flat[n].shape for n in names},
        self.identity)
    entries = manifest['included']
    method = manifest['robust']['method']
    reason = (('secure aggregation: the deltas are masked, so only the whole update\'s value '
               'is known') if protocol.secure_aggregation(run) else
              (f'robust aggregation {method!r} is not a weighted sum of the deltas')
              if method != 'mean' else None)
    active = [] if reason else protocol.contributing(entries)
    deltas = {}
    for e in active:
      meta = store.delta_meta(round_index, e['silo'])
      if meta is None:
        self.log(f'round {round_index}: no contribution record (silo {e["silo"]}\'s delta is '
                 'gone from the bucket: garbage-collected)')
        return None
      problem = protocol.check_still_included(round_index, e, meta) or (
          None if trees.tree_hash(meta['payload_hashes']) == e['content_hash']
          else 'its payload hashes are not those the manifest included')
      if problem:
        raise storage_lib.StorageError(problem)
      deltas[e['silo']] = {n: aggregator_lib.read_delta_leaf(
          store, round_index, e['silo'], n, meta, e, tuple(base_flat[n].shape)) for n in names}
    coefficients = {e['silo']: protocol.own_contribution(manifest, e['silo']) for e in active}
    shared = {n: base_flat[n] for n in names}
    first = contribution_lib.first_order(optimizer, grad_flat, shared, next_flat, outer_state,
                                         deltas, coefficients)
    zeros = {e['silo']: 0.0 for e in entries}  # Included with weight 0: moved nothing.
    out = {'base_loss': base_loss, 'total': first['total'], 'reason': reason,
           'carry': None if reason else first['carry'],
           'first_order': None if reason else {**zeros, **first['values']}}
    if self.contribution in ('loo', 'shapley') and not reason:
      def loss_of(stepped):
        return self.trainer.evaluate(trees.unflatten_params({**base_flat, **{
            n: jax.device_put(v, base_flat[n].sharding) for n, v in stepped.items()}}))
      game = contribution_lib.subset_game(
          base_loss, loss_of, optimizer, shared, outer_state, deltas, entries,
          {s['id']: s['weight'] for s in run['silos']},
          manifest['robust'].get('clip_multiple') or 0.0)
      players = sorted(deltas)
      out['loo'] = {**zeros, **contribution_lib.leave_one_out(game, players)}
      if self.contribution == 'shapley':
        out['shapley'] = {**zeros, **contribution_lib.shapley_values(game, players)}
    return out

  # -- bucket I/O off the training thread (federation.overlap) ----------------------------

  def in_background(self, work, then=None):
    """Runs `work()` on the upload thread (overlapped rounds) or now; `then(result)` runs on
    this thread once it is done, at the next `settle`."""
    if self.uploader is None:
      result = work()
      if then is not None:
        then(result)
      return
    self.pending.append((self.uploader.submit(work), then))

  def uploading(self) -> bool:
    """Whether an upload is still in flight; finished ones are settled (errors raised here)."""
    if any(not future.done() for future, _ in self.pending):
      return True
    self.settle()
    return False

  def settle(self):
    """Waits for every background upload, in order; an upload's error is raised here."""
    while self.pending:
      future, then = self.pending[0]
      result = future.result()
      self.pending.pop(0)
      if then is not None:
        then(result)

  def start_prefetch(self, round_index):
    """Downloads global round `round_index` in the background once it is committed, for the
    `load_global` that will want it (overlapped rounds only)."""
    if self.downloader is None or round_index > self.total_rounds:
      return
    self.drop_prefetch()
    stop, base = threading.Event(), self.last_global
    abstract = trees.flatten_params(self.trainer.abstract_state()['params'])

    def fetch():
      while not stop.is_set():
        newest = self.store.latest_global_round()
        if newest is not None and newest >= round_index:
          read = self.read_global(round_index, base, abstract)
          self.base_hashes[round_index] = self.store.global_hash(round_index)
          return read
        stop.wait(self.fed.poll_s)
      return None
    self.prefetched = round_index, stop, self.downloader.submit(fetch)

  def drop_prefetch(self):
    if self.prefetched is not None:
      self.prefetched[1].set()
      self.prefetched = None

  def prefetched_round(self) -> int | None:
    """The global round the download thread holds, once its download is done."""
    if self.prefetched is None or not self.prefetched[2].done():
      return None
    try:
      return self.prefetched[0] if self.prefetched[2].result() is not None else None
    except Exception:  # pylint: disable=broad-except  # `take_prefetched` reads it again.
      return None

  def take_prefetched(self, round_index):
    """(flat, bytes read) of global round `round_index` if it was prefetched, else None."""
    if self.prefetched is None or self.prefetched[0] != round_index:
      self.drop_prefetch()
      return None
    future = self.prefetched[2]
    self.prefetched = None
    try:
      return future.result()
    except Exception:  # pylint: disable=broad-except  # The caller's own read says what failed.
      return None

  def log(self, line):
    metrics_lib.log(f'silo {self.silo_id}: {line}')

  def load_global(self, round_index, state, merge=False):
    """`state` with its params replaced by verified global round `round_index`.

    `merge` (the next round of a run with fragments, P > 1): only the rows of the fragment
    this global round changed (that of round `round_index - 1`) are replaced; the silo keeps
    training the others (Streaming DiLoCo's merge, alpha = 0; nothing at global round 0).

    Private leaves (federation.private_params) stay the silo's own, and so does
    their inner AdamW state (as every leaf's does across rounds). With a compressed
    downlink, a silo holding round `round_index - 1` reads only the round's update and
    rebuilds the round from it (`loading.global_from_update`); others read it whole.
    Overlapped rounds take the copy `start_prefetch` downloaded during the inner steps.
    """
    rebuilt = self.take_prefetched(round_index) or self.read_global(
        round_index, self.last_global,
        trees.flatten_params(self.trainer.abstract_state()['params']))
    flat, nbytes = rebuilt
    self.round_io.bytes_down += nbytes
    if protocol.downlink(self.run):  # A copy: the train step donates the state's buffers.
      self.last_global = round_index, {k: jnp.copy(v) for k, v in flat.items()}
    own = trees.flatten_params(state['params'])
    flat.update({n: own[n] for n in flat if protocol.is_private(self.run, n)})
    count = protocol.fragments(self.run)
    if merge and count > 1:  # Global round 0 changed nothing: the silo keeps all its rows.
      fragment = protocol.round_fragment(self.run, round_index - 1)
      changed = (fragments_lib.fragment_shapes(
          {n: own[n].shape for n in protocol.shared_leaves(self.run, own)}, fragment, count)
          if round_index else {})
      flat = {n: fragments_lib.put(own[n], fragment, count,
                                   fragments_lib.take(flat[n], fragment, count))
              if n in changed else own[n] for n in own}
    return {**state, 'params': trees.unflatten_params(flat)}

  def global_params(self, round_index):
    """Flat params of verified global round `round_index`, unmerged: the base of a round's
    delta with fragments. The copy `load_global` kept, or read whole (a resume)."""
    if self.last_global is not None and self.last_global[0] == round_index:
      return self.last_global[1]
    flat, _ = self.read_global(round_index, None,
                               trees.flatten_params(self.trainer.abstract_state()['params']))
    self.last_global = round_index, flat
    return flat

  def read_global(self, round_index, last_global, abstract_flat):
    """(flat params, bytes read) of verified global round `round_index`: only its update
    when `last_global` (round, flat) is the round before and the run has a downlink."""
    if last_global is not None and last_global[0] == round_index:  # Overlap: round 1's base.
      return {k: jnp.copy(v) for k, v in last_global[1].items()}, 0
    if (protocol.downlink(self.run) and last_global is not None
        and last_global[0] == round_index - 1):  # The same on every host of a silo.
      rebuilt = loading.global_from_update(self.store, self.run, round_index, last_global[1],
                                           self.identity)
      if rebuilt is not None:
        return rebuilt
    flat = loading.read_global_params(self.store, self.run, round_index, abstract_flat,
                                      self.identity)
    return flat, sum(int(v.nbytes) for v in flat.values())

  # -- the phases ---------------------------------------------------------------------

  def announce(self):
    """The start-up line: what this silo is about to do, and how big it is."""
    t, fed = self.trainer, self.fed
    self.log(f'joining run {self.run["run_id"]} ({len(self.run["silos"])} silos, '
             f'{self.total_rounds} rounds of '
             + (f'{self.round_steps} inner steps (H={fed.inner_steps}, {fed.fragments} '
                'fragments)' if self.fragmented else f'H={fed.inner_steps} inner steps')
             + ' of '
             f'{t.tokens_per_step():,} tokens): {model_lib.param_count(t.model_config):,} '
             f'parameters on {jax.device_count()} {jax.default_backend()} device(s), mesh '
             f'{dict(t.mesh.shape)}, {t.train_data.num_tokens:,} training tokens in its corpus; '
             f'metrics in {self.workdir}')

  def join_or_resume(self):
    """(state, residual, Position): the newest private checkpoint, or the newest global."""
    parent = self.run.get('parent')  # A run branched by unlearning (fedpt/unlearning.py).
    if parent and self.private.newest_run_id() == parent.get('run_id'):
      raise checkpoint_lib.CheckpointError(
          f'{self.workdir} holds silo {self.silo_id}\'s state in run {parent["run_id"]}, which '
          f'silo {parent["silo"]} influenced; run {self.run["run_id"]} is that run without '
          f'{parent["silo"]}, branched at global round {parent["round"]}. Fix: start this silo '
          'with a fresh --workdir: it joins at the newest global round.')
    restored = self.private.restore()
    self.restored = restored is not None
    if restored is not None:
      state, extras, position = restored
      residual, self.residual_base, self.control, self.control_base = (
          extras.get(n) for n in ('residual', 'residual_base', 'control', 'control_base'))
      self.eager = {n: extras.get(n) for n in _EAGER_ITEMS}
      self.log(f'resumed in round {position.round} ({position.phase.value}, '
               f'{len(position.losses)} inner steps done) from {self.workdir}')
      return state, residual, position
    round_index = multihost.agree_int(storage_lib.wait_for(
        self.store.latest_global_round, 'the initial global model',
        timeout_s=self.fed.wait_timeout_s, poll_s=self.fed.poll_s,
        notify=lambda waited: self.log(
            f'waiting for the run\'s initial global model under {self.store.root}'
            + (f' ({metrics_lib.duration(waited)} so far)' if waited else ''))))
    state = self.load_global(self.model_round(round_index), self.trainer.init_state())
    residual = ({k: jnp.zeros(v.shape, jnp.float32, device=v.sharding) for k, v in
                 trees.flatten_params(state['params']).items()} if self.use_feedback else None)
    if self.drift == 'scaffold':  # c_i = 0 at a silo's start (Algorithm 1).
      self.control = {k: jnp.zeros(v.shape, jnp.float32, device=v.sharding) for k, v in
                      trees.flatten_params(state['params']).items()}
    return state, residual, Position(round_index)

  def wait_for_next(self, position, step, needed):
    """The newest global round once global round `needed` is committed; None on a
    preemption notice.

    `REPUBLISH` if this silo's committed delta vanished before the round was
    decided: it must be republished, or the round never ends.
    """
    def newer():
      self.reveal_pair_keys(position.round)
      if self.prefetched_round() == needed:  # Committed: the download thread has it.
        return needed
      r = self.store.latest_global_round()
      if r is not None and r >= needed:
        return r
      if self.uploading():  # The delta is not in the bucket yet: it is on its way.
        return None
      if (self.store.delta_meta(position.round, self.silo_id) is None  # Usually present:
          and self.store.read_manifest(position.round) is None):  # one read per poll.
        return REPUBLISH
      return None
    return multihost.agree_int(storage_lib.wait_for(
        newer, f'global round {needed} (the aggregator\'s output for round '
        f'{needed - 1}) under {self.store.root}', timeout_s=self.fed.wait_timeout_s,
        poll_s=self.fed.poll_s, stop=lambda: self.preemption.reached(step + 1),
        notify=lambda waited: self.log(self.waiting_line(needed - 1, waited))))

  def waiting_line(self, round_index, waited) -> str:
    """Who global round `round_index + 1` still waits for: named silos, or the aggregator."""
    listed = protocol.silo_ids(self.run)
    missing = protocol.missing_silos(self.run, self.store.committed_silos(round_index))
    if self.store.read_manifest(round_index) is not None:
      why = f'round {round_index} is decided; the aggregator is writing it'
    elif missing:
      why = (f'round {round_index} has {len(listed) - len(missing)}/{len(listed)} deltas; '
             f'missing: {", ".join(missing)}')
    else:
      why = (f'round {round_index} has {len(listed)}/{len(listed)} deltas; the aggregator has '
             'not decided yet')
    return (f'waiting for global round {round_index + 1} ({why})'
            + (f', {metrics_lib.duration(waited)} so far' if waited else ''))

  def own_delta(self, round_index):
    """(meta at this silo's path in the round, why it is not this silo's own delta or None)."""
    meta = self.store.delta_meta(round_index, self.silo_id)
    if meta is None:
      return None, 'missing'
    return meta, protocol.check_delta_identity(
        self.run, round_index, self.silo_id, meta,
        self.identity.check_silo if self.identity else None)

  def behind(self, position):
    """The newest global round if a fresh round would start behind it (missed rounds).

    A round whose delta this silo already committed is never skipped: the private
    state predates the commit (stopped between the two), so the round is redone
    from its base, which restores the state and rebuilds the same delta.
    """
    if position.phase != Phase.START:
      return None
    newest = multihost.agree_int(self.store.latest_global_round())
    if newest is None or newest <= position.round:
      return None
    if multihost.agree_flag(self.own_delta(position.round)[1] is None):
      self.log_redo(position.round)
      return None
    return newest

  def log_redo(self, round_index):
    self.log(f'round {round_index}: its delta is already committed but the private state '
             'predates it (stopped between the commit and the checkpoint); redoing round '
             f'{round_index} from its base to restore that state')

  def round_to_load(self, following, newest):
    """After round `following - 1`: the round to train next, `following` unless it was decided
    without this silo (the newest global round exists), then the newest.

    Not even then if its delta of `following` is committed but the private state
    predates it, and the round's base is still in the bucket: it is redone. Any
    other jump is logged.
    """
    target = max(following, newest)
    if target > following:
      if multihost.agree_flag(self.own_delta(following)[1] is None and self.store.
                              global_shard_metas(self.model_round(following)) is not None):
        self.log_redo(following)
        return following
      self.log(f'global round {newest} is the newest: rounds {following}..{target - 1} went on '
               'without this silo; rebasing onto it')
    return target

  def next_state(self, position, next_round, state):
    """The state round `next_round` starts from, once round `position.round` is published.

    Eager (federation.overlap='eager', a round that follows the one published):
    the global round it derives from, with this silo's fresh pseudo-gradient
    swapped in for its stale one (`eager_step`). Otherwise that global round.
    """
    follows = next_round == position.round + 1
    # With fragments the silo merges the changed fragment; after the last round it takes the
    # final global model whole: the run's output.
    loaded = self.load_global(self.model_round(next_round), state,
                              merge=follows and next_round < self.total_rounds)
    sent = self.eager['eager_sent_next']
    self.eval_params = None
    if (self.overlap == 'eager' and follows and next_round < self.total_rounds
        and sent is not None):
      self.eval_params = loaded['params']
      loaded = self.eager_step(position.round, state, loaded)
    self.eager = {'eager_base': None, 'eager_sent': sent if follows else None,
                  'eager_sent_next': None}
    return loaded

  def eager_step(self, published, state, loaded):
    """`loaded` (global round `published`) moved by this silo's eager update.

    arXiv 2502.12996's eager outer gradient for worker m is
    (1/M) Delta_m^(t) + (1/M) sum_{m' != m} Delta_m'^(t-1): the global round, which
    applied every silo's round-(published-1) delta, gets this silo's part of it
    replaced by its round-`published` delta, weighted by `protocol.eager_weight`.
    """
    sent_before = self.eager['eager_sent']
    own_before = 0.0
    if sent_before is not None and published >= 1:
      own_before = protocol.own_contribution(loading.read_decided_manifest(
          self.store, self.run, published - 1, self.identity), self.silo_id)
    coef = outer.eager_coefficient(self.config.outer, max(published - 1, 0))
    weight = protocol.eager_weight(self.run, self.silo_id)
    glob = trees.flatten_params(loaded['params'])
    local = trees.flatten_params(state['params'])
    base = self.eager['eager_base']
    out = dict(glob)
    for name in protocol.shared_leaves(self.run, glob):
      like = glob[name].sharding  # The train step's jit wants every leaf as it was.
      before = (sent_before[name] if sent_before is not None
                else jnp.zeros(glob[name].shape, jnp.float32, device=like))
      out[name] = jax.device_put(_eager_leaf(glob[name], base[name], local[name], before, coef,
                                             weight, own_before), like)
    return {**loaded, 'params': trees.unflatten_params(out)}

  def begin_round(self, position, state, step):
    """The round's base params (flat, a copy), its hash, and the seconds spent evaluating it.

    A fresh round first measures the base's held-out loss and publishes it (a number).
    """
    base_round = self.model_round(position.round)
    base_hash = self.base_hashes.pop(base_round, None) or self.store.global_hash(base_round)
    if position.phase == Phase.TRAINING:  # Resumed mid-round.
      return self.stored_base(position, state), base_hash, 0.0
    if self.fragmented:  # The silo's params hold its own rows of the other fragments.
      base = self.global_params(base_round)
    else:
      base = {k: jnp.copy(v) for k, v in trees.flatten_params(state['params']).items()}
    if self.overlap == 'eager':
      self.eager['eager_base'] = base
    start = time.monotonic()
    if self.fragmented:  # Its params hold its own rows of the other fragments.
      self.eval_params = trees.unflatten_params(base)
    position.global_eval = self.trainer.evaluate(
        state['params'] if self.eval_params is None else self.eval_params)
    self.eval_params = None
    self.publish_eval(base_round, position.global_eval, step)
    eval_seconds = time.monotonic() - start
    self.publish_contribution(position.round - 1, state['params'], position.global_eval)
    if self.contribution != 'none':
      self.contribution_base = position.round, base
    return base, base_hash, eval_seconds

  def stored_base(self, position, state):
    """The flat base of round `position.round` after its start: in the bucket, or (eager)
    in the private checkpoint."""
    if self.overlap == 'eager':
      return self.eager['eager_base']
    if self.fragmented:
      return self.global_params(self.model_round(position.round))
    return trees.flatten_params(
        self.load_global(self.model_round(position.round), state)['params'])

  def start_drift(self, position, state):
    """`state` with the round's drift state: c - c_i (SCAFFOLD) or the anchor w^t (FedProx).

    Only at a round's start: a round resumed mid-way keeps its checkpointed one.
    """
    if self.drift == 'scaffold':
      server = loading.read_global_controls(
          self.store, self.run, position.round,
          trees.flatten_params(self.trainer.abstract_state()['params']), self.identity)
      self.round_io.bytes_down += sum(int(v.nbytes) for v in server.values())
      drift = drift_lib.scaffold_state(server, self.control)
      return {**state, 'drift': {k: trees.unflatten_params(v) for k, v in drift.items()}}
    if self.drift == 'fedprox':
      return {**state, 'drift': drift_lib.fedprox_state(state['params'])}
    return state

  def control_delta(self, position, state, control):
    """SCAFFOLD's flat delta_c_i of the round from the c_i it started with; else None.

    A private leaf (federation.private_params) is never averaged, so it has no drift to
    correct: its delta_c_i is zero, its c_i stays c's zero, and its correction c - c_i is 0.
    """
    if self.drift != 'scaffold':
      return None
    grad_sum = trees.flatten_params(state['drift']['grad_sum'])
    delta = drift_lib.control_delta(grad_sum, len(position.losses), control)
    return {n: jnp.zeros_like(d) if protocol.is_private(self.run, n) else d
            for n, d in delta.items()}

  def eta_s(self, position, step_time) -> float:
    """Seconds to the run's end: this round's steps left, then whole rounds as measured."""
    h = self.round_steps
    per_round = self.round_io.mean_round_s() or h * step_time
    return ((h - len(position.losses)) * step_time
            + max(self.total_rounds - position.round - 1, 0) * per_round)

  def inner_steps(self, position, state, residual, step):
    """Trains until H steps, the round's time budget, or a preemption (checkpointed)."""
    start = time.monotonic()
    self.logger.restart()  # Tokens/s count inner steps only, not the wait before them.
    h = self.round_steps
    while len(position.losses) < h:
      state, step_metrics = self.trainer.train_step(state, self.trainer.batch(step))
      position.losses.append(step_metrics['train_loss'])
      step += 1
      self.logger.after_step(
          step, step_metrics, state['params'], extra={'round': position.round},
          force=len(position.losses) == h, eta_s=lambda t: self.eta_s(position, t),
          prefix=f'silo {self.silo_id}: round {position.round}/{self.total_rounds} ')
      if len(position.losses) == h // 2:
        faults.crash_point('silo_inner', position.round)
      if (len(position.losses) < h and not self.preemption.reached(step)
          and metrics_lib.itstime(step, self.config.train.checkpoint_every)):
        position.phase = Phase.TRAINING  # Resumable mid-round, as after a preemption.
        self.save(state, residual, position)
      if self.preemption.reached(step):
        position.phase = Phase.TRAINING
        self.save(state, residual, position)
        self.summary['preempted'] = True
        self.log(f'{self.preemption.cause}: checkpointed round {position.round} after '
                 f'{len(position.losses)} inner steps; exiting for a restart to resume')
        break
      if self.fed.round_budget_s and multihost.agree_flag(
          time.monotonic() - start >= self.fed.round_budget_s):
        if len(position.losses) < h:
          self.log(f'round {position.round}: its {self.fed.round_budget_s:g}s budget ended '
                   f'after {len(position.losses)} of its {h} inner steps')
        break
    position.losses = [float(x) for x in position.losses]  # Waits for the last step.
    return state, step

  def build_delta(self, position, state, residual, base_flat, base_hash, inner_seconds,
                  control_flat=None):
    """(payload, next residual, signed meta) of the round; refuses a non-finite model.

    `control_flat`: SCAFFOLD's delta_c_i (`control_delta`), sent with the delta.
    """
    losses = position.losses
    train_loss = float(np.mean(np.asarray(losses, np.float32)))
    if not np.isfinite(train_loss):
      raise trainer_lib.TrainingDivergedError(
          f'silo {self.silo_id} round {position.round}: train loss {train_loss}. Fix: lower '
          'inner.lr; the delta was not published.')
    payload, residual, meta = make_delta(
        self.run, position.round, self.silo_id, base_hash, base_flat,
        trees.flatten_params(state['params']), residual, self.fed, steps=len(losses),
        tokens=len(losses) * self.trainer.tokens_per_step(),
        train_loss=None if self.trainer.budget else train_loss,
        global_eval_loss=position.global_eval, inner_seconds=inner_seconds,
        mesh=self.trainer.mesh, control_flat=control_flat,
        dp=self.trainer.budget.spent(int(state['step'])) if self.trainer.budget else None,
        pairs=self.pairs, log=self.log)
    if not np.isfinite(meta['delta_norm']):
      local = trees.flatten_params(state['params'])
      bad = [n for n in sorted(local) if not bool(jnp.all(jnp.isfinite(local[n])))]
      raise _diverged(self.silo_id, position.round, bad)
    return payload, residual, (self.identity.sign(meta) if self.identity else meta)

  def clear_own_path(self, position, meta) -> bool:
    """Looks at what is already at this silo's path; False if the round must be skipped.

    The same delta (a resume after the commit) is kept. A foreign or replayed
    object is replaced while the round is undecided; once the round was decided
    without this silo, the silo skips it. This silo's own, validly signed delta
    with other content means two processes share the silo id.
    """
    found, why_not = self.own_delta(position.round)
    if found is None or found.get('content_hash') == meta['content_hash']:
      if found is not None:
        self.log(f'round {position.round}: the committed delta is the one rebuilt here')
      return True
    path = self.store.delta_dir(position.round, self.silo_id)
    if multihost.agree_flag(why_not is None):
      raise storage_lib.StorageError(
          f'{path} holds another delta of this silo, validly signed, with different content. '
          'Two processes use this silo id. Fix: run one process per --silo.')
    if multihost.agree_flag(self.store.read_manifest(position.round) is not None):
      self.log(f'round {position.round}: {path} holds an object that is not this silo\'s delta '
               f'({why_not}) and the round was decided without it; skipping round '
               f'{position.round}, rebasing onto global round {position.round + 1}')
      return False
    self.log(f'round {position.round}: replacing {path}, which holds an object that is not '
             f'this silo\'s delta ({why_not})')
    self.store.remove_delta(position.round, self.silo_id)
    return True

  def publish(self, position, state, residual, base_flat, base_hash, seconds, step):
    """Builds the round's delta, checkpoints, then commits it; returns the next residual.

    The 'published' checkpoint comes before the commit: a silo stopped in between
    commits the same delta on resuming (`ensure_published`). With overlapped rounds
    the upload runs in the background while the next round trains; every later
    checkpoint waits for it (`save`). `seconds` holds the round's 'eval' and 'inner'
    seconds; 'publish' (building), 'checkpoint' and 'upload' are added, and it becomes
    the round's record in the summary, as the round's metrics.jsonl row (at `step`,
    the data position) is written.
    """
    start = time.monotonic()
    control_delta = self.control_delta(position, state, self.control)
    payload, next_residual, meta = self.build_delta(position, state, residual, base_flat,
                                                    base_hash, seconds['inner'], control_delta)
    position.phase = Phase.PUBLISHED
    if not self.clear_own_path(position, meta):
      self.save(state, residual, position)  # The residual and c_i were not spent.
      return residual
    seconds['publish'] = time.monotonic() - start
    io = self.round_io
    self.logger.writer.write(step, {
        'round': position.round, 'global_eval_loss': position.global_eval,
        'round_train_loss': float(np.mean(position.losses)), 'bytes_up': meta['bytes'],
        **({'epsilon': meta['dp']['epsilon']} if meta.get('dp') else {}),
        'bytes_down': io.bytes_down, 'wait_s': io.wait_s, 'load_s': io.load_s,
        'eval_s': seconds['eval'], 'inner_s': seconds['inner'], 'publish_s': seconds['publish']})
    record = {**{k: meta[k] for k in ('round', 'tokens', 'train_loss', 'bytes')},
              'bytes_down': io.bytes_down, 'seconds': seconds}
    io.bytes_down, io.wait_s, io.load_s = 0, 0.0, 0.0
    self.residual_base = residual
    if self.overlap == 'eager':  # What the aggregator will average: swapped out next round.
      self.eager['eager_sent_next'] = self.dequantised(payload, base_flat)
    if control_delta is not None:  # c_i <- c_i + delta_c_i, as the server adds it to c.
      self.control_base = self.control
      self.control = drift_lib.apply_control_delta(self.control, control_delta)
    self.save(state, next_residual, position, residual_base=residual,
              control_base=self.control_base if control_delta is not None else None)
    seconds['checkpoint'] = time.monotonic() - start - seconds['publish']
    self.summary['rounds'].append(record)

    def upload():
      upload_start = time.monotonic()
      uploaded = self.upload_delta(position.round, payload, meta)
      return time.monotonic() - upload_start if uploaded else None

    def committed(upload_s):
      if upload_s is None:  # Not uploaded: the round was decided without it.
        return
      seconds['upload'] = upload_s
      faults.crash_point('silo_published', meta['round'])
      self.log(f'round {meta["round"]} published ({meta["steps"]} steps, '
               + (f'epsilon {meta["dp"]["epsilon"]:.4g}' if meta.get('dp') else
                  f'loss {meta["train_loss"]:.4f}') + f', {meta["bytes"]:,} bytes)')
    self.in_background(upload, committed)
    return next_residual

  def dequantised(self, payload, like_flat):
    """The delta the aggregator reads from `payload`, fp32 per leaf (zero for private leaves)."""
    fed = self.fed
    return {n: jax.device_put(compression.decompress(
        {k: v for k, v in payload[n].items() if k != protocol.CONTROL}, fed.compression,
        v_like.shape, fed.block_size, compression.TopK.of(fed)), v_like.sharding)
            if n in payload
            else jnp.zeros(v_like.shape, jnp.float32, device=v_like.sharding)
            for n, v_like in like_flat.items()}

  def republish(self, position, state, why):
    """Commits the round's delta from the private state: it is not in the bucket (`why`)
    and the round is undecided.

    It is rebuilt from the round's base in the bucket (eager: in the private
    checkpoint), the post-round params and (error feedback) the residual it was
    compressed with: the same content hash.
    """
    self.log(f'round {position.round}: {why}; publishing its delta again from the round\'s '
             'base and the private state')
    payload, _, meta = self.build_delta(
        position, state, self.residual_base, self.stored_base(position, state),
        self.store.global_hash(self.model_round(position.round)),
        0.0, self.control_delta(position, state, self.control_base))
    if self.clear_own_path(position, meta):
      self.upload_delta(position.round, payload, meta)

  def ensure_published(self, position, state):
    """On resuming from a 'published' checkpoint: the delta is committed, or the round
    decided; a stop between the checkpoint and the commit is made good here."""
    if multihost.agree_flag(self.own_delta(position.round)[1] is not None
                            and self.store.read_manifest(position.round) is None):
      self.republish(position, state, 'the silo stopped before its delta was committed')

  def finish(self, position, state, step):
    """After the last round: the final global model's held-out loss, published."""
    final_eval = self.trainer.evaluate(state['params'])
    self.publish_eval(position.round, final_eval, step)
    self.publish_contribution(position.round - 1, state['params'], final_eval)
    self.summary['final_eval_loss'] = final_eval
    if self.logger is not None:  # The final global model's row: no delta, no traffic.
      self.logger.writer.write(step, {'round': position.round, 'global_eval_loss': final_eval})
    self.log(f'finished: {self.total_rounds} rounds done, the final global model (round '
             f'{position.round}) has held-out loss {final_eval:.4f} on its own split; '
             f'checkpoints and metrics in {self.workdir}')

  # -- the loop -----------------------------------------------------------------------

  def already_finished(self) -> bool:
    """The run's last global round is committed and this silo has nothing left to add to it."""
    newest = multihost.agree_int(self.store.latest_global_round())
    if newest is None or newest < self.total_rounds:
      return False
    return multihost.agree_flag(self.private.latest() is None
                                or self.store.eval_records(newest).get(self.silo_id) is not None)

  def run_rounds(self, stop_after_rounds):
    if self.already_finished():  # Nothing is written: not even an evaluation.
      self.log(f'run {self.run["run_id"]} is finished (global round {self.total_rounds} is '
               'committed); nothing to do')
      self.summary.update(round=self.total_rounds, finished=True)
      return self.summary
    self.announce()
    state, residual, position = self.join_or_resume()
    self.reveal_pair_keys(position.round)  # Owed from before a stop (kill -9 safe).
    if position.phase == Phase.PUBLISHED and position.round < self.total_rounds:
      self.ensure_published(position, state)
    step = int(state['step'])  # The data position; tracked on the host from here on.
    self.trainer.open_privacy(self.workdir, step, restored=self.restored,
                              config_record=self.config_record)
    self.trainer.open_watermark(self.workdir, step)
    self.logger = trainer_lib.StepLogger(self.trainer, self.workdir, step, self.private.note)
    rounds_done = 0
    while True:
      loaded = False  # A global round loaded in this pass is at least the newest one then.
      if position.phase == Phase.PUBLISHED:  # Everything is saved: a SIGTERM may end the wait.
        wait_start = time.monotonic()
        following = position.round + 1
        next_round = self.wait_for_next(position, step, self.model_round(following))
        if next_round is None:
          self.summary['preempted'] = True
          self.log(f'{self.preemption.cause} while waiting for global round {position.round + 1}: '
                   f'round {position.round}\'s delta is published and checkpointed; exiting with '
                   f'status {errors.PREEMPTED_EXIT_CODE}: rerun the same command to resume')
          break
        if next_round == REPUBLISH:
          self.republish(position, state, 'its committed delta is gone from the bucket and the '
                                         'round is undecided')
          continue
        next_round = self.round_to_load(following, next_round)
        load_start = time.monotonic()
        state, position = self.next_state(position, next_round, state), Position(next_round)
        self.round_io.wait_s = load_start - wait_start
        self.round_io.load_s = time.monotonic() - load_start
        if self.summary['rounds']:  # Rounds published by this invocation report their wait.
          self.summary['rounds'][-1]['seconds'].update(
              wait=self.round_io.wait_s, load=self.round_io.load_s)
        rounds_done += 1
        loaded = True
        if position.round >= self.total_rounds:
          self.save(state, residual, position)
        if stop_after_rounds is not None and rounds_done >= stop_after_rounds:
          break
      if position.round >= self.total_rounds:
        break
      newest = None if loaded else self.behind(position)
      if newest is not None:
        self.log(f'missed rounds {position.round}..{newest - 1}; rebasing onto global round '
                 f'{self.model_round(newest)}')
        state, position = self.load_global(self.model_round(newest), state), Position(newest)
        self.eager = dict.fromkeys(_EAGER_ITEMS)
        continue
      self.round_io.round_starts.append(time.monotonic())
      starts = self.round_io.round_starts
      if len(starts) > 1 and self.summary['rounds']:  # Wall time from that round's start.
        self.summary['rounds'][-1]['seconds'].setdefault('wall', starts[-1] - starts[-2])
      self.reveal_pair_keys(position.round - 1)  # Overlapped rounds may not wait in between.
      if self.trainer.budget is not None:  # Stops before a round past its target epsilon.
        self.trainer.budget.check_room(
            step, step + self.round_steps - len(position.losses), f'round {position.round}')
      if position.phase == Phase.START:
        state = self.start_drift(position, state)
      base_flat, base_hash, eval_seconds = self.begin_round(position, state, step)
      self.start_prefetch(self.model_round(position.round + 1))
      inner_start = time.monotonic()
      state, step = self.inner_steps(position, state, residual, step)
      if self.summary['preempted']:
        break
      residual = self.publish(position, state, residual, base_flat, base_hash, {
          'eval': eval_seconds, 'inner': time.monotonic() - inner_start}, step)
    self.settle()
    if position.round >= self.total_rounds:
      self.finish(position, state, step)
      self.settle()
    self.summary.update(round=position.round, state=state)
    return self.summary

  def close(self):
    self.drop_prefetch()
    for pool in (self.uploader, self.downloader):
      if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)
    self.preemption.restore()
    self.private.close()
    if self.logger is not None:
      self.logger.close()


def run_silo(config, silo_id: str, storage_root: str, workdir: str,
             stop_after_rounds: int | None = None, keys_dir: str | None = None,
             typed=None, allow_config_change: bool = False) -> dict:
  """Joins the run at `storage_root` as `silo_id` and trains until the last round.

  `keys_dir` is the silo's private key folder (silo_<id>.key and the pinned
  aggregator.pub); a signed run requires it. The run's contract (run.json)
  replaces what `config` sets otherwise, unless the field is in `typed` (set on
  the command line, `cli.config_overrides`): then the silo is refused. The
  silo's own fields resume from its workdir's config.json as a plain run's do
  (`trainer.resume_config`; `config` may then be None; `typed` None means all of
  `config`, an in-process call). On SIGTERM
  or Ctrl-C (on any host of a multi-host silo) every host checkpoints the same step and the summary says
  'preempted'; running it again resumes there. Returns {'silo', 'rounds' (one
  record per round published: round, tokens, train_loss, bytes, seconds),
  'preempted', 'round', 'state', and 'final_eval_loss' after the last round}; with
  personal.steps > 0, the last round is followed by the silo's personalisation
  phase (`personal.run_phase`), whose summary is under 'personal'.
  """
  silo = _Silo(config, silo_id, storage_root, workdir, keys_dir, typed, allow_config_change)
  try:
    summary = silo.run_rounds(stop_after_rounds)
    if (silo.config.personal.steps and not summary['preempted']
        and summary['round'] >= silo.total_rounds):
      summary['personal'] = personal.run_phase(silo, summary.get('state'))
      summary['preempted'] = summary['personal']['preempted']
    return summary
  finally:
    silo.close()


def personalize(config, silo_id: str, storage_root: str, workdir: str,
                round_index: int | None = None, force: bool = False,
                keys_dir: str | None = None, typed=None) -> dict:
  """Silo `silo_id`'s personal model of global round `round_index` (the newest), on demand.

  The phase `run_silo` runs after the last round when personal.steps > 0
  (`personal.run_phase`); written to <workdir>/personal/, nothing published.
  `config` may be None: the silo's workdir recorded its config.
  """
  silo = _Silo(config, silo_id, storage_root, workdir, keys_dir, typed)
  try:
    return personal.run_phase(silo, None, round_index, force)
  finally:
    silo.close()
