"""Round 0 and the evaluation tools need the model alone: no corpus, no AdamW state."""
import json
import math
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import child_env
from conftest import load_config
from fedpt import aggregator as aggregator_lib
from fedpt import data
from fedpt import evaluation
from fedpt import outer
from fedpt import protocol
from fedpt import storage as storage_lib
from fedpt import trainer as trainer_lib
from fedpt import trees


@pytest.mark.parametrize('optimizer,drift,shards', [
    ('diloco', 'none', 1), ('fedyogi', 'scaffold', 2), ('fedavg', 'none', 3)])
def test_round_0_is_the_trainer_s_init_bit_for_bit(tiny_config, tmp_path, optimizer, drift,
                                                   shards):
  config = tiny_config
  config.federation.update(silos=('a', 'b'), num_shards=shards)
  config.outer.update(optimizer=optimizer, lr=0.1 if optimizer != 'fedavg' else 0.7)
  if optimizer == 'fedyogi':
    config.outer.lr_warmup_rounds = 3  # A non-zero state: yogi's nu starts at 1e-6.
  config.inner.drift_correction = drift
  trainer = trainer_lib.Trainer(protocol.federated_config(config))  # Opens the corpus.
  expected = trees.flatten_params(jax.device_get(trainer.init_state()['params']))
  expected_state = aggregator_lib.state_to_arrays(outer.init_outer_state(
      outer.make_outer_optimizer(config.outer), expected))

  config.data.corpus = str(tmp_path / 'no-such-corpus')  # init_run reads none.
  root = str(tmp_path / 'bucket')
  aggregator_lib.init_run(config, root)
  store = storage_lib.RunStorage(root)
  metas = store.global_shard_metas(0)
  assert len(metas) == shards
  hashes = {n: storage_lib.array_hash(v) for n, v in expected.items()}
  assert {n: h for m in metas for n, h in m['leaf_hashes'].items()} == hashes
  assert store.global_hash(0) == trees.tree_hash(hashes)
  state_hashes = {n: storage_lib.array_hash(v) for n, v in expected_state.items()}
  if drift == 'scaffold':
    state_hashes.update({protocol.control_name(n): storage_lib.array_hash(
        np.zeros(v.shape, np.float32)) for n, v in expected.items()})
  assert {n: h for m in metas for n, h in m['outer_state_hashes'].items()} == state_hashes
  assert bool(state_hashes) == (optimizer != 'fedavg')  # FedAvg's plain SGD keeps no state.
  for shard in range(shards):  # What is stored is what the metas vouch for.
    params, _, controls, _ = aggregator_lib.Aggregator(root, shard=shard).read_shard(0)
    assert sorted(params) == [n for m in metas if m['shard'] == shard
                              for n in sorted(m['leaf_hashes'])]
    assert bool(controls) == (drift == 'scaffold')


@pytest.mark.slow
def test_init_run_of_1b_peaks_under_twice_its_params_and_reads_no_corpus(tmp_path, repo_root):
  """configs/1b.py cut to 8 of its 22 layers (1.9 GiB of params; whole: 4.1 GiB, ~6 GiB
  peak) on 8 CPU devices: its 2048-wide leaves, in half the suite's time."""
  config = load_config('1b', str(tmp_path / 'no-such-corpus'))
  config.model.n_layers = 8
  param_bytes = sum(math.prod(v.shape) * v.dtype.itemsize for v in jax.tree.leaves(
      trainer_lib.ShardedModel(config, jax.devices()[:1]).abstract_params()))
  probe = ('import resource, subprocess, sys\n'
           'r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n'
           'print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n'
           'print(r.stdout + r.stderr[-2000:])\n')
  root = tmp_path / 'bucket'
  started = time.monotonic()
  out = subprocess.run(
      [sys.executable, '-c', probe, sys.executable, str(repo_root / 'scripts' / 'init_run.py'),
       f'--config={repo_root / "configs" / "1b.py"}', f'--storage={root}',
       f'--config.data.corpus={tmp_path / "no-such-corpus"}', '--config.model.n_layers=8'],
      capture_output=True, text=True, timeout=600,
      env=child_env(XLA_FLAGS='--xla_force_host_platform_device_count=8'))
  status, peak = (int(x) for x in out.stdout.split('\n', 1)[0].split())
  assert status == 0, out.stdout
  assert 'created run' in out.stdout
  assert peak < 2 * param_bytes, (peak / 2**30, param_bytes / 2**30)
  assert not (tmp_path / 'no-such-corpus').exists()
  run = json.loads((root / 'run.json').read_text())
  metas = storage_lib.RunStorage(str(root)).global_shard_metas(0)
  assert sum(int(np.prod(s)) * 4 for m in metas for s in m['leaf_shapes'].values()) == param_bytes
  assert run['outer']['optimizer'] == 'diloco' and len(metas) == 1
  print(f'1b init_run: {time.monotonic() - started:.0f} s, peak {peak / 2**30:.2f} GiB for '
        f'{param_bytes / 2**30:.2f} GiB of params')


def test_evaluate_reads_only_the_sets_it_is_given(tiny_config, corpus_dir, tmp_path, repo_root):
  missing = str(tmp_path / 'no-such-corpus')
  tiny_config.federation.silos = ('a',)
  tiny_config.data.corpus = missing
  root = str(tmp_path / 'bucket')
  aggregator_lib.init_run(tiny_config, root)
  result = evaluation.evaluate(tiny_config, str(tmp_path / 'eval'),
                               eval_sets={'held': corpus_dir}, storage=root, rounds='0')
  tiny_config.data.corpus = corpus_dir
  trainer = trainer_lib.Trainer(protocol.federated_config(tiny_config))
  val = data.TokenDataset(corpus_dir, 'val', trainer.tokenizer_sha256)
  expected = trainer.score(trainer.init_state()['params'], val, whole=True)
  (row,) = result['rows']
  assert (row['loss'], row['tokens']) == (pytest.approx(expected[0], rel=1e-6), expected[1])
  cli = subprocess.run(
      [sys.executable, str(repo_root / 'scripts' / 'evaluate.py'), f'--storage={root}',
       f'--eval_set=held={corpus_dir}', f'--out={tmp_path / "cli"}', '--rounds=0',
       f'--config={repo_root / "configs" / "tiny.py"}', f'--config.data.corpus={missing}'],
      capture_output=True, text=True, env=child_env())
  assert cli.returncode == 0, cli.stderr[-2000:]
  assert json.loads((tmp_path / 'cli' / 'eval.json').read_text())['rows'][0]['loss'] == (
      pytest.approx(expected[0], rel=1e-5))
  assert not (tmp_path / 'no-such-corpus').exists()
