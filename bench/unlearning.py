r"""Unlearning a silo, measured: the forgotten silo's held-out loss before and after.

Three silos on three stdlib groups train a run with federation.retain_for_unlearning, in one
process (silos as threads, the aggregator in the main thread, a local bucket). Then
scripts/unlearn.py's function removes the --forget silo three ways: retrain (the others
train again from the branch round; the forgotten silo joined in round 0, so this is the
model trained from the start without it), replay (its deltas dropped from every round's
re-aggregation, no training) and replay followed by --calibration_rounds real rounds. Each
final global model is scored on every token of the forgotten silo's held-out split and of
the others'. Prints a markdown table and writes results.json under --workdir.

  python bench/unlearning.py --config=configs/tiny.py --rounds=4 --inner_steps=10
"""
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fedpt import aggregator  # noqa: E402
from fedpt import cli  # noqa: E402
from fedpt import loading  # noqa: E402
from fedpt import silo as silo_lib  # noqa: E402
from fedpt import storage as storage_lib  # noqa: E402
from fedpt import trainer as trainer_lib  # noqa: E402
from fedpt import trees  # noqa: E402
from fedpt import unlearning  # noqa: E402

config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Model config.', lock_config=True)
flags.DEFINE_string('workdir', '/tmp/fedpt-unlearning', 'Fresh folder for the runs.')
flags.DEFINE_list('silos', ['web', 'text', 'tools'], 'Silos, each on its stdlib group.')
flags.DEFINE_string('forget', 'tools', 'The silo to unlearn.')
flags.DEFINE_integer('rounds', 4, 'Rounds of the original run.')
flags.DEFINE_integer('inner_steps', 10, 'H.')
flags.DEFINE_integer('calibration_rounds', 1, 'Real rounds after replay.')
FLAGS = flags.FLAGS


def silo_config(config, silo: str):
  config = config.copy_and_resolve_references()
  config.data.stdlib_group = silo
  return config


def train(config, root: str, silos, workdir: str) -> float:
  """Runs the silos (threads) and the aggregator on the run at `root` to its last round."""
  started = time.monotonic()
  workers = [threading.Thread(target=silo_lib.run_silo, args=(
      silo_config(config, s), s, root, os.path.join(workdir, f'silo_{s}'))) for s in silos]
  for w in workers:
    w.start()
  aggregator.run_aggregator(root)
  for w in workers:
    w.join()
  return time.monotonic() - started


def held_out(config, root: str, silos) -> dict:
  """{silo: loss of the run's final global model on every token of its held-out split}."""
  store = storage_lib.RunStorage(root)
  run = store.read_run()
  final = store.latest_global_round()
  out = {}
  for s in silos:
    model = trainer_lib.Trainer(silo_config(config, s))
    flat = loading.read_global_params(store, run, final,
                                      trees.flatten_params(model.abstract_params()))
    out[s] = model.evaluate(trees.unflatten_params(flat), whole=True)
  return out


def main(argv):
  del argv
  config = FLAGS.config.copy_and_resolve_references()
  config.train.async_checkpoints = False  # Silos are threads of one process.
  config.federation.update(rounds=FLAGS.rounds, inner_steps=FLAGS.inner_steps,
                           silos=tuple(FLAGS.silos), poll_s=0.05, retain_for_unlearning=True)
  work = FLAGS.workdir
  if os.path.exists(work) and os.listdir(work):
    cli.run_or_explain(_refuse, work)
  roots = {k: os.path.join(work, k) for k in ('original', 'retrain', 'replay', 'calibrated')}
  rest = [s for s in FLAGS.silos if s != FLAGS.forget]
  rows, seconds = {}, {}
  aggregator.init_run(config, roots['original'])
  seconds['original'] = train(config, roots['original'], FLAGS.silos, roots['original'])
  for mode, root, extra in (('retrain', roots['retrain'], 0), ('replay', roots['replay'], 0),
                            ('replay', roots['calibrated'], FLAGS.calibration_rounds)):
    name = os.path.basename(root)
    started = time.monotonic()
    done = unlearning.unlearn(roots['original'], FLAGS.forget, mode, root,
                              calibration_rounds=extra)
    seconds[f'{name} (unlearn)'] = time.monotonic() - started
    if done['next_round'] < done['rounds']:
      seconds[name] = train(config, root, rest, root)
  for name, root in roots.items():
    rows[name] = held_out(config, root, FLAGS.silos)
  table = ['| model | ' + ' | '.join(f'{s} held-out' + (' (forgotten)' if s == FLAGS.forget
                                                          else '') for s in FLAGS.silos) + ' |',
           '|---' * (len(FLAGS.silos) + 1) + '|']
  table += [f'| {name} | ' + ' | '.join(f'{losses[s]:.4f}' for s in FLAGS.silos) + ' |'
            for name, losses in rows.items()]
  print('\n'.join(table))
  print('seconds: ' + ', '.join(f'{k} {v:.1f}' for k, v in seconds.items()))
  with open(os.path.join(work, 'results.json'), 'w') as f:
    json.dump({'config': config.name, 'silos': FLAGS.silos, 'forget': FLAGS.forget,
               'rounds': FLAGS.rounds, 'inner_steps': FLAGS.inner_steps,
               'calibration_rounds': FLAGS.calibration_rounds, 'held_out': rows,
               'seconds': seconds}, f, indent=1)


def _refuse(work):
  raise unlearning.UnlearnError(f'--workdir={work} is not empty. Fix: pass a fresh folder.')


if __name__ == '__main__':
  cli.run(main)
