r"""Tiny model for tests and smoke runs: trains in seconds on a CPU.

  python scripts/train.py --config=configs/tiny.py --workdir=/tmp/fedpt-tiny
"""
from fedpt import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.name = 'tiny'
  # Two layers: unrolled runs 3-8% faster than lax.scan on a CPU and compiles faster
  # (BENCHMARKS.md, "Train-step throughput").
  c.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=192,
                 scan_layers=False)
  c.data.update(seq_len=64, global_batch=16)
  c.inner.update(lr=3e-3, warmup_steps=10)
  c.train.update(steps=100, log_every=10, eval_every=50, eval_batches=4, checkpoint_every=50)
  return c
