"""fedpt decodes every text source itself: bad text is named, repaired or skipped, and
never reaches SentencePiece."""
import json

import numpy as np
import pytest

from fedpt import data


def _write_jsonl(path, lines):
  path.write_bytes(b''.join(line + b'\n' for line in lines))
  return str(path)


def _read(specs, on_bad_text):
  sources = data.read_sources(specs, on_bad_text=on_bad_text)
  return list(sources), sources.bad_text


def test_invalid_utf8_in_a_jsonl_line_is_named_repaired_or_skipped(tmp_path):
  path = _write_jsonl(tmp_path / 'c.jsonl', [
      b'{"text": "one"}', b'{"text": "two"}',
      b'{"text": "caf\xe9 \xe2\x82x"}',  # Latin-1 e-acute, then a cut 3-byte sequence.
      b'{"text": "four"}'])
  with pytest.raises(data.DataError) as error:
    list(data.read_sources([path]))
  assert str(error.value) == (
      f'{path}:3: byte 0xe9 at column 14 is not UTF-8 (Latin-1, cp1252 or binary data?). '
      'Fix: re-encode the source as UTF-8, or pass --on_bad_text=replace or skip')
  docs, counts = _read([path], 'replace')
  assert docs == ['one', 'two', 'caf\ufffd \ufffd\ufffdx', 'four']  # One U+FFFD per byte.
  assert counts == {'replaced': 1, 'skipped': 0}
  assert _read([path], 'skip') == (['one', 'two', 'four'], {'replaced': 0, 'skipped': 1})
  with pytest.raises(data.DataError, match='use one of error, replace, skip'):
    data.read_sources([path], on_bad_text='ignore')


def test_directory_source_is_read_recursively_in_sorted_order(tmp_path):
  (tmp_path / 'b' / 'deep').mkdir(parents=True)
  (tmp_path / '.git').mkdir()
  (tmp_path / 'b' / 'deep' / 'z.txt').write_text('deep z')
  (tmp_path / 'b' / 'a.md').write_text('# b/a')
  (tmp_path / 'b' / 'rows.jsonl').write_bytes(  # A BOM starts the file.
      '\ufeff{"text": "row 1"}\n{"text": "row 2"}\n'.encode())
  (tmp_path / 'a.rst').write_text('top a')
  (tmp_path / 'code.py').write_text('not a text extension')
  (tmp_path / '.notes.txt').write_text('hidden file')
  (tmp_path / '.git' / 'HEAD.txt').write_text('hidden folder')
  assert list(data.read_sources([str(tmp_path)])) == [
      'top a', '# b/a', 'deep z', 'row 1', 'row 2']
  empty = tmp_path / 'empty'
  (empty / 'sub').mkdir(parents=True)
  (empty / 'sub' / 'only.py').write_text('x = 1')
  with pytest.raises(data.DataError, match=f'Directory {empty} holds no text files'):
    data.read_sources([str(empty)])


def test_undecodable_file_in_a_directory_is_named(tmp_path):
  (tmp_path / 'sub').mkdir()
  (tmp_path / 'a.txt').write_text('fine')
  latin = tmp_path / 'sub' / 'latin.txt'
  latin.write_bytes('first\nna\u00efve caf\u00e9\n'.encode('cp1252'))
  with pytest.raises(data.DataError,
                     match=rf'^{latin}:2: byte 0xef at column 3 is not UTF-8 .*Fix: re-encode'):
    list(data.read_sources([str(tmp_path)]))
  assert _read([str(tmp_path)], 'replace') == (
      ['fine', 'first\nna\ufffdve caf\ufffd\n'], {'replaced': 1, 'skipped': 0})
  assert _read([str(tmp_path)], 'skip') == (['fine'], {'replaced': 0, 'skipped': 1})


def test_lone_surrogate_is_replaced_in_the_tokenised_text(tmp_path):
  path = _write_jsonl(tmp_path / 's.jsonl', [
      json.dumps({'text': 'low half \udc00 alone'}).encode(), b'{"text": "clean = 1"}'])
  with pytest.raises(data.DataError,
                     match=r":1: field 'text': lone surrogate \\udc00 at column 10 "):
    list(data.read_sources([path]))
  meta = data.prepare_data(data.read_sources([path], on_bad_text='replace'),
                           data.default_tokenizer_path(), str(tmp_path / 'out'), val_fraction=0.0)
  assert meta['bad_text'] == {'replaced': 1, 'skipped': 0}
  assert json.loads((tmp_path / 'out' / 'meta.json').read_text())['bad_text'] == meta['bad_text']
  tokens = np.fromfile(tmp_path / 'out' / 'train.bin', '<u2')
  sp = data.load_tokenizer(data.default_tokenizer_path())
  ends = np.flatnonzero(tokens == sp.eos_id())
  texts = [sp.decode(tokens[s:e].tolist()) for s, e in zip([0, *(ends[:-1] + 1)], ends)]
  assert sorted(texts) == ['clean = 1', 'low half \ufffd alone']


def test_nul_and_records_without_text_are_skipped_and_counted(tmp_path):
  (tmp_path / 'utf16.txt').write_bytes('hi'.encode('utf-16-le'))  # h NUL i NUL.
  (tmp_path / 'ok.txt').write_text('plain')
  rows = _write_jsonl(tmp_path / 'rows.jsonl', [
      b'{"text": "nul \\u0000 escaped"}', b'{"text": null}', b'{"body": "other"}',
      b'{"text": "kept"}', b'{"text": truncated'])
  specs = [str(tmp_path / '*.txt'), rows]
  with pytest.raises(data.DataError, match=r'utf16.txt:1: NUL character at column 2 '):
    list(data.read_sources(specs))
  assert _read(specs, 'skip') == (['plain', 'kept'], {'replaced': 0, 'skipped': 5})
  # replace repairs the NULs and drops the records that hold no text to repair.
  assert _read(specs, 'replace') == (
      ['plain', 'h\ufffdi\ufffd', 'nul \ufffd escaped', 'kept'], {'replaced': 2, 'skipped': 3})
  numbers = _write_jsonl(tmp_path / 'numbers.jsonl', [b'{"text": "a"}', b'{"text": 7}'])
  with pytest.raises(data.DataError) as error:
    list(data.read_sources([numbers]))
  assert str(error.value) == (
      f"{numbers}:2: field 'text' is a int, not text. Fix: set --text_field to a string "
      'field, or pass --on_bad_text=skip to drop such records')


def test_bad_tfds_record_is_named_by_its_number(monkeypatch):
  records = [{'text': b'good'}, {'text': b'\xff\xfe bad'}, {'text': 'fine'}]
  monkeypatch.setattr(data, '_open_tfds', lambda spec, data_dir: records)
  with pytest.raises(data.DataError,
                     match=r"^tfds:fake:train\[1\]: field 'text': byte 0xff at column 1 is not"):
    list(data.read_sources(['tfds:fake:train']))
  assert _read(['tfds:fake:train'], 'replace') == (
      ['good', '\ufffd\ufffd bad', 'fine'], {'replaced': 1, 'skipped': 0})


def test_no_bad_text_reaches_sentencepiece(tmp_path):
  for bad in ('x\ud83d', 'a\nb\x00'):
    with pytest.raises(data.DataError, match=r'^Document 1, line \d: .*Fix: pass valid text'):
      data.prepare_data(['ok', bad], data.default_tokenizer_path(), str(tmp_path / 'out'))
    with pytest.raises(data.DataError, match=r'^Document 1, line \d: '):
      data.train_tokenizer(['ok', bad], str(tmp_path / 'sp'))
  assert not list(tmp_path.iterdir())
  path = _write_jsonl(tmp_path / 't.jsonl', [
      json.dumps({'text': f'def f{i}(x):\n  return x + {i}  # \udfff\n'}).encode()
      for i in range(50)])
  sources = data.read_sources([path], on_bad_text='replace')
  model = data.train_tokenizer(sources, str(tmp_path / 'sp'), vocab_size=300)
  assert sources.bad_text == {'replaced': 50, 'skipped': 0}
  sp = data.load_tokenizer(model)
  assert sp.decode(sp.encode('# \ufffd')) == '# \ufffd'
  with pytest.raises(data.DataError, match=r'No text .*policy skipped 50 record\(s\)'):
    data.train_tokenizer(data.read_sources([path], on_bad_text='skip'), str(tmp_path / 'sp2'))


def test_json_the_parser_refuses_is_a_bad_record_and_a_bad_prompt_is_named(tmp_path):
  path = _write_jsonl(tmp_path / 'n.jsonl', [
      b'{"text": "one"}', b'{"text": "two", "n": ' + b'9' * 5000 + b'}', b'[' * 100_000])
  with pytest.raises(data.DataError, match=f'{path}:2: invalid JSON .*Exceeds the limit'):
    list(data.read_sources([path]))
  assert _read([path], 'skip') == (['one'], {'replaced': 0, 'skipped': 2})
  with pytest.raises(data.DataError, match='the prompt: line 2: lone surrogate .udce9'):
    data.check_text('ok\ncaf\udce9', 'the prompt')
