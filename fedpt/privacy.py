"""Example-level differential privacy inside a silo (`privacy.dp.*`): the accounting and its record.

The DP-SGD step itself is `inner.train_step` (jax_privacy's per-example clipping and
Gaussian noise); this module says how much privacy it spends, with dp_accounting.
docs/privacy.md states the guarantee; in short:

- Privacy unit: one training sequence (a window of seq_len + 1 tokens of the silo's
  training split). Adjacency: zero-out (one window replaced by one that contributes a zero
  gradient; the data order, a public function of the run's seed, is fixed), under which
  the clipped sum of a step has L2 sensitivity C = clip_norm per use of the window.
- Sampling: none to amplify. fedpt reads a shuffled pass (`data.TokenDataset.batch`):
  position i = step x B + row is window perm_epoch(i mod W) of epoch i // W, so after t
  steps a window was used at most E(t) = ceil(t B / W) times, once per epoch. A step that
  straddles an epoch boundary may hold a window twice (B <= W: at most twice, and each
  use pairs at most once), and is then one Gaussian mechanism of sensitivity 2C.
- Epsilon after t steps: the composition of those Gaussian mechanisms of noise
  multiplier sigma (`dp_event.SelfComposedDpEvent(GaussianDpEvent(sigma), n)`, plus
  sigma / 2 for each doubled use in the worst case), by dp_accounting's PLD or RDP
  accountant. `calibrate_dp_mechanism` derives sigma from a target epsilon.

The noise key is a 64-bit secret drawn from the OS at the workdir's first DP start and
kept, with the sigma it trains with, in `<workdir>/privacy.json` (never published): the
run's seed is public, and noise an adversary can regenerate protects nothing. The record
also keeps the high water of the steps trained (`steps`): epsilon is per workdir, and a
start that is not a restore of its checkpoints would restart it and reuse the noise keys
fold_in(seed, step) on other parameters, so it is refused.
"""
import dataclasses
import functools
import json
import math
import os
import secrets
from typing import TYPE_CHECKING

from etils import epath

from fedpt import config as config_lib
from fedpt import errors
from fedpt import metrics as metrics_lib
from fedpt import multihost
from fedpt import records
from fedpt import storage as storage_lib

if TYPE_CHECKING:
  import dp_accounting


def _dp():
  """dp_accounting, imported on first use: with scipy and mpmath it adds ~1 s to the start
  of every process, and only a DP silo's accounting needs it."""
  import dp_accounting  # pylint: disable=g-import-not-at-top,redefined-outer-name
  return dp_accounting


RECORD = 'privacy.json'
# The fields whose change mid-run would void the accounting (compared on every resume).
SETTINGS = ('clip_norm', 'noise_multiplier', 'target_epsilon', 'delta')
# The least sigma: `calibrate`'s floor and the config's (the PLD of a smaller one takes
# seconds and gigabytes).
MIN_NOISE_MULTIPLIER = config_lib.DP_MIN_NOISE_MULTIPLIER


class PrivacyError(errors.UserError, RuntimeError):
  """A DP setting or budget that the silo must not train past; the message says the fix."""


def uses(steps: int, batch: int, windows: int) -> tuple[int, int]:
  """(single, double) uses of the worst-case window in the first `steps` steps.

  E = ceil(steps B / W) uses, once per epoch. A step holding an epoch boundary (not on
  a batch edge) may hold one window twice; such pairs take two uses each and do not
  chain (B <= W), so the worst case has min(boundaries, E // 2) pairs.
  """
  if steps <= 0:
    return 0, 0
  positions = steps * batch
  epochs = -(-positions // windows)
  straddles = sum(1 for e in range(1, epochs) if (e * windows) % batch)
  pairs = min(straddles, epochs // 2)
  return epochs - 2 * pairs, pairs


def dp_event(noise_multiplier: float, steps: int, batch: int,
             windows: int) -> 'dp_accounting.DpEvent':
  """The DpEvent of `steps` DP-SGD steps for the worst-case window (`uses`)."""
  return _uses_event(noise_multiplier, *uses(steps, batch, windows))


def _uses_event(noise_multiplier: float, single: int, double: int) -> 'dp_accounting.DpEvent':
  events = []
  if single:
    events.append(_dp().SelfComposedDpEvent(
        _dp().GaussianDpEvent(noise_multiplier), single))
  if double:  # Sensitivity 2C against noise sigma C: a Gaussian of multiplier sigma / 2.
    events.append(_dp().SelfComposedDpEvent(
        _dp().GaussianDpEvent(noise_multiplier / 2), double))
  return _dp().ComposedDpEvent(events) if events else _dp().NoOpDpEvent()


def make_accountant(name: str) -> 'dp_accounting.PrivacyAccountant':
  """dp_accounting's accountant `name` (config.DP_ACCOUNTANTS), add-or-remove-one relation."""
  if name == 'pld':
    return _dp().pld.PLDAccountant()
  if name == 'rdp':
    return _dp().rdp.RdpAccountant()
  raise ValueError(f'unknown accountant {name!r}')


def epsilon(noise_multiplier: float, steps: int, batch: int, windows: int, delta: float,
            accountant: str = 'pld') -> float:
  """The epsilon at `delta` that `steps` DP-SGD steps of `noise_multiplier` spend."""
  return make_accountant(accountant).compose(
      dp_event(noise_multiplier, steps, batch, windows)).get_epsilon(delta)


def calibrate(target_epsilon: float, steps: int, batch: int, windows: int, delta: float,
              accountant: str = 'pld') -> float:
  """The smallest noise multiplier whose `steps` steps spend at most `target_epsilon`.

  Not below MIN_NOISE_MULTIPLIER: the PLD of a smaller one needs memory without bound,
  and a budget that loose is met by it anyway.
  """
  if epsilon(MIN_NOISE_MULTIPLIER, steps, batch, windows, delta, accountant) <= target_epsilon:
    return MIN_NOISE_MULTIPLIER
  return _dp().calibrate_dp_mechanism(
      functools.partial(make_accountant, accountant),
      lambda sigma: dp_event(sigma, steps, batch, windows), target_epsilon, delta,
      _dp().LowerEndpointAndGuess(MIN_NOISE_MULTIPLIER, 1.0), tol=1e-4)


@dataclasses.dataclass(frozen=True)
class Budget:
  """A workdir's DP-SGD: its noise, its accounting, and its cap (target_epsilon, 0: none)."""

  clip_norm: float
  noise_multiplier: float
  delta: float
  target_epsilon: float
  accountant: str
  windows: int
  batch: int
  noise_seed: tuple[int, int]  # Two uint32 words: the noise key's data (secret).

  record: dict | None = dataclasses.field(default=None, compare=False, repr=False)
  workdir: str | None = None  # Where `record` lives: `reach` keeps its high water there.

  def epsilon(self, steps: int) -> float:
    """Epsilon spent after `steps` steps of this workdir (at `delta`)."""
    return _epsilon_of_uses(self.noise_multiplier, uses(steps, self.batch, self.windows),
                            self.delta, self.accountant)

  def reach(self, steps: int) -> None:
    """Records `steps` as trained in the workdir's privacy.json, if above its high water.

    Called where steps become durable (a checkpoint, before a delta is published): a
    later start below it that is not a restore of a checkpoint is refused (`open_budget`).
    """
    if self.record is None or steps <= self.record.get('steps', 0):
      return
    self.record['steps'] = int(steps)
    if multihost.is_leader():
      _write_record(self.workdir, self.record)

  def spent(self, steps: int) -> dict:
    """What a silo publishes with a delta: {'epsilon', 'delta'}, numbers only."""
    return {'epsilon': float(self.epsilon(steps)), 'delta': float(self.delta)}

  def check_room(self, start: int, end: int, what: str) -> None:
    """PrivacyError if training steps start..end would spend more than target_epsilon."""
    if not self.target_epsilon or end <= start:
      return
    spent = self.epsilon(end)
    if spent > self.target_epsilon * (1 + 1e-6):
      raise PrivacyError(
          f'privacy.dp: {what} would take this silo to step {end} and epsilon {spent:.4g} '
          f'(delta {self.delta:.3g}), above its target_epsilon {self.target_epsilon:g}; '
          f'stopped before it at step {start} (epsilon {self.epsilon(start):.4g}). Fix: '
          'train no further on this data, or start a new workdir with a larger budget')

  def describe(self, steps: int) -> str:
    return (f'DP-SGD per training sequence: clip {self.clip_norm:g}, noise multiplier '
            f'{self.noise_multiplier:.4g}'
            + (f' (derived from target_epsilon {self.target_epsilon:g})'
               if self.target_epsilon else '')
            + f', delta {self.delta:.3g}, {self.windows:,} sequences, batch {self.batch}; '
            f'epsilon {self.epsilon(steps):.4g} after {steps} steps ({self.accountant} '
            'accountant, no amplification: a shuffled pass)')


@functools.lru_cache(maxsize=64)
def _epsilon_of_uses(noise_multiplier: float, window_uses: tuple[int, int], delta: float,
                     accountant: str) -> float:
  """Cached by the uses, which change once per epoch: a PLD takes a while."""
  return make_accountant(accountant).compose(
      _uses_event(noise_multiplier, *window_uses)).get_epsilon(delta)


def _settings(dp, delta: float) -> dict:
  return {'clip_norm': dp.clip_norm, 'noise_multiplier': dp.noise_multiplier,
          'target_epsilon': dp.target_epsilon, 'delta': delta}


def record_path(workdir: str) -> epath.Path:
  return epath.Path(workdir) / RECORD


_RESTORE_FIX = ('Fix: restore it from a backup; without its noise seed and multiplier this '
                'workdir cannot continue privately, so start a new workdir')


def _number(value, low: float, high: float = math.inf) -> bool:
  return records.is_number(value) and low <= value < high


def _record_problem(record) -> str | None:
  """What is wrong with the form of a privacy.json (`open_budget` writes it), or None."""
  if not isinstance(record, dict):
    return f'a JSON {type(record).__name__}, not an object'
  missing = [k for k in ('settings', 'noise_multiplier', 'windows', 'global_batch',
                         'noise_seed') if k not in record]
  if missing:
    return f'no {", ".join(missing)}'
  settings = record['settings']
  if not isinstance(settings, dict) or sorted(settings) != sorted(SETTINGS):
    return f'settings must hold {", ".join(SETTINGS)}'
  bad = [k for k in SETTINGS if not _number(settings[k], 0.0)]
  if bad:
    return f'settings.{bad[0]} is {settings[bad[0]]!r}, not a number >= 0'
  if not _number(record['noise_multiplier'], MIN_NOISE_MULTIPLIER):
    return (f'noise_multiplier is {record["noise_multiplier"]!r}, not a number >= '
            f'{MIN_NOISE_MULTIPLIER}')
  for key in ('windows', 'global_batch'):
    if not (_number(record[key], 1) and isinstance(record[key], int)):
      return f'{key} is {record[key]!r}, not a positive integer'
  seed = record['noise_seed']
  if not (isinstance(seed, list) and len(seed) == 2
          and all(isinstance(w, int) and _number(w, 0, 2**32) for w in seed)):
    return f'noise_seed is {seed!r}, not two integers in [0, 2^32)'
  steps = record.get('steps', 0)
  if not (isinstance(steps, int) and _number(steps, 0)):
    return f'steps is {steps!r}, not an integer >= 0'
  return None


def _read_record(workdir: str) -> dict | None:
  """The workdir's privacy.json, None if absent; PrivacyError (one line) if unusable."""
  return records.read_private(
      record_path(workdir), PrivacyError, 'a privacy record', _record_problem, _RESTORE_FIX,
      'Fix: give this party read access to it; without it this workdir cannot continue '
      'privately')


def _write_record(workdir: str, record: dict) -> None:
  path = record_path(workdir)
  with errors.refusals(f'writing {path}', workdir):
    storage_lib.write_atomically(path, json.dumps(record, indent=1) + '\n')
    if not str(path).startswith('gs://'):
      os.chmod(path, 0o600)  # The noise seed is a secret of this silo.


def private_from_start(config_record: dict | None) -> bool:
  """Whether a workdir's config record (config.json) shows DP on from its first step.

  A change that turned it on (`config_changes`) means steps trained without it.
  """
  record = config_record or {}
  turned_on = any(change.get('changes', {}).get('privacy.dp.enabled', {}).get('from') is False
                  for change in record.get('config_changes', []))
  return bool(record.get('privacy.dp.enabled')) and not turned_on


def open_budget(config, workdir: str, *, windows: int, planned_steps: int, start_step: int,
                restored: bool, was_private: bool = False,
                log_prefix: str = '') -> Budget | None:
  """The workdir's `Budget` (None without privacy.dp.enabled), pinned in its privacy.json.

  The first start draws the noise seed and fixes sigma (given, or calibrated to
  target_epsilon over `planned_steps`); every resume reuses both, and refuses a change of
  the DP settings or of the data's shape that would void the accounting. `restored`: the
  state is a checkpoint of this workdir (at `start_step`); a start that is not, below the
  steps the record has spent, is refused. `was_private`: the workdir's config record shows
  DP on from its start (`private_from_start`; a silo rewrites it before this check, so a
  privacy.json counts too where DP is off).
  """
  dp = config.privacy.dp
  path = record_path(workdir)
  if not dp.enabled:
    if start_step > 0 and (was_private or path.exists()):
      raise PrivacyError(
          f'privacy.dp.enabled=False, but {workdir} trained with DP ({start_step} steps so far, '
          f'{RECORD}): its later deltas would carry no epsilon while its data is already '
          'spent. Fix: resume with privacy.dp.enabled=True, or start a new workdir without DP')
    return None
  batch = config.data.global_batch
  config_lib.require(
      windows >= batch, 'privacy.dp.enabled',
      f'the training split has {windows} sequences, fewer than data.global_batch={batch}: a '
      'step would hold a sequence several times', 'use more data or a smaller global batch')
  delta = dp.delta or 1.0 / windows
  record = _read_record(workdir)
  if record is None:
    if start_step > 0 and was_private:
      raise PrivacyError(
          f'{path} is missing, but {workdir} trained {start_step} steps with privacy.dp (its '
          'config record says so): without its noise seed and spent steps this workdir cannot '
          f'continue privately. Fix: restore {RECORD} from a backup, or start a new workdir')
    if start_step > 0:
      raise PrivacyError(
          f'privacy.dp is on, but {workdir} trained {start_step} steps without it (no '
          f'{RECORD}): those steps are not private. Fix: start a new workdir with DP on')
    sigma = dp.noise_multiplier or calibrate(dp.target_epsilon, planned_steps, batch, windows,
                                             delta, dp.accountant)
    seed = secrets.randbits(64)
    record = {'settings': _settings(dp, delta), 'noise_multiplier': sigma,
              'windows': windows, 'global_batch': batch,
              'noise_seed': [seed & 0xFFFFFFFF, seed >> 32], 'steps': 0}
    if multihost.is_leader():
      _write_record(workdir, record)
    multihost.barrier('fedpt_privacy_record')
    record = _read_record(workdir) if multihost.is_multihost() else record
  else:
    mine = {**_settings(dp, delta), 'windows': windows, 'global_batch': batch}
    theirs = {**record['settings'], 'windows': record['windows'],
              'global_batch': record['global_batch']}
    changed = {k: (mine[k], theirs[k]) for k in mine if not math.isclose(mine[k], theirs[k])}
    if changed:
      raise PrivacyError(
          f'{path}: this workdir trains with other DP settings or data '
          f'({config_lib.describe(changed)}); a change mid-run voids its accounting. Fix: '
          'resume with the recorded values, or start a new workdir')
  budget = Budget(dp.clip_norm, float(record['noise_multiplier']), delta, dp.target_epsilon,
                  dp.accountant, windows, batch, tuple(record['noise_seed']), record, workdir)
  spent = record.get('steps', 0)
  if spent and not restored:
    raise PrivacyError(
        f'{path} records {spent} DP steps already trained (epsilon {budget.epsilon(spent):.4g}, '
        f'delta {delta:.3g}), but {workdir} has no checkpoint of them to resume: starting at '
        f'step {start_step} would restart the accounting and reuse their noise on other '
        'parameters. Fix: restore the checkpoints, or start a new workdir (its epsilon adds '
        'to this one\'s: docs/privacy.md)')
  metrics_lib.log(f'{log_prefix}{budget.describe(planned_steps)}')
  return budget
