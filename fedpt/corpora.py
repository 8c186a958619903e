"""Each silo's own corpus in a one-machine federation (simulate.py, launch/local.sh).

A silo's data is `NAME=PATH`: a prepared dir (scripts/prepare_data.py output,
holding meta.json), a text or JSONL file, or a directory of text files (the
kinds `data.read_sources` reads, under its `on_bad_text` policy). Raw sources
are tokenised once, with the run's one tokenizer, into `<workdir>/data/<silo>/`;
`<workdir>/data/<silo>.json` keeps the source's fingerprint (every file's path,
size and mtime, the tokenizer's sha256 and the reading options), so a rerun or
resume reuses the dir and a changed source is tokenised again. Each silo then
trains on `data.corpus=<its dir>` (a party field: run.json records only the
tokenizer's sha256).

The tokenizer is `data.tokenizer` ('config'), or ('train') a SentencePiece
model of `model.vocab_size` pieces trained on the union of the silos' raw
sources into `<workdir>/tokenizer/sp.model`, cached the same way.

Every check that needs no tokenising (names, paths, access, prepared dirs'
tokenizers) runs before anything is written; every error is a `CorpusError`
of one line naming the silo and the fix.
"""
import hashlib
import json
import os

from fedpt import data as data_lib

TOKENIZER_CHOICES = ('config', 'train')  # --tokenizer: data.tokenizer, or train one on the silos' text.
VAL_FRACTION = 0.02  # Of each raw source's documents, held out by hash (data.prepare_data).
_FLAG = '--silo_data'


class CorpusError(data_lib.DataError):
  """A silo's corpus is missing, unreadable, empty or made with another tokenizer."""


def parse(items) -> dict[str, str]:
  """{silo: path} from ['web=/p,code=/q', 'text=/r'] (a list flag, maybe repeated), in order.

  Raises CorpusError on an item without NAME=PATH and on a silo named twice.
  """
  if isinstance(items, str):
    items = [items]
  silo_data = {}
  for item in (part for entry in items for part in entry.split(',')):
    name, sep, path = item.strip().partition('=')
    if not sep or not name or not path:
      raise CorpusError(f'{_FLAG}: {item!r} is not NAME=PATH. Fix: write e.g. '
                        f'{_FLAG}=web=/data/web,code=/data/code.jsonl')
    if name in silo_data:
      raise CorpusError(f'{_FLAG} names silo {name!r} twice. Fix: give each silo one PATH')
    silo_data[name] = os.path.abspath(os.path.expanduser(path))
  if not silo_data:
    raise CorpusError(f'{_FLAG} is empty. Fix: write e.g. {_FLAG}=web=/data/web')
  return silo_data


def is_prepared(path: str) -> bool:
  """A prepared dir holds meta.json (launch/local.sh applies the same rule)."""
  return os.path.isfile(os.path.join(path, 'meta.json'))


def corpus_dir(workdir: str, silo: str, path: str) -> str:
  """What the silo trains on: a prepared PATH itself, else <workdir>/data/<silo>."""
  return path if is_prepared(path) else os.path.join(os.path.abspath(workdir), 'data', silo)


def check(silo_data: dict[str, str], silos, *, tokenizer: str = 'config') -> None:
  """Everything that needs no tokenising: names, paths, access, prepared dirs' form.

  Args:
    silo_data: from `parse`.
    silos: the run's silo ids (federation.silos); they must be exactly silo_data's.
    tokenizer: one of TOKENIZER_CHOICES; 'train' cannot use already tokenised dirs.
  """
  if tokenizer not in TOKENIZER_CHOICES:
    raise CorpusError(f'--tokenizer={tokenizer!r} is not one of {TOKENIZER_CHOICES}. Fix: '
                      "use 'config' (data.tokenizer) or 'train'")
  silos = list(silos)
  for name in silo_data:
    if name not in silos:
      raise CorpusError(
          f'{_FLAG} names silo {name!r}, which is not one of the run\'s silos {silos}. Fix: '
          'use the names in federation.silos, or leave --config.federation.silos out so the '
          f'silos are the names {_FLAG} gives')
  for name in silos:
    if name not in silo_data:
      raise CorpusError(f'silo {name!r} has no {_FLAG} while the others have. Fix: add '
                        f'{name}=PATH, or leave {name!r} out of federation.silos')
  for name, path in silo_data.items():
    where = f'{_FLAG}: silo {name!r}'
    if not os.path.exists(path):
      raise CorpusError(f'{where}: {path} does not exist. Fix: check the path')
    if is_prepared(path):
      if tokenizer == 'train':
        raise CorpusError(
            f'{where}: {path} is already tokenised, but --tokenizer=train makes a new '
            'tokenizer. Fix: pass its raw text, or drop --tokenizer=train and set '
            '--config.data.tokenizer to the .model it was made with')
      try:
        meta = data_lib._read_meta(path)  # pylint: disable=protected-access
      except data_lib.DataError as e:
        raise CorpusError(f'{where}: {e}') from None
      _check_split_counts(name, path, meta)
      for split in ('train', 'val'):
        _check_readable(where, os.path.join(path, f'{split}.bin'))
      continue
    try:
      files = data_lib.source_files(path)
    except data_lib.DataError as e:
      raise CorpusError(f'{where}: {e}') from None
    for file in files:
      _check_readable(where, file)


def _check_readable(where: str, path: str) -> None:
  if not os.access(path, os.R_OK):
    raise CorpusError(f'{where}: {path} cannot be read (permission denied). Fix: grant read '
                      'access to it, or leave it out of the source')


def _check_split_counts(name: str, path: str, meta: dict) -> None:
  for split in ('train', 'val'):
    if meta['splits'][split]['tokens'] == 0:
      raise CorpusError(
          f'silo {name!r}: the {split} split of {path} is empty. Fix: prepare it again with '
          'scripts/prepare_data.py --val=FILE (held-out text) or more documents')


def _fingerprint(paths, **options) -> str:
  """sha256 over the sources' files (path, size, mtime) and the options that shape the output."""
  files = []
  for path in paths:
    for file in data_lib.source_files(path):
      stat = os.stat(file)
      files.append((os.path.abspath(file), stat.st_size, stat.st_mtime_ns))
  record = {'files': files, 'format_version': data_lib.FORMAT_VERSION, **options}
  return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _read_json(path: str):
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _write_json(path: str, record: dict) -> None:
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(record, f, indent=2, sort_keys=True)
    f.write('\n')
  os.replace(tmp, path)


def _tokenizer(config, silo_data, workdir, choice, *, text_field, on_bad_text,
               run_tokenizer_sha256, log) -> str:
  """The run's tokenizer path: data.tokenizer, or one trained on every raw source (cached)."""
  if choice == 'config':
    return data_lib.resolve_tokenizer(config.data)
  out = os.path.join(workdir, 'tokenizer')
  model = os.path.join(out, 'sp.model')
  if (run_tokenizer_sha256 and os.path.isfile(model)
      and data_lib.file_sha256(model) == run_tokenizer_sha256):
    return model  # A resumed run keeps its tokenizer: run.json fixes its sha256.
  vocab_size = config.model.vocab_size
  paths = list(silo_data.values())
  key = _fingerprint(paths, vocab_size=vocab_size, text_field=text_field,
                     on_bad_text=on_bad_text)
  stamp = os.path.join(out, 'sp.json')
  if os.path.isfile(model) and (_read_json(stamp) or {}).get('fingerprint') == key:
    return model
  log(f'training a {vocab_size}-piece tokenizer on the silos\' text into {out}')
  documents = data_lib.read_sources(paths, text_field, on_bad_text=on_bad_text)
  try:
    data_lib.train_tokenizer(documents, os.path.join(out, 'sp'), vocab_size)
  except data_lib.DataError as e:
    raise CorpusError(f'--tokenizer=train: {e}') from None
  _write_json(stamp, {'fingerprint': key, 'sources': paths, 'vocab_size': vocab_size})
  return model


def prepare(config, silo_data: dict[str, str], workdir: str, *, tokenizer: str = 'config',
            text_field: str = 'text', on_bad_text: str = 'error',
            run_tokenizer_sha256: str | None = None, log=print) -> tuple[dict[str, str], str]:
  """Checks and tokenises every silo's corpus: ({silo: prepared dir}, tokenizer path).

  Args:
    config: the run's config (federation.silos, data.tokenizer, data.seq_len,
      model.vocab_size).
    silo_data: {silo: PATH} from `parse`.
    workdir: raw sources are tokenised into <workdir>/data/<silo>/, a trained
      tokenizer goes to <workdir>/tokenizer/.
    tokenizer: 'config' or 'train' (TOKENIZER_CHOICES).
    text_field, on_bad_text: how raw sources are read (data.read_sources).
    run_tokenizer_sha256: a resumed run's (run.json); a trained tokenizer of this
      hash is kept, and any other tokenizer is refused.
    log: where progress and `warning:` lines go.

  Raises:
    CorpusError: one line naming the silo, the problem and the fix.
  """
  check(silo_data, config.federation.silos, tokenizer=tokenizer)
  workdir = os.path.abspath(workdir)
  tokenizer_path = _tokenizer(config, silo_data, workdir, tokenizer, text_field=text_field,
                              on_bad_text=on_bad_text,
                              run_tokenizer_sha256=run_tokenizer_sha256, log=log)
  sha = data_lib.file_sha256(tokenizer_path)
  if run_tokenizer_sha256 and sha != run_tokenizer_sha256:
    raise CorpusError(
        f'the tokenizer {tokenizer_path} has sha256 {sha[:12]}..., but the run being resumed '
        f'was made with {run_tokenizer_sha256[:12]}.... Fix: resume with the run\'s tokenizer '
        '(its sources unchanged), or start a new run in another --workdir')
  dirs = {}
  seq_len = config.data.seq_len
  for name, path in silo_data.items():
    out = corpus_dir(workdir, name, path)
    if out == path:  # Prepared already: it must speak the run's tokenizer.
      meta = data_lib._read_meta(path)  # pylint: disable=protected-access
      if meta.get('tokenizer_sha256') != sha:
        raise CorpusError(
            f'silo {name!r}: {path} was tokenised with a tokenizer of sha256 '
            f'{str(meta.get("tokenizer_sha256"))[:12]}..., the run\'s ({tokenizer_path}) has '
            f'{sha[:12]}.... Fix: prepare its text again with scripts/prepare_data.py '
            f'--tokenizer={tokenizer_path}, or pass its raw text')
    else:
      meta = _prepare_one(name, path, out, tokenizer_path, sha, text_field=text_field,
                          on_bad_text=on_bad_text, log=log)
    for split in ('train', 'val'):
      tokens = meta['splits'][split]['tokens']
      if tokens < seq_len + 1:
        raise CorpusError(
            f'silo {name!r}: the {split} split of {path} has {tokens} tokens, less than one '
            f'window of data.seq_len+1 = {seq_len + 1}. Fix: give it more text, or lower '
            'data.seq_len')
    for line in data_lib.tiny_split_warnings(meta, seq_len):
      log(f'warning: silo {name!r} ({path}): {line}')
    dirs[name] = out
  return dirs, tokenizer_path


def _prepare_one(name, path, out, tokenizer_path, sha, *, text_field, on_bad_text, log):
  """Tokenises one raw source into `out` unless its fingerprint says it already is."""
  key = _fingerprint([path], tokenizer_sha256=sha, text_field=text_field,
                     on_bad_text=on_bad_text, val_fraction=VAL_FRACTION)
  stamp = f'{out}.json'
  if ((_read_json(stamp) or {}).get('fingerprint') == key
      and data_lib._is_prepared(out, sha)):  # pylint: disable=protected-access
    return data_lib._read_meta(out)  # pylint: disable=protected-access
  log(f'silo {name}: tokenising {path} into {out}')
  try:
    documents = data_lib.read_sources([path], text_field, on_bad_text=on_bad_text)
    meta = data_lib.prepare_data(documents, tokenizer_path, out, VAL_FRACTION,
                                 sources=[path], require_splits=True)
  except data_lib.DataError as e:
    raise CorpusError(f'silo {name!r} ({path}): {e}') from None
  _write_json(stamp, {'fingerprint': key, 'source': path, 'tokenizer_sha256': sha})
  return meta
