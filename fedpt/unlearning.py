"""Unlearning a silo: a branch of the run without it, exact (retrain) or re-aggregated (replay).

Round b is the first round whose global update silo X influenced (`protocol.influenced_by`,
read from the aggregator's signed manifests), so global round b is the last one without X.
Both modes write a new run at `out`: run.json without X (a new run id, and `parent` naming
the run, round b and its storage), global rounds 0..b copied bit for bit (their metas
re-issued under the new run id) and manifests 0..b-1 (X's mentions removed). `retrain`
stops there: the remaining silos continue from global round b with real rounds, exactly as
if X had never joined. `replay` re-aggregates the stored deltas of the remaining silos
round by round with the aggregator's own weighting and outer step: approximate, since those
deltas were trained from global models X had influenced. Docs: docs/protocol.md
"Unlearning a silo".
"""
import uuid

from fedpt import aggregator as aggregator_lib
from fedpt import config as config_lib
from fedpt import errors
from fedpt import ledger
from fedpt import outer
from fedpt import protocol
from fedpt import records
from fedpt import signing
from fedpt import storage as storage_lib

MODES = ('retrain', 'replay')
RETAIN = 'federation.retain_for_unlearning'


class UnlearnError(errors.UserError, ValueError):
  """Unlearning cannot be done as asked; the line names why and the fix."""


def decided_manifests(store: storage_lib.RunStorage, run: dict) -> list[dict]:
  """Every decided round's manifest, vetted as the ledger vets them (signature, form)."""
  check = signing.listed_aggregator_check(run)
  out = []
  while (manifest := store.read_manifest(len(out))) is not None:
    reason = (check(manifest) if check else None) or protocol.check_manifest(
        run, len(out), manifest)
    if reason:
      raise storage_lib.StorageError(
          f'the manifest of round {len(out)} under {store.root}: {reason}. The bucket was '
          'tampered with. Fix: restore it from a bucket version; nothing was written.')
    out.append(manifest)
  return out


def first_influence(manifests: list[dict], silo: str) -> int | None:
  """Round b: the first round whose global update `silo`'s delta influenced, or None."""
  return next((r for r, m in enumerate(manifests) if protocol.influenced_by(m, silo)), None)


def branch_record(run: dict, silo: str, run_id: str, parent_root: str, branch: int, mode: str,
                  extra_rounds: int) -> dict:
  """run.json of the branch: `silo` gone from the contract's silo lists and the keys.

  `federation.min_silos` is capped at the silos left; `rounds` grows by `extra_rounds`
  (replay's calibration rounds). Everything else is the parent's contract.
  """
  fed = dict(run['federation'])
  keep = [i for i, s in enumerate(fed['silos']) if s != silo]
  for field in ('silos', 'silo_weights', 'silo_inner_steps', 'silo_round_budget_s'):
    if fed.get(field):
      fed[field] = [fed[field][i] for i in keep]
  fed['min_silos'] = min(fed['min_silos'], len(keep))
  fed['rounds'] += extra_rounds
  record = {k: v for k, v in run.items() if k != signing.SIGNATURE}
  record.update(run_id=run_id, federation=fed,
                silos=[s for s in run['silos'] if s['id'] != silo],
                parent={'run_id': run['run_id'], 'round': branch, 'storage': parent_root,
                        'silo': silo, 'mode': mode})
  keys = run.get('public_keys')
  if keys:
    record['public_keys'] = {
        k: ({i: pem for i, pem in v.items() if i != silo} if k != signing.AGGREGATOR else v)
        for k, v in keys.items()}
  try:
    records.check_run_form(record, 'the branch')
    protocol.validate_federation(config_lib.with_values(
        config_lib.base_config(), records.recorded_contract(record)))
  except (config_lib.ConfigError, outer.OuterConfigError) as e:
    raise UnlearnError(
        f'run {run["run_id"]} without silo {silo} breaks a run rule: config field {e.field!r} '
        f'{e.problem}. Fix: unlearning cannot change the contract; create a new run of the '
        'remaining silos (scripts/init_run.py) instead.') from None
  except records.RecordError as e:
    raise UnlearnError(f'run {run["run_id"]} without silo {silo}: {e}') from None
  return record


def check_retained(store: storage_lib.RunStorage, run: dict, manifests: list[dict], silo: str,
                   branch: int, mode: str) -> None:
  """Refuses, naming the round, unless global round `branch` (and, for replay, every delta
  of the remaining silos from then on) is still stored."""
  fix = (f'Fix: only runs created with --config.{RETAIN}=True keep every round and delta '
         f'that unlearning reads (the aggregator garbage-collects them otherwise); this run '
         f'can only be retrained from scratch without {silo} (scripts/init_run.py).')
  if store.global_shard_metas(branch) is None:
    stored = ledger.ranges(store.committed_global_rounds())
    raise UnlearnError(
        f'global round {branch}, the last before silo {silo}\'s first delta (round {branch}), '
        f'was garbage-collected from {store.root} (stored: {stored or "none"}). {fix}')
  if mode != 'replay':
    return
  for r in range(branch, len(manifests)):
    for entry in protocol.contributing(manifests[r]['included']):
      if entry['silo'] != silo and store.delta_meta(r, entry['silo']) is None:
        raise UnlearnError(
            f'silo {entry["silo"]}\'s delta of round {r}, which replay re-aggregates, was '
            f'garbage-collected from {store.root}. {fix} Or use --mode=retrain.')


def check_out(out: storage_lib.RunStorage) -> None:
  if out.list_dir(out.root):
    raise UnlearnError(
        f'--out={out.root} already exists and is not empty. Fix: pass a new storage root for '
        'the unlearned run; the parent run is never modified.')


def unlearn(storage_root: str, silo: str, mode: str, out_root: str, keys_dir: str | None = None,
            calibration_rounds: int = 0) -> dict:
  """Writes the run without `silo` at `out_root` (see the module docstring); returns a
  summary: the new run id, the branch round, the rounds replayed and the silos left."""
  if mode not in MODES:
    raise UnlearnError(f'--mode={mode!r} is not one of {MODES}. Fix: retrain (exact: the '
                       'remaining silos train again from the branch) or replay (fast, '
                       'approximate).')
  if not records.is_int(calibration_rounds) or calibration_rounds < 0 or (
      calibration_rounds and mode != 'replay'):
    raise UnlearnError(
        f'--calibration_rounds={calibration_rounds!r}: must be an integer >= 0, and only with '
        '--mode=replay (retrain\'s rounds are all real). Fix: drop it, or use --mode=replay.')
  parent = storage_lib.RunStorage(storage_root)
  run = parent.read_run()
  protocol.check_run(run)
  ids = protocol.silo_ids(run)
  if silo not in ids:
    raise UnlearnError(f'--silo={silo!r} is not a silo of run {run["run_id"]} (run.json lists '
                       f'{ids}). Fix: pass one of those.')
  if len(ids) == 1:
    raise UnlearnError(f'silo {silo} is the only silo of run {run["run_id"]}: nothing would '
                       'remain. Fix: delete the run instead.')
  if mode == 'replay' and protocol.secure_aggregation(run):
    raise UnlearnError(
        f'run {run["run_id"]} uses secure aggregation: its stored deltas are masked, and only '
        'their sum over each round\'s silos can be read, so they cannot be re-aggregated '
        f'without {silo}. Fix: use --mode=retrain.')
  identity = signing.party_identity(run, keys_dir, signing.AGGREGATOR)  # Signs the branch.
  target = storage_lib.RunStorage(out_root)
  check_out(target)
  manifests = decided_manifests(parent, run)
  branch = first_influence(manifests, silo)
  if branch is None:
    raise UnlearnError(
        f'silo {silo} was never included in run {run["run_id"]} (none of its '
        f'{len(manifests)} decided rounds took its delta): nothing to unlearn. Fix: none '
        'needed; the run\'s models never used its data.')
  check_retained(parent, run, manifests, silo, branch, mode)
  new = branch_record(run, silo, uuid.uuid4().hex, str(parent.root), branch, mode,
                      calibration_rounds)
  sign = identity.sign if identity else (lambda record: record)
  copy_history(parent, run, target, new, manifests, silo, branch, sign)
  target.create_run(sign(new))
  replayed = (replay(parent, target, new, manifests, silo, branch, keys_dir, sign)
              if mode == 'replay' else [])
  return {'run_id': new['run_id'], 'parent': new['parent'], 'branch_round': branch,
          'replayed_rounds': replayed, 'silos': protocol.silo_ids(new),
          'next_round': branch + len(replayed), 'rounds': new['federation']['rounds']}


def copy_history(parent: storage_lib.RunStorage, run: dict, target: storage_lib.RunStorage,
                 new: dict, manifests: list[dict], silo: str, branch: int, sign) -> None:
  """Global rounds 0..`branch` (those still stored) and manifests 0..`branch`-1 of the
  parent, vetted as any reader vets them, re-issued under the branch's run id."""
  check = signing.listed_aggregator_check(run)
  for r in parent.committed_global_rounds():
    if r > branch:
      break
    for meta in parent.global_shard_metas(r):
      reason = protocol.check_global_meta(run, r, meta, check, manifests[r - 1] if r else None)
      if reason:
        raise storage_lib.tampered(parent.root, r, meta['shard'], reason)
      issued = {k: v for k, v in meta.items() if k != signing.SIGNATURE}
      target.copy_global_shard(parent, r, meta['shard'], meta['num_shards'],
                               sign(dict(issued, run_id=new['run_id'])))
  for r in range(branch):
    target.write_manifest(r, sign(protocol.without_silo(new, manifests[r], silo)))


def replay(parent: storage_lib.RunStorage, target: storage_lib.RunStorage, new: dict,
           manifests: list[dict], silo: str, branch: int, keys_dir: str | None,
           sign) -> list[int]:
  """Rounds `branch`.. of the parent again without `silo`: each round's manifest without it
  (`protocol.without_silo`), then every aggregation shard's outer step on the remaining
  deltas, read from the parent's bucket (`Aggregator(deltas=...)`)."""
  shards = [aggregator_lib.Aggregator(str(target.root), shard, None, keys_dir, deltas=parent)
            for shard in range(new['federation']['num_shards'])]
  replayed = []
  for r in range(branch, len(manifests)):
    manifest = protocol.without_silo(new, manifests[r], silo, replayed=True)
    manifest['base_global_hash'] = target.global_hash(protocol.base_round(new, r))
    manifest = sign(manifest)
    target.write_manifest(r, manifest)
    for agg in shards:
      agg.aggregate(r, manifest)
    replayed.append(r)
  return replayed
