"""scripts/plan.py: per-device memory and delta sizes from shapes, checked against real arrays."""
import importlib.util
import json
import math
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from fedpt import aggregator as aggregator_lib
from fedpt import compression
from fedpt import config as config_lib
from fedpt import model as model_lib
from fedpt import planning
from fedpt import trainer as trainer_lib
from fedpt import trees


def _config(repo_root, name):
  spec = importlib.util.spec_from_file_location(f'{name}_config',
                                                repo_root / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _device_bytes(tree, device) -> int:
  return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree)
             for shard in leaf.addressable_shards if shard.device == device)


def test_tiny_plan_matches_hand_count_real_shards_and_real_deltas(tiny_config):
  tiny_config.mesh.update(data=2, fsdp=2, tensor=2)
  info = planning.plan(tiny_config, 8, platform='cpu')
  m, fsdp, tp = tiny_config.model, 2, 2
  d, f, n, k, h, layers = m.d_model, m.d_ff, m.n_heads, m.n_kv_heads, m.head_dim, m.n_layers
  per_layer = ((d // fsdp) * (n // tp) * h * 2  # q and o.
               + (d // fsdp) * (k // tp) * h * 2  # k and v.
               + 3 * (d // fsdp) * (f // tp)  # gate, up, down.
               + 2 * d)  # Norm scales, replicated.
  elements = (m.vocab_size // tp) * (d // fsdp) + layers * per_layer + d  # Tied embedding.
  memory = info['per_device_bytes']
  assert memory['params'] == 4 * elements
  assert memory['grads'] == memory['params'] and memory['grad_accum'] == 0
  param_count = model_lib.param_count(model_lib.ModelConfig.from_config(m, 'cpu'))
  assert info['model']['param_count'] == param_count
  assert 8 * memory['params'] >= 4 * param_count

  # The real Trainer's shards on every device agree with the plan to the byte.
  trainer = trainer_lib.Trainer(tiny_config)
  state = trainer.init_state()
  for device in jax.devices():
    assert _device_bytes(state['params'], device) == memory['params']
    assert _device_bytes(state['opt_state'], device) == memory['opt_state']

  # Delta sizes: what compressing a real delta leaf by leaf publishes.
  delta = jax.tree.map(lambda p: np.asarray(p) * 1e-3 + 1e-4, jax.device_get(state['params']))
  block_size = tiny_config.federation.block_size
  for fmt in compression.FORMATS:
    published = sum(compression.payload_nbytes(compression.compress(leaf, fmt, block_size))
                    for leaf in jax.tree.leaves(delta))
    assert info['delta']['bytes'][fmt] == published, fmt
  assert info['delta']['bytes']['none'] == 4 * param_count
  assert info['delta']['ratio_to_float32']['int4'] < info['delta']['ratio_to_float32']['int8'] < 0.5


@pytest.mark.parametrize('kind', ['scaffold', 'fedprox'])
def test_drift_state_and_round_traffic_are_counted(tiny_config, kind):
  """SCAFFOLD's/FedProx's train-state entry per device, and SCAFFOLD's bytes each way."""
  tiny_config.mesh.update(data=2, fsdp=4, tensor=1)
  tiny_config.inner.drift_correction, tiny_config.inner.prox_mu = kind, 0.01
  tiny_config.federation.private_params = ('embed_vd',)
  info = planning.plan(tiny_config, 8, platform='cpu')
  state = trainer_lib.Trainer(tiny_config, drift_correction=kind).init_state()
  memory = info['per_device_bytes']
  assert memory['drift'] == _device_bytes(state['drift'], jax.devices()[0]) > 0
  plain = planning.plan(_without_drift(tiny_config), 8, platform='cpu')['per_device_bytes']
  assert (memory['total'] - memory['round_state'] == plain['total'] - plain['round_state']
          + memory['drift']) and plain['drift'] == 0
  assert memory['round_state'] - plain['round_state'] == (
      2 * memory['params'] if kind == 'scaffold' else 0)  # c_i, and the one before.
  delta, params = info['delta'], state['params']
  shared = sum(leaf.size for name, leaf in trees.flatten_params(params).items()
               if name != 'embed_vd')
  assert delta['bytes']['none'] == 4 * shared  # The private embedding is not published.
  control = 4 * shared if kind == 'scaffold' else 0
  assert delta['control_bytes'] == control
  assert delta['upload_bytes'] == delta['bytes'][tiny_config.federation.compression] + control
  assert delta['download_bytes'] == 4 * sum(x.size for x in jax.tree.leaves(params)) + control
  text = planning.render(info)
  assert f'drift state ({kind})' in text and "private leaves ['embed_vd']" in text
  assert ('SCAFFOLD control variates' in text) == (kind == 'scaffold')


def _without_drift(config):
  config = config.copy_and_resolve_references()
  config.inner.drift_correction = 'none'
  return config


def test_estimate_is_close_to_xla_buffer_assignment(tiny_config):
  """The estimate against XLA's own numbers for the compiled (not run) train step."""
  tiny_config.mesh.update(data=1, fsdp=4, tensor=2)
  tiny_config.data.update(seq_len=128, global_batch=32)
  tiny_config.inner.grad_accum = 2
  tiny_config.model.remat = 'none'
  info = planning.plan(tiny_config, 8, platform='cpu')
  xla = planning.compiled_memory(tiny_config, jax.devices())
  memory = info['per_device_bytes']
  batch_bytes = 4 * 32 * 129 // 4 + 4  # This device's token rows and the step counter.
  assert xla['arguments'] == memory['params'] + memory['opt_state'] + batch_bytes
  step = memory['total'] - memory['round_state']  # The silo's round copies are not the step's.
  assert 0.8 < step / xla['total'] < 1.5, (memory, xla)


def test_a_silo_s_round_state_is_counted(tiny_config):
  """Base copy always; residuals, the last global (downlink), the prefetched global and the
  eager deltas as a silo's settings add them (fp32 params here: each is one params size)."""
  tiny_config.mesh.update(data=2, fsdp=4, tensor=1)
  fed = tiny_config.federation
  fed.update(compression='none', downlink_compression='none', overlap='none')
  plain = planning.plan(tiny_config, 8, platform='cpu')['per_device_bytes']
  assert plain['round_state'] == plain['params']
  fed.update(compression='int8', error_feedback=True, downlink_compression='int8',
             overlap='eager')
  info = planning.plan(tiny_config, 8, platform='cpu')
  memory = info['per_device_bytes']
  assert memory['round_state'] == 7 * memory['params'] == 7 * plain['params']
  assert memory['total'] - plain['total'] == 6 * plain['params']
  assert 'silo round state' in planning.render(info)


def test_70b_plan_takes_seconds_on_256_devices(repo_root):
  config = _config(repo_root, '70b')
  for mesh in ('fsdp=-1', 'fsdp=32,tensor=8'):
    config.mesh.update(planning.parse_mesh(mesh))
    start = time.perf_counter()
    info = planning.plan(config, 256, platform='gpu', hbm_gib=80)
    assert time.perf_counter() - start < 30
    memory = info['per_device_bytes']
    assert memory['params'] == pytest.approx(70e9 * 4 / 256, rel=0.05)
    norms = (2 * config.model.n_layers + 1) * config.model.d_model  # Replicated scales.
    assert memory['params'] == 4 * ((info['model']['param_count'] - norms) // 256 + norms)
    assert memory['opt_state'] == pytest.approx(2 * memory['params'], rel=1e-3)
    assert memory['grad_accum'] == memory['params']  # grad_accum=2.
    assert 0 < memory['activations'] < 80 * 2**30
    assert info['verdict'] == 'fits' and not info['fixes']
    assert info['delta']['bytes']['int8'] == pytest.approx(0.254 * info['delta']['bytes']['none'],
                                                           rel=0.01)


def test_plan_that_does_not_fit_names_fixes_that_do(repo_root):
  config = _config(repo_root, '1b')
  config.mesh.update(planning.parse_mesh('fsdp=8'))
  info = planning.plan(config, 8, platform='tpu', hbm_gib=16)
  assert info['verdict'] == 'does not fit'
  assert info['fixes'] and all(fix['total_bytes'] <= 0.9 * 16 * 2**30 for fix in info['fixes'])
  assert any('inner.grad_accum' in fix['change'] for fix in info['fixes'])


@pytest.mark.slow
def test_1b_config_shards_and_steps_on_8_devices(repo_root, corpus_dir):
  """Every 1B matrix shape, with a short batch, bfloat16 params and 2 of its 22 layers.

  The layers are one scanned stack, so 2 run the same program as 22 at a tenth of the
  memory and time (all 22 in float32 need about 21 GiB for the 8 fake devices: more than
  a CI machine has beside the suite). The mesh is FSDP x tensor parallel.
  """
  config = _config(repo_root, '1b')
  config.data.update(corpus=corpus_dir, seq_len=8, global_batch=8)
  config.inner.grad_accum = 1
  config.model.param_dtype = 'bfloat16'
  config.mesh.update(data=1, fsdp=2, tensor=4)
  m = config.model
  assert (m.n_layers, m.d_model, m.vocab_size, m.d_ff) == (22, 2048, 32_000, 5_632)
  m.n_layers = 2
  trainer = trainer_lib.Trainer(config)
  state = trainer.init_state()
  params = state['params']

  def shards(x):
    return {shard.data.shape for shard in x.addressable_shards}, len(x.addressable_shards)

  assert shards(params['embed_vd']) == ({(32_000 // 4, 2048 // 2)}, 8)
  assert shards(params['unembed_dv']) == ({(2048 // 2, 32_000 // 4)}, 8)
  assert shards(params['blocks']['mlp']['gate_weight_df']) == ({(2, 1024, 5632 // 4)}, 8)
  assert shards(params['blocks']['mlp']['down_weight_fd']) == ({(2, 5632 // 4, 1024)}, 8)
  assert shards(params['blocks']['attn']['q_weight_dnh']) == ({(2, 1024, 8, 64)}, 8)
  for name in ('embed_vd', 'unembed_dv'):
    assert params[name].addressable_shards[0].data.size * 8 == params[name].size
  info = planning.plan(config, 8, platform='cpu')
  assert _device_bytes(params, jax.devices()[0]) == info['per_device_bytes']['params']

  state, metrics = trainer.train_step(state, trainer.batch(0))
  loss = float(metrics['train_loss'])
  assert np.isfinite(loss) and abs(loss - math.log(32_000)) < 1.0, loss
  assert int(state['step']) == 1


def _plan_cli(repo_root, *args):
  return subprocess.run([sys.executable, str(repo_root / 'scripts' / 'plan.py'), *args],
                        capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.slow
def test_cli_table_json_and_one_line_errors(repo_root):
  table = _plan_cli(repo_root, f'--config={repo_root / "configs" / "1b.py"}', '--mesh=fsdp=8')
  assert table.returncode == 0, table.stderr
  for text in ('on 8 gpu devices, mesh data=1,fsdp=8,tensor=1', 'parameters', 'optimizer state',
               'activations (estimate)', 'peak total', 'HBM', 'int4'):
    assert text in table.stdout, text

  as_json = _plan_cli(repo_root, f'--config={repo_root / "configs" / "70b.py"}',
                      '--mesh=fsdp=-1', '--devices=256', '--format=json')
  assert as_json.returncode == 0, as_json.stderr
  info = json.loads(as_json.stdout)
  assert info['mesh'] == {'data': 1, 'fsdp': 256, 'tensor': 1} and info['devices'] == 256

  bad = _plan_cli(repo_root, f'--config={repo_root / "configs" / "1b.py"}', '--mesh=fsdp=3')
  assert bad.returncode == 2 and bad.stdout == ''
  assert bad.stderr.count('\n') == 1 and 'Fix:' in bad.stderr, bad.stderr


@pytest.mark.parametrize('text, message', [
    ('pipeline=2', 'unknown mesh axis'), ('fsdp=two', 'cannot read'),
    ('fsdp=2,fsdp=4', 'cannot read'), ('fsdp', 'cannot read')])
def test_bad_mesh_flag_names_the_fix(text, message):
  with pytest.raises(config_lib.ConfigError, match=f'{message}.*Fix: '):
    planning.parse_mesh(text)


def test_mesh_flag_and_device_count():
  assert planning.parse_mesh('data=1, fsdp=16,tensor=4') == {'data': 1, 'fsdp': 16, 'tensor': 4}
  assert planning.parse_mesh('fsdp=-1') == {'data': 1, 'fsdp': -1, 'tensor': 1}
  assert planning.device_count({'data': 2, 'fsdp': 16, 'tensor': 4}, None) == 128
  assert planning.device_count({'data': 1, 'fsdp': -1, 'tensor': 1}, None) == jax.device_count()
  with pytest.raises(config_lib.ConfigError, match='--devices=0'):
    planning.device_count({'data': 1, 'fsdp': -1, 'tensor': 1}, 0)


def test_mesh_that_cannot_divide_the_model_is_rejected(tiny_config):
  tiny_config.mesh.update(planning.parse_mesh('tensor=8'))  # 4 heads over 8 devices.
  with pytest.raises(config_lib.ConfigError, match='mesh.tensor=8'):
    planning.plan(tiny_config, 8)


def test_the_aggregator_plan_is_what_a_shard_holds(tiny_config, tmp_path):
  """Params, outer state and SCAFFOLD's c of each shard: the bytes read_shard returns."""
  tiny_config.federation.update(silos=('a', 'b', 'c'), num_shards=2)
  tiny_config.outer.update(optimizer='fedadam', lr=0.1)  # Two moments and a count per leaf.
  tiny_config.inner.drift_correction = 'scaffold'
  root = str(tmp_path / 'bucket')
  aggregator_lib.init_run(tiny_config, root)
  planned = planning.aggregator_memory(tiny_config)
  assert planned['num_shards'] == 2 and planned['silos'] == 3
  for shard in planned['shards']:
    agg = aggregator_lib.Aggregator(root, shard=shard['shard'])
    params, state, controls, _ = agg.read_shard(0)
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    assert shard['leaves'] == len(params)
    assert (shard['params'], shard['outer_state'], shard['controls']) == (
        nbytes(params), nbytes(state), nbytes(controls))
    assert shard['outer_state'] > 2 * shard['params']  # fedadam's mu and nu in float32.
    assert shard['next_round'] == nbytes(params) + nbytes(state) + nbytes(controls)
    largest = max(x.size for x in params.values())
    assert shard['deltas'] >= 3 * 2 * 4 * largest  # SCAFFOLD: every silo's delta and control.
    assert shard['total'] == sum(shard[k] for k in (
        'params', 'outer_state', 'controls', 'next_round', 'deltas', 'orbax_save', 'runtime'))
  assert planning.aggregator_memory(tiny_config, 1)['shards'][0]['params'] == sum(
      s['params'] for s in planned['shards'])
