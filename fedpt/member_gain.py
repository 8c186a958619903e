"""The member question: on my own held-out data, does the federation beat training alone?

For each silo, on its own held-out split (every token once by default, and the
report says how many), three models: the isolated baseline (a plain run on the
silo's corpus with the same inner steps and data order, `simulate --baselines`),
the global model (the newest round, or a chosen one) and the silo's personalised
model when there is one. Equal compute is part of the answer: the baseline's steps
are set against the silo's inner steps in the run (from the vetted ledger) plus
its personalisation steps, and a difference is a warning in the report.
"""
import csv
import dataclasses
import json
import os

from etils import epath

from fedpt import config as config_lib
from fedpt import data as data_lib
from fedpt import errors
from fedpt import evaluation
from fedpt import ledger
from fedpt import loading
from fedpt import personal as personal_lib
from fedpt import protocol
from fedpt import storage as storage_lib

COLUMNS = ('silo', 'tokens', 'isolated_loss', 'global_loss', 'personal_loss', 'best', 'gain',
           'gain_pct', 'global_round', 'silo_steps', 'personal_steps', 'baseline_steps',
           'compute_warning')


class MemberGainError(errors.UserError, ValueError):
  """Bad member-gain input: the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class Member:
  """One silo's inputs: its held-out set and its private models (None: not trained)."""
  silo: str
  eval_set: str  # A prepare_data.py output (its val split), a text/JSONL file or tfds:NAME.
  baseline: str | None = None  # A train.py workdir: the isolated baseline.
  personal: str | None = None  # A train.py workdir: the personalised model.


# -- where things are ----------------------------------------------------------------------


def baseline_dir(workdir: str, silo: str) -> str:
  return os.path.join(workdir, 'baselines', silo)


def personal_dir(workdir: str, silo: str) -> str:
  return os.path.join(workdir, 'silos', silo, 'personal')


def silo_config(workdir: str, silo: str):
  """The silo's resolved config as it recorded it (<workdir>/silos/<id>/config.json), or None."""
  record = loading.read_config_record(os.path.join(workdir, 'silos', silo))
  return None if record is None else config_lib.from_flat(record)


def _is_workdir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, 'checkpoints'))


def members_from_workdir(workdir: str, silos: list[str]) -> list[Member]:
  """Every silo of a `simulate` workdir: its own corpus's val split, baseline and personal model."""
  out = []
  for silo in silos:
    config = silo_config(workdir, silo)
    if config is None:
      raise MemberGainError(
          f'{os.path.join(workdir, "silos", silo, loading.CONFIG_RECORD)} is missing: silo '
          f'{silo} never started in this workdir. Fix: pass the simulate --workdir of this run, '
          'or name the inputs: --silo=ID --eval_set=DIR --baseline=DIR [--personal=DIR]')
    data_dir, _ = data_lib.resolve_corpus(config.data)
    base, personal = baseline_dir(workdir, silo), personal_dir(workdir, silo)
    out.append(Member(silo, data_dir, base if _is_workdir(base) else None,
                      personal if _is_workdir(personal) else None))
  return out


# -- compute ----------------------------------------------------------------------------------


def personal_steps_of(config) -> int:
  """Personalisation steps a config asks for (`personal.steps`; 0 without that section)."""
  personal = config.get('personal') if hasattr(config, 'get') else None
  return int(personal.get('steps', 0)) if personal is not None else 0


def baseline_steps(run: dict, silo: str, config=None) -> int:
  """Inner steps an isolated baseline of `silo` gets: rounds x its steps per round (H, or
  H/P with fragments), + personalisation steps.

  The one place that sets a baseline's budget, so equal compute has one definition.
  """
  steps = run['federation']['rounds'] * protocol.round_steps(run, silo)
  return steps + (personal_steps_of(config) if config is not None else 0)


def silo_steps(store, run_round: int) -> dict[str, int]:
  """silo -> inner steps it contributed to the rounds before global round `run_round` (ledger)."""
  out = {}
  for row in ledger.build_ledger(store):
    if row['round'] < run_round:
      for silo, steps in row.get('steps_by_silo', {}).items():
        out[silo] = out.get(silo, 0) + steps
  return out


def checkpoint_step(workdir: str) -> int:
  with loading.open_checkpoint(workdir) as (_, step):
    return step


def personal_steps(workdir: str) -> int:
  """Steps a personalised model trained.

  A personalisation phase's own record (personal.json) says it; any other workdir (a plain
  train.py run offered as the personal model) counts its checkpoint step, since its config's
  `personal.steps` is the unused default 0.
  """
  summary = epath.Path(workdir) / personal_lib.SUMMARY
  if summary.exists():
    return int(json.loads(summary.read_text())['steps'])
  return checkpoint_step(workdir)


def _compute_warning(silo_total: int, baseline: int | None) -> str:
  if baseline is None or baseline == silo_total:
    return ''
  return (f'unequal compute: the baseline trained {baseline} steps, the silo {silo_total} '
          '(run + personalisation); the comparison is not like for like')


# -- the report --------------------------------------------------------------------------------


def _gain_row(silo, tokens, losses: dict, round_index, steps: dict) -> dict:
  """One table row: losses by model (None: not there), the best federated model and the gain."""
  federated = {k: v for k, v in (('global', losses['global']),
                                 ('personalised', losses['personal'])) if v is not None}
  best = min(federated, key=federated.get)
  isolated = losses['isolated']
  gain = None if isolated is None else isolated - federated[best]
  return {'silo': silo, 'tokens': tokens, 'isolated_loss': isolated,
          'global_loss': losses['global'], 'personal_loss': losses['personal'], 'best': best,
          'gain': gain, 'gain_pct': None if gain is None else 100.0 * gain / isolated,
          'global_round': round_index, **steps,
          'compute_warning': _compute_warning(steps['silo_steps'] + steps['personal_steps'],
                                              steps['baseline_steps'])}


def verdict(row: dict) -> str:
  """One plain line a member can act on."""
  best = row['best']
  loss = row['global_loss'] if best == 'global' else row['personal_loss']
  on = f"on {row['tokens']:,} held-out tokens"
  if row['isolated_loss'] is None:
    return (f"{row['silo']}: no isolated baseline to compare with ({best} {loss:.3f} {on}). "
            'Fix: simulate --baselines, or train.py on your own corpus with the same steps')
  delta = f"({-row['gain']:+.3f} nats, {abs(row['gain_pct']):.1f}%)"
  if row['gain'] > 0:
    line = (f"{row['silo']}: joining pays: {best} {loss:.3f} < isolated "
            f"{row['isolated_loss']:.3f} {delta} {on}")
  else:
    line = (f"{row['silo']}: joining does not pay (yet): {best} {loss:.3f} >= isolated "
            f"{row['isolated_loss']:.3f} {delta} {on}")
  return line + (f"; warning: {row['compute_warning']}" if row['compute_warning'] else '')


def _fmt(value, spec='.4f') -> str:
  return '-' if value is None else format(value, spec)


def render_table(rows: list[dict], markdown: bool = False) -> str:
  header = ['silo', 'held-out tokens', 'isolated', 'global', 'personalised', 'gain (nats)',
            'gain %', 'steps: silo+personal / baseline']
  body = [[r['silo'], f"{r['tokens']:,}", _fmt(r['isolated_loss']), _fmt(r['global_loss']),
           _fmt(r['personal_loss']), _fmt(r['gain'], '+.4f'), _fmt(r['gain_pct'], '+.1f'),
           f"{r['silo_steps']}+{r['personal_steps']} / {_fmt(r['baseline_steps'], 'd')}"
           + (' (!)' if r['compute_warning'] else '')] for r in rows]
  if markdown:
    return '\n'.join('| ' + ' | '.join(cells) + ' |'
                     for cells in [header, ['---'] * len(header), *body])
  widths = [max(len(c[i]) for c in [header, *body]) for i in range(len(header))]
  return '\n'.join('  '.join(c.rjust(w) if i else c.ljust(w)
                             for i, (c, w) in enumerate(zip(cells, widths)))
                   for cells in [header, *body])


def _plot(rows: list[dict], path: str) -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(rows) + 2), 4))
  x = np.arange(len(rows))
  for i, (key, label) in enumerate((('isolated_loss', 'isolated'), ('global_loss', 'global'),
                                    ('personal_loss', 'personalised'))):
    values = [r[key] if r[key] is not None else np.nan for r in rows]
    ax.bar(x + (i - 1) * 0.27, values, 0.27, label=label)
  ax.set_xticks(x, [f"{r['silo']}\n{r['tokens']:,} tokens" for r in rows])
  losses = [r[k] for r in rows for k in ('isolated_loss', 'global_loss', 'personal_loss')
            if r[k] is not None]
  ax.set_ylim(min(losses) * 0.95, max(losses) * 1.02)
  ax.set(ylabel='held-out loss on own split (nats, lower is better)',
         title='member gain: alone vs the federation')
  ax.grid(alpha=0.3, axis='y')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def eval_config(run: dict, members: list[Member], config=None):
  """The config the members' models are scored with: the run's model, `config`'s usage.

  `config` None: the first member's baseline's recorded config, else the run's contract.
  """
  if config is None:
    recorded = next((m.baseline for m in members if m.baseline), None)
    config = (loading.source_config(workdir=recorded) if recorded else
              loading.run_config(run))
  return loading.run_config(run, config, set(config_lib.flat(config)) -
                            set(config_lib.MODEL_FIELDS))


def member_gain(storage: str, members: list[Member], out_dir: str, *, config=None,
                round_index: int | None = None, whole: bool = True, log=print) -> dict:
  """Scores each member's isolated, global and personalised models on its own held-out set.

  Args:
    storage: the run's bucket (its run.json, ledger and global rounds).
    members: one `Member` per silo to report on.
    out_dir: where member_gain.{json,csv,md,png} go.
    config: a config to evaluate with (batch size, sequence length; its training corpus
      is not read);
      default: the first member's recorded config (its baseline's or silo's), else
      the run's contract.
    round_index: the global round (default: the newest committed).
    whole: every token of each held-out split once; else the sampled windows.

  Returns {'rows', 'verdicts', 'mode', 'global_round', 'files'}. Raises a UserError
  naming any missing or mismatched input.
  """
  from fedpt import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  if not members:
    raise MemberGainError('no silo to report on. Fix: pass --workdir (a simulate workdir) or '
                          '--silo=ID --eval_set=DIR --baseline=DIR')
  store = storage_lib.RunStorage(storage)
  run = store.read_run()
  for m in members:
    protocol.check_silo_listed(run, m.silo)
  config = eval_config(run, members, config)
  model = trainer_lib.ShardedModel(config)
  protocol.check_model_matches_run(run, model.config, model.tokenizer_sha256)
  round_index, _ = loading.committed_round(store, round_index)
  abstract = model.abstract_train_state()
  load = lambda source: loading.load(model.config, source, train_state=abstract).params  # noqa: E731
  global_params = load(loading.Source(storage=storage, round_index=round_index))
  spent = silo_steps(store, round_index)
  rows = []
  for m in members:
    dataset = evaluation.open_eval_set(m.silo, m.eval_set, os.path.join(out_dir, 'eval_sets'),
                                       model)
    losses, tokens = {'isolated': None, 'personal': None}, None
    losses['global'], tokens = model.score(global_params, dataset, whole=whole)
    for key, workdir in (('isolated', m.baseline), ('personal', m.personal)):
      if workdir:
        losses[key] = model.score(load(loading.Source(workdir=workdir)), dataset,
                                    whole=whole)[0]
    steps = {'silo_steps': spent.get(m.silo, 0),
             'personal_steps': personal_steps(m.personal) if m.personal else 0,
             'baseline_steps': checkpoint_step(m.baseline) if m.baseline else None}
    rows.append(_gain_row(m.silo, tokens, losses, round_index, steps))
  result = {'global_round': round_index, 'mode': evaluation.describe_mode(whole, model),
            'rows': rows, 'verdicts': [verdict(r) for r in rows]}
  result['files'] = write_report(result, out_dir)
  log(f"member gain on each silo's own held-out data ({result['mode']}), global round "
      f'{round_index}:')
  log(render_table(rows))
  for line in result['verdicts']:
    log(line)
  return result


def write_report(result: dict, out_dir: str) -> list[str]:
  """member_gain.json, .csv, .md (table and verdicts) and .png in `out_dir`."""
  os.makedirs(out_dir, exist_ok=True)
  path = lambda ext: os.path.join(out_dir, f'member_gain.{ext}')  # noqa: E731
  with open(path('json'), 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=1)
  with open(path('csv'), 'w', newline='', encoding='utf-8') as f:
    writer = csv.DictWriter(f, COLUMNS)
    writer.writeheader()
    writer.writerows(result['rows'])
  with open(path('md'), 'w', encoding='utf-8') as f:
    f.write(f"# Member gain (global round {result['global_round']}, {result['mode']})\n\n"
            + render_table(result['rows'], markdown=True) + '\n\n'
            + ''.join(f'- {line}\n' for line in result['verdicts']))
  return [path('json'), path('csv'), path('md'), _plot(result['rows'], path('png'))]
