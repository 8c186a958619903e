"""Held-out evaluation of global rounds and private checkpoints, and the run's plots.

Loss is the mean next-token cross-entropy (nats) over every token of each held-out
set (`ShardedModel.score(whole=True)`: all windows and the tail once, token-weighted),
or, asked for, over the sampled `train.eval_batches` windows; every row says how
many tokens it scored. Jitted and sharded like training. Bits per byte
divide the summed loss by the UTF-8 bytes of the predicted tokens, so models
with different tokenizers compare. The per-silo table also uses what silos
published themselves (`rounds/NNNNNN/eval/silo_<id>.json`): each silo's loss on
its own private split, which never leaves the silo.
"""
import csv
import json
import math
import os

import numpy as np

from fedpt import data as data_lib
from fedpt import errors
from fedpt import ledger
from fedpt import loading
from fedpt import protocol
from fedpt import storage as storage_lib


class EvalError(errors.UserError, ValueError):
  """Bad evaluation input: the message names it and the fix."""


def parse_eval_sets(specs) -> dict[str, str]:
  """['NAME=SOURCE', ...] -> {name: source}; see `open_eval_set` for the sources."""
  out = {}
  for spec in specs:
    name, sep, path = spec.partition('=')
    if not sep or not name or not path:
      raise EvalError(f'--eval_set={spec!r} is not NAME=SOURCE. Fix: e.g. '
                      '--eval_set=web=/data/web (a prepare_data.py output), txt=notes.txt or '
                      'wiki=tfds:wikipedia:test')
    out[name] = path
  return out


def open_eval_set(name: str, source: str, cache_dir: str, model):
  """A prepare_data.py output's val split; or a text/JSONL file or tfds:NAME, tokenised whole.

  Files and tfds splits are tokenised once with the run's tokenizer into
  `cache_dir/NAME` (every document, no validation split held back).
  """
  if os.path.isfile(os.path.join(source, 'meta.json')):
    return data_lib.TokenDataset(source, 'val', model.tokenizer_sha256)
  out = os.path.join(cache_dir, name)
  data_lib.prepare_data(data_lib.read_sources([source]), model.tokenizer_path, out,
                        val_fraction=0.0, sources=[source])
  return data_lib.TokenDataset(out, 'train', model.tokenizer_sha256)


def parse_rounds(text: str, latest: int) -> list[int]:
  """'all', 'N', 'A:B' (inclusive) or 'A,B,C' -> round numbers."""
  try:
    if text == 'all':
      return list(range(latest + 1))
    if ':' in text:
      first, last = (int(x) for x in text.split(':'))
      rounds = list(range(first, last + 1))
    else:
      rounds = [int(x) for x in text.split(',')]
  except ValueError:
    raise EvalError(f'--rounds={text!r}: use all, N, A:B or A,B,C') from None
  if not rounds or min(rounds) < 0:
    raise EvalError(f'--rounds={text!r} names no round. Fix: use all, N, A:B with A <= B, or '
                    'A,B,C, of rounds >= 0')
  return rounds


def spans(numbers) -> str:
  """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
  out, numbers = [], sorted(numbers)
  for n in numbers:
    if out and n == out[-1][1] + 1:
      out[-1][1] = n
    else:
      out.append([n, n])
  return ', '.join(str(a) if a == b else f'{a}-{b}' for a, b in out)


def select_rounds(store, text: str) -> tuple[list[int], list[int]]:
  """(the stored global rounds `text` asks for, those of them garbage-collected).

  The aggregator keeps only some old rounds (federation.keep_last_rounds,
  keep_every_rounds): `all` and ranges skip the collected ones (the caller says
  which); a round named on its own that is collected, or not committed yet, is an
  error naming the rounds still stored.
  """
  stored = store.committed_global_rounds()
  latest = max(stored) if stored else -1
  wanted = parse_rounds(text, latest)
  future = [r for r in wanted if r > latest]
  collected = [r for r in wanted if r <= latest and r not in stored]
  where = (f'stored rounds: {spans(stored)}' if stored else
           'no round is committed yet (scripts/init_run.py writes round 0)')
  if future:
    raise EvalError(f'--rounds={text}: global round {spans(future)} is not committed under '
                    f'{store.root} yet ({where}). Fix: pass --rounds=all or stored rounds')
  kept = [r for r in wanted if r in stored]
  if collected and kept and (text == 'all' or ':' in text):
    return kept, collected
  if collected:
    raise EvalError(f'--rounds={text}: global round {spans(collected)} was garbage-collected by '
                    f'the aggregator (federation.keep_last_rounds, keep_every_rounds); {where}. '
                    'Fix: pass --rounds=all (the stored ones) or stored rounds')
  return wanted, []


def bits_per_byte(mean_loss: float, tokens: int, nbytes: int) -> float:
  return mean_loss * tokens / (math.log(2) * nbytes)


def _piece_bytes(tokenizer) -> np.ndarray:
  """UTF-8 bytes each token id stands for ([vocab] int64); control and unknown pieces are 0."""
  def one(token):
    if tokenizer.is_control(token) or tokenizer.is_unknown(token):
      return 0
    if tokenizer.is_byte(token):
      return 1
    return len(tokenizer.id_to_piece(token).replace('\u2581', ' ').encode())
  return np.array([one(t) for t in range(tokenizer.get_piece_size())], np.int64)


def predicted_bytes(dataset, piece_bytes: np.ndarray, model, whole: bool) -> int:
  """UTF-8 bytes of the tokens `model.score(..., whole=whole)` predicts on `dataset`."""
  d = model.config.data
  if whole:
    return int(sum((piece_bytes[rows] * weights).sum() for rows, weights in
                   dataset.whole_batches(global_batch=d.global_batch, seq_len=d.seq_len)))
  return int(sum(piece_bytes[np.asarray(rows)[:, 1:]].sum() for rows in dataset.eval_batches(
      model.config.train.eval_batches, global_batch=d.global_batch, seq_len=d.seq_len)))


def describe_mode(whole: bool, model) -> str:
  """What a loss was measured on, for tables and logs."""
  if whole:
    return 'whole split'
  d = model.config.data
  return (f'sample of {model.config.train.eval_batches * d.global_batch} windows '
          '(train.eval_batches x data.global_batch)')


def evaluate_params(model, params, datasets: dict, nbytes: dict, whole: bool = True) -> dict:
  """{set: loss, perplexity, bits_per_byte, tokens (scored), mode} of one model."""
  out = {}
  for name, dataset in datasets.items():
    loss, tokens = model.score(params, dataset, whole=whole)
    out[name] = {'loss': loss, 'perplexity': math.exp(min(loss, 700.0)),
                 'bits_per_byte': bits_per_byte(loss, tokens, nbytes[name]), 'tokens': tokens,
                 'mode': 'whole' if whole else 'sample'}
  return out


def evaluate(config, out_dir: str, *, eval_sets: dict[str, str], storage: str | None = None,
             rounds: str = 'all', workdirs: dict[str, str] | None = None,
             whole: bool = True) -> dict:
  """Evaluates global rounds and/or private checkpoints; writes eval.json, eval.csv, plots.

  `whole`: every token of each set once (`ShardedModel.score`); else the sampled
  `train.eval_batches` windows. Every row says how many tokens it scored. Only the
  model, its tokenizer and the sets given are read: not the config's training corpus.
  """
  from fedpt import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  if not storage and not workdirs:
    raise EvalError('nothing to evaluate. Fix: pass --storage (global rounds) and/or '
                    '--workdir=NAME=DIR (private checkpoints, e.g. isolated baselines)')
  if not eval_sets:
    raise EvalError('no held-out set to evaluate on. Fix: pass --eval_set=NAME=DIR (a '
                    'prepare_data.py output: its val split, e.g. a silo\'s own), or '
                    '--eval_set=NAME=FILE (text/JSONL) or NAME=tfds:DATASET[:SPLIT]')
  model = trainer_lib.ShardedModel(protocol.federated_config(config) if storage else config)
  piece_bytes = _piece_bytes(data_lib.load_tokenizer(model.tokenizer_path))
  datasets = {n: open_eval_set(n, p, os.path.join(out_dir, 'eval_sets'), model)
              for n, p in eval_sets.items()}
  nbytes = {n: predicted_bytes(ds, piece_bytes, model, whole) for n, ds in datasets.items()}
  rows, published, store, run, collected = [], {}, None, None, []
  sources = []  # (model label, round or None, loading.Source)
  if storage:
    store = storage_lib.RunStorage(storage)
    run = store.read_run()
    protocol.check_model_matches_run(run, model.config, model.tokenizer_sha256)
    wanted, collected = select_rounds(store, rounds)
    sources += [(f'global_round_{r}', r, loading.Source(storage=storage, round_index=r))
                for r in wanted]
  sources += [(label, None, loading.Source(workdir=workdir))
              for label, workdir in (workdirs or {}).items()]
  train_state = model.abstract_train_state()
  for label, round_index, source in sources:
    params = loading.load(model.config, source, train_state=train_state).params
    for name, m in evaluate_params(model, params, datasets, nbytes, whole).items():
      rows.append({'model': label, 'round': round_index, 'eval_set': name, **m})
    if round_index is not None:
      published[round_index] = ledger.eval_losses(store, run, round_index)
  result = {'rows': rows, 'mode': describe_mode(whole, model), 'published_by_round': published,
            'versus_baseline': versus_baseline(rows), 'garbage_collected_rounds': collected}
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'eval.json'), 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(out_dir, 'eval.csv'), 'w', newline='', encoding='utf-8') as f:
    writer = csv.DictWriter(f, ['model', 'round', 'eval_set', 'loss', 'perplexity',
                                'bits_per_byte', 'tokens', 'mode'])
    writer.writeheader()
    writer.writerows(rows)
  if store is not None:
    result['plots'] = write_plots(store, out_dir, rows, config_name=model.config.name)
  return result


def versus_baseline(rows: list[dict]) -> list[dict]:
  """One line per silo: its baseline (a workdir named after its eval set) vs the newest round.

  A baseline is compared only with its own silo's held-out set (baseline NAME with
  eval set NAME): that is the member question; other pairs answer nothing.
  """
  globals_ = [r for r in rows if r['round'] is not None]
  if not globals_:
    return []
  newest = max(r['round'] for r in globals_)
  out = []
  for base in (r for r in rows if r['round'] is None and r['model'] == r['eval_set']):
    match = next((g for g in globals_ if g['round'] == newest
                  and g['eval_set'] == base['eval_set']), None)
    if match:
      out.append({'eval_set': base['eval_set'], 'baseline': base['model'],
                  'baseline_loss': base['loss'], 'global_round': newest,
                  'global_loss': match['loss'], 'gain': base['loss'] - match['loss'],
                  'tokens': base['tokens']})
  return out


def loss_curves(store, rows: list[dict] | None = None, ledger_rows=None) -> dict:
  """What the plots draw: {'curves': [(label, [(round, loss)])], 'baselines': [(label, loss)],
  'tokens_by_round': {round: tokens seen per silo before it}}.

  The published curves are the global model of each round on each silo's private
  split (each silo's own measurement), not the silos' local models.
  """
  ledger_rows = ledger.build_ledger(store) if ledger_rows is None else ledger_rows
  run = store.read_run()
  initial = ledger.eval_losses(store, run, 0)
  silos = sorted({s for row in ledger_rows for s in row['eval_loss_by_silo']} | set(initial))
  by_round = {0: initial, **{row['round'] + 1: row['eval_loss_by_silo'] for row in ledger_rows}}
  per_silo = np.cumsum([0] + [row['tokens'] / max(len(row['tokens_by_silo']), 1)
                              for row in ledger_rows])
  curves = [(f"global model on {silo}'s split (published by {silo})",
             sorted((r, v[silo]) for r, v in by_round.items() if silo in v)) for silo in silos]
  curves.append(('global model, mean over the silos\' splits',
                 sorted((r, float(np.mean(list(v.values())))) for r, v in by_round.items() if v)))
  rows = rows or []
  for eval_set in sorted({r['eval_set'] for r in rows if r['round'] is not None}):
    curves.append((f'global model on {eval_set} (evaluate.py)', sorted(
        (r['round'], r['loss']) for r in rows if r['eval_set'] == eval_set
        and r['round'] is not None)))
  baselines = [(f"{r['model']} alone (isolated baseline) on {r['eval_set']}"
                if r['model'] == r['eval_set'] else f"{r['model']} (checkpoint) on {r['eval_set']}",
                r['loss']) for r in rows if r['round'] is None]
  return {'curves': [c for c in curves if c[1]], 'baselines': baselines,
          'tokens_by_round': {r: int(per_silo[min(r, len(per_silo) - 1)]) for r in by_round}}


# Distinct marker, line style and draw order per curve, so that no line hides another.
_MARKERS = ('o', 's', '^', 'v', 'D', 'P', 'X', '*', '<', '>')
_LINESTYLES = ('-', '--', '-.', ':')


def contribution_figure(ledger_rows: list[dict], silos: list[str], title: str):
  """The silos' contribution records (contribution.mode) drawn, or None if there are none:
  left, the value each silo's deltas gave (all silos' rows summed) per round; right, the
  run's K x K matrix summed over rounds (row j evaluating, column k contributing)."""
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  matrices = [(row['round'], row['contribution']['value']) for row in ledger_rows
              if row.get('contribution', {}).get('value')]
  if not matrices:
    return None
  fig, (by_round, total) = plt.subplots(1, 2, figsize=(11, 4.5))
  summed = np.zeros((len(silos), len(silos)))
  for r, m in matrices:
    for j, row in m.items():
      for k, v in row.items():
        if v is not None and j in silos and k in silos:
          summed[silos.index(j), silos.index(k)] += v
  for i, k in enumerate(silos):
    by_round.plot([r for r, _ in matrices],
                  [sum(row.get(k) or 0.0 for row in m.values()) for _, m in matrices],
                  marker=_MARKERS[i % len(_MARKERS)], linestyle=_LINESTYLES[i % len(_LINESTYLES)],
                  label=f"{k}'s deltas")
  by_round.axhline(0.0, color='gray', linewidth=0.8)
  by_round.set(xlabel='round', ylabel='held-out loss lowered (nats, all silos)',
               title='value given per round')
  by_round.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  by_round.grid(alpha=0.3)
  by_round.legend(fontsize=7)
  bound = max(float(np.abs(summed).max()), 1e-12)
  image = total.imshow(summed, cmap='RdBu', vmin=-bound, vmax=bound)
  total.set(xticks=range(len(silos)), xticklabels=silos, yticks=range(len(silos)),
            yticklabels=silos, xlabel='contributor k', ylabel='evaluating silo j',
            title='summed over rounds (nats)')
  for (j, k), v in np.ndenumerate(summed):
    total.text(k, j, f'{v:+.3f}', ha='center', va='center', fontsize=7,
               color='white' if abs(v) > 0.6 * bound else 'black')  # Legible on dark cells.
  fig.colorbar(image, ax=total)
  fig.suptitle(f'{title}: contribution (Shapley where published, else first order)')
  fig.tight_layout()
  return fig


def loss_figures(store, rows: list[dict] | None = None, config_name: str = '') -> dict:
  """{'loss_by_round': Figure, 'loss_vs_tokens': Figure}: the run's held-out losses, and
  'contribution' (`contribution_figure`) when silos published contribution records."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  ledger_rows = ledger.build_ledger(store)
  data = loss_curves(store, rows, ledger_rows)
  run = store.read_run()
  run_id = run['run_id']
  tokens = data['tokens_by_round']
  figures = {}
  for name, xlabel, to_x, what in (
      ('loss_by_round', 'global round', lambda r: r, 'by global round'),
      ('loss_vs_tokens', 'tokens seen (per silo, cumulative)', lambda r: tokens[r],
       'against tokens seen')):
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (label, points) in enumerate(data['curves']):
      ax.plot([to_x(r) for r, _ in points], [v for _, v in points],
              marker=_MARKERS[i % len(_MARKERS)], linestyle=_LINESTYLES[i % len(_LINESTYLES)],
              markersize=7 - 3 * i / max(len(data['curves']), 1), alpha=0.8, zorder=2 + i,
              label=label)
    for i, (label, loss) in enumerate(data['baselines']):
      ax.axhline(loss, color=f'C{(len(data["curves"]) + i) % 10}',
                 linestyle=_LINESTYLES[(i + 1) % len(_LINESTYLES)], alpha=0.8, label=label)
    ax.set(xlabel=xlabel, ylabel='held-out loss (nats/token)',
           title=f'run {run_id}' + (f' ({config_name})' if config_name else '')
           + f': held-out loss {what}')
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))  # Rounds and tokens are whole.
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    figures[name] = fig
  fig = contribution_figure(ledger_rows, protocol.silo_ids(run),
                            f'run {run_id}' + (f' ({config_name})' if config_name else ''))
  if fig is not None:
    figures['contribution'] = fig
  return figures


def write_plots(store, out_dir: str, rows: list[dict] | None = None,
                config_name: str = '') -> list[str]:
  """loss_by_round.png, loss_vs_tokens.png (and contribution.png: `loss_figures`) in
  `out_dir`; their paths."""
  figures = loss_figures(store, rows, config_name)
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for name, fig in figures.items():
    path = os.path.join(out_dir, f'{name}.png')
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
  return paths
