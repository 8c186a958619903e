"""The member question: whole-split evaluation, one gain per silo, simulate --baselines."""
import jax
import numpy as np
import pytest

from fedpt import data
from fedpt import inner
from fedpt import trainer as trainer_lib


def test_whole_split_scores_every_token_once(tiny_config, tmp_path):
  # A split whose size is no multiple of batch x window: 2 full batches of 16 would be 2,080.
  out = tmp_path / 'small'
  docs = [d[:3000] for d in data.stdlib_documents('text')[:12]]
  data.prepare_data(docs, data.default_tokenizer_path(), str(out),
                    val_fraction=0.5)
  tiny_config.data.corpus = str(out)
  trainer = trainer_lib.Trainer(tiny_config)
  val = trainer.val_data
  length = tiny_config.data.seq_len + 1
  full, tail = divmod(val.num_tokens, length)
  assert full % tiny_config.data.global_batch and tail >= 2, (full, tail)  # Pad rows and a tail.
  params = trainer.init_state()['params']
  loss, tokens = trainer.score(params, val, whole=True)
  assert tokens == val.num_tokens - full - 1 == val.scored_tokens(tiny_config.data.seq_len)
  # Reference: the plain training loss of all full windows in one block, and of the tail alone.
  host = jax.device_get(params)
  nll = lambda block: float(inner.loss_and_metrics(  # noqa: E731
      host, np.asarray(block, np.int32), graphdef=trainer.graphdef, z_loss=0.0)[1]['nll'])
  total = (nll(val.tokens[:full * length].reshape(full, length)) * full * (length - 1)
           + nll(val.tokens[full * length:][None]) * (tail - 1))
  assert loss == pytest.approx(total / tokens, rel=1e-5)
  # Weights: every scored position once, none of the padding.
  weights = sum(w.sum() for _, w in val.whole_batches(global_batch=16, seq_len=64))
  assert weights == tokens
  # Two processes each read their own rows; together they are the one-process batches.
  halves = [list(val.whole_batches(global_batch=16, seq_len=64, process_index=i, process_count=2))
            for i in range(2)]
  whole = list(val.whole_batches(global_batch=16, seq_len=64))
  for (a, wa), (b, wb), (t, wt) in zip(*halves, whole):
    np.testing.assert_array_equal(np.concatenate([a, b]), t)
    np.testing.assert_array_equal(np.concatenate([wa, wb]), wt)
  # The sampled mode says how many tokens its sample holds.
  assert trainer.score(params, val)[1] == tiny_config.train.eval_batches * 16 * 64
