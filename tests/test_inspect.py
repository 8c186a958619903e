"""inspect_checkpoint.py: a round's tree, sizes, hash and provenance, from metadata alone."""
import json
import subprocess
import sys

import bucket_helpers
from fedpt import aggregator as aggregator_lib
from fedpt import inspection
from fedpt import model as model_lib
from fedpt import signing
from fedpt import storage as storage_lib
from fedpt import trainer as trainer_lib


def _run(repo_root, *args):
  return subprocess.run([sys.executable, str(repo_root / 'scripts' / 'inspect_checkpoint.py'),
                         *map(str, args)], capture_output=True, text=True, timeout=120,
                        check=False)


def test_inspect_global_round_and_private_checkpoint(tiny_config, tmp_path, repo_root):
  fed = tiny_config.federation
  fed.update(silos=('a', 'b'), rounds=1, inner_steps=1)
  keys = str(tmp_path / 'keys')
  signing.generate_named(keys, ['aggregator', 'silo_a', 'silo_b'])
  root = str(tmp_path / 'bucket')
  run = aggregator_lib.init_run(tiny_config, root, keys_dir=keys)
  store = storage_lib.RunStorage(root)
  for silo, tokens in (('a', 100), ('b', 300)):
    payload, meta = bucket_helpers.fake_delta(store, run, 0, silo, fed, 0.01, tokens=tokens)
    store.publish_delta(0, silo, payload, signing.sign(meta, signing.load_secret(
        keys, f'silo_{silo}')))
  aggregator_lib.run_aggregator(root, keys_dir=keys)

  info = inspection.describe_global_round(store, 1)
  cfg = model_lib.ModelConfig.from_config(tiny_config.model)
  assert info['param_count'] == model_lib.param_count(cfg)
  assert info['bytes'] == 4 * info['param_count']  # float32 parameters.
  assert info['global_hash'] == store.global_hash(1) and info['signatures'] == 'valid'
  assert info['contributors'] == ['a', 'b'] and info['tokens'] == 400
  assert info['weights'] == {'a': 0.25, 'b': 0.75}
  shard = store.global_shard_metas(1)[0]
  assert {x['name']: x['sha256'] for x in info['leaves']} == shard['leaf_hashes']

  done = _run(repo_root, f'--storage={root}', '--format=json')  # Default: the newest round.
  assert done.returncode == 0, done.stderr
  assert json.loads(done.stdout)['global_hash'] == store.global_hash(1)
  table = _run(repo_root, f'--storage={root}', '--round=1').stdout
  assert 'signatures: valid' in table and "contributors: ['a', 'b']" in table
  assert f"{info['param_count']:,}" in table and 'embed_vd' in table

  # Tampering shows up without reading any array.
  meta_path = store.shard_dir(1, 0, 1) / storage_lib.META
  forged = store.read_json(meta_path)
  forged['tokens'] = 10**9
  store.write_json(meta_path, forged)
  assert 'INVALID' in inspection.describe_global_round(store, 1)['signatures']

  bad = _run(repo_root, f'--storage={root}', '--round=7')
  assert bad.returncode == 2 and 'global round 7 is not committed' in bad.stderr
  assert 'Traceback' not in bad.stderr

  # A plain run's private checkpoint.
  tiny_config.train.update(steps=2, checkpoint_every=2, eval_every=2, log_every=1)
  trainer_lib.train_and_evaluate(tiny_config, str(tmp_path / 'plain'))
  private = inspection.describe_private_checkpoint(str(tmp_path / 'plain'))
  assert private['step'] == 2 and private['param_count'] == info['param_count']
  assert {x['name']: x['shape'] for x in private['leaves']} == {
      x['name']: x['shape'] for x in info['leaves']}
  missing = _run(repo_root, f'--workdir={tmp_path / "nothing"}')
  assert missing.returncode == 2 and 'no checkpoint' in missing.stderr
