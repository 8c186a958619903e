"""Metrics: TensorBoard events and metrics.jsonl (process 0 only), plus a progress line."""
import json
import os
import time

import jax

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


class MetricWriter:
  """Appends one JSON object per logged step and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), **{k: float(v) for k, v in scalars.items() if v is not None}}
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    for key, value in record.items():
      if key != 'step':
        self._tb.add_scalar(key, value, global_step=int(step))

  def close(self) -> None:
    if self.enabled:
      self._tb.flush()
      self._tb.close()
      self._jsonl.close()


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
