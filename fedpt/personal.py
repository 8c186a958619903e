"""Personalisation: a silo's private fine-tune of a global round on its own data.

The global model is the consortium's shared artefact; a member serves its own
data best with a model fine-tuned on it. After the last round (`silo.run_silo`,
when `personal.steps` > 0) or on demand (`scripts/personalize.py`), a silo
trains global round r (the final one by default) for `personal.steps` AdamW
steps and writes the result to `<silo workdir>/personal/`, a workdir of the
same form as `scripts/train.py`'s (config.json + checkpoints/), so every tool
that takes a --workdir reads it. Nothing is published to the bucket.

Starting point: the global round's params with the silo's own private leaves
(federation.private_params), since that is the model the silo serves.
Optimizer: a fresh AdamW (`inner.make_optimizer` over a view of the config with
`personal.*` in `inner.*`'s place), whatever `inner.optimizer` the rounds used. The silo's inner AdamW moments were
estimated along its own pre-averaging trajectory, at a learning rate that has
decayed by the last round; they describe neither the averaged model nor a
fine-tune, and a past --round has no saved inner state at all.
Data: the silo's own order (`protocol.silo_data_seed`) continued after the
batches its federated inner steps consumed: step s of the phase trains on
`Trainer.batch(data_offset + s)`, data_offset being the silo's inner step
count; so the phase never repeats a federated batch, and resume needs no
iterator state. Checkpoints every `train.checkpoint_every` steps; a run killed
anywhere resumes bit-identically, and a finished phase is not redone unless
asked for another round, other `personal.*` values, or `force`.
"""
import json
import os

from etils import epath
import jax
import jax.numpy as jnp

from fedpt import checkpoint as checkpoint_lib
from fedpt import config as config_lib
from fedpt import errors
from fedpt import faults
from fedpt import loading
from fedpt import metrics as metrics_lib
from fedpt import multihost
from fedpt import storage as storage_lib
from fedpt import trainer as trainer_lib

DIRNAME = 'personal'  # <silo workdir>/personal/: simulate's <workdir>/silos/<id>/personal/.
SUMMARY = 'personal.json'  # The finished phase's record: round, losses, data offset.


def personal_workdir(silo_workdir: str) -> str:
  return os.path.join(silo_workdir, DIRNAME)


def phase_config(config):
  """The config the phase trains with: `personal.*` as `inner.*`, train.steps = personal.steps.

  A view, so that `inner.make_optimizer` / `lr_schedule` build the phase's AdamW
  (its other inner.* fields, betas, clipping, weight decay, are the run's), and
  the config.json it records lets every tool rebuild the checkpoint's layout. No DP
  (privacy.dp): the personal model never leaves the silo (docs/privacy.md).
  """
  p = config.personal
  return config_lib.with_values(config, {
      'inner.lr': p.lr, 'inner.warmup_steps': p.warmup_steps, 'inner.schedule': p.schedule,
      'inner.decay_steps': 0, 'train.steps': p.steps, 'privacy.dp.enabled': False,
      'inner.optimizer': 'adamw'})  # Also after Muon rounds: personal.lr is an AdamW lr.


def phase_trainer(config, data_seed: int) -> trainer_lib.Trainer:
  """The phase's Trainer: `phase_config`'s AdamW, the silo's own data order (`data_seed`)."""
  return trainer_lib.Trainer(phase_config(config), data_seed=data_seed)


def start_state(trainer: trainer_lib.Trainer, params) -> dict:
  """Step 0 of the phase: `params` (host or device arrays) and a fresh AdamW (zeros, count 0).

  The params are copies placed in the trainer's sharding: the train step donates its state.
  """
  placed = jax.device_put(params, trainer.param_shardings)
  return {**trainer.init_state(), 'params': jax.tree.map(jnp.copy, placed)}


def _identity(silo, round_index: int) -> dict:
  """What a personal checkpoint must match to be continued rather than redone."""
  return {'run_id': silo.run['run_id'], 'silo': silo.silo_id, 'round': round_index,
          'personal': config_lib.flat(silo.config.personal)}


def _read_summary(workdir: str) -> dict | None:
  path = epath.Path(workdir) / SUMMARY
  try:
    return json.loads(path.read_text())
  except (FileNotFoundError, ValueError):
    return None


def _wipe(workdir: str) -> None:
  """Removes a personal phase (its summary first: never a summary without its checkpoints)."""
  if not multihost.is_leader():
    return
  root = epath.Path(workdir)
  with errors.refusals(f'removing the personal phase in {workdir}', workdir):
    if (root / SUMMARY).exists():
      (root / SUMMARY).unlink()
    if (root / 'checkpoints').exists():
      (root / 'checkpoints').rmtree()


def run_phase(silo, state=None, round_index: int | None = None, force: bool = False) -> dict:
  """Fine-tunes global round `round_index` (the newest) for silo `silo` (a `silo._Silo`).

  `state` is the silo's train state after its rounds (its private leaves and step
  count); None restores its newest private checkpoint. Returns {'round', 'steps',
  'data_offset', 'global_eval_loss', 'eval_loss', 'workdir', 'preempted', 'skipped'}:
  losses on the silo's own val split, before and after. Raises ConfigError if
  personal.steps is 0, StorageError if the round is not in the bucket.
  """
  steps = silo.config.personal.steps
  config_lib.require(steps > 0, 'personal.steps', 'is 0: the personalisation phase is off',
                     'pass --config.personal.steps=N (e.g. 200)')
  if round_index is None:
    round_index = multihost.agree_int(silo.store.latest_global_round())
  workdir = personal_workdir(silo.workdir)
  identity = _identity(silo, round_index)
  done = _read_summary(workdir)
  if not force and done is not None and {k: done.get(k) for k in identity} == identity:
    silo.log(f'personal model of global round {round_index} is already in {workdir}; nothing '
             'to do (--force redoes it)')
    return {**done, 'workdir': workdir, 'preempted': False, 'skipped': True}

  trainer = phase_trainer(silo.config, silo.trainer.data_seed)
  config = trainer.config
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  latest = (checkpoint_lib.last_good_step(ckpt_dir)
            if epath.Path(ckpt_dir).exists() else None)
  if latest is not None:
    with loading.open_checkpoint(workdir, latest) as (reader, _):
      found = reader.read_meta(latest)
    if force or {k: found.get(k) for k in identity} != identity:
      silo.log(f'redoing the personal phase in {workdir} ('
               + ('--force' if force else f'it was of round {found.get("round")} with '
                  f'{found.get("personal")}') + ')')
      _wipe(workdir)
  elif force or done is not None:
    _wipe(workdir)
  loading.write_config_record(workdir, config_lib.flat(config))
  expected = checkpoint_lib.expected_meta(config, trainer.tokenizer_sha256)
  checkpointer = checkpoint_lib.Checkpointer(ckpt_dir, keep=2,
                                             async_save=config.train.async_checkpoints)
  try:
    restored = checkpointer.restore_newest_intact(lambda _: trainer.abstract_state(), expected)
    if state is None:
      own = silo.private.restore()
      if own is None:
        raise checkpoint_lib.CheckpointError(
            f'silo {silo.silo_id} has no private checkpoint in {silo.workdir}: it has not '
            'trained in this run. Fix: run it first (scripts/train.py --silo ...), or pass its '
            '--workdir')
      state = own[0]
    base = silo.load_global(round_index, state)['params']  # With the silo's private leaves.
    if restored is None:
      step, data_offset = 0, int(state['step'])
      pstate = start_state(trainer, base)
      silo.log(f'personalising global round {round_index}: {steps} steps from batch '
               f'{data_offset} of its own data into {workdir}')
    else:
      step, pstate, meta = restored
      data_offset = meta['data_offset']
      silo.log(f'personal phase resumed at step {step} of {steps} in {workdir}')
    global_eval = silo.trainer.evaluate(base)
    meta = {**expected, **identity, 'data_offset': data_offset}
    preempted = False
    while step < steps:
      pstate, step_metrics = trainer.train_step(pstate, trainer.batch(data_offset + step))
      step += 1
      faults.crash_point('silo_personal', step)
      if metrics_lib.itstime(step, config.train.log_every, steps):
        loss = float(step_metrics['train_loss'])
        trainer_lib._check_finite(step, loss)  # pylint: disable=protected-access
        silo.log(f'personal step {step}/{steps}: train loss {loss:.4f}')
      preempted = silo.preemption.reached(data_offset + step)  # Monotonic after the rounds.
      if metrics_lib.itstime(step, config.train.checkpoint_every, steps) or preempted:
        checkpointer.save(step, pstate, {**meta, 'step': step})
      if preempted:
        silo.log(f'{silo.preemption.cause}: checkpointed personal step {step}; rerun to resume')
        break
    checkpointer.wait()
  finally:
    checkpointer.close()
  summary = {**identity, 'steps': step, 'data_offset': data_offset,
             'global_eval_loss': global_eval, 'workdir': workdir, 'preempted': preempted,
             'skipped': False}
  if not preempted:
    summary['eval_loss'] = trainer.evaluate(pstate['params'])
    if multihost.is_leader():
      record = {k: v for k, v in summary.items() if k not in ('workdir', 'preempted', 'skipped')}
      storage_lib.write_atomically(epath.Path(workdir) / SUMMARY,
                                   json.dumps(record, indent=1, sort_keys=True) + '\n')
    silo.log(f'personal model of round {round_index}: held-out loss {summary["eval_loss"]:.4f} '
             f'(global {global_eval:.4f}) in {workdir}')
  return summary
