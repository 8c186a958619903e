"""A silo spanning two hosts: real jax.distributed processes (4 CPU devices each) on loopback.

The two-process silo must compute what one process with all 8 devices computes,
survive both processes being killed, and answer SIGTERM on one host by every
host checkpointing the same step and exiting with status 75.
"""
import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from fedpt import aggregator as aggregator_lib
from fedpt import checkpoint as checkpoint_lib
from fedpt import config as config_lib
from fedpt import errors
from fedpt import faults
from fedpt import ledger
from fedpt import silo as silo_lib
from fedpt import sharding
from fedpt import simulation
from fedpt import storage as storage_lib

from bucket_helpers import global_params

ROUNDS = 1  # Preempted mid-round 0, resumed, finished: the whole story in one round.
INNER_STEPS = 48  # Long enough for a preemption notice to reach the other host mid-round.


def _config(tiny_config):
  tiny_config.train.async_checkpoints = False
  # fp32 deltas: int8 rounding could turn gloo's 1e-6 summation-order differences into
  # whole quantisation steps.
  tiny_config.federation.update(rounds=ROUNDS, inner_steps=INNER_STEPS, silos=('a',),
                                poll_s=0.05, wait_timeout_s=240.0, compression='none')
  return tiny_config


@pytest.fixture(scope='module')
def reference(tmp_path_factory, corpus_dir, repo_root):
  """The same silo as one process with all 8 devices (this one), run once for the module."""
  spec = importlib.util.spec_from_file_location('tiny', repo_root / 'configs' / 'tiny.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.corpus = corpus_dir
  config = _config(config)
  root = str(tmp_path_factory.mktemp('reference') / 'bucket')
  aggregator_lib.init_run(config, root, run_id='multihost')
  worker = threading.Thread(target=silo_lib.run_silo,
                            args=(config, 'a', root, root + '-silo'), daemon=True)
  worker.start()
  aggregator_lib.run_aggregator(root)
  worker.join(timeout=300)
  return config, storage_lib.RunStorage(root)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class TwoHostSilo:
  """Silo 'a' as two processes of one jax.distributed job, plus the aggregator process."""

  def __init__(self, repo_root, config, root, workdir):
    self.repo_root, self.root, self.workdir = repo_root, root, workdir
    config_file = str(repo_root / 'configs' / 'tiny.py')
    self.overrides = [f'--config={config_file}',
                      *simulation.config_overrides(config, config_file)]
    subprocess.run([sys.executable, str(repo_root / 'scripts' / 'init_run.py'),
                    f'--storage={root}', '--run_id=multihost', *self.overrides],
                   check=True, capture_output=True, timeout=300)
    self.aggregator = subprocess.Popen(
        [sys.executable, str(repo_root / 'scripts' / 'aggregate.py'), f'--storage={root}'],
        stdout=open(os.path.join(workdir, 'aggregator.log'), 'ab'), stderr=subprocess.STDOUT)

  def start_hosts(self, crash_at=(None, None)) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for process_id, crash in enumerate(crash_at):
      env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': os.environ['XLA_FLAGS'].replace(
          'device_count=8', 'device_count=4')}  # The suite's other XLA flags stay.
      env.pop(faults.ENV_VAR, None)
      if crash:
        env[faults.ENV_VAR] = crash
      argv = [sys.executable, str(self.repo_root / 'scripts' / 'train.py'), *self.overrides,
              '--silo=a', f'--storage={self.root}', f'--workdir={self.workdir}/silo',
              '--config.distributed.mode=explicit',
              f'--config.distributed.coordinator_address=127.0.0.1:{port}',
              '--config.distributed.num_processes=2',
              f'--config.distributed.process_id={process_id}']
      log = open(os.path.join(self.workdir, f'host{process_id}.log'), 'ab')
      procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs

  def wait(self, procs, timeout=300) -> list[int]:
    deadline = time.time() + timeout
    codes = []
    for proc in procs:
      try:
        codes.append(proc.wait(timeout=max(deadline - time.time(), 1)))
      except subprocess.TimeoutExpired:
        for p in procs:
          p.kill()
        pytest.fail(f'hosts did not finish in {timeout}s:\n{self.logs()}')
    return codes

  def logs(self) -> str:
    out = []
    for name in ('host0', 'host1', 'aggregator'):
      with open(os.path.join(self.workdir, f'{name}.log'), errors='replace') as f:
        out.append(f'--- {name}\n' + f.read()[-2500:])
    return '\n'.join(out)

  def close(self):
    try:
      self.aggregator.wait(timeout=120)
    finally:
      self.aggregator.kill()

  def private_meta(self) -> dict:
    ckpt = checkpoint_lib.Checkpointer(os.path.join(self.workdir, 'silo', 'checkpoints'), keep=2)
    try:
      return ckpt.read_meta(ckpt.latest_step())
    finally:
      ckpt.close()


def _delta_payload(store, round_index):
  meta = store.delta_meta(round_index, 'a')
  return meta, {name: store.read_delta_leaf(round_index, 'a', name, leaf['payload'])
                for name, leaf in meta['tree'].items()}


def _assert_matches_reference(store, reference_store):
  # Gloo sums gradients across processes in another order than XLA does within one:
  # measured differences are <= 2.7e-6 after rounds of 48 steps (losses equal to 1e-7).
  for r in range(ROUNDS):
    meta, payload = _delta_payload(store, r)
    ref_meta, ref_payload = _delta_payload(reference_store, r)
    assert meta['tokens'] == ref_meta['tokens'] == INNER_STEPS * 16 * 64
    np.testing.assert_allclose(meta['train_loss'], ref_meta['train_loss'], rtol=1e-5)
    np.testing.assert_allclose(meta['global_eval_loss'], ref_meta['global_eval_loss'], rtol=1e-5)
    for name, leaf in ref_payload.items():
      for key, value in leaf.items():
        np.testing.assert_allclose(payload[name][key], value, rtol=1e-4, atol=1e-5,
                                   err_msg=f'round {r} delta {name}/{key}')
  final, ref_final = global_params(store, ROUNDS), global_params(reference_store, ROUNDS)
  for name, value in ref_final.items():
    np.testing.assert_allclose(final[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
  assert store.read_manifest(ROUNDS - 1)['included'][0]['silo'] == 'a'


@pytest.mark.slow
def test_two_hosts_equal_one_host_through_sigterm(reference, repo_root, tmp_path):
  """A notice to one host checkpoints both; the resumed silo ends as one host would.
  (kill -9 and a resume from the periodic checkpoint: test_fragments, test_overlap.)"""
  config, reference_store = reference
  run = TwoHostSilo(repo_root, config, str(tmp_path / 'bucket'), str(tmp_path))
  try:
    # Only host 1 gets the notice, half-way through round 0: both checkpoint one step, exit 75.
    codes = run.wait(run.start_hosts(crash_at=(None, 'silo_inner@0:SIGTERM')))
    assert codes == [errors.PREEMPTED_EXIT_CODE] * 2, run.logs()
    progress = run.private_meta()
    assert (progress['phase'], progress['round']) == ('training', 0), progress
    assert INNER_STEPS // 2 < progress['steps_done'] < INNER_STEPS
    assert f'checkpointed round 0 after {progress["steps_done"]} inner steps' in run.logs()
    # Both hosts resume mid-round 0 and finish.
    assert run.wait(run.start_hosts()) == [0, 0], run.logs()
    assert f'resumed in round 0 (training, {progress["steps_done"]} inner' in run.logs()
  finally:
    run.close()
  store = storage_lib.RunStorage(str(tmp_path / 'bucket'))
  _assert_matches_reference(store, reference_store)
  # Only process 0 wrote the run's JSON: one eval record per round, from host 0.
  assert sorted(ledger.eval_losses(store, store.read_run(), 0)) == ['a']


@pytest.mark.parametrize(('settings', 'field'), [
    (dict(mode='explicit', coordinator_address='localhost'), 'coordinator_address'),
    (dict(mode='explicit', coordinator_address='10.0.0.2:8476', num_processes=2, process_id=2),
     'process_id'),
    (dict(mode='mpi'), 'distributed.mode'),
])
def test_bad_distributed_settings_name_the_field_before_starting(tiny_config, settings, field):
  tiny_config.distributed.update(**settings)
  with pytest.raises(config_lib.ConfigError, match=field):
    sharding.maybe_initialize_distributed(tiny_config.distributed)


def test_auto_mode_outside_a_cluster_is_one_line_naming_the_fix(repo_root, tmp_path):
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}
  for var in [v for v in env if v.startswith(('SLURM_', 'OMPI_', 'TPU_'))]:
    env.pop(var)
  result = subprocess.run(
      [sys.executable, str(repo_root / 'scripts' / 'train.py'),
       f'--config={repo_root / "configs" / "tiny.py"}', f'--workdir={tmp_path}',
       '--config.distributed.mode=auto'],
      env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  error = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(error) == 1 and 'jax.distributed could not start' in error[0], result.stderr[-2000:]
  assert 'mode=explicit' in error[0] and 'Traceback' not in result.stderr


def test_a_host_that_cannot_start_stops_every_host_in_one_line(reference, repo_root, tmp_path):
  """Host 1's corpus is missing: it exits 2 naming it, and host 0 exits 2 naming host 1."""
  config, _ = reference
  run = TwoHostSilo(repo_root, config, str(tmp_path / 'bucket'), str(tmp_path))
  try:
    port = _free_port()
    procs = []
    for process_id in range(2):
      env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': os.environ['XLA_FLAGS'].replace(
          'device_count=8', 'device_count=4')}  # The suite's other XLA flags stay.
      corpus = config.data.corpus if process_id == 0 else str(tmp_path / 'no_corpus')
      argv = [sys.executable, str(repo_root / 'scripts' / 'train.py'), *run.overrides,
              f'--config.data.corpus={corpus}', '--silo=a', f'--storage={run.root}',
              f'--workdir={tmp_path}/silo', '--config.distributed.mode=explicit',
              f'--config.distributed.coordinator_address=127.0.0.1:{port}',
              '--config.distributed.num_processes=2',
              f'--config.distributed.process_id={process_id}']
      procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True))
    started = time.monotonic()
    outputs = [p.communicate(timeout=120) for p in procs]
    assert time.monotonic() - started < 90  # Not JAX's ~100 s "another task died" abort.
    errors = [[line for line in err.splitlines() if line.startswith('error:')]
              for _, err in outputs]
    assert [p.returncode for p in procs] == [2, 2], outputs
    assert 'data.corpus' in errors[1][0] and 'no_corpus' in errors[1][0], errors
    assert 'another host of this silo could not start' in errors[0][0], errors
    assert 'process 1' in errors[0][0] and 'no_corpus' in errors[0][0], errors
  finally:
    run.aggregator.kill()
    run.aggregator.wait()
