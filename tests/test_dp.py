"""Example-level DP-SGD inside a silo (privacy.dp): clipping, noise, accounting, budget, resume."""
import functools
import json
import subprocess
import sys

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
from fedpt import config as config_lib
from fedpt import inner
from fedpt import privacy
from fedpt import trainer as trainer_lib


def _leaves(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


@pytest.fixture
def small(tiny_config):
  tiny_config.data.update(global_batch=8, seq_len=32)
  tiny_config.train.update(async_checkpoints=False, log_every=2, eval_every=1000,
                           checkpoint_every=1000)
  return tiny_config


@functools.lru_cache
def _jitted(trainer, accum, clip):
  cfg = trainer.config.inner.copy_and_resolve_references()
  cfg.grad_accum = accum
  return jax.jit(functools.partial(inner.private_gradients, graphdef=trainer.graphdef,
                                   inner_config=cfg, clip_norm=clip))


def _private(trainer, params, tokens, *, clip, std, accum=1, step=0):
  fn = _jitted(trainer, accum, clip)
  noise = (jnp.asarray([7, 11], jnp.uint32), jnp.float32(std))
  with trainer._rules():  # pylint: disable=protected-access  # The step's sharding rules.
    return fn(params, tokens, jnp.int32(step), noise)


def test_clipping_bounds_every_example_and_grad_accum_keeps_the_unit(small):
  trainer = trainer_lib.Trainer(small)
  params = trainer.init_state()['params']
  tokens = np.array(trainer.batch(0))
  loss_fn = functools.partial(inner.loss_and_metrics, graphdef=trainer.graphdef, z_loss=0.0)
  grad_one = jax.jit(jax.grad(lambda p, t: loss_fn(p, t[None])[0]))
  per_example = [grad_one(params, jnp.asarray(row)) for row in tokens]
  norms = np.array([np.linalg.norm(_leaves(g)) for g in per_example])
  clip = float(np.median(norms))  # Half of them are clipped.
  expected = sum(_leaves(g) * min(1.0, clip / n) for g, n in zip(per_example, norms))
  _, _, grads = _private(trainer, params, jnp.asarray(tokens), clip=clip, std=0.0)
  np.testing.assert_allclose(_leaves(grads) * len(tokens), expected, rtol=2e-4, atol=1e-6)
  # Replacing one sequence, by one with a huge gradient (every position the same token: far
  # from the model's near-uniform guess), moves the clipped sum by at most 2C.
  other = tokens.copy()
  other[3] = tokens[3, 0]
  huge = np.linalg.norm(_leaves(grad_one(params, jnp.asarray(other[3]))))
  assert huge > 2 * clip
  _, _, moved = _private(trainer, params, jnp.asarray(other), clip=clip, std=0.0)
  change = np.linalg.norm((_leaves(grads) - _leaves(moved)) * len(tokens))
  assert 0 < change <= 2 * clip * (1 + 1e-5)
  # grad_accum sums the same clipped per-example gradients over its micro-batches.
  _, _, accumulated = _private(trainer, params, jnp.asarray(tokens), clip=clip, std=0.0,
                               accum=2)
  np.testing.assert_allclose(_leaves(accumulated), _leaves(grads), rtol=2e-4, atol=1e-7)


def test_noise_has_the_configured_std_and_is_a_function_of_the_step(small):
  trainer = trainer_lib.Trainer(small)
  params = trainer.init_state()['params']
  tokens = trainer.batch(0)
  batch, std = small.data.global_batch, 3.0
  # A clip norm of 1e-9: the gradient is all noise, std / batch per coordinate.
  _, _, noisy = _private(trainer, params, tokens, clip=1e-9, std=std, step=5)
  values = _leaves(noisy)
  assert values.size > 300_000
  assert np.std(values) == pytest.approx(std / batch, rel=0.01)
  assert abs(np.mean(values)) < 4 * std / batch / np.sqrt(values.size)
  again = _leaves(_private(trainer, params, tokens, clip=1e-9, std=std, step=5)[2])
  np.testing.assert_array_equal(values, again)
  later = _leaves(_private(trainer, params, tokens, clip=1e-9, std=std, step=6)[2])
  assert abs(np.corrcoef(values, later)[0, 1]) < 0.01


def test_epsilon_is_dp_accountings_and_calibration_meets_the_target():
  sigma, batch, windows, delta = 1.1, 64, 6400, 1e-5
  # 250 steps: 2.5 epochs, boundaries on batch edges: each window used 3 times.
  assert privacy.uses(250, batch, windows) == (3, 0)
  for name, accountant in (('pld', dp_accounting.pld.PLDAccountant),
                           ('rdp', dp_accounting.rdp.RdpAccountant)):
    direct = accountant().compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.GaussianDpEvent(sigma), 3)).get_epsilon(delta)
    assert privacy.epsilon(sigma, 250, batch, windows, delta, name) == pytest.approx(direct)
  # An epoch boundary inside a batch may hold a window twice: sensitivity 2C once.
  assert privacy.uses(3, 8, 12) == (0, 1)
  assert privacy.epsilon(2.0, 3, 8, 12, 1e-3) == pytest.approx(
      dp_accounting.pld.PLDAccountant().compose(
          dp_accounting.GaussianDpEvent(1.0)).get_epsilon(1e-3))
  assert privacy.uses(0, 8, 12) == (0, 0)
  for target in (8.0, 2.0):
    found = privacy.calibrate(target, 250, batch, windows, delta)
    spent = privacy.epsilon(found, 250, batch, windows, delta)
    assert 0.97 * target <= spent <= target * (1 + 1e-6), (target, found, spent)


@pytest.mark.parametrize('fields, expected', [
    (dict(enabled=True, noise_multiplier=1.0, target_epsilon=8.0),
     "config field 'privacy.dp.noise_multiplier': noise_multiplier=1.0 and target_epsilon=8.0 "
     'are both set'),
    (dict(enabled=True), "'privacy.dp.noise_multiplier': neither it nor target_epsilon is set"),
    (dict(clip_norm=0.0), "'privacy.dp.clip_norm': must be in (0, inf), got 0.0"),
    (dict(delta=1.0), "'privacy.dp.delta': must be in [0, 1), got 1.0"),
    (dict(accountant='gdp'), "'privacy.dp.accountant': unknown accountant 'gdp'. Fix: use one "
     "of ('pld', 'rdp')"),
    (dict(enabled=True, noise_multiplier=0.1), "'privacy.dp.noise_multiplier': 0.1 is below 0.3: "
     'its accounting takes seconds and gigabytes'),
])
def test_bad_dp_fields_are_one_line_errors(fields, expected):
  config = config_lib.base_config()
  config.privacy.dp.update(fields)
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(config)
  assert expected in str(err.value) and '\n' not in str(err.value)


def test_resume_is_bit_exact_and_the_run_stops_before_its_target(small, tmp_path):
  small.privacy.dp.update(enabled=True, target_epsilon=4.0)
  small.train.steps = 4
  split, straight = tmp_path / 'split', tmp_path / 'straight'
  first = trainer_lib.train_and_evaluate(small, str(split), stop_at_step=2)
  assert first['step'] == 2
  record = json.loads((split / privacy.RECORD).read_text())
  assert (split / privacy.RECORD).stat().st_mode & 0o077 == 0  # A secret of the silo.
  assert record['steps'] == 2  # The high water, kept with the checkpoint.
  straight.mkdir()  # The same secret noise, and (unlike a lost workdir) no steps spent.
  (straight / privacy.RECORD).write_text(json.dumps({**record, 'steps': 0}))
  a = trainer_lib.train_and_evaluate(small, str(split))
  b = trainer_lib.train_and_evaluate(small, str(straight))
  assert a['start_step'] == 2 and a['step'] == b['step'] == 4
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a['state']['params']),
               jax.device_get(b['state']['params']))
  rows = [json.loads(line) for line in open(split / 'metrics.jsonl')]
  budget = privacy.Budget(1.0, record['noise_multiplier'], record['settings']['delta'], 4.0,
                          'pld', record['windows'], 8, tuple(record['noise_seed']))
  assert [r['epsilon'] for r in rows] == pytest.approx([budget.epsilon(2), budget.epsilon(4)])
  assert budget.epsilon(4) == pytest.approx(4.0, rel=0.03)
  assert json.loads((split / privacy.RECORD).read_text())['steps'] == 4

  # Training past the plan (one epoch is 5,957 steps: a second use of every sequence) with the
  # pinned noise would exceed the target: the real script
  # stops before the first step, in one line, status 2.
  script = [sys.executable, str(conftest.REPO / 'scripts' / 'train.py'), f'--workdir={split}',
            f'--config={conftest.REPO / "configs" / "tiny.py"}', '--config.train.steps=6000',
            '--allow_config_change']
  done = subprocess.run(script, capture_output=True, text=True, timeout=180,
                        env=conftest.child_env())
  assert done.returncode == 2, done.stdout + done.stderr
  line = done.stderr.strip().splitlines()[-1]
  assert line.startswith('error: privacy.dp: train.steps=6000 would take this silo to step 6000 '
                         'and epsilon'), line
  assert 'above its target_epsilon 4; stopped before it at step 4' in line
  assert 'Traceback' not in done.stderr


def _dp_config(**dp):
  config = config_lib.base_config()
  config.data.global_batch = 8
  config.train.steps = 10
  config.privacy.dp.update(enabled=True, noise_multiplier=1.0, **dp)
  return config


def _open(config, workdir, start_step=0, restored=False, was_private=False):
  return privacy.open_budget(config, str(workdir), windows=100, planned_steps=10,
                             start_step=start_step, restored=restored, was_private=was_private)


def _refusal(fn, *args, **kwargs) -> str:
  with pytest.raises(privacy.PrivacyError) as err:
    fn(*args, **kwargs)
  message = str(err.value)
  assert '\n' not in message and 'Fix: ' in message, message
  return message


@pytest.mark.parametrize('change, problem', [
    (lambda r: 'garbage', None),
    (lambda r: {}, 'no settings, noise_multiplier, windows, global_batch, noise_seed'),
    (lambda r: [], 'a JSON list, not an object'),
    (lambda r: {**r, 'noise_seed': ['a', 'b']}, "noise_seed is ['a', 'b'], not two integers"),
    (lambda r: {**r, 'noise_seed': [1, 2**32]}, 'noise_seed is [1, 4294967296], not two'),
    (lambda r: {**r, 'noise_multiplier': -3}, 'noise_multiplier is -3, not a number >= 0.3'),
    (lambda r: {**r, 'settings': {**r['settings'], 'clip_norm': None}},
     'settings.clip_norm is None, not a number >= 0'),
    (lambda r: {**r, 'windows': 0}, 'windows is 0, not a positive integer'),
    (lambda r: {**r, 'global_batch': 2.5}, 'global_batch is 2.5, not a positive integer'),
    (lambda r: {**r, 'steps': -1}, 'steps is -1, not an integer >= 0'),
])
def test_a_malformed_privacy_record_is_one_line_naming_the_file(tmp_path, change, problem):
  config = _dp_config()
  _open(config, tmp_path)
  path = tmp_path / privacy.RECORD
  changed = change(json.loads(path.read_text()))
  path.write_text(changed if isinstance(changed, str) else json.dumps(changed))
  message = _refusal(_open, config, tmp_path, start_step=4, restored=True, was_private=True)
  if problem is None:
    assert message.startswith(f'{path} is not readable JSON ('), message
  else:
    assert message.startswith(f'{path} is not a privacy record ({problem}'), message
  assert message.endswith('without its noise seed and multiplier this workdir cannot continue '
                          'privately, so start a new workdir')


def test_the_high_water_refuses_a_start_that_is_not_a_restore(tmp_path):
  config = _dp_config()
  budget = _open(config, tmp_path)
  path = tmp_path / privacy.RECORD
  assert json.loads(path.read_text())['steps'] == 0
  budget.reach(6)
  budget.reach(3)  # Below the high water: kept.
  assert json.loads(path.read_text())['steps'] == 6
  assert path.stat().st_mode & 0o077 == 0
  # Checkpoints lost (or another state): step 0 again would repeat fold_in(seed, step).
  message = _refusal(_open, config, tmp_path, was_private=True)
  assert message.startswith(
      f'{path} records 6 DP steps already trained (epsilon {budget.epsilon(6):.4g}, delta 0.01)'
      f', but {tmp_path} has no checkpoint of them to resume: starting at step 0 would restart '
      'the accounting'), message
  assert message.endswith('Fix: restore the checkpoints, or start a new workdir (its epsilon '
                          "adds to this one's: docs/privacy.md)")
  # A restored checkpoint below the high water replays its steps: allowed, same epsilon.
  again = _open(config, tmp_path, start_step=3, restored=True, was_private=True)
  assert again.noise_seed == budget.noise_seed and again.epsilon(6) == budget.epsilon(6)


def test_a_lost_record_and_dp_turned_off_are_refused(tmp_path):
  config = _dp_config()
  message = _refusal(_open, config, tmp_path, start_step=4, restored=True, was_private=True)
  assert message.startswith(f'{tmp_path / privacy.RECORD} is missing, but {tmp_path} trained 4 '
                            'steps with privacy.dp'), message
  assert message.endswith(f'Fix: restore {privacy.RECORD} from a backup, or start a new workdir')
  message = _refusal(_open, config, tmp_path, start_step=4, restored=True)
  assert 'trained 4 steps without it' in message
  # --allow_config_change --config.privacy.dp.enabled=False on a workdir that trained with DP.
  config.privacy.dp.enabled = False
  message = _refusal(_open, config, tmp_path, start_step=4, restored=True, was_private=True)
  assert message == (
      f'privacy.dp.enabled=False, but {tmp_path} trained with DP (4 steps so far, privacy.json): '
      'its later deltas would carry no epsilon while its data is already spent. Fix: resume '
      'with privacy.dp.enabled=True, or start a new workdir without DP')
  assert _open(config, tmp_path, was_private=True) is None  # Nothing trained yet: a new start.
  assert _open(config, tmp_path, start_step=4, restored=True) is None  # Never private.
  # Its privacy.json says so too, when config.json already records DP off (a silo writes it
  # before this check): a second try is refused the same way.
  _open(_dp_config(), tmp_path)
  assert 'trained with DP (4 steps so far' in _refusal(_open, config, tmp_path, start_step=4,
                                                       restored=True)


def test_epsilon_is_cached_per_epoch_not_per_step():
  budget = privacy.Budget(1.0, 1.0, 1e-3, 0.0, 'pld', 100, 8, (1, 2))
  first = budget.epsilon(2)
  before = privacy._epsilon_of_uses.cache_info()  # pylint: disable=protected-access
  assert budget.epsilon(12) == first  # Steps 2 and 12: both in the first epoch, one use.
  after = privacy._epsilon_of_uses.cache_info()  # pylint: disable=protected-access
  assert (after.hits, after.misses) == (before.hits + 1, before.misses)
  assert budget.epsilon(13) > first  # Step 13 starts the second epoch.


def test_a_config_record_shows_dp_on_from_the_start_unless_a_change_turned_it_on():
  on = {'privacy.dp.enabled': True}
  assert privacy.private_from_start(on) and not privacy.private_from_start(None)
  assert not privacy.private_from_start({'privacy.dp.enabled': False})
  assert not privacy.private_from_start({**on, 'config_changes': [{'step': 4, 'changes': {
      'privacy.dp.enabled': {'from': False, 'to': True}}}]})
  assert privacy.private_from_start({**on, 'config_changes': [{'step': 4, 'changes': {
      'train.steps': {'from': 4, 'to': 8}}}]})
