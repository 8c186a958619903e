"""Records read from the bucket are untrusted JSON: their form and numbers, checked first.

Anyone with write access to the bucket may have edited a record, and JSON itself
parses `1e999`, `NaN` and 400-digit integers (and Python counts True as an
integer). Every reader checks a record's form here before indexing into it or
computing with it. This module only says whether a record is well-formed, so
that the bucket layer (`storage.py`) can refuse junk without round math; what
well-formed records mean is `protocol.py`'s.
"""
import math

from fedpt import config as config_lib
from fedpt import errors

# What indexing into (or computing with) a malformed record raises: the record is
# refused with the error as its reason, never a crash of the reader.
MALFORMED = (TypeError, KeyError, ValueError, AttributeError, IndexError, ArithmeticError)

# run.json stores the run's contract in these config sections, plus 'seed'.
CONTRACT_SECTIONS = ('model', 'data', 'inner', 'federation', 'outer')


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


def recorded_contract(run: dict) -> dict:
  """run.json's contract as {'section.field': value} (the inverse of `protocol.run_record`)."""
  out = {'seed': run['seed']}
  for section in CONTRACT_SECTIONS:
    out.update({f'{section}.{k}': v for k, v in run[section].items()})
  return out


def check_run_form(run, where: str) -> None:
  """Raises RecordError unless run.json's contract and silo records are well-formed.

  The contract must pass the config's own checks (`config.validate`: every
  field's type and range, silo ids, weights), so a run.json with a poll
  interval of -1 or all-zero weights stops every party with one line.
  """
  try:
    if not isinstance(run, dict):
      raise ValueError('it is not a JSON object')
    recorded = recorded_contract(run)
    unknown = sorted(set(recorded) - set(config_lib.flat(config_lib.base_config())))
    if unknown:
      raise ValueError(f'unknown contract field(s) {unknown}')
    config = config_lib.with_values(config_lib.base_config(), recorded)
    config_lib.validate(config)
    ids = [s['id'] for s in run['silos']]
    if ids != list(config.federation.silos):
      raise ValueError(f'silos {ids} are not federation.silos {list(config.federation.silos)}')
    for s in run['silos']:
      if not (is_number(s['weight']) and s['weight'] >= 0 and is_int(s['inner_steps'])
              and s['inner_steps'] > 0 and is_number(s['round_budget_s'])
              and s['round_budget_s'] >= 0):
        raise ValueError(f'silo record {s} needs weight >= 0, inner_steps > 0, '
                         'round_budget_s >= 0')
    if not sum(s['weight'] for s in run['silos']) > 0:
      raise ValueError('every silo weight is 0')
    if not (isinstance(run['run_id'], str) and isinstance(run['tokenizer_sha256'], str)):
      raise ValueError('run_id and tokenizer_sha256 must be strings')
  except (config_lib.ConfigError, *MALFORMED) as e:
    raise RecordError(
        f'{where} is invalid: {errors.one_line(e)}. Fix: recreate the run with '
        'scripts/init_run.py; a run.json must not be edited by hand.') from None


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
    if not (isinstance(meta['contributors'], list)
            and all(isinstance(c, str) for c in meta['contributors'])):
      return 'its meta.json has no list of contributors'
  except MALFORMED as e:
    return malformed(e)
  return None
