r"""Llama-2-70B shape: 80 layers, d_model 8192, 64 heads sharing 8 KV heads, d_ff 28672.

Sequence 4096 and 2M tokens per step, full remat; sized for 256 80-GiB accelerators
with FSDP over all of them, or e.g. fsdp=32,tensor=8 within 8-GPU nodes. A float32
delta is 257 GiB per round: publish it as int8 or int4 (federation.compression).

  python scripts/plan.py --config=configs/70b.py --mesh=fsdp=-1 --devices=256
  python scripts/train.py --config=configs/70b.py --workdir=gs://.../70b \
      --config.data.corpus=/data/c4_sp32k --config.data.tokenizer=/data/sp32k.model
"""
from fedpt import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.name = '70b'
  c.model.update(vocab_size=32_000, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                 head_dim=128, d_ff=28_672, tie_embeddings=False, remat='full')
  c.data.update(seq_len=4096, global_batch=512)
  c.inner.update(lr=1.5e-4, warmup_steps=2000, weight_decay=0.1, schedule='cosine',
                 grad_accum=2)
  c.train.update(steps=100_000, log_every=100, eval_every=1000, eval_batches=16,
                 checkpoint_every=500)
  # The paper's outer Nesterov (lr 0.7, momentum 0.9), its choice at 60M-400M over long runs;
  # FedAvg, the default, won at CPU scale (BENCHMARKS.md, "The DiLoCo study").
  c.outer.optimizer = 'diloco'
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  return c
