r"""Seconds a silo spends outside its inner steps per round, and bytes published per format.

One silo and the aggregator run in this process over a local directory bucket,
so 'wait' is the aggregator's own compute (no network). 'wall' is a round's wall
time (its start to the next round's); idle is the share of it outside the inner
steps, overhead the same as a fraction of the inner compute. 'upload' runs in the
background with overlapped rounds (`--overlap=delayed,eager`): then it is not idle.

  python bench/round_overhead.py --config=configs/demo.py --inner_steps=25 --rounds=3
  python bench/round_overhead.py --inner_steps=24 --rounds=4 --formats=none,int8,int2,topk \
      --fragments=1,4 --overlap=none,delayed   # issue 20: one exchange per H/P steps

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
flags.DEFINE_list('overlap', ['none'], 'federation.overlap modes to compare: none, delayed, eager.')
flags.DEFINE_list('downlink', ['none'], 'federation.downlink_compression formats to compare.')
flags.DEFINE_list('fragments', ['1'], 'federation.fragments P to compare (a round: H/P steps).')
flags.DEFINE_string('link', None, 'BANDWIDTH,LATENCY, e.g. 10MB/s,50ms: the silo\'s simulated '
                    'link to the bucket (none: no link).')
FLAGS = flags.FLAGS


def measure(config, fmt: str, rounds: int, inner_steps: int, bucket: str | None = None,
            signed: bool = False, link: str | None = None, overlap: str = 'none',
            downlink: str = 'none', fragments: int = 1) -> dict:
  config = config.copy_and_resolve_references()
  config.federation.update(rounds=rounds, inner_steps=inner_steps, silos=('bench',),
                           compression=fmt, error_feedback=fmt != 'none', poll_s=0.01,
                           overlap=overlap, downlink_compression=downlink, fragments=fragments)
  config.contribution.mode = 'none'  # The protocol's own overhead, as the figures recorded.
  with tempfile.TemporaryDirectory() as tmp:
    root = (f'{bucket}/{fmt}-{signed}-{overlap}-{downlink}-{fragments}' if bucket
            else os.path.join(tmp, 'bucket'))
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
  # Round 0 includes compilation; the last waits for the whole run's end.
  steady = result['rounds'][1:-1] if len(result['rounds']) > 2 else result['rounds'][1:]
  parts = {k: statistics.median(r['seconds'].get(k, 0.0) for r in steady)
           for k in steady[0]['seconds']}
  # Wall: from a round's start to the next's; the background upload is inside it, not added.
  wall = parts.get('wall') or sum(v for k, v in parts.items() if k != 'upload')
  return {'format': fmt, 'bytes': steady[0]['bytes'], 'seconds': parts,
          'bytes_down': statistics.median(r['bytes_down'] for r in steady),
          'overhead': wall / parts['inner'] - 1, 'idle': 1 - parts['inner'] / wall,
          'storage': 'gs' if bucket else 'local', 'overlap': overlap, 'downlink': downlink,
          'fragments': fragments,
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
              for downlink in FLAGS.downlink:
                for overlap in FLAGS.overlap:
                  rows.extend(measure(FLAGS.config, fmt, FLAGS.rounds, FLAGS.inner_steps,
                                      bucket if storage == 'gs' else None, signed == 'true',
                                      FLAGS.link, overlap, downlink, int(p))
                              for p in FLAGS.fragments)
    finally:
      if emulator:
        emulator.stop()
  def setting(r):
    return r['storage'], r['signed'], r['overlap'], r['downlink'], r['fragments']
  dense = {setting(r): r['bytes'] for r in rows if r['format'] == 'none'}
  print(f'config={FLAGS.config.name} H={FLAGS.inner_steps} (median of rounds 1..'
        f'{FLAGS.rounds - 1}; seconds per round)'
        + (f'; the silo\'s link: {FLAGS.link}' if FLAGS.link else ''))
  print(f"{'storage':7s} {'signed':6s} {'overlap':7s} {'P':>2s} {'format':7s} {'downlink':8s} "
        f"{'bytes up':>11s} {'vs fp32':>8s} {'bytes down':>11s} {'wall':>7s} {'inner':>7s} "
        f"{'eval':>6s} {'publish':>8s} {'upload':>7s} {'wait(agg)':>9s} {'load+ckpt':>9s} "
        f"{'overhead':>9s} {'idle':>6s}")
  for r in rows:
    s = r['seconds']
    base = dense.get(setting(r))
    ratio = f"{r['bytes'] / base:.3f}" if base else 'n/a'
    print(f"{r['storage']:7s} {str(r['signed']):6s} {r['overlap']:7s} {r['fragments']:2d} "
          f"{r['format']:7s} "
          f"{r['downlink']:8s} {r['bytes']:11,d} {ratio:>8s} {int(r['bytes_down']):11,d} "
          f"{s.get('wall', 0.0):7.2f} {s['inner']:7.2f} {s['eval']:6.2f} {s['publish']:8.2f} "
          f"{s.get('upload', 0.0):7.2f} {s.get('wait', 0.0):9.2f} "
          f"{s.get('load', 0.0) + s['checkpoint']:9.2f} {r['overhead']:9.1%} {r['idle']:6.1%}")


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags_or_explain)
