"""Metrics: TensorBoard events and metrics.jsonl (process 0 only), plus a progress line."""
import contextlib
import json
import os
import time

import jax

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
  rerun resumes from), where tensorboardX's writer thread would die and block the
  trainer on its full queue. A line the disk cut short is removed.
  """

  def __init__(self, workdir: str, enabled: bool | None = None, note=lambda: ''):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._note = note
    self._jsonl = self._events = None
    self._path = os.path.join(workdir, 'metrics.jsonl')
    self._tb_dir = os.path.join(workdir, 'tensorboard')
    if self.enabled:
      with self._refusals(self._path):
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(self._path, 'ab', buffering=0)
      from tensorboardX import event_file_writer  # pylint: disable=g-import-not-at-top  # 1.5 s.
      with self._refusals(self._tb_dir):
        os.makedirs(self._tb_dir, exist_ok=True)
        self._events = event_file_writer.EventsWriter(os.path.join(self._tb_dir, 'events'))
        self._events.flush()

  def _refusals(self, path: str):
    return errors.refusals(f'writing {path}', path, MetricsError, self._note)

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), **{k: float(v) for k, v in scalars.items() if v is not None}}
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
    from tensorboardX import summary  # pylint: disable=g-import-not-at-top
    from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
    with self._refusals(self._tb_dir):
      now = time.time()
      for key, value in record.items():
        if key != 'step':
          self._events.write_event(event_pb2.Event(
              wall_time=now, step=int(step), summary=summary.scalar(key, value)))
      self._events.flush()

  def close(self) -> None:
    """Releases the files; every record was flushed when written."""
    for f in (self._jsonl, self._events):
      if f is not None:
        with contextlib.suppress(OSError):
          f.close()


class Progress:
  """Tokens/s, MFU and ETA between log steps, measured on the host without device stalls."""

  def __init__(self, total_steps: int, tokens_per_step: int, flops_per_step: float,
               peak_flops: float | None, start_step: int = 0):
    self.total_steps = total_steps
    self.tokens_per_step = tokens_per_step
    self.flops_per_step = flops_per_step
    self.peak_flops = peak_flops
    self._last_step = start_step
    self._last_time = time.perf_counter()

  def update(self, step: int) -> dict:
    now = time.perf_counter()
    steps = max(step - self._last_step, 1)
    seconds = max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    step_time = seconds / steps
    out = {'tokens_per_s': self.tokens_per_step / step_time, 'step_time_s': step_time,
           'eta_s': step_time * (self.total_steps - step)}
    if self.peak_flops:
      out['mfu'] = self.flops_per_step / step_time / (self.peak_flops * jax.device_count())
    return out


def progress_line(step: int, total: int, scalars: dict) -> str:
  parts = [f'step {step}/{total}', f"loss {scalars['train_loss']:.4f}"]
  if 'eval_loss' in scalars:
    parts.append(f"eval {scalars['eval_loss']:.4f}")
  parts.append(f"{scalars['tokens_per_s']:,.0f} tok/s")
  parts.append(f"MFU {scalars['mfu']:.1%}" if 'mfu' in scalars else 'MFU n/a (cpu)')
  eta = int(scalars['eta_s'])
  parts.append(f'ETA {eta // 3600:d}:{eta // 60 % 60:02d}:{eta % 60:02d}')
  return ' | '.join(parts)


def log(line: str) -> None:
  if jax.process_index() == 0:
    print(line, flush=True)
