"""The shared bucket reveals no training text: only parameter-shaped arrays and small JSON.

Two silos (one uploading int8, one float32 deltas) train on a private corpus holding a
unique canary string; a third trains on ordinary text. After a real federation, every
object under the run root is read back (raw bytes, and every Orbax array decoded, since
Orbax compresses its chunks and a raw scan misses e.g. int32 arrays) and searched for the
canary's text and token ids. Each detector is shown to fire on the silo's own corpus and
on leaks planted into the same bucket, so the test can fail.
"""
from collections.abc import Mapping
import dataclasses
import functools
import json
import re
import threading
from typing import Any
import uuid

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fedpt import aggregator as aggregator_lib
from fedpt import compression as compression_lib
from fedpt import config as config_lib
from fedpt import data
from fedpt import ledger
from fedpt import loading
from fedpt import outer
from fedpt import privacy
from fedpt import protocol
from fedpt import signing
from fedpt import silo as silo_lib
from fedpt import trainer as trainer_lib
from fedpt import trees
from fedpt import watermark

# Token ids may leak as raw little-endian integers of any common width.
TOKEN_ENCODINGS = {'int16': '<i2', 'uint16': '<u2', 'int32': '<i4', 'int64': '<i8'}
# A JSON list (or dict) with this many integer-valued numbers could be a token sequence;
# the longest legitimate integer lists in the bucket are shapes (at most 4 entries).
MAX_INT_RUN = 16
# A JSON string longer than this would be free text, not an id, hash or config value.
MAX_JSON_STRING = 256
# A JSON string that shares this many consecutive characters with private text leaks it.
TEXT_WINDOW = 40
ORBAX_MARKERS = ('_CHECKPOINT_METADATA', '_METADATA')

CANARY_SILOS = ('canary_a', 'canary_b')  # Both train on the canary corpus.
OTHER_SILO = 'other'


# -- the scanner ----------------------------------------------------------------------


def _flatten(tree: Mapping, prefix: str = '') -> dict:
  """'a/b/c' -> leaf of a nested dict (Orbax trees here are dicts of dicts)."""
  out = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping):
      out.update(_flatten(value, name + '/'))
    else:
      out[name] = value
  return out


def _contains_sequence(values: np.ndarray, ids: np.ndarray) -> bool:
  """Whether `ids` occurs as consecutive values of `values` (any numeric dtype)."""
  flat = np.asarray(values).reshape(-1)
  if flat.dtype.kind not in 'iuf' or flat.size < ids.size:
    return False
  flat = flat.astype(np.float64)
  for start in np.flatnonzero(flat[:flat.size - ids.size + 1] == ids[0]):
    if np.array_equal(flat[start:start + ids.size], ids):
      return True
  return False


@dataclasses.dataclass
class BucketScan:
  """Everything stored under a run root, as raw bytes and as decoded content."""

  objects: dict[str, bytes]  # relative path -> raw bytes, for every object.
  json_objects: dict[str, Any]  # relative path -> value, for every object that is JSON.
  orbax_dirs: dict[str, dict[str, np.ndarray]]  # relative dir -> array name -> array.
  orbax_shapes: dict[str, dict[str, tuple[tuple[int, ...], str]]]  # From Orbax metadata.

  def find_bytes(self, needle: bytes) -> list[str]:
    """Objects, and decoded Orbax arrays, whose bytes contain `needle`."""
    hits = [path for path, raw in self.objects.items() if needle in raw]
    hits += [f'{d}:{name}' for d, arrays in self.orbax_dirs.items()
             for name, a in arrays.items() if needle in np.ascontiguousarray(a).tobytes()]
    return hits

  def find_tokens(self, ids) -> dict[str, list[str]]:
    """encoding -> locations holding the token sequence `ids`.

    Bytes are searched in every integer encoding; decoded arrays are also searched by
    value ('value'), which catches ids stored as floats or in any other numeric dtype.
    """
    ids = np.asarray(ids, np.int64)
    hits = {enc: self.find_bytes(ids.astype(dtype).tobytes())
            for enc, dtype in TOKEN_ENCODINGS.items()}
    hits['value'] = [f'{d}:{name}' for d, arrays in self.orbax_dirs.items()
                     for name, a in arrays.items() if _contains_sequence(a, ids)]
    return {enc: locations for enc, locations in hits.items() if locations}


def _read_orbax(directory: epath.Path):
  checkpointer = ocp.PyTreeCheckpointer()
  meta = checkpointer.metadata(directory)
  tree = meta.item_metadata.tree if hasattr(meta, 'item_metadata') else meta
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  arrays = _flatten(checkpointer.restore(
      directory, args=ocp.args.PyTreeRestore(restore_args=restore_args)))
  shapes = {name: (tuple(m.shape), str(np.dtype(m.dtype))) for name, m in _flatten(tree).items()}
  return arrays, shapes


def scan_bucket(root: epath.Path) -> BucketScan:
  """Reads every object under `root` through etils.epath (local or gs://) and decodes it.

  A directory holding an Orbax marker file is also restored, so that compressed array
  chunks are searched as the arrays they encode.
  """
  root = epath.Path(root)
  scan = BucketScan({}, {}, {}, {})

  def walk(directory: epath.Path):
    for path in sorted(directory.iterdir()):
      rel = str(path.relative_to(root))
      if path.is_dir():
        if any((path / marker).exists() for marker in ORBAX_MARKERS):
          scan.orbax_dirs[rel], scan.orbax_shapes[rel] = _read_orbax(path)
        walk(path)
        continue
      raw = path.read_bytes()
      scan.objects[rel] = raw
      try:
        scan.json_objects[rel] = json.loads(raw)
      except (UnicodeDecodeError, ValueError):
        pass

  walk(root)
  return scan


# -- what the bucket may hold ----------------------------------------------------------


def _inside_orbax(scan: BucketScan, rel: str) -> bool:
  return any(rel.startswith(d + '/') for d in scan.orbax_dirs)


def unexpected_objects(scan: BucketScan) -> list[str]:
  """Objects that are neither Orbax internals nor `.json` objects that parse."""
  return sorted(rel for rel in scan.objects if not _inside_orbax(scan, rel)
                and not (rel.endswith('.json') and rel in scan.json_objects))


def _walk_json(value, where: str):
  yield where, value
  if isinstance(value, Mapping):
    for key, item in value.items():
      yield f'{where}.{key}', key
      yield from _walk_json(item, f'{where}.{key}')
  elif isinstance(value, list):
    for i, item in enumerate(value):
      yield from _walk_json(item, f'{where}[{i}]')


def _integer_valued(x) -> bool:
  return (isinstance(x, int) and not isinstance(x, bool)) or (
      isinstance(x, float) and x.is_integer())


_INT_RUN_IN_TEXT = re.compile(r'\d+(?:[\s,;]+\d+){%d,}' % (MAX_INT_RUN - 1))


def token_like_json(scan: BucketScan) -> list[str]:
  """JSON places that could hold a token sequence or free text.

  Flagged: a list, or a dict's values, with >= MAX_INT_RUN integer-valued numbers; a
  string with >= MAX_INT_RUN integers separated by spaces, commas or semicolons; a string
  longer than MAX_JSON_STRING characters. Not a section of run.json's contract whose keys
  are all fields of that config section: those are the schema's numbers (H, block sizes,
  rounds), each type- and range-checked on every read (`records.check_run_form`).
  """
  schema = config_lib.base_config()
  problems = []
  for path, obj in scan.json_objects.items():
    for where, value in _walk_json(obj, path):
      section = where.removeprefix('run.json.')
      if (path == 'run.json' and section in schema and isinstance(value, Mapping)
          and set(value) <= set(schema[section].keys())):
        continue
      items = list(value.values()) if isinstance(value, Mapping) else value
      if isinstance(items, list) and sum(map(_integer_valued, items)) >= MAX_INT_RUN:
        problems.append(f'{where}: {sum(map(_integer_valued, items))} integers')
      if isinstance(value, str) and (_INT_RUN_IN_TEXT.search(value)
                                     or len(value) > MAX_JSON_STRING):
        problems.append(f'{where}: string {value[:60]!r}...')
  return problems


def json_with_text(scan: BucketScan, text: str) -> list[str]:
  """JSON strings (keys too), decoded from escapes, that share TEXT_WINDOW characters with
  `text`: the check for leaked text that does not depend on knowing the canary."""
  windows = {text[i:i + TEXT_WINDOW] for i in range(len(text) - TEXT_WINDOW + 1)}
  return [where for path, obj in scan.json_objects.items()
          for where, value in _walk_json(obj, path) if isinstance(value, str)
          and any(value[i:i + TEXT_WINDOW] in windows
                  for i in range(len(value) - TEXT_WINDOW + 1))]


@dataclasses.dataclass
class Layout:
  """The arrays each bucket location may hold, derived from the model, not the bucket."""

  params: dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, dtype)
  outer_state: dict[str, tuple[tuple[int, ...], str]]  # 'name/sI' -> (shape, dtype)
  payloads: dict[str, dict[str, tuple[tuple[int, ...], str]]]  # silo -> 'name/key' -> ...

  def allowed(self, rel_dir: str):
    """name -> (shape, dtype) allowed in Orbax directory `rel_dir`, or None if none is."""
    if re.fullmatch(r'global/round_\d{6}/shard_\d{3}_of_\d{3}/params', rel_dir):
      return self.params
    if re.fullmatch(r'global/round_\d{6}/shard_\d{3}_of_\d{3}/outer_state', rel_dir):
      return self.outer_state
    match = re.fullmatch(r'rounds/\d{6}/silo_(.+)/payload', rel_dir)
    if match:
      return self.payloads.get(match.group(1))
    return None


def _spec(x) -> tuple[tuple[int, ...], str]:
  return tuple(x.shape), str(np.dtype(x.dtype))


def model_layout(config, silo_formats: dict[str, str]) -> Layout:
  """Parameters' shapes; outer-optimizer state; what `compress` makes of each parameter."""
  trainer = trainer_lib.Trainer(protocol.federated_config(config))
  abstract = trees.flatten_params(trainer.abstract_state()['params'])
  params = {name: _spec(x) for name, x in abstract.items()}
  plain = {name: jax.ShapeDtypeStruct(x.shape, x.dtype) for name, x in abstract.items()}
  optimizer = outer.make_outer_optimizer(config.outer)
  state = jax.eval_shape(lambda: outer.init_outer_state(optimizer, plain))
  outer_state = {name: _spec(x) for name, x in aggregator_lib.state_to_arrays(state).items()}
  block_size = config.federation.block_size
  payloads = {}
  for silo, fmt in silo_formats.items():
    compress = functools.partial(compression_lib.compress, fmt=fmt, block_size=block_size)
    payloads[silo] = {
        f'{name}/{key}': _spec(x) for name, p in params.items()
        for key, x in jax.eval_shape(compress, jnp.zeros(p[0], jnp.float32)).items()}
  return Layout(params, outer_state, payloads)


def array_problems(scan: BucketScan, layout: Layout) -> list[str]:
  """Arrays whose location, name, shape or dtype the layout does not allow."""
  problems = []
  for rel_dir, shapes in scan.orbax_shapes.items():
    allowed = layout.allowed(rel_dir)
    if allowed is None:
      problems.append(f'{rel_dir}: Orbax arrays at an unexpected location')
      continue
    for name, spec in shapes.items():
      if allowed.get(name) != spec:
        problems.append(f'{rel_dir}:{name} is {spec}, allowed {allowed.get(name)}')
      decoded = scan.orbax_dirs[rel_dir][name]
      if _spec(decoded) != spec:
        problems.append(f'{rel_dir}:{name} decodes to {_spec(decoded)}, metadata says {spec}')
  return problems


# -- the private corpus ----------------------------------------------------------------


def _private_documents(canary: str) -> list[str]:
  """~200 stdlib files, 24 of them with the canary embedded as many assignments.

  Dense enough that every silo batch stream of this test reads it (checked below), so the
  federated deltas really come from canary text.
  """
  docs = [d[:2000] for d in data.stdlib_documents('all')[400:600]]
  for i in range(24):
    lines = ''.join(f"SECRET_{i}_{j} = '{canary}'  # private\n" for j in range(50))
    docs[i * 8] = lines + docs[i * 8]
  return docs


def _write_private_corpus(directory: epath.Path, canary: str) -> str:
  """The silo's raw text (JSONL, kept for the positive control) and its token shards."""
  raw = directory / 'raw' / 'docs.jsonl'
  raw.parent.mkdir(parents=True)
  raw.write_text(''.join(json.dumps({'text': d}) + '\n' for d in _private_documents(canary)))
  corpus = directory / 'corpus'
  data.prepare_data(data.read_sources([str(raw)]), data.default_tokenizer_path(), str(corpus),
                    val_fraction=0.05)
  return str(corpus)


def _needle(canary: str) -> np.ndarray:
  """The canary's token ids without its first and last, which merge with the context."""
  ids = data.load_tokenizer(data.default_tokenizer_path()).encode(canary)
  return np.asarray(ids[1:-1], np.int64)


def _plant_orbax(directory: epath.Path, tree: dict) -> None:
  ocp.PyTreeCheckpointer().save(directory, args=ocp.args.PyTreeSave(tree))


# -- the test -----------------------------------------------------------------------------


@pytest.fixture
def fed_config(tiny_config):
  # Silos are threads of this process; Orbax's background saves are per process.
  tiny_config.train.async_checkpoints = False
  tiny_config.train.eval_batches = 1
  tiny_config.federation.update(
      rounds=2, inner_steps=2, silos=(*CANARY_SILOS, OTHER_SILO), poll_s=0.05,
      wait_timeout_s=120.0, compression='none')
  return tiny_config


def test_bucket_holds_no_canary_text_or_token_ids(fed_config, tmp_path, gcs_bucket):
  canary = f'fedpt-canary-{uuid.uuid4().hex}'
  secrets = {'canary': canary.encode(), 'canary hex': canary.rsplit('-', 1)[1].encode()}
  needle = _needle(canary)
  assert needle.size >= 16, 'the canary must tokenise into a distinctive sequence'
  private = epath.Path(tmp_path) / 'private'
  canary_corpus = _write_private_corpus(private / 'canary_data', canary)

  # Positive controls on the silo's own data: the detectors find the canary where it is.
  own = scan_bucket(private / 'canary_data')
  assert own.find_bytes(secrets['canary']) == ['raw/docs.jsonl']
  assert 'corpus/train.bin' in own.find_tokens(needle)['uint16']
  # ...and the silos' training batches really read it (data order is (seed, silo, step)).
  config = protocol.federated_config(fed_config)
  train = data.TokenDataset(canary_corpus, 'train')
  for silo in CANARY_SILOS:
    rows = [row for step in range(config.train.steps) for row in train.batch(
        step, global_batch=config.data.global_batch, seq_len=config.data.seq_len,
        seed=protocol.silo_data_seed(config.seed, silo))]
    assert any(_contains_sequence(row, needle) for row in rows), silo

  # A real federation in the run's format (uncompressed fp32 deltas: the most a delta can
  # carry), signed, through a real GCS-protocol server, as in production.
  bucket = epath.Path(f'{gcs_bucket}/run')
  keys = str(private / 'keys')
  signing.generate_named(keys, ['aggregator', *(f'silo_{s}' for s in (OTHER_SILO,
                                                                     *CANARY_SILOS))])
  aggregator_lib.init_run(fed_config, str(bucket), keys_dir=keys)
  silo_configs = {OTHER_SILO: fed_config}
  for silo in CANARY_SILOS:
    silo_configs[silo] = fed_config.copy_and_resolve_references()
    silo_configs[silo].data.corpus = canary_corpus
  # canary_a trains with DP-SGD (privacy.dp, its own choice): it publishes its spent
  # (epsilon, delta) and no train loss; nothing else new.
  silo_configs['canary_a'].privacy.dp.update(enabled=True, noise_multiplier=1.0)
  # canary_b plants a data watermark (data.watermark, its own choice): secret sequences,
  # planted densely enough that its few batches surely hold them.
  silo_configs['canary_b'].data.watermark.update(enabled=True, count=2, repeats=4000)
  workdirs = {silo: private / 'workdir' / silo for silo in silo_configs}
  errors = []

  def run(silo):
    try:
      silo_lib.run_silo(silo_configs[silo], silo, str(bucket), str(workdirs[silo]),
                        keys_dir=keys)
    except BaseException as e:  # pylint: disable=broad-except
      errors.append((silo, e))
      raise

  workers = [threading.Thread(target=run, args=(s,)) for s in silo_configs]
  for w in workers:
    w.start()
  aggregator_lib.run_aggregator(str(bucket), keys_dir=keys)
  for w in workers:
    w.join(timeout=120)
  assert not errors and not any(w.is_alive() for w in workers), errors

  scan = scan_bucket(bucket)
  # The scan saw the whole run: every silo's committed delta of every round.
  for r in range(2):
    manifest = scan.json_objects[f'rounds/{r:06d}/manifest.json']
    assert sorted(e['silo'] for e in manifest['included']) == sorted(silo_configs)
    for silo in CANARY_SILOS:
      assert scan.json_objects[f'rounds/{r:06d}/silo_{silo}/meta.json']['compression'] == 'none'
      assert f'rounds/{r:06d}/silo_{silo}/payload' in scan.orbax_dirs
  assert 'global/round_000002/shard_000_of_001/params' in scan.orbax_dirs
  # DP: canary_a's metas carry its epsilon after the round's steps (dp_accounting's, for
  # its pinned sigma), and no train loss; the other silos', a loss and no dp.
  dp_record = json.loads((workdirs['canary_a'] / privacy.RECORD).read_text())
  assert dp_record['steps'] == 4  # Its high water: 2 rounds of H=2, kept as they were published.
  windows = data.TokenDataset(canary_corpus, 'train').num_windows(config.data.seq_len)
  for r in range(2):
    metas = {s: scan.json_objects[f'rounds/{r:06d}/silo_{s}/meta.json'] for s in silo_configs}
    assert metas['canary_a']['train_loss'] is None
    assert metas['canary_a']['dp'] == {'epsilon': pytest.approx(privacy.epsilon(
        1.0, 2 * (r + 1), config.data.global_batch, windows, 1 / windows)),
                                       'delta': pytest.approx(1 / windows)}
    for silo in ('canary_b', OTHER_SILO):
      assert metas[silo]['dp'] is None and np.isfinite(metas[silo]['train_loss'])
    manifest = scan.json_objects[f'rounds/{r:06d}/manifest.json']
    assert {e['silo']: e['dp'] for e in manifest['included']}['canary_a'] == metas['canary_a'][
        'dp']
  ledger_json = json.loads(ledger.status(str(bucket), 'json'))
  assert ledger_json['silo_totals']['canary_a']['dp'] == metas['canary_a']['dp']
  assert ledger_json['silo_totals'][OTHER_SILO]['dp'] is None
  table = ledger.status(str(bucket))
  assert f"{metas['canary_a']['dp']['epsilon']:.3g} (" in table and 'epsilon (delta)' in table
  # The noise seed, the silo's DP secret, stays in its workdir.
  for word in dp_record['noise_seed']:
    assert scan.find_bytes(str(word).encode()) == []
  # So do the watermark's secret, its sequences' seed and the sequences' token ids, which
  # canary_b really trained on (its batches held them).
  wm_record = watermark.read_record(str(workdirs['canary_b']))
  wm = watermark.from_record(wm_record)
  assert any((row[:wm.length] == wm.sequences).all(axis=1).any()
             for step in range(4) for row in train.batch(
                 step, global_batch=config.data.global_batch, seq_len=config.data.seq_len,
                 seed=protocol.silo_data_seed(config.seed, 'canary_b'), watermark=wm))
  for key in ('secret', 'sequences_seed'):
    assert scan.find_bytes(wm_record[key].encode()) == [], key
    assert scan.find_bytes(bytes.fromhex(wm_record[key])) == [], key
  for sequence in wm.sequences:
    assert scan.find_tokens(sequence[1:-1]) == {}
  # ...yet the consortium's model carries it: canary_b proves its data was used.
  used = watermark.verify(loading.source_config(storage=str(bucket)), str(workdirs['canary_b']),
                          loading.Source(storage=str(bucket)), null_samples=200)
  assert used['p_value'] < 0.01 and 'global round 2' in used['model'], used

  # (a) No object, raw or decoded, holds the canary's text.
  for what, secret in secrets.items():
    assert scan.find_bytes(secret) == [], what
  # (b) ...nor its token ids, in any integer encoding or as values of any array.
  assert scan.find_tokens(needle) == {}
  # (c) Arrays are only where the protocol puts them, each exactly the shape and dtype of
  # a parameter (global params), of the outer optimizer's state for that parameter, or of
  # `compress` applied to that parameter in the uploading silo's format (delta payloads).
  layout = model_layout(fed_config, {s: c.federation.compression
                                     for s, c in silo_configs.items()})
  for name, (shape, _) in layout.outer_state.items():
    param_shape = layout.params[name.rsplit('/', 1)[0]][0]
    assert shape in (param_shape, ()), f'outer state {name} {shape}: not per parameter'
  assert array_problems(scan, layout) == []
  assert unexpected_objects(scan) == []
  # (d) JSON holds numbers, hashes, ids and config: no canary (also once unescaped), no
  # token-like integer run, no free text, no 40-character run of the silo's private text.
  assert scan.json_objects and token_like_json(scan) == []
  assert json_with_text(scan, canary) == []
  private_text = '\n'.join(_private_documents(canary))
  assert json_with_text(scan, private_text) == []
  # (4) The silos' private state stays outside the bucket, and the bucket never names it.
  for silo, workdir in workdirs.items():
    assert any((workdir / 'checkpoints').iterdir()), f'{silo} kept no private checkpoint'
    assert not str(workdir).startswith(str(bucket))
    assert scan.find_bytes(str(workdir).encode()) == []
  assert scan.find_bytes(canary_corpus.encode()) == []
  for secret_key in epath.Path(keys).glob('*.key'):  # Secret keys never reach the bucket.
    assert scan.find_bytes(secret_key.read_bytes().strip().splitlines()[1]) == []

  # Negative controls: leaks planted into this bucket are each caught by its detector.
  ids = {enc: needle.astype(dtype) for enc, dtype in TOKEN_ENCODINGS.items()}
  (bucket / 'rounds/000001/silo_canary_a/notes.txt').write_text(f'sample: {canary}\n')
  _plant_orbax(bucket / 'rounds/000001/leak', {
      'text': np.frombuffer(canary.encode(), np.uint8), **ids})
  _plant_orbax(bucket / 'rounds/000002/silo_canary_b/payload',
               {'embed_vd': {'values': needle.astype(np.float32)}})
  (bucket / 'rounds/000002/silo_canary_b/meta.json').write_text(json.dumps(
      {'batch': needle.tolist(), 'batch_text': ' '.join(map(str, needle)),
       'loss_on': f'print({canary!r})  ' * 8}))
  leaky = scan_bucket(bucket)
  assert set(leaky.find_bytes(secrets['canary'])) >= {
      'rounds/000001/leak:text', 'rounds/000001/silo_canary_a/notes.txt',
      'rounds/000002/silo_canary_b/meta.json'}
  found = leaky.find_tokens(needle)
  for enc in TOKEN_ENCODINGS:
    assert f'rounds/000001/leak:{enc}' in found[enc], enc
  assert 'rounds/000002/silo_canary_b/payload:embed_vd/values' in found['value']
  problems = array_problems(leaky, layout)
  assert 'rounds/000001/leak: Orbax arrays at an unexpected location' in problems
  assert any(p.startswith('rounds/000002/silo_canary_b/payload:embed_vd/values is ((')
             for p in problems)
  assert unexpected_objects(leaky) == ['rounds/000001/silo_canary_a/notes.txt']
  flagged = token_like_json(leaky)
  for key in ('batch', 'batch_text', 'loss_on'):
    assert any(p.startswith(f'rounds/000002/silo_canary_b/meta.json.{key}:')
               for p in flagged), key
  assert json_with_text(leaky, canary) == ['rounds/000002/silo_canary_b/meta.json.loss_on']
  assert json_with_text(leaky, private_text) == [
      'rounds/000002/silo_canary_b/meta.json.loss_on']
