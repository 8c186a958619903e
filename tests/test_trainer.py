"""The sharded silo trainer: shardings, mesh equivalence, exact resume, learning, bad input."""
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import conftest
from fedpt import checkpoint as checkpoint_lib
from fedpt import config as config_lib
from fedpt import data as data_lib
from fedpt import errors
from fedpt import inspection
from fedpt import loading
from fedpt import sharding
from fedpt import trainer as trainer_lib

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2)]


def _with_mesh(config, mesh):
  config.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  return config


@pytest.mark.gpu
@conftest.needs_devices(8)
@pytest.mark.parametrize('mesh', MESHES)
def test_params_are_sharded_as_the_rules_say(tiny_config, mesh):
  trainer = trainer_lib.Trainer(_with_mesh(tiny_config, mesh))
  state = trainer.init_state()
  data, fsdp, tensor = mesh
  m = tiny_config.model
  layers = m.n_layers

  def shard_shape(x):
    return x.addressable_shards[0].data.shape

  params = state['params']
  assert shard_shape(params['embed_vd']) == (m.vocab_size // tensor, m.d_model // fsdp)
  assert shard_shape(params['blocks']['mlp']['gate_weight_df']) == (
      layers, m.d_model // fsdp, m.d_ff // tensor)
  assert shard_shape(params['blocks']['mlp']['down_weight_fd']) == (
      layers, m.d_ff // tensor, m.d_model // fsdp)
  assert shard_shape(params['blocks']['attn']['q_weight_dnh']) == (
      layers, m.d_model // fsdp, m.n_heads // tensor, m.head_dim)
  assert shard_shape(params['blocks']['attn']['k_weight_dkh']) == (
      layers, m.d_model // fsdp, m.n_kv_heads // tensor, m.head_dim)
  assert shard_shape(params['final_norm']['scale']) == (m.d_model,)
  # Adam moments follow their parameters.
  mu = state['opt_state'][1][0].mu
  assert mu['blocks']['mlp']['gate_weight_df'].sharding == (
      params['blocks']['mlp']['gate_weight_df'].sharding)
  batch = trainer.batch(0)
  assert batch.shape == (tiny_config.data.global_batch, tiny_config.data.seq_len + 1)
  assert shard_shape(batch)[0] == tiny_config.data.global_batch // (data * fsdp)
  assert len({d.id for d in batch.sharding.device_set}) == 8


def _one_step(config, devices):
  trainer = trainer_lib.Trainer(config, devices=devices)
  state = trainer.init_state()
  state, metrics = trainer.train_step(state, trainer.batch(0))
  return float(metrics['train_loss']), jax.device_get(state['params'])


@pytest.mark.gpu
@conftest.needs_devices(8)
def test_one_step_matches_single_device_on_every_mesh(tiny_config):
  single = tiny_config.copy_and_resolve_references()
  single.mesh.update(data=1, fsdp=1, tensor=1)
  ref_loss, ref_params = _one_step(single, jax.devices()[:1])
  for mesh in MESHES:
    loss, params = _one_step(_with_mesh(tiny_config.copy_and_resolve_references(), mesh), None)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, err_msg=str(mesh))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6,
                                                         err_msg=str(mesh)),
                 params, ref_params)


@pytest.mark.gpu
@conftest.needs_devices(8)
def test_gradient_accumulation_matches_full_batch(tiny_config):
  _with_mesh(tiny_config, (2, 2, 2))
  loss_full, params_full = _one_step(tiny_config.copy_and_resolve_references(), None)
  tiny_config.inner.grad_accum = 2
  loss_acc, params_acc = _one_step(tiny_config, None)
  np.testing.assert_allclose(loss_acc, loss_full, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               params_acc, params_full)


def _final_params(workdir, config):
  trainer = trainer_lib.Trainer(config)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=3)
  step = ckpt.latest_step()
  state, _ = ckpt.restore(step, trainer.abstract_state(), {})
  ckpt.close()
  return step, jax.device_get(state['params'])


def _assert_bitwise_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow
@pytest.mark.gpu
def test_resume_is_bit_exact(tiny_config, tmp_path):
  tiny_config.train.update(steps=20, checkpoint_every=100, log_every=5, eval_every=10)
  stopped_and_resumed(tiny_config, tmp_path, 10)


def stopped_and_resumed(config, tmp_path, stop_at: int):
  """(resumed state, uninterrupted state) of a run stopped at `stop_at`; asserts them equal."""
  straight = trainer_lib.train_and_evaluate(config, str(tmp_path / 'straight'))
  first = trainer_lib.train_and_evaluate(config, str(tmp_path / 'split'), stop_at_step=stop_at)
  assert first['step'] == stop_at and not first['preempted']
  second = trainer_lib.train_and_evaluate(config, str(tmp_path / 'split'))
  assert second['start_step'] == stop_at and second['step'] == config.train.steps
  a, b = jax.device_get(second['state']), jax.device_get(straight['state'])
  assert jax.tree.structure(a) == jax.tree.structure(b)
  _assert_bitwise_equal(a, b)
  return a, b
  records = [json.loads(l) for l in open(tmp_path / 'split' / 'metrics.jsonl')]
  assert [r['step'] for r in records] == [5, 10, 15, 20]
  assert {'train_loss', 'tokens_per_s', 'lr'} <= set(records[0])
  assert 'eval_loss' in records[1] and 'eval_loss' not in records[0]
  assert np.isfinite(records[-1]['eval_loss'])


def _write_config_override_file(tmp_path, config):
  path = tmp_path / 'cfg.json'
  path.write_text(config.to_json())
  return path


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_resume_is_bit_exact(tiny_config, tmp_path, repo_root):
  """Ctrl-C is a preemption (SIGTERM's path): checkpoint, one line, exit 75.

  `train.py --workdir` alone then resumes with the recorded config.
  """
  tiny_config.train.update(steps=40, checkpoint_every=1000, log_every=2, eval_every=1000)
  tiny_config.data.update(seq_len=32, global_batch=8)
  straight = trainer_lib.train_and_evaluate(tiny_config, str(tmp_path / 'straight'))
  workdir = tmp_path / 'preempted'
  train = [sys.executable, str(repo_root / 'scripts' / 'train.py'), f'--workdir={workdir}']
  cmd = train + [f'--config={repo_root / "configs" / "tiny.py"}',
                 f'--config.data.corpus={tiny_config.data.corpus}',
                 '--config.data.seq_len=32', '--config.data.global_batch=8',
                 '--config.train.steps=40', '--config.train.checkpoint_every=1000',
                 '--config.train.log_every=2', '--config.train.eval_every=1000']
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics_file = workdir / 'metrics.jsonl'
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics_file.exists() and metrics_file.read_text().count('\n') >= 2:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=240)
  assert proc.returncode == errors.PREEMPTED_EXIT_CODE, out
  assert 'SIGINT: checkpointed step' in out and 'Traceback' not in out, out
  stopped_at, _ = _final_params(str(workdir), tiny_config)
  assert 0 < stopped_at < 40, out
  proc = subprocess.run(train, capture_output=True, text=True, timeout=300)  # The record's config.
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert f'resumed from step {stopped_at}' in proc.stdout
  final_step, params = _final_params(str(workdir), tiny_config)
  assert final_step == 40
  _assert_bitwise_equal(params, jax.device_get(straight['state']['params']))


def test_a_resume_keeps_the_recorded_config_unless_a_change_is_allowed(tiny_config, tmp_path):
  tiny_config.train.update(steps=4, checkpoint_every=2, log_every=2, eval_every=100,
                           async_checkpoints=False)
  tiny_config.data.update(global_batch=8, seq_len=32)
  workdir = str(tmp_path)
  trainer_lib.train_and_evaluate(tiny_config, workdir, stop_at_step=2)
  record = json.loads((tmp_path / 'config.json').read_text())
  assert record == config_lib.flat(tiny_config)

  changed = tiny_config.copy_and_resolve_references()
  changed.inner.lr, changed.data.seq_len = 5e-2, 16
  with pytest.raises(config_lib.RecordedConfigError) as err:
    trainer_lib.train_and_evaluate(changed, workdir)
  assert ('data.seq_len=16 (yours) vs 32 (recorded), inner.lr=0.05 (yours) vs 0.003 (recorded)'
          in str(err.value)), err.value
  assert f'{tmp_path}/config.json' in str(err.value) and '--allow_config_change' in str(err.value)
  assert '\n' not in str(err.value)

  # On the command line the record wins over the config file's defaults (seq_len 64, 100
  # steps); only typed fields count, and cadence ones may change.
  from_file = conftest.load_config('tiny', tiny_config.data.corpus)
  from_file.train.log_every = 1
  config, _, diff = trainer_lib.resume_config(from_file, workdir, typed={'train.log_every'})
  assert diff == {} and config.data.seq_len == 32 and config.train.steps == 4
  assert config.train.log_every == 1
  assert config_lib.flat(trainer_lib.resume_config(None, workdir)[0]) == record

  # Allowed: the run is extended to 6 steps from step 2 on, and the change is recorded.
  longer = tiny_config.copy_and_resolve_references()
  longer.train.update(steps=6, log_every=1)
  summary = trainer_lib.train_and_evaluate(longer, workdir, allow_config_change=True)
  assert summary['start_step'] == 2 and summary['step'] == 6
  record = json.loads((tmp_path / 'config.json').read_text())
  assert record['train.steps'] == 6 and record['train.log_every'] == 1
  [change] = record['config_changes']
  age = datetime.datetime.now(datetime.timezone.utc) - datetime.datetime.fromisoformat(
      change['date'])
  assert change['step'] == 2 and 0 <= age.total_seconds() < 600
  assert change['changes'] == {'train.steps': {'from': 4, 'to': 6}}
  logged = [json.loads(l)['step'] for l in open(tmp_path / 'metrics.jsonl')]
  assert logged == [2, 3, 4, 5, 6]
  assert inspection.describe(loading.Source(workdir=workdir))['config_changes'] == [change]

  # A workdir of an older fedpt (no config.json) takes --config, and records it.
  (tmp_path / 'config.json').unlink()
  with pytest.raises(config_lib.RecordedConfigError, match='--config is required'):
    trainer_lib.resume_config(None, workdir)
  assert trainer_lib.resume_config(longer, workdir) == (longer, None, {})


@pytest.mark.slow
@pytest.mark.gpu
def test_tiny_config_learns_real_text(tiny_config, tmp_path):
  tiny_config.train.update(steps=100, eval_every=100, log_every=10)
  trainer = trainer_lib.Trainer(tiny_config)
  initial = trainer.evaluate(trainer.init_state()['params'])
  summary = trainer_lib.train_and_evaluate(tiny_config, str(tmp_path))
  assert initial > 7.5  # ~ln(4096) for an untrained model.
  # 100 steps see ~100K tokens: train loss falls by >2 nats, held-out by >1 nat.
  assert summary['train_loss'] < initial - 2.0, (initial, summary)
  assert summary['eval_loss'] < initial - 1.0, (initial, summary)


def test_tensorboard_events_hold_the_logged_losses_once_after_a_resume(tiny_config, tmp_path,
                                                                        capsys):
  from tensorboard.backend.event_processing import event_accumulator
  tiny_config.train.update(steps=4, log_every=1, eval_every=4, checkpoint_every=2,
                           async_checkpoints=False)
  trainer_lib.train_and_evaluate(tiny_config, str(tmp_path))
  first = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  out = capsys.readouterr().out
  # Compilation is said, and never counted in a rate: step 1 has none.
  assert 'compiling the train step (' in out and 'the first train step took' in out, out
  assert 'tok/s from the next step on (this one compiled)' in out, out
  assert 'tokens_per_s' not in first[0] and first[1]['tokens_per_s'] > 0, first
  # The run is resumed from step 2 (as after a crash that lost the newer checkpoint): the
  # rows and events of steps 3 and 4 are replaced, not repeated, in the same TensorBoard run.
  shutil.rmtree(tmp_path / 'checkpoints' / '4')
  summary = trainer_lib.train_and_evaluate(tiny_config, str(tmp_path))
  assert summary['start_step'] == 2
  records = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert [r['step'] for r in records] == [1, 2, 3, 4]
  assert records[:2] == first[:2]
  assert len(os.listdir(tmp_path / 'tensorboard')) == 2  # One run: a file per start.
  acc = event_accumulator.EventAccumulator(str(tmp_path / 'tensorboard'))
  acc.Reload()
  train = [(e.step, e.value) for e in acc.Scalars('train_loss')]
  assert [s for s, _ in train] == [1, 2, 3, 4]
  np.testing.assert_allclose([v for _, v in train], [r['train_loss'] for r in records],
                             rtol=1e-6)
  assert [e.step for e in acc.Scalars('eval_loss')] == [4]


# -- bad input ------------------------------------------------------------------------------


def test_typo_in_config_field_names_the_closest_field(tiny_config):
  tiny_config.inner.unlock()
  tiny_config.inner.lrr = 1e-3
  with pytest.raises(config_lib.ConfigError, match=r"inner.lrr.*did you mean 'inner.lr'"):
    sharding.validate_config(tiny_config, num_devices=8)


@pytest.mark.parametrize('overrides, field', [
    ({'mesh.data': 3, 'mesh.fsdp': 1, 'mesh.tensor': 1}, 'mesh'),
    ({'mesh.data': -1, 'mesh.fsdp': -1}, 'mesh'),
    ({'data.global_batch': 12}, 'data.global_batch'),
    ({'model.n_kv_heads': 3}, 'model.n_kv_heads'),
    ({'mesh.data': 1, 'mesh.fsdp': 1, 'mesh.tensor': 8}, 'model.n_heads'),
    ({'inner.grad_accum': 3}, 'inner.grad_accum'),
    ({'model.remat': 'some'}, 'model.remat'),
    ({'model.compute_dtype': 'fp8'}, 'model.compute_dtype'),
])
def test_impossible_configs_name_the_field(tiny_config, overrides, field):
  for key, value in overrides.items():
    section, name = key.split('.')
    tiny_config[section][name] = value
  with pytest.raises(config_lib.ConfigError) as err:
    sharding.validate_config(tiny_config, num_devices=8)
  assert err.value.field == field
  assert 'Fix:' in str(err.value)


@pytest.mark.parametrize('field, value, problem', [
    ('inner.b2', 1.0, r'must be in \[0, 1\)'), ('outer.momentum', 1.5, r'must be in \[0, 1\)'),
    ('federation.poll_s', 0.001, r'must be in \[0.01, 600\]'), ('seed', -3, 'must be in'),
    ('model.norm_eps', 0.0, r'must be in \(0, 1\]'), ('train.eval_batches', 0, 'must be in'),
    ('outer.lr', float('nan'), 'must be a finite number, got nan'),
    ('model.rope_theta', float('inf'), 'must be a finite number'),
    ('federation.rounds', True, 'must be an integer, got True'),
    ('inner.lr', '1e-3', "must be a finite number, got '1e-3'"),
    ('federation.error_feedback', 1, 'must be True or False'),
    ('federation.silo_weights', (1.0, float('nan')), 'weight nan is not a finite number >= 0'),
])
def test_every_field_has_a_type_and_a_range(tiny_config, field, value, problem):
  section, _, name = field.rpartition('.')
  node = tiny_config[section] if section else tiny_config
  with node.ignore_type():
    node[name] = value
  with pytest.raises(config_lib.ConfigError, match=f'{field}.: {problem}.*Fix') as err:
    config_lib.validate(tiny_config)
  assert err.value.field == field


def test_every_range_in_the_table_is_enforced():
  for field, (ok, what), _ in config_lib.RANGES:
    bad = next(v for v in (-1, 0, 2**40) if not ok(v))
    config = config_lib.base_config()
    section, _, name = field.rpartition('.')
    with config.ignore_type():
      (config[section] if section else config)[name] = bad
    with pytest.raises(config_lib.ConfigError, match=field) as err:
      config_lib.validate(config)
    assert err.value.field == field and what in str(err.value)


def test_missing_corpus_is_a_clear_error(tiny_config, tmp_path):
  tiny_config.data.corpus = str(tmp_path / 'nowhere')
  with pytest.raises(data_lib.DataError, match='data.corpus'):
    trainer_lib.Trainer(tiny_config)


def test_tokenizer_that_does_not_match_the_shards(tiny_config, tmp_path):
  other = data_lib.train_tokenizer(data_lib.stdlib_documents('all')[:30],
                                   str(tmp_path / 'other'), vocab_size=600)
  tiny_config.data.tokenizer = other
  with pytest.raises(data_lib.DataError, match='tokenizer'):
    trainer_lib.Trainer(tiny_config)


def test_workdir_with_another_model_shape_is_refused(tiny_config, tmp_path):
  tiny_config.train.update(steps=2, checkpoint_every=2, log_every=2, eval_every=2)
  trainer_lib.train_and_evaluate(tiny_config, str(tmp_path))
  tiny_config.model.d_model = 128
  with pytest.raises(config_lib.RecordedConfigError, match='model.d_model=128 .yours. vs 64'):
    trainer_lib.train_and_evaluate(tiny_config, str(tmp_path))
  # Allowing config changes does not make the checkpoint fit another model.
  with pytest.raises(checkpoint_lib.CheckpointError, match='model_spec.*fresh --workdir'):
    trainer_lib.train_and_evaluate(tiny_config, str(tmp_path), allow_config_change=True)
  # The old checkpoint is untouched.
  assert checkpoint_lib.Checkpointer(str(tmp_path / 'checkpoints'), keep=3).latest_step() == 2


@pytest.mark.parametrize('args, expected', [
    (['--config.inner.lrr=1'], 'lrr'),
    (['--config.data.corpus=/nonexistent/corpus'], 'data.corpus'),
    (['--config.mesh.data=3'], "config field 'mesh'"),
])
def test_cli_reports_bad_input_without_a_traceback(repo_root, tmp_path, args, expected):
  cmd = [sys.executable, str(repo_root / 'scripts' / 'train.py'),
         f'--config={repo_root / "configs" / "tiny.py"}', f'--workdir={tmp_path}'] + args
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  out = proc.stdout + proc.stderr
  assert proc.returncode != 0
  assert expected in out, out
  assert 'Traceback' not in out, out
