"""Resume and integrity: what the bucket and a silo's own state may never silently lose."""
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest

import bucket_helpers
import conftest
from fedpt import aggregator as aggregator_lib
from fedpt import checkpoint as checkpoint_lib
from fedpt import errors
from fedpt import faults
from fedpt import ledger
from fedpt import loading
from fedpt import metrics as metrics_lib
from fedpt import silo as silo_lib
from fedpt import storage as storage_lib
from fedpt import trainer as trainer_lib
from fedpt import trees


@pytest.fixture(autouse=True)
def _no_leftover_hooks():
  yield
  faults.clear()


@pytest.fixture
def fed_config(tiny_config):
  tiny_config.train.async_checkpoints = False
  tiny_config.data.update(global_batch=8, seq_len=32)
  tiny_config.train.eval_batches = 1
  tiny_config.federation.update(rounds=2, inner_steps=2, silos=('a', 'b'), poll_s=0.05,
                                wait_timeout_s=60.0)
  return tiny_config


def test_a_silo_refuses_to_publish_a_non_finite_model(fed_config, tmp_path, monkeypatch):
  """NaN in a leaf the loss never touches (an unused embedding row) is still refused."""
  fed_config.model.update(vocab_size=4160, tie_embeddings=False)  # Rows >= 4096 are unused.
  root = str(tmp_path / 'bucket')
  aggregator_lib.init_run(fed_config, root)
  real_step = trainer_lib.Trainer.train_step

  def poisoned_step(self, state, batch):
    state, metrics = real_step(self, state, batch)
    params = dict(state['params'])
    params['embed_vd'] = params['embed_vd'].at[4100, 3].set(jnp.nan)
    return {**state, 'params': params}, metrics
  monkeypatch.setattr(trainer_lib.Trainer, 'train_step', poisoned_step)
  with pytest.raises(trainer_lib.TrainingDivergedError,
                     match=r"round 0: the local model has NaN or Inf in \['embed_vd'\].*Fix"):
    silo_lib.run_silo(fed_config, 'a', root, str(tmp_path / 'a'))
  assert storage_lib.RunStorage(root).committed_silos(0) == []


def _bucket_files(root):
  return {str(p): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in pathlib.Path(root).rglob('*') if p.is_file()}


def _run_rounds(config, root, rounds, gc):
  """Rounds of fake deltas, each aggregated by a fresh process per shard (a restart each time)."""
  fed = config.federation
  fed.update(keep_last_rounds=2 if gc else 100, keep_every_rounds=0)
  run = aggregator_lib.init_run(config, root)
  store = storage_lib.RunStorage(root)
  for r in range(rounds):
    for s, scale in (('a', 0.01), ('b', 0.03)):
      store.publish_delta(r, s, *bucket_helpers.fake_delta(store, run, r, s, fed, scale * (r + 1)))
    for shard in range(fed.num_shards):
      assert aggregator_lib.Aggregator(root, shard).next_round() == r
      aggregator_lib.run_aggregator(root, shard, stop_after_rounds=1)
  return store


def test_a_restarted_aggregator_resumes_after_garbage_collection(fed_config, tmp_path):
  fed_config.federation.update(rounds=4, num_shards=2)
  store = _run_rounds(fed_config, str(tmp_path / 'gc'), 4, gc=True)
  # Rounds 0..1 were collected before round 3 was aggregated by restarted processes.
  assert store.global_round_dirs() == [3, 4]
  reference = _run_rounds(fed_config, str(tmp_path / 'kept'), 4, gc=False)
  assert reference.global_round_dirs() == [0, 1, 2, 3, 4]
  assert store.global_hash(4) == reference.global_hash(4)  # Bit-identical to no collection.

  # A finished run: every shard says so, exits cleanly, and writes nothing (not even a lease).
  before = _bucket_files(tmp_path / 'gc')
  for shard in range(2):
    assert aggregator_lib.run_aggregator(str(tmp_path / 'gc'), shard) == {
        'round': 4, 'finished': True}
  assert silo_lib.run_silo(fed_config, 'a', str(tmp_path / 'gc'),
                           str(tmp_path / 'late_silo'))['finished']
  assert _bucket_files(tmp_path / 'gc') == before
  assert not (tmp_path / 'late_silo' / 'checkpoints').exists() or not any(
      (tmp_path / 'late_silo' / 'checkpoints').iterdir())


@pytest.mark.parametrize('item', ['params', 'outer_state'])
def test_the_aggregator_refuses_its_own_tampered_output(fed_config, tmp_path, item):
  """A valid Orbax tree with one value off by 1e-3, meta.json untouched: nothing is built on it."""
  fed_config.outer.optimizer = 'diloco'  # Momentum: the outer state is not all zeros.
  fed_config.federation.update(rounds=4)
  root = str(tmp_path / 'bucket')
  store = _run_rounds(fed_config, root, 2, gc=False)
  run = store.read_run()
  for s in ('a', 'b'):
    store.publish_delta(2, s, *bucket_helpers.fake_delta(store, run, 2, s,
                                                         fed_config.federation, 0.02))
  agg = aggregator_lib.Aggregator(root)
  params, state, _, _ = agg.read_shard(2)
  arrays = params if item == 'params' else aggregator_lib.state_to_arrays(state)
  name = sorted(arrays)[-1]
  arrays = {n: np.asarray(v) + (1e-3 if n == name else 0.0) for n, v in arrays.items()}
  store._save_tree(store.shard_dir(2, 0, 1) / item, trees.unflatten_params(arrays))  # pylint: disable=protected-access
  what = 'parameter' if item == 'params' else 'outer-optimizer state'
  with pytest.raises(storage_lib.StorageError,
                     match=f'global round 2 shard 0 .*{what} {name} does not match its committed '
                     'hash.*tampered.*Fix'):
    aggregator_lib.run_aggregator(root, stop_after_rounds=1)
  assert store.read_manifest(2) is None and store.latest_global_round() == 2


# -- a silo's own state and its own path --------------------------------------------------


def _only_in(thread_name, point, round_index, action):
  """Arms `point` so that `action` runs in that thread only (others re-arm it and pass)."""
  def hook():
    if threading.current_thread().name != thread_name:
      faults.set_hook(point, round_index, hook)
    else:
      action()
  faults.set_hook(point, round_index, hook)


class _Killed(Exception):
  """A silo process dying at a chosen point (kill -9 leaves no private checkpoint behind)."""


def _federation(config, root, workdir, silos=None, aggregate=True):
  """Silo threads (and the aggregator in this thread); returns the silos' summaries."""
  results, threads = {}, []
  for silo in silos or config.federation.silos:
    def work(silo=silo):
      results[silo] = silo_lib.run_silo(config, silo, root, f'{workdir}/{silo}')
    threads.append(threading.Thread(target=work, name=f'silo-{silo}', daemon=True))
    threads[-1].start()
  if aggregate:
    aggregator_lib.run_aggregator(root)
  return results, threads


def _wait(condition, what, timeout_s=120.0):
  deadline = time.monotonic() + timeout_s
  while not condition():
    assert time.monotonic() < deadline, f'timed out waiting for {what}'
    time.sleep(0.05)


@pytest.fixture(scope='module')
def clean_run(corpus_dir, tmp_path_factory):
  """The uninterrupted run every faulty run below must reproduce bit for bit, and its config."""
  config = conftest.load_config('tiny', corpus_dir)
  config.data.update(global_batch=8, seq_len=32)
  config.train.update(async_checkpoints=False, eval_batches=1)
  config.federation.update(rounds=3, inner_steps=2, silos=('a', 'b'), poll_s=0.05,
                           wait_timeout_s=60.0, compression='int8', error_feedback=True)
  tmp = tmp_path_factory.mktemp('clean')
  aggregator_lib.init_run(config, str(tmp / 'bucket'))
  _, threads = _federation(config, str(tmp / 'bucket'), str(tmp / 'work'))
  for t in threads:
    t.join(timeout=300)
  return config, storage_lib.RunStorage(str(tmp / 'bucket'))


@pytest.fixture
def bucket(clean_run, tmp_path):
  """(config, the clean run's store, a new run's root, a workdir, its store) for a faulty run."""
  config, clean = clean_run
  root = str(tmp_path / 'bucket')
  aggregator_lib.init_run(config, root)
  return config, clean, root, str(tmp_path / 'work'), storage_lib.RunStorage(root)


def _kill_silo_a_after_commit(bucket, round_index):
  """Runs the aggregator and silo b; silo a dies right after committing `round_index`."""
  fed_config, _, root, workdir, _ = bucket
  aggregator = threading.Thread(target=aggregator_lib.run_aggregator, args=(root,), daemon=True)
  aggregator.start()
  _, threads = _federation(fed_config, root, workdir, silos=['b'], aggregate=False)

  def die():
    raise _Killed()
  _only_in('MainThread', 'silo_published', round_index, die)
  with pytest.raises(_Killed):
    silo_lib.run_silo(fed_config, 'a', root, f'{workdir}/a')
  return aggregator, threads


def test_a_silo_stopped_between_commit_and_checkpoint_redoes_the_round(bucket, capsys):
  """The 'published' checkpoint is taken before the commit, but an async save can still be
  lost with the process: then the private state predates the committed delta."""
  fed_config, clean_run, root, workdir, store = bucket
  aggregator, threads = _kill_silo_a_after_commit(bucket, 1)
  ckpt = checkpoint_lib.Checkpointer(f'{workdir}/a/checkpoints', keep=50, async_save=False,
                                     clean_up=False)
  newest = ckpt.latest_step()
  assert ckpt.read_meta(newest)['phase'] == 'published' and ckpt.read_meta(newest)['round'] == 1
  ckpt.close()
  shutil.rmtree(f'{workdir}/a/checkpoints/{newest}')  # Its save never finished.
  _wait(lambda: store.latest_global_round() == 2, 'global round 2, built with a\'s delta')
  summary = silo_lib.run_silo(fed_config, 'a', root, f'{workdir}/a')
  aggregator.join(timeout=300)
  for t in threads:
    t.join(timeout=300)
  out = capsys.readouterr().out
  assert 'round 1: its delta is already committed but the private state predates it' in out
  assert 'round 1: the committed delta is the one rebuilt here' in out
  assert summary['round'] == 3 and [r['round'] for r in summary['rounds']] == [1, 2]
  for r in range(4):
    assert store.global_hash(r) == clean_run.global_hash(r), r


def _plant_replay(store):
  """Copies silo a's committed round-0 delta to its round-1 path: a replayed object."""
  shutil.copytree(str(store.delta_dir(0, 'a')), str(store.delta_dir(1, 'a')))


def test_a_vanished_delta_is_republished_and_a_foreign_one_replaced_while_undecided(
    bucket, capsys):
  """Round 0: a's committed delta is deleted before the decision. Round 1: a replay of it
  sits at a's path before a publishes. The run still ends bit-identical to the clean one."""
  fed_config, clean_run, root, workdir, store = bucket
  _only_in('silo-a', 'silo_inner', 1, lambda: _plant_replay(store))
  _, threads = _federation(fed_config, root, workdir, aggregate=False)
  _wait(lambda: store.committed_silos(0) == ['a', 'b'], 'both round-0 deltas')
  store.delete(store.delta_dir(0, 'a') / storage_lib.META)  # Before anyone decided round 0.
  aggregator_lib.run_aggregator(root, stop_after_rounds=1)  # Waits for a's republished delta.
  _wait(lambda: (store.delta_meta(1, 'a') or {}).get('round') == 1
        and 'b' in store.committed_silos(1), 'a\'s own round-1 delta and b\'s')
  aggregator_lib.run_aggregator(root)  # Round 1 was undecided until a replaced the replay.
  for t in threads:
    t.join(timeout=300)
  out = capsys.readouterr().out
  assert 'round 0: its committed delta is gone from the bucket and the round is undecided; ' \
      'publishing its delta again' in out
  assert 'round 1: replacing' in out and 'metadata says round 0 silo \'a\'' in out
  assert [e['silo'] for e in store.read_manifest(0)['included']] == ['a', 'b']
  assert [e['silo'] for e in store.read_manifest(1)['included']] == ['a', 'b']
  for r in range(4):
    assert store.global_hash(r) == clean_run.global_hash(r), r


def test_a_foreign_object_in_a_decided_round_makes_the_silo_skip_it(
    fed_config, tmp_path, capsys):
  fed_config.federation.update(rounds=3)
  root, workdir = str(tmp_path / 'bucket'), str(tmp_path / 'work')
  aggregator_lib.init_run(fed_config, root)
  store = storage_lib.RunStorage(root)

  def plant_and_wait_for_the_decision():
    _plant_replay(store)
    _wait(lambda: store.read_manifest(1) is not None, 'the decision of round 1')
  _only_in('silo-a', 'silo_inner', 1, plant_and_wait_for_the_decision)
  results, threads = _federation(fed_config, root, workdir)
  for t in threads:
    t.join(timeout=300)
  rejected = {e['silo']: e['reason'] for e in store.read_manifest(1)['rejected']}
  assert 'metadata says round 0' in rejected['a']
  out = capsys.readouterr().out
  assert 'round 1: ' in out and 'the round was decided without it; skipping round 1' in out
  assert [r['round'] for r in results['a']['rounds']] == [0, 2] and results['a']['round'] == 3
  assert [e['silo'] for e in store.read_manifest(2)['included']] == ['a', 'b']


# -- damaged private checkpoints -------------------------------------------------------------


def _largest_file(folder):
  return max((p for p in pathlib.Path(folder).rglob('*') if p.is_file()),
             key=lambda p: p.stat().st_size)


def test_a_damaged_newest_checkpoint_is_moved_aside_and_training_resumes(
    tiny_config, tmp_path, capsys):
  tiny_config.train.update(steps=6, checkpoint_every=3, keep_checkpoints=3, log_every=3,
                           eval_every=100, async_checkpoints=False)
  tiny_config.data.update(global_batch=8, seq_len=32)
  reference = trainer_lib.train_and_evaluate(tiny_config, str(tmp_path / 'reference'))
  workdir = tmp_path / 'work'
  trainer_lib.train_and_evaluate(tiny_config, str(workdir))
  victim = _largest_file(workdir / 'checkpoints' / '6' / 'state')
  victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 3])
  # A read-only tool names the step and the older one to use, in one line.
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=r'checkpoint step 6 in .* is unreadable .*Fix: pass --step=3'):
    loading.load(tiny_config, loading.Source(workdir=str(workdir)))
  resumed = trainer_lib.train_and_evaluate(tiny_config, str(workdir))
  err = capsys.readouterr().err
  assert 'checkpoint step 6 in' in err and 'is unreadable' in err
  assert 'moved aside to' in err and 'resuming from step 3' in err
  assert (workdir / 'checkpoints' / '6.unreadable').is_dir()  # Kept, never deleted.
  np.testing.assert_array_equal(  # Steps 4..6 were redone: the same model as never damaged.
      np.asarray(trees.flatten_params(resumed['state']['params'])['embed_vd']),
      np.asarray(trees.flatten_params(reference['state']['params'])['embed_vd']))


def test_a_silo_with_a_damaged_newest_checkpoint_resumes_from_the_one_before(
    bucket, capsys):
  """Killed after committing round 2, its newest checkpoint (round 2's 'published') damaged:
  it goes back to round 1's, redoes round 2 from its base and ends where the clean run ended."""
  fed_config, clean_run, root, workdir, store = bucket
  aggregator, threads = _kill_silo_a_after_commit(bucket, 2)
  private = pathlib.Path(workdir) / 'a' / 'checkpoints'
  newest = max(int(p.name) for p in private.iterdir() if p.name.isdigit())
  (private / str(newest) / 'meta' / 'metadata').write_text('{not json')
  summary = silo_lib.run_silo(fed_config, 'a', root, f'{workdir}/a')
  aggregator.join(timeout=300)
  for t in threads:
    t.join(timeout=300)
  captured = capsys.readouterr()
  assert f'checkpoint step {newest} in' in captured.err and 'moved aside' in captured.err
  assert 'resumed in round 1 (published' in captured.out
  # Round 2 is redone too; whether the aggregator had decided it by then is a race, so the
  # log line to check is the one both orders print.
  assert 'round 2: the committed delta is the one rebuilt here' in captured.out
  assert summary['round'] == 3 and (private / f'{newest}.unreadable').is_dir()
  for r in range(4):
    assert store.global_hash(r) == clean_run.global_hash(r), r


# -- leases --------------------------------------------------------------------------------


def test_a_lease_holder_is_judged_by_its_heartbeat_not_by_anyone_s_clock(tmp_path):
  store = storage_lib.RunStorage(str(tmp_path / 'bucket'))
  path = store.lease_path('aggregator_000')
  # A live holder on another host whose clock runs 120 s ahead: its record keeps changing.
  other = {'id': 'other', 'host': 'elsewhere', 'machine': 'elsewhere/boot/1', 'pid': 1,
           'name': 'aggregator_000', 'ttl_s': 1.0, 'beat': 0,
           'expires_at': time.time() + 120.0}  # What the old lease judged by: ignored now.
  stop = threading.Event()

  def renew():
    while not stop.wait(0.2):
      other['beat'] += 1
      store.write_json(path, other)
  store.write_json(path, other)
  renewer = threading.Thread(target=renew, daemon=True)
  renewer.start()
  with pytest.raises(storage_lib.LeaseHeldError, match='is alive.*Fix'):
    storage_lib.Lease(store, 'aggregator_000', ttl_s=1.0, settle_s=0.1).acquire()
  stop.set()
  renewer.join()
  # It stopped: once its record stays the same for 1.5 ttl on our own clock, we take over,
  # even though its clock-based expiry would still lie 120 s ahead.
  started = time.monotonic()
  lease = storage_lib.Lease(store, 'aggregator_000', ttl_s=1.0, settle_s=0.1).acquire()
  assert 1.4 < time.monotonic() - started < 10
  assert store.read_json(path)['id'] == lease.holder['id']
  lease.release()

  # Same hostname, another container (pid namespace): its pid means nothing here, so it is
  # watched like a remote holder rather than declared dead because that pid is free here.
  twin = dict(other, id='twin', host=lease.holder['host'], machine='twin/boot/2', pid=999999)
  store.write_json(path, twin)
  stop.clear()

  def renew_twin():
    while not stop.wait(0.2):
      twin['beat'] += 1
      store.write_json(path, twin)
  renewer = threading.Thread(target=renew_twin, daemon=True)
  renewer.start()
  with pytest.raises(storage_lib.LeaseHeldError):
    storage_lib.Lease(store, 'aggregator_000', ttl_s=1.0, settle_s=0.1).acquire()
  stop.set()
  renewer.join()


def test_a_replayed_evaluation_record_stops_the_ledger(fed_config, tmp_path):
  fed_config.federation.update(rounds=2)
  root = str(tmp_path / 'bucket')
  store = _run_rounds(fed_config, root, 2, gc=False)
  store.publish_eval(1, 'a', {'round': 1, 'silo': 'a', 'eval_loss': 5.0, 'step': 2})
  store.publish_eval(2, 'a', {'round': 1, 'silo': 'a', 'eval_loss': 0.5, 'step': 4})  # Replay.
  with pytest.raises(storage_lib.StorageError,
                     match=r'eval/silo_a.json: it says run None round 1 .*replayed.*tampered'):
    ledger.status(root)
  store.publish_eval(2, 'a', {'round': 2, 'silo': 'zz', 'eval_loss': 0.5, 'step': 4})
  with pytest.raises(storage_lib.StorageError, match='replayed or moved record'):
    ledger.status(root)
  store.publish_eval(2, 'a', {'round': 2, 'silo': 'a', 'eval_loss': 4.5, 'step': 4})
  assert '4.500' in ledger.status(root)


# -- processes -------------------------------------------------------------------------------


def _children_of(pid):
  out = []
  for entry in pathlib.Path('/proc').iterdir():
    if entry.name.isdigit():
      try:
        fields = (entry / 'stat').read_text().rsplit(')', 1)[1].split()
      except OSError:
        continue
      if int(fields[1]) == pid:
        out.append(int(entry.name))
  return out


def _alive(pid):
  try:
    state = pathlib.Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]
  except OSError:
    return False
  return state != 'Z'


@pytest.mark.parametrize('stop', ['kill -9', 'Ctrl-C'])
def test_the_simulators_children_die_with_it(tmp_path, stop):
  """kill -9 or Ctrl-C of simulate.py: its silos and aggregator get SIGTERM and exit.

  None is orphaned; a Ctrl-C also ends in one line and status 75, a rerun resumes.
  """
  env = conftest.child_env()
  env['JAX_PLATFORMS'] = 'cpu'
  sim = subprocess.Popen(
      [sys.executable, str(conftest.REPO / 'scripts' / 'simulate.py'),
       f'--config={conftest.REPO / "configs" / "tiny.py"}', f'--workdir={tmp_path / "w"}',
       '--config.federation.silos=("web","text")', '--config.federation.rounds=50'],
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
  _wait(lambda: len(_children_of(sim.pid)) == 3 or sim.poll() is not None, 'three children')
  children = _children_of(sim.pid)
  assert len(children) == 3, sim.poll()
  if stop == 'kill -9':
    sim.kill()
    sim.wait()
  else:
    time.sleep(1.0)  # Past starting them: the simulator is watching the bucket.
    sim.send_signal(signal.SIGINT)
    _, err = sim.communicate(timeout=120)
    assert sim.returncode == errors.PREEMPTED_EXIT_CODE and 'Traceback' not in err, err
    assert err.splitlines()[-1] == ('interrupted (Ctrl-C): nothing half-written is kept; rerun '
                                    'the same command to resume'), err
  _wait(lambda: not any(_alive(c) for c in children), 'the orphans to exit', timeout_s=90)


@pytest.mark.parametrize('script, flag', [('init_run.py', '--storage'), ('train.py', '--workdir')])
def test_an_unusable_path_is_one_line_naming_it(script, flag, tmp_path):
  """The OS refuses (here: a file where a folder must be): one line, the path, the fix, exit 2."""
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a folder')
  env = conftest.child_env()
  env['JAX_PLATFORMS'] = 'cpu'
  done = subprocess.run(
      [sys.executable, str(conftest.REPO / 'scripts' / script),
       f'--config={conftest.REPO / "configs" / "tiny.py"}', f'{flag}={blocker}/sub',
       '--config.train.steps=1'], capture_output=True, text=True, env=env, timeout=300)
  assert done.returncode == 2, done.stderr[-2000:]
  lines = [line for line in done.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and 'Traceback' not in done.stderr, done.stderr[-2000:]
  assert 'Not a directory' in lines[0] and str(blocker) in lines[0] and 'Fix:' in lines[0]


def test_a_full_disk_is_one_line_naming_the_path(tmp_path, monkeypatch):
  store = storage_lib.RunStorage(str(tmp_path / 'bucket'))

  def full(*args, **kwargs):
    raise OSError(28, 'No space left on device', str(tmp_path / 'bucket' / 'x.json'))
  monkeypatch.setattr(type(store.root), 'write_text', full)
  with pytest.raises(storage_lib.StorageError,
                     match=r'No space left on device on .*x.json\. Fix: free space where .*bucket'):
    store.write_json(store.root / 'x.json', {'a': 1})
  monkeypatch.undo()
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / 'work'), keep=1, async_save=False)

  def tensorstore_full(*args, **kwargs):
    raise ValueError('Error writing local file "/w/1/state/d/0": [OS error: No space left on '
                     'device] [source locations=...]')
  monkeypatch.setattr(ckpt._manager, 'save', tensorstore_full)  # pylint: disable=protected-access
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=r'saving checkpoint step 1 in .*work: No space left on device\. Fix:'):
    ckpt.save(1, {'x': np.zeros(3)}, {})


@pytest.fixture
def small_disk(tmp_path):
  """A real 6 MB file system (tmpfs): room for one checkpoint of the tiny model, not two."""
  disk = tmp_path / 'disk'
  disk.mkdir()
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=6m', 'tmpfs', str(disk)],
                           capture_output=True, text=True, check=False)
  if mounted.returncode:
    pytest.skip(f'mounting a small tmpfs needs root (CAP_SYS_ADMIN): {mounted.stderr.strip()}')
  yield disk
  subprocess.run(['umount', '-l', str(disk)], check=False)


def _remount(disk, options):
  subprocess.run(['mount', '-o', f'remount,{options}', str(disk)], check=True)


def test_a_full_disk_is_one_line_and_a_rerun_resumes_from_the_last_good_checkpoint(
    small_disk, corpus_dir):
  """The 2nd save fails in Orbax's background threads; it surfaces at the 3rd as one line."""
  workdir, env = small_disk / 'run', conftest.child_env()
  done = subprocess.run(
      [sys.executable, str(conftest.REPO / 'scripts' / 'train.py'),
       f'--config={conftest.REPO / "configs" / "tiny.py"}', f'--workdir={workdir}',
       f'--config.data.corpus={corpus_dir}', '--config.data.seq_len=32',
       '--config.data.global_batch=8', '--config.train.steps=6',
       '--config.train.checkpoint_every=2', '--config.train.log_every=2',
       '--config.train.eval_every=100'], capture_output=True, text=True, env=env, timeout=300)
  lines = [line for line in done.stderr.splitlines() if line.strip()]
  assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
  assert lines[0].startswith(f'error: saving checkpoint step 4 in {workdir}/checkpoints: No '
                             'space left on device. Fix: free space'), lines[0]
  assert lines[0].endswith('The last good checkpoint is step 2: a rerun resumes from it')
  assert 'step 6/6' in done.stdout and 'Traceback' not in done.stdout
  assert checkpoint_lib.last_good_step(str(workdir / 'checkpoints')) == 2  # Step 4 is torn.

  _remount(small_disk, 'size=64m')  # Space is freed: the recorded config resumes from step 2.
  summary = trainer_lib.train_and_evaluate(None, str(workdir), typed=set())
  assert (summary['start_step'], summary['step']) == (2, 6)
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4', '6']  # The torn one is gone.


def test_a_read_only_workdir_is_one_line_naming_the_file_and_the_last_good_checkpoint(
    small_disk, tiny_config):
  tiny_config.train.update(steps=4, checkpoint_every=2, log_every=1, eval_every=100,
                           async_checkpoints=False)
  tiny_config.data.update(global_batch=8, seq_len=32)
  workdir = small_disk / 'run'
  trainer_lib.train_and_evaluate(tiny_config, str(workdir), stop_at_step=2)
  _remount(small_disk, 'ro')
  with pytest.raises(metrics_lib.MetricsError) as err:
    trainer_lib.train_and_evaluate(tiny_config, str(workdir))
  assert str(err.value) == (
      f'writing {workdir}/metrics.jsonl: Read-only file system on {workdir}/metrics.jsonl. Fix: '
      f'{workdir}/metrics.jsonl is on a read-only file system: mount it read-write or use '
      'another path, then rerun. The last good checkpoint is step 2: a rerun resumes from it')
  assert checkpoint_lib.last_good_step(str(workdir / 'checkpoints')) == 2


def test_a_malformed_global_meta_is_named_by_every_reader(bucket, tmp_path):
  """Parties poll global shard metas: junk there is one 'tampered' line, never a TypeError."""
  config, _, root, workdir, store = bucket
  shard = store.global_dir(1) / 'shard_000_of_001'
  shard.mkdir(parents=True)
  store.write_json(shard / 'meta.json', ['not', 'a', 'meta'])
  with pytest.raises(storage_lib.StorageError,
                     match='global round 1 shard 0 .*not a JSON object. The bucket was tampered'):
    store.latest_global_round()
  meta = dict(store.global_shard_metas(0)[0], round=1)
  meta['leaf_shapes'] = dict(meta['leaf_shapes'], embed_vd=[-4, 64])
  store.write_json(shard / 'meta.json', meta)
  with pytest.raises(storage_lib.StorageError, match="describes leaf 'embed_vd' as \\[-4, 64\\]"):
    silo_lib.run_silo(config, 'a', root, f'{workdir}/a')
  with pytest.raises(storage_lib.StorageError, match='tampered'):
    ledger.status(root)
