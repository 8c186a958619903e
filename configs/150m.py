r"""DiLoCo's 150M model (Douillard et al. 2023): 12 layers, d_model 896, 16 heads.

Sequence 1024 and batch 512 as in the paper; set data.corpus/tokenizer to a
32k-vocabulary corpus prepared with scripts/prepare_data.py.

  python scripts/train.py --config=configs/150m.py --workdir=gs://.../150m \
      --config.data.corpus=/data/c4_sp32k --config.data.tokenizer=/data/sp32k.model
"""
from fedpt import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.name = '150m'
  c.model.update(vocab_size=32_000, d_model=896, n_layers=12, n_heads=16, n_kv_heads=16,
                 head_dim=56, d_ff=2_432, tie_embeddings=False, remat='dots_no_batch')
  c.data.update(seq_len=1024, global_batch=512)
  c.inner.update(lr=4e-4, warmup_steps=1000, weight_decay=0.1, schedule='cosine')
  c.train.update(steps=88_000, log_every=100, eval_every=1000, eval_batches=16,
                 checkpoint_every=1000)
  # The paper's outer Nesterov (lr 0.7, momentum 0.9), its choice at 60M-400M over long runs;
  # FedAvg, the default, won at CPU scale (BENCHMARKS.md, "The DiLoCo study").
  c.outer.optimizer = 'diloco'
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  return c
