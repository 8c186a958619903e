"""Records read from the bucket are untrusted JSON: their form and numbers, checked first.

Anyone with write access to the bucket may have edited a record, and JSON itself
parses `1e999`, `NaN` and 400-digit integers (and Python counts True as an
integer). Every reader checks a record's form here before indexing into it or
computing with it. This module only says whether a record is well-formed, so
that the bucket layer (`storage.py`) can refuse junk without round math; what
well-formed records mean is `protocol.py`'s.
"""
import json
import math

from fedpt import config as config_lib
from fedpt import errors

# What indexing into (or computing with) a malformed record raises: the record is
# refused with the error as its reason, never a crash of the reader.
MALFORMED = (TypeError, KeyError, ValueError, AttributeError, IndexError, ArithmeticError)

FORMAT_VERSION = 3  # 3: run.json holds the run's whole contract; deltas declare H and budget.

# run.json stores the run's contract in these config sections, plus 'seed'.
CONTRACT_SECTIONS = ('model', 'data', 'inner', 'federation', 'outer')
# Config fields each party chooses for itself (how it computes, where its data and
# tokenizer file are, how it logs); every other field is the run's contract.
PARTY_FIELDS = ('name', 'model.remat', 'model.attention', 'model.scan_layers',
                'model.compute_dtype', 'data.corpus', 'data.stdlib_group', 'data.tokenizer',
                'data.watermark.',
                'inner.grad_accum', 'train.', 'mesh.', 'sharding.', 'distributed.', 'personal.',
                'privacy.', 'contribution.')
# In run.json as every party's default; a party may pass its own value.
PARTY_DEFAULTS = ('federation.wait_timeout_s', 'federation.poll_s')
# Declared per silo in run.json's silo list (from federation.silo_<name>); the
# config field of the same name is the default for silos without a declaration.
PER_SILO = {'federation.inner_steps': 'inner_steps', 'federation.round_budget_s': 'round_budget_s'}
# Contract fields added within format 3, with the value a run.json written before them
# means (all 'off'): so older runs stay readable and resume unchanged.
LATER_FIELDS = {'inner.drift_correction': 'none', 'inner.prox_mu': 0.0,
                'federation.private_params': (), 'federation.overlap': 'none',
                'federation.downlink_compression': 'none', 'federation.fragments': 1,
                'federation.error_feedback_decay': 1.0,
                'federation.topk_density': 0.01, 'federation.topk_bits': 2,
                'federation.topk_chunk': 4096,
                'outer.momentum_warmup_rounds': 0, 'outer.lr_warmup_rounds': 0,
                'inner.optimizer': 'adamw', 'inner.muon_lr': 0.02, 'inner.muon_weight_decay': 0.0,
                'inner.muon_beta': 0.95, 'inner.muon_ns_steps': 5,
                'federation.secure_aggregation': False, 'federation.secagg_clip': 1.0,
                'federation.secagg_recovery_timeout_s': 600.0,
                'federation.retain_for_unlearning': False,
                'federation.copy_cosine': 0.0, 'federation.min_norm_ratio': 0.0,
                'federation.reject_copies': False}


class RecordError(errors.UserError, ValueError):
  """A record in the bucket is not well-formed; the message names it and the fix."""


def is_int(value) -> bool:
  """A JSON integer (not a bool, which Python counts as one)."""
  return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
  """A finite JSON number; 1e999 and NaN parse, and break sums and sorts downstream."""
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def malformed(error: BaseException) -> str:
  return f'malformed metadata ({type(error).__name__}: {errors.one_line(error)})'


def _is_party_field(field: str) -> bool:
  return any(field == p or (p.endswith('.') and field.startswith(p)) for p in PARTY_FIELDS)


def contract(config) -> dict:
  """{'section.field': value} of what a run fixes: every field but `PARTY_FIELDS`."""
  return {k: v for k, v in config_lib.flat(config).items() if not _is_party_field(k)}


def silo_records(config) -> list[dict]:
  """run.json's `silos`: each silo's id, weight, H and round budget, resolved from `config`."""
  fed = config.federation
  per_silo = {'weight': list(fed.silo_weights) or [1.0] * len(fed.silos)}
  for field, key in PER_SILO.items():
    per_silo[key] = list(fed[f'silo_{key}']) or [fed[key]] * len(fed.silos)
  return [{'id': s, 'weight': float(per_silo['weight'][i]),
           'inner_steps': int(per_silo['inner_steps'][i]),
           'round_budget_s': float(per_silo['round_budget_s'][i])}
          for i, s in enumerate(fed.silos)]


def check_format(run) -> None:
  """Records of another protocol version would be misread: refuse the run first."""
  version = run.get('format_version') if isinstance(run, dict) else None
  if version != FORMAT_VERSION:
    raise RecordError(
        f'the run {run.get("run_id") if isinstance(run, dict) else None!r} speaks protocol '
        f'format {version!r}; this fedpt speaks {FORMAT_VERSION}. Fix: use the fedpt version '
        'that created the run (docs/protocol.md lists the formats), or create a new run.')


def recorded_contract(run: dict) -> dict:
  """run.json's contract as {'section.field': value} (the inverse of `protocol.run_record`)."""
  out = {'seed': run['seed']}
  for section in CONTRACT_SECTIONS:
    out.update({f'{section}.{k}': v for k, v in run[section].items()})
  return {**LATER_FIELDS, **out}


def check_run_form(run, where: str) -> None:
  """Raises RecordError unless run.json is of this format and its contract well-formed.

  Every contract field must be there and pass the config's own checks
  (`config.validate`: each field's type and range, silo ids, weights, per-silo
  declarations), and `silos` must be what the contract resolves to; so a
  run.json with a poll interval of -1, all-zero weights or a missing field stops
  every party with one line. `protocol.check_run` adds the run-level rules.
  """
  check_format(run)
  try:
    recorded = recorded_contract(run)
    expected = set(contract(config_lib.base_config()))
    if set(recorded) != expected:
      raise ValueError(f'unknown contract field(s) {sorted(set(recorded) - expected)}, missing '
                       f'{sorted(expected - set(recorded))}')
    config = config_lib.with_values(config_lib.base_config(), recorded)
    config_lib.validate(config)
    if run['silos'] != silo_records(config):
      raise ValueError(f'its silo list {run["silos"]} is not what its federation section '
                       'declares')
    if not (isinstance(run['run_id'], str) and isinstance(run['tokenizer_sha256'], str)):
      raise ValueError('run_id and tokenizer_sha256 must be strings')
  except config_lib.ConfigError as e:
    raise RecordError(f'{where} is invalid: config field {e.field!r} {e.problem}. Fix: '
                      'recreate the run with scripts/init_run.py; run.json is not to be edited '
                      'by hand.') from None
  except MALFORMED as e:
    raise RecordError(
        f'{where} is invalid: {errors.one_line(e)}. Fix: recreate the run with '
        'scripts/init_run.py; run.json is not to be edited by hand.') from None


def check_shard_meta_form(meta) -> str | None:
  """Why a global shard meta read from the bucket is not even well-formed, or None.

  Every party polls these (`storage.global_shard_metas`), so a malformed one is
  named before anyone indexes into it; `protocol.check_global_meta` then checks
  whose it is.
  """
  if not isinstance(meta, dict):
    return 'its meta.json is not a JSON object'
  try:
    n = meta['num_shards']
    if not (is_int(n) and n >= 1 and is_int(meta['shard']) and 0 <= meta['shard'] < n
            and is_int(meta['round']) and is_int(meta['tokens']) and meta['tokens'] >= 0):
      return (f'its meta.json says round {meta["round"]!r}, shard {meta["shard"]!r} of '
              f'{n!r}, tokens {meta["tokens"]!r}')
    hashes, shapes, dtypes = meta['leaf_hashes'], meta['leaf_shapes'], meta['leaf_dtypes']
    if not (isinstance(hashes, dict) and sorted(hashes) == sorted(shapes) == sorted(dtypes)):
      return 'its meta.json lists different leaves for hashes, shapes and dtypes'
    for name in hashes:
      shape = shapes[name]
      if not (isinstance(hashes[name], str) and isinstance(shape, list)
              and all(is_int(d) and 0 <= d < 2**40 for d in shape)
              and math.prod(shape) < 2**40 and dtypes[name] in config_lib.DTYPES):
        return f'its meta.json describes leaf {name!r} as {shape!r} {dtypes[name]!r}'
    if not (isinstance(meta['outer_state_hashes'], dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta['outer_state_hashes'].items())):
      return 'its meta.json has no table of outer-optimizer state hashes'
    if not (isinstance(meta['contributors'], list)
            and all(isinstance(c, str) for c in meta['contributors'])):
      return 'its meta.json has no list of contributors'
    if 'update_hashes' in meta and not (  # The compressed downlink's update (optional).
        isinstance(meta['update_hashes'], dict)
        and all(isinstance(k, str) and isinstance(v, str)
                for k, v in meta['update_hashes'].items())
        and isinstance(meta['update_format'], dict) and is_int(meta['update_bytes'])
        and meta['update_bytes'] >= 0):
      return 'its meta.json describes its update as neither hashes, a format nor a size'
  except MALFORMED as e:
    return malformed(e)
  return None


def read_private(path, error: type, what: str, problem_of, restore_fix: str,
                 read_fix: str) -> dict | None:
  """A silo's private JSON record at `path` (a pathlib.Path: privacy.json, watermark.json):
  None if absent, else the record; `error` (one line) when it cannot be read or
  `problem_of(record)` names why it is not `what`, with the fix."""
  try:
    record = json.loads(path.read_text())
  except FileNotFoundError:
    return None
  except ValueError as e:
    raise error(f'{path} is not readable JSON ({errors.one_line(e)}). {restore_fix}') from None
  except OSError as e:
    raise error(f'{path} cannot be read ({errors.one_line(e)}). {read_fix}') from None
  problem = problem_of(record)
  if problem:
    raise error(f'{path} is not {what} ({problem}). {restore_fix}')
  return record
