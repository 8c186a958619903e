"""inner.optimizer='muon': optax's Muon for hidden matrices, AdamW for the rest; sharded,
resumable, planned and federated like AdamW."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

import conftest
from fedpt import inner
from fedpt import model as model_lib
from fedpt import planning
from fedpt import trainer as trainer_lib
from fedpt import trees

import test_trainer

# The matrix view of each stacked [layers, ...] leaf, written out here independently of
# inner.MUON_MATRICES: attention as d_model x (heads * head_dim), MLPs as they are.
DIMS = {'blocks/attn/q_weight_dnh': ((1,), (2, 3)), 'blocks/attn/k_weight_dkh': ((1,), (2, 3)),
        'blocks/attn/v_weight_dkh': ((1,), (2, 3)), 'blocks/attn/o_weight_nhd': ((1, 2), (3,)),
        'blocks/mlp/gate_weight_df': ((1,), (2,)), 'blocks/mlp/up_weight_df': ((1,), (2,)),
        'blocks/mlp/down_weight_fd': ((1,), (2,))}


def _named(tree) -> dict:
  """{'blocks/mlp/up_weight_df': leaf} of a moment tree, skipping the other part's MaskedNodes."""
  return {'/'.join(k.key for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _moments(opt_state) -> tuple[dict, dict]:
  """(Muon's momentum, AdamW's first moment) by leaf name."""
  muon = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(
      s, optax.contrib.MuonState)) if isinstance(s, optax.contrib.MuonState)]
  assert len(muon) == 1
  return _named(muon[0].mu), _named(opt_state[1].inner_states['adamw'].inner_state[0].mu)


@pytest.fixture
def muon_config(tiny_config):
  tiny_config.inner.update(optimizer='muon', muon_weight_decay=0.01, grad_clip=0.5)
  return tiny_config


def _params_and_grads(config, seed=0):
  model_config = model_lib.ModelConfig.from_config(config.model, 'cpu')
  _, abstract, _ = model_lib.abstract_model(model_config)
  keys = iter(jax.random.split(jax.random.key(seed), 2 * len(jax.tree.leaves(abstract))))
  params = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape) * 0.02, abstract)
  grads = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape), abstract)
  return params, grads


def test_a_step_is_optax_muon_on_the_matrices_and_adamw_on_the_rest(muon_config):
  """Three steps of fedpt's optimizer equal, leaf for leaf, clipping over the whole tree, then
  optax.contrib.muon on the hidden matrices and optax.adamw on the rest, separately."""
  i = muon_config.inner
  params, grads = _params_and_grads(muon_config)
  optimizer = inner.make_optimizer(i, muon_config.train.steps)
  state = optimizer.init(params)

  flat = trees.flatten_params(params)
  assert set(DIMS) < set(flat) and {'embed_vd', 'final_norm/scale'} <= set(flat) - set(DIMS)
  ref_muon = optax.contrib.muon(
      inner.lr_schedule(i, muon_config.train.steps, peak=i.muon_lr), ns_steps=i.muon_ns_steps,
      beta=i.muon_beta, weight_decay=i.muon_weight_decay,
      muon_weight_dimension_numbers={n: optax.contrib.MuonDimensionNumbers(*d)
                                     for n, d in DIMS.items()})
  ref_adamw = optax.adamw(inner.lr_schedule(i, muon_config.train.steps), b1=i.b1, b2=i.b2,
                          eps=i.eps, weight_decay=i.weight_decay,
                          mask={n: not n.endswith('/scale') for n in flat if n not in DIMS})
  clip = optax.clip_by_global_norm(i.grad_clip)
  ref = {n: flat[n] for n in flat}
  split = lambda t, muon: {n: t[n] for n in t if (n in DIMS) == muon}  # noqa: E731
  ref_states = (ref_muon.init(split(ref, True)), ref_adamw.init(split(ref, False)))
  for step in range(3):
    g = jax.tree.map(lambda x, step=step: x * (1 + step), grads)  # Past the clip, every step.
    updates, state = optimizer.update(g, state, params)
    params = optax.apply_updates(params, updates)

    clipped, _ = clip.update(trees.flatten_params(g), clip.init(None))
    m_up, m_state = ref_muon.update(split(clipped, True), ref_states[0], split(ref, True))
    a_up, a_state = ref_adamw.update(split(clipped, False), ref_states[1], split(ref, False))
    ref_states = (m_state, a_state)
    ref = optax.apply_updates(ref, {**m_up, **a_up})
    mine = trees.flatten_params(params)
    for name in flat:
      np.testing.assert_allclose(mine[name], ref[name], rtol=1e-6, atol=1e-8,
                                 err_msg=f'{name} at step {step}')
  # Muon moved the matrices by orthogonalised steps: every singular value of a layer's
  # update is of one size, unlike the gradient's, and AdamW's leaves moved too.
  moved = np.asarray(mine['blocks/mlp/gate_weight_df'] - flat['blocks/mlp/gate_weight_df'])[0]
  singular = np.linalg.svd(moved, compute_uv=False)
  assert singular.max() / singular.min() < 2, singular
  grad_singular = np.linalg.svd(np.asarray(grads['blocks']['mlp']['gate_weight_df'][0]),
                                compute_uv=False)
  assert grad_singular.max() / grad_singular.min() > 3
  assert not np.allclose(mine['embed_vd'], flat['embed_vd'])


@pytest.mark.gpu
@conftest.needs_devices(8)
@pytest.mark.parametrize('mesh', [(2, 2, 2)])  # data x fsdp x tensor.
def test_muon_state_is_sharded_like_the_params_and_steps_match_one_device(muon_config, mesh):
  single = muon_config.copy_and_resolve_references()
  single.mesh.update(data=1, fsdp=1, tensor=1)
  ref = trainer_lib.Trainer(single, devices=jax.devices()[:1])
  ref_state, ref_metrics = ref.train_step(ref.init_state(), ref.batch(0))
  ref_state, ref_metrics = ref.train_step(ref_state, ref.batch(1))

  muon_config.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  trainer = trainer_lib.Trainer(muon_config)
  state = trainer.init_state()
  params = trees.flatten_params(state['params'])
  mu, adam_mu = _moments(state['opt_state'])
  assert set(mu) == set(DIMS) and 'embed_vd' in adam_mu and not set(adam_mu) & set(DIMS)
  for name, moment in {**mu, **adam_mu}.items():
    assert moment.sharding == params[name].sharding, name
    assert moment.addressable_shards[0].data.shape == params[name].addressable_shards[0].data.shape
  assert mu['blocks/mlp/gate_weight_df'].addressable_shards[0].data.size == (
      params['blocks/mlp/gate_weight_df'].size // (mesh[1] * mesh[2]))

  for step in range(2):  # The first step is at lr 0 (warmup): the second moves the params.
    state, metrics = trainer.train_step(state, trainer.batch(step))
  np.testing.assert_allclose(float(metrics['train_loss']), float(ref_metrics['train_loss']),
                             rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6,
                                                       err_msg=str(mesh)),
               jax.device_get(state['params']), jax.device_get(ref_state['params']))


@pytest.mark.slow
@pytest.mark.gpu
def test_a_stopped_muon_run_resumes_bit_identically(muon_config, tmp_path):
  muon_config.train.update(steps=12, checkpoint_every=100, log_every=4, eval_every=100)
  a, _ = test_trainer.stopped_and_resumed(muon_config, tmp_path, 6)
  mu, _ = _moments(a['opt_state'])
  assert np.abs(mu['blocks/mlp/up_weight_df']).max() > 0  # Momentum was restored.
  records = [json.loads(line) for line in open(tmp_path / 'split' / 'metrics.jsonl')]
  assert [r['step'] for r in records] == [4, 8, 12]
  assert records[-1]['train_loss'] < records[0]['train_loss']


@pytest.mark.parametrize('mesh', [(8, 1, 1), (2, 2, 2)])
def test_the_planner_counts_muon_state_to_the_byte(muon_config, mesh):
  muon_config.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  info = planning.plan(muon_config, 8, platform='cpu')
  memory = info['per_device_bytes']
  state = trainer_lib.Trainer(muon_config).init_state()
  for device in jax.devices():
    assert sum(shard.data.nbytes for leaf in jax.tree.leaves(state['opt_state'])
               for shard in leaf.addressable_shards if shard.device == device) == (
                   memory['opt_state'])
  m = muon_config.model
  matrices = sum(int(np.prod(x.shape)) for n, x in trees.flatten_params(state['params']).items()
                 if n in DIMS)
  others = model_lib.param_count(model_lib.ModelConfig.from_config(m, 'cpu')) - matrices
  if mesh == (8, 1, 1):  # Unsharded: Muon's momentum, AdamW's two moments, a few scalars.
    assert 4 * (matrices + 2 * others) < memory['opt_state'] < 4 * (matrices + 2 * others) + 100
  adamw = muon_config.copy_and_resolve_references()
  adamw.inner.optimizer = 'adamw'
  plain = planning.plan(adamw, 8, platform='cpu')['per_device_bytes']
  assert memory['opt_state'] < plain['opt_state']
  assert memory['update'] > plain['update']  # Newton-Schulz's working set.
  assert 'optimizer state (Muon+AdamW)' in planning.render(info)


@pytest.mark.parametrize('args, field', [
    (['--config.inner.muon_lr=-1'], 'inner.muon_lr'),
    (['--config.inner.optimizer=sgd'], 'inner.optimizer'),
    (['--config.inner.optimizer=muon', '--config.inner.muon_ns_steps=0'], 'inner.muon_ns_steps'),
])
def test_bad_muon_settings_are_one_line_and_status_2(repo_root, tmp_path, args, field):
  proc = subprocess.run(
      [sys.executable, str(repo_root / 'scripts' / 'train.py'),
       f'--config={repo_root / "configs" / "tiny.py"}', f'--workdir={tmp_path}'] + args,
      capture_output=True, text=True, timeout=120, env=conftest.child_env())
  out = (proc.stdout + proc.stderr).strip()
  assert proc.returncode == 2, out
  errors = [line for line in out.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and field in errors[0] and 'Fix:' in errors[0], out
  assert 'Traceback' not in out
  assert not os.path.exists(tmp_path / 'checkpoints')
