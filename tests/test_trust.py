"""Everything read from the bucket is untrusted: each bad delta is rejected with its reason.

One signed run on a real GCS-protocol server. In round 0 three honest silos publish,
and each of 14 other silos publishes one kind of bad delta; in round 1 one silo
replays its round-0 delta. The global models after both rounds must be bit-identical
to a run in which the bad deltas never existed. Then the silo side: tampered global
rounds, manifests and run.json are refused before anything is loaded.
"""
import numpy as np
import pytest

import bucket_helpers

from fedpt import aggregator as aggregator_lib
from fedpt import loading
from fedpt import protocol
from fedpt import signing
from fedpt import storage as storage_lib
from fedpt import trainer as trainer_lib
from fedpt import trees

HONEST = {'a': 0.01, 'b': 0.02, 'r': 0.03}  # silo -> its delta (scale * ones on every leaf).
BAD = ('flip', 'missing', 'nosig', 'badsig', 'wrongkey', 'wrongbase', 'tree', 'shape', 'dtype',
       'nan', 'norm', 'junk', 'steps', 'tokens')
EXPECTED_REASON = {
    'flip': ('content hash', 'unreadable'), 'missing': 'unreadable', 'nosig': 'missing signature',
    'badsig': 'bad signature', 'wrongkey': 'bad signature', 'zz': 'unknown silo',
    'wrongbase': 'different global model', 'tree': 'parameter tree differs',
    'shape': 'has shape', 'dtype': 'layout', 'nan': 'NaN', 'norm': 'more than 10x',
    'junk': 'malformed metadata', 'steps': 'bad step count 1000000: a round is H=2',
    'tokens': 'bad token count 1000' + '0' * 397,
}


@pytest.fixture
def fed_config(tiny_config):
  tiny_config.train.async_checkpoints = False
  tiny_config.federation.update(rounds=2, inner_steps=2, poll_s=0.05, wait_timeout_s=60.0,
                                min_silos=2, round_deadline_s=0.3)
  return tiny_config


def _delta(store, run, round_index, silo, fed, scale, secret=None, local_fn=None, mutate=None):
  """A real compressed, hashed (and signed with `secret`) delta of `scale` on every leaf."""
  payload, meta = bucket_helpers.fake_delta(store, run, round_index, silo, fed, scale,
                                            local_fn=local_fn, mutate=mutate)
  if secret is not None:
    meta = signing.sign(meta, secret)
  return payload, meta


def _relayout(payload, meta, name, array):
  """Replaces one leaf's payload, with metadata that describes it truthfully."""
  payload[name] = {'values': array}
  meta['tree'][name] = {'shape': list(array.shape),
                        'payload': {'values': [list(array.shape), str(array.dtype)]}}
  meta['payload_hashes'] = {k: v for k, v in meta['payload_hashes'].items()
                            if not k.startswith(f'{name}/')}
  meta['payload_hashes'][f'{name}/values'] = storage_lib.array_hash(array)
  meta['content_hash'] = trees.tree_hash(meta['payload_hashes'])
  return payload, meta


def _largest_object(directory):
  files = [p for p in bucket_helpers.files(directory) if p.name != 'meta.json']
  return max(files, key=lambda p: len(p.read_bytes()))


def _publish_bad(store, run, fed, silo, secrets):
  mutations = {
      'badsig': lambda p, m: (p, m),  # Modified after signing, below.
      'wrongbase': lambda p, m: (p, dict(m, base_global_hash='0' * 64)),
      'tree': lambda p, m: (
          {k: v for k, v in p.items() if k != 'final_norm/scale'},
          dict(m, tree={k: v for k, v in m['tree'].items() if k != 'final_norm/scale'})),
      'shape': lambda p, m: _relayout(p, m, 'final_norm/scale', np.zeros(65, np.float32)),
      'dtype': lambda p, m: _relayout(p, m, 'final_norm/scale', np.zeros(64, np.float16)),
      'junk': lambda p, m: (p, dict(m, tree={k: 'x' for k in m['tree']})),  # Signed garbage.
      'nan': lambda p, m: (p, dict(m, delta_norm=1.0)),  # Lies about its norm.
      # Signed claims no silo can make: they would take the round's weight, or overflow it.
      'steps': lambda p, m: (p, dict(m, steps=10**6, tokens=10**6 * 1024)),
      'tokens': lambda p, m: (p, dict(m, tokens=10**400)),
  }
  secret = {'nosig': None, 'wrongkey': secrets['a']}.get(silo, secrets[silo])
  local_fn = {
      'nan': lambda f: dict(f, **{'final_norm/scale': f['final_norm/scale'] * np.nan}),
      'norm': lambda f: {n: v - 3.0 for n, v in f.items()},  # 100x the honest deltas.
  }.get(silo)
  payload, meta = _delta(store, run, 0, silo, fed, 0.05, secret, local_fn, mutations.get(silo))
  if silo == 'badsig':
    meta = dict(meta, tokens=10**9)  # Claims more weight after signing.
  store.publish_delta(0, silo, payload, meta)
  payload_dir = store.delta_dir(0, silo) / 'payload'
  if silo == 'flip':  # One bit in every array data object, so no layout can dodge it.
    for victim in bucket_helpers.files(payload_dir):
      if '/d/' in str(victim):
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
  elif silo == 'missing':
    _largest_object(payload_dir).unlink()


def test_every_bad_delta_is_rejected_and_changes_nothing(fed_config, gcs_bucket, tmp_path):
  fed = fed_config.federation
  keys = str(tmp_path / 'keys')
  silos = [*HONEST, *BAD]
  signing.generate_named(keys, ['aggregator', *(f'silo_{s}' for s in silos), 'silo_zz'])
  secrets = {s: signing.load_secret(keys, f'silo_{s}') for s in [*silos, 'zz']}

  fed.silos = tuple(silos)
  root = f'{gcs_bucket}/run'
  run = aggregator_lib.init_run(fed_config, root, keys_dir=keys)
  store = storage_lib.RunStorage(root)
  assert set(run['public_keys']['silos']) == set(silos)
  for silo, scale in HONEST.items():
    store.publish_delta(0, silo, *_delta(store, run, 0, silo, fed, scale, secrets[silo]))
  for silo in BAD:
    _publish_bad(store, run, fed, silo, secrets)
  store.publish_delta(0, 'zz', *_delta(store, run, 0, 'zz', fed, 0.05, secrets['zz']))

  agg = aggregator_lib.Aggregator(root, keys_dir=keys)
  manifest = agg.decide(0)
  assert [e['silo'] for e in manifest['included']] == sorted(HONEST)
  reasons = {e['silo']: e['reason'] for e in manifest['rejected']}
  assert sorted(reasons) == sorted([*BAD, 'zz'])
  for silo, expected in EXPECTED_REASON.items():
    expected = (expected,) if isinstance(expected, str) else expected
    assert any(e in reasons[silo] for e in expected), (silo, reasons[silo])
  assert signing.check_signature(manifest, run['public_keys']['aggregator']) is None
  agg.aggregate(0, manifest)

  # Round 1: a and b are honest; r replays its (validly signed) round-0 delta.
  for silo in ('a', 'b'):
    store.publish_delta(1, silo, *_delta(store, run, 1, silo, fed, HONEST[silo], secrets[silo]))
  source = str(store.delta_dir(0, 'r'))
  for item in bucket_helpers.files(store.delta_dir(0, 'r')):
    (store.delta_dir(1, 'r') / str(item)[len(source) + 1:]).write_bytes(item.read_bytes())
  manifest = agg.decide(1)
  assert [e['silo'] for e in manifest['included']] == ['a', 'b']
  assert [e['silo'] for e in manifest['rejected']] == ['r']
  assert 'replayed' in manifest['rejected'][0]['reason']
  agg.aggregate(1, manifest)

  # The same rounds where the bad deltas never existed (unsigned, local: same arithmetic).
  fed.silos = tuple(HONEST)
  clean_root = str(tmp_path / 'clean')
  clean_run = aggregator_lib.init_run(fed_config, clean_root)
  clean = storage_lib.RunStorage(clean_root)
  for r, senders in ((0, HONEST), (1, ('a', 'b'))):
    for silo in senders:
      clean.publish_delta(r, silo, *_delta(clean, clean_run, r, silo, fed, HONEST[silo]))
    clean_agg = aggregator_lib.Aggregator(clean_root)
    clean_agg.aggregate(r, clean_agg.decide(r))
  for r in (1, 2):
    assert store.global_hash(r) == clean.global_hash(r), f'global round {r} differs'
  assert store.global_hash(2) != store.global_hash(0)

  _silo_refuses_tampered_globals(fed_config, store, root, run, keys, tmp_path)


def _silo_refuses_tampered_globals(fed_config, store, root, run, keys, tmp_path):
  """What silos load is vouched for by the aggregator's signature and per-leaf hashes."""
  trainer = trainer_lib.Trainer(protocol.federated_config(fed_config))
  identity = signing.Identity(keys, 'silo_a', run)
  abstract = trees.flatten_params(trainer.abstract_state()['params'])

  def load(round_index):
    return loading.read_global_params(store, run, round_index, abstract, identity)
  assert sorted(load(2)) == sorted(abstract)  # Untampered: loads.

  shard_meta = store.shard_dir(2, 0, 1) / storage_lib.META
  original = shard_meta.read_bytes()
  forged = store.read_json(shard_meta)
  forged['contributors'] = ['a', 'b', 'mallory']
  store.write_json(shard_meta, forged)
  with pytest.raises(storage_lib.StorageError, match='bad signature'):
    load(2)
  shard_meta.write_bytes(original)

  manifest_path = store.manifest_path(1)
  original_manifest = manifest_path.read_bytes()
  manifest = store.read_json(manifest_path)
  manifest.pop(signing.SIGNATURE)
  store.write_json(manifest_path, manifest)
  with pytest.raises(storage_lib.StorageError, match='manifest of round 1: missing signature'):
    load(2)
  manifest_path.write_bytes(original_manifest)

  params_dir = store.shard_dir(2, 0, 1) / 'params'
  victim = _largest_object(params_dir)
  original_params = victim.read_bytes()
  data = bytearray(original_params)
  data[len(data) // 2] ^= 0x01
  victim.write_bytes(bytes(data))
  with pytest.raises(storage_lib.StorageError):
    load(2)
  victim.write_bytes(original_params)
  assert sorted(load(2)) == sorted(abstract)

  # run.json replaced by a run with another aggregator: a silo's pinned key catches it.
  other = str(tmp_path / 'other_keys')
  signing.generate_named(other, ['aggregator'])
  with pytest.raises(signing.KeyFileError, match='different aggregator key'):
    signing.Identity(other, 'aggregator', run)
  # A signed run cannot be joined without keys, and a silo's key must be the listed one.
  with pytest.raises(signing.KeyFileError, match='pass --keys'):
    signing.party_identity(run, None, 'silo_a')
  signing.generate_named(other, ['silo_a'])
  (tmp_path / 'other_keys' / 'aggregator.pub').write_text(
      (tmp_path / 'keys' / 'aggregator.pub').read_text())
  with pytest.raises(signing.KeyFileError, match='does not list the public key'):
    signing.Identity(other, 'silo_a', run)
  forged_run = dict(run, silos=run['silos'] + [{'id': 'mallory', 'weight': 100.0}])
  with pytest.raises(signing.KeyFileError, match='run.json: bad signature'):
    signing.Identity(keys, 'silo_a', forged_run)


def test_keys_cli_and_init_run_without_a_silo_key(fed_config, tmp_path, repo_root):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  keys = tmp_path / 'keys'
  command = [sys.executable, str(repo_root / 'scripts' / 'keys.py'), f'--keys={keys}',
             '--names=aggregator,silo_a']
  done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
  assert done.returncode == 0, done.stderr
  assert (keys / 'aggregator.pub').read_text().startswith('-----BEGIN PUBLIC KEY-----')
  assert (keys / 'silo_a.key').stat().st_mode & 0o777 == 0o600
  secret = (keys / 'silo_a.key').read_bytes()
  again = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
  assert again.returncode == 2 and 'already exists' in again.stderr and 'Fix' in again.stderr
  assert 'Traceback' not in again.stderr and (keys / 'silo_a.key').read_bytes() == secret
  with pytest.raises(signing.KeyFileError, match='neither'):
    signing.generate_named(str(keys), ['mallory'])

  # The run lists silos a, b, c but the operator holds only a's public key: both missing ones
  # are named at once, with the command each party runs (the real flags).
  fed_config.federation.silos = ('a', 'b', 'c')
  with pytest.raises(signing.KeyFileError, match=r'2 public key\(s\) missing from .*: '
                     r'silo_b.pub, silo_c.pub. Fix: .*scripts/keys.py --keys=.* --names='):
    aggregator_lib.init_run(fed_config, str(tmp_path / 'bucket'), keys_dir=str(keys))
  assert not (tmp_path / 'bucket').exists() or not any((tmp_path / 'bucket').iterdir())
  done = subprocess.run(
      [sys.executable, str(repo_root / 'scripts' / 'init_run.py'),
       f'--config={repo_root / "configs" / "tiny.py"}', "--config.federation.silos=('a','b','c')",
       f'--storage={tmp_path / "bucket"}', f'--keys={keys}'],
      capture_output=True, text=True, timeout=120, check=False)
  assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
  assert 'silo_b.pub, silo_c.pub' in done.stderr and '--names=silo_b' in done.stderr
  # Missing secret keys name the flags keys.py really takes.
  with pytest.raises(signing.KeyFileError, match=r'scripts/keys.py --keys=.* --names=silo_z'):
    signing.load_secret(str(keys), 'silo_z')
  with pytest.raises(signing.KeyFileError, match=r'--names=silo_z makes silo_z.key'):
    signing.party_identity({'public_keys': {'aggregator': 'x'}}, None, 'silo_z')
  # Nothing to make is said, not a silent success.
  done = subprocess.run(command[:2] + [f'--keys={keys}', '--names='], capture_output=True,
                        text=True, timeout=120, check=False)
  assert done.returncode == 2 and 'no key name' in done.stderr, done.stderr
