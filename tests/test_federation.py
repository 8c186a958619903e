"""Federation through a shared directory: protocol, aggregation decisions, crash safety."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

import bucket_helpers
from fedpt import aggregator as aggregator_lib
from fedpt import checkpoint as checkpoint_lib
from fedpt import compression as compression_lib
from fedpt import config as config_lib
from fedpt import errors
from fedpt import faults
from fedpt import ledger
from fedpt import outer
from fedpt import protocol
from fedpt import silo as silo_lib
from fedpt import storage as storage_lib
from fedpt import trainer as trainer_lib
from fedpt import trees


@pytest.fixture
def fed_config(tiny_config):
  # Silos run as threads of one process in most tests here; Orbax's background saves
  # are per process, so these threads checkpoint synchronously.
  tiny_config.train.async_checkpoints = False
  tiny_config.federation.update(rounds=3, inner_steps=4, silos=('a', 'b', 'c'), poll_s=0.05,
                                wait_timeout_s=120.0)
  tiny_config.outer.optimizer = 'diloco'  # The expected outer steps below are Nesterov's.
  return tiny_config


def _publish_fake_delta(store, run, round_index, silo, fed, scale, tokens=1000, mutate=None,
                        local_fn=None):
  """A real silo delta (compressed, hashed, committed) of `scale * ones` per leaf."""
  store.publish_delta(round_index, silo, *bucket_helpers.fake_delta(
      store, run, round_index, silo, fed, scale, tokens=tokens, local_fn=local_fn,
      mutate=mutate))


# -- in-process protocol tests ------------------------------------------------------------


@pytest.mark.gpu
def test_plain_training_is_the_k1_h1_fedavg_special_case(fed_config, tmp_path):
  fed_config.federation.update(rounds=5, inner_steps=1, silos=('solo',), compression='none')
  fed_config.outer.optimizer = 'fedavg'
  root = str(tmp_path / 'bucket')
  aggregator_lib.init_run(fed_config, root)
  worker = threading.Thread(target=silo_lib.run_silo,
                            args=(fed_config, 'solo', root, str(tmp_path / 'silo')))
  worker.start()
  aggregator_lib.run_aggregator(root)
  worker.join(timeout=300)
  federated = bucket_helpers.global_params(storage_lib.RunStorage(root), 5)

  plain_config = protocol.federated_config(fed_config)
  trainer = trainer_lib.Trainer(plain_config,
                                data_seed=protocol.silo_data_seed(fed_config.seed, 'solo'))
  state = trainer.init_state()
  for step in range(5):
    state, _ = trainer.train_step(state, trainer.batch(step))
  plain = trees.flatten_params(jax.device_get(state['params']))
  assert sorted(plain) == sorted(federated)
  for name in plain:
    np.testing.assert_allclose(federated[name], plain[name], rtol=1e-5, atol=1e-6, err_msg=name)
  assert not np.allclose(federated['embed_vd'], bucket_helpers.global_params(
      storage_lib.RunStorage(root), 0)['embed_vd'])


def test_quorum_deadline_late_and_rejected_deltas(fed_config, tmp_path):
  fed = fed_config.federation
  fed.update(min_silos=2, round_deadline_s=0.5)
  root = str(tmp_path / 'bucket')
  run = aggregator_lib.init_run(fed_config, root)
  store = storage_lib.RunStorage(root)
  agg = aggregator_lib.Aggregator(root)

  _publish_fake_delta(store, run, 0, 'a', fed, 0.01, tokens=1000)
  _publish_fake_delta(store, run, 0, 'b', fed, 0.03, tokens=3000)
  started = time.monotonic()
  manifest = agg.decide(0)  # 'c' straggles: the quorum of 2 suffices after the deadline.
  assert time.monotonic() - started >= 0.5
  assert [e['silo'] for e in manifest['included']] == ['a', 'b']
  assert manifest['missing'] == ['c']
  np.testing.assert_allclose([e['weight'] for e in manifest['included']], [0.25, 0.75])
  agg.aggregate(0, manifest)
  # The straggler arrives after the decision: recorded as late, never aggregated.
  _publish_fake_delta(store, run, 0, 'c', fed, 5.0)

  def nan_leaf(local_flat):
    return dict(local_flat, **{'final_norm/scale': local_flat['final_norm/scale'] * np.nan})

  def flipped_value(payload, meta):  # Tampered after signing its hashes.
    first = next(iter(payload['embed_vd']))  # 'values' (fp32, bf16) or 'q' (int8, int4).
    payload['embed_vd'][first] = -payload['embed_vd'][first]
    return payload, meta

  def wrong_base(payload, meta):
    meta = dict(meta, base_global_hash='0' * 64)
    return payload, meta

  _publish_fake_delta(store, run, 1, 'a', fed, 0.02, local_fn=nan_leaf,  # Claims a sane norm.
                      mutate=lambda p, m: (p, dict(m, delta_norm=0.5)))
  _publish_fake_delta(store, run, 1, 'b', fed, 0.02, mutate=wrong_base)
  _publish_fake_delta(store, run, 1, 'c', fed, 0.02)
  _publish_fake_delta(store, run, 1, 'd', fed, 0.02, mutate=flipped_value)  # Not in run.json.
  manifest = agg.decide(1)
  assert manifest['late_from_previous_round'] == ['c']
  assert [e['silo'] for e in manifest['included']] == ['c']
  reasons = {e['silo']: e['reason'] for e in manifest['rejected']}
  assert 'NaN' in reasons['a'] and 'different global model' in reasons['b']
  assert 'unknown silo' in reasons['d']
  before = bucket_helpers.global_params(store, 1)
  agg.aggregate(1, manifest)
  after = bucket_helpers.global_params(store, 2)
  # Only c's delta (0.02 everywhere) moved the model; DiLoCo Nesterov with momentum from round 0.
  moved = before['embed_vd'] - after['embed_vd']
  assert np.all(moved > 0) and np.ptp(moved) < 1e-5

  _publish_fake_delta(store, run, 2, 'a', fed, 0.02, mutate=flipped_value)
  _publish_fake_delta(store, run, 2, 'b', fed, 0.02)
  _publish_fake_delta(store, run, 2, 'c', fed, 0.02)
  manifest = agg.decide(2)
  assert [e['silo'] for e in manifest['included']] == ['b', 'c']
  assert 'content hash' in manifest['rejected'][0]['reason']
  agg.aggregate(2, manifest)

  # A round with too few silos fails after wait_timeout_s, naming who is missing.
  agg.fed['wait_timeout_s'] = 0.5
  _publish_fake_delta(store, run, 3, 'b', fed, 0.01)
  with pytest.raises(storage_lib.WaitTimeout, match=r"round 3.*missing \['a', 'c'\]"):
    agg.decide(3)


@pytest.mark.gpu
def test_split_aggregation_equals_unsplit(fed_config, tmp_path):
  fed = fed_config.federation
  results = {}
  for num_shards in (1, 3):
    fed.num_shards = num_shards
    root = str(tmp_path / f'bucket{num_shards}')
    run = aggregator_lib.init_run(fed_config, root, run_id='same')
    store = storage_lib.RunStorage(root)
    for r in range(2):
      for k, silo in enumerate(('a', 'b', 'c')):
        _publish_fake_delta(store, run, r, silo, fed, 0.01 * (k + 1) * (r + 1),
                            tokens=100 * (k + 1))
      workers = [threading.Thread(target=aggregator_lib.run_aggregator,
                                  args=(root, shard, num_shards, 1))
                 for shard in range(num_shards)]
      for w in workers:
        w.start()
      for w in workers:
        w.join(timeout=120)
    assert len(store.global_shard_metas(2)) == num_shards
    results[num_shards] = (bucket_helpers.global_params(store, 2), store.global_hash(2))
  (single, single_hash), (split, split_hash) = results[1], results[3]
  assert single_hash == split_hash
  for name in single:
    np.testing.assert_array_equal(single[name], split[name])


def test_garbage_collection_keeps_last_n_and_every_mth_and_status_says_which(fed_config,
                                                                              tmp_path):
  fed = fed_config.federation
  fed.update(rounds=8, keep_last_rounds=2, keep_every_rounds=3, silos=('a', 'b', 'c'))
  root = str(tmp_path / 'bucket')
  run = aggregator_lib.init_run(fed_config, root)
  store = storage_lib.RunStorage(root)
  agg = aggregator_lib.Aggregator(root)
  for r in range(7):
    for silo in ('a', 'b', 'c'):
      _publish_fake_delta(store, run, r, silo, fed, 0.01)
    agg.aggregate(r, agg.decide(r))
    agg.collect_garbage(r + 1)
  kept = sorted(r for r in range(8) if store.global_dir(r).exists())
  assert kept == [0, 3, 6, 7]
  assert all(store.read_manifest(r) is not None for r in range(7))  # The ledger stays.
  assert store.committed_silos(1) == [] and store.committed_silos(6) == ['a', 'b', 'c']
  # status.py: the open round 7 (one delta in, two missing), traffic, the rounds stored.
  _publish_fake_delta(store, run, 7, 'b', fed, 0.01)
  overview = json.loads(ledger.status(root, 'json'))
  assert overview['open_round'] == {'round': 7, 'status': 'collecting', 'published': ['b'],
                                    'waiting_for': ['a', 'c']}
  assert overview['stored_global_rounds'] == [0, 3, 6, 7]
  assert overview['collected_global_rounds'] == [1, 2, 4, 5]
  # The open round's delta is published, not included: the totals count decided rounds.
  assert overview['silo_totals']['b']['rounds_included'] == 7
  assert overview['silo_totals']['b']['tokens'] == overview['silo_totals']['a']['tokens']
  model = ledger.global_nbytes(store, 7)
  assert overview['bytes_down'] == 7 * 3 * model
  assert overview['bytes_up'] == sum(store.delta_meta(7, 'b')['bytes'] for _ in range(22))
  table = ledger.status(root)
  assert 'round 7 is open: published b; waiting for a, c' in table
  assert 'global rounds stored: 0, 3, 6-7 (garbage-collected: 1-2, 4-5)' in table
  assert ledger.ranges([0, 1, 2, 5, 7, 8]) == '0-2, 5, 7-8'


def test_a_silo_takes_the_run_s_contract_and_refuses_typed_contradictions(fed_config, tmp_path,
                                                                         repo_root, capsys):
  """run.json is the truth: a silo's config file gives way, its command line is refused."""
  fed_config.federation.silo_inner_steps = (2, 4, 4)
  root = str(tmp_path / 'bucket')
  run = aggregator_lib.init_run(fed_config, root)
  mine = fed_config.copy_and_resolve_references()  # The silo's own file differs from the run's:
  mine.federation.update(inner_steps=50, silo_inner_steps=(), compression='int4')
  mine.model.norm_eps = 1e-6
  mine.inner.lr = 1e-2
  silo = silo_lib._Silo(mine, 'a', root, str(tmp_path / 'a'), None, typed=set())
  try:
    assert silo.fed.inner_steps == 2 and silo.config.train.steps == 3 * 2
    assert (silo.fed.compression, silo.config.model.norm_eps, silo.config.inner.lr) == (
        'int8', 1e-5, fed_config.inner.lr)
    assert silo.trainer.total_steps == 6
  finally:
    silo.close()
  # The note names what the config file (not the user) said: nothing was typed.
  assert 'federation.inner_steps=50 (config file) vs 2 (run.json)' in capsys.readouterr().out
  # A restart with no config at all: its own fields (here the corpus) from its workdir's record.
  silo = silo_lib._Silo(None, 'a', root, str(tmp_path / 'a'), None, typed=set())
  try:
    assert silo.config.data.corpus == fed_config.data.corpus and silo.fed.inner_steps == 2
  finally:
    silo.close()
  with pytest.raises(protocol.RunMismatchError,
                     match=r'model.norm_eps=1e-06 \(yours\) vs 1e-05 \(run.json\).*Fix'):
    silo_lib.run_silo(mine, 'b', root, str(tmp_path / 'b'), typed={'model.norm_eps'})
  with pytest.raises(protocol.RunMismatchError, match="silo 'zz' is not in this run"):
    silo_lib.run_silo(mine, 'zz', root, str(tmp_path / 'zz'))
  with pytest.raises(protocol.RunMismatchError, match='tokenizer'):
    protocol.check_tokenizer(run, 'f' * 64)
  assert not (tmp_path / 'b').exists() and storage_lib.RunStorage(root).committed_silos(0) == []
  with pytest.raises(storage_lib.StorageError, match='holds a run'):
    aggregator_lib.init_run(fed_config, root)
  # The command line is what the silo typed: one line, exit 2, nothing written.
  proc = subprocess.run(
      [sys.executable, str(repo_root / 'scripts' / 'train.py'),
       f'--config={repo_root / "configs" / "tiny.py"}', f'--storage={root}', '--silo=c',
       f'--workdir={tmp_path / "c"}', f'--config.data.corpus={fed_config.data.corpus}',
       '--config.inner.b2=0.99', "--config.federation.silos=('a','b','c')"],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.count('\n') == 1 and proc.stderr.startswith('error: run ')
  assert 'inner.b2=0.99 (yours) vs 0.95 (run.json)' in proc.stderr
  assert 'federation.silos' not in proc.stderr  # Typed, but the same as the run's.


def test_waits_time_out_with_what_they_wait_for():
  started = time.monotonic()
  with pytest.raises(storage_lib.WaitTimeout, match='waiting for global round 7'):
    storage_lib.wait_for(lambda: None, 'global round 7', timeout_s=0.3, poll_s=0.05)
  assert time.monotonic() - started < 2


# -- real processes: kill -9 anywhere, restart, same final model --------------------------


def _cli_overrides(config):
  fed = config.federation
  silos = ','.join(f"'{s}'" for s in fed.silos)
  return [f'--config.data.corpus={config.data.corpus}',
          f'--config.federation.rounds={fed.rounds}',
          f'--config.federation.inner_steps={fed.inner_steps}',
          f'--config.federation.silos=({silos},)',
          f'--config.federation.poll_s={fed.poll_s}',
          f'--config.federation.wait_timeout_s={fed.wait_timeout_s}',
          f'--config.outer.optimizer={config.outer.optimizer}',
          f'--config.federation.overlap={fed.overlap}',
          f'--config.federation.fragments={fed.fragments}',
          f'--config.federation.keep_last_rounds={fed.keep_last_rounds}',
          f'--config.federation.compression={fed.compression}']


def _run_federation(repo_root, config, root, workdir, crashes=None, keys=None, extra=()):
  """Runs every silo and the aggregator as processes, each crashing at its listed points in turn.

  A process killed by its crash point is restarted exactly as an operator would, with
  the next crash point (or none) in its environment. `keys`: one folder holding every
  party's keys (a signed run); `extra`: more --config overrides for init_run and the silos.
  """
  config_flag = f'--config={repo_root / "configs" / "tiny.py"}'
  overrides = _cli_overrides(config) + list(extra)
  keys_flag = [f'--keys={keys}'] if keys else []
  subprocess.run([sys.executable, str(repo_root / 'scripts' / 'init_run.py'), config_flag,
                  f'--storage={root}', '--run_id=crashtest'] + overrides + keys_flag,
                 check=True, capture_output=True, timeout=300)
  commands = {f'silo_{s}': [sys.executable, str(repo_root / 'scripts' / 'train.py'),
                            config_flag, f'--silo={s}', f'--storage={root}',
                            f'--workdir={workdir}/{s}'] + overrides + keys_flag
              for s in config.federation.silos}
  commands['aggregator'] = [sys.executable, str(repo_root / 'scripts' / 'aggregate.py'),
                            f'--storage={root}'] + keys_flag
  pending = {name: list(points) for name, points in (crashes or {}).items()}
  logs = {}

  def start(name, crash):
    env = dict(os.environ)
    if crash:
      env[faults.ENV_VAR] = crash
    logs[name] = open(f'{workdir}/{name}.log', 'a')
    return subprocess.Popen(commands[name], env=env, stdout=logs[name], stderr=subprocess.STDOUT)

  os.makedirs(workdir, exist_ok=True)
  def next_crash(name):
    return pending[name].pop(0) if pending.get(name) else None

  armed = {name: next_crash(name) for name in commands}
  procs = {name: start(name, armed[name]) for name in commands}
  crashed = []
  deadline = time.time() + 400
  while procs and time.time() < deadline:
    for name, proc in list(procs.items()):
      code = proc.poll()
      if code is None:
        continue
      if code == -signal.SIGKILL and armed[name]:
        crashed.append(armed[name])
        armed[name] = next_crash(name)
        procs[name] = start(name, armed[name])
      else:
        assert code == 0, (name, code, open(f'{workdir}/{name}.log').read()[-3000:])
        del procs[name]
    time.sleep(0.2)
  for proc in procs.values():
    proc.kill()
  assert not procs, f'timed out: {list(procs)}'
  return crashed


def _run_in_threads(config, root, workdir, start_delays=None):
  """Silos as threads of this process, the aggregator in this one."""
  threads = []
  results = {}
  for silo in config.federation.silos:
    def work(silo=silo):
      time.sleep((start_delays or {}).get(silo, 0))
      results[silo] = silo_lib.run_silo(config.copy_and_resolve_references(), silo, root,
                                        f'{workdir}/{silo}')

    threads.append(threading.Thread(target=work, daemon=True))
  for t in threads:
    t.start()
  aggregator_lib.run_aggregator(root)
  for t in threads:
    t.join(timeout=300)
  return results


@pytest.mark.gpu
def test_compression_error_feedback_and_per_silo_steps(fed_config, tmp_path):
  fed = fed_config.federation
  # Silo b runs on slower hardware: half the inner steps (declared in run.json), half the weight.
  fed.update(rounds=2, silos=('a', 'b'), compression='int4', error_feedback=True,
             silo_inner_steps=(4, 2))
  root = str(tmp_path / 'bucket')
  aggregator_lib.init_run(fed_config, root)
  results = _run_in_threads(fed_config, root, str(tmp_path))
  store = storage_lib.RunStorage(root)
  shapes = {n: tuple(s) for m in store.global_shard_metas(0) for n, s in m['leaf_shapes'].items()}
  expected_bytes = sum(compression_lib.compressed_nbytes(s, 'int4') for s in shapes.values())
  dense_bytes = sum(4 * int(np.prod(s)) for s in shapes.values())
  for r in range(2):
    manifest = store.read_manifest(r)
    entries = {e['silo']: e for e in manifest['included']}
    assert entries['a']['bytes'] == entries['b']['bytes'] == expected_bytes
    assert expected_bytes < dense_bytes / 7
    assert entries['a']['tokens'] == 2 * entries['b']['tokens']
    np.testing.assert_allclose([entries['a']['weight'], entries['b']['weight']], [2 / 3, 1 / 3])
  # The error-feedback residual lives in the silo's private checkpoint, never in the bucket.
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / 'a' / 'checkpoints'), keep=2)
  trainer = trainer_lib.Trainer(protocol.federated_config(fed_config))
  abstract = {'train': trainer.abstract_state(),
              'residual': jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, np.float32),
                                       trainer.abstract_state()['params'])}
  private, meta = ckpt.restore(ckpt.latest_step(), abstract, {})
  ckpt.close()
  assert meta['round'] == 2
  residual = trees.flatten_params(jax.device_get(private['residual']))
  assert 0 < np.abs(residual['embed_vd']).max() < 1e-2
  assert results['a']['round'] == 2 and np.isfinite(results['a']['final_eval_loss'])


def test_a_silo_that_joins_late_rebases_onto_the_newest_global(fed_config, tmp_path):
  fed = fed_config.federation
  fed.update(rounds=3, silos=('a', 'b'), min_silos=1, round_deadline_s=0.0)
  root = str(tmp_path / 'bucket')
  aggregator_lib.init_run(fed_config, root)
  store = storage_lib.RunStorage(root)
  agg = aggregator_lib.Aggregator(root)
  results = {}

  def silo(name):
    results[name] = silo_lib.run_silo(fed_config, name, root, str(tmp_path / name))

  threading.Thread(target=silo, args=('a',), daemon=True).start()
  agg.aggregate(0, agg.decide(0))  # b has not started: the quorum of one decides round 0.
  assert store.read_manifest(0)['missing'] == ['b']
  joiner = threading.Thread(target=silo, args=('b',), daemon=True)
  joiner.start()
  for r in (1, 2):  # From now on, wait for both before deciding.
    storage_lib.wait_for(lambda: store.committed_silos(r) == ['a', 'b'] or None,
                         f'both deltas of round {r}', timeout_s=300, poll_s=0.05)
    agg.aggregate(r, agg.decide(r))
  joiner.join(timeout=300)
  assert [r['round'] for r in results['b']['rounds']] == [1, 2]  # Rebased onto global 1.
  assert [e['silo'] for e in store.read_manifest(2)['included']] == ['a', 'b']
  assert results['b']['round'] == 3


def test_wall_clock_budget_ends_a_round_early(fed_config, tmp_path):
  fed_config.federation.update(rounds=1, inner_steps=1000, silos=('a',), round_budget_s=1e-6)
  root = str(tmp_path / 'bucket')
  aggregator_lib.init_run(fed_config, root)
  _run_in_threads(fed_config, root, str(tmp_path))
  entry = storage_lib.RunStorage(root).read_manifest(0)['included'][0]
  d = fed_config.data
  assert entry['steps'] == 1 and entry['tokens'] == d.global_batch * d.seq_len


def test_federation_entry_points_explain_bad_input(fed_config, tmp_path, repo_root):
  root = str(tmp_path / 'bucket')
  aggregator_lib.init_run(fed_config, root)
  scripts = repo_root / 'scripts'
  tiny = f'--config={repo_root / "configs" / "tiny.py"}'
  cases = [
      ([scripts / 'aggregate.py', f'--storage={tmp_path / "nowhere"}'], 'no run at'),
      ([scripts / 'aggregate.py', f'--storage={root}', '--shard=3/2'], 'need 0 <= i < n'),
      ([scripts / 'aggregate.py', f'--storage={root}', '--shard=0/2'], 'aggregated in 1 shards'),
      ([scripts / 'init_run.py', tiny, f'--storage={root}'], 'holds a run'),
      ([scripts / 'train.py', tiny, f'--workdir={tmp_path / "w"}', '--silo=zz',
        f'--storage={root}', f'--config.data.corpus={fed_config.data.corpus}'],
       "silo 'zz' is not in this run"),
  ]
  for argv, expected in cases:
    proc = subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True,
                          timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, (argv, out)
    assert expected in out and 'Fix' in out and 'Traceback' not in out, (argv, out)


@pytest.mark.slow
def test_a_silo_says_in_one_line_why_it_waits_stops_or_has_nothing_to_do(
    fed_config, tmp_path, repo_root):
  """SIGTERM while waiting, a finished run for the aggregator and for a joining silo: a line each."""
  fed_config.federation.update(rounds=1, inner_steps=2, silos=('a',))
  root = str(tmp_path / 'bucket')
  aggregator_lib.init_run(fed_config, root, run_id='lines')
  silo = [sys.executable, str(repo_root / 'scripts' / 'train.py'),
          f'--config={repo_root / "configs" / "tiny.py"}', '--silo=a', f'--storage={root}',
          *_cli_overrides(fed_config)]
  aggregate = [sys.executable, str(repo_root / 'scripts' / 'aggregate.py'), f'--storage={root}']
  proc = subprocess.Popen(silo + [f'--workdir={tmp_path / "a"}'], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, 'FEDPT_WAIT_NOTICE_S': '1'})
  lines = []
  reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
  reader.start()
  waiting = 'silo a: waiting for global round 1 (round 0 has 1/1 deltas; the aggregator has not'
  deadline = time.time() + 180
  while time.time() < deadline and sum(waiting in l for l in lines) < 2:
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == errors.PREEMPTED_EXIT_CODE, ''.join(lines)
  reader.join(timeout=10)
  out = ''.join(lines)
  assert 'silo a: joining run lines (1 silos, 1 rounds of H=2 inner steps' in out, out
  assert f'{waiting} decided yet)\n' in out and f'{waiting} decided yet), 0:00:0' in out, out
  assert lines[-1] == ("silo a: SIGTERM while waiting for global round 1: round 0's delta is "
                       'published and checkpointed; exiting with status 75: rerun the same '
                       'command to resume\n'), out
  assert 'Traceback' not in out

  done = subprocess.run(aggregate, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stdout + done.stderr
  assert done.stdout.splitlines()[-1] == (
      'aggregator 0/1: finished: global round 1, the last, is committed; the ledger: '
      f'scripts/status.py --storage={root}'), done.stdout
  again = subprocess.run(aggregate, capture_output=True, text=True, timeout=300)
  assert (again.returncode, again.stdout.splitlines(), again.stderr) == (0, [
      'aggregator 0/1: run lines is finished (global round 1 is committed); nothing to do'], '')
  late = subprocess.run(silo + [f'--workdir={tmp_path / "late"}'], capture_output=True,
                        text=True, timeout=300)
  assert late.returncode == 0, late.stdout + late.stderr
  assert late.stdout.splitlines()[-1] == (
      'silo a: run lines is finished (global round 1 is committed); nothing to do'), late.stdout
  assert 'Traceback' not in late.stdout + late.stderr


@pytest.mark.parametrize('robust, clip_multiple, reject, expected_mean_delta', [
    ('mean', 0.0, 0.0, (0.01 + 0.02 + 1.0) / 3),  # Plain averaging: the poison dominates.
    ('median', 0.0, 0.0, 0.02),
    ('trimmed_mean', 0.0, 0.0, 0.02),
    ('mean', 2.0, 0.0, (0.01 + 0.02 + 0.04) / 3),  # Clipped to 2 x the median norm (0.02).
    ('mean', 0.0, 10.0, (0.01 + 0.02) / 2),  # The default: 100x beyond the others: rejected.
])
def test_robust_aggregation_bounds_a_poisoned_silo(fed_config, tmp_path, robust, clip_multiple,
                                                    reject, expected_mean_delta):
  fed = fed_config.federation
  fed.update(robust=robust, trim=1, clip_multiple=clip_multiple, reject_norm_multiple=reject)
  root = str(tmp_path / 'bucket')
  run = aggregator_lib.init_run(fed_config, root)
  store = storage_lib.RunStorage(root)
  for silo, scale in (('a', 0.01), ('b', 0.02), ('c', 1.0)):  # c sends a 100x delta.
    _publish_fake_delta(store, run, 0, silo, fed, scale, tokens=1000)
  agg = aggregator_lib.Aggregator(root)
  manifest = agg.decide(0)
  assert manifest['robust']['method'] == robust
  rejected = {e['silo']: e['reason'] for e in manifest['rejected']}
  assert list(rejected) == (['c'] if reject else []), rejected
  assert not reject or 'more than 10x the median' in rejected['c']
  agg.aggregate(0, manifest)
  before = bucket_helpers.global_params(store, 0)
  after = bucket_helpers.global_params(store, 1)
  # DiLoCo's first Nesterov step moves the model by lr * (1 + momentum) * mean delta.
  np.testing.assert_allclose(before['embed_vd'] - after['embed_vd'],
                             0.7 * 1.9 * expected_mean_delta, rtol=2e-3)


def test_random_drop_loses_exactly_the_chosen_deltas(fed_config, tmp_path):
  fed = fed_config.federation
  fed.drop_probability = 0.5
  scales = {'a': 0.01, 'b': 0.02, 'c': 0.04}
  run_id = next(f'drop-{i}' for i in range(100) if 0 < sum(
      outer.randomly_dropped(f'drop-{i}', 0, s, 0.5) for s in scales) < len(scales))
  dropped = [s for s in scales if outer.randomly_dropped(run_id, 0, s, 0.5)]
  root = str(tmp_path / 'bucket')
  run = aggregator_lib.init_run(fed_config, root, run_id=run_id)
  store = storage_lib.RunStorage(root)
  for silo, scale in scales.items():
    _publish_fake_delta(store, run, 0, silo, fed, scale, tokens=1000)
  agg = aggregator_lib.Aggregator(root)
  manifest = agg.decide(0)
  assert [e['silo'] for e in manifest['rejected']] == dropped
  assert all('dropped at random' in e['reason'] for e in manifest['rejected'])
  kept = [s for s in scales if s not in dropped]
  assert [e['silo'] for e in manifest['included']] == kept
  agg.aggregate(0, manifest)
  moved = (bucket_helpers.global_params(store, 0)['embed_vd'] -
           bucket_helpers.global_params(store, 1)['embed_vd'])
  np.testing.assert_allclose(moved, 0.7 * 1.9 * np.mean([scales[s] for s in kept]), rtol=2e-3)


def test_randomly_dropped_is_a_seeded_coin():
  draws = [outer.randomly_dropped('run', r, f's{k}', 0.5) for r in range(100) for k in range(20)]
  assert 0.45 < np.mean(draws) < 0.55
  assert draws == [outer.randomly_dropped('run', r, f's{k}', 0.5)
                   for r in range(100) for k in range(20)]
  assert draws != [outer.randomly_dropped('other', r, f's{k}', 0.5)
                   for r in range(100) for k in range(20)]
  assert not any(outer.randomly_dropped('run', r, 's', 0.0) for r in range(100))
  assert np.mean([outer.randomly_dropped('run', r, 's', 0.1) for r in range(2000)]) < 0.13


def test_drop_probability_is_validated(fed_config, tmp_path):
  fed_config.federation.drop_probability = 1.0
  with pytest.raises(config_lib.ConfigError, match='federation.drop_probability.*lossy'):
    aggregator_lib.init_run(fed_config, str(tmp_path / 'bucket'))


def test_robust_settings_are_validated(fed_config, tmp_path):
  fed_config.federation.update(robust='trimmed_mean', trim=2)  # 3 silos cannot drop 2 + 2.
  with pytest.raises(outer.OuterConfigError, match='federation.trim'):
    aggregator_lib.init_run(fed_config, str(tmp_path / 'bucket'))
  assert not (tmp_path / 'bucket' / 'run.json').exists()


def test_sigterm_mid_round_and_while_waiting_resumes_to_the_identical_model(
    fed_config, tmp_path, capsys):
  """One-process silo: SIGTERM half-way through round 0's inner steps, then after round 1.

  Its metrics.jsonl and TensorBoard hold each step and each round once across the restarts.
  """
  fed_config.federation.update(rounds=2, silos=('a',))
  fed_config.train.log_every = 1
  aggregator_lib.init_run(fed_config, str(tmp_path / 'clean'))
  _run_in_threads(fed_config, str(tmp_path / 'clean'), str(tmp_path / 'w_clean'))

  root, workdir = str(tmp_path / 'bucket'), str(tmp_path / 'a')
  aggregator_lib.init_run(fed_config, root)
  aggregator = threading.Thread(target=aggregator_lib.run_aggregator, args=(root,), daemon=True)
  aggregator.start()

  def progress():
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=2)
    meta = ckpt.read_meta(ckpt.latest_step())
    ckpt.close()
    return meta['phase'], meta['round'], meta.get('steps_done')

  def sigterm():
    os.kill(os.getpid(), signal.SIGTERM)

  faults.set_hook('silo_inner', 0, sigterm)
  assert silo_lib.run_silo(fed_config, 'a', root, workdir)['preempted']
  assert progress() == ('training', 0, 2)
  faults.set_hook('silo_published', 1, sigterm)
  assert silo_lib.run_silo(fed_config, 'a', root, workdir)['preempted']
  assert progress()[:2] == ('published', 1)
  final = silo_lib.run_silo(fed_config, 'a', root, workdir)
  aggregator.join(timeout=120)
  assert not final['preempted'] and final['round'] == 2
  store, clean = storage_lib.RunStorage(root), storage_lib.RunStorage(str(tmp_path / 'clean'))
  assert store.global_hash(2) == clean.global_hash(2) != clean.global_hash(0)
  for r in range(2):
    assert store.delta_meta(r, 'a')['train_loss'] == clean.delta_meta(r, 'a')['train_loss']
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
  out = capsys.readouterr().out
  assert 'silo a: joining run ' in out and 'rounds of H=4 inner steps' in out, out
  assert 'silo a: round 1/2 step 6/8 | loss ' in out, out
  assert 'silo a: compiling the train step (' in out, out
  assert (f"silo a: finished: 2 rounds done, the final global model (round 2) has held-out "
          f"loss {final['final_eval_loss']:.4f} on its own split; checkpoints and metrics in "
          f"{workdir}") in out, out
  assert ('silo a: SIGTERM while waiting for global round 2: round 1\'s delta is published and '
          'checkpointed; exiting with status 75') in out, out
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  steps = [r for r in rows if 'train_loss' in r]
  assert [r['step'] for r in steps] == list(range(1, 9))
  assert [r['round'] for r in steps] == [0] * 4 + [1] * 4
  rounds = [r for r in rows if 'bytes_up' in r]
  assert [(r['step'], r['round']) for r in rounds] == [(4, 0), (8, 1)]
  assert all(type(r['round']) is int for r in rows) and type(rounds[0]['bytes_up']) is int
  model_bytes = ledger.global_nbytes(store, 0)
  for r in range(2):
    assert rounds[r]['bytes_up'] == store.delta_meta(r, 'a')['bytes']
    assert rounds[r]['bytes_down'] == model_bytes  # The round's global model, read once.
    assert rounds[r]['round_train_loss'] == store.delta_meta(r, 'a')['train_loss']
    assert rounds[r]['inner_s'] > 0 and rounds[r]['publish_s'] > 0
  assert rounds[0]['global_eval_loss'] > rounds[1]['global_eval_loss'] > 0
  assert rows[-1] == {'step': 8, 'round': 2, 'global_eval_loss': final['final_eval_loss']}
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(os.path.join(workdir, 'tensorboard'))
  acc.Reload()
  assert [e.step for e in acc.Scalars('train_loss')] == list(range(1, 9))
  assert [e.step for e in acc.Scalars('bytes_up')] == [4, 8]
