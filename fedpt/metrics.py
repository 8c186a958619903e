"""Metrics: TensorBoard events and metrics.jsonl (process 0 only), plus a progress line."""
import contextlib
import json
import os
import socket
import time

import jax
import numpy as np

from fedpt import errors

# Peak dense bf16 FLOP/s per device, from the vendors' data sheets; MFU is relative to these.
PEAK_TFLOPS_BY_DEVICE_KIND = (
    ('H200', 989.0),
    ('H100', 989.0),
    ('A100', 312.0),
    ('L4', 121.0),
    ('TPU v6', 918.0),
    ('TPU v5p', 459.0),
    ('TPU v5 lite', 197.0),
    ('TPU v5e', 197.0),
    ('TPU v4', 275.0),
)


def peak_flops_per_device(configured_tflops: float = 0.0) -> float | None:
  if configured_tflops:
    return configured_tflops * 1e12
  kind = jax.devices()[0].device_kind
  for name, tflops in PEAK_TFLOPS_BY_DEVICE_KIND:
    if name.lower() in kind.lower():
      return tflops * 1e12
  return None  # CPUs have no meaningful peak; MFU is then not reported.


def itstime(step: int, every: int, total: int | None = None) -> bool:
  """The one predicate for periodic actions: every `every` steps, and at the last step."""
  return (every > 0 and step % every == 0) or (total is not None and step == total)


class MetricsError(errors.UserError, OSError):
  """metrics.jsonl or the TensorBoard events could not be written; the message names the path."""


class MetricWriter:
  """Appends one JSON object per logged step and mirrors scalars to TensorBoard events.

  Both are written and flushed synchronously: a full disk or a read-only folder is
  then one MetricsError line naming the file (with `note()`, e.g. the checkpoint a
  rerun resumes from), where a writer thread would die and block the trainer on its
  full queue. A line the disk cut short is removed.
  """

  def __init__(self, workdir: str, enabled: bool | None = None, note=lambda: '',
               resume_step: int | None = None):
    """`resume_step`: the step a resumed run restarts from. Rows logged after it (by the
    run that was stopped) are dropped from metrics.jsonl and purged from TensorBoard,
    so the redone steps are not there twice."""
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._note = note
    self._jsonl = self._events = None
    self._path = os.path.join(workdir, 'metrics.jsonl')
    self._tb_dir = os.path.join(workdir, 'tensorboard')
    if self.enabled:
      with self._refusals(self._path):
        os.makedirs(workdir, exist_ok=True)
        if resume_step is not None:
          _drop_rows_after(self._path, resume_step)
        self._jsonl = open(self._path, 'ab', buffering=0)
      with self._refusals(self._tb_dir):
        os.makedirs(self._tb_dir, exist_ok=True)
        self._events = _EventsFile(self._tb_dir)
        if resume_step is not None:  # TensorBoard drops the older files' events from here on.
          session_log = _protos()[0].SessionLog
          self._events.write(step=resume_step + 1,
                             session_log=session_log(status=session_log.START))

  def _refusals(self, path: str):
    return errors.refusals(f'writing {path}', path, MetricsError, self._note)

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), **{k: _number(v) for k, v in scalars.items() if v is not None}}
    with self._refusals(self._path):
      line = memoryview((json.dumps(record) + '\n').encode())
      start = self._jsonl.seek(0, os.SEEK_END)
      try:
        while line:
          line = line[self._jsonl.write(line):]
      except OSError:
        with contextlib.suppress(OSError):  # No torn line for readers.
          self._jsonl.truncate(start)
        raise
    with self._refusals(self._tb_dir):
      summary = _protos()[1].Summary
      self._events.write(step=int(step), summary=summary(value=[
          summary.Value(tag=key, simple_value=value)
          for key, value in record.items() if key != 'step']))

  def close(self) -> None:
    """Releases the files; every record was flushed when written."""
    for f in (self._jsonl, self._events):
      if f is not None:
        with contextlib.suppress(OSError):
          f.close()


def _protos():
  """tensorboard's Event and Summary protos, imported on first use (0.3 s). Not
  tensorboardX's: its package imports torch where it is installed, 2 s per process."""
  from tensorboard.compat.proto import event_pb2, summary_pb2  # pylint: disable=g-import-not-at-top
  return event_pb2, summary_pb2


class _EventsFile:
  """One TensorBoard events file per start, written and flushed synchronously.

  Named to the nanosecond: TensorBoard reads a folder's files in name order, and a start
  within the same second as the last must not overwrite or precede its file.
  """

  def __init__(self, folder: str):
    from tensorboard.summary.writer import record_writer  # pylint: disable=g-import-not-at-top
    name = f'events.out.tfevents.{time.time_ns():020d}.{socket.gethostname()}.{os.getpid()}'
    self._file = open(os.path.join(folder, name), 'wb')
    self._records = record_writer.RecordWriter(self._file)
    self.write(file_version='brain.Event:2')

  def write(self, **fields) -> None:
    self._records.write(_protos()[0].Event(wall_time=time.time(), **fields).SerializeToString())
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def _number(value):
  """An int stays an int in metrics.jsonl (a round, a byte count); anything else is a float."""
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    return int(value)
  return float(value)


def _drop_rows_after(path: str, step: int) -> None:
  """Rewrites metrics.jsonl without the rows of steps > `step` (atomically; no-op if none)."""
  if not os.path.exists(path):
    return
  with open(path, 'rb') as f:
    lines = f.read().splitlines(keepends=True)
  kept = []
  for line in lines:
    try:
      row_step = json.loads(line).get('step')
    except (ValueError, AttributeError):
      continue  # A line cut short by a crash.
    if isinstance(row_step, int) and row_step <= step:
      kept.append(line if line.endswith(b'\n') else line + b'\n')
  if len(kept) == len(lines):
    return
  tmp = f'{path}.tmp'
  with open(tmp, 'wb') as f:
    f.writelines(kept)
  os.replace(tmp, path)


class Progress:
  """Tokens/s, MFU and ETA between log steps, measured on the host without device stalls."""

  def __init__(self, total_steps: int, tokens_per_step: int, flops_per_step: float,
               peak_flops: float | None, start_step: int = 0):
    self.total_steps = total_steps
    self.tokens_per_step = tokens_per_step
    self.flops_per_step = flops_per_step
    self.peak_flops = peak_flops
    self.step_time = None  # Seconds per step at the last update.
    self.restart(start_step)

  def restart(self, step: int) -> None:
    """Measures from here: after the first step (compilation) or a wait between rounds."""
    self._last_step, self._last_time = step, time.perf_counter()

  def update(self, step: int, eta_s: float | None = None) -> dict:
    """Rates since the last update or restart; {} if no step was taken since then.

    `eta_s` overrides the ETA (a federated silo's includes its rounds' waits).
    """
    now = time.perf_counter()
    steps = step - self._last_step
    if steps <= 0:
      return {}
    seconds = max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    step_time = seconds / steps
    self.step_time = step_time
    out = {'tokens_per_s': self.tokens_per_step / step_time, 'step_time_s': step_time,
           'eta_s': step_time * (self.total_steps - step) if eta_s is None else eta_s}
    if self.peak_flops:
      out['mfu'] = self.flops_per_step / step_time / (self.peak_flops * jax.device_count())
    return out


def progress_line(step: int, total: int, scalars: dict) -> str:
  """`step 20/100 | loss 5.1234 | 3,000 tok/s | MFU n/a (cpu) | ETA 0:01:05`."""
  parts = [f'step {step}/{total}', f"loss {scalars['train_loss']:.4f}"]
  if 'eval_loss' in scalars:
    parts.append(f"eval {scalars['eval_loss']:.4f}")
  if 'epsilon' in scalars:  # privacy.dp: spent so far.
    parts.append(f"epsilon {scalars['epsilon']:.3g}")
  if 'tokens_per_s' not in scalars:  # The first step of a start: its time is compilation.
    parts.append('tok/s from the next step on (this one compiled)')
  else:
    parts.append(f"{scalars['tokens_per_s']:,.0f} tok/s")
    parts.append(f"MFU {scalars['mfu']:.1%}" if 'mfu' in scalars else
                 f'MFU n/a ({jax.default_backend()})')
    parts.append(f"ETA {duration(scalars['eta_s'])}")
  return ' | '.join(parts)


def duration(seconds: float) -> str:
  """H:MM:SS."""
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def log(line: str) -> None:
  if jax.process_index() == 0:
    print(line, flush=True)
