"""The README's Quickstart is what CI runs."""
import re


def _quickstart_commands(readme: str) -> list[str]:
  section = readme.split('## Quickstart', 1)[1].split('\n## ', 1)[0]
  block = re.search(r'```bash\n(.*?)```', section, re.S).group(1)
  return [line for line in block.splitlines() if line.strip()]


def test_quickstart_has_two_commands_and_ci_runs_the_second(repo_root):
  commands = _quickstart_commands((repo_root / 'README.md').read_text())
  assert len(commands) == 2, commands
  assert 'scripts/train.py' in commands[0] or 'scripts/simulate.py' in commands[0]
  ci_lines = [l for l in (repo_root / '.ci' / 'run').read_text().splitlines()
              if l.strip() and not l.startswith(('#', 'set ', 'cd '))]
  assert ci_lines == [commands[1]]
