r"""Data watermarks on the demo model: is the planted watermark detected, and what does it cost?

Trains the model once without a watermark and once per --repeats value with one
(data.watermark: --count sequences of a whole window each, planted `repeats` times per
epoch of the training split), all from the same seed and data, then runs
`watermark.verify` on each trained model against each watermark's record: its own (should
be detected: p < 0.01) and, for the model trained without, every record (must not be:
p > 0.05 expected 95% of the time). Reports z, p, p_rank, how often each sequence was
actually seen in the run, and the held-out loss (the sampled train.eval_batches windows)
that planting cost. Each watermark's secret is fresh from the OS, as in use.

  python bench/watermark.py                                   # demo, 250 steps, ~10 min
  python bench/watermark.py --config=tiny --steps=30 --repeats=400 --json_out=/tmp/wm.json
"""
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

import bare_step  # noqa: E402
from fedpt import cli  # noqa: E402
from fedpt import data as data_lib  # noqa: E402
from fedpt import loading  # noqa: E402
from fedpt import trainer as trainer_lib  # noqa: E402
from fedpt import watermark  # noqa: E402

flags.DEFINE_string('config', 'demo', f'Model size, from {", ".join(bare_step.SIZES)}.')
flags.DEFINE_integer('steps', 250, 'Training steps of each model (the demo config\'s 250).')
flags.DEFINE_integer('count', 8, 'data.watermark.count: distinct secret sequences.')
flags.DEFINE_list('repeats', ['25', '100'], 'data.watermark.repeats values (per epoch).')
flags.DEFINE_integer('null_samples', 1000, 'Fresh random sequences forming the null.')
flags.DEFINE_string('workdir', None, 'Where the runs go (default: a temporary folder).')
flags.DEFINE_string('json_out', None, 'Also write the rows as JSON here.')
FLAGS = flags.FLAGS


def _sightings(config, mark: data_lib.Watermark, steps: int) -> float:
  """How many times each sequence was planted, on average, in the run's `steps` steps."""
  train = data_lib.TokenDataset(data_lib.resolve_corpus(config.data)[0], 'train')
  windows, d = train.num_windows(config.data.seq_len), config.data
  planted = sum(mark.locate(i, windows, d.seq_len + 1)[0] is None
                for i in range(steps * d.global_batch))
  return planted / mark.count


def run(size: str, steps: int, count: int, repeats: list[int], null_samples: int,
        root: str) -> list[dict]:
  base = bare_step.load_size(size)
  base.train.update(steps=steps, checkpoint_every=steps, eval_every=steps, log_every=steps,
                    async_checkpoints=False)
  runs = {}  # repeats (0: none) -> (workdir, held-out loss, seconds, sightings)
  for r in [0, *repeats]:
    config = base.copy_and_resolve_references()
    config.data.watermark.update(enabled=r > 0, count=count, repeats=max(r, 1))
    workdir = os.path.join(root, f'repeats_{r}')
    start = time.perf_counter()
    summary = trainer_lib.train_and_evaluate(config, workdir)
    seconds = time.perf_counter() - start
    seen = (_sightings(config, watermark.from_record(watermark.read_record(workdir)), steps)
            if r else 0.0)
    runs[r] = (workdir, summary.get('eval_loss'), seconds, seen)
  rows = []
  for r in repeats:
    marked = runs[r][0]
    for trained in (r, 0):
      workdir = runs[trained][0]
      result = watermark.verify(loading.source_config(workdir=workdir), marked,
                                loading.Source(workdir=workdir), null_samples=null_samples)
      rows.append({'watermark_repeats': r, 'model_trained_with_it': trained == r,
                   'sightings_per_sequence': runs[r][3], 'z': result['z'],
                   'p_value': result['p_value'], 'p_rank': result['p_rank'],
                   'watermark_mean_loss': result['watermark_mean_loss'],
                   'null_mean_loss': result['null_mean_loss'],
                   'null_std_loss': result['null_std_loss'],
                   'held_out_loss': runs[trained][1], 'train_seconds': runs[trained][2]})
  return rows


def main(argv):
  del argv
  repeats = cli.run_or_explain(lambda: [int(r) for r in FLAGS.repeats])
  root = FLAGS.workdir or tempfile.mkdtemp(prefix='fedpt-watermark-')
  rows = cli.run_or_explain(run, FLAGS.config, FLAGS.steps, FLAGS.count, repeats,
                            FLAGS.null_samples, root)
  print(f'{FLAGS.config}, {FLAGS.steps} steps, {FLAGS.count} sequences, '
        f'{jax.device_count()} {jax.default_backend()} device(s), {platform.node()}')
  print('| repeats/epoch | sightings/seq | model trained | z | p | p_rank | held-out loss |')
  print('|---:|---:|---|---:|---:|---:|---:|')
  for row in rows:
    print(f"| {row['watermark_repeats']} | {row['sightings_per_sequence']:.1f} | "
          f"{'with it' if row['model_trained_with_it'] else 'without'} | {row['z']:.2f} | "
          f"{row['p_value']:.3g} | {row['p_rank']:.3g} | {row['held_out_loss']:.4f} |")
  if FLAGS.json_out:
    with open(FLAGS.json_out, 'w', encoding='utf-8') as f:
      json.dump({'config': FLAGS.config, 'steps': FLAGS.steps, 'count': FLAGS.count,
                 'rows': rows, 'mean_null': float(np.mean([r['null_mean_loss'] for r in rows]))},
                f, indent=1)


if __name__ == '__main__':
  app.run(main)
