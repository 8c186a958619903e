"""The one model loader: every tool reads the same sources into the same params."""
import os
import re
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

import conftest
from fedpt import aggregator as aggregator_lib
from fedpt import checkpoint as checkpoint_lib
from fedpt import data as data_lib
from fedpt import evaluation
from fedpt import export_hf
from fedpt import inspection
from fedpt import loading
from fedpt import protocol
from fedpt import sampling
from fedpt import silo as silo_lib
from fedpt import storage as storage_lib
from fedpt import trees
from test_export_hf import _fedpt_logits
from test_export_hf import _hf_logits
from test_export_hf import TOLERANCE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def federated(corpus_dir, tmp_path_factory):
  """One silo (int8 with error feedback: its checkpoint holds a residual), one round of 2 steps."""
  config = conftest.load_config('tiny', corpus_dir)
  config.data.update(global_batch=8, seq_len=32)
  config.train.update(async_checkpoints=False, eval_batches=1)
  config.federation.update(rounds=1, inner_steps=2, silos=('a',), poll_s=0.05,
                           wait_timeout_s=120.0, compression='int8', error_feedback=True)
  tmp = tmp_path_factory.mktemp('loading')
  root, workdir = str(tmp / 'bucket'), str(tmp / 'silo_a')
  aggregator_lib.init_run(config, root)
  summary = {}
  worker = threading.Thread(target=lambda: summary.update(
      silo_lib.run_silo(config, 'a', root, workdir)))
  worker.start()
  aggregator_lib.run_aggregator(root)
  worker.join(timeout=300)
  assert summary.get('round') == 1, summary
  return config, root, workdir, tmp


def _cli(script, *args):
  env = conftest.child_env()
  env['JAX_PLATFORMS'] = 'cpu'
  return subprocess.run([sys.executable, os.path.join(REPO, 'scripts', script), *args],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=180)


def test_every_tool_reads_the_same_global_round(federated):
  config, root, _, tmp = federated
  loaded = loading.load(config, loading.Source(storage=root))  # Newest: round 1.
  assert loaded.source == f'{root} global round 1'
  flat = {n: np.asarray(v) for n, v in trees.flatten_params(loaded.params).items()}
  store = storage_lib.RunStorage(root)

  # inspect: the per-leaf hashes it shows are those of the params loaded.
  info = inspection.describe(loading.Source(storage=root, round_index=1))
  assert {x['name']: x['sha256'] for x in info['leaves']} == {
      n: storage_lib.array_hash(v) for n, v in flat.items()}

  # export: the safetensors hold exactly these params.
  out = tmp / 'hf_global'
  summary = export_hf.export(config, str(out), storage=root)
  assert summary['source'] == loaded.source
  written = safetensors_numpy.load_file(str(out / 'model.safetensors'))
  want = export_hf.to_hf_state_dict(flat, loaded.model_config)
  assert sorted(written) == sorted(want)
  for name, value in want.items():
    np.testing.assert_array_equal(written[name], value, err_msg=name)

  # evaluate: its loss of round 1 is that of these params.
  result = evaluation.evaluate(config, str(tmp / 'eval'), eval_sets={'held': config.data.corpus},
                               storage=root, rounds='1')
  from fedpt import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  from fedpt import protocol  # pylint: disable=g-import-not-at-top
  trainer = trainer_lib.Trainer(protocol.federated_config(config))
  held = data_lib.TokenDataset(config.data.corpus, 'val', trainer.tokenizer_sha256)
  whole_loss, whole_tokens = trainer.score(trees.unflatten_params(flat), held, whole=True)
  assert result['rows'][0]['loss'] == pytest.approx(whole_loss, rel=1e-6)
  assert result['rows'][0]['tokens'] == whole_tokens

  # sample: greedy text equals decoding these params directly.
  text = sampling.sample_text(config, 'import os', storage=root, round_index=1,
                              max_new_tokens=6)[0]
  tokenizer = data_lib.load_tokenizer(loaded.tokenizer_path)
  prompt = [tokenizer.eos_id()] + tokenizer.encode('import os')
  out_tokens = sampling.generate(
      jax.tree.map(jnp.asarray, loaded.params), jnp.asarray([prompt], jnp.int32),
      jax.random.key(0), cfg=loaded.model_config, max_new_tokens=6,
      eos_id=tokenizer.eos_id(), pad_id=max(tokenizer.pad_id(), 0))
  length = int(out_tokens['lengths'][0])
  new = [int(t) for t in out_tokens['tokens'][0][:length] if t != tokenizer.eos_id()]
  assert text == tokenizer.decode(prompt[1:] + new)
  assert store.global_hash(1) == info['global_hash']


def test_a_federated_silos_workdir_loads_exports_and_describes(federated):
  config, root, workdir, tmp = federated
  # After the last round the silo checkpointed the final global model, residual and all.
  with loading.open_checkpoint(workdir) as (checkpointer, step):
    layout = checkpointer.state_layout(step)
  assert {'train', 'residual'} <= set(layout)
  loaded = loading.load(config, loading.Source(workdir=workdir))
  global_flat = trees.flatten_params(loading.load(config, loading.Source(storage=root)).params)
  flat = trees.flatten_params(loaded.params)
  for name in global_flat:
    np.testing.assert_array_equal(np.asarray(flat[name]), np.asarray(global_flat[name]))

  # No --config: the silo recorded its config (the run's contract over its own fields).
  done = _cli('export_hf.py', f'--workdir={workdir}', f'--out={tmp / "hf_silo"}')
  assert done.returncode == 0, done.stderr
  # A silo numbers its checkpoints by save: the line names the round, not a train step; and
  # Orbax's warning about an item folder's step metadata is not printed.
  assert f'parameters of {workdir} checkpoint {step} (round ' in done.stdout
  assert 'Metadata file does not exist' not in done.stderr
  tokens = np.random.default_rng(0).integers(0, loaded.model_config.vocab_size, (2, 32))
  diff = np.abs(_hf_logits(tmp / 'hf_silo', tokens)
                - _fedpt_logits(loaded.model_config, flat, tokens)).max()
  assert diff < TOLERANCE

  info = inspection.describe(loading.Source(workdir=workdir))
  assert info['silo'] == 'a' and info['round'] == 1
  assert {x['name']: tuple(x['shape']) for x in info['leaves']} == {
      n: tuple(v.shape) for n, v in flat.items()}
  assert sampling.sample_text(config, 'x', workdir=workdir, max_new_tokens=2)[0].startswith('x')


def test_a_global_round_is_read_with_its_run_s_contract(federated):
  """A reader's config file gives way to run.json; a typed model field that differs is refused."""
  config, root, _, _ = federated
  config = loading.source_config(None, set(), storage=root)  # No config file at all.
  assert (config.model.d_model, config.data.seq_len, config.federation.silos) == (64, 32, ('a',))
  assert sampling.sample_text(config, 'x', storage=root, max_new_tokens=2)[0].startswith('x')
  mine = conftest.load_config('tiny', config.data.corpus)
  mine.model.n_layers, mine.train.eval_batches = 3, 7
  typed = {'train.eval_batches', 'data.global_batch'}
  got = loading.source_config(mine, typed, storage=root)
  assert (got.model.n_layers, got.train.eval_batches, got.data.global_batch) == (2, 7, 16)
  with pytest.raises(protocol.RunMismatchError, match=r'model.n_layers=3 \(yours\) vs 2'):
    loading.source_config(mine, typed | {'model.n_layers'}, storage=root)


BAD_SOURCES = [
    ({}, 'pass exactly one source'),
    ({'workdir': '/nonexistent', 'storage': '/nonexistent'}, 'pass exactly one source'),
    ({'storage': '/nonexistent', 'step': 1}, '--step goes with --workdir'),
    ({'workdir': '/nonexistent', 'round': 1}, '--round goes with --storage'),
    ({'storage': '/nonexistent', 'round': -1}, 'must be >= 0'),
    ({'workdir': '/nonexistent'}, 'no checkpoint in --workdir=/nonexistent'),
]


@pytest.mark.parametrize('flags, problem', BAD_SOURCES)
def test_every_bad_source_is_one_error_naming_the_fix(flags, problem, tiny_config):
  kwargs = {('round_index' if k == 'round' else k): v for k, v in flags.items()}
  with pytest.raises(checkpoint_lib.CheckpointError, match=f'{re.escape(problem)}.*Fix'):
    loading.load(tiny_config, loading.Source(**kwargs))


@pytest.mark.parametrize('flags, problem', [BAD_SOURCES[3], BAD_SOURCES[5]])
def test_bad_sources_get_the_same_line_from_every_tool(flags, problem, tmp_path):
  config = f'--config={REPO}/configs/tiny.py'
  args = [f'--{k}={v}' for k, v in flags.items()]
  lines = set()
  for script, extra in (('sample.py', [config]), ('export_hf.py', [config, f'--out={tmp_path}/o']),
                        ('inspect_checkpoint.py', [])):
    done = _cli(script, *extra, *args)
    assert done.returncode == 2, (script, done.stderr)
    assert 'Traceback' not in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
    assert problem in done.stderr and 'Fix:' in done.stderr, (script, done.stderr)
    lines.add(done.stderr)
  assert len(lines) == 1, lines


def test_a_step_that_is_not_there(federated):
  config, _, workdir, _ = federated
  with pytest.raises(checkpoint_lib.CheckpointError, match='no checkpoint at step 99.*steps'):
    loading.load(config, loading.Source(workdir=workdir, step=99))
  with pytest.raises(storage_lib.StorageError, match='round 5 is not committed.*--round=1'):
    loading.load(config, loading.Source(storage=federated[1], round_index=5))
