"""The run's ledger: who contributed what to each round, rebuilt from the bucket alone.

Everything here reads only what the protocol already publishes (manifests, delta
and global metas, the silos' held-out losses), so any consortium member can audit
a run without trusting the aggregator's logs. Building and rendering are pure
functions of that bucket state.
"""
import json

import numpy as np

from fedpt import compression
from fedpt import contribution as contribution_lib
from fedpt import protocol
from fedpt import records
from fedpt import signing
from fedpt import storage as storage_lib


def global_nbytes(store: storage_lib.RunStorage, round_index: int | None) -> int | None:
  """Bytes of one global model's parameters (what each silo downloads per round)."""
  metas = None if round_index is None else store.global_shard_metas(round_index)
  if metas is None:
    return None
  shapes, dtypes, _ = protocol.global_leaves(metas)
  return sum(int(np.prod(shapes[n])) * np.dtype(dtypes[n]).itemsize for n in shapes)


def update_nbytes(store: storage_lib.RunStorage, run: dict, round_index: int) -> int | None:
  """Bytes of global round `round_index`'s published update (compressed downlink), or None.

  From its shard metas while the round is stored; once garbage-collected, the run's
  downlink layout over the shared leaves of the newest round (every shared leaf moves
  when anyone contributed).
  """
  fmt = protocol.downlink(run)
  metas = store.global_shard_metas(round_index) if fmt else None
  if metas is not None:
    return sum(m.get('update_bytes', 0) for m in metas)
  newest = store.latest_global_round() if fmt else None
  metas = store.global_shard_metas(newest) if newest is not None else None
  if metas is None:
    return None
  shapes, _, _ = protocol.global_leaves(metas)
  rows = protocol.update_rows(run, round_index, {n: shapes[n] for n in
                                                 protocol.shared_leaves(run, shapes)})
  return sum(compression.compressed_nbytes(shape, fmt, run['federation']['block_size'])
             for shape in rows.values())


def eval_losses(store: storage_lib.RunStorage, run: dict, round_index: int) -> dict[str, float]:
  """silo -> held-out loss of global round `round_index` on its own split, each record vetted.

  A record that fails `protocol.check_eval_record` (foreign, replayed, or not signed by its
  silo in a signed run) stops the reader: the bucket was tampered with.
  """
  check = signing.listed_silo_check(run)
  out = {}
  for silo, record in store.eval_records(round_index).items():
    if record is None:
      continue  # Being written.
    reason = protocol.check_eval_record(run, round_index, silo, record, check)
    if reason:
      raise storage_lib.StorageError(
          f'{store.round_dir(round_index)}/eval/silo_{silo}.json: {reason}. The bucket was '
          'tampered with. Fix: delete the object (the silo writes it again when it evaluates '
          'that round) or restore it from a bucket version.')
    out[silo] = float(record['eval_loss'])
  return out


def contributions(store: storage_lib.RunStorage, run: dict, round_index: int,
                  included: list[str] | None = None) -> dict:
  """Round `round_index`'s contribution matrices, from the silos' records (each vetted).

  Unlike an evaluation record, a record that fails `protocol.check_contribution_record`
  is skipped with its reason (`skipped`): it only describes a round, nothing is computed
  from it. `value` is each row's Shapley values where published, else its first-order ones.
  `included`: the vetted manifest's included silos, the only ones a record may value.
  """
  check = signing.listed_silo_check(run)
  vetted, skipped = {}, []
  for silo, record in store.contribution_records(round_index).items():
    # Records are written whole (`storage.write_json`): one listed but unreadable is damaged.
    reason = ('not readable JSON' if record is None else
              protocol.check_contribution_record(run, round_index, silo, record, check))
    if reason is None and included is not None:
      named = {k for m in ('first_order', 'loo', 'shapley') for k in (record[m] or {})}
      if named - set(included):
        reason = (f'it values {sorted(named - set(included))}, not among the round\'s '
                  f'included silos {sorted(included)}')
    if reason:
      skipped.append({'silo': silo, 'reason': reason})
    else:
      vetted[silo] = record
  value = {j: dict(r['shapley'] or r['first_order']) for j, r in sorted(vetted.items())
           if r['shapley'] or r['first_order']}
  return {
      'method_by_silo': {j: r['method'] for j, r in sorted(vetted.items())},
      'value': value,
      'first_order': contribution_lib.matrix(vetted, 'first_order'),
      'loo': contribution_lib.matrix(vetted, 'loo'),
      'shapley': contribution_lib.matrix(vetted, 'shapley'),
      'carry_by_silo': {j: r['carry'] for j, r in sorted(vetted.items())},
      'total_by_silo': {j: r['total'] for j, r in sorted(vetted.items())},
      'measured_by_silo': {j: r['measured_change'] for j, r in sorted(vetted.items())},
      'reason_by_silo': {j: r['reason'] for j, r in sorted(vetted.items()) if r['reason']},
      'skipped': skipped,
  }


def _mean(values):
  values = list(values)
  return float(np.mean(values)) if values else None


def round_record(store: storage_lib.RunStorage, run: dict, round_index: int,
                 model_nbytes: int | None) -> dict:
  """One row of the ledger: the decision, traffic and outcome of round `round_index`.

  Rows come from the create-once manifest when there is one; before the
  aggregator has decided, from the deltas committed so far.
  """
  manifest = store.read_manifest(round_index)
  check = signing.listed_aggregator_check(run)
  reason = check(manifest) if manifest is not None and check is not None else None
  if manifest is not None and reason is None:
    reason = protocol.check_manifest(run, round_index, manifest)
  if reason:
    raise storage_lib.StorageError(
        f'the manifest of round {round_index} under {store.root}: {reason}. The bucket was '
        'tampered with. Fix: ask the run\'s operator to restore it from a bucket version.')
  if manifest is not None:
    included = manifest['included']
    rejected = manifest['rejected']
    missing, late = manifest['missing'], manifest['late_from_previous_round']
    decided_after_s = manifest['decided_after_s']
  else:
    included, rejected, missing, late, decided_after_s = [], [], [], [], None
    committed = store.committed_silos(round_index)
    for silo in committed:  # Undecided: vet the claims ourselves.
      meta = store.delta_meta(round_index, silo)
      reason = (protocol.check_delta_claims(run, round_index, silo, meta) if meta is not None
                else 'metadata unreadable')
      if reason:
        rejected.append({'silo': silo, 'reason': reason})
      elif meta is not None:
        included.append(meta)
  rejected_up = {}
  for entry in rejected:
    meta = store.delta_meta(round_index, entry['silo'])  # Gone once garbage-collected.
    claimed = meta.get('bytes') if isinstance(meta, dict) else None
    if records.is_int(claimed) and 0 <= claimed <= 4 * (model_nbytes or 0):
      rejected_up[entry['silo']] = claimed  # What it says it uploaded, if that can be true.
  global_hash = store.global_hash(round_index + 1)
  if global_hash is None:  # Garbage-collected; the manifest of the round trained from it
    based_on = round_index + (1 if protocol.overlap(run) == 'none' else 2)  # still names it.
    following = store.read_manifest(based_on)
    global_hash = (following.get('base_global_hash') if isinstance(following, dict)
                   and protocol.check_manifest(run, based_on, following) is None else None)
  latest = store.latest_global_round()
  done = global_hash is not None or (latest is not None and latest > round_index)
  if done:
    status = 'done'
  elif manifest is not None:
    status = 'aggregating'
  else:
    status = 'collecting'
  evals = eval_losses(store, run, round_index + 1)
  base_evals = eval_losses(store, run, round_index)
  up = {e['silo']: int(e['bytes']) for e in included}
  up.update(rejected_up)
  down = {}
  if done and model_nbytes:  # Estimated: see `bytes_down_by_silo` below.
    update = update_nbytes(store, run, round_index + 1) if included else 0
    published = set(up) | {e['silo'] for e in rejected}
    down = {s: update if update is not None and s in published else model_nbytes
            for s in protocol.silo_ids(run)}
  bytes_up, bytes_down = sum(up.values()), sum(down.values())
  secure = protocol.secure_aggregation(run)
  return {
      'round': round_index,
      'status': status,
      'contributors': [e['silo'] for e in included],
      'weights': {e['silo']: e['weight'] for e in included if 'weight' in e},
      'tokens': sum(int(e['tokens']) for e in included),
      # A DP silo (privacy.dp) publishes no train loss: the mean is of the others'.
      'train_loss': _mean(e['train_loss'] for e in included if e['train_loss'] is not None),
      'train_loss_by_silo': {e['silo']: float(e['train_loss']) for e in included
                             if e['train_loss'] is not None},
      # privacy.dp: each DP silo's spent (epsilon, delta) after the round, as it claims.
      'dp_by_silo': {e['silo']: dict(e['dp']) for e in included if e.get('dp')},
      'tokens_by_silo': {e['silo']: int(e['tokens']) for e in included},
      'steps_by_silo': {e['silo']: int(e['steps']) for e in included},
      'norm_by_silo': {} if secure else {  # A masked delta's norm is not measured.
          e['silo']: float(e.get('measured_norm', e.get('delta_norm')))
          for e in included if e.get('measured_norm', e.get('delta_norm')) is not None},
      # Secure aggregation: whose masks the survivors reveal (the manifest's `unmask`), and
      # which survivors' recovery records are in the bucket.
      'unmask': list(manifest.get('unmask', [])) if manifest is not None else [],
      'recovery_published': store.recovery_silos(round_index) if secure else [],
      'bytes_up': bytes_up,
      'bytes_down': bytes_down,
      'bytes_up_by_silo': up,
      # Global round r+1 as each listed silo reads it: a silo that published to round r held
      # global r, so with a compressed downlink it reads only the update; any other is
      # counted as reading the whole model (to rebase or join): an estimate from the bucket.
      'bytes_down_by_silo': down,
      'bytes': bytes_up + bytes_down,
      'rejected': [{'silo': e['silo'], 'reason': e['reason']} for e in rejected],
      # Free riders and copies (fedpt/copies.py): {silo: [reasons]} flagged by the aggregator,
      # each delta's cosines and norm ratio, and whether the checks ran (absent: older runs).
      'flags': dict(manifest.get('flags', {})) if manifest is not None else {},
      'similarity': dict(manifest.get('similarity', {})) if manifest is not None else {},
      'copy_checks': manifest.get('copy_checks') if manifest is not None else None,
      'missing': list(missing),
      # An open round (no manifest yet): the listed silos with no committed delta so far.
      'waiting_for': ([] if manifest is not None else
                      protocol.missing_silos(run, committed)),
      'late_from_previous_round': list(late),
      'decided_after_s': decided_after_s,
      'global_hash': global_hash,
      'base_eval_loss': _mean(base_evals.values()),
      'eval_loss': _mean(evals.values()),
      'eval_loss_by_silo': evals,
      # contribution.mode: each silo's row of the round's K x K matrix (`contributions`).
      'contribution': contributions(store, run, round_index,
                                    None if manifest is None else
                                    [e['silo'] for e in manifest['included']]),
  }


def build_ledger(store: storage_lib.RunStorage) -> list[dict]:
  """One row per round that has begun (a manifest or at least one committed delta)."""
  run = store.read_run()
  model_nbytes = global_nbytes(store, store.latest_global_round())
  rows = []
  for r in range(run['federation']['rounds']):
    if store.read_manifest(r) is None and not store.committed_silos(r):
      break
    rows.append(round_record(store, run, r, model_nbytes))
  return rows


def silo_totals(rows: list[dict], run: dict) -> dict[str, dict]:
  """Each silo's contribution over the run: the consortium's accounting, from the rows.

  Only decided rounds count: an open round's deltas are published, not yet included.
  """
  totals = {}
  rows = [row for row in rows if row['status'] != 'collecting']
  values = contribution_lib.totals([row['contribution']['value'] for row in rows
                                    if 'contribution' in row], protocol.silo_ids(run))
  published = any(row.get('contribution', {}).get('method_by_silo') for row in rows)
  for silo in (s['id'] for s in run['silos']):
    norms = [row['norm_by_silo'][silo] for row in rows if silo in row['norm_by_silo']]
    last_eval = next((row['eval_loss_by_silo'][silo] for row in reversed(rows)
                      if silo in row['eval_loss_by_silo']), None)
    totals[silo] = {
        'tokens': sum(row['tokens_by_silo'].get(silo, 0) for row in rows),
        'rounds_included': sum(silo in row['contributors'] for row in rows),
        'rounds_rejected': sum(any(e['silo'] == silo for e in row['rejected']) for row in rows),
        'rounds_missing': sum(silo in row['missing'] for row in rows),
        'rounds_flagged': sum(silo in row['flags'] for row in rows),
        'mean_delta_norm': _mean(norms),
        'last_eval_loss': last_eval,
        'bytes_up': sum(row['bytes_up_by_silo'].get(silo, 0) for row in rows),
        'bytes_down': sum(row['bytes_down_by_silo'].get(silo, 0) for row in rows),
        # privacy.dp: its newest published (epsilon, delta) (cumulative), None without DP.
        'dp': next((row['dp_by_silo'][silo] for row in reversed(rows)
                    if silo in row.get('dp_by_silo', {})), None),
        # contribution.mode: nats of held-out loss its deltas lowered (summed over rounds and
        # evaluating silos), for the others and itself, and what it received; None if no
        # silo published a contribution record.
        'contribution': values[silo] if published else None,
    }
  return totals


def render_totals(totals: dict[str, dict]) -> str:
  valued = any(t.get('contribution') for t in totals.values())
  header = (f"{'silo':<16} {'tokens':>12} " + (f"{'value':>9} " if valued else '')
            + f"{'included':>8} {'rejected':>8} {'missing':>7} "
            f"{'mean norm':>10} {'eval':>6} {'bytes up':>9} {'bytes down':>10} "
            f"{'epsilon (delta)':>18}")
  lines = ['per-silo totals (decided rounds; bytes down estimated, see below'
           + ('; value: nats of held-out loss its deltas lowered, all silos\' rows summed, '
              'contribution below' if valued else '') + ')', header, '-' * len(header)]
  for silo, t in totals.items():
    norm = '-' if t['mean_delta_norm'] is None else f"{t['mean_delta_norm']:.4g}"
    value = t.get('contribution') or {}
    given = (f"{value['given_to_others'] + value['to_self']:>+9.4f} " if value else '')
    lines.append(f"{silo:<16} {t['tokens']:>12,} {given}{t['rounds_included']:>8} "
                 f"{t['rounds_rejected']:>8} {t['rounds_missing']:>7} {norm:>10} "
                 f"{_fmt_loss(t['last_eval_loss']):>6} {_fmt_bytes(t['bytes_up']):>9} "
                 f"{_fmt_bytes(t['bytes_down']):>10} {_fmt_dp(t['dp']):>18}")
  return '\n'.join(lines)


def render_contribution(rows: list[dict], totals: dict[str, dict], run: dict) -> str | None:
  """Each round's matrix (row: the evaluating silo j; column: contributor k), or None."""
  rows = [row for row in rows if row.get('contribution', {}).get('method_by_silo')
          or row.get('contribution', {}).get('skipped')]
  if not rows:
    return None
  silos = protocol.silo_ids(run)
  lines = ['contribution: nats by which contributor k\'s delta lowered silo j\'s held-out loss '
           '(Shapley where published, else first order; docs/protocol.md "Contribution '
           'records"); carry: the outer momentum\'s part; measured: L_j(r) - L_j(r+1)']
  header = f"{'round':>5}  {'j':<10} " + ' '.join(f'{s[:9]:>9}' for s in silos) + \
      f" {'carry':>9} {'first ord':>9} {'measured':>9}  method"
  lines += [header, '-' * len(header)]
  for row in rows:
    c = row['contribution']
    for j, method in c['method_by_silo'].items():
      values = c['value'].get(j, {})
      cells = ' '.join(f'{values[k]:>+9.4f}' if values.get(k) is not None else f"{'-':>9}"
                       for k in silos)
      carry = c['carry_by_silo'][j]
      lines.append(f"{row['round']:>5}  {j:<10} {cells} "
                   + (f'{carry:>+9.4f}' if carry is not None else f"{'-':>9}")
                   + f" {c['total_by_silo'][j]:>+9.4f} {c['measured_by_silo'][j]:>+9.4f}  "
                   + method + (f" ({c['reason_by_silo'][j]})" if j in c['reason_by_silo']
                               else ''))
    for e in c['skipped']:
      lines.append(f"{row['round']:>5}  {e['silo']:<10} skipped: {e['reason']}")
  valued = {s: t['contribution'] for s, t in totals.items() if t.get('contribution')}
  if valued:
    lines.append('per silo over the run: ' + '; '.join(
        f"{s} gave others {v['given_to_others']:+.4f}, itself {v['to_self']:+.4f}, received "
        f"{v['received']:+.4f}" for s, v in valued.items()))
  return '\n'.join(lines)


def _fmt_dp(dp) -> str:
  return '-' if dp is None else f"{dp['epsilon']:.3g} ({dp['delta']:.2g})"


def render_traffic(rows: list[dict], run: dict) -> str:
  """Bytes up (its delta) and down (the next global round) per silo and round."""
  silos = protocol.silo_ids(run)
  fmt = protocol.downlink(run)
  header = f"{'round':>5}  " + ' '.join(f'{s[:21]:>21}' for s in silos)
  lines = ['bytes per silo and round: up (its delta) / down (global round r+1)',
           (f'down: the {"float32" if fmt == "none" else fmt} update'
            + (' (the rows of the round\'s fragment)' if protocol.fragments(run) > 1 else '')
            + ' if the silo published to round r, else the whole model (an estimate from the '
            'bucket)' if fmt else 'down: the whole model'),
           header, '-' * len(header)]
  for row in rows:
    down = row['bytes_down_by_silo']
    cells = [f"{_fmt_bytes(row['bytes_up_by_silo'].get(s, 0))} / "
             f"{_fmt_bytes(down[s]) if s in down else '-'}" for s in silos]
    lines.append(f"{row['round']:>5}  " + ' '.join(f'{c:>21}' for c in cells))
  return '\n'.join(lines)


def _fmt_bytes(n: int) -> str:
  for unit in ('B', 'KB', 'MB', 'GB'):
    if n < 1000 or unit == 'GB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
    n /= 1000
  return str(n)


def _fmt_hash(row) -> str:
  if row['global_hash']:
    return row['global_hash'][:12]
  return '(collected)' if row['status'] == 'done' else '-'


def _fmt_loss(x) -> str:
  return '-' if x is None else f'{x:.3f}'


def render_table(rows: list[dict], run: dict, initial_hash: str | None = None) -> str:
  """A fixed-width table, one line per round, for people."""
  silos = [s['id'] for s in run['silos']]
  hs = {s['inner_steps'] for s in run['silos']}
  h = (f"H={hs.pop()}" if len(hs) == 1 else
       'H ' + ', '.join(f"{s['id']}={s['inner_steps']}" for s in run['silos']))
  budgets = [f"{s['id']}={s['round_budget_s']:g}s" for s in run['silos'] if s['round_budget_s']]
  count = protocol.fragments(run)
  lines = [f"run {run['run_id']}: {len(silos)} silos {silos}, "
           f"{run['federation']['rounds']} rounds of {h}"
           + (f" over {count} fragments (a round: H/{count} steps and one fragment)"
              if count > 1 else '')
           + (f" (round budgets {', '.join(budgets)})" if budgets else '')]
  if protocol.secure_aggregation(run):
    lines.append(f"secure aggregation: deltas are masked fixed point ('secagg'), each clipped "
                 f"by its silo to L2 {run['federation']['secagg_clip']:g}; the aggregator "
                 'reads only their weighted sum')
    listed = (run.get('public_keys') or {}).get(signing.X25519) or {}
    lines.append('X25519 keys in run.json (compare with each silo out of band): ' + ', '.join(
        f'{s} {signing.fingerprint(pem)}' for s, pem in sorted(listed.items())))
  if rows:
    lines.append(f"global round 0: hash {(initial_hash or '-')[:12]}, "
                 f"held-out loss {_fmt_loss(rows[0]['base_eval_loss'])}")
  header = (f"{'round':>5}  {'status':<11} {'contributors':<32} {'tokens':>10} "
            f"{'train':>7} {'bytes up':>9} {'down':>9}  {'global':<12} {'eval':>6}  rejected")
  lines += [header, '-' * len(header)]
  for row in rows:
    rejected = '; '.join(f"{e['silo']}: {e['reason']}" for e in row['rejected'])
    flagged = [f"flagged {silo}: {', '.join(reasons)}" for silo, reasons in row['flags'].items()
               if silo not in {e['silo'] for e in row['rejected']}]  # Else its reason says so.
    rejected = '; '.join(filter(None, [rejected, *flagged]))
    if row['missing']:
      rejected = '; '.join(filter(None, [rejected, f"missing {','.join(row['missing'])}"]))
    if row['unmask']:
      owed = sorted(set(row['contributors']) - set(row['recovery_published']))
      rejected = '; '.join(filter(None, [rejected, (
          f"masks of {','.join(row['unmask'])}: recovery records from "
          f"{','.join(row['recovery_published']) or '-'}"
          + (f", awaiting {','.join(owed)}" if owed else ''))]))
    if row['waiting_for']:
      rejected = '; '.join(filter(None, [rejected,
                                         f"waiting for {','.join(row['waiting_for'])}"]))
    lines.append(
        f"{row['round']:>5}  {row['status']:<11} {','.join(row['contributors']):<32} "
        f"{row['tokens']:>10,} {_fmt_loss(row['train_loss']):>7} "
        f"{_fmt_bytes(row['bytes_up']):>9} {_fmt_bytes(row['bytes_down']):>9}  "
        f"{_fmt_hash(row):<12} "
        f"{_fmt_loss(row['eval_loss']):>6}  {rejected or '-'}")
  if not rows:
    lines.append('(no round has started yet)')
  return '\n'.join(lines)


def stored_global_rounds(store: storage_lib.RunStorage) -> tuple[list[int], list[int]]:
  """(committed global rounds still in the bucket, those up to the newest it collected).

  The aggregator keeps the last `keep_last_rounds` and every `keep_every_rounds`-th;
  the others are garbage-collected (their manifests stay, as the ledger).
  """
  stored = [r for r in store.global_round_dirs() if store.global_shard_metas(r) is not None]
  return stored, ([r for r in range(stored[-1]) if r not in stored] if stored else [])


def run_overview(store: storage_lib.RunStorage, run: dict, rows: list[dict]) -> dict:
  """The run at a glance: its open round, total traffic, and the global rounds stored.

  The open round is the one after the newest committed global model, unless that
  was the last: who has published to it so far and who it still waits for.
  """
  stored, collected = stored_global_rounds(store)
  open_round = None
  if stored and stored[-1] < run['federation']['rounds']:
    r = stored[-1]
    row = next((row for row in rows if row['round'] == r), None)
    open_round = {'round': r, 'status': 'collecting', 'published': [],
                  'waiting_for': protocol.silo_ids(run)}
    if row is not None:
      open_round.update(status=row['status'], waiting_for=row['waiting_for'],
                        published=row['contributors'] + [e['silo'] for e in row['rejected']])
  return {
      'open_round': open_round,
      'bytes_up': sum(row['bytes_up'] for row in rows),
      'bytes_down': sum(row['bytes_down'] for row in rows),
      'stored_global_rounds': stored,
      'collected_global_rounds': collected,
  }


def ranges(numbers: list[int]) -> str:
  """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
  out, start = [], None
  for i, n in enumerate(numbers):
    if start is None:
      start = n
    if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
      out.append(str(n) if n == start else f'{start}-{n}')
      start = None
  return ', '.join(out)


def render_overview(overview: dict, total_rounds: int) -> str:
  lines = []
  open_round = overview['open_round']
  if open_round is not None:
    r = open_round['round']
    if open_round['status'] == 'aggregating':
      lines.append(f'round {r} is decided; the aggregator is writing global round {r + 1}')
    else:
      lines.append(f"round {r} is open: published {', '.join(open_round['published']) or '-'}; "
                   f"waiting for {', '.join(open_round['waiting_for']) or 'the aggregator'}")
  elif overview['stored_global_rounds'] and overview['stored_global_rounds'][-1] >= total_rounds:
    lines.append(f'the run is finished: global round {total_rounds} is committed')
  lines.append(f"traffic: {_fmt_bytes(overview['bytes_up'])} up, "
               f"{_fmt_bytes(overview['bytes_down'])} down")
  stored, collected = overview['stored_global_rounds'], overview['collected_global_rounds']
  lines.append(f"global rounds stored: {ranges(stored) or 'none'}"
               + (f' (garbage-collected: {ranges(collected)})' if collected else '')
               + '; evaluate.py --rounds=all evaluates the stored ones')
  return '\n'.join(lines)


def status(storage_root: str, fmt: str = 'table') -> str:
  """The ledger of the run at `storage_root`, as a table or as JSON."""
  store = storage_lib.RunStorage(storage_root)
  run = store.read_run()
  rows = build_ledger(store)
  totals = silo_totals(rows, run)
  overview = run_overview(store, run, rows)
  if fmt == 'json':
    return json.dumps({'run_id': run['run_id'], 'silos': run['silos'],
                       'federation': run['federation'], 'signed': bool(run.get('public_keys')),
                       'global_round_0_hash': store.global_hash(0), **overview, 'rounds': rows,
                       'silo_totals': totals}, indent=1)
  if fmt != 'table':
    raise ValueError(f'unknown format {fmt!r}')
  return '\n\n'.join(filter(None, [render_table(rows, run, store.global_hash(0)),
                                   render_overview(overview, run['federation']['rounds']),
                                   render_totals(totals), render_contribution(rows, totals, run),
                                   render_traffic(rows, run)]))
