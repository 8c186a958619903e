"""Data watermarks (Wei, Wang & Jia, arXiv 2402.10892): was a model trained on our data?

A silo with `data.watermark.enabled` plants `count` secret random token sequences in its
own training stream, each `repeats` times per epoch (`data.Watermark`: inserted windows,
the corpus order untouched, never the held-out split). Later, `verify` (behind
`scripts/watermark.py --verify`) tests any model: under the null hypothesis that the model
never trained on the silo's stream, the secret sequences are just more draws from the
distribution they were drawn from, so their loss is distributed as the loss of fresh
random sequences from it. The test (the paper's z-test, averaged over the sequences):

  z = (mean_i l(w_i) - mean_j l(n_j)) / (std_j l(n_j) / sqrt(count)),  p = Phi(z),

one-sided (a trained model has a lower loss on what it memorised), l the mean next-token
loss in nats of a sequence on its own, n_1..n_N the null sequences from a seed
independent of the secret. `p_rank`, the rank of the watermark's mean loss among the
means of disjoint groups of `count` null losses, is exact without the normal
approximation (its floor is 1 / (1 + N // count)).

The secret (256 bits from the OS) and the sequences' seed derived from it live in
`<workdir>/watermark.json` (mode 0600), written at the workdir's first start and never
published, logged or changed: the sequences, their positions in the stream and so a
bit-identical resume all derive from it.
"""
import hashlib
import json
import math
import os
import secrets

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from fedpt import config as config_lib
from fedpt import data as data_lib
from fedpt import errors
from fedpt import inner
from fedpt import loading
from fedpt import metrics as metrics_lib
from fedpt import model as model_lib
from fedpt import multihost
from fedpt import records
from fedpt import storage as storage_lib

RECORD = 'watermark.json'
FORMAT = 1
SETTINGS = ('count', 'length', 'repeats', 'vocab_size')
_HEX = frozenset('0123456789abcdef')
_NULL_PURPOSE = 0x6E756C6C  # 'null': keeps the verifier's seed space apart from others.


class WatermarkError(errors.UserError, ValueError):
  """A watermark record or verification input that cannot be used; says what and the fix."""


def record_path(workdir: str) -> epath.Path:
  return epath.Path(workdir) / RECORD


def sequences_seed(secret: str) -> str:
  """The seed the sequences are drawn from: a one-way function of the secret."""
  return hashlib.sha256(f'{secret}:sequences'.encode()).hexdigest()


def settings(config, vocab_size: int) -> dict:
  """The record's settings for `config` (length 0 resolved to a whole window)."""
  wm = config.data.watermark
  return {'count': wm.count, 'length': wm.length or config.data.seq_len + 1,
          'repeats': wm.repeats, 'vocab_size': vocab_size}


def _is_key(value) -> bool:
  return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def _record_problem(record) -> str | None:
  """What is wrong with the form of a watermark.json (`open_watermark` writes it), or None."""
  if not isinstance(record, dict):
    return f'a JSON {type(record).__name__}, not an object'
  missing = [k for k in ('format', 'settings', 'secret', 'sequences_seed', 'tokenizer_sha256')
             if k not in record]
  if missing:
    return f'no {", ".join(missing)}'
  if record['format'] != FORMAT:
    return f'format {record["format"]!r}, this fedpt reads {FORMAT}'
  s = record['settings']
  if not isinstance(s, dict) or sorted(s) != sorted(SETTINGS):
    return f'settings must hold {", ".join(SETTINGS)}'
  bad = [k for k in SETTINGS if not (isinstance(s[k], int) and not isinstance(s[k], bool)
                                     and 1 <= s[k] < 2**31)]
  if bad:
    return f'settings.{bad[0]} is {s[bad[0]]!r}, not a positive integer'
  if s['length'] < 2 or s['vocab_size'] <= data_lib.FIRST_ORDINARY_ID:
    return 'settings.length must be >= 2 and settings.vocab_size > 4'
  if not _is_key(record['secret']):
    return 'secret is not 64 hex digits'
  if record['sequences_seed'] != sequences_seed(record['secret']):
    return 'sequences_seed is not the one its secret derives'
  if not _is_key(record['tokenizer_sha256']):
    return 'tokenizer_sha256 is not a sha256'
  return None


_RESTORE_FIX = ('Fix: restore it from a backup: without its secret the planted sequences can '
                'be neither resumed nor verified')


def read_record(workdir: str) -> dict | None:
  """The workdir's watermark.json, None if absent; WatermarkError (one line) if unusable."""
  return records.read_private(record_path(workdir), WatermarkError, 'a watermark record',
                              _record_problem, _RESTORE_FIX,
                              'Fix: give this party read access to it')


def _write_record(workdir: str, record: dict) -> None:
  """Whole or not at all, readable by this user only from its first byte (a secret)."""
  path = record_path(workdir)
  text = json.dumps(record, indent=1) + '\n'
  with errors.refusals(f'writing {path}', workdir):
    if storage_lib.is_remote(str(path)):
      storage_lib.write_atomically(path, text)
      return
    os.makedirs(workdir, exist_ok=True)
    tmp = f'{path}.tmp-{os.getpid()}'
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, 'w') as f:
      f.write(text)
    os.replace(tmp, path)


def from_record(record: dict) -> data_lib.Watermark:
  s = record['settings']
  return data_lib.Watermark(record['sequences_seed'], record['secret'], count=s['count'],
                            length=s['length'], repeats=s['repeats'],
                            vocab_size=s['vocab_size'])


def open_watermark(config, workdir: str, *, vocab_size: int, tokenizer_sha256: str,
                   windows: int, start_step: int,
                   log_prefix: str = '') -> data_lib.Watermark | None:
  """The workdir's planted watermark (None without data.watermark.enabled).

  The first start draws the secret and writes watermark.json; every resume reuses it
  and refuses other settings, a lost record, or a watermark turned on or off after step
  0, since each would change the data order the checkpoints were trained on.
  """
  enabled = config.data.watermark.enabled
  path = record_path(workdir)
  record = read_record(workdir)
  if not enabled:
    if record is not None and start_step > 0:
      raise WatermarkError(
          f'data.watermark.enabled=False, but {workdir} planted a watermark ({RECORD}) in the '
          f'{start_step} steps it trained: turning it off mid-run changes the data order. Fix: '
          'resume with data.watermark.enabled=True, or start a new workdir')
    return None
  mine = settings(config, vocab_size)
  if record is None:
    if start_step > 0:
      raise WatermarkError(
          f'data.watermark is on, but {workdir} trained {start_step} steps and holds no '
          f'{RECORD}: either it was lost ({_RESTORE_FIX[5:]}) or the watermark was turned on '
          'mid-run (start a new workdir with it on; it plants from step 0)')
    secret = secrets.token_hex(32)
    record = {'format': FORMAT, 'settings': mine, 'secret': secret,
              'sequences_seed': sequences_seed(secret), 'tokenizer_sha256': tokenizer_sha256}
    if multihost.is_leader():
      _write_record(workdir, record)
    multihost.barrier('fedpt_watermark_record')
    record = read_record(workdir) if multihost.is_multihost() else record
  else:
    theirs = {**record['settings'], 'tokenizer_sha256': record['tokenizer_sha256']}
    changed = {k: (v, theirs[k]) for k, v in {**mine, 'tokenizer_sha256': tokenizer_sha256}
               .items() if v != theirs[k]}
    if changed:
      raise WatermarkError(
          f'{path}: this workdir plants a watermark of other settings '
          f'({config_lib.describe(changed)}); changing them changes the data order and the '
          'sequences. Fix: resume with the recorded values, or start a new workdir')
  s = record['settings']
  share = s['count'] * s['repeats'] / (windows + s['count'] * s['repeats'])
  metrics_lib.log(f'{log_prefix}data watermark: {s["count"]} secret sequences of '
                  f'{s["length"]} tokens, each planted {s["repeats"]} times per epoch '
                  f'({share:.2%} of the training stream); the secret stays in {path}')
  return from_record(record)


# -- verification ---------------------------------------------------------------------


def null_sequences(record: dict, samples: int, seed: int) -> np.ndarray:
  """`samples` fresh sequences from the watermark's distribution, from a public seed."""
  s = record['settings']
  return data_lib.random_sequences([seed, _NULL_PURPOSE], samples, s['length'],
                                   s['vocab_size'])


def normal_cdf(z: float) -> float:
  return 0.5 * math.erfc(-z / math.sqrt(2.0))


def z_test(watermark_losses, null_losses) -> dict:
  """The one-sided z-test of the module docstring, and the exact rank p-value."""
  wm = np.asarray(watermark_losses, np.float64)
  null = np.asarray(null_losses, np.float64)
  if wm.size < 1 or null.size < 2:
    raise WatermarkError(f'need at least one watermark loss and two null losses, got '
                         f'{wm.size} and {null.size}. Fix: pass --null_samples >= 2')
  if not (np.isfinite(wm).all() and np.isfinite(null).all()):
    raise WatermarkError('the model\'s losses are not finite (NaN or Inf): it cannot be '
                         'tested. Fix: check that it is the right, trained model')
  mean, std = float(null.mean()), float(null.std(ddof=1))
  statistic = float(wm.mean())
  if std == 0.0:
    raise WatermarkError('every null sequence has the same loss: the model does not tell '
                         'sequences apart, so nothing can be tested. Fix: check the model')
  z = (statistic - mean) / (std / math.sqrt(wm.size))
  groups = null.size // wm.size
  group_means = null[:groups * wm.size].reshape(groups, wm.size).mean(axis=1)
  return {'z': z, 'p_value': normal_cdf(z),
          'p_rank': (1 + int((group_means <= statistic).sum())) / (1 + groups),
          'watermark_mean_loss': statistic, 'null_mean_loss': mean, 'null_std_loss': std,
          'watermark_losses': wm.tolist(), 'null_samples': int(null.size)}


def sequence_losses(loaded: loading.Loaded, tokens: np.ndarray, batch: int = 64) -> np.ndarray:
  """Each row's mean next-token loss (nats) under the model, the row on its own."""
  graphdef = model_lib.abstract_model(loaded.model_config)[0]
  device = jax.tree.leaves(loaded.params)[0].sharding
  step = jax.jit(lambda params, rows: inner.row_losses(params, rows, graphdef=graphdef))
  out = []
  for start in range(0, len(tokens), batch):
    rows = tokens[start:start + batch]
    padded = np.concatenate([rows, np.repeat(rows[-1:], batch - len(rows), axis=0)])
    out.append(np.asarray(step(loaded.params, jax.device_put(jnp.asarray(padded), device)))
               [:len(rows)])
  return np.concatenate(out)


def verdict(stats: dict, alpha: float) -> str:
  if stats['p_value'] < alpha:
    return (f'TRAINED ON THE WATERMARK: the secret sequences\' loss is {-stats["z"]:.1f} null '
            f'standard errors below fresh ones (p = {stats["p_value"]:.3g} < {alpha})')
  return (f'no evidence: the secret sequences\' loss is not significantly below fresh ones '
          f'(p = {stats["p_value"]:.3g} >= {alpha}; z = {stats["z"]:.2f})')


def model_source(workdir: str, *, model_workdir: str | None = None, step: int | None = None,
                 storage: str | None = None, round_index: int | None = None) -> loading.Source:
  """The model `scripts/watermark.py` tests: --storage's round, --model_workdir's or
  --workdir's own checkpoint."""
  problem = ('--storage and --model_workdir name two models' if storage and model_workdir
             else '--round goes with --storage' if round_index is not None and not storage
             else '--step goes with a workdir' if step is not None and storage else None)
  if problem:
    raise WatermarkError(
        f'{problem}. Fix: test one model: --storage=ROOT [--round=N] (a global round), '
        '--model_workdir=DIR [--step=N] (another run\'s checkpoint), or neither (--workdir\'s '
        'own newest checkpoint, or --step)')
  if storage:
    return loading.Source(storage=storage, round_index=round_index)
  return loading.Source(workdir=model_workdir or workdir, step=step)


# A million null sequences already put the rank p-value's floor near 1e-6 x count.
MAX_NULL_SAMPLES = 10**6


def verify(config, workdir: str, source: loading.Source, *, null_samples: int = 1000,
           null_seed: int = 0, alpha: float = 0.01) -> dict:
  """Tests the model at `source` for the watermark kept in `workdir`: statistics + verdict."""
  record = read_record(workdir)
  if record is None:
    raise WatermarkError(
        f'{workdir} holds no {RECORD}. Fix: pass the --workdir of the silo (or run) that '
        'trained with data.watermark.enabled=True; its secret never leaves it')
  if not 2 <= null_samples <= MAX_NULL_SAMPLES:
    raise WatermarkError(f'--null_samples={null_samples}: the test needs at least 2 (the '
                         f'null distribution\'s spread) and scores at most {MAX_NULL_SAMPLES:,} '
                         'sequences. Fix: use the default 1000')
  if not 0 < alpha < 1:
    raise WatermarkError(f'--alpha={alpha} is not a significance level. Fix: use e.g. 0.01')
  tokenizer_sha256 = data_lib.file_sha256(data_lib.resolve_tokenizer(config.data))
  if tokenizer_sha256 != record['tokenizer_sha256']:
    raise WatermarkError(
        f'the model\'s tokenizer (sha256 {tokenizer_sha256[:12]}...) is not the one the '
        f'watermark was planted in (sha256 {record["tokenizer_sha256"][:12]}..., '
        f'{record_path(workdir)}): its token ids mean other text. Fix: test a model of the '
        'same tokenizer')
  if config.model.vocab_size < record['settings']['vocab_size']:
    raise WatermarkError(
        f'model.vocab_size={config.model.vocab_size} is smaller than the watermark\'s '
        f'vocabulary ({record["settings"]["vocab_size"]}). Fix: test a model of the same '
        'tokenizer')
  loaded = loading.load(config, source)
  wm = from_record(record)
  losses = sequence_losses(loaded, np.concatenate(
      [wm.sequences, null_sequences(record, null_samples, null_seed)]))
  stats = z_test(losses[:wm.count], losses[wm.count:])
  return {**stats, 'model': loaded.source, 'alpha': alpha, 'null_seed': null_seed,
          'settings': record['settings'], 'verdict': verdict(stats, alpha)}


def render(result: dict) -> str:
  s = result['settings']
  losses = ', '.join(f'{x:.3f}' for x in result['watermark_losses'])
  return '\n'.join([
      f'model: {result["model"]}',
      f'watermark: {s["count"]} sequences of {s["length"]} tokens, planted {s["repeats"]} '
      f'times per epoch each; their losses (nats): {losses}',
      f'mean loss {result["watermark_mean_loss"]:.4f} vs {result["null_samples"]} fresh '
      f'random sequences: mean {result["null_mean_loss"]:.4f}, std '
      f'{result["null_std_loss"]:.4f}',
      f'z = {result["z"]:.3f}, p = {result["p_value"]:.3g} (one-sided z-test), p_rank = '
      f'{result["p_rank"]:.3g}',
      f'verdict: {result["verdict"]}'])
