"""The config schema shared by every configs/*.py, and its validation.

Every config starts from `base_config()`, so a field that is not in the schema
is a typo and is reported with the closest valid name.
"""
import difflib
import fnmatch

import ml_collections

from fedpt import errors

DTYPES = ('float32', 'bfloat16', 'float16')
REMAT_POLICIES = ('none', 'full', 'dots', 'dots_no_batch')
SCHEDULES = ('cosine', 'constant', 'linear')
ATTENTION_IMPLS = ('auto', 'xla', 'cudnn')

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
    self.field = field
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
  ))
  c.data = ml_collections.ConfigDict(dict(
      corpus='stdlib',  # The built-in corpus, or a directory from prepare_data.py.
      stdlib_group='all',
      tokenizer='default',  # The shipped SentencePiece model, or a .model path.
      seq_len=256,
      global_batch=16,
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
      inner_steps=50,  # H: inner steps per round (a silo may override its own).
      round_budget_s=0.0,  # >0: a silo ends its round after this many seconds instead.
      silos=('web', 'concurrency', 'text', 'tools'),  # Silo ids, listed in run.json.
      silo_weights=(),  # Optional per-silo multipliers of the token weights.
      min_silos=0,  # Quorum once the deadline passed; 0 means every silo.
      round_deadline_s=600.0,  # Aggregator: after this, a quorum is enough.
      wait_timeout_s=3600.0,  # Any wait for the bucket fails with a clear error after this.
      poll_s=0.5,
      compression='int8',  # none, bf16, int8 or int4; int8 cost nothing in bench/study.py.
      block_size=256,
      error_feedback=False,
      num_shards=1,  # Aggregation split over this many processes by parameter leaves.
      robust='mean',  # mean (token-weighted), trimmed_mean or median (coordinate-wise).
      trim=1,  # trimmed_mean: values dropped at each end per coordinate.
      clip_multiple=0.0,  # >0: clip each delta's norm to this multiple of the median norm.
      reject_norm_multiple=10.0,  # >0: reject a delta 10x beyond the other silos' median norm.
      drop_probability=0.0,  # Studies of lossy links: the aggregator loses each delta with this p.
      keep_last_rounds=3,
      keep_every_rounds=10,
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
  ))
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


def validate(config) -> None:
  """Checks the config's own fields; `sharding.validate_config` adds the mesh checks."""
  _check_schema(config, base_config())
  m, d, i, t = config.model, config.data, config.inner, config.train
  for field in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'head_dim', 'd_ff'):
    require(isinstance(m[field], int) and m[field] > 0, f'model.{field}',
             f'must be a positive integer, got {m[field]!r}', 'set a positive integer')
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
  require(i.lr > 0, 'inner.lr', f'must be positive, got {i.lr}', 'set a positive learning rate')
  require(i.schedule in SCHEDULES, 'inner.schedule', f'unknown {i.schedule!r}',
           f'use one of {SCHEDULES}')
  require(0 <= i.min_lr_ratio <= 1, 'inner.min_lr_ratio', f'{i.min_lr_ratio} not in [0, 1]',
           'use a ratio between 0 and 1')
  require(i.warmup_steps >= 0, 'inner.warmup_steps', 'is negative', 'use 0 or more')
  require(i.z_loss >= 0, 'inner.z_loss', 'is negative', 'use 0 (off) or a small weight like 1e-4')
  require(t.steps > 0, 'train.steps', f'must be positive, got {t.steps}', 'set it > 0')
  for field in ('log_every', 'eval_every', 'checkpoint_every', 'keep_checkpoints'):
    require(t[field] > 0, f'train.{field}', f'must be positive, got {t[field]}', 'set it > 0')


SHAPE_FIELDS = ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'head_dim', 'd_ff',
                'tie_embeddings')

# What makes a trained model the function it is. A tool reading its weights (sample, evaluate,
# export) may change anything else: the data it evaluates on, eval batches, compute dtype.
MODEL_FIELDS = (*(f'model.{k}' for k in SHAPE_FIELDS), 'model.rope_theta', 'model.norm_eps',
                'model.init_std', 'model.param_dtype', 'data.tokenizer')

# What a resumed run may change without --allow_config_change: how it is run, logged and
# checkpointed, not what it computes. Every other field is compared with the workdir's record.
# federation.* and outer.*: a plain run does not read them (a federated run's are in run.json).
RESUMABLE_FIELDS = ('name', 'model.remat', 'model.attention', 'inner.grad_accum', 'train.log_every',
                    'train.eval_every', 'train.eval_batches', 'train.checkpoint_every',
                    'train.keep_checkpoints', 'train.async_checkpoints',
                    'train.peak_tflops_per_device', 'mesh.*', 'sharding.*', 'distributed.*',
                    'federation.*', 'outer.*')


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


def _as_tuples(value):
  return tuple(_as_tuples(v) for v in value) if isinstance(value, (tuple, list)) else value


def differences(recorded: dict, config, fields=None) -> dict:
  """{field: (this config's value, the recorded value)} where they differ.

  `fields` limits the comparison (default: every recorded field). A field the
  record lacks is not compared (a record written by an older fedpt).
  """
  mine = flat(config)
  return {k: (mine.get(k), recorded[k]) for k in sorted(recorded if fields is None else fields)
          if k in recorded and k in mine and mine[k] != recorded[k]}


def describe(diff: dict, theirs: str = 'recorded') -> str:
  """'inner.lr=0.05 (yours) vs 0.001 (recorded), ...' for an error line."""
  return ', '.join(f'{k}={a!r} (yours) vs {b!r} ({theirs})' for k, (a, b) in diff.items())


def with_values(config, values: dict):
  """A copy of `config` with the dotted `values` set (lists become tuples where the field is one)."""
  config = config.copy_and_resolve_references()
  with config.unlocked(), config.ignore_type():
    for path, value in values.items():
      *sections, field = path.split('.')
      node = config
      for s in sections:
        node = node[s]
      node[field] = _as_tuples(value) if isinstance(node[field], tuple) else value
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
