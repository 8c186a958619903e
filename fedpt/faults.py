"""Named crash points, so tests can kill -9 a process at an exact step of the round protocol.

Setting FEDPT_CRASH_AT=<point>@<round> makes the process SIGKILL itself when it
reaches that point; without the variable these calls do nothing.
"""
import os
import signal

ENV_VAR = 'FEDPT_CRASH_AT'
POINTS = ('silo_inner', 'silo_upload', 'silo_published', 'aggregate_upload')


def crash_point(name: str, round_index: int) -> None:
  if os.environ.get(ENV_VAR) == f'{name}@{round_index}':
    os.kill(os.getpid(), signal.SIGKILL)
