r"""Llama-2-7B shape: 32 layers, d_model 4096, 32 heads (no GQA), SwiGLU d_ff 11008.

Sequence 4096 and 1M tokens per step; sized for 64 80-GiB accelerators with FSDP over
all of them (check another size with scripts/plan.py before reserving hardware).

  python scripts/plan.py --config=configs/7b.py --mesh=fsdp=-1 --devices=64
  python scripts/train.py --config=configs/7b.py --workdir=gs://.../7b \
      --config.data.corpus=/data/c4_sp32k --config.data.tokenizer=/data/sp32k.model
"""
from fedpt import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.name = '7b'
  c.model.update(vocab_size=32_000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                 head_dim=128, d_ff=11_008, tie_embeddings=False, remat='dots_no_batch')
  c.data.update(seq_len=4096, global_batch=256)
  c.inner.update(lr=3e-4, warmup_steps=2000, weight_decay=0.1, schedule='cosine', grad_accum=2)
  c.train.update(steps=100_000, log_every=100, eval_every=1000, eval_batches=16,
                 checkpoint_every=500)
  # The paper's outer Nesterov (lr 0.7, momentum 0.9), its choice at 60M-400M over long runs;
  # FedAvg, the default, won at CPU scale (BENCHMARKS.md, "The DiLoCo study").
  c.outer.optimizer = 'diloco'
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  return c
