"""bench/gpu_check.sh: its dry run does every stage at tiny sizes on the CPU and writes the
results file; bad arguments are one line before anything starts."""
import json
import math
import subprocess

import pytest

import conftest


def test_dry_run_does_every_stage_and_writes_one_results_file(repo_root, tmp_path):
  out = tmp_path / 'check'
  proc = subprocess.run(['bench/gpu_check.sh', '--dry-run', f'--out={out}'], cwd=repo_root,
                        capture_output=True, text=True, env=conftest.child_env(), timeout=240)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  results = json.loads((out / 'results.json').read_text())
  stages = results['stages']
  assert list(stages) == ['env', 'tests', 'federation', 'throughput']
  assert {s['status'] for s in stages.values()} == {'ok'}
  assert stages['env']['backend'] == 'cpu' and stages['env']['devices'] == 1
  assert stages['tests']['passed'] == 1 and stages['tests']['failed'] == []
  assert stages['federation']['rounds'] == 2
  losses = stages['federation']['eval_by_silo']
  assert sorted(losses) == ['text', 'web'] and all(4.0 < v < 9.0 for v in losses.values())
  (row,) = stages['throughput']['rows']
  assert row['remat'] == 'dots_no_batch' and row['tokens_per_s']['fedpt'] > 0
  assert math.isfinite(row['ratio']) and row['ratio'] > 0.3 and row['mfu'] is None  # CPU.
  assert results['targets']['min_ratio'] == row['ratio']
  assert results['targets']['mfu_1b_at_least_45%'] is None  # Not measured on a dry run.
  md = (out / 'results.md').read_text()
  assert '| federation | ok |' in md and '| tiny_dots_no_batch | ok |' in md


@pytest.mark.parametrize('args, expected', [
    (['--dry-run'], '--out is required'),
    (['--out=/tmp/x', '--budget-s=soon'], '--budget-s=soon is not a whole number'),
    (['--out=/tmp/x', '--gpus=2'], "unknown argument '--gpus=2'"),
    (['--out=/tmp/x', '--wheels=/nonexistent/wheels'], 'has no requirements.txt'),
])
def test_bad_arguments_are_one_line(repo_root, args, expected):
  proc = subprocess.run(['bench/gpu_check.sh', *args], cwd=repo_root, capture_output=True,
                        text=True, env=conftest.child_env(), timeout=60)
  assert proc.returncode == 2 and expected in proc.stderr, proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1


def test_wheels_script_refuses_bad_arguments(repo_root):
  proc = subprocess.run(['bench/gpu_wheels.sh', '/tmp/w', '--arch=arm'], cwd=repo_root,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2 and "unknown argument '--arch=arm'" in proc.stderr


@pytest.mark.parametrize('name', ['gpu_check.sh', 'gpu_wheels.sh'])
def test_bench_scripts_pass_shellcheck(repo_root, name):
  import test_launch  # pylint: disable=g-import-not-at-top
  result = subprocess.run([test_launch._shellcheck(), '--shell=bash', '--severity=style',  # pylint: disable=protected-access
                           repo_root / 'bench' / name], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr
