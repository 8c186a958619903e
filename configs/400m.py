r"""DiLoCo's 400M model (Douillard et al. 2023): 12 layers, d_model 1536, 12 heads.

  python scripts/train.py --config=configs/400m.py --workdir=gs://.../400m \
      --config.data.corpus=/data/c4_sp32k --config.data.tokenizer=/data/sp32k.model
"""
from fedpt import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.name = '400m'
  c.model.update(vocab_size=32_000, d_model=1536, n_layers=12, n_heads=12, n_kv_heads=12,
                 head_dim=128, d_ff=4_096, tie_embeddings=False, remat='dots_no_batch')
  c.data.update(seq_len=1024, global_batch=512)
  c.inner.update(lr=4e-4, warmup_steps=1000, weight_decay=0.1, schedule='cosine')
  c.train.update(steps=88_000, log_every=100, eval_every=1000, eval_batches=16,
                 checkpoint_every=1000)
  # The paper's outer Nesterov (lr 0.7, momentum 0.9), its choice at 60M-400M over long runs;
  # FedAvg, the default, won at CPU scale (BENCHMARKS.md, "The DiLoCo study").
  c.outer.optimizer = 'diloco'
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  return c
