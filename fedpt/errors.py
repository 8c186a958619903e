"""The one base class of every error a user can fix.

Its message names the problem and the fix. Every entry point turns it into one
line on stderr and exit status 2 (`cli.run_or_explain`); anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
  """Bad input, config, files or bucket contents: the message says what and how to fix it."""


def one_line(error: BaseException, limit: int = 300) -> str:
  """An exception's message on one bounded line (it may end up in a manifest or a log line)."""
  text = ' '.join(str(error).split())
  return text if len(text) <= limit else text[:limit] + '...'
