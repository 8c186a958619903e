"""The module layout holds: one home per concept, no import circle, a pure protocol."""
import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _imports(path: pathlib.Path, top_level_only: bool) -> set[str]:
  """The fedpt modules `path` imports (top-level statements only, or anywhere)."""
  tree = ast.parse(path.read_text())
  nodes = tree.body if top_level_only else list(ast.walk(tree))
  out = set()
  for node in nodes:
    if isinstance(node, ast.ImportFrom) and node.module == 'fedpt':
      out |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith('fedpt.'):
      out.add(node.module.split('.')[1])
    elif isinstance(node, ast.Import):
      out |= {a.name.split('.')[1] for a in node.names if a.name.startswith('fedpt.')}
  return out


MODULES = {p.stem: p for p in (REPO / 'fedpt').glob('*.py') if p.stem != '__init__'}


def _graph(top_level_only: bool) -> dict[str, set[str]]:
  return {name: _imports(path, top_level_only) & set(MODULES) for name, path in MODULES.items()}


def test_no_import_circle():
  graph = _graph(top_level_only=True)
  state = {}

  def visit(node, stack):
    state[node] = 'open'
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 'open':
        pytest.fail(f'import circle: {" -> ".join(stack + [node, nxt])}')
      if nxt not in state:
        visit(nxt, stack + [node])
    state[node] = 'done'
  for name in sorted(graph):
    if name not in state:
      visit(name, [])


def test_only_entry_points_and_the_simulation_import_the_silo_worker():
  importers = sorted(name for name, deps in _graph(top_level_only=False).items()
                     if 'silo' in deps)
  assert importers in ([], ['simulation']), importers
  scripts = {p.name for p in (REPO / 'scripts').glob('*.py')
             if 'silo' in _imports(p, top_level_only=False)}
  assert scripts == {'train.py', 'personalize.py'}, scripts


def test_the_protocol_is_pure():
  assert _imports(MODULES['protocol'], top_level_only=False) <= {
      'compression', 'config', 'copies', 'errors', 'fragments', 'outer', 'records', 'secagg',
      'trees'}
  assert _imports(MODULES['records'], top_level_only=False) <= {'config', 'errors'}
  assert _imports(MODULES['secagg'], top_level_only=False) == set()  # Crypto and numpy only.
  assert _imports(MODULES['copies'], top_level_only=False) == set()  # Numpy only.
  for module in ('protocol', 'secagg', 'copies'):
    source = MODULES[module].read_text()
    for io in ('RunStorage', 'epath', 'open(', 'jax.device'):
      assert io not in source, (module, io)


def test_the_bucket_layer_needs_no_round_math():
  graph, seen, todo = _graph(top_level_only=True), set(), ['storage']
  while todo:
    for dep in graph[todo.pop()] - seen:
      seen.add(dep)
      todo.append(dep)
  assert not seen & {'outer', 'protocol', 'silo', 'aggregator', 'trainer'}, seen


def test_every_user_error_shares_one_base():
  from fedpt import cli  # pylint: disable=g-import-not-at-top
  from fedpt import errors  # pylint: disable=g-import-not-at-top
  import importlib  # pylint: disable=g-import-not-at-top
  classes = []
  for name in MODULES:
    module = importlib.import_module(f'fedpt.{name}')
    classes += [v for k, v in vars(module).items() if isinstance(v, type)
                and issubclass(v, Exception) and k.endswith('Error')
                and v.__module__ == module.__name__]
  assert len(classes) >= 15
  assert all(issubclass(c, errors.UserError) for c in classes), [
      c for c in classes if not issubclass(c, errors.UserError)]
  assert 'USER_ERRORS' not in vars(cli)
  # cli knows the config schema (--print_config, typo lines) but no module's error classes.
  assert _imports(MODULES['cli'], top_level_only=False) == {'errors', 'config'}
  assert _imports(MODULES['config'], top_level_only=False) == {'errors'}
