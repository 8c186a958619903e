r"""OpenDiLoCo's 1.1B model (TinyLlama shape): 22 layers, d_model 2048, GQA 32/4 heads.

  python scripts/train.py --config=configs/1b.py --workdir=gs://.../1b \
      --config.data.corpus=/data/c4_sp32k --config.data.tokenizer=/data/sp32k.model
"""
from fedpt import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.name = '1b'
  c.model.update(vocab_size=32_000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                 head_dim=64, d_ff=5_632, tie_embeddings=False, remat='dots_no_batch')
  c.data.update(seq_len=2048, global_batch=512)
  c.inner.update(lr=4e-4, warmup_steps=1000, weight_decay=0.1, schedule='cosine', grad_accum=4)
  c.train.update(steps=50_000, log_every=100, eval_every=1000, eval_batches=16,
                 checkpoint_every=1000)
  # The paper's outer Nesterov (lr 0.7, momentum 0.9), its choice at 60M-400M over long runs;
  # FedAvg, the default, won at CPU scale (BENCHMARKS.md, "The DiLoCo study").
  c.outer.optimizer = 'diloco'
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  return c
