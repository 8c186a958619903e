r"""Seconds and bytes per round that secure aggregation adds, with one silo dropped each round.

Four silos of the model's shapes, side by side with secure aggregation off, in one
process over a local directory bucket (no network), in a signed run. Each round silos
a, b and c publish a delta (the model minus random noise of L2 norm ~1; clipped to 1
with secure aggregation) and silo d never does, so the aggregator decides on the quorum
of 3 and, with secure aggregation, a, b and c publish their recovery records (their
self-mask keys, and their pair keys with d) before it removes their self masks and d's
pair masks. The inner steps are the same with or without it and are not run:
what is timed is what differs, the silo's delta building (clip, encode, mask) and upload,
its recovery record, and the aggregator's decision and outer step.

  python bench/secagg_overhead.py --config=configs/demo.py --rounds=3
"""
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fedpt import aggregator  # noqa: E402
from fedpt import cli  # noqa: E402
from fedpt import protocol  # noqa: E402
from fedpt import secagg  # noqa: E402
from fedpt import signing  # noqa: E402
from fedpt import silo  # noqa: E402
from fedpt import storage as storage_lib  # noqa: E402

config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Model config.', lock_config=True)
flags.DEFINE_integer('rounds', 3, 'Rounds per mode; the first is dropped (warm-up).')
FLAGS = flags.FLAGS
SILOS = ('a', 'b', 'c', 'd')
SENDERS = ('a', 'b', 'c')  # d drops out of every round.


def measure(config, secure: bool, rounds: int, workdir: str) -> dict:
  config = config.copy_and_resolve_references()
  config.federation.update(
      rounds=rounds, silos=SILOS, min_silos=3, round_deadline_s=0.0, poll_s=0.01,
      compression='none', error_feedback=False, reject_norm_multiple=0.0,
      secure_aggregation=secure, secagg_clip=1.0)
  config.contribution.mode = 'none'  # The protocol's own cost, as the figures recorded.
  keys, root = os.path.join(workdir, 'keys'), os.path.join(workdir, 'bucket')
  signing.generate_named(keys, ['aggregator', *(signing.silo_key_name(s) for s in SILOS)])
  run = aggregator.init_run(config, root, keys_dir=keys)
  store = storage_lib.RunStorage(root)
  secrets = {s: signing.load_secret(keys, signing.silo_key_name(s)) for s in SILOS}
  pairs = ({s: secagg.PairSecrets(s, signing.load_x25519_secret(keys, s),
                                  run['public_keys'][signing.X25519]) for s in SILOS}
           if secure else {})
  agg = aggregator.Aggregator(root, keys_dir=keys)
  steps = config.federation.inner_steps
  tokens = steps * protocol.tokens_per_step(run)
  rng = np.random.default_rng(0)
  rows = []
  for r in range(rounds):
    glob = store.read_global_arrays(r)
    size = sum(v.size for v in glob.values())
    row = {'build_s': 0.0, 'upload_s': 0.0, 'recovery_s': 0.0, 'bytes_up': 0,
           'recovery_bytes': 0}
    for s in SENDERS:
      local = {n: v - rng.normal(size=v.shape).astype(np.float32) / np.sqrt(size)
               for n, v in glob.items()}
      start = time.perf_counter()
      payload, _, meta = silo.make_delta(
          run, r, s, store.global_hash(r), glob, local, None, config.federation, steps=steps,
          tokens=tokens, train_loss=1.0,
          pairs=pairs.get(s))
      meta = signing.sign(meta, secrets[s])
      row['build_s'] += time.perf_counter() - start
      start = time.perf_counter()
      store.publish_delta(r, s, payload, meta)
      row['upload_s'] += time.perf_counter() - start
      row['bytes_up'] += meta['bytes']
    start = time.perf_counter()
    manifest = agg.decide(r)
    row['decide_s'] = time.perf_counter() - start
    if secure:
      for s in SENDERS:
        start = time.perf_counter()
        record = signing.sign(protocol.recovery_record(
            run, r, s, pairs[s].self_key(run['run_id'], r),
            pairs[s].round_keys(run['run_id'], r, manifest['unmask'])), secrets[s])
        store.publish_recovery(r, s, record)
        row['recovery_s'] += time.perf_counter() - start
        row['recovery_bytes'] += len(store.recovery_path(r, s).read_bytes())
    start = time.perf_counter()
    agg.aggregate(r, manifest)
    row['aggregate_s'] = time.perf_counter() - start
    for key in ('build_s', 'upload_s', 'recovery_s', 'bytes_up', 'recovery_bytes'):
      row[key] /= len(SENDERS)  # Per silo.
    rows.append(row)
  kept = rows[1:] or rows
  return {k: statistics.median(x[k] for x in kept) for k in kept[0]}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = FLAGS.config
  results = {}
  for secure in (False, True):
    with tempfile.TemporaryDirectory() as workdir:
      results[secure] = measure(config, secure, FLAGS.rounds, workdir)
  print(f'{config.name}: 4 silos, silo d dropped every round, medians over rounds 1..'
        f'{FLAGS.rounds - 1}; per silo: build (clip, encode, mask), upload, recovery; '
        'aggregator: decide, aggregate (unmask, outer step)')
  print(f"{'secure_aggregation':<19} {'build s':>8} {'upload s':>9} {'recovery s':>11} "
        f"{'decide s':>9} {'aggregate s':>12} {'bytes up':>10} {'recovery B':>11}")
  for secure, m in results.items():
    print(f"{str(secure):<19} {m['build_s']:>8.3f} {m['upload_s']:>9.3f} "
          f"{m['recovery_s']:>11.4f} {m['decide_s']:>9.3f} {m['aggregate_s']:>12.3f} "
          f"{m['bytes_up']:>10,.0f} {m['recovery_bytes']:>11,.0f}")
  off, on = results[False], results[True]
  silo_added = (on['build_s'] + on['upload_s'] + on['recovery_s']) - (
      off['build_s'] + off['upload_s'])
  agg_added = (on['decide_s'] + on['aggregate_s']) - (off['decide_s'] + off['aggregate_s'])
  print(f'added per round: {silo_added:+.3f} s per silo, {agg_added:+.3f} s at the aggregator, '
        f"{on['bytes_up'] + on['recovery_bytes'] - off['bytes_up']:+,.0f} bytes up per silo")


if __name__ == '__main__':
  cli.run(main)
