r"""Seconds a silo spends outside its inner steps per round, and bytes published per format.

One silo and the aggregator run in this process over a local directory bucket,
so 'wait' is the aggregator's own compute (no network). Overhead is everything
but the inner steps, as a fraction of the inner compute.

  python bench/round_overhead.py --config=configs/demo.py --inner_steps=25 --rounds=3

`--storages=local,gs --signed=false,true` measures the cost of the gs:// path (a
local fake-gcs-server, so protocol and client costs without WAN latency) and of
Ed25519 signing, each variant side by side in one process. `--link=10MB/s,50ms`
gives the silo a simulated wide-area link to the bucket (`storage.Link`: real
sleeps, latency per operation plus bytes over bandwidth); the aggregator, which
sits by the bucket, gets none.
"""
import contextlib
import os
import statistics
import sys
import tempfile
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fedpt import aggregator  # noqa: E402
from fedpt import cli  # noqa: E402
from fedpt import gcs_emulator  # noqa: E402
from fedpt import signing  # noqa: E402
from fedpt import silo  # noqa: E402
from fedpt import storage as storage_lib  # noqa: E402

config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Model config.', lock_config=True)
flags.DEFINE_integer('inner_steps', 25, 'H.')
flags.DEFINE_integer('rounds', 3, 'Rounds per format; the first is dropped (compilation).')
flags.DEFINE_list('formats', ['none', 'bf16', 'int8', 'int4'], 'Compression formats.')
flags.DEFINE_list('storages', ['local'], 'local and/or gs (a local fake-gcs-server).')
flags.DEFINE_list('signed', ['false'], 'false and/or true: sign every object (Ed25519).')
flags.DEFINE_string('link', None, 'BANDWIDTH,LATENCY, e.g. 10MB/s,50ms: the silo\'s simulated '
                    'link to the bucket (none: no link).')
FLAGS = flags.FLAGS


def measure(config, fmt: str, rounds: int, inner_steps: int, bucket: str | None = None,
            signed: bool = False, link: str | None = None) -> dict:
  config = config.copy_and_resolve_references()
  config.train.async_checkpoints = False
  config.federation.update(rounds=rounds, inner_steps=inner_steps, silos=('bench',),
                           compression=fmt, error_feedback=fmt != 'none', poll_s=0.01)
  with tempfile.TemporaryDirectory() as tmp:
    root = f'{bucket}/{fmt}-{signed}' if bucket else os.path.join(tmp, 'bucket')
    keys = os.path.join(tmp, 'keys') if signed else None
    if keys:
      signing.generate_named(keys, ['aggregator', 'silo_bench'])
    aggregator.init_run(config, root, keys_dir=keys)
    result = {}
    silo_link = storage_lib.Link.parse(link)  # A fresh one per measurement: its own totals.

    def work():
      with storage_lib.party_link(silo_link):
        result.update(silo.run_silo(config, 'bench', root, os.path.join(tmp, 'silo'),
                                    keys_dir=keys))
    worker = threading.Thread(target=work)
    worker.start()
    with storage_lib.party_link(None):  # By the bucket, whatever FEDPT_LINK says.
      aggregator.run_aggregator(root, keys_dir=keys)
    worker.join()
  steady = result['rounds'][1:]  # Round 0 includes compilation.
  parts = {k: statistics.median(r['seconds'][k] for r in steady)
           for k in steady[0]['seconds']}
  outside = sum(v for k, v in parts.items() if k != 'inner')
  return {'format': fmt, 'bytes': steady[0]['bytes'], 'seconds': parts,
          'overhead': outside / parts['inner'], 'storage': 'gs' if bucket else 'local',
          'signed': signed, 'link': silo_link.totals() if silo_link else None}


def main(argv):
  del argv
  cli.run_or_explain(storage_lib.Link.parse, FLAGS.link, '--link')  # Before anything starts.
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    emulator = (gcs_emulator.GcsEmulator(tmp).start() if 'gs' in FLAGS.storages else None)
    try:
      with emulator.environment() if emulator else contextlib.nullcontext():
        bucket = emulator.create_bucket('bench') if emulator else None
        for storage in FLAGS.storages:
          for signed in FLAGS.signed:
            for fmt in FLAGS.formats:
              rows.append(measure(FLAGS.config, fmt, FLAGS.rounds, FLAGS.inner_steps,
                                  bucket if storage == 'gs' else None, signed == 'true',
                                  FLAGS.link))
    finally:
      if emulator:
        emulator.stop()
  dense = {(r['storage'], r['signed']): r['bytes'] for r in rows if r['format'] == 'none'}
  print(f'config={FLAGS.config.name} H={FLAGS.inner_steps} (median of rounds 1..'
        f'{FLAGS.rounds - 1}; seconds per round)'
        + (f'; the silo\'s link: {FLAGS.link}' if FLAGS.link else ''))
  print(f"{'storage':7s} {'signed':6s} {'format':7s} {'bytes/silo/round':>17s} {'vs fp32':>8s} "
        f"{'inner':>7s} {'eval':>6s} {'publish':>8s} {'wait(agg)':>9s} {'load+ckpt':>9s} "
        f"{'overhead':>9s}")
  for r in rows:
    s = r['seconds']
    base = dense.get((r['storage'], r['signed']))
    ratio = f"{r['bytes'] / base:.3f}" if base else 'n/a'
    print(f"{r['storage']:7s} {str(r['signed']):6s} {r['format']:7s} {r['bytes']:17,d} "
          f"{ratio:>8s} {s['inner']:7.2f} {s['eval']:6.2f} {s['publish']:8.2f} "
          f"{s['wait']:9.2f} {s['load'] + s['checkpoint']:9.2f} {r['overhead']:9.1%}")


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags_or_explain)
