"""The round protocol: the four records in the bucket and every rule about them.

Storage is the protocol. Parties never talk to each other; they write and read
four kinds of JSON record (`docs/protocol.md` lists every field, writer, reader
and check):

  run.json             `run_record`          init_run, once: what every party must agree on
  a delta's meta.json  `delta_meta`          each silo, once per round: its pseudo-gradient
  manifest.json        `decide_round`        aggregator shard 0, once per round: who is in
  a global meta.json   `global_shard_meta`   each aggregator shard, once per round

This module is pure: no bucket I/O, no devices. The silo and the aggregator
measure (read, verify hashes, decompress, take norms) and pass plain values in;
the rules here say what the measurements mean. A rule that rejects returns the
reason as a string (it goes into the manifest, the ledger and the logs), or
raises `RunMismatchError` / `config.ConfigError` where a party must not start.
"""
import dataclasses
import fnmatch
import hashlib
import math

from fedpt import compression
from fedpt import config as config_lib
from fedpt import copies
from fedpt import errors
from fedpt import fragments as fragments_lib
from fedpt import outer
from fedpt import records
from fedpt import secagg
from fedpt import trees


# What the manifest copies from each included delta's meta.json (the ledger's inputs).
MANIFEST_ENTRY_FIELDS = ('silo', 'tokens', 'steps', 'train_loss', 'bytes', 'compression',
                         'block_size', 'topk', 'delta_norm', 'content_hash', 'global_eval_loss',
                         'dp')


# SCAFFOLD (inner.drift_correction='scaffold'): each delta leaf's payload holds the silo's
# control-variate update delta_c_i under this key, in float32; each global shard's outer
# state holds the server control variate c as '<leaf>/control' (fedpt/drift.py).
CONTROL = 'control'


def scaffold(run: dict) -> bool:
  """Whether `run` exchanges SCAFFOLD control variates (absent in runs from before them)."""
  return run['inner'].get('drift_correction', 'none') == 'scaffold'


def control_name(leaf: str) -> str:
  """The outer-state array name of leaf `leaf`'s server control variate c."""
  return f'{leaf}/{CONTROL}'


# The aggregator's error-feedback residual E of the compressed downlink, per leaf.
DOWNLINK_RESIDUAL = 'downlink_residual'


def downlink(run: dict) -> str | None:
  """The format of the update a global round publishes beside its model, or None for none.

  `federation.downlink_compression`; with fragments (P > 1) an update is always published,
  in float32 ('none') unless compressed: it holds only the fragment's rows, so a silo that
  holds the previous round downloads 1/P of the model per round.
  """
  fmt = run['federation'].get('downlink_compression', 'none')
  return None if fmt == 'none' and fragments(run) == 1 else fmt


def downlink_feedback(run: dict) -> bool:
  """Whether the aggregator keeps the downlink's error-feedback residual E: a compressed one."""
  return downlink(run) not in (None, 'none')


def fragments(run: dict) -> int:
  """`federation.fragments` P of `run` (1 in runs from before it)."""
  return run['federation'].get('fragments', 1)


def round_fragment(run: dict, round_index: int) -> int:
  """The fragment round `round_index` exchanges (`fragments.fragment_of`)."""
  return fragments_lib.fragment_of(round_index, fragments(run))


def round_steps(run: dict, silo: str) -> int:
  """Inner steps of one round of silo `silo`: its declared H, over P with fragments."""
  return fragments_lib.round_steps(silo_entry(run, silo)['inner_steps'], fragments(run))


def topk_record(fed) -> dict | None:
  """A delta's 'topk' field in a run with federation section `fed`: the topk format's
  parameters (`compression.TopK.record`), None for the dense formats."""
  return compression.TopK.of(fed).record() if fed['compression'] == 'topk' else None


def delta_format(record: dict) -> tuple[str, int, compression.TopK]:
  """(format, block_size, topk parameters) of a delta, from its meta.json or manifest entry
  (checked against the run's by `_check_claims`), as `compression`'s functions take them."""
  topk = record.get('topk')
  return (record['compression'], record['block_size'],
          compression.TopK(**topk) if topk is not None else compression.TopK())


def secure_aggregation(run: dict) -> bool:
  """Whether `run`'s deltas are masked (`federation.secure_aggregation`, fedpt/secagg.py)."""
  return bool(run['federation'].get('secure_aggregation', False))


def upload_format(run: dict) -> str:
  """The `compression` every delta of `run` declares: 'secagg' (masked fixed point) or the
  run's `federation.compression`."""
  return secagg.FORMAT if secure_aggregation(run) else run['federation']['compression']


def secagg_scale(run: dict) -> float:
  """The one fixed-point scale of every silo of `run` (`secagg.scale`: K silos, the clip)."""
  return secagg.scale(len(run['silos']), run['federation']['secagg_clip'])


def secagg_numerator(run: dict, silo: str, tokens: int) -> float:
  """a_i = tokens_i x weight_i / A_max, A_max the largest planned tokens x weight of a round
  over the listed silos (all public in run.json): |a_i| <= 1, and a_i / sum a_j is the
  manifest's weight (`outer.aggregation_weights`)."""
  cap = max(round_steps(run, s['id']) * tokens_per_step(run) * s['weight'] for s in run['silos'])
  return tokens * silo_entry(run, silo)['weight'] / cap


def downlink_residual_name(leaf: str) -> str:
  """The outer-state array name of leaf `leaf`'s downlink residual E."""
  return f'{leaf}/{DOWNLINK_RESIDUAL}'


class RunMismatchError(errors.UserError, ValueError):
  """This party's config or tokenizer does not match the run it tries to join."""


# -- run.json -------------------------------------------------------------------------


def federated_config(config):
  """The config with train.steps = rounds x H/P: the inner LR schedule's horizon."""
  config = config.copy_and_resolve_references()
  with config.ignore_type():
    fed = config.federation
    count = fed.get('fragments', 1)  # A bad P is config.validate's to name: H stands then.
    valid = records.is_int(count) and count >= 1 and records.is_int(fed.inner_steps)
    config.train.steps = fed.rounds * (
        max(fragments_lib.round_steps(fed.inner_steps, count), 1) if valid else fed.inner_steps)
  return config


def validate_federation(config) -> None:
  """Checks `federation.*` before a run is created; raises ConfigError naming field and fix."""
  config_lib.validate(config)
  fed = config.federation

  def require(ok, field, problem, fix):
    config_lib.require(ok, f'federation.{field}', problem, fix)

  require(fed.compression in compression.FORMATS, 'compression',
          f'unknown format {fed.compression!r}', f'use one of {compression.FORMATS}')
  require(fed.downlink_compression != 'topk', 'downlink_compression',
          '\'topk\' is an upload format only (the global update has no sender-side '
          'residual to keep what it drops)',
          f'use one of {compression.DENSE_FORMATS} (none: silos download the fp32 model)')
  require(fed.downlink_compression in compression.DENSE_FORMATS, 'downlink_compression',
          f'unknown format {fed.downlink_compression!r}',
          f'use one of {compression.DENSE_FORMATS} (none: silos download the fp32 model)')
  require(fed.block_size % 2 == 0, 'block_size',
          f'{fed.block_size} must be a positive even number', 'use e.g. 256')
  require(fed.block_size % 4 == 0 or 'int2' not in (fed.compression, fed.downlink_compression),
          'block_size', f'{fed.block_size} with int2, which packs four values per byte',
          'use a multiple of 4, e.g. 256')
  require(fed.topk_bits in compression.TOPK_BITS, 'topk_bits',
          f'{fed.topk_bits} bits per kept value', f'use one of {compression.TOPK_BITS}')
  if fed.secure_aggregation:  # Before the format rules: one line names all it changes.
    _check_secure_aggregation(config, require)
  require(fed.compression != 'topk' or fed.error_feedback, 'error_feedback',
          'is False with compression=\'topk\', which would lose every value it does not send',
          'set federation.error_feedback=True')
  outer.check_robust_config(fed.robust, fed.trim, fed.min_silos or len(fed.silos),
                            fed.clip_multiple or None)
  require(fed.reject_norm_multiple == 0 or fed.reject_norm_multiple > 1, 'reject_norm_multiple',
          f'{fed.reject_norm_multiple} would reject ordinary deltas', 'use 0 (off) or > 1, e.g. 10')
  require(not fed.reject_copies or fed.copy_cosine or fed.min_norm_ratio, 'reject_copies',
          'True with copy_cosine=0 and min_norm_ratio=0: no rule is on to flag a delta',
          'set federation.copy_cosine (e.g. 0.99) or min_norm_ratio (e.g. 0.05)')
  outer.make_outer_optimizer(config.outer)  # Names a bad outer.* field and its fix.
  require(fed.overlap == 'none' or config.inner.drift_correction != 'scaffold', 'overlap',
          f'{fed.overlap!r} with inner.drift_correction=\'scaffold\': SCAFFOLD\'s control '
          'variates are defined for synchronous rounds',
          'use federation.overlap=none with scaffold')
  require(fed.overlap != 'eager' or config.outer.optimizer in outer.LINEAR_OUTER_OPTIMIZERS,
          'overlap', f'\'eager\' with outer.optimizer={config.outer.optimizer!r}, whose step '
          'is not linear in the pseudo-gradient (a silo could not swap its part of it without '
          'the outer state)',
          f'use outer.optimizer in {outer.LINEAR_OUTER_OPTIMIZERS}, or overlap=delayed')
  for field, values in (('inner_steps', [fed.inner_steps]),
                        ('silo_inner_steps', list(fed.silo_inner_steps))):
    for silo, h in zip(fed.silos if field == 'silo_inner_steps' else ['every silo'], values):
      require(h % fed.fragments == 0, field,
              f'H={h} ({silo}) is not a multiple of federation.fragments={fed.fragments} (a '
              'fragment round is H/P steps)',
              f'use an H that {fed.fragments} divides, or federation.fragments dividing {h}')
  require(fed.compression != 'topk' or fed.robust == 'mean', 'robust',
          f'{fed.robust!r} with compression=\'topk\': a coordinate-wise median or trimmed mean '
          'of sparse deltas zeroes every coordinate few silos kept, and no residual keeps it',
          'use federation.robust=mean (clip_multiple and reject_norm_multiple still apply), or '
          'a dense compression')
  require(fed.fragments == 1 or fed.overlap != 'eager', 'fragments',
          f'{fed.fragments} fragments with overlap=\'eager\': an eager update swaps a silo\'s '
          'part of the whole last outer step, which a fragment round does not take',
          'use overlap=delayed (Streaming DiLoCo\'s overlap) or none with fragments')
  require(fed.fragments == 1 or config.inner.drift_correction != 'scaffold', 'fragments',
          f'{fed.fragments} fragments with inner.drift_correction=\'scaffold\': SCAFFOLD\'s '
          'control variates are defined for whole-model rounds',
          'use fragments=1 with scaffold, or drift_correction=none or fedprox')
  require(fed.overlap != 'eager' or fed.robust == 'mean', 'overlap',
          f'\'eager\' with federation.robust={fed.robust!r}: a silo\'s own part of a '
          'coordinate-wise robust aggregate is not defined, so it cannot be swapped',
          'use federation.robust=mean (clip_multiple and reject_norm_multiple still apply), '
          'or overlap=delayed')


def _check_secure_aggregation(config, require) -> None:
  """What pairwise masking cannot carry: the aggregator sees no single delta."""
  fed = config.federation
  why = 'with federation.secure_aggregation=True'
  require(len(fed.silos) >= 3, 'silos',
          f'{len(fed.silos)} silos {why}: with two silos the sum reveals the other\'s delta',
          'use at least 3 silos, or secure_aggregation=False')
  require(not 0 < fed.min_silos < 3, 'min_silos',
          f'{fed.min_silos} {why}: every silo reads the global update, so a round of two '
          'reveals each delta to the other', 'use 0 (every silo) or a quorum of at least 3')
  require(fed.robust == 'mean', 'robust',
          f'{fed.robust!r} {why}: a median or trimmed mean needs each delta, and the '
          'aggregator sees only their sum', 'use federation.robust=mean')
  # The aggregator sees no single delta: no quantised format, residual or norm rule applies.
  wanted = {'compression': 'none', 'error_feedback': False, 'clip_multiple': 0,
            'reject_norm_multiple': 0}
  wrong = [f for f, v in wanted.items() if fed[f] != v]
  settings = ' '.join(f'--config.federation.{f}={v}' for f, v in wanted.items() if f in wrong)
  require(not wrong, wrong[0] if wrong else '',
          f'{", ".join(f"{f}={fed[f]!r}" for f in wrong)} {why}, which needs '
          f'{", ".join(f"{f}={wanted[f]}" for f in wrong)} (the fixed-point encoding replaces '
          'quantised formats, and the silo-side secagg_clip replaces the aggregator\'s norm '
          'checks)', f'set {settings}')
  require(config.inner.drift_correction != 'scaffold', 'secure_aggregation',
          'True with inner.drift_correction=\'scaffold\': the control variates would need '
          'masking too', 'use drift_correction=none or fedprox, or secure_aggregation=False')
  require(fed.overlap != 'eager', 'overlap',
          f'\'eager\' {why}: a silo would need its own part of the unmasked mean',
          'use overlap=delayed or none')
  require(not fed.reject_copies, 'reject_copies',
          f'True {why}: no single delta is readable, so no copy or free rider can be found',
          'set federation.reject_copies=False (the manifest says the checks did not run)')
  require(not fed.drop_probability, 'drop_probability',
          f'{fed.drop_probability} {why}: revealing the masks of a delta that arrived would '
          'expose it', 'set federation.drop_probability=0')


def check_run(run: dict) -> None:
  """The run-level rules (`validate_federation`) on a run.json read back from the bucket.

  `records.check_run_form` (every read) checked its form and each field; this
  adds what needs round math: compression, robust rules, the outer optimizer.
  """
  records.check_format(run)
  try:
    validate_federation(config_lib.with_values(config_lib.base_config(),
                                               records.recorded_contract(run)))
  except (config_lib.ConfigError, outer.OuterConfigError) as e:
    raise RunMismatchError(
        f'run {run["run_id"]}\'s run.json breaks a run rule: config field {e.field!r} '
        f'{e.problem}. Fix: recreate the run with scripts/init_run.py.') from None


def run_record(config, tokenizer_sha256: str, run_id: str) -> dict:
  """The contents of run.json: everything the parties must agree on.

  The contract's sections ('model', 'data', 'inner', 'federation', 'outer' and
  'seed') are stored nested, as in the config; `silos` resolves each silo's
  weight, H and round budget.
  """
  config_lib.validate(config)
  record = {'format_version': records.FORMAT_VERSION, 'run_id': run_id,
            'tokenizer_sha256': tokenizer_sha256, 'silos': records.silo_records(config)}
  for field, value in records.contract(config).items():
    *sections, name = field.split('.')
    node = record
    for section in sections:
      node = node.setdefault(section, {})
    node[name] = value
  return record


def silo_entry(run: dict, silo_id: str) -> dict:
  """Silo `silo_id`'s record in run.json: id, weight, inner_steps (H) and round_budget_s."""
  check_silo_listed(run, silo_id)
  return next(s for s in run['silos'] if s['id'] == silo_id)


def adopt_run_config(run: dict, config, silo_id: str | None, typed=frozenset()):
  """`config` with the run's contract: (config, {field: (config file's, run's)} adopted).

  run.json is the truth. A field typed on this party's command line (`typed`,
  from `cli.config_overrides`) that disagrees with the run is refused, naming
  both values; one that only the config file sets takes the run's value. A
  silo's H and round budget are its declaration in run.json's silo list;
  `records.PARTY_DEFAULTS` may be typed freely. `silo_id` None: a reader (evaluate, sample).
  """
  recorded = records.recorded_contract(run)
  if silo_id is not None:
    entry = silo_entry(run, silo_id)
    recorded.update({field: entry[key] for field, key in records.PER_SILO.items()})
  diff = config_lib.differences(recorded, config)
  refused = {k: v for k, v in diff.items() if k in typed and k not in records.PARTY_DEFAULTS}
  if refused:
    raise RunMismatchError(
        f'run {run["run_id"]} fixes what this command line changes: '
        f'{config_lib.describe(refused, "run.json")}. Fix: drop those --config overrides (the '
        'run\'s values apply), or create a new run with them.')
  adopted = {k: v for k, v in diff.items() if k not in typed}
  return config_lib.with_values(config, {k: b for k, (_, b) in adopted.items()}), adopted


def overlap(run: dict) -> str:
  """`federation.overlap` of `run` (none in runs from before it)."""
  return run['federation'].get('overlap', 'none')


def base_round(run: dict, round_index: int) -> int:
  """The global round that round `round_index`'s deltas are taken from.

  Synchronous rounds train round r from global round r. Overlapped ones
  (`federation.overlap` delayed or eager, arXiv 2502.12996) train round r from
  global round r-1 (round 0 from global round 0): a silo starts round r right
  after publishing round r-1, before the aggregator has written global round r.
  Either way the aggregator writes global round r+1 = OuterOpt(global r, mean of
  round r's deltas), so an overlapped outer step applies a pseudo-gradient one
  round stale, as the paper's delayed variant does.
  """
  return round_index if overlap(run) == 'none' else max(round_index - 1, 0)


def eager_weight(run: dict, silo_id: str) -> float:
  """Silo `silo_id`'s share of a round in which every listed silo runs its declared H.

  The eager update weighs the silo's own fresh pseudo-gradient by this share
  (1/M in arXiv 2502.12996, whose workers are equal) before the manifest says
  what its weight in the round was.
  """
  shares = {s['id']: s['weight'] * s['inner_steps'] for s in run['silos']}
  total = sum(shares.values())
  return shares[silo_id] / total if total > 0 else 0.0


def own_contribution(manifest: dict | None, silo_id: str) -> float:
  """weight x clip factor of `silo_id` in a decided round: how much of its delta moved it."""
  for entry in (manifest or {}).get('included', []):
    if entry['silo'] == silo_id:
      return entry['weight'] * entry.get('clip_factor', 1.0)
  return 0.0


def silo_ids(run: dict) -> list[str]:
  return [s['id'] for s in run['silos']]


def missing_silos(run: dict, committed) -> list[str]:
  """The run's silos, in run.json's order, with no delta among `committed` (silo ids)."""
  committed = set(committed)
  return [s for s in silo_ids(run) if s not in committed]


def check_silo_listed(run: dict, silo_id: str) -> None:
  if silo_id not in silo_ids(run):
    raise RunMismatchError(
        f'silo {silo_id!r} is not in this run (run.json lists {silo_ids(run)}). Fix: pass one '
        'of those as --silo, or create a run that includes it.')


def check_model_matches_run(run: dict, config, tokenizer_sha256: str) -> None:
  """A party may read or train the run's models only with the run's shapes and tokenizer."""
  diff = config_lib.differences(
      {f'model.{k}': v for k, v in run['model'].items()}, config)
  if diff:
    raise RunMismatchError(
        f'this config\'s model differs from the run\'s: {config_lib.describe(diff, "run.json")}. '
        'Fix: use the config the run was created with.')
  check_tokenizer(run, tokenizer_sha256)


def join_config(run: dict, config, silo_id: str, typed=frozenset()):
  """(the config silo `silo_id` trains with in `run`, {field: (file's, run's)} adopted).

  Raises RunMismatchError if the run speaks another format, does not list the
  silo, or fixes a field this command line set otherwise (`adopt_run_config`).
  `federated_config` of the result sets train.steps to rounds x the silo's H.
  """
  check_run(run)
  return adopt_run_config(run, config, silo_id, typed)


def check_tokenizer(run: dict, tokenizer_sha256: str) -> None:
  if tokenizer_sha256 != run['tokenizer_sha256']:
    raise RunMismatchError(
        f'tokenizer sha256 {tokenizer_sha256[:12]}... differs from the run\'s '
        f'{run["tokenizer_sha256"][:12]}.... Fix: set --config.data.tokenizer to the run\'s '
        'tokenizer and tokenise your corpus with it.')


def silo_data_seed(seed: int, silo_id: str) -> int:
  """Data order is a pure function of (seed, silo, step): silos never share an order."""
  return int.from_bytes(hashlib.sha256(f'{seed}/{silo_id}'.encode()).digest()[:4], 'little')


# -- private parameters (federation.private_params) ----------------------------------------
#
# Leaves matching one of the run's fnmatch globs (on the flat names of `trees.py`, e.g.
# 'embed_vd', 'blocks/mlp/*') are never averaged: silos upload no delta for them, the
# aggregator keeps them at their initial values (what a newcomer starts from), and each
# silo keeps its own across rounds. Every rule keyed by leaf name asks these two.


def is_private(run: dict, name: str) -> bool:
  """Whether leaf `name` is one of the run's private parameters (run.json's federation)."""
  return any(fnmatch.fnmatchcase(name, p)
             for p in run['federation'].get('private_params', ()))


def shared_leaves(run: dict, names) -> list[str]:
  """Those of `names` that are averaged (uploaded in deltas), sorted."""
  return [n for n in sorted(names) if not is_private(run, n)]


def check_private_params(patterns, names) -> None:
  """ConfigError unless every glob matches a leaf of `names` and some leaf stays shared.

  `names` are the model's flat leaf names: `init_run` checks the config before the
  run exists, the aggregator and every silo check run.json's patterns when they start.
  """
  field = 'federation.private_params'
  for pattern in patterns:
    config_lib.require(
        any(fnmatch.fnmatchcase(n, pattern) for n in names), field,
        f'{pattern!r} matches no parameter of the model (its leaves: {", ".join(names)})',
        "use fnmatch globs over those names, e.g. 'embed_vd' or 'blocks/mlp/*'")
  private = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
  config_lib.require(
      len(private) < len(names), field,
      f'{tuple(patterns)} makes every parameter private: nothing would be averaged',
      'leave at least one leaf shared, or train each silo alone (scripts/train.py)')


# -- a delta's meta.json ------------------------------------------------------------------


def delta_meta(run: dict, round_index: int, silo_id: str, base_hash: str, *,
               leaf_shapes: dict, payload_layout: dict, payload_hashes: dict, content_hash: str,
               compression_format: str, block_size: int, topk: dict | None, nbytes: int,
               delta_norm: float, steps: int, tokens: int, train_loss: float,
               global_eval_loss: float | None, inner_seconds: float, inner_steps: int,
               round_budget_s: float, dp: dict | None = None) -> dict:
  """What a silo commits beside its payload; the aggregator checks it with `check_delta_meta`.

  `payload_layout` is {leaf: {payload key: [shape, dtype]}}; `payload_hashes` is
  {'leaf/key': sha256} and `content_hash` the hash of those, so a delta is
  identified by its content and a torn or swapped payload is caught.
  `inner_steps` and `round_budget_s` are the silo's declared H and budget
  (run.json); `steps` is what it ran: H (H/P with fragments), or fewer when the budget
  ran out. `fragment` is the round's (`round_fragment`); `leaf_shapes` are its rows' shapes.
  `topk` is the topk format's parameters (`topk_record`), None for a dense format.
  `dp` is the silo's spent {'epsilon', 'delta'} under privacy.dp (its train_loss is then
  None: a non-private statistic of its data), None without DP.
  """
  return {
      'format_version': records.FORMAT_VERSION, 'run_id': run['run_id'], 'round': round_index,
      'silo': silo_id, 'base_global_hash': base_hash, 'tokens': tokens, 'steps': steps,
      'train_loss': train_loss, 'global_eval_loss': global_eval_loss,
      'compression': compression_format, 'block_size': block_size, 'topk': topk,
      'bytes': nbytes,
      'delta_norm': delta_norm, 'inner_seconds': inner_seconds, 'inner_steps': inner_steps,
      'round_budget_s': round_budget_s, 'fragment': round_fragment(run, round_index),
      'dp': dp,
      'tree': {name: {'shape': list(leaf_shapes[name]), 'payload': payload_layout[name]}
               for name in payload_layout},
      'payload_hashes': payload_hashes, 'content_hash': content_hash,
  }


def check_delta_meta(run: dict, round_index: int, silo: str, meta, base_hash: str | None,
                     leaf_shapes: dict, check_signature=None) -> str | None:
  """The reason a committed delta's metadata is unacceptable in this round, or None.

  `leaf_shapes` is the run's {leaf: shape} (from global round 0), private leaves
  included: a delta must hold exactly the `shared_leaves`.
  `check_signature(meta, silo)` a signed run's signature check. Malformed
  metadata is a reason too.
  """
  if not isinstance(meta, dict):
    return 'metadata unreadable'
  try:
    return _check_delta_meta(run, round_index, silo, meta, base_hash, leaf_shapes,
                             check_signature)
  except records.MALFORMED as e:
    return records.malformed(e)


def _check_author(run: dict, silo: str, record: dict, check_signature) -> str | None:
  """A silo's record must come from a listed silo and (signed runs) carry its signature."""
  if silo not in silo_ids(run):
    return 'unknown silo (not in run.json)'
  return check_signature(record, silo) if check_signature is not None else None


def _check_silo_record(run: dict, round_index: int, silo: str, record: dict, check_signature,
                       run_id_optional: bool = False) -> str | None:
  """A silo's per-round record (recovery, evaluation, contribution): its author, and that it
  names this run, round and silo (not a record replayed or moved from elsewhere)."""
  reason = _check_author(run, silo, record, check_signature)
  if reason:
    return reason
  run_id = record.get('run_id', run['run_id']) if run_id_optional else record.get('run_id')
  if run_id != run['run_id'] or record.get('round') != round_index or record.get('silo') != silo:
    return (f'it says run {record.get("run_id")!r} round {record.get("round")!r} silo '
            f'{record.get("silo")!r} (a replayed or moved record)')
  return None


def _check_silo_fields(run: dict, round_index: int, silo: str, record, check_signature,
                       fields) -> str | None:
  """`_check_silo_record` on a JSON object, then `fields(record)`, the record's own checks;
  a missing or mistyped field anywhere is reported as malformed, never raised."""
  if not isinstance(record, dict):
    return 'not a JSON object'
  try:
    return _check_silo_record(run, round_index, silo, record, check_signature) or fields(record)
  except records.MALFORMED as e:
    return records.malformed(e)


def check_delta_identity(run: dict, round_index: int, silo: str, meta: dict,
                         check_signature=None) -> str | None:
  """Why `meta` is not silo `silo`'s own delta of this run and round (listed, signed), or None.

  A silo asks this of whatever it finds at its own path before concluding anything.
  """
  reason = _check_author(run, silo, meta, check_signature)
  if reason:
    return reason
  if meta.get('run_id') != run['run_id']:
    return f'belongs to run {meta.get("run_id")!r}, not {run["run_id"]!r}'
  if meta.get('round') != round_index or meta.get('silo') != silo:
    return (f'metadata says round {meta.get("round")} silo {meta.get("silo")!r} (a replayed '
            'or moved delta)')
  return None


def tokens_per_step(run: dict) -> int:
  """Tokens one inner step of any silo trains on: the run's global batch x sequence length."""
  return run['data']['global_batch'] * run['data']['seq_len']


def _check_claims(run: dict, silo: str, record: dict) -> str | None:
  """The numbers a delta claims (its meta.json, or its manifest entry), checked for type,
  finiteness and plausibility against the run's contract and the silo's declaration."""
  fed, entry = run['federation'], silo_entry(run, silo)
  if (record.get('compression') != upload_format(run)
      or record.get('block_size') != fed['block_size']):
    return (f'compression {record.get("compression")!r} with block size '
            f'{record.get("block_size")!r} is not the run\'s {upload_format(run)!r} with '
            f'{fed["block_size"]}')
  if record.get('topk') != topk_record(fed):
    return (f'topk parameters {record.get("topk")!r} are not the run\'s '
            f'{topk_record(fed)!r}')
  steps, tokens, h = record.get('steps'), record.get('tokens'), round_steps(run, silo)
  if (not records.is_int(steps) or not 1 <= steps <= h
      or (steps < h and not entry['round_budget_s'])):
    return (f'bad step count {steps!r}: a round is '
            + (f'H/P={h} inner steps (H={entry["inner_steps"]}, {fragments(run)} fragments)'
               if fragments(run) > 1 else f'H={h} inner steps')
            + (' or fewer when its time budget ends' if entry['round_budget_s'] else ''))
  most = steps * tokens_per_step(run)
  if not records.is_int(tokens) or not 0 < tokens <= most:
    return (f'bad token count {tokens!r}: {steps} steps train on at most {most} tokens '
            f'({tokens_per_step(run)} per step)')
  if not records.is_int(record.get('bytes')) or record['bytes'] < 0:
    return f'bad byte count {record.get("bytes")!r}'
  dp = record.get('dp')
  if dp is not None and not (
      isinstance(dp, dict) and sorted(dp) == ['delta', 'epsilon']
      and records.is_number(dp['epsilon']) and dp['epsilon'] >= 0
      and records.is_number(dp['delta']) and 0 < dp['delta'] < 1):
    return f'bad dp {dp!r}: not {{epsilon: a finite number >= 0, delta: in (0, 1)}}'
  for key, optional, sign in (('train_loss', dp is not None, False),
                              ('global_eval_loss', True, False), ('delta_norm', False, True)):
    value = record.get(key)
    if not (records.is_number(value) or (optional and value is None)) or (
        sign and value < 0):
      return f'bad {key} {value!r}: not a finite number' + (' >= 0' if sign else '')
  return None


def _check_delta_numbers(run: dict, silo: str, meta: dict) -> str | None:
  """A delta's claims, its declaration (run.json's H and budget) and its inner seconds."""
  entry = silo_entry(run, silo)
  for key in ('inner_steps', 'round_budget_s'):
    if meta.get(key) != entry[key]:
      return (f'declares {key}={meta.get(key)!r}, but run.json declares {entry[key]!r} for '
              f'this silo')
  if not records.is_number(meta.get('inner_seconds')) or meta['inner_seconds'] < 0:
    return f'bad inner_seconds {meta.get("inner_seconds")!r}: not a finite number >= 0'
  return _check_claims(run, silo, meta)


def check_delta_claims(run: dict, round_index: int, silo: str, meta) -> str | None:
  """Why a delta's identity or numbers are not to be believed (no payload, base or signature).

  What a reader that only counts (the ledger of an undecided round) checks.
  """
  if not isinstance(meta, dict):
    return 'metadata unreadable'
  try:
    return (check_delta_identity(run, round_index, silo, meta)
            or _check_delta_numbers(run, silo, meta))
  except records.MALFORMED as e:
    return records.malformed(e)


def _check_delta_meta(run, round_index, silo, meta, base_hash, leaf_shapes, check_signature):
  reason = check_delta_identity(run, round_index, silo, meta, check_signature)
  if reason:
    return reason
  if meta.get('base_global_hash') != base_hash:
    return 'based on a different global model than this round\'s'
  reason = _check_delta_numbers(run, silo, meta)
  if reason:
    return reason
  fragment = round_fragment(run, round_index)
  if meta.get('fragment', 0) != fragment:
    return (f'it is a delta of fragment {meta.get("fragment")!r}; round {round_index} exchanges '
            f'fragment {fragment} of {fragments(run)}')
  tree = meta.get('tree') or {}
  leaf_shapes = fragments_lib.fragment_shapes(
      {n: leaf_shapes[n] for n in shared_leaves(run, leaf_shapes)}, fragment, fragments(run))
  uploaded_private = [n for n in sorted(tree) if is_private(run, n)]
  if uploaded_private:
    return (f'it uploads private parameter(s) {uploaded_private} '
            '(federation.private_params: never averaged)')
  if sorted(tree) != sorted(leaf_shapes):
    return 'parameter tree differs from the run\'s model'
  nbytes = 0
  with_control = scaffold(run)
  fmt, block_size, topk = delta_format(meta)
  for name, shape in leaf_shapes.items():
    if tuple(tree[name]['shape']) != tuple(shape):
      return f'parameter {name} has shape {tree[name]["shape"]}, expected {list(shape)}'
    expected = (secagg_payload_spec(shape) if fmt == secagg.FORMAT
                else compression.payload_spec(shape, fmt, block_size, topk))
    if with_control:  # delta_c_i, uncompressed: SCAFFOLD's c must not drift by rounding.
      expected = {**expected, CONTROL: (tuple(shape), 'float32')}
      nbytes += 4 * math.prod(shape)
    declared = {k: (tuple(s), d) for k, (s, d) in tree[name]['payload'].items()}
    if declared != expected:
      return (f'parameter {name} payload layout {declared} is not the {fmt} '
              f'layout {expected} (wrong shape or dtype)')
    nbytes += (4 * math.prod(shape) if fmt == secagg.FORMAT
               else compression.compressed_nbytes(shape, fmt, block_size, topk))
  if meta.get('bytes') != nbytes:
    return f'claims {meta.get("bytes")!r} bytes; its payload layout holds {nbytes}'
  hashes = meta.get('payload_hashes') or {}
  if trees.tree_hash(hashes) != meta.get('content_hash'):
    return 'payload hashes do not match the content hash'
  return None


def secagg_payload_spec(shape) -> dict:
  """A masked leaf's payload layout: its uint32 values y_i (`secagg.MASKED`)."""
  return {secagg.MASKED: (tuple(shape), 'uint32')}


def check_stored_layout(meta: dict, stored: dict) -> str | None:
  """The stored payload's {'leaf/key': (shape, dtype)} must be what meta.json declares."""
  for name, leaf in meta['tree'].items():
    for key, (shape, dtype) in leaf['payload'].items():
      if stored.get(f'{name}/{key}') != (tuple(shape), dtype):
        return f'stored payload {name}/{key} does not match its metadata'
  return None


def check_payload_hash(name: str, key: str, meta: dict, actual_hash: str) -> str | None:
  if actual_hash != meta['payload_hashes'].get(f'{name}/{key}'):
    return f'payload {name}/{key} does not match its content hash (torn or modified)'
  return None


# -- manifest.json: the round's decision ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Measured:
  """What the aggregator found reading one committed delta: a reason to reject, or its norm.

  `norm` is the L2 norm of the decompressed delta as the aggregator measured it
  (the silo's own `delta_norm` claim is never used for decisions); `sketch` its count
  sketch (`copies.leaf_sketch` summed over leaves), None where copy checks do not run;
  `seen` the aggregator's poll in which it first saw the commit (`copies.Candidate`).
  """
  meta: dict | None
  reason: str | None = None
  norm: float | None = None
  sketch: object = None
  seen: int = 0


def dropped(run: dict, round_index: int, silo: str) -> bool:
  """federation.drop_probability: a seeded coin per (run, round, silo), the same on a restart."""
  return outer.randomly_dropped(run['run_id'], round_index, silo,
                                run['federation'].get('drop_probability', 0.0))


def round_ready(run: dict, committed: list[str], past_deadline: bool) -> bool:
  """Every silo committed; or, once the deadline passed, a quorum (federation.min_silos)."""
  expected = set(silo_ids(run))
  have = set(committed) & expected
  quorum = run['federation']['min_silos'] or len(expected)
  return have == expected or (past_deadline and len(have) >= quorum)


def decide_round(run: dict, round_index: int, base_hash: str | None, committed: list[str],
                 measured: dict[str, Measured], *, previous_manifest: dict | None,
                 previous_committed: list[str], decided_after_s: float,
                 earlier: tuple[dict, dict] = ({}, {})) -> dict:
  """The manifest of round `round_index`, a pure function of what was measured.

  `committed` are the silos whose deltas were committed when the round was
  decided; `measured[silo]` is the aggregator's reading of each one not
  `dropped`. Steps, in order: random drops; metadata and payload rejections;
  norm outliers (`federation.reject_norm_multiple` x the median of the others'
  norms, `outer.norm_outliers`); copies and free riders (`copy_flags`, rejected with
  `federation.reject_copies`); token x silo weights (`outer.aggregation_weights`);
  clip factors (`federation.clip_multiple`, `outer.clip_factors`). Late silos
  are those that committed to the previous round after it was decided.
  """
  fed = run['federation']
  included, rejected = [], []
  for silo in committed:
    if dropped(run, round_index, silo):
      rejected.append({'silo': silo, 'reason': (
          f'dropped at random (federation.drop_probability={fed["drop_probability"]:g})')})
      continue
    m = measured[silo]
    if m.reason:
      rejected.append({'silo': silo, 'reason': m.reason})
    else:
      included.append({**{k: m.meta.get(k) for k in MANIFEST_ENTRY_FIELDS},
                       'measured_norm': m.norm})
  late = []
  if round_index > 0:
    previous = previous_manifest or {}
    decided = {e['silo'] for e in previous.get('included', []) + previous.get('rejected', [])}
    late = sorted(set(previous_committed) - decided)
  multiple = fed.get('reject_norm_multiple', 0.0)
  if multiple and len(included) > 1:
    outliers = outer.norm_outliers([e['measured_norm'] for e in included], multiple)
    for entry, outlier in zip(list(included), outliers):
      if outlier:
        included.remove(entry)
        rejected.append({'silo': entry['silo'], 'reason': (
            f'{NORM_OUTLIER} {entry["measured_norm"]:.4g} is more than {multiple:g}x the '
            'median of the other silos\' norms')})
  similarity, flags, checks = copy_flags(run, included, measured, *earlier)
  if fed.get('reject_copies'):
    for entry in list(included):
      if entry['silo'] in flags:
        included.remove(entry)
        rejected.append({'silo': entry['silo'], 'reason': (
            f'{COPY_REJECTED} (federation.reject_copies): '
            + '; '.join(flags[entry['silo']]))})
  _weigh(run, included)
  manifest = {
      'round': round_index, 'run_id': run['run_id'], 'base_global_hash': base_hash,
      'fragment': round_fragment(run, round_index), 'included': included, 'rejected': rejected,
      'missing': sorted(set(silo_ids(run)) - set(committed)),
      'late_from_previous_round': late, 'decided_after_s': decided_after_s,
      'robust': {'method': fed.get('robust', 'mean'), 'trim': fed.get('trim', 1),
                 'clip_multiple': fed.get('clip_multiple', 0.0)},
      'copy_checks': checks, 'similarity': similarity, 'flags': flags,
  }
  if secure_aggregation(run):
    manifest['unmask'] = unmasked_silos(run, included)
  return manifest


def _weigh(run: dict, included: list[dict]) -> None:
  """Sets each included entry's `weight` (token x silo weight, normalised) and, with
  `federation.clip_multiple`, its `clip_factor`: one rule for deciding and for unlearning.

  A silo of weight 0 (federation.silo_weights) is included with weight 0: it is recorded,
  but it moves nothing (`contributing`); if none is left the model carries over.
  """
  fed = run['federation']
  silo_weight = {s['id']: s['weight'] for s in run['silos']}
  active = contributing(included, silo_weight)
  weights = (outer.aggregation_weights([e['tokens'] for e in active],
                                       [silo_weight[e['silo']] for e in active])
             if active else [])
  for entry in included:
    entry['weight'] = 0.0
    entry.pop('clip_factor', None)
  for entry, w in zip(active, weights):
    entry['weight'] = float(w)
  if active and fed.get('clip_multiple'):
    factors = outer.clip_factors([e['measured_norm'] for e in active], weights,
                                 fed['clip_multiple'])
    for entry in included:
      entry['clip_factor'] = 1.0
    for entry, factor in zip(active, factors):
      entry['clip_factor'] = float(factor)


# The start of a norm-outlier rejection's reason: that silo's norm entered the others' medians.
NORM_OUTLIER = 'delta norm'


# The start of a copy-check rejection's reason (federation.reject_copies).
COPY_REJECTED = 'flagged as a copy or free rider'


def influenced_by(manifest: dict, silo: str) -> bool:
  """Whether silo `silo`'s delta influenced round `manifest`'s decision or update: it was
  included, or passed every check and was then rejected as a norm outlier or a copy (its
  norm was in the median the others were held to, its sketch in their cosines)."""
  return (any(e['silo'] == silo for e in manifest['included'])
          or any(e['silo'] == silo and e['reason'].startswith((NORM_OUTLIER, COPY_REJECTED))
                 for e in manifest['rejected']))


REPLAYED_COPY_CHECKS = ('off: a round replayed without a silo (unlearn.py --mode=replay); the '
                        "parent's copy checks compared the others with that silo's deltas")


def without_silo(run: dict, manifest: dict, silo: str, replayed: bool = False) -> dict:
  """The manifest of the same round in `run`, a branch of the manifest's run without `silo`
  (fedpt/unlearning.py): its entries are gone and, if it was included, the others' weights
  and clip factors are recomputed by the rule that decided the round (`_weigh`). Every
  other decision (rejections, outliers) stands as made. `replayed` (a round from the
  branch round on): the others' copy-check numbers and flags, which compared them with the
  silo's deltas, are dropped too (`REPLAYED_COPY_CHECKS`).
  """
  included = [dict(e) for e in manifest['included'] if e['silo'] != silo]
  if len(included) != len(manifest['included']):
    _weigh(run, included)
  out = {k: v for k, v in manifest.items() if k != 'signature'}
  out.update(run_id=run['run_id'], included=included,
             rejected=[e for e in manifest['rejected'] if e['silo'] != silo],
             missing=[s for s in manifest['missing'] if s != silo],
             late_from_previous_round=[s for s in manifest['late_from_previous_round']
                                       if s != silo])
  for field in ('similarity', 'flags'):  # Copy checks: per-silo entries, absent in old runs.
    if field in manifest:
      out[field] = {} if replayed else {k: v for k, v in manifest[field].items() if k != silo}
  if replayed and 'copy_checks' in manifest:
    out['copy_checks'] = REPLAYED_COPY_CHECKS
  if secure_aggregation(run):
    out['unmask'] = unmasked_silos(run, included)
  return out


COPY_CHECKS_ON = 'on'
COPY_CHECKS_MASKED = ('off: secure aggregation masks every delta, and the aggregator sees only '
                      'their sum (no cosine or norm of a single delta exists to check)')
COPY_CHECKS_OFF = 'off: federation.copy_cosine and min_norm_ratio are 0'


def copy_checks(run: dict) -> str:
  """Whether the aggregator flags copies and free riders in `run`, and if not, why not."""
  limits = copies.Thresholds.of(run['federation'])
  if secure_aggregation(run):
    return COPY_CHECKS_MASKED
  return COPY_CHECKS_ON if limits.copy_cosine or limits.min_norm_ratio else COPY_CHECKS_OFF


def copy_flags(run: dict, included: list[dict], measured: dict[str, Measured],
               earlier_deltas: dict, earlier_updates: dict) -> tuple[dict, dict, str]:
  """(manifest 'similarity', manifest 'flags', manifest 'copy_checks') of the included
  entries (`copies.flag`: cosines of sketches, norm per inner step)."""
  checks = copy_checks(run)
  if checks != COPY_CHECKS_ON:
    return {}, {}, checks
  candidates = [copies.Candidate(e['silo'], e['measured_norm'], e['steps'],
                                 measured[e['silo']].sketch, measured[e['silo']].seen)
                for e in included]
  stats, flags = copies.flag(candidates, earlier_deltas, earlier_updates,
                             copies.Thresholds.of(run['federation']))
  return stats, flags, checks


def sketch_record(run: dict, round_index: int, part: str, sketches: dict) -> dict:
  """rounds/r/sketches.json (`part` 'deltas': {silo: sketch}) or a shard's
  update_sketch_*.json (`part` 'update i/n': {'update': sketch}), written by the aggregator."""
  return {'run_id': run['run_id'], 'round': round_index, 'part': part,
          'fragment': round_fragment(run, round_index), 'size': copies.SKETCH_SIZE,
          'sketches': {k: copies.encode(v) for k, v in sorted(sketches.items())}}


def read_sketch_record(run: dict, round_index: int, part: str, record) -> tuple[dict | None,
                                                                                 str | None]:
  """({key: sketch}, None) of a sketch record read back, or (None, why it must not be used)."""
  if not isinstance(record, dict):
    return None, 'not a JSON object'
  try:
    if (record.get('run_id'), record.get('round'), record.get('part')) != (
        run['run_id'], round_index, part):
      return None, (f'it says run {record.get("run_id")!r} round {record.get("round")!r} part '
                    f'{record.get("part")!r}')
    if record['size'] != copies.SKETCH_SIZE:
      return None, f'its sketch size {record["size"]!r} is not {copies.SKETCH_SIZE}'
    out = {k: copies.decode(v) for k, v in record['sketches'].items()}
  except records.MALFORMED as e:
    return None, records.malformed(e)
  bad = sorted(k for k, v in out.items() if v is None)
  return (None, f'sketches of {bad} are not {copies.SKETCH_SIZE} finite float32') if bad else (
      out, None)


def _check_copy_fields(ids: list[str], manifest: dict) -> str | None:
  """The form of 'copy_checks', 'similarity' and 'flags' (absent in older manifests)."""
  if not isinstance(manifest.get('copy_checks', ''), str):
    return f'copy_checks {manifest["copy_checks"]!r} is not a string'
  for silo, row in manifest.get('similarity', {}).items():
    if silo not in ids or not all(value is None or records.is_number(value)
                                  for value in row.values()):
      return f'similarity of {silo!r} is not numbers of a listed silo'
  for silo, reasons in manifest.get('flags', {}).items():
    if (silo not in ids or not isinstance(reasons, list) or not reasons
        or not all(isinstance(r, str) for r in reasons)):
      return f'flags of {silo!r} are not reasons about a listed silo'
  return None


def unmasked_silos(run: dict, included: list[dict]) -> list[str]:
  """Secure aggregation: the listed silos whose pair masks the included ones must reveal
  (missing, rejected or late): every listed silo not in the sum."""
  return sorted(set(silo_ids(run)) - {e['silo'] for e in included})


def check_manifest(run: dict, round_index: int, manifest) -> str | None:
  """Why a manifest read from the bucket must not be used, or None.

  Signed runs check the aggregator's signature first; this checks what every
  reader computes with: the run and round, and the numbers of each entry.
  """
  if not isinstance(manifest, dict):
    return 'not a JSON object'
  try:
    if manifest.get('run_id') != run['run_id'] or manifest.get('round') != round_index:
      return f'it says run {manifest.get("run_id")!r} round {manifest.get("round")!r}'
    ids = silo_ids(run)
    included = manifest['included']
    if len({e['silo'] for e in included}) != len(included):
      return 'it includes a silo twice'
    for e in included:
      if e['silo'] not in ids:
        return f'it includes {e["silo"]!r}, which is not in run.json'
      reason = _check_claims(run, e['silo'], e)
      if reason:
        return f'entry of {e["silo"]!r}: {reason}'
      if not (records.is_number(e['weight']) and 0 <= e['weight'] <= 1
              and records.is_number(e['measured_norm']) and e['measured_norm'] >= 0
              and records.is_number(e.get('clip_factor', 1.0))
              and 0 < e.get('clip_factor', 1.0) <= 1):
        return f'entry of {e["silo"]!r} has a weight, norm or clip factor out of range'
    robust = manifest['robust']
    if robust['method'] not in outer.ROBUST_METHODS or not records.is_int(robust['trim']):
      return f'its robust rule {robust!r} is not one of {outer.ROBUST_METHODS}'
    if not isinstance(manifest['base_global_hash'], (str, type(None))):
      return f'base_global_hash {manifest["base_global_hash"]!r} is not a hash'
    if included and contributing(included) and not math.isclose(
        sum(e['weight'] for e in included), 1.0, rel_tol=1e-6):
      return 'its weights do not sum to 1'
    for e in manifest['rejected']:
      if not (isinstance(e['silo'], str) and isinstance(e['reason'], str)):
        return 'a rejection is not a silo and a reason'
    if not all(s in ids for s in manifest['missing'] + manifest['late_from_previous_round']):
      return 'it lists silos that are not in run.json as missing or late'
    if not records.is_number(manifest['decided_after_s']):
      return f'decided_after_s {manifest["decided_after_s"]!r} is not a number'
    reason = _check_copy_fields(ids, manifest)
    if reason:
      return reason
    if secure_aggregation(run) and manifest['unmask'] != unmasked_silos(run, included):
      return (f'its unmask list {manifest["unmask"]!r} is not every listed silo outside its '
              'included ones')
  except records.MALFORMED as e:
    return records.malformed(e)
  return None


def contributing(included: list[dict], silo_weight: dict | None = None) -> list[dict]:
  """The manifest entries that move the model: weight > 0 (by silo weight, or as decided)."""
  if silo_weight is not None:
    return [e for e in included if silo_weight[e['silo']] > 0]
  return [e for e in included if e['weight'] > 0]


def check_still_included(round_index: int, entry: dict, meta: dict | None) -> str | None:
  """The delta read to aggregate must be the one the manifest included (same content hash)."""
  if meta is None:
    return (f'silo {entry["silo"]}\'s delta of round {round_index} is gone although the '
            'manifest included it (deleted from the bucket). Fix: restore it from a bucket '
            'version or backup; nothing was written.')
  if meta.get('content_hash') != entry['content_hash']:
    return (f'silo {entry["silo"]}\'s delta of round {round_index} changed after the manifest '
            'included it: the bucket was modified mid-round. Fix: restore the delta, or rerun '
            'this round from a copy of the bucket; nothing was written.')
  return None


# -- secure aggregation: an included silo's recovery record ------------------------------------


def recovery_record(run: dict, round_index: int, silo: str, own_key: bytes, keys: dict) -> dict:
  """rounds/r/recovery/silo_<id>.json: included silo `silo`'s round-r self-mask key b_i,r and
  its pair keys k_iX,r (hex) with each silo X of the manifest's `unmask` list, and nothing else
  (never s_iX, never another round's key)."""
  return {'run_id': run['run_id'], 'round': round_index, 'silo': silo, 'self_key': own_key.hex(),
          'pair_keys': {peer: key.hex() for peer, key in sorted(keys.items())}}


def reveal_problem(run: dict, round_index: int, silo: str, manifest, check_signature) -> str | None:
  """Why silo `silo` must not publish its round-`round_index` recovery record against
  `manifest`, or None: the aggregator signed it, it is this run's manifest of this round
  (a replayed one would open another round's masks), and it includes `silo` (a silo left out
  never reveals its self key: its masked delta, if in the bucket, stays masked)."""
  if manifest is None:
    return 'the round is not decided'
  reason = check_signature(manifest) or check_manifest(run, round_index, manifest)
  if reason:
    return f'its manifest is not valid ({reason})'
  if silo not in {e['silo'] for e in manifest['included']}:
    return NOT_INCLUDED
  return None


NOT_INCLUDED = 'its manifest does not include this silo'  # `reveal_problem`: settled for good.


def _is_key(text) -> bool:
  return (isinstance(text, str) and len(text) == 2 * secagg.KEY_BYTES
          and len(bytes.fromhex(text)) == secagg.KEY_BYTES)


def check_recovery(run: dict, round_index: int, silo: str, record, unmask: list[str],
                   check_signature=None) -> str | None:
  """Why a recovery record must not be used to unmask round `round_index`, or None."""
  def fields(record):
    keys = record['pair_keys']
    if sorted(keys) != sorted(unmask):
      return f'it reveals pair keys with {sorted(keys)}, not with {sorted(unmask)}'
    if not (_is_key(record['self_key']) and all(_is_key(k) for k in keys.values())):
      return 'a key is not 32 bytes of hex'
    return None
  return _check_silo_fields(run, round_index, silo, record, check_signature, fields)


# -- a silo's evaluation record -------------------------------------------------------------


def eval_record(run: dict, round_index: int, silo: str, eval_loss: float, step: int) -> dict:
  """rounds/r/eval/silo_<id>.json: the held-out loss of global round r on the silo's own split."""
  return {'run_id': run['run_id'], 'round': round_index, 'silo': silo, 'eval_loss': eval_loss,
          'step': step}


def check_eval_record(run: dict, round_index: int, silo: str, record,
                      check_signature=None) -> str | None:
  """Why a silo's evaluation record at rounds/r/eval/silo_<silo>.json is not to be believed."""
  if not isinstance(record, dict):
    return 'unreadable'
  # Records from before run ids were written in them are of this run.
  reason = _check_silo_record(run, round_index, silo, record, check_signature,
                              run_id_optional=True)
  if reason:
    return reason
  if not records.is_number(record.get('eval_loss')) or not records.is_int(record.get('step')):
    return (f'eval_loss {record.get("eval_loss")!r} or step {record.get("step")!r} is not a '
            'finite number')
  return None


# -- a silo's contribution record (fedpt/contribution.py) ------------------------------------

CONTRIBUTION_METHODS = config_lib.CONTRIBUTION_MODES[1:]  # Every contribution.mode but 'none'.


def contribution_record(run: dict, round_index: int, silo: str, *, method: str,
                        eval_windows: int, eval_tokens: int, base_loss: float,
                        next_loss: float, total: float, carry: float | None,
                        first_order: dict | None, loo: dict | None = None,
                        shapley: dict | None = None, reason: str | None = None,
                        seconds: float = 0.0) -> dict:
  """rounds/r/contribution/silo_<id>.json: what round r's update did to silo `silo`'s held-out
  loss (`base_loss` of global r, `next_loss` of global r+1 on the same windows), split per
  contributor. Only numbers: `first_order` (and `loo`, `shapley`) {contributor: nats} or
  null with `reason` (secure aggregation: only `total`, -g . (theta_{r+1} - theta_r));
  `seconds`: what computing it took the silo."""
  return {'run_id': run['run_id'], 'round': round_index, 'silo': silo, 'method': method,
          'eval_windows': eval_windows, 'eval_tokens': eval_tokens, 'base_loss': base_loss,
          'next_loss': next_loss, 'measured_change': base_loss - next_loss, 'total': total,
          'carry': carry, 'first_order': first_order, 'loo': loo, 'shapley': shapley,
          'reason': reason, 'seconds': seconds}


def check_contribution_record(run: dict, round_index: int, silo: str, record,
                              check_signature=None) -> str | None:
  """Why a contribution record at rounds/r/contribution/silo_<silo>.json is not to be used."""
  def fields(record):
    if record['method'] not in CONTRIBUTION_METHODS:
      return f'method {record["method"]!r} is not one of {CONTRIBUTION_METHODS}'
    if not (records.is_int(record['eval_windows']) and records.is_int(record['eval_tokens'])
            and record['eval_windows'] > 0 and record['eval_tokens'] > 0):
      return 'eval_windows or eval_tokens is not a positive integer'
    for key in ('base_loss', 'next_loss', 'measured_change', 'total', 'seconds'):
      if not records.is_number(record[key]):
        return f'{key} {record[key]!r} is not a finite number'
    if record['seconds'] < 0:
      return f'seconds {record["seconds"]!r} is negative'
    if not math.isclose(record['measured_change'], record['base_loss'] - record['next_loss'],
                        rel_tol=1e-9, abs_tol=1e-9):
      return 'measured_change is not base_loss - next_loss'
    if record['carry'] is not None and not records.is_number(record['carry']):
      return f'carry {record["carry"]!r} is not a finite number or null'
    ids = silo_ids(run)
    for key in ('first_order', 'loo', 'shapley'):
      values = record[key]
      if values is None:
        continue
      if not isinstance(values, dict) or not all(
          k in ids and records.is_number(v) for k, v in values.items()):
        return f'{key} is not {{listed silo: finite number}} or null'
    if record['first_order'] is None and not isinstance(record['reason'], str):
      return 'it has no per-silo values and no reason'
    if not isinstance(record['reason'], (str, type(None))):
      return f'reason {record["reason"]!r} is not text or null'
    return None
  return _check_silo_fields(run, round_index, silo, record, check_signature, fields)


# -- a global round's shard meta.json --------------------------------------------------------


def global_shard_meta(run_id: str, round_index: int, shard: int, num_shards: int, *,
                      leaf_hashes: dict, leaf_shapes: dict, leaf_dtypes: dict,
                      outer_state_hashes: dict, contributors: list[str], tokens: int,
                      update: dict | None = None) -> dict:
  """What an aggregator shard commits beside its params and outer-optimizer state.

  Every array the shard wrote is hashed here (params per leaf, outer state per
  `aggregator.state_to_arrays` name), so with the aggregator's signature nothing
  it reads back, its own earlier output included, can be swapped unnoticed.
  `update` (compressed downlink): {hashes: {leaf/key: sha256}, compression,
  block_size, bytes} of the update item.
  """
  meta = {
      'round': round_index, 'shard': shard, 'num_shards': num_shards, 'run_id': run_id,
      'leaf_hashes': leaf_hashes, 'leaf_shapes': leaf_shapes, 'leaf_dtypes': leaf_dtypes,
      'outer_state_hashes': outer_state_hashes, 'contributors': contributors, 'tokens': tokens,
  }
  if update is not None:
    meta.update(update_hashes=update['hashes'], update_bytes=update['bytes'],
                update_format={'compression': update['compression'],
                               'block_size': update['block_size']})
  return meta


def update_rows(run: dict, global_round: int, leaf_shapes: dict) -> dict:
  """{leaf: shape} of what global round `global_round`'s update holds of each leaf: all of
  it, or with fragments the rows of the fragment round `global_round - 1` exchanged."""
  return fragments_lib.fragment_shapes(
      leaf_shapes, round_fragment(run, max(global_round - 1, 0)), fragments(run))


def update_layout(run: dict, meta: dict) -> tuple[dict | None, str | None]:
  """({leaf: {key: (shape, dtype)}} of a shard's published update, None) or (None, why not).

  The layout follows from the run's downlink format and the leaf shapes the meta lists
  (with fragments: the rows of the fragment that round `meta['round'] - 1` exchanged);
  the meta must hash exactly those arrays, of shared leaves only, and count their bytes.
  """
  fmt = downlink(run)
  if fmt is None or 'update_hashes' not in meta:
    return None, 'it publishes no update'
  try:
    form = meta['update_format']
    if form != {'compression': fmt, 'block_size': run['federation']['block_size']}:
      return None, f'its update format {form} is not the run\'s downlink ({fmt})'
    leaves = sorted({k.rsplit('/', 1)[0] for k in meta['update_hashes']})
    layout, nbytes = {}, 0
    rows = update_rows(run, meta['round'], meta['leaf_shapes'])
    for name in leaves:
      if name not in rows or is_private(run, name):
        return None, (f'its update names {name!r}, not a shared leaf of this shard '
                      '(of the round\'s fragment)')
      layout[name] = compression.payload_spec(rows[name], fmt, form['block_size'])
      nbytes += compression.compressed_nbytes(rows[name], fmt, form['block_size'])
    if sorted(meta['update_hashes']) != sorted(f'{n}/{k}' for n, s in layout.items() for k in s):
      return None, 'its update hashes are not those of the downlink layout'
    if meta['update_bytes'] != nbytes:
      return None, f'its update_bytes {meta["update_bytes"]!r} are not its layout\'s {nbytes}'
  except records.MALFORMED as e:
    return None, records.malformed(e)
  return layout, None


def check_shard_arrays(meta: dict, param_hashes: dict, outer_state_hashes: dict) -> str | None:
  """The reason a global shard's restored arrays are not the ones its meta.json vouches for."""
  for what, want, have in (('parameter', meta['leaf_hashes'], param_hashes),
                           ('outer-optimizer state', meta.get('outer_state_hashes'),
                            outer_state_hashes)):
    if want is None:
      return f'its meta.json hashes no {what} arrays'
    if sorted(want) != sorted(have):
      return f'its {what} arrays are not the ones meta.json lists'
    for name in sorted(want):
      if want[name] != have[name]:
        return (f'{what} {name} does not match its committed hash: the object was modified or '
                'torn after commit')
  return None


def check_global_meta(run: dict, round_index: int, meta: dict, check_aggregator=None,
                      previous_manifest: dict | None = None) -> str | None:
  """The reason a global round's shard meta must not be loaded, or None.

  It must name this run and round. In a signed run (`check_aggregator` given)
  it must carry the aggregator's signature, and so must the previous round's
  manifest, so the recorded decision is the aggregator's own.
  """
  if meta.get('run_id') != run['run_id'] or meta.get('round') != round_index:
    return f'meta.json says run {meta.get("run_id")!r} round {meta.get("round")}'
  if check_aggregator is None:
    return None
  reason = check_aggregator(meta)
  if reason is None and round_index > 0:
    reason = ('the manifest of the previous round is missing' if previous_manifest is None
              else check_aggregator(previous_manifest))
    reason = reason and f'manifest of round {round_index - 1}: {reason}'
  return reason


def global_leaves(metas: list[dict]) -> tuple[dict, dict, dict]:
  """({leaf: shape}, {leaf: dtype}, {leaf: hash}) of a global round from its shard metas."""
  shapes = {n: tuple(s) for m in metas for n, s in m['leaf_shapes'].items()}
  dtypes = {n: d for m in metas for n, d in m['leaf_dtypes'].items()}
  hashes = {n: h for m in metas for n, h in m['leaf_hashes'].items()}
  return shapes, dtypes, hashes
