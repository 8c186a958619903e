"""The silo worker: rounds of H inner steps, publish a pseudo-gradient, wait, rebase.

A silo keeps its inner AdamW state, data position and error-feedback residual in
its private checkpoint, saved at the start of every round. Every step of a round
is deterministic, so a silo killed anywhere in a round redoes it bit for bit,
and publishing is idempotent.
"""
import hashlib
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from fedpt import checkpoint as checkpoint_lib
from fedpt import compression
from fedpt import config as config_lib
from fedpt import faults
from fedpt import metrics as metrics_lib
from fedpt import multihost
from fedpt import outer
from fedpt import sharding
from fedpt import signing
from fedpt import storage as storage_lib
from fedpt import trainer as trainer_lib

FORMAT_VERSION = 1


class RunMismatchError(ValueError):
  """This silo's config or tokenizer does not match the run it tries to join."""


def federated_config(config):
  """The silo's config with train.steps derived from rounds x H (the LR schedule's horizon)."""
  config = config.copy_and_resolve_references()
  with config.ignore_type():
    config.train.steps = config.federation.rounds * config.federation.inner_steps
  return config


def run_info(config, tokenizer_sha256: str, run_id: str) -> dict:
  """The contents of run.json: everything silos must agree on."""
  fed = config.federation
  weights = list(fed.silo_weights) or [1.0] * len(fed.silos)
  if len(weights) != len(fed.silos):
    raise config_lib.ConfigError(
        'federation.silo_weights', f'{len(weights)} weights for {len(fed.silos)} silos',
        'give one weight per silo, or none')
  return {
      'format_version': FORMAT_VERSION,
      'run_id': run_id,
      'model_spec': config_lib.model_spec(config),
      'tokenizer_sha256': tokenizer_sha256,
      'silos': [{'id': s, 'weight': float(w)} for s, w in zip(fed.silos, weights)],
      'federation': {k: (list(v) if isinstance(v, tuple) else v) for k, v in fed.items()},
      'outer': dict(config.outer.items()),
      'seed': config.seed,
  }


def check_silo_listed(run: dict, silo_id: str) -> None:
  silo_ids = [s['id'] for s in run['silos']]
  if silo_id not in silo_ids:
    raise RunMismatchError(
        f'silo {silo_id!r} is not in this run (run.json lists {silo_ids}). Fix: pass one of '
        'those as --silo, or create a run that includes it.')


def check_joins_run(run: dict, config, silo_id: str, tokenizer_sha256: str) -> None:
  check_silo_listed(run, silo_id)
  spec = config_lib.model_spec(config)
  if spec != run['model_spec']:
    diff = {k: (spec.get(k), run['model_spec'].get(k)) for k in run['model_spec']
            if spec.get(k) != run['model_spec'].get(k)}
    raise RunMismatchError(
        f'this config\'s model differs from the run\'s (field: (yours, run\'s)) {diff}. Fix: '
        'use the config the run was created with.')
  if tokenizer_sha256 != run['tokenizer_sha256']:
    raise RunMismatchError(
        f'tokenizer sha256 {tokenizer_sha256[:12]}... differs from the run\'s '
        f'{run["tokenizer_sha256"][:12]}.... Fix: set --config.data.tokenizer to the run\'s '
        'tokenizer and tokenise your corpus with it.')


def silo_data_seed(seed: int, silo_id: str) -> int:
  """Data order is a pure function of (seed, silo, step): silos never share an order."""
  return int.from_bytes(hashlib.sha256(f'{seed}/{silo_id}'.encode()).digest()[:4], 'little')


def _flat_abstract_params(trainer):
  return outer.flatten_params(trainer.abstract_state()['params'])


def global_checker(run: dict, identity, store, round_index: int):
  """Vets a global shard's meta: this run, this round, and signed by the run's aggregator.

  In a signed run the previous round's manifest must carry the aggregator's
  signature too, so that the recorded decision is the aggregator's own.
  """
  # Without a party's identity (a researcher exporting or sampling), check against the key
  # run.json lists: that catches anyone but the aggregator, if run.json is genuine.
  check_aggregator = (identity.check_aggregator if identity is not None
                      else signing.listed_aggregator_check(run))

  def check(meta: dict) -> str | None:
    if meta.get('run_id') != run['run_id'] or meta.get('round') != round_index:
      return f'meta.json says run {meta.get("run_id")!r} round {meta.get("round")}'
    if check_aggregator is None:
      return None
    reason = check_aggregator(meta)
    if reason is None and round_index > 0:
      manifest = store.read_manifest(round_index - 1)
      reason = ('the manifest of the previous round is missing' if manifest is None
                else check_aggregator(manifest))
      reason = reason and f'manifest of round {round_index - 1}: {reason}'
    return reason
  return check


def load_global_into(trainer, store, round_index: int, state, check_meta=None):
  """Replaces the params of `state` by global round `round_index`; the inner state stays."""
  flat = store.read_global_params(round_index, _flat_abstract_params(trainer),
                                  check_meta=check_meta)
  state = dict(state)
  state['params'] = outer.unflatten_params(flat)
  return state


def _compress_delta(global_flat, local_flat, residual_flat, fed, mesh=None):
  payload, new_residual, nbytes, norm_sq = {}, {}, 0, 0.0
  for name in sorted(global_flat):
    delta = (global_flat[name].astype(jnp.float32) - local_flat[name].astype(jnp.float32))
    norm_sq += float(jnp.sum(jnp.square(delta)))
    if residual_flat is not None:
      leaf_payload, new_residual[name] = compression.compress_with_feedback(
          delta, residual_flat[name], fed.compression, fed.block_size)
    else:
      leaf_payload = compression.compress(delta, fed.compression, fed.block_size)
    if mesh is None:
      payload[name] = {k: np.asarray(jax.device_get(v)) for k, v in leaf_payload.items()}
    else:  # Stays on the devices, split so that every host uploads its own slice.
      payload[name] = {k: multihost.spread(v, mesh) for k, v in leaf_payload.items()}
    nbytes += compression.payload_nbytes(payload[name])
  return payload, (new_residual if residual_flat is not None else None), nbytes, norm_sq ** 0.5


def make_delta(run, round_index, silo_id, base_hash, global_flat, local_flat, residual_flat,
               fed, *, steps, tokens, train_loss, global_eval_loss=None, inner_seconds=0.0,
               mesh=None):
  """The compressed pseudo-gradient and its metadata: everything a silo publishes.

  With `mesh` the payload stays sharded on the silo's devices (a multi-host
  silo writes it from every host); without, it is host numpy.
  """
  payload, new_residual, nbytes, delta_norm = _compress_delta(
      global_flat, local_flat, residual_flat, fed, mesh)
  hashes = _payload_hashes(payload)
  meta = {
      'format_version': FORMAT_VERSION, 'run_id': run['run_id'], 'round': round_index,
      'silo': silo_id, 'base_global_hash': base_hash, 'tokens': tokens, 'steps': steps,
      'train_loss': train_loss, 'global_eval_loss': global_eval_loss,
      'compression': fed.compression, 'block_size': fed.block_size, 'bytes': nbytes,
      'delta_norm': delta_norm, 'inner_seconds': inner_seconds,
      'tree': {name: {'shape': list(global_flat[name].shape),
                      'payload': {k: [list(v.shape), str(v.dtype)] for k, v in leaf.items()}}
               for name, leaf in payload.items()},
      'payload_hashes': hashes, 'content_hash': storage_lib.tree_hash(hashes),
  }
  return payload, new_residual, meta


def _payload_hashes(payload):
  return {f'{name}/{k}': storage_lib.array_hash(v)
          for name, leaf in payload.items() for k, v in leaf.items()}


class _Private:
  """The silo's private checkpoints, each tagged with where in the round protocol it was taken.

  Phases: 'published' (this round's delta is committed; wait for the next global),
  'training' (preempted after `steps_done` inner steps of the round) and 'start'
  (a round's beginning: only written once the last round has been loaded).
  Keys count saves, so every save is newer than the one before.
  """

  def __init__(self, trainer, workdir, expected_meta, use_feedback, async_save):
    self._trainer = trainer
    self._ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=2,
                                             async_save=async_save)
    self._expected = expected_meta
    self._use_feedback = use_feedback

  def restore(self):
    """(state, residual_flat, meta) of the newest save, or None for a fresh silo."""
    key = self._ckpt.latest_step()
    if key is None:
      return None
    abstract = {'train': self._trainer.abstract_state()}
    if self._use_feedback:
      abstract['residual'] = jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding),
          abstract['train']['params'])
    private, meta = self._ckpt.restore(key, abstract, self._expected)
    residual = outer.flatten_params(private['residual']) if self._use_feedback else None
    return private['train'], residual, {'phase': 'start', **meta}

  def save(self, state, residual, **progress):
    tree = {'train': state}
    if self._use_feedback:
      tree['residual'] = outer.unflatten_params(residual)
    key = (self._ckpt.latest_step() or 0) + 1
    self._ckpt.save(key, tree, {**self._expected, **progress})

  def close(self):
    self._ckpt.close()


# A wait that ended with a preemption notice instead of a new global round.
_PREEMPTED = -2


def run_silo(config, silo_id: str, storage_root: str, workdir: str,
             stop_after_rounds: int | None = None, keys_dir: str | None = None) -> dict:
  """Joins the run at `storage_root` as `silo_id` and trains until the last round.

  `keys_dir` is the silo's private key folder (silo_<id>.key and the pinned
  aggregator.pub); a signed run requires it. On SIGTERM (on any host of a
  multi-host silo) every host checkpoints the same step and the summary says
  'preempted'; running it again resumes there.
  """
  sharding.maybe_initialize_distributed(config.distributed)
  config = federated_config(config)
  fed = config.federation
  store = storage_lib.RunStorage(storage_root)
  run = store.read_run()
  check_silo_listed(run, silo_id)
  identity = signing.party_identity(run, keys_dir, signing.silo_key_name(silo_id))
  trainer = trainer_lib.Trainer(config, data_seed=silo_data_seed(config.seed, silo_id))
  check_joins_run(run, config, silo_id, trainer.tokenizer_sha256)

  def load_global(round_index, state):
    return load_global_into(trainer, store, round_index, state,
                            check_meta=global_checker(run, identity, store, round_index))
  total_rounds = run['federation']['rounds']
  use_feedback = fed.error_feedback and fed.compression != 'none'
  private = _Private(trainer, workdir,
                     {**checkpoint_lib.expected_meta(config, trainer.tokenizer_sha256),
                      'run_id': run['run_id'], 'silo': silo_id},
                     use_feedback, config.train.async_checkpoints)
  wait = dict(timeout_s=fed.wait_timeout_s, poll_s=fed.poll_s)
  preemption = multihost.Preemption()
  summary = {'silo': silo_id, 'rounds': [], 'preempted': False}
  try:
    restored = private.restore()
    if restored is not None:
      state, residual, progress = restored
      round_index, phase = progress['round'], progress['phase']
      metrics_lib.log(f'silo {silo_id}: resumed in round {round_index} ({phase}, '
                      f'{progress.get("steps_done", 0)} inner steps done) from {workdir}')
    else:
      round_index = multihost.agree_int(storage_lib.wait_for(
          store.latest_global_round, 'the initial global model', **wait))
      state = load_global(round_index, trainer.init_state())
      residual = ({k: jnp.zeros(v.shape, jnp.float32, device=v.sharding) for k, v in
                   outer.flatten_params(state['params']).items()} if use_feedback else None)
      phase, progress = 'start', {}
    step = int(state['step'])  # The data position; tracked on the host from here on.
    rounds_done, wait_start = 0, time.monotonic()

    while True:
      if phase == 'published':
        # Everything this round needs is saved: a preemption notice may end the wait.
        next_round = multihost.agree_int(storage_lib.wait_for(
            lambda: (lambda r: r if r is not None and r > round_index else None)(
                store.latest_global_round()),
            f'global round {round_index + 1} (the aggregator\'s output for round '
            f'{round_index}) under {storage_root}',
            stop=lambda: preemption.reached(step + 1), **wait) or _PREEMPTED)
        if next_round == _PREEMPTED:
          summary['preempted'] = True
          break
        load_start = time.monotonic()
        state = load_global(next_round, state)
        round_index, phase = next_round, 'start'
        if summary['rounds']:  # Rounds published by this invocation report their wait.
          summary['rounds'][-1]['seconds'].update(wait=load_start - wait_start,
                                                  load=time.monotonic() - load_start)
        rounds_done += 1
        if round_index >= total_rounds:
          private.save(state, residual, round=round_index, phase='start')
        if stop_after_rounds is not None and rounds_done >= stop_after_rounds:
          break
      if round_index >= total_rounds:
        break

      if phase == 'start':
        newest = multihost.agree_int(store.latest_global_round())
        if newest is not None and newest > round_index:
          metrics_lib.log(f'silo {silo_id}: missed rounds {round_index}..{newest - 1}; '
                          f'rebasing onto global round {newest}')
          round_index = newest
          state = load_global(round_index, state)
          continue
        global_flat = {k: jnp.copy(v) for k, v in outer.flatten_params(state['params']).items()}
        eval_start = time.monotonic()
        global_eval = trainer.evaluate(state['params'])
        store.publish_eval(round_index, silo_id, {'round': round_index, 'silo': silo_id,
                                                  'eval_loss': global_eval, 'step': step})
        eval_seconds = time.monotonic() - eval_start
        losses = []
      else:  # Preempted mid-round: the round's base is the global model in the bucket.
        global_flat = outer.flatten_params(load_global(round_index, state)['params'])
        global_eval, eval_seconds = progress['global_eval'], 0.0
        losses = list(progress['losses'])
      base_hash = store.global_hash(round_index)

      start = time.monotonic()
      while len(losses) < fed.inner_steps:
        state, step_metrics = trainer.train_step(state, trainer.batch(step))
        losses.append(step_metrics['train_loss'])
        step += 1
        if len(losses) == fed.inner_steps // 2:
          faults.crash_point('silo_inner', round_index)
        if preemption.reached(step):
          private.save(state, residual, round=round_index, phase='training',
                       steps_done=len(losses), global_eval=global_eval,
                       losses=[float(x) for x in losses])
          summary['preempted'] = True
          break
        if fed.round_budget_s and multihost.agree_flag(
            time.monotonic() - start >= fed.round_budget_s):
          break
      if summary['preempted']:
        metrics_lib.log(f'silo {silo_id}: SIGTERM: checkpointed round {round_index} after '
                        f'{len(losses)} inner steps; exiting for a restart to resume')
        break
      losses = [float(x) for x in losses]
      train_loss = float(np.mean(np.asarray(losses, np.float32)))
      if not np.isfinite(train_loss):
        raise trainer_lib.TrainingDivergedError(
            f'silo {silo_id} round {round_index}: train loss {train_loss}. Fix: lower '
            'inner.lr; the delta was not published.')
      payload, residual_next, meta = make_delta(
          run, round_index, silo_id, base_hash, global_flat,
          outer.flatten_params(state['params']), residual, fed,
          steps=len(losses), tokens=len(losses) * trainer.tokens_per_step(),
          train_loss=train_loss, global_eval_loss=global_eval,
          inner_seconds=time.monotonic() - start, mesh=trainer.mesh)
      if identity is not None:
        meta = identity.sign(meta)
      seconds = {'eval': eval_seconds, 'inner': meta['inner_seconds']}
      store.publish_delta(round_index, silo_id, payload, meta)
      seconds['publish'] = time.monotonic() - start - seconds['inner']
      faults.crash_point('silo_published', round_index)
      metrics_lib.log(f'silo {silo_id}: round {round_index} published ({len(losses)} steps, '
                      f'loss {train_loss:.4f}, {meta["bytes"]:,} bytes)')
      residual = residual_next
      private.save(state, residual, round=round_index, phase='published')
      phase = 'published'
      wait_start = time.monotonic()
      seconds['checkpoint'] = wait_start - start - seconds['inner'] - seconds['publish']
      summary['rounds'].append({**{k: meta[k] for k in ('round', 'tokens', 'train_loss', 'bytes')},
                                'seconds': seconds})

    if round_index >= total_rounds:
      final_eval = trainer.evaluate(state['params'])
      store.publish_eval(round_index, silo_id, {'round': round_index, 'silo': silo_id,
                                                'eval_loss': final_eval, 'step': step})
      summary['final_eval_loss'] = final_eval
    summary['round'] = round_index
    summary['state'] = state
  finally:
    preemption.restore()
    private.close()
  return summary
