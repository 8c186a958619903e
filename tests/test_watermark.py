"""Data watermarks (fedpt/watermark.py, data.Watermark): planting, the record, the test.

Data-level tests need no training: the planted stream is the plain one with windows
inserted, exactly; the held-out split never holds them; the record's lifecycle refuses
what would change the data order. The z-test is checked on synthetic losses. One module
fixture trains the tiny model twice (with and without the watermark, from a fixed secret
so the verdicts are deterministic) and verifies both.
"""
import json
import math
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from conftest import child_env
from fedpt import config as config_lib
from fedpt import data
from fedpt import loading
from fedpt import records
from fedpt import trainer as trainer_lib
from fedpt import watermark

SECRET = '5eed' * 16  # A fixed secret: the test's verdicts must not depend on luck.
TOKENIZER_SHA256 = data.file_sha256(data.default_tokenizer_path())


def _record(count: int, length: int, repeats: int, secret: str = SECRET) -> dict:
  return {'format': watermark.FORMAT,
          'settings': {'count': count, 'length': length, 'repeats': repeats,
                       'vocab_size': 4096},
          'secret': secret, 'sequences_seed': watermark.sequences_seed(secret),
          'tokenizer_sha256': TOKENIZER_SHA256}


def _stream(dataset, steps, seq_len, mark=None, batch=16, seed=7, **where):
  return np.concatenate([dataset.batch(s, global_batch=batch, seq_len=seq_len, seed=seed,
                                       watermark=mark, **where) for s in range(steps)])


def test_planting_inserts_windows_and_keeps_the_corpus_order(corpus_dir):
  seq_len = 2047  # ~770 windows: the stream crosses two epochs in ~100 steps.
  train = data.TokenDataset(corpus_dir, 'train')
  windows = train.num_windows(seq_len)
  mark = watermark.from_record(_record(count=3, length=seq_len + 1, repeats=5))
  epoch = windows + mark.per_epoch
  steps = -(-2 * epoch // 16) + 1
  marked = _stream(train, steps, seq_len, mark)
  planted = np.array([any((row == s).all() for s in mark.sequences) for row in marked])
  # Every epoch of the stream holds each sequence exactly `repeats` times...
  for e in range(2):
    rows = marked[e * epoch:(e + 1) * epoch][planted[e * epoch:(e + 1) * epoch]]
    counts = [int(sum((r == s).all() for r in rows)) for s in mark.sequences]
    assert counts == [5, 5, 5], (e, counts)
  # ...at positions that differ between epochs, and the rest is the plain stream, exactly.
  assert not np.array_equal(np.flatnonzero(planted[:epoch]),
                            np.flatnonzero(planted[epoch:2 * epoch]) - epoch)
  plain = _stream(train, steps, seq_len)
  rest = marked[~planted]
  np.testing.assert_array_equal(rest, plain[:len(rest)])
  # Each host's rows are its rows of the same global batches.
  halves = [_stream(train, 3, seq_len, mark, process_index=i, process_count=2)
            for i in range(2)]
  np.testing.assert_array_equal(
      np.concatenate([np.concatenate([h[s * 8:(s + 1) * 8] for h in halves])
                      for s in range(3)]), marked[:48])
  # A sequence shorter than a window starts it; the filler is fresh at every planting.
  short = watermark.from_record(_record(count=1, length=10, repeats=100))
  rows = _stream(train, 8, seq_len, short, seed=1)
  hits = rows[(rows[:, :10] == short.sequences[0]).all(axis=1)]
  assert len(hits) >= 2 and len({r[10:].tobytes() for r in hits}) == len(hits)
  assert hits.min() >= data.FIRST_ORDINARY_ID and hits.max() < 4096
  # The held-out split never holds a planted window: nothing reads it with a watermark.
  val = data.TokenDataset(corpus_dir, 'val')
  held = np.concatenate(val.eval_batches(4, global_batch=16, seq_len=seq_len)
                        + [t for t, _ in val.whole_batches(global_batch=16, seq_len=seq_len)])
  assert not any((row == s).all() for row in held for s in mark.sequences)


def test_record_lifecycle(tiny_config, tmp_path, capsys):
  config = tiny_config
  config.data.watermark.update(enabled=True, count=2, repeats=3)
  workdir = str(tmp_path / 'w')
  opened = dict(vocab_size=4096, tokenizer_sha256=TOKENIZER_SHA256, windows=1000)
  # A party's own choice: never in run.json; a length that overflows a window is refused.
  assert not [k for k in records.contract(config) if 'watermark' in k]
  bad = config.copy_and_resolve_references()
  bad.data.watermark.length = config.data.seq_len + 2
  with pytest.raises(config_lib.ConfigError, match='data.watermark.length'):
    config_lib.validate(bad)
  off = config.copy_and_resolve_references()
  off.data.watermark.enabled = False
  assert watermark.open_watermark(off, workdir, start_step=0, **opened) is None
  assert not os.path.exists(workdir)

  first = watermark.open_watermark(config, workdir, start_step=0, **opened)
  path = watermark.record_path(workdir)
  record = json.loads(path.read_text())
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
  assert record['settings'] == {'count': 2, 'length': 65, 'repeats': 3, 'vocab_size': 4096}
  assert len(record['secret']) == 64 and record['secret'] not in capsys.readouterr().out
  assert first.sequences.shape == (2, 65)
  # A resume reuses the secret: the same sequences at the same positions (bit-identical).
  again = watermark.open_watermark(config, workdir, start_step=5, **opened)
  np.testing.assert_array_equal(again.sequences, first.sequences)
  assert [again.locate(i, 1000, 65)[0] for i in range(2000)] == [
      first.locate(i, 1000, 65)[0] for i in range(2000)]
  other = watermark.open_watermark(config, str(tmp_path / 'other'), start_step=0, **opened)
  assert not np.array_equal(other.sequences, first.sequences)  # A fresh secret per workdir.

  changed = config.copy_and_resolve_references()
  changed.data.watermark.count = 3
  with pytest.raises(watermark.WatermarkError, match=r'count=3 \(yours\) vs 2 \(recorded\)'):
    watermark.open_watermark(changed, workdir, start_step=5, **opened)
  with pytest.raises(watermark.WatermarkError, match='turning it off mid-run'):
    watermark.open_watermark(off, workdir, start_step=5, **opened)
  for broken, problem in (('{', 'not readable JSON'),
                          (json.dumps({**record, 'sequences_seed': '0' * 64}),
                           'not the one its secret derives'),
                          (json.dumps({**record, 'secret': 'xyz'}), 'not 64 hex digits'),
                          (json.dumps({**record, 'settings': {**record['settings'],
                                                              'count': -1}}),
                           'settings.count is -1')):
    path.write_text(broken)
    with pytest.raises(watermark.WatermarkError, match=problem):
      watermark.open_watermark(config, workdir, start_step=5, **opened)
  path.unlink()
  with pytest.raises(watermark.WatermarkError, match='holds no watermark.json: either it was '
                     'lost'):
    watermark.open_watermark(config, workdir, start_step=5, **opened)


def test_z_test_on_synthetic_losses():
  rng = np.random.default_rng(0)
  null = rng.normal(9.5, 0.2, 1000)
  stats = watermark.z_test([9.0, 9.1, 8.9, 9.0], null)
  mean, std = null.mean(), null.std(ddof=1)
  assert stats['z'] == pytest.approx((9.0 - mean) / (std / 2))
  assert stats['p_value'] == pytest.approx(0.5 * math.erfc(-stats['z'] / math.sqrt(2)))
  assert stats['p_value'] < 1e-6 and stats['p_rank'] == pytest.approx(1 / 251)
  assert watermark.z_test([9.5], null)['p_value'] == pytest.approx(0.5, abs=0.05)
  # Under the null (watermark losses drawn like the null's) p is uniform: ~5% below 0.05.
  p = [watermark.z_test(rng.normal(9.5, 0.2, 4), rng.normal(9.5, 0.2, 500))['p_value']
       for _ in range(400)]
  assert 0.02 < np.mean(np.array(p) < 0.05) < 0.09
  for wm, null_losses, problem in (([1.0], [2.0], 'two null losses'),
                                   ([1.0], [2.0, 2.0], 'same loss'),
                                   ([np.nan], [1.0, 2.0], 'not finite')):
    with pytest.raises(watermark.WatermarkError, match=problem):
      watermark.z_test(wm, null_losses)


def test_the_model_to_test_is_one_source():
  assert watermark.model_source('w') == loading.Source(workdir='w')
  assert watermark.model_source('w', model_workdir='m', step=3) == loading.Source(
      workdir='m', step=3)
  assert watermark.model_source('w', storage='b', round_index=2) == loading.Source(
      storage='b', round_index=2)
  for bad, problem in (({'storage': 'b', 'model_workdir': 'm'}, 'name two models'),
                       ({'round_index': 1}, '--round goes with --storage'),
                       ({'storage': 'b', 'step': 1}, '--step goes with a workdir')):
    with pytest.raises(watermark.WatermarkError, match=problem):
      watermark.model_source('w', **bad)


@pytest.fixture(scope='module')
def trained(corpus_dir, tmp_path_factory):
  """The tiny model trained with the watermark and, from the same seed, without it."""
  from conftest import load_config  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('watermark')
  out = {}
  for enabled in (True, False):
    config = load_config('tiny', corpus_dir)
    config.train.update(steps=30, checkpoint_every=30, eval_every=30, log_every=30,
                        eval_batches=1, async_checkpoints=False)
    config.data.watermark.update(enabled=enabled, count=2, repeats=400)
    workdir = str(root / ('with' if enabled else 'without'))
    if enabled:  # The record a first start writes, with a fixed secret.
      watermark._write_record(workdir, _record(2, 65, 400))  # pylint: disable=protected-access
    trainer_lib.train_and_evaluate(config, workdir)
    out[enabled] = workdir
  return out


@pytest.mark.slow
def test_verify_detects_the_model_trained_on_the_watermark(trained):
  marked = trained[True]
  results = {}
  for enabled, workdir in trained.items():
    config = loading.source_config(workdir=workdir)
    results[enabled] = watermark.verify(config, marked, loading.Source(workdir=workdir),
                                        null_samples=500)
  yes, no = results[True], results[False]
  assert yes['p_value'] < 0.01 and yes['z'] < -3 and yes['p_rank'] < 0.01, yes
  assert no['p_value'] > 0.05, no
  assert 'TRAINED ON THE WATERMARK' in yes['verdict'] and 'no evidence' in no['verdict']
  assert yes['null_samples'] == 500 and len(yes['watermark_losses']) == 2
  text = watermark.render(yes)
  assert 'verdict: TRAINED' in text and SECRET not in text and SECRET not in json.dumps(yes)

  # Out-of-range test arguments are refused before the model is read.
  source = loading.Source(workdir=marked)
  for kwargs, problem in (({'null_samples': 1}, 'needs at least 2'),
                          ({'null_samples': 10**10}, 'at most 1,000,000'),
                          ({'alpha': 1.5}, 'is not a significance level')):
    with pytest.raises(watermark.WatermarkError, match=problem):
      watermark.verify(loading.source_config(workdir=marked), marked, source, **kwargs)

  # Bad input: one line, exit status 2 (a workdir without a record; no --verify).
  script = [sys.executable, os.path.join(os.path.dirname(__file__), '..', 'scripts',
                                         'watermark.py')]
  for extra, expected in ((['--verify', f'--workdir={trained[False]}'],
                           'holds no watermark.json'),
                          ([f'--workdir={marked}'], 'pass --verify')):
    done = subprocess.run(script + extra, capture_output=True, text=True, timeout=120,
                          env=child_env(), check=False)
    assert done.returncode == 2 and expected in done.stderr, done.stderr
    assert 'Traceback' not in done.stderr and len(done.stderr.strip().splitlines()) == 1
