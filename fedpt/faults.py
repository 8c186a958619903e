"""Named fault points, so tests can break a party at an exact step of the round protocol.

Setting FEDPT_CRASH_AT=<point>@<round> makes the process SIGKILL itself when it
reaches that point; <point>@<round>:SIGTERM sends SIGTERM instead (a preemption
notice, which the process handles). In-process tests may instead register a hook (e.g. one
that stops the storage server). Without either, these calls do nothing.
"""
import os
import signal
from typing import Callable

ENV_VAR = 'FEDPT_CRASH_AT'
POINTS = ('silo_upload_begin', 'silo_inner', 'silo_upload', 'silo_published',
          'aggregate_upload', 'silo_personal')  # silo_personal@<step of the personal phase>.
_HOOKS: dict[str, Callable[[], None]] = {}


def set_hook(point: str, round_index: int, hook: Callable[[], None] | None) -> None:
  """Runs `hook` once, in whichever thread reaches `point` in round `round_index` first."""
  if point not in POINTS:
    raise ValueError(f'unknown fault point {point!r}; known: {POINTS}')
  key = f'{point}@{round_index}'
  if hook is None:
    _HOOKS.pop(key, None)
  else:
    _HOOKS[key] = hook


def crash_point(name: str, round_index: int) -> None:
  key = f'{name}@{round_index}'
  hook = _HOOKS.pop(key, None)
  if hook is not None:
    hook()
  armed, _, signal_name = os.environ.get(ENV_VAR, '').partition(':')
  if armed == key:
    os.kill(os.getpid(), signal.Signals[signal_name or 'SIGKILL'])


def clear() -> None:
  """Disarms every hook (tests call it so that an unfired hook cannot leak into the next)."""
  _HOOKS.clear()
