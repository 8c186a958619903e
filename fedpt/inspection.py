"""What a checkpoint is: its parameters (shape, dtype, bytes, hash) and where it came from.

Global rounds are described from their committed metadata alone (the per-leaf
hashes the aggregator signed), so inspecting a 70B round reads kilobytes, not
the model. Private checkpoints are described from Orbax's metadata and the
checkpoint's own JSON meta.
"""
import jax
import numpy as np

from fedpt import loading
from fedpt import protocol
from fedpt import signing
from fedpt import storage as storage_lib


def _leaf_rows(shapes: dict, dtypes: dict, hashes: dict | None = None) -> list[dict]:
  return [{'name': n, 'shape': list(shapes[n]), 'dtype': str(dtypes[n]),
           'params': int(np.prod(shapes[n])),
           'bytes': int(np.prod(shapes[n])) * np.dtype(dtypes[n]).itemsize,
           'sha256': (hashes or {}).get(n)} for n in sorted(shapes)]


def _summary(leaves: list[dict]) -> dict:
  return {'leaves': leaves, 'param_count': sum(x['params'] for x in leaves),
          'bytes': sum(x['bytes'] for x in leaves)}


def describe(source: loading.Source) -> dict:
  """A global round (from its signed metadata) or a private checkpoint (from Orbax's)."""
  if source.workdir is not None:
    return describe_private_checkpoint(source.workdir, source.step)
  return describe_global_round(storage_lib.RunStorage(source.storage), source.round_index)


def describe_global_round(store: storage_lib.RunStorage, round_index: int | None) -> dict:
  """A committed global round: tree, sizes, hash, contributors, tokens and signatures."""
  run = store.read_run()
  round_index, metas = loading.committed_round(store, round_index)
  shapes, dtypes, hashes = protocol.global_leaves(metas)
  check = signing.listed_aggregator_check(run)
  signatures = 'unsigned run' if check is None else 'valid'
  if check is not None and any(check(m) for m in metas):
    signatures = 'INVALID on at least one shard: the bucket was tampered with'
  manifest = store.read_manifest(round_index - 1) if round_index > 0 else None
  if manifest is not None and protocol.check_manifest(run, round_index - 1, manifest):
    signatures += (f'; the manifest of round {round_index - 1} is malformed: '
                   f'{protocol.check_manifest(run, round_index - 1, manifest)}')
    manifest = None
  update = None  # The compressed downlink: what a silo holding the round before reads.
  if all('update_format' in m for m in metas):
    update = {**metas[0]['update_format'], 'bytes': sum(m['update_bytes'] for m in metas),
              'fragment': (protocol.round_fragment(run, round_index - 1)
                           if protocol.fragments(run) > 1 and round_index > 0 else None)}
  return {
      'source': f'{store.root} global round {round_index}', 'run_id': run['run_id'],
      'update': update,
      'round': round_index, 'global_hash': store.global_hash(round_index),
      'num_shards': len(metas), 'signatures': signatures,
      'contributors': metas[0]['contributors'], 'tokens': metas[0]['tokens'],
      'weights': {e['silo']: e['weight'] for e in (manifest or {}).get('included', [])},
      'rejected': [e['silo'] for e in (manifest or {}).get('rejected', [])],
      'secure_aggregation': _secure_aggregation(store, run, round_index - 1, manifest),
      **_summary(_leaf_rows(shapes, dtypes, hashes)),
  }


def _secure_aggregation(store, run, round_index: int, manifest: dict | None) -> str | None:
  """How round `round_index`'s masked deltas were summed: the format and recovery records."""
  if not protocol.secure_aggregation(run) or manifest is None:
    return None
  unmask = manifest.get('unmask', [])
  return ('masked fixed-point deltas (secagg), summed; '
          + (f"masks of {', '.join(unmask)} removed with the recovery records of "
             f"{', '.join(store.recovery_silos(round_index)) or 'none (collected)'}"
             if unmask else 'every listed silo in, no recovery needed'))


def describe_private_checkpoint(workdir: str, step: int | None = None) -> dict:
  """A silo's (or a plain run's) latest or given checkpoint: its parameters and meta."""
  with loading.open_checkpoint(workdir, step) as (ckpt, step):
    meta = ckpt.read_meta(step)
    params = loading.params_layout(ckpt.state_layout(step))
  leaves = {'/'.join(str(getattr(k, 'key', k)) for k in path): m
            for path, m in jax.tree_util.tree_flatten_with_path(params)[0]}
  shapes = {n: tuple(m.shape) for n, m in leaves.items()}
  dtypes = {n: np.dtype(m.dtype) for n, m in leaves.items()}
  record = loading.read_config_record(workdir) or {}
  return {'source': loading.checkpoint_label(workdir, step, meta), 'step': step,
          **{k: meta.get(k) for k in ('run_id', 'silo', 'round', 'phase', 'tokenizer_sha256')},
          'config_changes': record.get('config_changes', []),  # Allowed on a resume.
          **_summary(_leaf_rows(shapes, dtypes))}


def render(info: dict) -> str:
  lines = [f"{info['source']}"]
  for key in ('run_id', 'round', 'silo', 'step', 'global_hash', 'signatures', 'contributors',
              'tokens', 'weights', 'rejected', 'secure_aggregation', 'config_changes'):
    if info.get(key) not in (None, [], {}):
      # A silo's checkpoint number is not a train step; it is what --step takes.
      label = 'checkpoint (--step)' if key == 'step' and info.get('phase') else key
      lines.append(f'  {label}: {info[key]}')
  lines.append(f"  parameters: {info['param_count']:,} in {len(info['leaves'])} arrays, "
               f"{info['bytes'] / 1e6:.2f} MB")
  if info.get('update'):
    u = info['update']
    what = ('float32' if u['compression'] == 'none'
            else f"{u['compression']} (block {u['block_size']})")
    rows = (f", the rows of fragment {u['fragment']}" if u.get('fragment') is not None else '')
    lines.append(f"  downlink update: {what}{rows}, {u['bytes'] / 1e6:.2f} MB: what a silo "
                 "holding the round before reads")
  width = max(len(x['name']) for x in info['leaves'])
  for x in info['leaves']:
    digest = (x['sha256'] or '')[:12]
    lines.append(f"    {x['name']:<{width}}  {str(tuple(x['shape'])):<18} {x['dtype']:<9} "
                 f"{x['params']:>12,} {digest}")
  return '\n'.join(lines)

