"""The one base class of every error a user can fix.

Its message names the problem and the fix. Every entry point turns it into one
line on stderr and exit status 2 (`cli.run_or_explain`); anything else is a bug
and keeps its traceback.
"""
import contextlib
import errno
import os


# Exit status of a run stopped by SIGTERM or Ctrl-C after it kept its work (EX_TEMPFAIL,
# "retry later"): supervisors restart it, and rerunning the same command resumes.
PREEMPTED_EXIT_CODE = 75


class UserError(Exception):
  """Bad input, config, files or bucket contents: the message says what and how to fix it."""


def one_line(error: BaseException, limit: int = 300) -> str:
  """An exception's message on one bounded line (it may end up in a manifest or a log line)."""
  text = ' '.join(str(error).split())
  return text if len(text) <= limit else text[:limit] + '...'


_OS_FIXES = {
    errno.EACCES: 'grant this party read and write access to {where}',
    errno.EPERM: 'grant this party read and write access to {where}',
    errno.EROFS: '{where} is on a read-only file system: mount it read-write or use another path',
    errno.ENOSPC: 'free space where {where} lives, or use a larger disk',
    errno.EDQUOT: 'raise the disk quota where {where} lives, or free space',
    errno.ENOTDIR: '{where} has a file where a folder should be: check the path',
    errno.EISDIR: '{where} has a folder where a file should be: check the path',
}


def os_refusal(error: BaseException, where: str) -> str | None:
  """One line for an OS refusal (permission, read-only, disk full, ...): what, where, fix."""
  for e in (error, error.__cause__, error.__context__):
    if isinstance(e, OSError) and e.errno in _OS_FIXES:
      path = f' on {e.filename}' if e.filename else ''
      fix = _OS_FIXES[e.errno].format(where=where)
      return f'{e.strerror or os.strerror(e.errno)}{path}. Fix: {fix}, then rerun'
    if isinstance(e, PermissionError):  # A bucket's refusal carries no errno.
      return (f'access was denied ({one_line(e)}). Fix: grant these credentials '
              f'storage.objects.{{get,list,create,delete}} on {where}, then rerun')
  text = str(error)  # Libraries (tensorstore) report the OS error in their own exception.
  for code in _OS_FIXES:
    if os.strerror(code) in text:
      return f'{os.strerror(code)}. Fix: {_OS_FIXES[code].format(where=where)}, then rerun'
  return None


@contextlib.contextmanager
def refusals(what: str, where: str, error=UserError, note=lambda: ''):
  """An OS refusal inside becomes one `error` line: what, the OS's reason, the fix, `note()`.

  `note` adds what is still good (e.g. the checkpoint a rerun resumes from).
  Anything else keeps its traceback.
  """
  try:
    yield
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    refused = os_refusal(e, where)
    if refused is None:
      raise
    raise error(f'{what}: {refused}{note()}') from None
