"""Tests for fedpt.data: corpus, tokenizer, shards and the stateless loader."""
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from fedpt import data

# Real code plus the characters that lossy tokenizers get wrong.
TRICKY_TEXT = (
    'def f(x, y=10):\n'
    '\tif x:  # tab-indented\n'
    '        return "naïve café ✓ 日本語 🙂"\n'
    '    \n'
    'x = 1234567890 + 0.5e-3\r\n'
    '  leading and trailing spaces   \n\n\n'
    '\x00\x7f weird controls\n')


@pytest.fixture(scope='module')
def small_docs():
  """~300 KB of real code: the stdlib 'concurrency' group's first files."""
  docs = [d for d in data.stdlib_documents('concurrency') if d][:40]
  assert 150_000 < sum(map(len, docs)) < 1_500_000
  return docs


@pytest.fixture(scope='module')
def prepared(tmp_path_factory, small_docs):
  out_dir = str(tmp_path_factory.mktemp('prepared') / 'corpus')
  meta = data.prepare_data(small_docs, data.default_tokenizer_path(), out_dir,
                           val_fraction=0.1)
  return out_dir, meta


@pytest.fixture(scope='module')
def tiny_dir(tmp_path_factory):
  """A corpus of ~2K tokens, small enough to walk whole epochs."""
  docs = [f'item_{i} = {i * 7}  # the number {i}\n' * (1 + i % 4)
          for i in range(60)]
  out_dir = str(tmp_path_factory.mktemp('tiny') / 'corpus')
  data.prepare_data(docs, data.default_tokenizer_path(), out_dir)
  return out_dir


def _split_documents(tokens, eos_id):
  """Token stream -> tuple of per-document token tuples (EOS-terminated)."""
  ends = np.flatnonzero(np.asarray(tokens) == eos_id)
  starts = np.concatenate([[0], ends[:-1] + 1])
  return [tuple(tokens[s:e]) for s, e in zip(starts, ends)]


# ----------------------------------------------------------------------------
# Default corpus.
# ----------------------------------------------------------------------------


def test_stdlib_groups_are_disjoint_nontrivial_and_cover_all():
  groups = [g for g in data.STDLIB_GROUPS]
  assert len(groups) >= 4
  members = [m for g in groups for m in data.STDLIB_GROUPS[g]]
  assert len(members) == len(set(members))
  all_docs = data.stdlib_documents('all')
  group_docs = {g: data.stdlib_documents(g) for g in groups}
  for group, docs in group_docs.items():
    assert sum(map(len, docs)) > 1_500_000, group
  assert sum(len(d) for d in group_docs.values()) == len(all_docs)
  assert sorted(d for docs in group_docs.values() for d in docs) == sorted(
      all_docs)
  assert any('import asyncio' in d for d in group_docs['concurrency'])


def test_stdlib_documents_are_sorted_and_skip_tests():
  files = data._stdlib_files()
  assert [p for p, _ in files] == sorted(p for p, _ in files)
  parts = {part for p, _ in files for part in p.split(os.sep)[:-1]}
  assert not parts & {'test', 'tests', 'idle_test', 'site-packages'}
  assert data.stdlib_documents('web') == data.stdlib_documents('web')


def test_unknown_group_lists_valid_ones():
  with pytest.raises(data.DataError,
                     match="Unknown stdlib group 'nope'.*'web'"):
    data.stdlib_documents('nope')


# ----------------------------------------------------------------------------
# Tokenizer.
# ----------------------------------------------------------------------------


def test_default_tokenizer_round_trips_code_exactly(small_docs):
  sp = data.load_tokenizer(data.default_tokenizer_path())
  assert sp.get_piece_size() == 4096
  assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
  texts = [TRICKY_TEXT, *small_docs[:10]]
  for text, ids in zip(texts, sp.encode(texts)):
    assert sp.decode(ids) == text
  digits = [sp.id_to_piece(i) for i in sp.encode('x = 2024')]
  assert digits[-4:] == ['2', '0', '2', '4']
  # Code compresses well: > 3 characters per token on real sources.
  num_tokens = sum(map(len, sp.encode(small_docs)))
  assert sum(map(len, small_docs)) / num_tokens > 3.0


def test_train_tokenizer_tiny_model(tmp_path, small_docs):
  path = data.train_tokenizer(small_docs[:5], str(tmp_path / 'sub' / 'sp'),
                              vocab_size=400)
  assert path == str(tmp_path / 'sub' / 'sp.model')
  sp = data.load_tokenizer(path)
  assert sp.get_piece_size() == 400
  assert sp.eos_id() == data.EOS_ID
  assert sp.decode(sp.encode(TRICKY_TEXT)) == TRICKY_TEXT
  again = data.train_tokenizer(small_docs[:5], str(tmp_path / 'again'), 400)
  assert data.file_sha256(again) == data.file_sha256(path)


def test_train_tokenizer_errors(tmp_path, small_docs):
  with pytest.raises(data.DataError, match='increase vocab_size'):
    data.train_tokenizer(small_docs[:2], str(tmp_path / 'sp'), vocab_size=100)
  with pytest.raises(data.DataError, match='No text'):
    data.train_tokenizer(['', ''], str(tmp_path / 'sp'))


def test_load_tokenizer_errors(tmp_path):
  with pytest.raises(data.DataError, match='does not exist'):
    data.load_tokenizer(str(tmp_path / 'missing.model'))
  junk = tmp_path / 'junk.model'
  junk.write_bytes(b'not a model')
  with pytest.raises(data.DataError, match='not a SentencePiece model'):
    data.load_tokenizer(str(junk))


# ----------------------------------------------------------------------------
# Reading sources.
# ----------------------------------------------------------------------------


def test_read_sources_text_glob_and_jsonl(tmp_path):
  (tmp_path / 'b.txt').write_text('second\n\tdoc é')
  (tmp_path / 'a.txt').write_text('first doc')
  (tmp_path / 'c.jsonl').write_text(
      '{"text": "j1", "id": 1}\n\n{"text": "j2\\nline"}\n')
  (tmp_path / 'd.jsonl').write_text('{"body": "other field"}\n')
  docs = list(data.read_sources([str(tmp_path / '*.txt'),
                                 str(tmp_path / 'c.jsonl')]))
  assert docs == ['first doc', 'second\n\tdoc é', 'j1', 'j2\nline']
  assert list(data.read_sources([str(tmp_path / 'd.jsonl')],
                                text_field='body')) == ['other field']


def test_read_sources_errors(tmp_path):
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"text": "ok"}\n{"text": oops}\n')
  with pytest.raises(data.DataError, match=f'{bad}:2: invalid JSON'):
    list(data.read_sources([str(bad)]))
  no_field = tmp_path / 'nofield.jsonl'
  no_field.write_text('{"body": "x"}\n')
  with pytest.raises(data.DataError,
                     match=r"nofield.jsonl:1: .*no field 'text'.*--text_field"):
    list(data.read_sources([str(no_field)]))
  with pytest.raises(data.DataError, match='does not exist'):
    data.read_sources([str(tmp_path / 'missing.txt')])  # Fails before reading.
  with pytest.raises(data.DataError, match='matches no files'):
    data.read_sources([str(tmp_path / '*.nothing')])
  (tmp_path / 'empty').mkdir()
  with pytest.raises(data.DataError, match='holds no text files'):
    data.read_sources([str(tmp_path / 'empty')])
  binary = tmp_path / 'x.bin'
  binary.write_bytes(b'\xff\xfe\x00')
  with pytest.raises(data.DataError, match='not UTF-8'):
    list(data.read_sources([str(binary)]))


def test_read_sources_tfds_array_record(tmp_path):
  """A real array_record TFDS dataset built offline, without TensorFlow."""
  tfds = pytest.importorskip('tensorflow_datasets')

  class FedptTinyText(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({'text': tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples(3),
              'test': self._generate_examples(2)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {'text': f'doc {i}: naïve\n\tcode'}

  data_dir = str(tmp_path / 'tfds')
  FedptTinyText(data_dir=data_dir, file_format='array_record'
                ).download_and_prepare()
  docs = list(data.read_sources(['tfds:fedpt_tiny_text:test'],
                                tfds_data_dir=data_dir))
  assert sorted(docs) == ['doc 0: naïve\n\tcode', 'doc 1: naïve\n\tcode']
  assert len(list(data.read_sources(['tfds:fedpt_tiny_text'],
                                    tfds_data_dir=data_dir))) == 3
  with pytest.raises(data.DataError, match="no field 'body'"):
    list(data.read_sources(['tfds:fedpt_tiny_text'], 'body',
                           tfds_data_dir=data_dir))
  with pytest.raises(data.DataError, match='tfds build no_such_dataset'):
    data.read_sources(['tfds:no_such_dataset'], tfds_data_dir=data_dir)


# ----------------------------------------------------------------------------
# Preparing shards.
# ----------------------------------------------------------------------------


def test_prepare_data_meta_matches_files(prepared, small_docs):
  out_dir, meta = prepared
  sp = data.load_tokenizer(data.default_tokenizer_path())
  assert meta['format_version'] == data.FORMAT_VERSION
  assert meta['tokenizer_sha256'] == data.file_sha256(
      data.default_tokenizer_path())
  assert (meta['vocab_size'], meta['dtype'], meta['eos_id']) == (
      4096, 'uint16', 3)
  with open(os.path.join(out_dir, 'meta.json')) as f:
    assert json.load(f) == meta
  total_tokens = 0
  for split in ('train', 'val'):
    counts = meta['splits'][split]
    tokens = np.fromfile(os.path.join(out_dir, f'{split}.bin'), '<u2')
    assert os.path.getsize(os.path.join(out_dir, f'{split}.bin')) == (
        2 * counts['tokens'])
    assert np.sum(tokens == sp.eos_id()) == counts['documents'] > 0
    assert tokens[-1] == sp.eos_id()
    total_tokens += counts['tokens']
  assert total_tokens == sum(len(ids) + 1 for ids in sp.encode(small_docs))
  assert sum(c['documents'] for c in meta['splits'].values()) == len(
      small_docs)


def test_prepare_data_is_deterministic_and_order_free(
    prepared, small_docs, tmp_path):
  out_dir, meta = prepared
  again = data.prepare_data(small_docs, data.default_tokenizer_path(),
                            str(tmp_path / 'again'), val_fraction=0.1)
  assert again == meta
  for name in ('train.bin', 'val.bin', 'meta.json'):
    with open(os.path.join(out_dir, name), 'rb') as f1, open(
        tmp_path / 'again' / name, 'rb') as f2:
      assert f1.read() == f2.read(), name
  reversed_meta = data.prepare_data(small_docs[::-1],
                                    data.default_tokenizer_path(),
                                    str(tmp_path / 'reversed'), 0.1)
  assert reversed_meta['splits'] == meta['splits']


def test_prepare_data_splits_are_disjoint_documents(prepared, small_docs):
  out_dir, meta = prepared
  docs = {}
  for split in ('train', 'val'):
    tokens = np.fromfile(os.path.join(out_dir, f'{split}.bin'), '<u2')
    docs[split] = _split_documents(tokens, meta['eos_id'])
    assert len(docs[split]) == meta['splits'][split]['documents']
  assert not set(docs['train']) & set(docs['val'])
  sp = data.load_tokenizer(data.default_tokenizer_path())
  decoded = sorted(sp.decode(list(d)) for s in docs.values() for d in s)
  assert decoded == sorted(small_docs)


def test_prepare_data_tiny_corpus_still_gets_a_val_document(tmp_path):
  meta = data.prepare_data(['a = 1\n', 'b = 2\n', 'c = 3\n'],
                           data.default_tokenizer_path(), str(tmp_path / 'd'))
  assert meta['splits']['val']['documents'] == 1
  assert meta['splits']['train']['documents'] == 2
  assert os.path.getsize(tmp_path / 'd' / 'val.bin') == (
      2 * meta['splits']['val']['tokens'])


def test_prepare_data_errors_leave_nothing_behind(tmp_path):
  out_dir = tmp_path / 'out'
  for empty in ([], ['', '']):
    with pytest.raises(data.DataError, match='corpus is empty'):
      data.prepare_data(empty, data.default_tokenizer_path(), str(out_dir))
  assert os.listdir(tmp_path) == []  # No out dir, no temp dirs.
  with pytest.raises(data.DataError, match='val_fraction'):
    data.prepare_data(['x'], data.default_tokenizer_path(), str(out_dir), 1.0)
  (tmp_path / 'precious').mkdir()
  (tmp_path / 'precious' / 'notes.txt').write_text('keep me')
  with pytest.raises(data.DataError, match='holds other files'):
    data.prepare_data(['x'], data.default_tokenizer_path(),
                      str(tmp_path / 'precious'))
  assert (tmp_path / 'precious' / 'notes.txt').read_text() == 'keep me'


def test_prepare_data_replaces_a_previous_output(tmp_path):
  out_dir = str(tmp_path / 'out')
  data.prepare_data(['first = 1\n'] * 3, data.default_tokenizer_path(),
                    out_dir, 0.0)
  meta = data.prepare_data(['second = 2\n'] * 5, data.default_tokenizer_path(),
                           out_dir, 0.0)
  assert meta['splits']['train']['documents'] == 5
  assert sorted(os.listdir(tmp_path)) == ['out']


def test_default_corpus_dir_caches(tmp_path, monkeypatch):
  monkeypatch.setenv('FEDPT_CACHE', str(tmp_path))
  data_dir = data.default_corpus_dir('concurrency')
  assert data_dir.startswith(str(tmp_path))
  assert 'concurrency' in data_dir and f'py{sys.version_info[0]}.' in data_dir
  meta_mtime = os.path.getmtime(os.path.join(data_dir, 'meta.json'))
  assert data.default_corpus_dir('concurrency') == data_dir
  assert os.path.getmtime(os.path.join(data_dir, 'meta.json')) == meta_mtime
  dataset = data.TokenDataset(data_dir)
  assert dataset.num_tokens > 300_000
  with pytest.raises(data.DataError, match='Unknown stdlib group'):
    data.default_corpus_dir('nope')


# ----------------------------------------------------------------------------
# Loader.
# ----------------------------------------------------------------------------


def test_batch_is_a_pure_function_of_seed_and_step(prepared):
  dataset = data.TokenDataset(prepared[0])
  kwargs = dict(global_batch=8, seq_len=32, seed=1)
  b0 = dataset.batch(0, **kwargs)
  assert b0.shape == (8, 33) and b0.dtype == np.int32
  np.testing.assert_array_equal(b0, data.TokenDataset(prepared[0]).batch(
      0, **kwargs))
  assert not np.array_equal(b0, dataset.batch(1, **kwargs))
  assert not np.array_equal(b0, dataset.batch(0, global_batch=8, seq_len=32,
                                              seed=2))
  assert 0 <= b0.min() and b0.max() < dataset.vocab_size


def test_batch_rows_are_windows_of_the_token_stream(prepared):
  dataset = data.TokenDataset(prepared[0])
  seq_len = 32
  windows = np.asarray(dataset.tokens[:dataset.num_windows(seq_len) *
                                      (seq_len + 1)]).reshape(-1, seq_len + 1)
  batch = dataset.batch(3, global_batch=16, seq_len=seq_len, seed=0)
  for row in batch:
    matches = np.flatnonzero((windows == row).all(axis=1))
    assert len(matches) >= 1
    offset = matches[0] * (seq_len + 1)
    np.testing.assert_array_equal(
        row, dataset.tokens[offset:offset + seq_len + 1])


@pytest.mark.parametrize('process_count', [2, 4])
def test_process_slices_concatenate_to_the_global_batch(prepared,
                                                        process_count):
  dataset = data.TokenDataset(prepared[0])
  kwargs = dict(global_batch=8, seq_len=16, seed=3)
  full = dataset.batch(5, **kwargs)
  parts = [dataset.batch(5, process_index=i, process_count=process_count,
                         **kwargs) for i in range(process_count)]
  assert all(p.shape == (8 // process_count, 17) for p in parts)
  np.testing.assert_array_equal(np.concatenate(parts), full)
  rows = [tuple(r) for p in parts for r in p]
  assert len(set(rows)) == len(rows)


def test_epochs_wrap_and_cover_every_window_once(tiny_dir):
  dataset = data.TokenDataset(tiny_dir)
  seq_len, global_batch = 7, 6
  num_windows = dataset.num_windows(seq_len)
  assert 50 < num_windows < 1000
  steps = -(-3 * num_windows // global_batch)  # Three epochs and a bit.
  rows = np.concatenate([dataset.batch(s, global_batch=global_batch,
                                       seq_len=seq_len, seed=0)
                         for s in range(steps)])
  windows = np.asarray(dataset.tokens[:num_windows * (seq_len + 1)]).reshape(
      num_windows, seq_len + 1)
  expected = sorted(map(tuple, windows))
  epochs = [rows[e * num_windows:(e + 1) * num_windows] for e in range(3)]
  for epoch_rows in epochs:
    assert sorted(map(tuple, epoch_rows)) == expected
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[1], epochs[2])


def test_eval_batches_wrap_when_the_split_is_small(tiny_dir):
  dataset = data.TokenDataset(tiny_dir, 'train')
  seq_len, global_batch = 7, 4
  num_windows = dataset.num_windows(seq_len)
  num_batches = num_windows // global_batch + 2  # Forces a wrap.
  batches = dataset.eval_batches(num_batches, global_batch=global_batch,
                                 seq_len=seq_len)
  assert len(batches) == num_batches
  flat = np.concatenate(batches)
  length = seq_len + 1
  for i in (0, 1, num_windows - 1, num_windows, num_windows + 3):
    w = i % num_windows
    np.testing.assert_array_equal(flat[i],
                                  dataset.tokens[w * length:(w + 1) * length])
  second_half = dataset.eval_batches(num_batches, global_batch=global_batch,
                                     seq_len=seq_len, process_index=1,
                                     process_count=2)
  np.testing.assert_array_equal(second_half[0], batches[0][2:])


def test_eval_batches_spread_over_the_whole_split(tiny_dir):
  dataset = data.TokenDataset(tiny_dir, 'train')
  seq_len, global_batch, num_batches = 7, 2, 2
  num_windows = dataset.num_windows(seq_len)
  assert num_windows > 4 * global_batch * num_batches
  flat = np.concatenate(dataset.eval_batches(num_batches, global_batch=global_batch,
                                             seq_len=seq_len))
  length = seq_len + 1
  for i, row in enumerate(flat):  # Window i * num_windows // 4: first to last quarter.
    w = i * num_windows // 4
    np.testing.assert_array_equal(row, dataset.tokens[w * length:(w + 1) * length])


def test_token_dataset_errors(prepared, tmp_path):
  out_dir, meta = prepared
  with pytest.raises(data.DataError, match='does not exist.*prepare_data.py'):
    data.TokenDataset(str(tmp_path / 'missing'))
  with pytest.raises(data.DataError, match='no meta.json.*prepare_data.py'):
    data.TokenDataset(str(tmp_path))
  wrong_sha = 'f' * 64
  with pytest.raises(data.DataError) as error:
    data.TokenDataset(out_dir, expected_tokenizer_sha256=wrong_sha)
  assert meta['tokenizer_sha256'] in str(error.value)
  assert wrong_sha in str(error.value)
  assert '--tokenizer' in str(error.value)
  with pytest.raises(data.DataError, match="Unknown split 'test'"):
    data.TokenDataset(out_dir, 'test')
  dataset = data.TokenDataset(out_dir, 'val')
  with pytest.raises(data.DataError, match='not divisible by process_count=3'):
    dataset.batch(0, global_batch=8, seq_len=8, seed=0, process_count=3)
  with pytest.raises(data.DataError, match='fewer than one window'):
    dataset.batch(0, global_batch=8, seq_len=dataset.num_tokens, seed=0)
  data.prepare_data(['x = 1\n'] * 4, data.default_tokenizer_path(),
                    str(tmp_path / 'noval'), val_fraction=0.0)
  with pytest.raises(data.DataError, match="Split 'val' .* is empty"):
    data.TokenDataset(str(tmp_path / 'noval'), 'val')


def test_token_dataset_rejects_truncated_shards(tmp_path):
  out_dir = tmp_path / 'd'
  data.prepare_data(['x = 1\n'] * 4, data.default_tokenizer_path(),
                    str(out_dir), 0.0)
  with open(out_dir / 'train.bin', 'r+b') as f:
    f.truncate(2)
  with pytest.raises(data.DataError, match='does not hold the'):
    data.TokenDataset(str(out_dir))


# ----------------------------------------------------------------------------
# Config resolution and scripts.
# ----------------------------------------------------------------------------


def _data_config(**overrides):
  config = ml_collections.ConfigDict(
      dict(corpus='stdlib', stdlib_group='web', tokenizer='default'))
  config.update(overrides)
  return config


def test_resolve_corpus(prepared, tmp_path, monkeypatch):
  monkeypatch.setenv('FEDPT_CACHE', str(tmp_path / 'cache'))
  data_dir, tokenizer = data.resolve_corpus(_data_config())
  assert tokenizer == data.default_tokenizer_path()
  assert data_dir.startswith(str(tmp_path / 'cache')) and 'web' in data_dir
  assert data.resolve_corpus(_data_config(corpus=prepared[0])) == (
      prepared[0], data.default_tokenizer_path())
  with pytest.raises(data.DataError, match='data.corpus=.*prepare_data.py'):
    data.resolve_corpus(_data_config(corpus=str(tmp_path / 'nope')))
  with pytest.raises(data.DataError, match='data.tokenizer=.*does not exist'):
    data.resolve_corpus(_data_config(tokenizer=str(tmp_path / 'x.model')))


def test_resolve_corpus_rejects_mismatched_tokenizer(prepared, tmp_path,
                                                     small_docs):
  other = data.train_tokenizer(small_docs[:3], str(tmp_path / 'sp'), 400)
  with pytest.raises(data.DataError, match='set data.tokenizer to the .model'):
    data.resolve_corpus(_data_config(corpus=prepared[0], tokenizer=other))


def _run_script(repo_root, name, *args):
  return subprocess.run(
      [sys.executable, str(repo_root / 'scripts' / name), *args],
      capture_output=True, text=True, timeout=60, check=False)


def test_scripts_prepare_data_and_clean_errors(repo_root, tmp_path):
  (tmp_path / 'src' / 'sub').mkdir(parents=True)
  (tmp_path / 'src' / 'a.txt').write_text('print("hello")\n' * 50)
  (tmp_path / 'src' / 'sub' / 'b.md').write_text('x = [1, 2, 3]\n' * 50)
  bad = tmp_path / 'src' / 'sub' / 'c.txt'
  bad.write_bytes(b'ok\nstray \x93quote\x94\n')  # cp1252 curly quotes.
  source = f'--source={tmp_path}/src'
  result = _run_script(repo_root, 'prepare_data.py', source,
                       f'--out={tmp_path}/out', '--on_bad_text=skip')
  assert result.returncode == 0, result.stderr
  assert ('bad text (--on_bad_text=skip): 0 records replaced, 1 skipped'
          in result.stdout)
  meta = json.loads((tmp_path / 'out' / 'meta.json').read_text())
  assert sum(s['documents'] for s in meta['splits'].values()) == 2
  assert meta['sources'] == [f'{tmp_path}/src']
  assert meta['bad_text'] == {'replaced': 0, 'skipped': 1}
  result = _run_script(repo_root, 'prepare_data.py', source,
                       f'--out={tmp_path}/out2')
  assert result.returncode == 2
  assert result.stderr.splitlines() == [
      f'error: {bad}:2: byte 0x93 at column 7 is not UTF-8 (Latin-1, cp1252 '
      'or binary data?). Fix: re-encode the source as UTF-8, or pass '
      '--on_bad_text=replace or skip']
  assert not (tmp_path / 'out2').exists()


def test_scripts_train_tokenizer(repo_root, tmp_path):
  (tmp_path / 'code.jsonl').write_text(''.join(
      json.dumps({'text': f'def f{i}(x):\n    return x * {i}\n'}) + '\n'
      for i in range(300)) + '{"text": "lone \\udbff half"}\n')
  result = _run_script(repo_root, 'train_tokenizer.py',
                       f'--input={tmp_path}/code.jsonl',
                       f'--model_prefix={tmp_path}/sp', '--vocab_size=300',
                       '--on_bad_text=replace')
  assert result.returncode == 0, result.stderr
  assert ('bad text (--on_bad_text=replace): 1 records replaced, 0 skipped'
          in result.stdout)
  assert data.load_tokenizer(str(tmp_path / 'sp.model')).get_piece_size() == 300


def test_scripts_prepare_data_val_is_exactly_the_val_file(repo_root, tmp_path):
  """--val: nothing is held out of train by hash; val is the --val file's tokens."""
  train_text = ''.join(f'total_{i} = {i} * 7\n' for i in range(300))
  val_text = 'held out = True\n' * 3
  (tmp_path / 'train.txt').write_text(train_text)
  (tmp_path / 'val.txt').write_text(val_text)
  (tmp_path / 'empty.txt').write_text('')
  result = _run_script(repo_root, 'prepare_data.py', f'--source={tmp_path}/train.txt',
                       f'--val={tmp_path}/val.txt', f'--out={tmp_path}/out', '--seq_len=64')
  assert result.returncode == 0, result.stderr
  tokenizer = data.load_tokenizer(data.default_tokenizer_path())
  eos = tokenizer.eos_id()
  meta = json.loads((tmp_path / 'out' / 'meta.json').read_text())
  assert np.fromfile(tmp_path / 'out' / 'val.bin', np.uint16).tolist() == (
      tokenizer.encode(val_text) + [eos])
  assert np.fromfile(tmp_path / 'out' / 'train.bin', np.uint16).tolist() == (
      tokenizer.encode(train_text) + [eos])
  assert meta['val_sources'] == [f'{tmp_path}/val.txt'] and meta['val_fraction'] is None
  # A val of fewer than TINY_SPLIT_WINDOWS windows of seq_len+1 warns; train does not.
  warnings = [line for line in result.stderr.splitlines() if line.startswith('warning: ')]
  assert len(warnings) == 1 and 'the val split is tiny' in warnings[0], result.stderr
  # An empty val is refused, and so is a single document with nothing held out.
  for args in ([f'--val={tmp_path}/empty.txt'], []):
    result = _run_script(repo_root, 'prepare_data.py', f'--source={tmp_path}/train.txt',
                         *args, f'--out={tmp_path}/bad')
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith('error: The val split would be empty') and (
        len(result.stderr.splitlines()) == 1), result.stderr
    assert not (tmp_path / 'bad').exists()
