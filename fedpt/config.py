"""The config schema shared by every configs/*.py, and its validation.

Every config starts from `base_config()`, so a field that is not in the schema
is a typo and is reported with the closest valid name.
"""
import difflib
import fnmatch
import math
import numbers

import ml_collections

from fedpt import errors

DTYPES = ('float32', 'bfloat16', 'float16')
REMAT_POLICIES = ('none', 'full', 'dots', 'dots_no_batch')
SCHEDULES = ('cosine', 'constant', 'linear')
ATTENTION_IMPLS = ('auto', 'xla', 'cudnn')
# inner.drift_correction: SCAFFOLD (Karimireddy et al. 2019) or FedProx (Li et al. 2018);
# fedpt/drift.py has the math, docs/protocol.md what SCAFFOLD adds to the bucket.
DRIFT_CORRECTIONS = ('none', 'scaffold', 'fedprox')
# inner.optimizer: 'muon' trains the hidden matrices with optax's Muon (Jordan et al. 2024;
# MuLoCo, arXiv 2505.23725, as DiLoCo's inner optimizer) and the rest with AdamW (inner.py).
INNER_OPTIMIZERS = ('adamw', 'muon')
# privacy.dp.accountant: dp_accounting's privacy-loss-distribution or Renyi accountant
# (fedpt/privacy.py; docs/privacy.md says what they assume).
DP_ACCOUNTANTS = ('pld', 'rdp')
# privacy.dp.noise_multiplier's least value (privacy.MIN_NOISE_MULTIPLIER): the PLD of a
# smaller sigma takes seconds and gigabytes, and its epsilon is too large to mean much.
DP_MIN_NOISE_MULTIPLIER = 0.3
# federation.overlap: a silo's next inner phase overlaps the outer step of the round it just
# published (Kale, Douillard, Donchev, arXiv 2502.12996); docs/protocol.md gives the rules.
OVERLAP_MODES = ('none', 'delayed', 'eager')
# contribution.mode: a silo's per-round values of the included deltas (fedpt/contribution.py).
CONTRIBUTION_MODES = ('none', 'first_order', 'loo', 'shapley')

DEFAULT_RULES = (
    # Activations.
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
    # Parameters: 'embed' is FSDP-sharded (ZeRO-3); heads/mlp/vocab are tensor-parallel.
    ('embed', 'fsdp'),
    ('vocab', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('mlp', 'tensor'),
    ('norm', None),
    ('layers', None),
)


class RecordedConfigError(errors.UserError, ValueError):
  """A config that disagrees with the one a workdir recorded, or none where one is needed."""


class ConfigError(errors.UserError, ValueError):
  """A bad config value; the message names the field and the fix."""

  def __init__(self, field: str, problem: str, fix: str):
    self.field, self.problem = field, problem
    super().__init__(f'config field {field!r}: {problem}. Fix: {fix}.')


def base_config() -> ml_collections.ConfigDict:
  """Every field fedpt reads, with defaults sized for a CPU."""
  c = ml_collections.ConfigDict()
  c.name = 'base'
  c.seed = 0

  c.model = ml_collections.ConfigDict(dict(
      vocab_size=4096,
      d_model=256,
      n_layers=4,
      n_heads=4,
      n_kv_heads=2,
      head_dim=64,
      d_ff=768,
      tie_embeddings=True,
      rope_theta=10_000.0,
      norm_eps=1e-5,
      init_std=0.02,
      param_dtype='float32',
      compute_dtype='auto',  # bfloat16 on GPU/TPU, float32 on CPU.
      remat='none',
      attention='auto',
      scan_layers=True,  # False: a Python loop over layers (compile time grows with depth).
  ))
  c.data = ml_collections.ConfigDict(dict(
      corpus='stdlib',  # The built-in corpus, or a directory from prepare_data.py.
      stdlib_group='all',
      tokenizer='default',  # The shipped SentencePiece model, or a .model path.
      seq_len=256,
      global_batch=16,
      # Secret random token sequences a silo plants in its own training stream, to test
      # later whether a model trained on its data (fedpt/watermark.py, docs/data.md "Data
      # watermarks"): each silo's own choice, never in run.json.
      watermark=ml_collections.ConfigDict(dict(
          enabled=False,
          count=8,  # Distinct sequences.
          length=0,  # Tokens of each; 0: a whole window (data.seq_len + 1).
          repeats=100,  # Times each sequence is planted per epoch of the training split.
      )),
  ))
  c.inner = ml_collections.ConfigDict(dict(
      lr=1e-3,
      schedule='cosine',
      warmup_steps=50,
      decay_steps=0,  # 0: decay over train.steps.
      min_lr_ratio=0.1,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      grad_clip=1.0,
      grad_accum=1,
      z_loss=0.0,
      drift_correction='none',  # none, scaffold or fedprox: federated silos only.
      prox_mu=0.0,  # FedProx's mu (> 0 with drift_correction='fedprox'), e.g. 0.01.
      optimizer='adamw',  # adamw, or muon: Muon for hidden matrices, AdamW (above) for the rest.
      # Muon's own fields (inner.optimizer='muon'), at the defaults of Keller Jordan's Muon
      # and optax.contrib.muon, which MuLoCo starts from: peak lr 0.02 (the same schedule as
      # inner.lr; optax scales each matrix's step by sqrt(max(1, fan_out / fan_in))),
      # Nesterov momentum 0.95, 5 Newton-Schulz steps, no weight decay (decoupled, times the
      # lr: 0.02 * wd per step, so AdamW's 0.1 would be 20x its 1e-3 * 0.1 here).
      muon_lr=0.02,
      muon_weight_decay=0.0,
      muon_beta=0.95,
      muon_ns_steps=5,
  ))
  c.train = ml_collections.ConfigDict(dict(
      steps=200,
      log_every=10,
      eval_every=100,
      eval_batches=4,
      checkpoint_every=100,
      keep_checkpoints=3,
      async_checkpoints=True,  # Write checkpoints in the background while training goes on.
      peak_tflops_per_device=0.0,  # 0: look up the device kind; used for MFU only.
  ))
  c.federation = ml_collections.ConfigDict(dict(
      rounds=10,
      inner_steps=50,  # H: inner steps per round, for every silo not in silo_inner_steps.
      round_budget_s=0.0,  # >0: a silo ends its round after this many seconds instead.
      silos=('web', 'concurrency', 'text', 'tools'),  # Silo ids, listed in run.json.
      silo_weights=(),  # Optional per-silo multipliers of the token weights.
      silo_inner_steps=(),  # Optional per-silo H (one per silo), declared in run.json.
      silo_round_budget_s=(),  # Optional per-silo round budgets in seconds, ditto.
      min_silos=0,  # Quorum once the deadline passed; 0 means every silo.
      round_deadline_s=600.0,  # Aggregator: after this, a quorum is enough.
      wait_timeout_s=3600.0,  # Any wait for the bucket fails with a clear error after this.
      poll_s=0.5,
      # none, bf16, int8, int4, int2 or topk; int8 cost nothing in bench/study.py.
      compression='int8',
      block_size=256,
      error_feedback=False,  # topk requires it: the residual holds what was not sent.
      # SparseLoCo's beta: the residual decays by it each round (e <- beta e + delta). 1: plain
      # error feedback; SparseLoCo uses 0.95 with outer.optimizer='fedavg' (no outer momentum).
      error_feedback_decay=1.0,
      # compression='topk' (SparseLoCo): per chunk of topk_chunk values, the topk_density
      # largest-magnitude ones, quantised to topk_bits (2, 4 or 8) bits.
      topk_density=0.01,
      topk_bits=2,
      topk_chunk=4096,
      # The global update the aggregator publishes beside the fp32 model (none, bf16, int8,
      # int4, int2; federation.block_size): an up-to-date silo downloads only it
      # (docs/protocol.md).
      downlink_compression='none',
      num_shards=1,  # Aggregation split over this many processes by parameter leaves.
      robust='mean',  # mean (token-weighted), trimmed_mean or median (coordinate-wise).
      trim=1,  # trimmed_mean: values dropped at each end per coordinate.
      clip_multiple=0.0,  # >0: clip each delta's norm to this multiple of the median norm.
      reject_norm_multiple=10.0,  # >0: reject a delta 10x beyond the other silos' median norm.
      drop_probability=0.0,  # Studies of lossy links: the aggregator loses each delta with this p.
      keep_last_rounds=3,
      keep_every_rounds=10,
      # Unlearning a silo (scripts/unlearn.py, fedpt/unlearning.py): the aggregator keeps every
      # global round and delta (no garbage collection), so that a silo's influence can later
      # be removed by a branch (retrain) or a re-aggregation (replay). Costs, per round, a
      # global model, its outer state and every delta (README: Unlearning a silo).
      retain_for_unlearning=False,
      # fnmatch globs over flat leaf names ('embed_vd', 'blocks/mlp/*'): leaves never averaged,
      # kept per silo (DEPT, arXiv 2410.05021; Photon's personalised layers). See protocol.py.
      private_params=(),
      # none: a silo waits for global round r+1 after publishing round r. delayed / eager:
      # it trains round r+1 at once from global round r, the outer update of round r applied
      # one round late (eager: its own part of it at once). See docs/protocol.md.
      overlap='none',
      # Streaming DiLoCo (arXiv 2501.18512; fedpt/fragments.py): P > 1 splits the model into
      # P fragments; round r trains H/P steps and exchanges fragment r mod P only, so each
      # fragment is still exchanged every H steps and one exchange moves 1/P of the model.
      # federation.rounds counts these fragment rounds: P x the rounds for the same tokens.
      fragments=1,
      # Pairwise-masked secure aggregation (Bonawitz et al. 2017; fedpt/secagg.py): the
      # aggregator reads only the weighted sum of the deltas. Each silo clips its delta to
      # secagg_clip (L2) and encodes it in fixed point, masked by pair masks and a self mask;
      # each included silo then publishes its round's self-mask key (and its pair keys with
      # any dropped silo) within secagg_recovery_timeout_s, or the round fails. Signed runs
      # of >= 3 silos only.
      secure_aggregation=False,
      secagg_clip=1.0,
      secagg_recovery_timeout_s=600.0,
      # Free riders and copies (fedpt/copies.py, docs/protocol.md): the manifest flags a
      # delta whose cosine with another delta of the round, an earlier delta or an earlier
      # global update is >= copy_cosine, or whose norm per inner step is < min_norm_ratio x
      # the median of the other silos'. Defaults from honest runs (BENCHMARKS.md). 0: off.
      copy_cosine=0.99,
      min_norm_ratio=0.05,
      reject_copies=False,  # True: a flagged delta is rejected, not only flagged.
  ))
  c.outer = ml_collections.ConfigDict(dict(
      # fedavg (plain averaging) beat the paper's diloco (Nesterov) at 8-40 rounds in
      # bench/study.py; configs/150m.py and larger use diloco. Also sgd, fedadam, fedyogi.
      optimizer='fedavg',
      lr=0.7,  # diloco, sgd, fedadam, fedyogi.
      momentum=0.9,
      b1=0.9,
      b2=0.99,
      eps=0.1,  # DiLoCo found outer Adam needs a large eps to be stable.
      momentum_warmup_rounds=0,  # >0: momentum ramps from 0 to outer.momentum (diloco, sgd).
      lr_warmup_rounds=0,  # >0: outer.lr ramps from 0 over this many rounds.
  ))
  # A silo's private fine-tune of the final global model on its own data (fedpt/personal.py).
  c.personal = ml_collections.ConfigDict(dict(
      steps=0,  # 0: off. Steps of AdamW after the last round, from the silo's unseen batches.
      lr=3e-4,
      warmup_steps=10,
      schedule='cosine',  # As inner.schedule; decays over personal.steps to inner.min_lr_ratio.
  ))
  # Example-level DP-SGD inside the silo (fedpt/privacy.py, docs/privacy.md): each silo's own
  # choice, never in run.json; its spent (epsilon, delta) is published with every delta.
  c.privacy = ml_collections.ConfigDict(dict(dp=ml_collections.ConfigDict(dict(
      enabled=False,
      clip_norm=1.0,  # C: each training sequence's gradient is clipped to this L2 norm.
      noise_multiplier=0.0,  # sigma: noise std / C. Give it, or target_epsilon (not both).
      target_epsilon=0.0,  # >0: sigma is derived from it and the planned steps; also the cap.
      delta=0.0,  # 0: 1 / the silo's number of training sequences (windows).
      accountant='pld',  # pld or rdp (dp_accounting).
  ))))
  # What each included delta of a round did to this silo's held-out loss (fedpt/contribution.py,
  # docs/protocol.md "Contribution records"): each silo's own choice, never in run.json.
  # first_order: one backward pass; loo/shapley (K <= 8) add 2^K held-out evaluations. All but
  # 'none' read every included delta of the round: K x the upload size per round.
  c.contribution = ml_collections.ConfigDict(dict(mode='none'))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding = ml_collections.ConfigDict(dict(rules=DEFAULT_RULES))
  c.distributed = ml_collections.ConfigDict(dict(
      mode='off',  # 'off', 'auto' (TPU/SLURM/Open MPI detection) or 'explicit'.
      coordinator_address='',
      num_processes=1,
      process_id=0,
      local_device_ids=(),
  ))
  return c


def _check_schema(config, reference, prefix=''):
  for key in config.keys():
    path = f'{prefix}{key}'
    if key not in reference:
      close = difflib.get_close_matches(key, list(reference.keys()), n=1)
      hint = f"did you mean '{prefix}{close[0]}'" if close else (
          f'valid fields here: {sorted(reference.keys())}')
      raise ConfigError(path, 'is not a fedpt config field', hint)
    if isinstance(reference[key], ml_collections.ConfigDict):
      if not isinstance(config[key], ml_collections.ConfigDict):
        raise ConfigError(path, 'must be a section (ConfigDict)', 'do not overwrite the section')
      _check_schema(config[key], reference[key], prefix=f'{path}.')


def require(ok: bool, field: str, problem: str, fix: str):
  if not ok:
    raise ConfigError(field, problem, fix)


def _type_of(default) -> tuple[str, object]:
  """(what a field with this schema default must be, the check of a value)."""
  if isinstance(default, bool):
    return 'True or False', lambda v: isinstance(v, bool)
  if isinstance(default, int):
    return 'an integer', lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)
  if isinstance(default, float):
    return 'a finite number', lambda v: (isinstance(v, numbers.Real) and not isinstance(v, bool)
                                         and math.isfinite(v))
  if isinstance(default, str):
    return 'a string', lambda v: isinstance(v, str)
  return 'a tuple', lambda v: isinstance(v, (tuple, list))


def describe_type(default) -> str:
  """What a field whose default is `default` takes: 'an integer', 'True or False', ..."""
  return _type_of(default)[0]


def _type_problem(value, default) -> str | None:
  """Why `value` cannot stand where the schema's `default` is, or None."""
  want, ok = _type_of(default)
  return None if ok(value) else f'must be {want}, got {value!r}'


def _in(low, high, low_open=False, high_open=False):
  def ok(v):
    return (v > low if low_open else v >= low) and (
        high is None or (v < high if high_open else v <= high))
  left, right = '(' if low_open else '[', ')' if high_open or high is None else ']'
  return ok, f'must be in {left}{low}, {"inf" if high is None else high}{right}'


_POSITIVE = _in(0, None, low_open=True)
_NON_NEGATIVE = _in(0, None)
_BETA = _in(0, 1, high_open=True)

# Each numeric field's range: (field, (check, what it must be), fix).
RANGES = (
    ('seed', _in(0, 2**32 - 1), 'use a non-negative 32-bit integer'),
    ('model.rope_theta', _POSITIVE, 'use e.g. 10000.0 (RoPE base wavelength)'),
    ('model.norm_eps', _in(0, 1, low_open=True), 'use e.g. 1e-5'),
    ('model.init_std', _POSITIVE, 'use e.g. 0.02'),
    ('inner.lr', _POSITIVE, 'set a positive learning rate, e.g. 1e-3'),
    ('inner.warmup_steps', _NON_NEGATIVE, 'use 0 or more steps'),
    ('inner.decay_steps', _NON_NEGATIVE, 'use 0 (decay over train.steps) or more'),
    ('inner.min_lr_ratio', _in(0, 1), 'use a ratio between 0 and 1'),
    ('inner.b1', _BETA, 'use e.g. 0.9'),
    ('inner.b2', _BETA, 'use e.g. 0.95'),
    ('inner.eps', _POSITIVE, 'use e.g. 1e-8'),
    ('inner.weight_decay', _NON_NEGATIVE, 'use 0 (off) or e.g. 0.1'),
    ('inner.grad_clip', _NON_NEGATIVE, 'use 0 (off) or e.g. 1.0'),
    ('inner.z_loss', _NON_NEGATIVE, 'use 0 (off) or a small weight like 1e-4'),
    ('inner.prox_mu', _NON_NEGATIVE, 'use 0, or e.g. 0.01 with drift_correction=\'fedprox\''),
    ('inner.muon_lr', _POSITIVE, 'set a positive learning rate, e.g. 0.02'),
    ('inner.muon_weight_decay', _NON_NEGATIVE, 'use 0 (off) or e.g. 0.005'),
    ('inner.muon_beta', _BETA, 'use e.g. 0.95'),
    ('inner.muon_ns_steps', _in(1, 50), 'use e.g. 5 Newton-Schulz steps'),
    ('train.steps', _POSITIVE, 'set it > 0'),
    ('train.log_every', _POSITIVE, 'set it > 0'),
    ('train.eval_every', _POSITIVE, 'set it > 0'),
    ('train.eval_batches', _POSITIVE, 'set it > 0'),
    ('train.checkpoint_every', _POSITIVE, 'set it > 0'),
    ('train.keep_checkpoints', _POSITIVE, 'set it > 0'),
    ('train.peak_tflops_per_device', _NON_NEGATIVE, 'use 0 (look it up) or the chip\'s peak'),
    ('federation.rounds', _POSITIVE, 'set it > 0'),
    ('federation.inner_steps', _POSITIVE, 'set H > 0'),
    ('federation.fragments', _in(1, None), 'use 1 (whole-model rounds) or e.g. 4'),
    ('federation.round_budget_s', _NON_NEGATIVE, 'use 0 (run H steps) or a budget in seconds'),
    ('federation.min_silos', _NON_NEGATIVE, 'use 0 (all silos) or a quorum size'),
    ('federation.round_deadline_s', _NON_NEGATIVE, 'use seconds >= 0'),
    ('federation.wait_timeout_s', _in(1, None), 'use seconds >= 1, e.g. 3600'),
    ('federation.poll_s', _in(0.01, 600), 'poll the bucket every 0.01 to 600 seconds'),
    ('federation.block_size', _POSITIVE, 'use e.g. 256'),
    ('federation.error_feedback_decay', _in(0, 1, low_open=True),
     'use 1 (plain error feedback) or SparseLoCo\'s 0.95'),
    ('federation.topk_density', _in(0, 1, low_open=True),
     'use e.g. 0.01 (each chunk sends its top 1%)'),
    ('federation.topk_chunk', _in(1, 2**31), 'use e.g. 4096'),
    ('federation.num_shards', _in(1, None), 'use 1 or more'),
    ('federation.trim', _NON_NEGATIVE, 'use the number of Byzantine silos to tolerate'),
    ('federation.clip_multiple', _NON_NEGATIVE, 'use 0 (off) or e.g. 2'),
    ('federation.reject_norm_multiple', _NON_NEGATIVE, 'use 0 (off) or > 1, e.g. 10'),
    ('federation.drop_probability', _in(0, 1, high_open=True),
     'use 0 (off), or e.g. 0.5 to study lossy links'),
    ('federation.keep_last_rounds', _in(1, None), 'keep at least the newest round'),
    ('federation.secagg_clip', _in(0, 1e6, low_open=True),
     'use the L2 bound of a delta: the mean delta norm of a probe run (status.py)'),
    ('federation.secagg_recovery_timeout_s', _POSITIVE, 'use seconds > 0, e.g. 600'),
    ('federation.keep_every_rounds', _NON_NEGATIVE, 'use 0 (none) or e.g. 10'),
    ('data.watermark.count', _in(1, 2**20), 'use e.g. 8 sequences'),
    ('data.watermark.repeats', _in(1, 2**20), 'use e.g. 100 plantings per epoch'),
    ('federation.copy_cosine', _in(0, 1), 'use 0 (off) or a cosine near 1, e.g. 0.99'),
    ('federation.min_norm_ratio', _in(0, 1, high_open=True), 'use 0 (off) or e.g. 0.05'),
    ('personal.steps', _NON_NEGATIVE, 'use 0 (off) or a few hundred steps'),
    ('personal.lr', _POSITIVE, 'set a positive learning rate, e.g. 3e-4'),
    ('personal.warmup_steps', _NON_NEGATIVE, 'use 0 or more steps'),
    ('privacy.dp.clip_norm', _POSITIVE, 'use e.g. 1.0 (the per-sequence gradient L2 bound)'),
    ('privacy.dp.noise_multiplier', _NON_NEGATIVE,
     'use 0 (derive it from target_epsilon) or e.g. 1.0'),
    ('privacy.dp.target_epsilon', _NON_NEGATIVE, 'use 0 (give noise_multiplier) or e.g. 8.0'),
    ('privacy.dp.delta', _in(0, 1, high_open=True),
     'use 0 (1 / the silo\'s training sequences) or e.g. 1e-6'),
    ('outer.lr', _POSITIVE, 'use e.g. 0.7'),
    ('outer.momentum', _BETA, 'use e.g. 0.9'),
    ('outer.b1', _BETA, 'use e.g. 0.9'),
    ('outer.b2', _BETA, 'use e.g. 0.99'),
    ('outer.eps', _POSITIVE, 'use e.g. 0.1'),
    ('outer.momentum_warmup_rounds', _NON_NEGATIVE, 'use 0 (off) or a number of rounds'),
    ('outer.lr_warmup_rounds', _NON_NEGATIVE, 'use 0 (off) or a number of rounds'),
    ('distributed.num_processes', _in(1, None), 'use 1 or more'),
    ('distributed.process_id', _NON_NEGATIVE, 'number the processes 0..num_processes-1'),
)


def validate(config) -> None:
  """Checks every field's type and range, then the cross-field rules.

  `protocol.validate_federation` adds the run's rules, `sharding.validate_config`
  the mesh's.
  """
  _check_schema(config, base_config())
  values, schema = flat(config), flat(base_config())
  for field, default in schema.items():
    problem = _type_problem(values[field], default)
    if problem:
      raise ConfigError(field, problem, f'set {field} to {_type_of(default)[0]}')
  for field, (ok, what), fix in RANGES:
    require(ok(values[field]), field, f'{what}, got {values[field]!r}', fix)
  m, d, i = config.model, config.data, config.inner
  for field in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'head_dim', 'd_ff'):
    require(m[field] > 0, f'model.{field}', f'must be a positive integer, got {m[field]!r}',
            'set a positive integer')
  require(m.n_heads % m.n_kv_heads == 0, 'model.n_kv_heads',
          f'n_heads={m.n_heads} is not a multiple of n_kv_heads={m.n_kv_heads}',
          'choose n_kv_heads that divides n_heads (grouped-query attention)')
  require(m.head_dim % 2 == 0, 'model.head_dim', f'{m.head_dim} is odd',
          'RoPE rotates pairs of dimensions: use an even head_dim')
  for field in ('param_dtype', 'compute_dtype'):
    allowed = DTYPES + (('auto',) if field == 'compute_dtype' else ())
    require(m[field] in allowed, f'model.{field}', f'unknown dtype {m[field]!r}',
            f'use one of {allowed}')
  require(m.remat in REMAT_POLICIES, 'model.remat', f'unknown policy {m.remat!r}',
          f'use one of {REMAT_POLICIES}')
  require(m.attention in ATTENTION_IMPLS, 'model.attention', f'unknown {m.attention!r}',
          f'use one of {ATTENTION_IMPLS}')
  require(d.seq_len > 0, 'data.seq_len', f'must be positive, got {d.seq_len}', 'set it > 0')
  require(d.global_batch > 0, 'data.global_batch', f'must be positive, got {d.global_batch}',
          'set it > 0')
  require(i.grad_accum >= 1 and d.global_batch % i.grad_accum == 0, 'inner.grad_accum',
          f'global_batch={d.global_batch} is not divisible into grad_accum={i.grad_accum} '
          'micro-batches', 'choose grad_accum dividing data.global_batch')
  for field in ('inner.schedule', 'personal.schedule'):
    section, name = field.split('.')
    require(config[section][name] in SCHEDULES, field, f'unknown {config[section][name]!r}',
            f'use one of {SCHEDULES}')
  require(i.optimizer in INNER_OPTIMIZERS, 'inner.optimizer', f'unknown {i.optimizer!r}',
          f'use one of {INNER_OPTIMIZERS}')
  require(i.drift_correction in DRIFT_CORRECTIONS, 'inner.drift_correction',
          f'unknown {i.drift_correction!r}', f'use one of {DRIFT_CORRECTIONS}')
  require(i.drift_correction != 'fedprox' or i.prox_mu > 0, 'inner.prox_mu',
          f'{i.prox_mu} with drift_correction=\'fedprox\' adds no proximal term',
          'set inner.prox_mu > 0 (FedProx tried 0.001 to 1; 0.01 is a common start)')
  wm = d.watermark
  require(wm.length == 0 or 2 <= wm.length <= d.seq_len + 1, 'data.watermark.length',
          f'{wm.length} tokens do not fit a window of data.seq_len + 1 = {d.seq_len + 1}',
          f'use 0 (a whole window) or 2 to {d.seq_len + 1}')
  dp = config.privacy.dp
  require(dp.accountant in DP_ACCOUNTANTS, 'privacy.dp.accountant',
          f'unknown accountant {dp.accountant!r}', f'use one of {DP_ACCOUNTANTS}')
  require(not dp.enabled or (dp.noise_multiplier > 0) != (dp.target_epsilon > 0),
          'privacy.dp.noise_multiplier',
          (f'noise_multiplier={dp.noise_multiplier} and target_epsilon={dp.target_epsilon} are '
           'both set' if dp.noise_multiplier > 0 else 'neither it nor target_epsilon is set'),
          'give one: privacy.dp.noise_multiplier (sigma) or privacy.dp.target_epsilon (sigma '
          'is then derived)')
  require(not dp.noise_multiplier or dp.noise_multiplier >= DP_MIN_NOISE_MULTIPLIER,
          'privacy.dp.noise_multiplier',
          f'{dp.noise_multiplier} is below {DP_MIN_NOISE_MULTIPLIER}: its accounting takes '
          'seconds and gigabytes per epoch, for an epsilon too large to protect anything',
          f'use a noise multiplier >= {DP_MIN_NOISE_MULTIPLIER} (e.g. 1.0), or 0 with '
          'target_epsilon')
  require(config.contribution.mode in CONTRIBUTION_MODES, 'contribution.mode',
          f'unknown mode {config.contribution.mode!r}', f'use one of {CONTRIBUTION_MODES}')
  fed = config.federation
  require(fed.overlap in OVERLAP_MODES, 'federation.overlap', f'unknown mode {fed.overlap!r}',
          f'use one of {OVERLAP_MODES}')
  for pattern in fed.private_params:
    require(isinstance(pattern, str) and pattern.strip() == pattern and pattern,
            'federation.private_params', f'{pattern!r} is not a glob pattern',
            "list fnmatch globs over flat leaf names, e.g. ('embed_vd',)")
  require(fed.poll_s <= fed.wait_timeout_s, 'federation.poll_s',
          f'{fed.poll_s}s is longer than wait_timeout_s={fed.wait_timeout_s}s',
          'poll more often than the timeout')
  require(len(fed.silos) > 0 and len(set(fed.silos)) == len(fed.silos), 'federation.silos',
          f'need distinct silo ids, got {list(fed.silos)}', 'list each silo id once')
  for s in fed.silos:  # Ids name bucket paths: nothing else may get through.
    listed = isinstance(s, str) and ',' in s  # --config.federation.silos=a,b is one id 'a,b'.
    require(isinstance(s, str) and s.isascii() and s.replace('-', '').replace('_', '').isalnum(),
            'federation.silos', f'silo id {s!r} must be letters, digits, - or _',
            'write several ids as a tuple: --config.federation.silos="(' + ','.join(
                repr(x) for x in s.split(',')) + ')"' if listed else 'rename the silo')
  require(fed.min_silos <= len(fed.silos), 'federation.min_silos',
          f'{fed.min_silos} is not between 0 and {len(fed.silos)} silos',
          'use 0 (all silos) or a quorum size')
  weights = list(fed.silo_weights)
  for w in weights:
    require(not isinstance(w, bool) and isinstance(w, numbers.Real) and math.isfinite(w)
            and w >= 0, 'federation.silo_weights', f'weight {w!r} is not a finite number >= 0',
            'give each silo a multiplier >= 0, e.g. 1.0')
  require(not weights or len(weights) == len(fed.silos), 'federation.silo_weights',
          f'{len(weights)} weights for {len(fed.silos)} silos', 'give one weight per silo, or none')
  require(all(w <= 1e6 for w in weights), 'federation.silo_weights',
          f'{tuple(weights)} has a weight above 1e6: tokens x weight would overflow',
          'use relative multipliers, e.g. 1.0 and 2.0')
  for field, default in (('silo_inner_steps', 'inner_steps'),
                         ('silo_round_budget_s', 'round_budget_s')):
    declared = list(fed[field])
    require(not declared or len(declared) == len(fed.silos), f'federation.{field}',
            f'{len(declared)} values for {len(fed.silos)} silos',
            'give one value per silo (in the order of federation.silos), or none')
    for value in declared:
      problem = _type_problem(value, fed[default])
      require(problem is None and (value > 0 if default == 'inner_steps' else value >= 0),
              f'federation.{field}', problem or f'{value!r} is out of range',
              f'see federation.{default}')
  require(not weights or sum(weights) > 0, 'federation.silo_weights',
          f'every weight is zero {tuple(weights)}: no delta could move the model',
          'give at least one silo a weight > 0, or leave silo_weights empty (all 1.0)')
  require(config.distributed.process_id < config.distributed.num_processes,
          'distributed.process_id',
          f'{config.distributed.process_id} with num_processes={config.distributed.num_processes}',
          'number the processes 0..num_processes-1')


SHAPE_FIELDS = ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'head_dim', 'd_ff',
                'tie_embeddings')

# What makes a trained model the function it is. A tool reading its weights (sample, evaluate,
# export) may change anything else: the data it evaluates on, eval batches, compute dtype.
MODEL_FIELDS = (*(f'model.{k}' for k in SHAPE_FIELDS), 'model.rope_theta', 'model.norm_eps',
                'model.init_std', 'model.param_dtype', 'data.tokenizer')

# What a resumed run may change without --allow_config_change: how it is run, logged and
# checkpointed, not what it computes. Every other field is compared with the workdir's record.
# federation.* and outer.*: a plain run does not read them (a federated run's are in run.json).
RESUMABLE_FIELDS = ('name', 'model.remat', 'model.attention', 'model.scan_layers',
                    'inner.grad_accum', 'train.log_every', 'train.eval_every',
                    'train.eval_batches', 'train.checkpoint_every',
                    'train.keep_checkpoints', 'train.async_checkpoints',
                    'train.peak_tflops_per_device', 'mesh.*', 'sharding.*', 'distributed.*',
                    'federation.*', 'outer.*', 'personal.*', 'contribution.*')


def model_spec(config) -> dict:
  """The fields that fix parameter shapes; checkpoints and runs must agree on them."""
  return {k: config.model[k] for k in SHAPE_FIELDS}


def flat(config) -> dict:
  """{'section.field': value} of every field, tuples as lists: the form records store."""
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update({f'{key}.{k}': v for k, v in flat(value).items()})
    else:
      out[key] = _as_lists(value)
  return out


def _as_lists(value):
  return [_as_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def as_tuples(value):
  """`flat`'s lists back to the tuples configs hold."""
  return tuple(as_tuples(v) for v in value) if isinstance(value, (tuple, list)) else value


def differences(recorded: dict, config, fields=None) -> dict:
  """{field: (this config's value, the recorded value)} where they differ.

  `fields` limits the comparison (default: every recorded field). A field the
  record lacks is not compared (a record written by an older fedpt).
  """
  mine = flat(config)
  return {k: (mine.get(k), recorded[k]) for k in sorted(recorded if fields is None else fields)
          if k in recorded and k in mine and mine[k] != recorded[k]}


def describe(diff: dict, theirs: str = 'recorded', mine: str = 'yours') -> str:
  """'inner.lr=0.05 (yours) vs 0.001 (recorded), ...' for an error line."""
  return ', '.join(f'{k}={a!r} ({mine}) vs {b!r} ({theirs})' for k, (a, b) in diff.items())


def with_values(config, values: dict):
  """A copy of `config` with the dotted `values` set (lists become tuples where the field is one)."""
  config = config.copy_and_resolve_references()
  with config.unlocked(), config.ignore_type():
    for path, value in values.items():
      *sections, field = path.split('.')
      node = config
      for s in sections:
        node = node[s]
      node[field] = as_tuples(value) if isinstance(node[field], tuple) else value
  return config


def compared_on_resume(fields) -> list[str]:
  """Those of `fields` a resume must keep (all but RESUMABLE_FIELDS)."""
  return [f for f in fields if not any(fnmatch.fnmatchcase(f, p) for p in RESUMABLE_FIELDS)]


def from_flat(values: dict, base=None):
  """The locked config a record describes, over `base` (default: `base_config()`).

  Fields this fedpt does not know are left out; those the record lacks keep `base`'s.
  """
  base = base_config() if base is None else base
  known = flat(base)
  config = with_values(base, {k: v for k, v in values.items() if k in known})
  config.lock()
  return config


def over_record(recorded: dict, config, typed):
  """The recorded config with the `typed` fields (those set on the command line) from `config`.

  A record is the truth about a run: a config file's defaults do not override it,
  only what the user typed does (the caller checks those). `typed=None` means every
  field of `config` was asked for (an in-process call): `config` itself.
  """
  if typed is None:
    return config
  mine = flat(config) if config is not None else {}
  return from_flat({**recorded, **{k: mine[k] for k in typed if k in mine}}, base=config)
