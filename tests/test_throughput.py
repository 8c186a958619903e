"""bench/throughput.py's floor does fedpt's work: the same loss on the same params and batch,
and with every feature added, the same update; bad flags are one line."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import conftest
from fedpt import inner
from fedpt import trainer as trainer_lib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'bench'))
import bare_step  # noqa: E402  pylint: disable=g-import-not-at-top


@pytest.fixture(scope='module')
def setup(corpus_dir):
  config = conftest.load_config('tiny', corpus_dir)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  # z-loss on and no warm-up, so every feature changes the first step.
  config.inner.update(z_loss=1e-3, warmup_steps=0, grad_clip=0.5)
  trainer = trainer_lib.Trainer(config, devices=jax.devices()[:1])
  state = trainer.init_state()
  params = jax.device_get(state['params'])
  batch = trainer.batch(0)
  return trainer, state, params, batch


@pytest.mark.parametrize('scan', [False, True])
def test_bare_loss_is_fedpts_loss(setup, scan):
  trainer, _, params, batch = setup
  z = trainer.config.inner.z_loss
  expected, _ = inner.loss_and_metrics(params, batch, graphdef=trainer.graphdef, z_loss=z)
  got = bare_step.bare_loss(bare_step.bare_params(params, scan), batch, trainer.model_config, z)
  np.testing.assert_allclose(float(got), float(expected), rtol=1e-6)
  assert float(expected) > 8.0  # An untrained model near ln(vocab): real work.


def test_bare_with_every_feature_takes_fedpts_step(setup):
  trainer, state, params, batch = setup
  new_state, _ = trainer.train_step(jax.tree.map(np.copy, state), batch)
  fedpt_params = jax.device_get(new_state['params'])
  every = bare_step.parse_variant('all')
  step, bare = bare_step.make_bare(every, trainer, params)
  (bare_params, _), _ = step(bare, batch)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               jax.device_get(bare_step.stacked_params(bare_params)), fedpt_params)
  # The floor lacks clipping, the mask, z-loss: a different step, so the features matter.
  floor_step, floor = bare_step.make_bare(frozenset(), trainer, params)
  (floor_params, _), _ = floor_step(floor, batch)
  assert not np.allclose(floor_params['final_norm']['scale'],
                         fedpt_params['final_norm']['scale'])


def test_variant_names_parse_and_bad_ones_are_refused():
  assert bare_step.parse_variant('scan+clip') == frozenset({'scan', 'clip'})
  assert bare_step.variant_name(frozenset({'scan', 'clip'})) == 'bare+clip+scan'
  assert bare_step.variant_name(bare_step.parse_variant('all')) == 'bare+all'
  with pytest.raises(bare_step.ThroughputError, match='unknown bare-step feature'):
    bare_step.parse_variant('scan+fused')


@pytest.mark.parametrize('script, args, expected', [
    ('throughput', ['--sizes=huge'], "unknown size 'huge'"),
    ('throughput', ['--sizes=tiny', '--remats=everything'], "unknown remat policy 'everything'"),
    ('throughput', ['--sizes=tiny', '--variants=fused'], "unknown bare-step feature 'fused'"),
    ('throughput', ['--sizes=tiny', '--fedpt_overrides=model.scan_layers'], 'is not FIELD=VALUE'),
    ('throughput', ['--sizes=tiny', '--fedpt_overrides=model.scan_layer=False'], 'did you mean'),
    ('throughput', ['--sizes=tiny', '--fedpt_overrides=model.scan_layers=3'],
     'give a value of its type'),
    ('dp_step', ['--configs=huge'], "unknown size 'huge'"),
    ('dp_step', ['--configs=tiny', '--grad_accum=3'],
     '--grad_accum: config field \'inner.grad_accum\''),
    ('dp_step', ['--configs=tiny', '--noise_multiplier=0'], '--noise_multiplier=0 must be > 0'),
])
def test_bad_flags_are_one_line(repo_root, script, args, expected):
  proc = subprocess.run([sys.executable, f'bench/{script}.py', *args], cwd=repo_root,
                        capture_output=True, text=True, env=conftest.child_env(), timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert expected in proc.stderr and 'Traceback' not in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1


def test_profile_prices_clipping_and_finds_no_framework_overhead(repo_root, tmp_path):
  out = tmp_path / 'profile.json'
  proc = subprocess.run([sys.executable, 'bench/profile_step.py', '--size=tiny',
                         '--variants=clip,all', '--steps=1', f'--json_out={out}'],
                        cwd=repo_root, capture_output=True, text=True, env=conftest.child_env(),
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  static = json.loads(out.read_text())['static']
  # A global-norm clip makes XLA write the gradients out and read them back.
  assert static['bare+clip']['gb_accessed'] > 1.01 * static['bare']['gb_accessed']
  # fedpt's program is the bare step with every feature: the framework adds no traffic.
  assert static['fedpt']['gb_accessed'] == pytest.approx(static['bare+all']['gb_accessed'],
                                                         rel=0.01)
  assert static['fedpt']['gflop'] == pytest.approx(static['bare+all']['gflop'], rel=0.001)
  assert 'fedpt: ' in proc.stdout and 'ms of ops per step' in proc.stdout


def test_interleaved_trials_rotate_the_first_runner_and_time_every_step():
  calls = []

  def runner(name):
    def step(count, batch):
      calls.append(name)
      return count + batch, np.zeros(())
    return step, 0

  runners = {'plain': runner('plain'), 'dp': runner('dp')}
  times, steps = bare_step.interleaved_times(runners, 1, steps=2, trials=3)
  assert steps == 2 and all(len(t) == 3 and min(t) > 0 for t in times.values())
  # The first runner's calibration (a warm and a timed step), then per trial and runner a
  # warm step and 2 timed ones, the first runner rotating.
  assert calls[:2] == ['plain', 'plain'] and len(calls) == 2 + 3 * 2 * 3
  assert [calls[2 + 6 * trial] for trial in range(3)] == ['plain', 'dp', 'plain']
  assert runners['plain'][1] == 2 + 3 * 3 and runners['dp'][1] == 3 * 3  # States carried on.


