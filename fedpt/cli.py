"""What every entry point shares: user errors become one clear line, not a traceback."""
import contextlib
import difflib
import json
import os
import re
import sys
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from fedpt import config as config_lib
from fedpt import errors


def run_or_explain(fn, *args, **kwargs):
  """Calls fn; a user error or an OS refusal (disk full, read-only, permission) exits with
  status 2 and one line, a Ctrl-C with 75 and a line."""
  try:
    return fn(*args, **kwargs)
  except errors.UserError as e:
    _exit(f'error: {e}', 2)
  except OSError as e:  # Disk full, read-only, permission: wherever a tool writes or reads.
    refused = errors.os_refusal(e, e.filename or 'the path it names')
    if refused is None:
      raise
    _exit(f'error: {refused}', 2)
  except KeyboardInterrupt:  # Where no checkpoint was due; training loops handle it themselves.
    _exit('interrupted (Ctrl-C): nothing half-written is kept; rerun the same command to resume',
          errors.PREEMPTED_EXIT_CODE)


def _exit(line: str, status: int):
  print(line, file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(status)  # Skip atexit hooks of half-initialised libraries (e.g. Orbax threads).


def run(main) -> None:
  """`app.run(main)` for every entry point: flag errors and usage errors are one line, status 2.

  (absl prints the whole flag help and exits 1 for an `app.UsageError`.)
  """
  def checked(argv):
    try:
      return main(argv)
    except app.UsageError as e:
      _exit(f'error: {e}', 2)
  app.run(checked, flags_parser=parse_flags_or_explain)


def parse_flags_or_explain(argv):
  """absl's flag parser, but a bad flag or --config.x override is one line, not a traceback.

  Every script with a --config flag also gets --print_config (`config_resolver`).
  """
  if 'config' in flags.FLAGS and 'print_config' not in flags.FLAGS:
    flags.DEFINE_bool('print_config', False, 'Print the config this command would run with '
                      '(--config, its overrides and, where the command reads one, the '
                      'workdir\'s or run\'s recorded config) as JSON, then exit without doing '
                      'anything else.')
  try:
    remaining = flags.FLAGS(argv)
    if not flags.FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)  # Orbax's INFO chatter would drown the progress line.
    if 'config' in flags.FLAGS and flags.FLAGS['config'].present:
      flags.FLAGS.config.keys()  # Config files load lazily; surface their errors now.
  except Exception as e:  # pylint: disable=broad-except
    _exit(f'error: {explain_flag_error(e, argv)}', 2)
  if 'print_config' in flags.FLAGS and flags.FLAGS.print_config:
    _print_config()
  return remaining


def explain_flag_error(error: Exception, argv) -> str:
  """One line for a flag parsing error: the flag, what is wrong, the fix."""
  for name in _config_flag_names():
    config = _config_file_config(name, argv)
    if config is None:
      typed = _overrides_in(name, argv)
      if typed and flags.FLAGS[name].default is None and not any(
          a.startswith((f'--{name}=', f'-{name}=')) for a in argv):
        return (f'--{name}.{typed[0][0]}: an override needs the config file it changes. Fix: '
                f'pass --{name}=configs/<name>.py before it')
      continue
    for path, value in _overrides_in(name, argv):
      problem = _field_problem(config, path)
      if problem:
        return f'--{name}.{path}: {problem}'
    bad = re.match(rf'flag --{name}\.([\w.]+)=(.*?): ', str(error), re.S)
    if isinstance(error, flags.IllegalFlagValueError) and bad:
      path, value = bad.groups()
      default = _lookup(config, path)
      if isinstance(default, ml_collections.ConfigDict):
        first = sorted(config_lib.flat(default))[0]
        return (f'--{name}.{path}={value}: {path} is a group of fields, not a value. Fix: set '
                f'one of its fields, e.g. --{name}.{path}.{first}=...')
      return (f'--{name}.{path}={value}: must be {config_lib.describe_type(default)}. Fix: '
              f'e.g. --{name}.{path}={default} (the config file\'s value)')
  missing = re.match(r'flag --(\w+)=None: Flag --\1 must have a value other than None', str(error))
  if missing and missing.group(1) in flags.FLAGS:  # absl's wording for a required flag.
    name = missing.group(1)
    return f'--{name} is missing. Fix: pass --{name}=... ({flags.FLAGS[name].help.rstrip(".")})'
  message = str(error)
  if isinstance(error, KeyError) and message[:1] == message[-1:] == "'":
    message = message[1:-1]  # A KeyError's str() is its repr.
  message = ' '.join(message.replace('\\n', ' ').replace("\\'", "'").split()).rstrip('.')
  return (f'bad command-line flag: {message}. Fix: check the flag\'s name and value '
          '(--helpfull lists them)')


def _config_flag_names() -> list[str]:
  """The flags defined by `config_flags.DEFINE_config_*` (their values are ConfigDicts)."""
  return [name for name in flags.FLAGS
          if type(flags.FLAGS[name]).__name__ == '_ConfigFlag' and name == flags.FLAGS[name].name]


def _config_file_config(name: str, argv):
  """The config --`name` names, without any override (None if it cannot be loaded)."""
  paths = [a.split('=', 1)[1] for a in argv if a.startswith((f'--{name}=', f'-{name}='))]
  path = paths[-1] if paths else flags.FLAGS[name].default
  if not isinstance(path, str):
    return path
  try:
    return flags.FLAGS[name].parser.parse(path)
  except Exception:  # pylint: disable=broad-except  # The file's own error is reported instead.
    return None


def _overrides_in(name: str, argv) -> list[tuple[str, str | None]]:
  """(field path, typed value or None) of every --`name`.x=... on the command line."""
  out = []
  for arg in argv:
    m = re.match(rf'^--?(?:no)?{name}\.([^=]+)(?:=(.*))?$', arg, re.S)
    if m:
      out.append(m.groups())
  return out


def _lookup(config, path: str):
  node = config
  for key in path.split('.'):
    node = node[key]
  return node


def _field_problem(config, path: str) -> str | None:
  """Why `path` is no field of `config` (with the nearest real one), or None."""
  node, walked = config, []
  for key in path.split('.'):
    if not isinstance(node, ml_collections.ConfigDict):
      return (f'no such config field: {".".join(walked)} is a {type(node).__name__}, not a '
              'group of fields')
    if key not in node:
      guess = _nearest_field(config, path)
      return 'no such config field.' + (f' Did you mean {guess}?' if guess else
                                        f' Fields here: {", ".join(sorted(node.keys()))}')
    node = node[key]
    walked.append(key)
  return None


def _nearest_field(config, path: str) -> str | None:
  """The field(s) `path` most likely meant: a near-identical path, its name in other groups,
  else the closest path."""
  paths = list(config_lib.flat(config)) + _group_paths(config)
  close = difflib.get_close_matches(path, paths, n=1, cutoff=0.8)
  same_name = sorted(p for p in paths if p.rsplit('.', 1)[-1] == path.rsplit('.', 1)[-1])
  if not close and same_name:
    return ' or '.join([', '.join(same_name[:-1]), same_name[-1]] if len(same_name) > 1
                       else same_name)
  close = close or difflib.get_close_matches(path, paths, n=1, cutoff=0.6)
  return close[0] if close else None


def _group_paths(config, prefix: str = '') -> list[str]:
  out = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out += [f'{prefix}{key}', *_group_paths(value, f'{prefix}{key}.')]
  return out


_resolver = []


def config_resolver(fn: Callable[[], Any]) -> Callable[[], Any]:
  """Registers how this script resolves its config, for --print_config (a decorator).

  A script whose config is its --config flag as typed needs none. One that reads a
  recorded config (a workdir's config.json, a run's run.json) registers the function
  that does so, with no arguments, reading the other flags; it must write nothing.
  """
  _resolver[:] = [fn]
  return fn


def _print_config():
  """--print_config: the resolved config as JSON (config.json's form) on stdout; exit 0."""
  with contextlib.redirect_stdout(sys.stderr):  # Notes the resolver logs are not the config.
    config = run_or_explain(_resolver[0]) if _resolver else flags.FLAGS.config
  if config is None:
    _exit('error: --print_config: no config to print. Fix: pass --config=configs/<name>.py',
          2)
  print(json.dumps(config_lib.flat(config), indent=1, sort_keys=True))
  _exit_ok()


def _exit_ok():
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)  # Like `_exit`: nothing else of the command runs.


def config_overrides(name: str = 'config') -> set[str]:
  """The config fields set on this command line (--config.inner.lr=...), not by the file.

  Recorded configs (a workdir's, a run's run.json) win over a config file's
  defaults, but a field the user typed and that disagrees is refused.
  """
  if name not in flags.FLAGS or not flags.FLAGS[name].present:
    return set()
  return set(config_flags.get_override_values(flags.FLAGS[name]))


def define_source_flags(verb: str) -> None:
  """--workdir/--step/--storage/--round: a model's source, the same in every tool (`loading`)."""
  flags.DEFINE_string('workdir', None, f'A training run\'s or silo\'s workdir: {verb} its newest '
                      'checkpoint (or --step).')
  flags.DEFINE_integer('step', None, 'The checkpoint step in --workdir; default: the newest.')
  flags.DEFINE_string('storage', None, 'A federated run\'s shared storage root.')
  flags.DEFINE_integer('round', None, f'The global round of --storage to {verb}; default: the '
                       'newest committed one.')


def source_flags() -> dict:
  """The values of `define_source_flags`' flags, as keyword arguments."""
  f = flags.FLAGS
  return {'workdir': f.workdir, 'step': f.step, 'storage': f.storage, 'round_index': f['round'].value}
