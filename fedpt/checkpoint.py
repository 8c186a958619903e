"""The silo's private checkpoints: one Orbax composite of the train state and its metadata.

The metadata (model spec, tokenizer hash, data position, federation round) is
JSON so that a mismatched workdir is refused before any array is read.
"""
import contextlib
import functools
import logging
import os
import sys
import threading

from etils import epath
import jax
import orbax.checkpoint as ocp

from fedpt import config as config_lib
from fedpt import errors


# Orbax keeps its current save operation in process-global state: two threads of one
# process (silos simulated as threads) must not save or restore at the same time.
ORBAX_LOCK = threading.RLock()


class CheckpointError(errors.UserError, ValueError):
  """A checkpoint that cannot be used with this config; the message says why and what to do."""


class Checkpointer:
  """Async Orbax CheckpointManager keeping the last N steps of `{'state', 'meta'}`.

  A step is written under a temporary name and renamed once whole, so a save cut
  short (disk full, a kill) is never listed; the workdir's writer (`clean_up`)
  deletes such leftovers when it starts. An OS refusal, also one raised in
  Orbax's background save threads, is one CheckpointError line naming the step
  that failed and the last good one.
  """

  def __init__(self, directory: str, keep: int, async_save: bool = True, clean_up: bool = True):
    self.directory = os.path.abspath(directory) if '://' not in directory else directory
    self._pending = None  # The step of an async save not yet known to be complete.
    _quiet_background_refusals()
    with self._refusals('creating the checkpoint folder'):
      self._manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(
              max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
              cleanup_tmp_directories=clean_up),
          item_names=('state', 'meta'))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, meta: dict) -> None:
    self.wait()  # Orbax would wait too; here a failure of the previous save is named as such.
    with self._refusals(f'saving checkpoint step {step}'), ORBAX_LOCK:
      self._pending = step
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def _refusals(self, what: str):
    """An OS refusal (permission, read-only, disk full) becomes one CheckpointError line."""
    return errors.refusals(f'{what} in {self.directory}', self.directory, CheckpointError,
                           note=lambda: last_good_note(self.directory))

  def read_meta(self, step: int) -> dict:
    with ORBAX_LOCK:
      return self._manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))['meta']

  def restore(self, step: int, abstract_state, expected_meta: dict) -> tuple[object, dict]:
    """Restores into `abstract_state`'s shardings after checking the metadata matches."""
    meta = self.read_meta(step)
    check_meta(meta, expected_meta, f'checkpoint {self.directory} step {step}')
    with ORBAX_LOCK:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))
    return restored['state'], meta

  def restore_newest_intact(self, abstract_for, expected_meta: dict):
    """(step, state, meta) of the newest checkpoint that reads back whole, or None if none.

    A checkpoint that cannot be read (torn files, truncated arrays, corrupt
    metadata) is moved aside to `<step>.unreadable`, never deleted, with a
    warning naming it, and the next older one is tried. `abstract_for(step)`
    gives the tree to restore into. A checkpoint of another model or tokenizer
    is not damage: its CheckpointError stops the run.
    """
    for step in sorted(self.all_steps(), reverse=True):
      try:
        return (step, *self.restore(step, abstract_for(step), expected_meta))
      except CheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except  # Damage fails in many ways.
        aside = self.move_aside(step)
        older = [s for s in self.all_steps() if s < step]
        print(f'warning: checkpoint step {step} in {self.directory} is unreadable '
              f'({type(e).__name__}: {errors.one_line(e, 160)}); moved aside to {aside}; '
              + (f'resuming from step {max(older)}' if older else 'starting fresh'),
              file=sys.stderr, flush=True)
    return None

  def move_aside(self, step: int) -> str:
    """Renames a step's folder so the manager no longer sees it; returns the new path."""
    source = epath.Path(self.directory) / str(step)
    target = epath.Path(self.directory) / f'{step}.unreadable'
    suffix = 1
    while target.exists():
      suffix += 1
      target = epath.Path(self.directory) / f'{step}.unreadable{suffix}'
    source.rename(target)
    with ORBAX_LOCK:
      self._manager.reload()
    return str(target)

  def state_layout(self, step: int) -> dict:
    """The saved state's tree of Orbax array metadata (shape, dtype); reads no array."""
    # The item's handler, not a Checkpointer: an item folder has no step metadata, which a
    # Checkpointer looks for and warns about on every read.
    handler = ocp.PyTreeCheckpointHandler()
    try:
      with ORBAX_LOCK:
        tree = handler.metadata(epath.Path(self.directory) / str(step) / 'state')
    finally:
      handler.close()
    return tree.tree if hasattr(tree, 'tree') else tree

  def wait(self) -> None:
    """Until the async save in flight is on disk; its failure is raised here."""
    what = 'finishing a checkpoint' if self._pending is None else (
        f'saving checkpoint step {self._pending}')
    with self._refusals(what):
      self._manager.wait_until_finished()
    self._pending = None

  def close(self, quiet: bool = False) -> None:
    """Waits for the save in flight; `quiet` when another error is already on its way out."""
    try:
      # Orbax's close() does not wait for the temporary-folder cleanup its constructor
      # started: a process that exits right after (a silo joining a finished run) would
      # print that thread's traceback at interpreter shutdown.
      getattr(self._manager, '_maybe_await_cleanup_tmp_directory', lambda: None)()
      self.wait()
    except Exception:  # pylint: disable=broad-except
      with contextlib.suppress(Exception):  # Its own wait would raise the same again.
        self._manager.close()
      if not quiet:
        raise
      return
    self._manager.close()


def abstract_like(state, shardings):
  """ShapeDtypeStructs carrying the target shardings, for a sharded restore."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def check_meta(meta: dict, expected: dict, what: str) -> None:
  """Raises CheckpointError unless `meta` has every `expected` value (model spec, tokenizer)."""
  for key, want in expected.items():
    have = meta.get(key)
    if have != want:
      raise CheckpointError(
          f'{what} has {key}={have!r}, but this run expects {want!r}. Fix: use a fresh '
          '--workdir for this config, or restore the config that wrote the checkpoint.')


def expected_meta(config, tokenizer_sha256: str) -> dict:
  return {'model_spec': config_lib.model_spec(config), 'tokenizer_sha256': tokenizer_sha256}


def last_good_step(directory: str) -> int | None:
  """The newest step complete on disk (a save cut short keeps its temporary name)."""
  return max(ocp.path.step.checkpoint_steps(directory), default=None)


def last_good_note(directory: str) -> str:
  """What a rerun resumes from, for the end of an error line."""
  try:
    step = last_good_step(directory)
  except Exception:  # pylint: disable=broad-except  # The folder itself is what failed.
    return ''
  if step is None:
    return '. No checkpoint is complete yet: a rerun starts from step 0'
  return f'. The last good checkpoint is step {step}: a rerun resumes from it'


@functools.cache
def _quiet_background_refusals() -> None:
  """Keeps Orbax's background threads from printing tracebacks of an OS refusal.

  The same error is raised in the main thread at the next save, wait or close,
  which `errors.refusals` turns into one line; the tracebacks logged by each
  failing thread, and tensorstore's 'Event loop is closed' callbacks after the
  failed save's event loop is gone, would bury it. Other errors are logged as before.
  """
  def keep(record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return not ('orbax' in record.pathname and error is not None
                and errors.os_refusal(error, '') is not None)
  logging.getLogger('absl').addFilter(keep)
  previous = sys.unraisablehook

  def unraisable(info):
    if not (isinstance(info.exc_value, RuntimeError)
            and str(info.exc_value) == 'Event loop is closed'):
      previous(info)
  sys.unraisablehook = unraisable
