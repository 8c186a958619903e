"""A simulated wide-area link: real sleeps of latency plus bytes over bandwidth, per party."""
import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import conftest
from fedpt import ledger
from fedpt import simulation
from fedpt import storage as storage_lib

TINY = str(conftest.REPO / 'configs' / 'tiny.py')
FIX = 'Fix: give BANDWIDTH,LATENCY such as 100MB/s,50ms'


@pytest.mark.parametrize('spec, bandwidth, latency', [
    ('100MB/s,50ms', 100e6, 0.05),
    ('1.5GiB/s, 0.2s', 1.5 * 2**30, 0.2),
    ('10 KB/s,0ms', 10e3, 0.0),
    ('64KiB/s,1e-3s', 64 * 1024, 0.001),
    ('2e3B/s,.5s', 2000, 0.5),
])
def test_a_link_spec_reads_decimal_and_binary_units(spec, bandwidth, latency):
  link = storage_lib.Link.parse(spec)
  assert (link.bandwidth_bytes_per_s, link.latency_s) == (bandwidth, latency)
  assert storage_lib.Link.parse(link.spec).bandwidth_bytes_per_s == bandwidth


@pytest.mark.parametrize('spec', [None, '', 'none', ' NONE '])
def test_none_is_no_link(spec):
  assert storage_lib.Link.parse(spec) is None


@pytest.mark.parametrize('spec, problem', [
    ('100MB/s', 'expected two parts, bandwidth and latency'),
    ('100MB/s,50ms,1', 'expected two parts'),
    ('100mb/s,50ms', "bandwidth '100mb/s' is not a positive number of bytes per second"),
    ('100MB,50ms', "bandwidth '100MB' is not"),
    ('0MB/s,50ms', "bandwidth '0MB/s' is not"),
    ('1e999GB/s,50ms', "bandwidth '1e999GB/s' is not"),
    ('100MB/s,5min', "latency '5min' is not a number of ms or s"),
    ('100MB/s,-5ms', "latency '-5ms' is not"),
    ('100MB/s,1e999s', "latency '1e999s' is not"),
])
def test_a_bad_link_spec_names_its_source_the_problem_and_the_fix(spec, problem):
  with pytest.raises(storage_lib.LinkError) as raised:
    storage_lib.Link.parse(spec, 'FEDPT_LINK')
  message = str(raised.value)
  assert message.startswith(f'FEDPT_LINK={spec}: {problem}'), message
  assert FIX in message and '\n' not in message


def _timed(fn):
  start = time.monotonic()
  out = fn()
  return out, time.monotonic() - start


def test_a_delta_pays_latency_and_its_bytes_over_bandwidth_both_ways(tmp_path, monkeypatch):
  monkeypatch.delenv(storage_lib.LINK_ENV, raising=False)
  link = storage_lib.Link(1e6, 0.05)  # 1 MB/s, 50 ms.
  store = storage_lib.RunStorage(str(tmp_path / 'bucket'), link=link)
  payload = {'w/q': np.arange(300_000, dtype=np.int8), 'w/scale': np.ones(1000, np.float32)}
  nbytes = 300_000 + 4000
  meta = {'content_hash': 'abc', 'bytes': nbytes}
  meta_bytes = len(json.dumps(meta, indent=1, sort_keys=True).encode())

  # Looks up meta.json (absent: latency only), uploads the payload, writes meta.json.
  _, took = _timed(lambda: store.publish_delta(0, 'a', payload, meta))
  floor = 3 * 0.05 + (nbytes + meta_bytes) / 1e6
  assert floor <= took <= 3 * floor + 2.0, (took, floor)
  assert (link.bytes_up, link.bytes_down, link.operations) == (nbytes + meta_bytes, 0, 3)
  assert link.seconds >= floor

  spec = {'q': ((300_000,), 'int8'), 'scale': ((1000,), 'float32')}
  leaf, took = _timed(lambda: store.read_delta_leaf(0, 'a', 'w', spec))
  np.testing.assert_array_equal(leaf['q'], payload['w/q'])
  floor = 0.05 + nbytes / 1e6
  assert floor <= took <= 3 * floor + 2.0, (took, floor)
  assert (link.bytes_down, link.operations) == (nbytes, 4)

  assert store.delta_meta(0, 'a') == meta  # A JSON record: its text's bytes.
  assert (link.bytes_down, link.operations) == (nbytes + meta_bytes, 5)
  (silos, took) = _timed(lambda: store.committed_silos(0))  # A listing, then one lookup.
  assert silos == ['a'] and took >= 2 * 0.05
  assert (link.bytes_down, link.bytes_up, link.operations) == (
      nbytes + meta_bytes, nbytes + meta_bytes, 7)
  totals = link.totals()
  assert totals['operations'] == 7 and totals['link'] == '1e+06B/s,50ms'

  assert storage_lib.RunStorage(str(tmp_path / 'bucket')).link is None  # FEDPT_LINK unset.


def test_concurrent_transfers_share_the_bandwidth_but_not_the_latency():
  link = storage_lib.Link(1e6, 0.3)
  threads = [threading.Thread(target=link.transfer, args=(100_000, True)) for _ in range(3)]
  start = time.monotonic()
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  took = time.monotonic() - start
  # One latency (overlapped), then the three transfers one after another.
  assert 0.3 + 0.3 <= took < 3 * 0.3, took
  assert (link.bytes_up, link.operations) == (300_000, 3)


def test_a_party_s_link_comes_from_its_thread_or_its_process(tmp_path, monkeypatch):
  root = str(tmp_path / 'bucket')
  monkeypatch.setenv(storage_lib.LINK_ENV, '10MB/s,1ms')
  first, second = storage_lib.RunStorage(root), storage_lib.RunStorage(root)
  assert first.link is second.link and first.link.bandwidth_bytes_per_s == 10e6  # One party.
  own = storage_lib.Link(5e6, 0.002)
  seen = {}

  def silo():
    with storage_lib.party_link(own):
      seen['store'] = storage_lib.RunStorage(root)
  thread = threading.Thread(target=silo)
  thread.start()
  thread.join()
  assert seen['store'].link is own
  assert storage_lib.RunStorage(root).link is first.link  # The context ended with the thread.
  with storage_lib.party_link(None):  # An aggregator's thread: no link, whatever FEDPT_LINK.
    assert storage_lib.RunStorage(root).link is None
  monkeypatch.setenv(storage_lib.LINK_ENV, 'none')
  assert storage_lib.RunStorage(root).link is None
  monkeypatch.setenv(storage_lib.LINK_ENV, '10 Mbit/s,1ms')
  with pytest.raises(storage_lib.LinkError, match=r"^FEDPT_LINK=10 Mbit/s,1ms: bandwidth"):
    storage_lib.RunStorage(root)


def test_silos_get_the_link_and_aggregators_never(tmp_path, monkeypatch):
  monkeypatch.setenv(storage_lib.LINK_ENV, '1MB/s,1ms')  # Inherited from whoever ran us.
  children = simulation._Children(str(tmp_path / 'logs'))  # pylint: disable=protected-access
  show = [sys.executable, '-c', f'import os; print(os.environ.get("{storage_lib.LINK_ENV}"))']
  children.start('silo_a', show, env={storage_lib.LINK_ENV: '5MB/s,9ms'})
  children.start('aggregator_0_of_1', show, env={storage_lib.LINK_ENV: None})
  children.start('silo_b', show)
  for proc in children.procs.values():
    proc.wait()
  last = {name: (tmp_path / 'logs' / f'{name}.log').read_text().splitlines()[-1]
          for name in children.procs}
  assert last == {'silo_a': '5MB/s,9ms', 'aggregator_0_of_1': 'None', 'silo_b': '1MB/s,1ms'}


@pytest.mark.parametrize('script, args', [
    ('scripts/simulate.py', ['--workdir={new}/sim']),
    ('bench/round_overhead.py', ['--formats=none', '--rounds=2']),
    ('bench/study.py', ['--out={new}/study', '--questions=1', '--seeds=0']),
])
def test_a_bad_link_flag_is_one_line_before_anything_starts(script, args, tmp_path):
  new = tmp_path / 'new'
  done = subprocess.run(
      [sys.executable, str(conftest.REPO / script), f'--config={TINY}', '--link=fast',
       *[a.format(new=new) for a in args]],
      capture_output=True, text=True, timeout=180, check=False, env=conftest.child_env())
  assert done.returncode == 2, done.stderr
  assert done.stderr == (f'error: --link=fast: expected two parts, bandwidth and latency. {FIX} '
                         '(bandwidth in B, KB, MB, GB, KiB, MiB or GiB per s; latency in ms or '
                         's), or none\n'), done.stderr
  assert not new.exists()


@pytest.mark.slow
def test_simulate_with_a_link_makes_every_round_wait_for_its_bytes(tiny_config, tmp_path,
                                                                   monkeypatch):
  """Each silo process reads the global model and sends its delta over its own 500 KB/s."""
  monkeypatch.setenv('XLA_FLAGS', conftest.CHILD_XLA_FLAGS)
  monkeypatch.delenv(storage_lib.LINK_ENV, raising=False)
  fed = tiny_config.federation
  fed.silos, fed.rounds, fed.inner_steps, fed.poll_s = ('web', 'text'), 2, 2, 0.1
  root = str(tmp_path / 'bucket')
  lines = []
  summary = simulation.simulate(tiny_config, TINY, root, str(tmp_path / 'work'),
                                log=lines.append, link='500KB/s,20ms')
  assert "each silo's link to the bucket: 500KB/s,20ms" in lines[1], lines
  store = storage_lib.RunStorage(root)
  model_bytes = ledger.global_nbytes(store, 1)
  assert model_bytes > 1e6  # Over 2 s per read at 500 KB/s.
  for rec in summary['rounds'][1:]:  # Round 0 also holds start-up and compilation.
    r = rec['round']
    # Between global r and r+1 a silo reads the one and uploads its delta for the other.
    floor = min((model_bytes + store.delta_meta(r, s)['bytes']) / 500e3 for s in fed.silos)
    assert rec['seconds'] >= floor - fed.poll_s, (rec['seconds'], floor)
