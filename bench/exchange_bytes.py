r"""Bytes a silo uploads per exchange and per run, by format and fragment count, from shapes.

No training: the bytes of every format are a function of the leaf shapes
(`compression.payload_spec`), so the 1B and 70B configs are sized from their abstract
models as scripts/plan.py sizes them (`planning.exchange_sizes`). "peak" is the largest
single exchange (with P fragments, the largest fragment's rows); "per H" the P exchanges
that move every parameter once; "per run" `federation.rounds` whole-model rounds' worth
(P x the fragment rounds), the same tokens whatever P.

  python bench/exchange_bytes.py --configs=demo,1b,70b --fragments=1,4
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from fedpt import simulation  # noqa: E402
from fedpt import compression  # noqa: E402
from fedpt import model as model_lib  # noqa: E402
from fedpt import planning  # noqa: E402

flags.DEFINE_list('configs', ['demo', '1b', '70b'], 'configs/<name>.py to size.')
flags.DEFINE_list('fragments', ['1', '4'], 'Fragment counts P.')
FLAGS = flags.FLAGS

# (label, format, topk settings): the grid; topk at 2 bits with SparseLoCo's chunks.
FORMATS = (('fp32', 'none', None), ('int8', 'int8', None), ('int4', 'int4', None),
           ('int2', 'int2', None), ('topk 1% 2-bit', 'topk', compression.TopK(0.01, 2, 4096)),
           ('topk 3% 2-bit', 'topk', compression.TopK(0.03, 2, 4096)))


def table(config_name: str, fragment_counts) -> list[dict]:
  """One row per (format, P): peak / per-H / per-run bytes and the ratio to fp32's."""
  config = simulation.load_config_file(f'configs/{config_name}.py')
  _, params, _ = model_lib.abstract_model(model_lib.ModelConfig.from_config(config.model))
  fed = config.federation
  rows, fp32_run = [], None
  for label, fmt, topk in FORMATS:
    for count in fragment_counts:
      sizes = planning.exchange_sizes(params, fmt, fed.block_size, fed.private_params,
                                      topk or compression.TopK(), count)
      per_run = fed.rounds * sum(sizes)
      fp32_run = per_run if fmt == 'none' and count == 1 else fp32_run
      rows.append({'config': config_name, 'format': label, 'fragments': count,
                   'peak': max(sizes), 'per_h': sum(sizes), 'per_run': per_run,
                   'rounds': fed.rounds * count, 'ratio': fp32_run / per_run})
  return rows


def markdown(rows) -> str:
  lines = ['| config | format | P | peak of one exchange | per H steps | per run (rounds) | '
           'fewer bytes than fp32 |', '|---|---|---:|---:|---:|---:|---:|']
  for r in rows:
    lines.append(f"| {r['config']} | {r['format']} | {r['fragments']} | "
                 f"{planning.human_bytes(r['peak'])} | {planning.human_bytes(r['per_h'])} | "
                 f"{planning.human_bytes(r['per_run'])} ({r['rounds']}) | {r['ratio']:.1f}x |")
  return '\n'.join(lines)


def main(argv):
  del argv
  counts = [int(p) for p in FLAGS.fragments]
  print(markdown([row for name in FLAGS.configs for row in table(name, counts)]))


if __name__ == '__main__':
  app.run(main)
