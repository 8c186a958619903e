r"""The Quickstart model (~2.4M parameters): a few minutes on 2 CPU cores.

  python scripts/simulate.py --config=configs/demo.py --workdir=/tmp/fedpt-demo  # 4 silos
  python scripts/train.py --config=configs/demo.py --workdir=/tmp/fedpt-central  # 1 silo
"""
from fedpt import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.name = 'demo'
  # Four layers: unrolled runs 4-8% faster than lax.scan on a CPU and compiles faster
  # (BENCHMARKS.md, "Train-step throughput").
  c.model.update(d_model=192, n_layers=4, n_heads=6, n_kv_heads=2, head_dim=32, d_ff=512,
                 scan_layers=False)
  c.data.update(seq_len=128, global_batch=16)
  c.inner.update(lr=2e-3, warmup_steps=30)
  c.train.update(steps=250, log_every=25, eval_every=100, eval_batches=4, checkpoint_every=100)
  # Four non-IID silos (stdlib groups), 8 rounds of H=10: ~4 minutes on 2 idle cores.
  c.federation.update(silos=('web', 'concurrency', 'text', 'tools'), rounds=8, inner_steps=10,
                      poll_s=0.2)
  # Each silo's first-order value of every included delta of a round (one backward pass on
  # its held-out sample; reads the round's 4 deltas): status.py shows them beside tokens.
  c.contribution.mode = 'first_order'
  return c
