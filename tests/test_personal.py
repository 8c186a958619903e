"""Personalisation and per-silo private parameters: kill -9 safety, privacy, loading, errors.

One reference federation (2 silos, 2 rounds, H=2, private 'embed_vd', 4 personal steps)
runs in threads and serves every test; the kill -9 test reruns it with silo 'a' as a real
process killed mid-round and mid-personalisation.
"""
import os
import signal
import subprocess
import sys
import threading

from etils import epath
import jax
import numpy as np
import pytest

import bucket_helpers
from test_privacy import scan_bucket
from fedpt import aggregator as aggregator_lib
from fedpt import faults
from fedpt import loading
from fedpt import personal
from fedpt import protocol
from fedpt import silo as silo_lib
from fedpt import storage as storage_lib
from fedpt import trainer as trainer_lib
from fedpt import trees

import conftest

SILOS = ('a', 'b')
PRIVATE = ('embed_vd',)  # Tied embeddings: the input embedding and the output head.
OVERRIDES = {  # What the kill -9 run types on its command lines, too.
    'federation.rounds': 2, 'federation.inner_steps': 2, 'federation.silos': SILOS,
    'federation.poll_s': 0.05, 'federation.wait_timeout_s': 300.0,
    'federation.compression': 'none', 'federation.private_params': PRIVATE,
    'personal.steps': 4, 'personal.lr': 3e-3, 'personal.warmup_steps': 1,
    'train.checkpoint_every': 2, 'train.eval_batches': 1,
    'train.async_checkpoints': False,  # Threads: Orbax's async saves are per process; and a
}                                      # kill after step 3 finds step 2 saved, deterministically.


def _config(corpus_dir):
  config = conftest.load_config('tiny', corpus_dir)
  for field, value in OVERRIDES.items():
    section, name = field.split('.')
    config[section][name] = value
  return config


def _run(config, root, workdir, process_silos=(), crashes=(), repo_root=None):
  """Silos in threads (or `process_silos` as scripts/train.py, crashing at `crashes` in turn)."""
  results, failures = {}, []

  def thread(silo):
    try:
      results[silo] = silo_lib.run_silo(config.copy_and_resolve_references(), silo, root,
                                        f'{workdir}/{silo}')
    except BaseException as e:  # pylint: disable=broad-except
      failures.append((silo, e))

  def process(silo):
    argv = [sys.executable, str(repo_root / 'scripts' / 'train.py'),
            f'--config={repo_root / "configs" / "tiny.py"}', f'--silo={silo}',
            f'--storage={root}', f'--workdir={workdir}/{silo}',
            f'--config.data.corpus={config.data.corpus}']
    argv += [f'--config.{k}={v!r}' if isinstance(v, tuple) else f'--config.{k}={v}'
             for k, v in OVERRIDES.items()]
    pending, killed, log = list(crashes), [], ''
    while True:
      env = dict(os.environ)
      if pending:
        env[faults.ENV_VAR] = pending[0]
      proc = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=300)
      log += proc.stdout
      if proc.returncode == -signal.SIGKILL and pending:
        killed.append(pending.pop(0))
        continue
      results[silo] = (proc.returncode, log, killed)
      return

  workers = [threading.Thread(target=process if s in process_silos else thread, args=(s,))
             for s in SILOS]
  for w in workers:
    w.start()
  aggregator_lib.run_aggregator(root)
  for w in workers:
    w.join(timeout=300)
  assert not failures, failures
  return results


@pytest.fixture(scope='module')
def reference(corpus_dir, tmp_path_factory):
  tmp = tmp_path_factory.mktemp('personal')
  config = _config(corpus_dir)
  root, workdir = str(tmp / 'bucket'), str(tmp / 'silos')
  aggregator_lib.init_run(config, root, run_id='personal')
  results = _run(config, root, workdir)
  return config, root, workdir, results


def _personal_params(config, workdir):
  source = loading.Source(workdir=personal.personal_workdir(workdir))
  return trees.flatten_params(jax.device_get(
      loading.load(loading.source_config(workdir=source.workdir), source).params))


def _private_params(trainer, workdir):
  """The silo's train-state params from its newest private checkpoint (own private leaves)."""
  source = loading.Source(workdir=workdir)
  return trees.flatten_params(jax.device_get(loading.load(
      trainer.config, source, train_state=trainer.abstract_state()).params))


def test_personal_model_loads_from_its_workdir_and_beats_the_global_model(reference):
  config, root, workdir, results = reference
  for silo in SILOS:
    summary = results[silo]['personal']
    assert summary['steps'] == 4 and summary['round'] == 2 and not summary['skipped']
    assert summary['data_offset'] == 2 * 2  # After the silo's rounds x H batches.
    trainer = trainer_lib.Trainer(protocol.federated_config(config),
                                  data_seed=protocol.silo_data_seed(config.seed, silo))
    own = f'{workdir}/{silo}'
    mine = loading.load(loading.source_config(workdir=f'{own}/personal'),
                        loading.Source(workdir=f'{own}/personal'),
                        train_state=trainer.abstract_state())
    assert mine.source == f'{own}/personal step 4'
    shared = loading.load(config, loading.Source(storage=root),
                          train_state=trainer.abstract_state())
    personal_loss, global_loss = (trainer.evaluate(m.params) for m in (mine, shared))
    assert personal_loss == pytest.approx(summary['eval_loss'], rel=1e-5)
    assert personal_loss < global_loss - 0.05, (silo, personal_loss, global_loss)
    assert summary['global_eval_loss'] < global_loss  # Its own private embedding helps too.
  # A rerun does nothing.
  again = silo_lib.personalize(None, 'a', root, f'{workdir}/a', typed=set())
  assert again['skipped'] and again['eval_loss'] == results['a']['personal']['eval_loss']


def test_private_leaves_never_reach_the_bucket_and_stay_per_silo(reference):
  config, root, workdir, _ = reference
  store = storage_lib.RunStorage(root)
  g0, g2 = (bucket_helpers.global_params(store, r) for r in (0, 2))
  np.testing.assert_array_equal(g2['embed_vd'], g0['embed_vd'])  # Kept at init.
  assert not np.allclose(g2['final_norm/scale'], g0['final_norm/scale'])  # Shared ones move.
  for r in range(2):
    for silo in SILOS:
      meta = store.delta_meta(r, silo)
      assert 'embed_vd' not in meta['tree'] and 'final_norm/scale' in meta['tree']
  trainer = trainer_lib.Trainer(protocol.federated_config(config))
  own = {s: _private_params(trainer, f'{workdir}/{s}') for s in SILOS}
  assert not np.allclose(own['a']['embed_vd'], own['b']['embed_vd'])
  for s in SILOS:  # Each silo's final state: the shared leaves are the global model's.
    np.testing.assert_array_equal(own[s]['final_norm/scale'], g2['final_norm/scale'])
  scan = scan_bucket(epath.Path(root))
  for s in SILOS:
    private = own[s]['embed_vd']
    delta = (g0['embed_vd'] - private).astype(np.float32)  # What a leaked delta would hold.
    for name, values in (('value', private), ('delta', delta)):
      rows = np.ascontiguousarray(values[5:7]).tobytes()  # Two rows: 512 distinctive bytes.
      assert scan.find_bytes(rows) == [], (s, name)
  # Positive control: the scan finds arrays where the bucket holds them (the kept init embed).
  assert scan.find_bytes(np.ascontiguousarray(g2['embed_vd'][5:7]).tobytes())
  payloads = {d: sorted(arrays) for d, arrays in scan.orbax_dirs.items()
              if d.endswith('/payload')}
  assert len(payloads) == 4 and all('final_norm/scale/values' in names
                                    for names in payloads.values()), payloads
  assert not any(n.startswith('embed_vd') for names in payloads.values() for n in names)


@pytest.mark.slow
def test_kill_9_mid_round_and_mid_personalisation_resumes_bit_identically(
    reference, corpus_dir, tmp_path, repo_root):
  config, ref_root, ref_workdir, _ = reference
  root, workdir = str(tmp_path / 'bucket'), str(tmp_path / 'silos')
  aggregator_lib.init_run(config, root, run_id='personal')
  results = _run(config, root, workdir, process_silos=('a',), repo_root=repo_root,
                 crashes=('silo_inner@1', 'silo_personal@3'))
  code, log, killed = results['a']
  assert code == 0, log[-3000:]
  assert killed == ['silo_inner@1', 'silo_personal@3']
  assert 'resumed in round 0 (published' in log, log[-3000:]  # Redoes round 1.
  assert 'personal phase resumed at step 2 of 4' in log, log[-3000:]
  assert storage_lib.RunStorage(root).global_hash(2) == storage_lib.RunStorage(
      ref_root).global_hash(2)
  trainer = trainer_lib.Trainer(protocol.federated_config(config))
  for silo in SILOS:
    for read in (_personal_params, lambda c, w: _private_params(trainer, w)):
      got, want = read(config, f'{workdir}/{silo}'), read(config, f'{ref_workdir}/{silo}')
      assert sorted(got) == sorted(want)
      for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=f'{silo} {name}')


@pytest.mark.parametrize('patterns,problem', [
    ("('nothing*',)", "'nothing*' matches no parameter of the model"),
    ("('*',)", 'makes every parameter private: nothing would be averaged')])
def test_bad_private_patterns_are_one_line_exit_2(patterns, problem, corpus_dir, tmp_path,
                                                   repo_root):
  proc = subprocess.run(
      [sys.executable, str(repo_root / 'scripts' / 'init_run.py'),
       f'--config={repo_root / "configs" / "tiny.py"}', f'--storage={tmp_path / "bucket"}',
       f'--config.data.corpus={corpus_dir}', f'--config.federation.private_params={patterns}'],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.count('\n') == 1 and 'federation.private_params' in proc.stderr
  assert problem in proc.stderr and 'Fix:' in proc.stderr
  assert not (tmp_path / 'bucket' / 'run.json').exists()
