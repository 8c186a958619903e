"""simulate.py runs a real federation of processes; status.py's ledger matches the bucket."""
import json
import math
import os
import subprocess
import sys

import matplotlib.image
import pytest

import bucket_helpers
import conftest
from fedpt import ledger
from fedpt import protocol
from fedpt import signing
from fedpt import simulation
from fedpt import storage as storage_lib

SILOS = ('web', 'text', 'tools')
ROUNDS, H = 3, 10


def _tiny_file(repo_root):
  return str(repo_root / 'configs' / 'tiny.py')


def _snapshot(folder):
  """Every file under `folder` with its size and modification time."""
  return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob('*')
          if p.is_file()}


def test_config_overrides_round_trip(tiny_config, repo_root):
  tiny_config.federation.silos = SILOS
  tiny_config.federation.poll_s = 0.25
  tiny_config.outer.lr = 0.5
  overrides = simulation.config_overrides(tiny_config, _tiny_file(repo_root))
  assert f'--config.data.corpus={tiny_config.data.corpus}' in overrides
  assert "--config.federation.silos=('web', 'text', 'tools')" in overrides
  assert len(overrides) == 4, overrides


def test_failed_child_names_it_and_shows_its_log(tmp_path):
  children = simulation._Children(str(tmp_path / 'logs'))  # pylint: disable=protected-access
  children.start('silo_x', [sys.executable, '-c', 'import sys; print("boom"); sys.exit(3)'])
  children.start('sleeper', [sys.executable, '-c', 'import time; time.sleep(60)'])
  children.procs['silo_x'].wait()
  with pytest.raises(simulation.SimulationError, match=r'(?s)silo_x exited with status 3.*boom'):
    children.check()
  assert children.procs['sleeper'].poll() is not None  # The others were stopped.


def test_status_of_missing_run_is_one_clear_line(tmp_path, repo_root):
  result = subprocess.run(
      [sys.executable, str(repo_root / 'scripts' / 'status.py'), f'--storage={tmp_path}/none'],
      capture_output=True, text=True, timeout=60, check=False)
  assert result.returncode == 2
  assert 'error: no run at' in result.stderr
  assert 'Traceback' not in result.stderr


@pytest.mark.slow
def test_simulate_end_to_end_through_gcs_and_ledger(tiny_config, repo_root, tmp_path, monkeypatch,
                                                    gcs_bucket):
  """Separate silo and aggregator processes whose only channel is a gs:// bucket."""
  # Children need one CPU device each, not the 8 fake ones of this test process.
  monkeypatch.setenv('XLA_FLAGS', conftest.CHILD_XLA_FLAGS)
  fed = tiny_config.federation
  fed.silos, fed.rounds, fed.inner_steps, fed.poll_s = SILOS, ROUNDS, H, 0.2
  root = f'{gcs_bucket}/run'
  lines = []
  summary = simulation.simulate(tiny_config, _tiny_file(repo_root), root,
                                str(tmp_path / 'work'), log=lines.append)

  records = summary['rounds']
  assert [r['round'] for r in records] == list(range(ROUNDS))
  tokens = len(SILOS) * H * tiny_config.data.global_batch * tiny_config.data.seq_len
  for rec in records:
    assert rec['tokens'] == tokens
    assert rec['bytes'] > 0 and rec['bytes_up'] > 0 and rec['bytes_down'] > 0
    assert sorted(rec['contributors']) == sorted(SILOS)
    assert all(math.isfinite(v) for v in rec['train_loss_by_silo'].values())
    assert math.isfinite(rec['eval_loss']) and len(rec['eval_loss_by_silo']) == len(SILOS)
  assert summary['final_eval_loss'] < summary['initial_eval_loss']
  assert summary['total_tokens'] == ROUNDS * tokens
  assert sorted(summary['final_eval_by_silo']) == sorted(SILOS)
  assert sum(line.startswith('round ') for line in lines) == ROUNDS
  with open(tmp_path / 'work' / 'rounds.jsonl', encoding='utf-8') as f:
    assert [json.loads(line) for line in f] == json.loads(json.dumps(records))
  assert os.path.exists(tmp_path / 'work' / 'logs' / 'silo_web.log')
  for plot in summary['plots']:  # Real, non-empty images.
    image = matplotlib.image.imread(plot)
    assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0.01, plot

  # The ledger is the bucket's metadata, nothing else.
  store = storage_lib.RunStorage(root)
  run = store.read_run()
  rows = ledger.build_ledger(store)
  assert len(rows) == ROUNDS
  for row in rows:
    r = row['round']
    manifest = store.read_manifest(r)
    assert row['contributors'] == [e['silo'] for e in manifest['included']]
    assert row['tokens'] == sum(store.delta_meta(r, s)['tokens'] for s in row['contributors'])
    assert row['bytes_up'] == sum(store.delta_meta(r, s)['bytes'] for s in row['contributors'])
    assert row['global_hash'] == store.global_hash(r + 1)
    assert row['status'] == 'done' and not row['rejected']
    # Honest silos are not flagged as copies or free riders (fedpt/copies.py).
    assert manifest['copy_checks'] == 'on' and manifest['flags'] == {}, manifest['similarity']
    # Signed end to end: every delta by its silo's key, every round by the aggregator's.
    for s in row['contributors']:
      assert signing.check_signature(store.delta_meta(r, s), run['public_keys']['silos'][s]) \
          is None
    assert signing.check_signature(manifest, run['public_keys']['aggregator']) is None
  assert not (tmp_path / 'work' / 'keys' / 'silo_web.key').read_text() in json.dumps(run)
  result = subprocess.run(
      [sys.executable, str(repo_root / 'scripts' / 'status.py'), f'--storage={root}'],
      capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  assert store.global_hash(ROUNDS)[:12] in result.stdout
  as_json = json.loads(ledger.status(root, 'json'))
  assert as_json['rounds'] == json.loads(json.dumps(rows)) and as_json['signed']
  # Per-silo totals are the sums of the round metadata.
  for s in SILOS:
    totals = as_json['silo_totals'][s]
    manifests = [store.read_manifest(r) for r in range(ROUNDS)]
    entries = [e for m in manifests for e in m['included'] if e['silo'] == s]
    assert totals['tokens'] == sum(e['tokens'] for e in entries) == ROUNDS * H * (
        tiny_config.data.global_batch * tiny_config.data.seq_len)
    assert totals['rounds_included'] == ROUNDS and totals['rounds_rejected'] == 0
    assert math.isclose(totals['mean_delta_norm'],
                        sum(e['measured_norm'] for e in entries) / len(entries))
    assert totals['last_eval_loss'] == summary['final_eval_by_silo'][s]
  assert 'per-silo totals' in result.stdout

  # A finished run is recognised, not redone: nothing is started and nothing is written.
  before = _snapshot(tmp_path), sorted(map(str, bucket_helpers.files(store.root)))
  again = simulation.simulate(tiny_config, _tiny_file(repo_root), root, str(tmp_path / 'work'),
                              log=lines.append)
  assert again['finished'] and again['final_eval_by_silo'] == summary['final_eval_by_silo']
  assert f'is finished ({ROUNDS} rounds); nothing to do' in lines[-1], lines[-1]
  assert (_snapshot(tmp_path), sorted(map(str, bucket_helpers.files(store.root)))) == before
  changed = tiny_config.copy_and_resolve_references()
  changed.model.rope_theta = 20_000.0  # Not the run's contract: refused before anything starts.
  with pytest.raises(protocol.RunMismatchError, match=r'model.rope_theta=20000.0 \(yours\)'):
    simulation.simulate(changed, _tiny_file(repo_root), root, str(tmp_path / 'work'),
                        log=lines.append)
  assert (_snapshot(tmp_path), sorted(map(str, bucket_helpers.files(store.root)))) == before

  # Evaluations are signed by their silo: a forged loss stops every reader.
  eval_path = store.round_dir(ROUNDS) / 'eval' / 'silo_web.json'
  forged = store.read_json(eval_path)
  store.write_json(eval_path, dict(forged, eval_loss=0.01))
  with pytest.raises(storage_lib.StorageError, match='silo_web.json: bad signature.*tampered'):
    ledger.status(root)
  store.write_json(eval_path, forged)
  manifest = store.read_manifest(1)
  store.write_json(store.manifest_path(1), dict(manifest, decided_after_s=0.0))
  with pytest.raises(storage_lib.StorageError, match='manifest of round 1 .*bad signature'):
    ledger.status(root)
