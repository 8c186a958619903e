"""The README's commands run as written: the Quickstart is what CI runs."""
import re
import shlex
import subprocess
import sys

import conftest


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


def _section_block(readme: str, title: str) -> list[str]:
  """The first bash block of section `title`, one command per entry (continuations joined)."""
  section = readme.split(f'## {title}', 1)[1].split('\n## ', 1)[0]
  block = re.search(r'```bash\n(.*?)```', section, re.S).group(1)
  return [c.split('  #')[0].strip() for c in block.replace('\\\n', ' ').splitlines() if c.strip()]


def test_the_first_training_command_runs_as_written_on_one_cpu_device(repo_root, tmp_path):
  """The README promises any machine with Python: no mesh that needs several devices."""
  [command] = _section_block((repo_root / 'README.md').read_text(), 'Training one silo')
  argv = shlex.split(command.replace('--workdir=/tmp/tiny', f'--workdir={tmp_path / "tiny"}'))
  assert argv[:2] == ['python3', 'scripts/train.py'], command
  done = subprocess.run([sys.executable, *argv[1:]], cwd=repo_root, capture_output=True,
                        text=True, timeout=600, check=False, env=conftest.child_env())
  assert done.returncode == 0, done.stderr[-2000:]
  assert 'stopped at step 100' in done.stdout
  assert re.search(r'; eval loss \d+\.\d{4}; ', done.stdout), done.stdout[-500:]
  assert (tmp_path / 'tiny' / 'checkpoints' / '100').is_dir()


def test_the_key_commands_make_each_partys_own_key(repo_root, tmp_path):
  commands = [c for c in _section_block((repo_root / 'README.md').read_text(), 'Federated runs')
              if 'scripts/keys.py' in c]
  assert any('--names=aggregator' in c for c in commands)
  assert any('--names=silo_web' in c for c in commands)  # Silos make their own too.
  for command in commands:
    argv = shlex.split(command.replace('~/keys', str(tmp_path / 'operator')).replace(
        '/private/keys', str(tmp_path / 'web')))
    done = subprocess.run([sys.executable, *argv[1:]], cwd=repo_root, capture_output=True,
                          text=True, timeout=120, check=False, env=conftest.child_env())
    assert done.returncode == 0, done.stderr
  assert (tmp_path / 'operator' / 'aggregator.key').stat().st_mode & 0o777 == 0o600
  assert (tmp_path / 'web' / 'silo_web.key').stat().st_mode & 0o777 == 0o600
  assert (tmp_path / 'web' / 'silo_web.pub').read_text().startswith('-----BEGIN PUBLIC KEY')
