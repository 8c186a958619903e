r"""How parallel honest deltas are: the measurements behind copy_cosine and min_norm_ratio.

Runs an honest federation (simulate.py's processes; by default the demo config, whose four
silos each read their own stdlib group, so they are non-IID) with every round's deltas
kept, then reports per round, from the bucket:
  - the statistics the aggregator recorded in each manifest (`fedpt/copies.py`): the max
    cosine between two deltas of the round, with an earlier global update, with any earlier
    delta, and the min norm-per-step ratio;
  - the exact cosines (deltas read whole) against those sketch estimates: the error;
  - the exact cosines after removing the round's mean delta (for comparison).

  python bench/honest_similarity.py --config=configs/demo.py --rounds=4 \
      --workdir=/tmp/fedpt-honest
  python bench/honest_similarity.py --storage=/tmp/fedpt-honest/bucket  # analyse only
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402

from fedpt import aggregator as aggregator_lib  # noqa: E402
from fedpt import copies  # noqa: E402
from fedpt import protocol  # noqa: E402
from fedpt import simulation  # noqa: E402
from fedpt import storage as storage_lib  # noqa: E402

flags.DEFINE_string('config', 'configs/demo.py', 'Config file of the honest run.')
flags.DEFINE_integer('rounds', 4, 'Rounds of the honest run.')
flags.DEFINE_integer('inner_steps', 0, 'H of the honest run (0: the config\'s).')
flags.DEFINE_list('silos', [], 'Silo ids (default: the config\'s).')
flags.DEFINE_string('corpus', None, 'One tokenised corpus for every silo (IID silos); default: '
                    'the config\'s (stdlib: each silo named after a stdlib group reads it).')
flags.DEFINE_string('workdir', '/tmp/fedpt-honest', 'Where the run and its bucket go.')
flags.DEFINE_string('storage', None, 'Analyse this finished run instead of running one.')
flags.DEFINE_string('keys', None, 'The aggregator\'s key folder (default: <workdir>/keys).')
FLAGS = flags.FLAGS


def run_honest(config_file: str, rounds: int, inner_steps: int, workdir: str, silos=(),
               corpus: str | None = None) -> str:
  """A finished honest run with every round's deltas and global models kept; its bucket."""
  config = simulation.load_config_file(config_file)
  config.federation.update(rounds=rounds, keep_last_rounds=rounds + 1, keep_every_rounds=1)
  if inner_steps:
    config.federation.inner_steps = inner_steps
  if silos:
    config.federation.silos = tuple(silos)
  if corpus:
    config.data.corpus = corpus
  root = os.path.join(workdir, 'bucket')
  simulation.simulate(config, config_file, root, workdir, log=print)
  return root


def delta_vector(agg, r: int, silo: str) -> np.ndarray:
  meta = agg.store.delta_meta(r, silo)
  return np.concatenate([np.asarray(agg.read_leaf(r, silo, n, meta, meta), np.float64).ravel()
                         for n in sorted(meta['tree'])])


def update_vector(store, run, r: int) -> np.ndarray:
  """theta_r - theta_{r+1} over the shared leaves: the global update as a pseudo-gradient."""
  old, new = store.read_global_arrays(r), store.read_global_arrays(r + 1)
  return np.concatenate([(np.float64(old[n]) - new[n]).ravel()
                         for n in protocol.shared_leaves(run, old)])


def _max(values):
  values = [v for v in values if v is not None]
  return max(values) if values else None


def analyse(root: str, keys_dir: str | None) -> dict:
  store = storage_lib.RunStorage(root)
  run = store.read_run()
  agg = aggregator_lib.Aggregator(root, keys_dir=keys_dir)
  rows, errors = [], []
  updates, previous = {}, {}
  for r in range(run['federation']['rounds']):
    manifest = store.read_manifest(r)
    sketches = agg.read_sketches(r, 'deltas', store.sketches_path(r)) or {}
    silos = [e['silo'] for e in manifest['included']]
    exact = {s: delta_vector(agg, r, s) for s in silos}
    for s in silos:  # The aggregator's sketch is the sketch of the stored delta.
      np.testing.assert_allclose(
          sum(copies.leaf_sketch(n, v) for n, v in _leaves(agg, r, s)), sketches[s],
          rtol=1e-4, atol=1e-6 * np.abs(sketches[s]).max())
    pairs, centred = [], []
    mean = np.mean([exact[s] for s in silos], axis=0)
    for i, a in enumerate(silos):
      for b in silos[i + 1:]:
        true = copies.cosine(exact[a], exact[b])
        pairs.append(true)
        errors.append(abs(copies.cosine(sketches[a], sketches[b]) - true))
        centred.append(copies.cosine(exact[a] - mean, exact[b] - mean))
    update_cos = []
    for q in updates:  # Every earlier global update, exactly.
      for s in silos:
        true = copies.cosine(exact[s], updates[q])
        update_cos.append(true)
    own = [copies.cosine(exact[s], previous[s]) for s in silos if s in previous]
    previous = exact
    if store.global_shard_metas(r + 1) is not None:
      updates[r] = update_vector(store, run, r)
    similarity = manifest.get('similarity', {})
    rows.append({
        'round': r, 'flags': manifest.get('flags', {}),
        'round_cosine': _max(pairs), 'round_cosine_centred': _max(centred),
        'update_cosine': _max(update_cos), 'own_previous_cosine': _max(own),
        'sketch_round_cosine': _max(v.get('round_cosine') for v in similarity.values()),
        'sketch_update_cosine': _max(v.get('update_cosine') for v in similarity.values()),
        'sketch_earlier_cosine': _max(v.get('earlier_cosine') for v in similarity.values()),
        'norm_ratio_min': min((v['norm_ratio'] for v in similarity.values()
                               if v.get('norm_ratio') is not None), default=None),
    })
  return {'run_id': run['run_id'], 'silos': protocol.silo_ids(run), 'rounds': rows,
          'sketch_size': copies.SKETCH_SIZE,
          'sketch_error_max': max(errors) if errors else None,
          'sketch_error_rms': float(np.sqrt(np.mean(np.square(errors)))) if errors else None,
          'max': {k: _max(row[k] for row in rows) for k in (
              'round_cosine', 'round_cosine_centred', 'update_cosine', 'own_previous_cosine',
              'sketch_round_cosine',
              'sketch_update_cosine', 'sketch_earlier_cosine')},
          'norm_ratio_min': min((row['norm_ratio_min'] for row in rows
                                 if row['norm_ratio_min'] is not None), default=None)}


def _leaves(agg, r, silo):
  meta = agg.store.delta_meta(r, silo)
  return [(n, agg.read_leaf(r, silo, n, meta, meta)) for n in sorted(meta['tree'])]


def _fmt(x):
  return '-' if x is None else f'{x:.3f}'


def main(argv):
  del argv
  root = FLAGS.storage or run_honest(FLAGS.config, FLAGS.rounds, FLAGS.inner_steps,
                                     FLAGS.workdir, FLAGS.silos, FLAGS.corpus)
  keys = FLAGS.keys or os.path.join(FLAGS.workdir, 'keys')
  result = analyse(root, keys if os.path.isdir(keys) else None)
  print(f"{'round':>5} {'cos round':>9} {'(sketch)':>8} {'centred':>8} {'cos update':>10} "
        f"{'(sketch)':>8} {'own prev':>8} {'cos earlier':>11} {'norm ratio min':>14}  flags")
  for row in result['rounds']:
    print(f"{row['round']:>5} {_fmt(row['round_cosine']):>9} {_fmt(row['sketch_round_cosine']):>8} "
          f"{_fmt(row['round_cosine_centred']):>8} {_fmt(row['update_cosine']):>10} "
          f"{_fmt(row['sketch_update_cosine']):>8} {_fmt(row['own_previous_cosine']):>8} "
          f"{_fmt(row['sketch_earlier_cosine']):>11} "
          f"{_fmt(row['norm_ratio_min']):>14}  {row['flags'] or '-'}")
  print(f"sketch of {result['sketch_size']}: |sketch - exact| cosine error max "
        f"{_fmt(result['sketch_error_max'])}, rms {_fmt(result['sketch_error_rms'])}")
  print(json.dumps({k: v for k, v in result.items() if k != 'rounds'}, indent=1))


if __name__ == '__main__':
  app.run(main)
