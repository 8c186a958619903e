"""gs:// against a real GCS-protocol server: outages, deleted objects, operator mistakes.

The server (fake-gcs-server) runs as its own process and is stopped and restarted
by the tests, keeping its data, like a storage outage. The end-to-end run of
separate processes through gs:// is tests/test_simulation.py.
"""
import subprocess
import sys
import tempfile
import threading

import pytest

import bucket_helpers
from fedpt import aggregator as aggregator_lib
from fedpt import faults
from fedpt import protocol
from fedpt import signing
from fedpt import silo as silo_lib
from fedpt import storage as storage_lib

SILOS = ('a', 'b', 'c')


@pytest.fixture
def fed_config(tiny_config):
  tiny_config.train.async_checkpoints = False  # Silos are threads of this process here.
  tiny_config.federation.update(rounds=2, inner_steps=3, silos=SILOS, poll_s=0.05,
                                wait_timeout_s=180.0)
  return tiny_config


def _snapshot(root: str) -> dict:
  """Every object under `root` with its bytes: what 'changes nothing' compares."""
  store = storage_lib.RunStorage(root)
  if not store.exists(store.root):
    return {}
  return {str(p): p.read_bytes() for p in bucket_helpers.files(store.root)}


def _run_federation(config, root, keys=None):
  """Silos as threads, the aggregator in this thread; returns the final global hash."""
  results, errors = {}, []

  def silo(silo_id):
    try:
      with tempfile.TemporaryDirectory() as workdir:
        results[silo_id] = silo_lib.run_silo(config, silo_id, root, workdir, keys_dir=keys)
    except Exception as e:  # pylint: disable=broad-except
      errors.append((silo_id, e))

  threads = [threading.Thread(target=silo, args=(s,)) for s in SILOS]
  for t in threads:
    t.start()
  aggregator_lib.run_aggregator(root, keys_dir=keys)
  for t in threads:
    t.join(timeout=300)
  assert not errors, errors
  assert all(results[s]['round'] == config.federation.rounds for s in SILOS)
  return storage_lib.RunStorage(root).global_hash(config.federation.rounds)


def test_outages_and_a_deleted_object_mid_round(fed_config, gcs_server, gcs_bucket):
  """The server dies as a silo starts uploading and again mid-aggregation; both resume.

  In round 1 an object of one silo's payload is deleted after its upload, before its
  commit: that torn delta is rejected, never aggregated, and the run still finishes.
  """
  root = f'{gcs_bucket}/run'
  aggregator_lib.init_run(fed_config, root)
  store = storage_lib.RunStorage(root)
  outages, victims = [], []

  def outage():
    outages.append(threading.current_thread().name)
    gcs_server.stop()
    threading.Timer(3.0, gcs_server.start).start()

  def delete_an_object():
    uploaded = [s for s in SILOS if store.exists(store.delta_dir(1, s) / 'payload')
                and not store.exists(store.delta_dir(1, s) / storage_lib.META)]
    objects = [p for p in bucket_helpers.files(store.delta_dir(1, uploaded[0]) / 'payload')
               if p.parent.name == 'd']  # Array chunks (OCDBT data files).
    max(objects, key=lambda p: len(p.read_bytes())).unlink()
    victims.append(uploaded[0])

  hooks = [('silo_upload_begin', 0, outage),  # Mid-upload of a delta.
           ('aggregate_upload', 0, outage),  # Global arrays written, their meta.json not yet.
           ('silo_upload', 1, delete_an_object)]
  for point, round_index, hook in hooks:
    faults.set_hook(point, round_index, hook)
  try:
    final_hash = _run_federation(fed_config, root)
  finally:
    for point, round_index, _ in hooks:
      faults.set_hook(point, round_index, None)
  assert len(outages) == 2 and len(victims) == 1
  manifest = store.read_manifest(0)
  assert [e['silo'] for e in manifest['included']] == list(SILOS) and not manifest['rejected']
  manifest = store.read_manifest(1)
  assert [e['silo'] for e in manifest['rejected']] == victims
  assert 'unreadable' in manifest['rejected'][0]['reason']
  assert sorted(e['silo'] for e in manifest['included']) == sorted(set(SILOS) - set(victims))
  assert final_hash is not None and store.global_shard_metas(2)[0]['contributors'] == sorted(
      set(SILOS) - set(victims))


def test_operator_mistakes_fail_clearly_and_change_nothing(fed_config, gcs_bucket, tmp_path,
                                                           repo_root, monkeypatch):
  root = f'{gcs_bucket}/run'
  keys = str(tmp_path / 'keys')
  signing.generate_named(keys, ['aggregator', *(f'silo_{s}' for s in SILOS)])

  # A missing bucket, for every kind of party.
  missing = 'gs://no-such-bucket-fedpt/run'
  for call in (lambda: aggregator_lib.init_run(fed_config, missing),
               lambda: aggregator_lib.Aggregator(missing),
               lambda: silo_lib.run_silo(fed_config, 'a', missing, str(tmp_path / 'x'))):
    with pytest.raises(storage_lib.StorageError, match='bucket gs://no-such-bucket-fedpt does '
                       'not exist.*Fix'):
      call()
  result = subprocess.run(
      [sys.executable, str(repo_root / 'scripts' / 'status.py'), f'--storage={missing}'],
      capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 2 and 'does not exist' in result.stderr, result.stderr
  assert 'Traceback' not in result.stderr

  # Unusable credentials.
  bad_credentials = tmp_path / 'credentials.json'
  bad_credentials.write_text('{"type": "service_account"}')
  with monkeypatch.context() as m:
    m.setenv('GOOGLE_APPLICATION_CREDENTIALS', str(bad_credentials))
    with pytest.raises(storage_lib.StorageError, match='GOOGLE_APPLICATION_CREDENTIALS.*Fix'):
      aggregator_lib.init_run(fed_config, root, keys_dir=keys)
  assert not _snapshot(root)

  aggregator_lib.init_run(fed_config, root, keys_dir=keys)
  before = _snapshot(root)
  assert before

  # The root already holds a run.
  with pytest.raises(storage_lib.StorageError, match='holds a run.*Fix'):
    aggregator_lib.init_run(fed_config, root, keys_dir=keys)
  # A silo id that is not in run.json.
  with pytest.raises(protocol.RunMismatchError, match="silo 'zz' is not in this run"):
    silo_lib.run_silo(fed_config, 'zz', root, str(tmp_path / 'zz'), keys_dir=keys)
  # A silo that trusts another run's aggregator (the root holds a different run).
  other = str(tmp_path / 'other')
  signing.generate_named(other, ['aggregator', 'silo_a'])
  with pytest.raises(signing.KeyFileError, match='different aggregator key'):
    silo_lib.run_silo(fed_config, 'a', root, str(tmp_path / 'a'), keys_dir=other)
  # A signed run joined without keys.
  with pytest.raises(signing.KeyFileError, match='pass --keys'):
    silo_lib.run_silo(fed_config, 'a', root, str(tmp_path / 'a'))
  assert _snapshot(root) == before

  # Two aggregators on one run: the second is refused while the first holds the lease.
  store = storage_lib.RunStorage(root)
  first_error = []

  def first():
    try:
      aggregator_lib.run_aggregator(root, keys_dir=keys)
    except storage_lib.WaitTimeout as e:
      first_error.append(e)

  agg_thread = threading.Thread(target=first)
  original_wait = storage_lib.wait_for

  def short_wait(check, what, timeout_s, poll_s=0.5, max_poll_s=None, **kwargs):
    """The first aggregator gives up waiting for deltas after 6 s, not the run's 180 s."""
    return original_wait(check, what, min(timeout_s, 6.0), poll_s, max_poll_s, **kwargs)

  monkeypatch.setattr(storage_lib, 'wait_for', short_wait)
  agg_thread.start()
  lease_path = store.lease_path('aggregator_000')
  storage_lib.wait_for(lambda: store.read_json(lease_path), 'the first lease', 30, 0.1)
  with pytest.raises(storage_lib.LeaseHeldError, match='another aggregator.*Fix'):
    aggregator_lib.run_aggregator(root, keys_dir=keys)
  agg_thread.join(timeout=60)
  assert first_error, 'the first aggregator should have timed out waiting for deltas'
  assert store.read_json(lease_path) is None  # Released on the way out.
  assert _snapshot(root) == before
