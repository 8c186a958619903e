"""One silo's sharded training program: state born sharded, jitted steps, the train loop.

`ShardedModel` is the model alone (mesh, param shardings, jitted init and eval,
tokenizer): round 0 and the evaluation tools need no more. `Trainer` extends it
with everything a step needs (AdamW state, data, the jitted train step);
`train_and_evaluate` is the single-silo loop behind `scripts/train.py`, and the
federation worker drives the same `Trainer` for H steps per round.
"""
import contextlib
import datetime
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from fedpt import checkpoint as checkpoint_lib
from fedpt import config as config_lib
from fedpt import data as data_lib
from fedpt import errors
from fedpt import inner
from fedpt import loading
from fedpt import metrics as metrics_lib
from fedpt import model as model_lib
from fedpt import multihost
from fedpt import privacy
from fedpt import sharding
from fedpt import trees
from fedpt import watermark as watermark_lib

class TrainingDivergedError(errors.UserError, RuntimeError):
  """The loss became NaN or Inf; continuing would only waste compute."""


class ShardedModel:
  """The model alone, sharded over the mesh: no optimizer state, no corpus.

  What round 0 (`aggregator.init_run`) and the held-out evaluations need: the
  mesh, the parameter shardings, the graphdef, the jitted init and eval steps, and
  the tokenizer (its file, never a tokenised corpus). `Trainer` adds the rest.
  """

  def __init__(self, config, devices=None):
    sharding.maybe_initialize_distributed(config.distributed)
    devices = jax.devices() if devices is None else devices
    with multihost.startup(type(self).__name__):  # A host that cannot start stops every host.
      sharding.validate_config(config, num_devices=len(devices))
      self.config = config
      self.mesh = sharding.make_mesh(config.mesh, devices)
      self.rules = tuple(config.sharding.rules)
      self.model_config = model_lib.ModelConfig.from_config(config.model, devices[0].platform)
      self.tokenizer_path = data_lib.resolve_tokenizer(config.data)
      self.tokenizer_sha256 = data_lib.file_sha256(self.tokenizer_path)
      vocab = data_lib.load_tokenizer(self.tokenizer_path).get_piece_size()
      if vocab > config.model.vocab_size:
        raise config_lib.ConfigError(
            'model.vocab_size', f'{config.model.vocab_size} is smaller than the tokenizer '
            f'vocabulary ({vocab})', f'set model.vocab_size >= {vocab}')
      self._open_data(config)

    self.graphdef, self._abstract_params, logical_params = model_lib.abstract_model(
        self.model_config)
    self.param_shardings = sharding.tree_shardings(
        self.mesh, logical_params, self._abstract_params, self.rules)
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self.batch_sharding = NamedSharding(
        self.mesh, sharding.logical_to_spec(('batch', 'length'), self.rules))
    self._compiled = set()  # The jitted functions called once already (`_compiling`).
    self.log_prefix = ''  # Starts this model's own lines (a silo's: 'silo web: ').
    self._eval_step = jax.jit(
        functools.partial(inner.eval_step, graphdef=self.graphdef),
        in_shardings=(self.param_shardings, self.batch_sharding),
        out_shardings=self.replicated)
    self._eval_sums = jax.jit(
        functools.partial(inner.eval_sums, graphdef=self.graphdef),
        in_shardings=(self.param_shardings, self.batch_sharding, self.batch_sharding),
        out_shardings=(self.replicated, self.replicated))
    self._eval_grad = jax.jit(
        jax.value_and_grad(functools.partial(inner.eval_step, graphdef=self.graphdef)),
        in_shardings=(self.param_shardings, self.batch_sharding),
        out_shardings=(self.replicated, self.param_shardings))

  def _open_data(self, config) -> None:
    """Opens what else a start needs, inside the multi-host start-up check (`Trainer`: data)."""

  # -- params -----------------------------------------------------------------

  def _fresh_params(self):
    """The initial params of `config.seed`: the one definition round 0 and training share."""
    model = model_lib.Transformer(self.model_config, nnx.Rngs(self.config.seed))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))

  def init_params(self) -> dict:
    """Fresh flat params `{leaf: array}`, born sharded, one jit per leaf.

    Each jit keeps one leaf of `_fresh_params` (XLA drops the rest), so the random
    bits and temporaries of one leaf are alive at a time, not the whole model's
    (measured at 1B: 2.4x the params in one jit, 1.4x this way). The values are the
    Trainer's, bit for bit (`tests/test_init_run.py`).
    """
    out = {}
    flat = trees.flatten_params(self.abstract_params())
    with self._rules():  # Largest first: a big leaf's temporaries meet few finished leaves.
      for name, leaf in sorted(flat.items(), key=lambda kv: -kv[1].size * kv[1].dtype.itemsize):
        one = lambda name=name: trees.flatten_params(self._fresh_params())[name]  # noqa: E731
        out[name] = jax.jit(one, out_shardings=leaf.sharding)()
    return out

  def abstract_params(self):
    return checkpoint_lib.abstract_like(self._abstract_params, self.param_shardings)

  def state_shardings_for(self, optimizer, drift_correction: str = 'none') -> dict:
    """Shardings of a train state with `optimizer`: its moments follow their params."""
    abstract_opt_state = jax.eval_shape(optimizer.init, self._abstract_params)
    opt_shardings = inner.opt_state_shardings(optimizer, abstract_opt_state,
                                              self.param_shardings, self.replicated)
    shardings = {'step': self.replicated, 'params': self.param_shardings,
                 'opt_state': opt_shardings}
    drift = jax.eval_shape(lambda p: inner.drift_lib.init_drift_state(p, drift_correction),
                           self._abstract_params)
    if drift is not None:  # Each entry is params-shaped: sharded as the params.
      shardings['drift'] = {k: self.param_shardings for k in drift}
    return shardings

  def abstract_train_state(self):
    """What a workdir's checkpoint restores into: params and the config's AdamW state, sharded.

    Shapes only: nothing is allocated until `loading.load` restores into it.
    """
    optimizer = inner.make_optimizer(self.config.inner, self.config.train.steps)
    shapes = jax.eval_shape(lambda p: inner.init_state(p, optimizer), self._abstract_params)
    return checkpoint_lib.abstract_like(shapes, self.state_shardings_for(optimizer))

  def _rules(self):
    return sharding.activation_rules(self.mesh, self.rules)

  def _global_array(self, local_rows: np.ndarray):
    return jax.make_array_from_process_local_data(self.batch_sharding, local_rows)

  @contextlib.contextmanager
  def _compiling(self, what: str, jitted):
    """Says so when `jitted`'s first call compiles (seconds to minutes), and how long it took.

    A jitted call returns once compiled and dispatched, so for a train step that time is
    the compilation's."""
    if jitted in self._compiled:
      yield
      return
    metrics_lib.log(f'{self.log_prefix}compiling the {what} '
                    f'({model_lib.param_count(self.model_config):,} parameters, '
                    f'{len(self.mesh.devices.flat)} {jax.default_backend()} device(s))...')
    start = time.perf_counter()
    yield
    self._compiled.add(jitted)
    metrics_lib.log(f'{self.log_prefix}the first {what} took {time.perf_counter() - start:.1f}s, '
                    'compilation included')

  # -- evaluation ---------------------------------------------------------------

  def score(self, params, dataset, *, whole: bool = False) -> tuple[float, int]:
    """(mean next-token loss in nats, number of target tokens scored) on `dataset`.

    `whole`: every token of the split once (`TokenDataset.whole_batches`: all
    windows and the partial tail, padded rows weighing 0), the token-weighted
    mean; costs a pass over the split. Else the cheap sample: `train.eval_batches`
    fixed batches of windows spread over the split (`eval_batches`), each batch's
    mean averaged. Each process reads only its own rows, either way.
    """
    d = self.config.data
    where = {'process_index': jax.process_index(), 'process_count': jax.process_count()}
    jitted = self._eval_sums if whole else self._eval_step
    with self._rules(), self._compiling('eval step', jitted):
      if not whole:
        losses = [self._eval_step(params, self._global_array(rows)) for rows in
                  dataset.eval_batches(self.config.train.eval_batches,
                                       global_batch=d.global_batch, seq_len=d.seq_len, **where)]
        return (float(jnp.mean(jnp.stack(losses))),
                self.config.train.eval_batches * d.global_batch * d.seq_len)
      sums = []
      for rows, weights in dataset.whole_batches(global_batch=d.global_batch,
                                                 seq_len=d.seq_len, **where):
        sums.append(self._eval_sums(params, self._global_array(rows),
                                    self._global_array(weights)))
        if len(sums) > 1:  # At most two batches in flight: a long split never floods the queue.
          jax.block_until_ready(sums[-2])
    totals = np.asarray(jax.device_get(sums), np.float64).sum(axis=0)  # float64 across batches.
    return float(totals[0] / totals[1]), int(round(totals[1]))

class Trainer(ShardedModel):
  """The sharded model, optimizer, data and jitted steps of one silo."""

  def __init__(self, config, devices=None, data_seed: int | None = None,
               drift_correction: str = 'none'):
    """`drift_correction`: a federated silo's `inner.drift_correction` (a 'drift' state entry)."""
    self.drift_correction = drift_correction
    self.data_seed = config.seed if data_seed is None else data_seed
    super().__init__(config, devices)
    self.total_steps = config.train.steps
    self.optimizer = inner.make_optimizer(config.inner, self.total_steps)
    self.lr_schedule = inner.lr_schedule(config.inner, self.total_steps)
    self.state_shardings = self.state_shardings_for(self.optimizer, drift_correction)
    self._init = jax.jit(self._init_state, out_shardings=self.state_shardings)
    dp = config.privacy.dp
    self.budget = None  # privacy.Budget, once `open_privacy` read the workdir's record.
    self.watermark = None  # data.Watermark planted in the training stream (`open_watermark`).
    self._noise = None  # DP: (the secret key's data, noise std), replicated step inputs.
    self._train_step = jax.jit(
        functools.partial(inner.train_step, graphdef=self.graphdef,
                          optimizer=self.optimizer, inner_config=config.inner,
                          dp_clip_norm=dp.clip_norm if dp.enabled else None),
        in_shardings=(self.state_shardings, self.batch_sharding)
        + (((self.replicated, self.replicated),) if dp.enabled else ()),
        out_shardings=(self.state_shardings, self.replicated),
        donate_argnums=(0,))

  def _open_data(self, config) -> None:
    data_dir, _ = data_lib.resolve_corpus(config.data)
    self.train_data = data_lib.TokenDataset(data_dir, 'train', self.tokenizer_sha256)
    self.val_data = data_lib.TokenDataset(data_dir, 'val', self.tokenizer_sha256)

  # -- state ------------------------------------------------------------------

  def _init_state(self):
    return inner.init_state(self._fresh_params(), self.optimizer, self.drift_correction)

  def init_state(self):
    """Fresh state, created directly in its sharded layout."""
    with self._rules():
      return self._init()

  def abstract_state(self):
    return checkpoint_lib.abstract_like(jax.eval_shape(self._init_state),
                                        self.state_shardings)

  # -- data -------------------------------------------------------------------

  def batch(self, step: int):
    """The global batch of `step`; this host reads only its own rows."""
    d = self.config.data
    rows = self.train_data.batch(
        step, global_batch=d.global_batch, seq_len=d.seq_len, seed=self.data_seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        watermark=self.watermark)
    return self._global_array(rows)

  def open_watermark(self, workdir: str, start_step: int) -> None:
    """data.watermark: the workdir's secret sequences (`watermark.open_watermark`), planted
    in the training stream from here on; the held-out split never holds them."""
    self.watermark = watermark_lib.open_watermark(
        self.config, workdir, vocab_size=self.train_data.vocab_size,
        tokenizer_sha256=self.tokenizer_sha256,
        windows=self.train_data.num_windows(self.config.data.seq_len), start_step=start_step,
        log_prefix=self.log_prefix)

  # -- steps ------------------------------------------------------------------

  def open_privacy(self, workdir: str, start_step: int, *, restored: bool,
                   config_record: dict | None) -> None:
    """privacy.dp: the workdir's noise seed and sigma (`privacy.open_budget`), for the step.

    `restored`: the state is the workdir's checkpoint; `config_record`: its config.json as
    it was before this start (did it train with DP?).
    """
    self.budget = privacy.open_budget(
        self.config, workdir, windows=self.train_data.num_windows(self.config.data.seq_len),
        planned_steps=self.total_steps, start_step=start_step, restored=restored,
        was_private=privacy.private_from_start(config_record),
        log_prefix=self.log_prefix)
    if self.budget is not None:
      self._noise = jax.device_put(
          (np.asarray(self.budget.noise_seed, np.uint32),
           np.float32(self.budget.noise_multiplier * self.budget.clip_norm)), self.replicated)

  def train_step(self, state, batch):
    args = (state, batch)
    if self.config.privacy.dp.enabled:
      if self._noise is None:
        raise RuntimeError('privacy.dp is on: call Trainer.open_privacy before training')
      args += (self._noise,)
    with self._rules(), self._compiling('train step', self._train_step):
      return self._train_step(*args)

  def score_gradient(self, params, dataset=None) -> tuple[float, dict]:
    """(mean held-out loss, its gradient wrt `params`) on `evaluate`'s sampled windows: one
    backward pass per eval batch, for first-order contribution values (fedpt/contribution.py)."""
    d = self.config.data
    where = {'process_index': jax.process_index(), 'process_count': jax.process_count()}
    dataset = dataset or self.val_data
    losses, grads = [], None
    with self._rules(), self._compiling('held-out gradient', self._eval_grad):
      for rows in dataset.eval_batches(self.config.train.eval_batches,
                                       global_batch=d.global_batch, seq_len=d.seq_len, **where):
        loss, grad = self._eval_grad(params, self._global_array(rows))
        losses.append(loss)
        grads = grad if grads is None else jax.tree.map(jnp.add, grads, grad)
    return (float(jnp.mean(jnp.stack(losses))),
            jax.tree.map(lambda g: g / len(losses), grads))

  def evaluate(self, params, dataset=None, *, whole: bool = False) -> float:
    """Mean held-out loss (nats) on `dataset` (default: the silo's val split), as `score`."""
    return self.score(params, dataset or self.val_data, whole=whole)[0]

  def tokens_per_step(self) -> int:
    return self.config.data.global_batch * self.config.data.seq_len

  def flops_per_step(self) -> float:
    return model_lib.flops_per_token(
        self.model_config, self.config.data.seq_len) * self.tokens_per_step()


class StepLogger:
  """Every `train.log_every` steps: one metrics.jsonl row, TensorBoard scalars and a line.

  The one home of per-step metrics, for a plain run and a federated silo alike: train
  loss, lr, grad norm, tokens/s, MFU where the device's peak is known, the ETA, and the
  held-out loss every `train.eval_every` steps. Rates are measured from the first step
  of a start on, so compilation never counts (nor, after `restart`, a silo's wait).
  Rows after `start_step` (from a run stopped later than its checkpoint) are dropped.
  """

  def __init__(self, trainer: Trainer, workdir: str, start_step: int, note=lambda: ''):
    self._trainer = trainer
    self._cfg = trainer.config.train
    self.writer = metrics_lib.MetricWriter(workdir, note=note, resume_step=start_step)
    self.progress = metrics_lib.Progress(
        trainer.total_steps, trainer.tokens_per_step(), trainer.flops_per_step(),
        metrics_lib.peak_flops_per_device(self._cfg.peak_tflops_per_device),
        start_step=start_step)
    self._restart_at_next = True

  def restart(self) -> None:
    """The next step's time is not a step's (a compilation, a wait between rounds)."""
    self._restart_at_next = True

  def after_step(self, step: int, step_metrics, params, *, extra: dict | None = None,
                 force: bool = False, eta_s=None, prefix: str = '') -> dict | None:
    """Logs step `step` (1-based) if it is a log step (or `force`): returns its scalars.

    None if not logged. `extra` joins the row (e.g. the silo's round); `eta_s(step_time)`
    replaces the plain ETA; `prefix` starts the line. A NaN or Inf loss raises
    TrainingDivergedError.
    """
    if self._restart_at_next:
      self.progress.restart(step)
      self._restart_at_next = False
    total = self._trainer.total_steps
    if not (force or metrics_lib.itstime(step, self._cfg.log_every, total)):
      return None
    scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    _check_finite(step, scalars['train_loss'])
    scalars['lr'] = float(self._trainer.lr_schedule(step - 1))
    if self._trainer.budget is not None:
      scalars['epsilon'] = self._trainer.budget.epsilon(step)
    rates = self.progress.update(step)
    if rates and eta_s is not None:
      rates['eta_s'] = eta_s(rates['step_time_s'])
    scalars.update(rates)
    if metrics_lib.itstime(step, self._cfg.eval_every, total):
      scalars['eval_loss'] = self._trainer.evaluate(params)
      self.progress.restart(step)  # The next rate is the steps', not the evaluation's.
    scalars.update(extra or {})
    self.writer.write(step, scalars)
    metrics_lib.log(prefix + metrics_lib.progress_line(step, total, scalars))
    return scalars

  def close(self) -> None:
    self.writer.close()


def restore_or_init(trainer: Trainer, checkpointer: checkpoint_lib.Checkpointer):
  """Resumes from the newest checkpoint in the workdir, else starts fresh."""
  restored = checkpointer.restore_newest_intact(
      lambda _: trainer.abstract_state(),
      checkpoint_lib.expected_meta(trainer.config, trainer.tokenizer_sha256))
  if restored is None:
    return trainer.init_state(), 0
  step, state, _ = restored
  return state, step


def _check_finite(step: int, loss: float):
  if not np.isfinite(loss):
    raise TrainingDivergedError(
        f'train loss is {loss} at step {step}. Fix: lower inner.lr, keep inner.grad_clip > 0 '
        'or add inner.z_loss, then resume from the last good checkpoint.')


def resume_config(config, workdir: str, typed=None, allow_change: bool = False):
  """(config to train with, the workdir's config record or None, {field: (new, recorded)}).

  A workdir records its config at its first start (`loading.CONFIG_RECORD`), and a
  resume keeps it: a field outside `config.RESUMABLE_FIELDS` with another value is
  refused, naming each field with both values, unless `allow_change` (then the new
  value is used and the change recorded). `typed` are the fields set on the command
  line: the others come from the record, so `config` may be None (train.py
  --workdir=X alone); None means all of `config` (an in-process call).
  """
  record = loading.read_config_record(workdir)
  if record is None:
    if config is None:
      raise config_lib.RecordedConfigError(
          f'--config is required: {workdir} has no {loading.CONFIG_RECORD} (a new workdir, or '
          'one trained by an older fedpt). Fix: pass --config=configs/<name>.py')
    return config, None, {}
  path = loading.config_record_path(workdir)
  compared = config_lib.compared_on_resume(record)
  wanted = config_lib.over_record(record, config, set() if config is None else typed)
  changed = config_lib.differences(record, wanted, fields=compared)
  if changed and not allow_change:
    raise config_lib.RecordedConfigError(
        f'{workdir} is a run of another config: {config_lib.describe(changed)} in {path}. '
        'Fix: resume with the recorded values (train.py --workdir alone does), start a new '
        '--workdir, or pass --allow_config_change to change them from the resumed step on')
  if config is not None and typed is not None:
    ignored = config_lib.differences(record, config, fields=[f for f in compared
                                                             if f not in typed])
    if ignored:
      metrics_lib.log(f'note: --config differs from {path} in {", ".join(ignored)}; a resume '
                      'keeps the recorded values (type a field to change it)')
  return wanted, record, changed


def record_config(workdir, config, record, changed, step, note=lambda: '') -> None:
  """Writes config.json when it is new or differs; an allowed change is listed with its step."""
  changes = list((record or {}).get('config_changes', []))
  if changed:
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
    changes.append({'step': step, 'date': now, 'changes': {
        k: {'from': old, 'to': new} for k, (new, old) in changed.items()}})
    metrics_lib.log(f'config changed from step {step} on (--allow_config_change): '
                    f'{config_lib.describe(changed)}; recorded in '
                    f'{loading.config_record_path(workdir)}')
  new_record = {**config_lib.flat(config), **({'config_changes': changes} if changes else {})}
  if new_record != record:
    loading.write_config_record(workdir, new_record, note)


def train_and_evaluate(config, workdir: str, stop_at_step: int | None = None, *, typed=None,
                       allow_config_change: bool = False, data_seed: int | None = None) -> dict:
  """Trains one silo with no federation (also the centralised baseline).

  Resumes from `workdir` automatically, with the config it recorded
  (`resume_config`: `config` may be None, `typed` and `allow_config_change` come
  from the command line). `data_seed` (default `config.seed`) orders the data: an
  isolated baseline passes its silo's (`protocol.silo_data_seed`) to see the batches
  that silo saw, in the same order. `stop_at_step` ends this invocation early (e.g. at the
  end of a job's time slot) with a checkpoint, like a preemption, SIGTERM or
  Ctrl-C. Returns a summary with the final step, losses and whether it was
  preempted. A path the OS refuses (disk full, read-only) is one UserError naming
  it and the last good checkpoint.
  """
  config, record, changed = resume_config(config, workdir, typed, allow_config_change)
  if config.inner.drift_correction != 'none':
    raise config_lib.ConfigError(
        'inner.drift_correction', f'{config.inner.drift_correction!r} corrects federated '
        'silos towards the global model, which a plain run does not have',
        "set it to 'none', or train as a silo of a run (--silo and --storage)")
  trainer = Trainer(config, data_seed=data_seed)  # Starts jax.distributed first (multi-host).
  cfg = config.train
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                             keep=cfg.keep_checkpoints,
                                             async_save=cfg.async_checkpoints)
  note = functools.partial(checkpoint_lib.last_good_note, checkpointer.directory)
  preemption = multihost.Preemption()
  logger, finished = None, False
  try:
    state, start = restore_or_init(trainer, checkpointer)
    trainer.open_privacy(workdir, start, restored=start > 0, config_record=record)
    trainer.open_watermark(workdir, start)
    record_config(workdir, config, record, changed, start, note)  # Not before a DP refusal.
    if trainer.budget is not None:
      end = min(stop_at_step or trainer.total_steps, trainer.total_steps)
      trainer.budget.check_room(start, end, f'train.steps={trainer.total_steps}')
    meta = checkpoint_lib.expected_meta(config, trainer.tokenizer_sha256)
    logger = StepLogger(trainer, workdir, start, note)
    last = stop_at_step if stop_at_step is not None else trainer.total_steps
    summary = {'start_step': start, 'preempted': False}
    metrics_lib.log(
        f'fedpt {config.name}: {model_lib.param_count(trainer.model_config):,} parameters, '
        f'{jax.device_count()} {jax.default_backend()} device(s), mesh '
        f'{dict(trainer.mesh.shape)}, {trainer.train_data.num_tokens:,} training tokens, '
        f'{trainer.total_steps} steps of {trainer.tokens_per_step():,} tokens')
    if start:
      metrics_lib.log(f'resumed from step {start} in {workdir}')
    step = start
    while step < min(last, trainer.total_steps):
      state, step_metrics = trainer.train_step(state, trainer.batch(step))
      step += 1
      scalars = logger.after_step(step, step_metrics, state['params'])
      if scalars is not None:
        summary.update(train_loss=scalars['train_loss'],
                       eval_loss=scalars.get('eval_loss', summary.get('eval_loss')))
      preempted = preemption.reached(step)
      if (metrics_lib.itstime(step, cfg.checkpoint_every, trainer.total_steps) or preempted
          or step == last):
        if trainer.budget is not None:
          trainer.budget.reach(step)  # The high water first: the checkpoint may land.
        checkpointer.save(step, state, {**meta, 'step': step})
      if preempted:
        metrics_lib.log(f'{preemption.cause}: checkpointed step {step}; exiting with status '
                        f'{errors.PREEMPTED_EXIT_CODE}: rerun the same command to resume')
        summary['preempted'] = True
        break
    summary['step'] = step
    summary['state'] = state
    finished = True
  finally:
    try:
      checkpointer.close(quiet=not finished)  # Waits for the last save; a 2nd Ctrl-C aborts it.
    finally:
      preemption.restore()
      if logger is not None:
        logger.close()
  eval_loss = summary.get('eval_loss')
  metrics_lib.log(f'stopped at step {step}; '
                  + ('no evaluation in this start' if eval_loss is None else
                     f'eval loss {eval_loss:.4f}')
                  + f'; checkpoints, metrics.jsonl and TensorBoard events in {workdir}')
  return summary
