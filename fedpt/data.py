"""Data pipeline: default corpus, tokenizer, token shards, stateless loader.

The pipeline has three stages, each usable on its own:

  1. Text: `stdlib_documents()` (the Python standard library's sources, which
     every Python install already has, so nothing needs downloading) or
     `read_sources()` (text files, JSONL, directories of them, TFDS
     array_record datasets), which decodes every byte of text itself under
     one bad-text policy, so nothing malformed reaches SentencePiece.
  2. Shards: `prepare_data()` tokenises documents once into flat `train.bin` /
     `val.bin` token files plus `meta.json` (see docs/data.md).
  3. Batches: `TokenDataset.batch()` is a pure function of (seed, step, row),
     so every host reads only its own rows and resuming needs no loader state.

Bad input raises `DataError`, whose message names the problem and the fix.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
import codecs
import glob
import hashlib
import io
import json
import os
import re
import shutil
import sys
import sysconfig
import tempfile
from typing import Any

import numpy as np
import sentencepiece as spm

from fedpt import errors

FORMAT_VERSION = 1
DEFAULT_VOCAB_SIZE = 4096
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

_ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets')
_DEFAULT_TOKENIZER = os.path.join(_ASSETS_DIR, 'stdlib_sp4k.model')


class DataError(errors.UserError, ValueError):
  """Bad data input; the message says what is wrong and how to fix it."""


# ----------------------------------------------------------------------------
# Default corpus: the Python standard library's own sources.
# ----------------------------------------------------------------------------

# Top-level stdlib packages/modules by domain, so that federated silos fed
# different groups see genuinely different (non-IID) text. Names missing from
# the running Python version (e.g. distutils after 3.11) are simply absent.
# Everything not listed lands in 'core'.
STDLIB_GROUPS: dict[str, tuple[str, ...]] = {
    # Networking protocols, web and mail formats.
    'web': (
        'base64', 'cgi', 'cgitb', 'email', 'ftplib', 'html', 'http',
        'imaplib', 'ipaddress', 'json', 'mailbox', 'mailcap', 'mimetypes',
        'nntplib', 'poplib', 'quopri', 'smtpd', 'smtplib', 'telnetlib',
        'urllib', 'uu', 'webbrowser', 'wsgiref', 'xml', 'xmlrpc',
    ),
    # Concurrency, processes, sockets and the OS layer they sit on.
    'concurrency': (
        '_pyio', '_threading_local', 'asynchat', 'asyncio', 'asyncore',
        'concurrent', 'ctypes', 'logging', 'multiprocessing', 'os', 'pty',
        'queue', 'sched', 'selectors', 'shutil', 'signal', 'socket',
        'socketserver', 'ssl', 'subprocess', 'tempfile', 'threading', 'tty',
    ),
    # Text processing, codecs and parsing of small text formats.
    'text': (
        '_markupbase', 'codecs', 'csv', 'difflib', 'encodings', 'fnmatch',
        'gettext', 'glob', 'locale', 'pprint', 're', 'reprlib', 'shlex',
        'sre_compile', 'sre_constants', 'sre_parse', 'string', 'stringprep',
        'textwrap', 'tokenize', 'token',
    ),
    # Developer tooling: GUIs, debuggers, profilers, test and build tools.
    'tools': (
        'bdb', 'cProfile', 'compileall', 'distutils', 'doctest', 'ensurepip',
        'idlelib', 'lib2to3', 'pdb', 'profile', 'pstats', 'py_compile',
        'pydoc', 'pydoc_data', 'tabnanny', 'timeit', 'tkinter', 'trace',
        'turtle', 'turtledemo', 'unittest', 'venv', 'zipapp',
    ),
}
_CORE_GROUP = 'core'
_ALL_GROUP = 'all'

_EXCLUDED_DIRS = frozenset({'test', 'tests', 'idle_test', 'site-packages',
                            'dist-packages', '__pycache__'})


def _is_build_specific(top_level: str) -> bool:
  """Files generated for this particular build differ between machines."""
  return top_level.startswith(('_sysconfigdata', 'config-'))


def _stdlib_files() -> list[tuple[str, str]]:
  """(relative path, top-level name) of every stdlib source, sorted by path."""
  root = sysconfig.get_paths()['stdlib']
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
    for filename in filenames:
      if not filename.endswith('.py'):
        continue
      rel_path = os.path.relpath(os.path.join(dirpath, filename), root)
      parts = rel_path.split(os.sep)
      top_level = parts[0] if len(parts) > 1 else filename[:-3]
      if not _is_build_specific(top_level):
        files.append((rel_path, top_level))
  return sorted(files)


def _core_members() -> tuple[str, ...]:
  listed = {name for members in STDLIB_GROUPS.values() for name in members}
  return tuple(sorted({top for _, top in _stdlib_files()} - listed))


# 'core' is whatever the other groups leave out, so together they cover every
# file of whichever Python version is running.
STDLIB_GROUPS[_CORE_GROUP] = _core_members()


def _group_of(top_level: str) -> str:
  for group, members in STDLIB_GROUPS.items():
    if top_level in members:
      return group
  return _CORE_GROUP


def stdlib_documents(group: str = _ALL_GROUP) -> list[str]:
  """Source files of one stdlib group, one document per file, sorted by path."""
  if group != _ALL_GROUP and group not in STDLIB_GROUPS:
    valid = ', '.join(repr(g) for g in [*STDLIB_GROUPS, _ALL_GROUP])
    raise DataError(f'Unknown stdlib group {group!r}; use one of: {valid}.')
  root = sysconfig.get_paths()['stdlib']
  documents = []
  for rel_path, top_level in _stdlib_files():
    if group == _ALL_GROUP or _group_of(top_level) == group:
      with open(os.path.join(root, rel_path), 'rb') as f:
        # Stdlib sources are UTF-8 (PEP 3120); 'replace' only guards against a
        # distro-patched file failing the whole corpus.
        documents.append(f.read().decode('utf-8', errors='replace'))
  return documents


# ----------------------------------------------------------------------------
# Tokenizer.
# ----------------------------------------------------------------------------


def default_tokenizer_path() -> str:
  """The shipped 4096-piece tokenizer trained on stdlib_documents('all')."""
  return _DEFAULT_TOKENIZER


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


# SentencePiece skips training sentences longer than max_sentence_length
# bytes, so documents are cut into chunks of whole lines (long lines are cut
# too) that always fit: 4 bytes per character at most in UTF-8.
_TRAIN_CHUNK_CHARS = 2000
_TRAIN_MAX_SENTENCE_BYTES = 4 * _TRAIN_CHUNK_CHARS
# Caps training text at ~100M characters so training stays around a minute
# however large the corpus; a seeded reservoir sample keeps it deterministic.
_TRAIN_MAX_CHUNKS = 50_000
_TRAIN_SEED = 0
# The thread count is recorded in the .model file, so it is fixed to keep the
# file's bytes (and hence its sha256) independent of the machine.
_TRAIN_THREADS = 2


def _training_chunks(documents: Iterable[str]) -> Iterator[str]:
  for document in documents:
    chunk, chunk_chars = [], 0
    for line in document.splitlines(keepends=True):
      pieces = [line[i:i + _TRAIN_CHUNK_CHARS]
                for i in range(0, len(line), _TRAIN_CHUNK_CHARS)]
      for piece in pieces:
        if chunk_chars + len(piece) > _TRAIN_CHUNK_CHARS:
          yield ''.join(chunk)
          chunk, chunk_chars = [], 0
        chunk.append(piece)
        chunk_chars += len(piece)
    if chunk:
      yield ''.join(chunk)


def _reservoir_sample(items: Iterable[str], size: int, seed: int) -> list[str]:
  rng = np.random.default_rng(seed)
  sample = []
  for i, item in enumerate(items):
    if i < size:
      sample.append(item)
    else:
      j = int(rng.integers(0, i + 1))
      if j < size:
        sample[j] = item
  return sample


def train_tokenizer(documents: Iterable[str], model_prefix: str,
                    vocab_size: int = DEFAULT_VOCAB_SIZE) -> str:
  """Trains a lossless SentencePiece BPE model and returns its .model path.

  Settings are chosen so that decode(encode(text)) == text for any text:
  identity normalisation, whitespace kept verbatim and byte fallback for
  characters outside the vocabulary. Whitespace runs (indentation) may form
  pieces, which matters for code. Ids: pad=0, unk=1, bos=2, eos=3.
  """
  chunks = _reservoir_sample(_training_chunks(_checked_documents(documents)),
                             _TRAIN_MAX_CHUNKS, _TRAIN_SEED)
  if not chunks:
    raise DataError('No text to train the tokenizer on; pass non-empty '
                    f'documents (check the --input specs){_skipped(documents)}.')
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(chunks),
        model_writer=model,
        vocab_size=vocab_size,
        model_type='bpe',
        byte_fallback=True,
        normalization_rule_name='identity',
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        split_by_whitespace=False,
        character_coverage=0.9995,
        max_sentence_length=_TRAIN_MAX_SENTENCE_BYTES,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=_TRAIN_THREADS,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        minloglevel=2,
    )
  except RuntimeError as e:
    # Bad text never gets here (_checked_documents), so these are about size.
    if 'required_chars' in str(e):
      fix = ('increase vocab_size: it must cover 256 byte pieces, 4 special '
             'pieces and the frequent characters of the text')
    elif 'too high' in str(e):
      fix = 'use a smaller vocab_size or more text'
    else:
      fix = 'try another vocab_size, or more or different text'
    raise DataError(f'SentencePiece could not train a {vocab_size}-piece '
                    f'tokenizer ({str(e).strip()}); {fix}.') from e
  model_path = model_prefix + '.model'
  os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
  _write_atomically(model_path, model.getvalue())
  return model_path


def _write_atomically(path: str, content: bytes) -> None:
  tmp_path = f'{path}.tmp-{os.getpid()}'
  with open(tmp_path, 'wb') as f:
    f.write(content)
  os.replace(tmp_path, path)


def load_tokenizer(path: str) -> spm.SentencePieceProcessor:
  if not os.path.isfile(path):
    hint = ('train it with scripts/train_tokenizer.py'
            if os.path.abspath(path) == _DEFAULT_TOKENIZER else
            'check the path, or use the shipped default_tokenizer_path()')
    raise DataError(f'Tokenizer file {path} does not exist; {hint}.')
  try:
    return spm.SentencePieceProcessor(model_file=path)
  except (RuntimeError, OSError) as e:
    raise DataError(
        f'{path} is not a SentencePiece model ({str(e).strip()}); point to '
        'the .model file written by scripts/train_tokenizer.py.') from e


# ----------------------------------------------------------------------------
# Reading raw text.
# ----------------------------------------------------------------------------

_TFDS_PREFIX = 'tfds:'
# What a directory source reads (recursively, hidden files and folders left
# out); other files, e.g. code, are named with a glob such as 'DIR/**/*.py'.
TEXT_EXTENSIONS = ('.jsonl', '.md', '.rst', '.text', '.txt')
# What to do with a record (a JSONL line, a text file, a TFDS record) whose text
# is not valid: stop, repair it with U+FFFD, or drop it.
BAD_TEXT_POLICIES = ('error', 'replace', 'skip')
# Characters sentencepiece must never see: lone UTF-16 surrogates (UTF-8 cannot
# encode them; undecodable bytes become them under 'surrogateescape') and NUL,
# which betrays binary data or UTF-16.
_BAD_CHARS = re.compile('[\x00\ud800-\udfff]')
_POLICY_FIX = 'or pass --on_bad_text=replace or skip'
_SKIP_FIX = 'or pass --on_bad_text=skip to drop such records'


class TextSources:
  """The documents of read_sources, decoded under one bad-text policy.

  Iterating reads the sources afresh; `bad_text` then counts the records the
  policy repaired ('replaced') or dropped ('skipped'), for the caller to report.
  """

  def __init__(self, readers, on_bad_text: str):
    self._readers = readers
    self.on_bad_text = on_bad_text
    self.bad_text = {'replaced': 0, 'skipped': 0}

  def __iter__(self) -> Iterator[str]:
    self.bad_text = {'replaced': 0, 'skipped': 0}
    for reader in self._readers:
      for where, text, problem in reader():
        if problem is None:
          yield text
        elif self.on_bad_text == 'error':
          raise DataError(f'{where}: {problem}')
        elif self.on_bad_text == 'skip' or text is None:
          self.bad_text['skipped'] += 1
        else:
          self.bad_text['replaced'] += 1
          yield text


def read_sources(specs: Sequence[str], text_field: str = 'text', *,
                 tfds_data_dir: str | None = None,
                 on_bad_text: str = 'error') -> TextSources:
  """Documents from text files, JSONL files, directories and TFDS datasets.

  Each spec is one of:
    * a path or glob of text files (`data/*.txt`): one document per file;
    * a path or glob of `.jsonl` files: one document per line, from the
      string field `text_field`;
    * a directory: its files ending in TEXT_EXTENSIONS, recursively, sorted
      by path (`.jsonl` ones read as JSONL);
    * `tfds:NAME[/CONFIG][:SPLIT]` (split defaults to 'train'): a TFDS
      dataset prepared in array_record format, read with tfds.data_source so
      TensorFlow is not needed. Its directory is `tfds_data_dir`, else TFDS's
      default ($TFDS_DATA_DIR or ~/tensorflow_datasets).

  Text must be UTF-8 without NUL; a record that is not (or that has no text)
  is handled by `on_bad_text`, one of BAD_TEXT_POLICIES: 'error' raises
  DataError naming its file and line, 'replace' puts U+FFFD for each bad byte,
  lone surrogate or NUL (and drops records with no text to repair), 'skip'
  drops it. Every spec is resolved before the first document is read, so a
  typo in the last spec fails fast instead of after hours of reading.
  """
  if isinstance(specs, str):
    specs = [specs]
  if not specs:
    raise DataError('No data sources given; pass at least one file, glob, '
                    'directory or tfds:NAME spec.')
  if on_bad_text not in BAD_TEXT_POLICIES:
    raise DataError(f'on_bad_text={on_bad_text!r} is not a policy. Fix: use '
                    f'one of {", ".join(BAD_TEXT_POLICIES)}.')
  readers = [_resolve_spec(spec, text_field, tfds_data_dir) for spec in specs]
  return TextSources(readers, on_bad_text)


def _resolve_spec(spec, text_field, tfds_data_dir):
  """Checks that a spec names existing data; returns its record reader."""
  if spec.startswith(_TFDS_PREFIX):
    source = _open_tfds(spec, tfds_data_dir)
    return lambda: _read_tfds(spec, source, text_field)
  paths = source_files(spec)
  return lambda: _read_files(paths, text_field)


def source_files(spec: str) -> list[str]:
  """The files a (non-tfds) source spec names, sorted; DataError if it names none.

  What read_sources will read, so callers can check access or fingerprint a
  source (size and mtime) without reading it.
  """
  if glob.has_magic(spec):
    paths = [p for p in sorted(glob.glob(spec, recursive=True))
             if os.path.isfile(p)]
    if not paths:
      raise DataError(f'Glob {spec!r} matches no files; check the pattern '
                      '(quote it so the shell does not expand it).')
  elif os.path.isdir(spec):
    paths = _text_files(spec)
    if not paths:
      raise DataError(
          f'Directory {spec} holds no text files ({", ".join(TEXT_EXTENSIONS)}'
          ', searched recursively); check the path, or name other files with '
          f'a glob such as {os.path.join(spec, "**", "*.py")!r}.')
  elif not os.path.isfile(spec):
    raise DataError(f'Data file {spec} does not exist; check the path.')
  else:
    paths = [spec]
  return paths


def _text_files(directory: str) -> list[str]:
  def refuse(error: OSError):  # An unreadable folder is not silently skipped.
    raise DataError(f'cannot read {error.filename}: {error.strerror}. Fix: grant read access '
                    'to every folder of the source, or pass the readable ones')
  paths = []
  for dirpath, dirnames, filenames in os.walk(directory, onerror=refuse):
    dirnames[:] = [d for d in dirnames if not d.startswith('.')]
    paths.extend(os.path.join(dirpath, name) for name in filenames
                 if not name.startswith('.') and
                 name.lower().endswith(TEXT_EXTENSIONS))
  return sorted(paths)


def _read_files(paths, text_field):
  """(where, text or None, problem or None) of each record of the files."""
  for path in paths:
    if path.lower().endswith('.jsonl'):
      yield from _read_jsonl(path, text_field)
      continue
    with _open(path) as f:
      text, bad = _decode(f.read())
    yield (path, text, None) if bad is None else (f'{path}:{bad[0]}', text,
                                                   bad[1])


def _open(path):
  try:
    return open(path, 'rb')
  except OSError as e:
    raise DataError(f'{path}: cannot be read ({e.strerror}). Fix: check its '
                    'permissions, or leave it out of the sources.') from e


# Each returns (text with U+FFFD for each bad byte or character; None, or the
# line of the first one and what is wrong with it, with the fix).


def _decode(raw: bytes) -> tuple[str, tuple[int, str] | None]:
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError as e:
    line_start = raw.rfind(b'\n', 0, e.start) + 1
    what = (f'byte 0x{raw[e.start]:02x} at column {e.start - line_start + 1} '
            'is not UTF-8 (Latin-1, cp1252 or binary data?). Fix: re-encode '
            f'the source as UTF-8, {_POLICY_FIX}')
    return (_BAD_CHARS.sub('\ufffd', raw.decode('utf-8', 'surrogateescape')),
            (raw.count(b'\n', 0, e.start) + 1, what))
  return _clean(text)


def _clean(text: str) -> tuple[str, tuple[int, str] | None]:
  bad = _bad_char(text)
  if bad is None:
    return text, None
  return (_BAD_CHARS.sub('\ufffd', text),
          (bad[0], f'{bad[1]}. Fix: correct or remove it, {_POLICY_FIX}'))


def check_text(text: str, where: str) -> None:
  """Raises DataError if `text` (typed by a user, e.g. a prompt) cannot be tokenised."""
  bad = _bad_char(text)
  if bad is not None:
    raise DataError(f'{where}: line {bad[0]}: {bad[1]}. Fix: pass valid UTF-8 text')


def _bad_char(text: str) -> tuple[int, str] | None:
  """The line of the first lone surrogate or NUL and what it is, or None."""
  match = _BAD_CHARS.search(text)
  if match is None:
    return None
  index, char = match.start(), match.group()
  column = index - text.rfind('\n', 0, index)
  if char == '\x00':
    what = f'NUL character at column {column} (binary data or UTF-16?)'
  else:
    what = (f'lone surrogate \\u{ord(char):04x} at column {column} (half a '
            'UTF-16 pair, which UTF-8 cannot encode)')
  return text.count('\n', 0, index) + 1, what


def _read_jsonl(path, text_field):
  with _open(path) as f:
    for line_number, raw_line in enumerate(f, start=1):
      where = f'{path}:{line_number}'
      if line_number == 1:  # Windows tools start UTF-8 files with a BOM.
        raw_line = raw_line.removeprefix(codecs.BOM_UTF8)
      line, bad = _decode(raw_line)
      if not line.strip():
        continue
      bad = bad and bad[1]
      try:
        record = json.loads(line)
      except (ValueError, RecursionError) as e:  # Also 5000-digit numbers, deep nesting.
        what = (f'{e.msg} at column {e.colno}' if isinstance(e, json.JSONDecodeError)
                else errors.one_line(e))
        yield where, None, bad or (
            f'invalid JSON ({what}). Fix: correct or delete that line, {_SKIP_FIX}')
        continue
      text, problem = _text_of(record, text_field)
      yield where, text, bad or problem


def _text_of(record: Any, text_field: str) -> tuple[str | None, str | None]:
  """(the record's text, repaired, or None; what is wrong with it or None)."""
  if not isinstance(record, dict) or text_field not in record:
    fields = sorted(record) if isinstance(record, dict) else []
    return None, (f'record has no field {text_field!r} (fields: {fields}). '
                  'Fix: set --text_field to the field that holds the text, '
                  f'{_SKIP_FIX}')
  text = record[text_field]
  if isinstance(text, bytes):
    text, bad = _decode(text)
  elif isinstance(text, str):
    text, bad = _clean(text)
  else:
    return None, (f'field {text_field!r} is a {type(text).__name__}, not '
                  'text. Fix: set --text_field to a string field, '
                  f'{_SKIP_FIX}')
  return text, bad and f'field {text_field!r}: {bad[1]}'


def _checked_documents(documents: Iterable[str]) -> Iterator[str]:
  """Documents as sentencepiece must get them: str, UTF-8-encodable, no NUL."""
  for i, text in enumerate(documents):
    if not isinstance(text, str):
      raise DataError(f'Document {i} is a {type(text).__name__}, not str; '
                      'pass decoded text.')
    bad = _bad_char(text)
    if bad is not None:
      raise DataError(f'Document {i}, line {bad[0]}: {bad[1]}. Fix: pass '
                      'valid text, e.g. read it with read_sources(on_bad_text'
                      '=...).')
    yield text


def _skipped(documents) -> str:
  """A note for an empty result: the bad-text policy may have dropped it all."""
  skipped = (documents.bad_text['skipped']
             if isinstance(documents, TextSources) else 0)
  return (f'; the bad-text policy skipped {skipped} record(s) (rerun with '
          '--on_bad_text=error to see why)' if skipped else '')


def _parse_tfds_spec(spec: str) -> tuple[str, str]:
  name, _, split = spec[len(_TFDS_PREFIX):].partition(':')
  if not name:
    raise DataError(f'{spec!r} names no dataset; write tfds:NAME[/CONFIG]'
                    '[:SPLIT], e.g. tfds:wikipedia/20230601.en:train.')
  return name, split or 'train'


def _open_tfds(spec, data_dir):
  name, split = _parse_tfds_spec(spec)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir,
                            download=False)
  except Exception as e:  # pylint: disable=broad-except
    # TFDS raises many unrelated types here (not found, bad split, wrong file
    # format); all mean the dataset is not usable as given.
    where = data_dir or os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets')
    raise DataError(
        f'Cannot open {spec!r} from TFDS data dir {where} '
        f'({type(e).__name__}: {str(e).strip().splitlines()[0]}); prepare it '
        f'with `tfds build {name} --file_format=array_record` (array_record '
        'gives random access without TensorFlow) and check the split name.'
    ) from e


def _read_tfds(spec, source, text_field):
  for i in range(len(source)):
    yield (f'{spec}[{i}]', *_text_of(source[i], text_field))


# ----------------------------------------------------------------------------
# Token shards: out_dir/{train,val}.bin + meta.json.
# ----------------------------------------------------------------------------

_SPLITS = ('train', 'val')
_META_FILE = 'meta.json'
_ENCODE_BATCH_DOCS = 256
_PREPARE_HINT = 'run scripts/prepare_data.py --source=... --out=DIR'


def _token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype('<u2') if vocab_size <= 2**16 else np.dtype('<u4')


def _split_hash(text: str) -> float:
  """Uniform in [0, 1) and a function of the text alone, so a document lands
  in the same split whatever order or company it comes in."""
  digest = hashlib.sha256(text.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'little') / 2**64


def prepare_data(documents: Iterable[str], tokenizer_path: str, out_dir: str,
                 val_fraction: float = 0.02, *,
                 sources: Sequence[str] | None = None,
                 val_documents: Iterable[str] | None = None,
                 val_sources: Sequence[str] | None = None,
                 require_splits: bool = False) -> dict[str, Any]:
  """Tokenises documents into out_dir/{train,val}.bin and meta.json.

  Each document is followed by EOS. Output is written into a temporary
  sibling directory that replaces out_dir only when complete (meta.json
  last), so an interrupted run never leaves a directory that looks valid.
  `sources` is a free-form description stored in meta.json. With
  `val_documents` (e.g. read_sources of a held-out file) every document of
  `documents` goes to train and val is exactly `val_documents`
  (`val_fraction` is ignored); meta.json records `val_sources` (None: held out
  by hash). `require_splits`: an empty train or val split raises DataError
  (with the fix) before out_dir is touched. Returns the meta.
  """
  if not 0.0 <= val_fraction < 1.0:
    raise DataError(f'val_fraction={val_fraction} is outside [0, 1); use e.g. '
                    '0.02 (2% of documents for validation).')
  out_dir = os.path.abspath(out_dir)
  _check_replaceable(out_dir)
  tokenizer = load_tokenizer(tokenizer_path)
  vocab_size = tokenizer.get_piece_size()
  dtype = _token_dtype(vocab_size)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp_dir = tempfile.mkdtemp(prefix=f'.{os.path.basename(out_dir)}.tmp-',
                             dir=parent)
  explicit_val = val_documents is not None
  try:
    counts = _write_splits(documents, tokenizer, dtype, val_fraction, tmp_dir,
                           val_documents)
    if require_splits:
      _check_splits(counts, val_fraction, explicit_val)
    meta = {
        'format_version': FORMAT_VERSION,
        'tokenizer_sha256': file_sha256(tokenizer_path),
        'vocab_size': vocab_size,
        'dtype': dtype.name,
        'byte_order': 'little',
        'eos_id': tokenizer.eos_id(),
        'val_fraction': None if explicit_val else val_fraction,
        'splits': counts,
        'sources': list(sources) if sources is not None else None,
        # Where val came from: None, held out from `sources` by hash.
        'val_sources': (list(val_sources) if val_sources is not None else
                        ['(val documents)'] if explicit_val else None),
        # Plain documents with bad text raise, so they have none to count.
        'bad_text': _bad_text_counts(documents, val_documents),
    }
    with open(os.path.join(tmp_dir, _META_FILE), 'w') as f:
      json.dump(meta, f, indent=2, sort_keys=True)
      f.write('\n')
      f.flush()
      os.fsync(f.fileno())
    _move_into_place(tmp_dir, out_dir)
  finally:
    shutil.rmtree(tmp_dir, ignore_errors=True)
  return meta


def _bad_text_counts(documents, val_documents) -> dict[str, int]:
  counts = {'replaced': 0, 'skipped': 0}
  for docs in (documents, val_documents):
    if isinstance(docs, TextSources):
      for key in counts:
        counts[key] += docs.bad_text[key]
  return counts


def _check_splits(counts, val_fraction, explicit_val) -> None:
  """An empty split cannot be trained or evaluated on: say so, with the fix, before writing."""
  train, val = counts['train']['documents'], counts['val']['documents']
  if train == 0:
    fix = ('pass more training text' if explicit_val else
           f'lower --val_fraction (now {val_fraction}) or pass more documents')
    raise DataError(f'The train split would be empty ({val} document(s), all in val). Fix: {fix}.')
  if val == 0:
    if explicit_val:
      raise DataError('The val split would be empty: the --val sources hold no non-empty '
                      'document. Fix: pass a --val file with held-out text.')
    raise DataError(
        f'The val split would be empty: {train} document(s), none held out at '
        f'val_fraction={val_fraction} (a text file is one document). Fix: hold out text of '
        'your own (scripts/prepare_data.py --val=FILE), or give more documents (a JSONL file '
        'holds one per line, a directory one per file), or raise --val_fraction.')


# A split of fewer windows of seq_len + 1 tokens than this is worth a warning: training
# repeats it every few steps, and held-out losses on it are noise.
TINY_SPLIT_WINDOWS = 4


def tiny_split_warnings(meta: dict[str, Any], seq_len: int) -> list[str]:
  """One line per split of `meta` with fewer than TINY_SPLIT_WINDOWS windows of seq_len+1."""
  lines = []
  for split in _SPLITS:
    tokens = meta['splits'][split]['tokens']
    windows = tokens // (seq_len + 1)
    if windows < TINY_SPLIT_WINDOWS:
      lines.append(
          f'the {split} split is tiny: {tokens} tokens, {windows} window(s) of seq_len+1 = '
          f'{seq_len + 1} (fewer than {TINY_SPLIT_WINDOWS}); '
          + ('not one window: a run of this seq_len cannot use it' if windows == 0 else
             'training will repeat it every few steps' if split == 'train' else
             'its held-out loss will be noisy') + '. Fix: add text'
          + ('' if split == 'train' else ' to val (--val=FILE or a larger --val_fraction)'))
  return lines


def _write_splits(documents, tokenizer, dtype, val_fraction, out_dir, val_documents=None):
  """Streams documents to the split files; returns per-split counts.

  `val_documents` None: each document's split is chosen by its hash; else every
  document of `documents` is train and every one of `val_documents` is val.
  """
  counts = {split: {'tokens': 0, 'documents': 0} for split in _SPLITS}
  # The train document with the smallest hash: moved to val if val would
  # otherwise be empty (tiny corpora), which keeps the choice order-free.
  first_train_doc = None  # (hash, start token, end token)
  eos = tokenizer.eos_id()
  streams = ([(documents, None)] if val_documents is None else
             [(documents, 'train'), (val_documents, 'val')])
  files = {s: open(os.path.join(out_dir, f'{s}.bin'), 'wb') for s in _SPLITS}
  try:
    for stream, fixed_split in streams:
      for batch in _batched_documents(stream):
        for text, ids in zip(batch, tokenizer.encode(batch)):
          position = _split_hash(text) if fixed_split is None else 1.0
          split = fixed_split or ('val' if position < val_fraction else 'train')
          tokens = np.array(ids + [eos], dtype=dtype)
          start = counts[split]['tokens']
          if split == 'train' and (first_train_doc is None or
                                   position < first_train_doc[0]):
            first_train_doc = (position, start, start + len(tokens))
          files[split].write(tokens.tobytes())
          counts[split]['tokens'] += len(tokens)
          counts[split]['documents'] += 1
    for f in files.values():
      f.flush()
      os.fsync(f.fileno())
  finally:
    for f in files.values():
      f.close()
  if counts['train']['documents'] + counts['val']['documents'] == 0:
    raise DataError('The corpus is empty (no non-empty documents); check the '
                    'sources, e.g. that the glob matches text files and '
                    f'--text_field names the text{_skipped(documents)}.')
  if (val_documents is None and val_fraction > 0 and counts['val']['documents'] == 0 and
      counts['train']['documents'] >= 2):
    _move_document_to_val(out_dir, dtype, counts, *first_train_doc[1:])
  return counts


def _batched_documents(documents):
  batch = []
  for text in _checked_documents(documents):
    if text:
      batch.append(text)
    if len(batch) == _ENCODE_BATCH_DOCS:
      yield batch
      batch = []
  if batch:
    yield batch


def _move_document_to_val(out_dir, dtype, counts, start, end):
  train_path = os.path.join(out_dir, 'train.bin')
  train = np.fromfile(train_path, dtype=dtype)
  np.concatenate([train[:start], train[end:]]).tofile(train_path)
  train[start:end].tofile(os.path.join(out_dir, 'val.bin'))
  counts['train']['tokens'] -= end - start
  counts['train']['documents'] -= 1
  counts['val'] = {'tokens': end - start, 'documents': 1}


_PREPARED_FILES = frozenset({_META_FILE, *(f'{s}.bin' for s in _SPLITS)})


def _check_replaceable(out_dir: str) -> None:
  """Refuses to overwrite anything but an empty or prepared directory."""
  if not os.path.exists(out_dir):
    return
  if not os.path.isdir(out_dir):
    raise DataError(f'Output {out_dir} exists and is not a directory; choose '
                    'another --out.')
  unexpected = sorted(set(os.listdir(out_dir)) - _PREPARED_FILES)
  if unexpected:
    raise DataError(f'Output dir {out_dir} holds other files ({unexpected[:3]}'
                    '); pass a new or empty directory so nothing is lost.')


def _move_into_place(tmp_dir: str, out_dir: str) -> None:
  if not os.path.exists(out_dir):
    os.rename(tmp_dir, out_dir)
    return
  old_dir = tempfile.mkdtemp(prefix=f'.{os.path.basename(out_dir)}.old-',
                             dir=os.path.dirname(out_dir))
  os.rename(out_dir, os.path.join(old_dir, 'data'))
  os.rename(tmp_dir, out_dir)
  shutil.rmtree(old_dir, ignore_errors=True)


def _read_meta(data_dir: str) -> dict[str, Any]:
  meta_path = os.path.join(data_dir, _META_FILE)
  if not os.path.isdir(data_dir):
    raise DataError(f'Data dir {data_dir} does not exist; {_PREPARE_HINT}.')
  if not os.path.isfile(meta_path):
    raise DataError(f'{data_dir} has no {_META_FILE}, so it is not a prepared '
                    f'(or is a half-written) data dir; {_PREPARE_HINT}.')
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, ...
    raise DataError(f'{meta_path} is corrupt ({errors.one_line(e)}); {_PREPARE_HINT}.') from None
  if not isinstance(meta, dict):
    raise DataError(f'{meta_path} is corrupt (not a JSON object); {_PREPARE_HINT}.')
  if meta.get('format_version') != FORMAT_VERSION:
    raise DataError(
        f'{data_dir} has format_version {meta.get("format_version")}, this '
        f'code reads {FORMAT_VERSION}; {_PREPARE_HINT} again.')
  return meta


def _is_prepared(data_dir: str, tokenizer_sha256: str) -> bool:
  """Whether data_dir is complete and was made with this tokenizer."""
  try:
    meta = _read_meta(data_dir)
  except DataError:
    return False
  if meta.get('tokenizer_sha256') != tokenizer_sha256:
    return False
  itemsize = np.dtype(meta['dtype']).itemsize
  for split in _SPLITS:
    path = os.path.join(data_dir, f'{split}.bin')
    expected = meta['splits'][split]['tokens'] * itemsize
    if not os.path.isfile(path) or os.path.getsize(path) != expected:
      return False
  return True


def default_cache_root() -> str:
  return os.environ.get('FEDPT_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'fedpt')


def default_corpus_dir(group: str = _ALL_GROUP, cache_root: str | None = None,
                       *, tokenizer_path: str | None = None) -> str:
  """Prepared stdlib corpus for `group`, built on first use and then cached.

  The cache key holds the Python version (its stdlib is the text), the group
  and the tokenizer's sha256, so a stale entry is never reused.
  """
  if group != _ALL_GROUP and group not in STDLIB_GROUPS:
    stdlib_documents(group)  # Raises the DataError listing valid groups.
  return cached_stdlib_corpus(group, lambda: stdlib_documents(group), f'stdlib group {group!r}',
                              cache_root=cache_root, tokenizer_path=tokenizer_path)


def cached_stdlib_corpus(name: str, documents, source: str, *, val_fraction: float = 0.02,
                         cache_root: str | None = None,
                         tokenizer_path: str | None = None) -> str:
  """`documents()` (text drawn from this Python's stdlib) prepared once, then cached.

  The cache key holds the Python version (its stdlib is the text), `name` and the
  tokenizer's sha256, so a stale entry is never reused; `name` must also tell apart
  different `documents` or `val_fraction`.
  """
  tokenizer_path = tokenizer_path or default_tokenizer_path()
  load_tokenizer(tokenizer_path)  # Fails early on a missing/bad tokenizer.
  tokenizer_sha256 = file_sha256(tokenizer_path)
  python_version = '.'.join(map(str, sys.version_info[:3]))
  data_dir = os.path.join(
      cache_root or default_cache_root(),
      f'stdlib-py{python_version}-{name}-{tokenizer_sha256[:12]}')
  if not _is_prepared(data_dir, tokenizer_sha256):
    print(f'tokenising the built-in corpus ({source}) into {data_dir}: once per Python '
          'version and tokenizer, about 30 s for the whole stdlib', flush=True)
    prepare_data(documents(), tokenizer_path, data_dir, val_fraction=val_fraction,
                 sources=[f'python{python_version} {source}'])
  return data_dir


# ----------------------------------------------------------------------------
# Stateless loader.
# ----------------------------------------------------------------------------

_SHUFFLE_ROUNDS = 4


def _epoch_seed(seed: int, epoch: int) -> int:
  """A 32-bit seed (what index_shuffle takes) per (seed, epoch)."""
  digest = hashlib.sha256(f'{seed}:{epoch}'.encode()).digest()
  return int.from_bytes(digest[:4], 'little')


class TokenDataset:
  """One split of a prepared data dir, read as windows of seq_len + 1 tokens.

  The token stream is cut into non-overlapping windows; batches are a pure
  function of (seed, step, row), so any host can compute exactly its rows of
  any step without loader state, and resuming from step N is exact.
  """

  def __init__(self, data_dir: str, split: str = 'train',
               expected_tokenizer_sha256: str | None = None):
    self.meta = _read_meta(data_dir)
    if split not in self.meta['splits']:
      raise DataError(f'Unknown split {split!r}; use one of '
                      f'{sorted(self.meta["splits"])}.')
    self.tokenizer_sha256: str = self.meta['tokenizer_sha256']
    if (expected_tokenizer_sha256 is not None and
        expected_tokenizer_sha256 != self.tokenizer_sha256):
      raise DataError(
          f'{data_dir} was tokenised with a tokenizer of sha256 '
          f'{self.tokenizer_sha256}, but the configured tokenizer has sha256 '
          f'{expected_tokenizer_sha256}; configure the tokenizer used by '
          'prepare_data, or re-run scripts/prepare_data.py with --tokenizer '
          'set to yours.')
    self.vocab_size: int = self.meta['vocab_size']
    self.eos_id: int = self.meta['eos_id']
    self.num_tokens: int = self.meta['splits'][split]['tokens']
    path = os.path.join(data_dir, f'{split}.bin')
    dtype = np.dtype(self.meta['dtype']).newbyteorder('<')
    if self.num_tokens == 0:
      raise DataError(f'Split {split!r} of {data_dir} is empty; re-run '
                      'scripts/prepare_data.py with more documents or a '
                      'larger --val_fraction.')
    if (not os.path.isfile(path) or
        os.path.getsize(path) != self.num_tokens * dtype.itemsize):
      raise DataError(f'{path} is missing or does not hold the '
                      f'{self.num_tokens} tokens meta.json promises; '
                      f'{_PREPARE_HINT} again.')
    self.tokens = np.memmap(path, dtype=dtype, mode='r',
                            shape=(self.num_tokens,))
    self._split = split
    self._data_dir = data_dir

  def num_windows(self, seq_len: int) -> int:
    return self.num_tokens // (seq_len + 1)

  def _check_batch_args(self, global_batch, seq_len, process_index,
                        process_count, need_window: bool = True) -> int:
    """Validates the arguments; returns the number of windows."""
    if global_batch <= 0 or seq_len <= 0:
      raise DataError(f'global_batch={global_batch} and seq_len={seq_len} '
                      'must both be positive.')
    if process_count <= 0 or not 0 <= process_index < process_count:
      raise DataError(f'process_index={process_index} must be in '
                      f'[0, process_count={process_count}).')
    if global_batch % process_count:
      raise DataError(
          f'global_batch={global_batch} is not divisible by '
          f'process_count={process_count}; make the global batch a multiple '
          'of the number of processes.')
    num_windows = self.num_windows(seq_len)
    if num_windows == 0 and (need_window or self.num_tokens < 2):
      raise DataError(
          f'Split {self._split!r} of {self._data_dir} has {self.num_tokens} '
          f'tokens, fewer than one window of seq_len + 1 = {seq_len + 1}; '
          'use a shorter seq_len or more data.')
    return num_windows

  def _window(self, window: int, seq_len: int) -> np.ndarray:
    return self.tokens[window * (seq_len + 1):(window + 1) * (seq_len + 1)]

  def _gather(self, windows: Sequence[int], seq_len: int) -> np.ndarray:
    return np.stack([self._window(w, seq_len) for w in windows]).astype(np.int32)

  def _local_rows(self, global_batch, process_index, process_count) -> range:
    local_batch = global_batch // process_count
    return range(process_index * local_batch, (process_index + 1) * local_batch)

  def batch(self, step: int, *, global_batch: int, seq_len: int, seed: int,
            process_index: int = 0, process_count: int = 1,
            watermark: 'Watermark | None' = None) -> np.ndarray:
    """This process's rows of the global batch for `step`.

    Returns int32 [global_batch // process_count, seq_len + 1]: rows
    [process_index * local, (process_index + 1) * local) of the global batch.
    Row r of step s is window shuffle_epoch(i mod W) with i = s * global_batch
    + r and W windows; every epoch (i // W) has its own permutation, so each
    window is seen exactly once per epoch. A `watermark` interleaves its windows
    (`Watermark.locate`): i then counts them too, and the corpus windows keep
    exactly this order.
    """
    num_windows = self._check_batch_args(global_batch, seq_len, process_index,
                                         process_count)
    if step < 0:
      raise DataError(f'step={step} must be >= 0.')
    index_shuffle = _index_shuffle_fn()
    rows = []
    for row in self._local_rows(global_batch, process_index, process_count):
      index, planted = step * global_batch + row, None
      if watermark is not None:
        index, planted = watermark.locate(index, num_windows, seq_len + 1)
      if planted is not None:
        rows.append(planted)
        continue
      epoch, position = divmod(index, num_windows)
      window = index_shuffle(index=position, max_index=num_windows - 1,
                             seed=_epoch_seed(seed, epoch), rounds=_SHUFFLE_ROUNDS)
      rows.append(self._window(window, seq_len))
    return np.stack(rows).astype(np.int32)

  def eval_batches(self, num_batches: int, *, global_batch: int, seq_len: int,
                   process_index: int = 0,
                   process_count: int = 1) -> list[np.ndarray]:
    """Fixed, unshuffled windows spread evenly over the whole split.

    Every evaluation sees the same tokens, and a sample of every part of the
    split rather than its first document; windows repeat only if the split has
    fewer than num_batches * global_batch of them.
    """
    num_windows = self._check_batch_args(global_batch, seq_len, process_index,
                                         process_count)
    rows = self._local_rows(global_batch, process_index, process_count)
    total = num_batches * global_batch
    return [
        self._gather([(b * global_batch + r) * num_windows // total
                      if total <= num_windows else (b * global_batch + r) % num_windows
                      for r in rows], seq_len)
        for b in range(num_batches)
    ]


  def whole_batches(self, *, global_batch: int, seq_len: int, process_index: int = 0,
                    process_count: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every window of the split once, then its partial tail: (tokens, weights) per batch.

    Yields int32 tokens and float32 weights, both [global_batch // process_count,
    seq_len + 1] (this process's rows, as `batch`). Window w is row w % global_batch
    of batch w // global_batch; the tail (the last num_tokens % (seq_len + 1) tokens,
    if at least 2) is one more window, zero-padded. weights[r, t] is 1 where token t
    is a scored target, else 0: each window's first token is context only (as in
    training), padding and pad rows weigh 0. Every batch has the same shape, so one
    compiled step scores them all; the weights sum to `scored_tokens(seq_len)`.
    """
    self._check_batch_args(global_batch, seq_len, process_index, process_count,
                           need_window=False)
    length = seq_len + 1
    full = self.num_windows(seq_len)
    tail = self.num_tokens - full * length
    total = full + (tail >= 2)
    rows = self._local_rows(global_batch, process_index, process_count)
    for b in range(-(-total // global_batch)):
      tokens = np.zeros((len(rows), length), np.int32)
      weights = np.zeros((len(rows), length), np.float32)
      for i, r in enumerate(rows):
        w = b * global_batch + r
        size = length if w < full else tail if w < total else 0
        if size:
          tokens[i, :size] = self.tokens[w * length:w * length + size]
          weights[i, 1:size] = 1.0
      yield tokens, weights

  def scored_tokens(self, seq_len: int) -> int:
    """How many target tokens `whole_batches` scores: all but each window's first."""
    full = self.num_windows(seq_len)
    tail = self.num_tokens - full * (seq_len + 1)
    return full * seq_len + max(tail - 1, 0)


# ----------------------------------------------------------------------------
# Data watermarks (arXiv 2402.10892): secret random windows in a training stream.
# ----------------------------------------------------------------------------

# Watermark tokens are uniform over the ids from here to the vocabulary's end: never
# pad, unk, bos or eos, which the corpus places by rule, not at random.
FIRST_ORDINARY_ID = EOS_ID + 1


def seed_words(key: str, purpose: str) -> list[int]:
  """256 bits of numpy seed entropy for one `purpose`, derived from the hex `key`."""
  digest = hashlib.sha256(f'{key}:{purpose}'.encode()).digest()
  return [int.from_bytes(digest[i:i + 4], 'little') for i in range(0, 32, 4)]


def random_sequences(seed, count: int, length: int, vocab_size: int) -> np.ndarray:
  """int32 [count, length] tokens, i.i.d. uniform over [FIRST_ORDINARY_ID, vocab_size).

  The distribution of both the planted watermark and the verifier's null sequences.
  """
  if vocab_size <= FIRST_ORDINARY_ID:
    raise DataError(f'a vocabulary of {vocab_size} ids has no ordinary tokens to draw '
                    'watermarks from; use a real tokenizer.')
  rng = np.random.default_rng(seed)
  return rng.integers(FIRST_ORDINARY_ID, vocab_size, size=(count, length)).astype(np.int32)


class Watermark:
  """`count` secret sequences, each planted `repeats` times per epoch of a training split.

  Planting inserts windows; it never replaces or moves one. Stream position i (step x
  batch + row, as `TokenDataset.batch` counts) lies in epoch e = i // (W + M), W the
  split's windows and M = count x repeats; the epoch's M watermark slots are M distinct
  positions drawn from `placement_key` and e, and each sequence fills `repeats` of them.
  Position k of the epoch that is no slot is corpus position e x W + k - (slots before
  k), so the corpus windows come in exactly their unwatermarked order. A pure function
  of (key, i), like the rest of the data: resume needs no state. A sequence shorter than
  a window starts it; fresh random tokens, never repeated, fill the rest.
  """

  def __init__(self, sequences_seed: str, placement_key: str, *, count: int, length: int,
               repeats: int, vocab_size: int):
    self.count, self.length, self.repeats = count, length, repeats
    self.vocab_size = vocab_size
    self.sequences = random_sequences(seed_words(sequences_seed, 'sequences'), count, length,
                                      vocab_size)
    self._placement = seed_words(placement_key, 'placement')
    self._filler = seed_words(placement_key, 'filler')
    self._slots = {}  # (epoch, W) -> (sorted slot positions, sequence of each slot).

  @property
  def per_epoch(self) -> int:
    return self.count * self.repeats

  def slots(self, epoch: int, num_windows: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted positions within the epoch, the sequence planted at each) of `epoch`."""
    key = (epoch, num_windows)
    if key not in self._slots:
      rng = np.random.default_rng([*self._placement, epoch])
      positions = np.sort(rng.choice(num_windows + self.per_epoch, self.per_epoch,
                                     replace=False))
      if len(self._slots) > 8:
        self._slots.clear()
      self._slots[key] = positions, rng.permutation(self.per_epoch) % self.count
    return self._slots[key]

  def locate(self, index: int, num_windows: int, window: int):
    """(corpus position, None) or (None, the planted window's tokens) of stream `index`."""
    epoch, k = divmod(index, num_windows + self.per_epoch)
    positions, ids = self.slots(epoch, num_windows)
    before = int(np.searchsorted(positions, k))
    if before < len(positions) and positions[before] == k:
      return None, self.window(int(ids[before]), epoch, before, window)
    return epoch * num_windows + k - before, None

  def window(self, sequence: int, epoch: int, slot: int, window: int) -> np.ndarray:
    tokens = self.sequences[sequence]
    if window > self.length:
      rng = np.random.default_rng([*self._filler, epoch, slot])
      filler = rng.integers(FIRST_ORDINARY_ID, self.vocab_size, window - self.length)
      tokens = np.concatenate([tokens, filler.astype(np.int32)])
    return tokens


def _index_shuffle_fn():
  """Imported lazily: grain takes ~1 s to import and only batch() needs it."""
  # pylint: disable-next=g-import-not-at-top
  from grain import experimental as grain_experimental
  return grain_experimental.index_shuffle


# ----------------------------------------------------------------------------
# Config resolution.
# ----------------------------------------------------------------------------

_STDLIB_CORPUS = 'stdlib'
_DEFAULT_TOKENIZER_NAME = 'default'


def resolve_tokenizer(data_config) -> str:
  """The .model path of `data.tokenizer`, without touching the corpus (loading a model needs none)."""
  path = data_config.tokenizer
  if path == _DEFAULT_TOKENIZER_NAME:
    return default_tokenizer_path()
  if not os.path.isfile(path):
    raise DataError(
        f'data.tokenizer={path!r} does not exist. Fix: set it to '
        f"'{_DEFAULT_TOKENIZER_NAME}' or to the .model file the run was trained with "
        '(scripts/train_tokenizer.py writes one).')
  return path


def resolve_corpus(data_config) -> tuple[str, str]:
  """(data_dir, tokenizer_path) for a config's data section.

  `data.corpus` is 'stdlib' (the cached stdlib corpus of group
  `data.stdlib_group`) or a dir written by scripts/prepare_data.py;
  `data.tokenizer` is 'default' (the shipped model) or a .model path.
  """
  tokenizer_path = resolve_tokenizer(data_config)
  if data_config.corpus == _STDLIB_CORPUS:
    return (default_corpus_dir(data_config.stdlib_group,
                               tokenizer_path=tokenizer_path), tokenizer_path)
  data_dir = data_config.corpus
  if not os.path.isfile(os.path.join(data_dir, _META_FILE)):
    raise DataError(
        f'data.corpus={data_dir!r} is not a prepared data dir (no '
        f"{_META_FILE}); set it to '{_STDLIB_CORPUS}' or {_PREPARE_HINT} and "
        'point data.corpus at DIR.')
  meta = _read_meta(data_dir)
  tokenizer_sha256 = file_sha256(tokenizer_path)
  if meta['tokenizer_sha256'] != tokenizer_sha256:
    raise DataError(
        f'data.corpus={data_dir!r} was tokenised with a tokenizer of sha256 '
        f'{meta["tokenizer_sha256"]}, but '
        f'data.tokenizer={data_config.tokenizer!r} has sha256 '
        f'{tokenizer_sha256}; set data.tokenizer to the .model '
        'that prepare_data.py used.')
  return data_dir, tokenizer_path
