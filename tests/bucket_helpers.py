"""What several tests do to a run's bucket: read a global round, make a known delta, walk it."""
from fedpt import protocol
from fedpt import silo as silo_lib


def global_params(store, round_index: int) -> dict:
  """Every parameter of a committed global round, read shard by shard without a model."""
  return store.read_global_arrays(round_index, verify=False)  # Tests read tampered ones too.


def fake_delta(store, run, round_index, silo, fed, scale, *, tokens=None, local_fn=None,
               mutate=None):
  """A real silo delta (compressed, hashed, not yet committed) of `scale` on every leaf.

  It claims the silo's H steps (run.json) and `tokens` (default: all those steps train on).
  """
  steps = protocol.silo_entry(run, silo)['inner_steps'] if silo in protocol.silo_ids(run) else (
      fed.inner_steps)
  tokens = steps * protocol.tokens_per_step(run) if tokens is None else tokens
  global_flat = global_params(store, round_index)
  local_flat = {n: v - scale for n, v in global_flat.items()}
  if local_fn:
    local_flat = local_fn(local_flat)
  payload, _, meta = silo_lib.make_delta(
      run, round_index, silo, store.global_hash(round_index), global_flat, local_flat, None,
      fed, steps=steps, tokens=tokens, train_loss=1.0)
  if mutate:
    payload, meta = mutate(payload, meta)
  return payload, meta


def files(directory):
  """Every object under `directory` (epath's rglob refuses ** on gs://)."""
  for p in directory.iterdir():
    yield from (files(p) if p.is_dir() else [p])
