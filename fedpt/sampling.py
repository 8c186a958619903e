"""Autoregressive sampling with a KV cache, on the pure param dict of `model.Transformer`.

The params (`nnx.to_pure_dict`, as checkpoints and federated rounds hold them)
are merged into the model inside the jitted `generate`, and decoding calls the
model's own forward with its KV cache, so sampling and training share one
forward pass. The prompt is prefilled in one call; then one token per
`lax.while_loop` step until `max_new_tokens` or every sample has emitted EOS.
"""
import functools
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from fedpt import config as config_lib
from fedpt import data as data_lib
from fedpt import loading
from fedpt import model as model_lib


def _merge(params, cfg: model_lib.ModelConfig) -> model_lib.Transformer:
  """The Transformer holding `params`, built as the train step builds it: no init is run."""
  graphdef, _, _ = model_lib.abstract_model(cfg)
  return nnx.merge(graphdef, params)


# ------------------------------------------------------------------- sampling


def top_k_filter(logits_bv, k: int):
  """Logits outside the k largest become -inf; k=0 keeps all."""
  if k <= 0 or k >= logits_bv.shape[-1]:
    return logits_bv
  kth_b1 = jax.lax.top_k(logits_bv, k)[0][..., -1:]
  return jnp.where(logits_bv < kth_b1, -jnp.inf, logits_bv)


def top_p_filter(logits_bv, p: float):
  """Keeps the smallest set of most likely tokens whose probability mass is >= p (nucleus)."""
  if p >= 1.0:
    return logits_bv
  sorted_bv = jnp.sort(logits_bv, axis=-1)[..., ::-1]
  probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
  mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
  # A token is needed while the more likely ones have not reached p; the top one always is.
  threshold_b1 = jnp.min(jnp.where(mass_before_bv < p, sorted_bv, jnp.inf), axis=-1,
                         keepdims=True)
  return jnp.where(logits_bv < threshold_b1, -jnp.inf, logits_bv)


def sample_token(logits_bv, key, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0):
  """One token per row: argmax at temperature 0, else from the tempered, filtered softmax."""
  if temperature == 0.0:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  logits_bv = logits_bv.astype(jnp.float32) / temperature
  logits_bv = top_p_filter(top_k_filter(logits_bv, top_k), top_p)
  return jax.random.categorical(key, logits_bv, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=(
    'cfg', 'max_new_tokens', 'temperature', 'top_k', 'top_p', 'eos_id', 'pad_id',
    'return_logits'))
def generate(params, prompt_bp, key, *, cfg: model_lib.ModelConfig, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             eos_id: int | None = None, pad_id: int = 0, return_logits: bool = False):
  """Continues each row of `prompt_bp`; a pure function of (params, prompt, key).

  Returns {'tokens': [batch, max_new_tokens] (pad_id after a row's EOS),
  'lengths': [batch] tokens generated including EOS}, and with `return_logits`
  the logits every token was drawn from ('logits') and those of the prompt.
  """
  model = _merge(params, cfg)
  batch, prompt_len = prompt_bp.shape
  cache = model_lib.init_cache(cfg, batch, prompt_len + max_new_tokens)
  prompt_logits_bpv, cache = model(prompt_bp, cache=cache, cache_index=0)
  vocab = prompt_logits_bpv.shape[-1]
  logits_bnv = jnp.zeros((batch, max_new_tokens if return_logits else 0, vocab), jnp.float32)
  carry = dict(step=jnp.int32(0), logits_bv=prompt_logits_bpv[:, -1], cache=cache,
               tokens_bn=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
               done_b=jnp.zeros((batch,), bool), lengths_b=jnp.zeros((batch,), jnp.int32),
               logits_bnv=logits_bnv)

  def keep_going(c):
    return (c['step'] < max_new_tokens) & ~jnp.all(c['done_b'])

  def step(c):
    i = c['step']
    token_b = sample_token(c['logits_bv'], jax.random.fold_in(key, i), temperature, top_k,
                           top_p)
    token_b = jnp.where(c['done_b'], pad_id, token_b)
    lengths_b = c['lengths_b'] + (~c['done_b']).astype(jnp.int32)
    done_b = c['done_b'] | ((token_b == eos_id) if eos_id is not None else False)
    logits_bnv = c['logits_bnv']
    if return_logits:
      logits_bnv = logits_bnv.at[:, i].set(c['logits_bv'])
    next_logits_b1v, cache = model(token_b[:, None], cache=c['cache'],
                                   cache_index=prompt_len + i)
    return dict(step=i + 1, logits_bv=next_logits_b1v[:, 0], cache=cache,
                tokens_bn=c['tokens_bn'].at[:, i].set(token_b), done_b=done_b,
                lengths_b=lengths_b, logits_bnv=logits_bnv)

  carry = jax.lax.while_loop(keep_going, step, carry)
  out = {'tokens': carry['tokens_bn'], 'lengths': carry['lengths_b']}
  if return_logits:
    out.update(logits=carry['logits_bnv'], prompt_logits=prompt_logits_bpv)
  return out


# ------------------------------------------------------------ loading a model


def sample_text(config, prompt: str, *, workdir: str | None = None, step: int | None = None,
                storage: str | None = None, round_index: int | None = None,
                max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                top_p: float = 1.0, seed: int = 0, num_samples: int = 1) -> list[str]:
  """Prompt + continuation, decoded with the run's tokenizer, for each of `num_samples`."""
  data_lib.check_text(prompt, 'the prompt')
  device = jax.devices()[0]
  loaded = loading.load(config, loading.Source(workdir=workdir, step=step, storage=storage,
                                               round_index=round_index))
  cfg, params, source = loaded.model_config, loaded.params, loaded.source
  tokenizer = data_lib.load_tokenizer(loaded.tokenizer_path)
  if tokenizer.vocab_size() > cfg.vocab_size:
    raise config_lib.ConfigError(
        'model.vocab_size', f'{cfg.vocab_size} is smaller than the tokenizer vocabulary '
        f'({tokenizer.vocab_size()})', 'use the config the model was trained with')
  print(f'sampling from {source}', file=sys.stderr, flush=True)
  # Training documents are separated by EOS, so a prompt starts right after one.
  prompt_ids = [tokenizer.eos_id()] + tokenizer.encode(prompt)
  prompt_bp = jnp.tile(jnp.asarray(prompt_ids, jnp.int32)[None], (num_samples, 1))
  out = jax.device_get(generate(
      params, jax.device_put(prompt_bp, device), jax.random.key(seed), cfg=cfg,
      max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k,
      top_p=float(top_p), eos_id=tokenizer.eos_id(), pad_id=max(tokenizer.pad_id(), 0)))
  texts = []
  for tokens, length in zip(out['tokens'], out['lengths']):
    new = [int(t) for t in tokens[:length] if t != tokenizer.eos_id()]
    texts.append(tokenizer.decode(prompt_ids[1:] + new))
  return texts
