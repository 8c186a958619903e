r"""The GPU check's stages, each its own process under a deadline: bench/gpu_check.sh runs it.

  env         jax's version, backend and devices.
  tests       `pytest -m gpu` (model numerics, trainer, federation) on the accelerator.
  throughput  bench/throughput.py: fedpt's step beside the floor at the 150m and 1b configs
              (bf16, cuDNN attention), once per remat policy; a policy that does not fit
              fails alone. Tokens/s, MFU, peak memory against plan.py's estimate.
  federation  a 2-silo demo federation (scripts/simulate.py) with the silos on the GPU.

Writes <out>/results.json and <out>/results.md as each stage lands, so a check cut short
keeps what it measured. --dry_run runs every stage at tiny sizes on the CPU (CI's proof
that the script works, under a minute). No stage imports jax here: each child owns the
accelerator alone (XLA preallocates most of its memory).
"""
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_string('out', None, 'Folder for results.json, results.md and the stage logs.')
flags.DEFINE_bool('dry_run', False, 'Every stage at tiny sizes on the CPU (CI).')
flags.DEFINE_float('budget_s', 480.0, 'Wall-clock budget of the whole check; stages that '
                   'would start past it are skipped, and say so.')
flags.mark_flag_as_required('out')
FLAGS = flags.FLAGS

TEST_FILES = ('tests/test_model.py', 'tests/test_trainer.py', 'tests/test_federation.py')
# (config file, overrides, remat policies): a realistic per-GPU batch at the paper's lengths.
GPU_SIZES = (  # 1b first: its MFU is the target, and rows past the budget are skipped.
    ('configs/1b.py', {'data.global_batch': 8, 'data.seq_len': 2048, 'inner.grad_accum': 1},
     ('none', 'dots_no_batch', 'full')),
    ('configs/150m.py', {'data.global_batch': 16, 'data.seq_len': 1024},
     ('none', 'dots_no_batch')),
)
DRY_SIZES = (('configs/tiny.py', {}, ('dots_no_batch',)),)
TARGETS = {'mfu_1b': 0.45, 'ratio': 0.97, 'memory_over_plan': 0.10}


class Check:
  """Runs stages as child processes and keeps results.json current."""

  def __init__(self, out: str, dry_run: bool, budget_s: float):
    self.out, self.dry_run, self.budget_s = os.path.abspath(out), dry_run, budget_s
    os.makedirs(self.out, exist_ok=True)
    self.started = time.monotonic()
    self.results = {
        'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'host': platform.node(), 'mode': 'dry run (CPU, tiny)' if dry_run else 'GPU',
        'python': platform.python_version(), 'stages': {}}
    self.env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
    if dry_run:
      self.env.update(JAX_PLATFORMS='cpu', FEDPT_TEST_DEVICES='1')
    else:
      self.env.setdefault('JAX_PLATFORMS', 'cuda')

  def left_s(self) -> float:
    return self.budget_s - (time.monotonic() - self.started)

  def child(self, name: str, argv: list, timeout_s: float, env=None) -> dict:
    """Runs argv from the repo root; its output goes to <out>/logs/<name>.log."""
    os.makedirs(os.path.join(self.out, 'logs'), exist_ok=True)
    log = os.path.join(self.out, 'logs', f'{name}.log')
    timeout_s = min(timeout_s, self.left_s())
    if timeout_s < 5:
      return {'status': 'skipped', 'reason': 'the check\'s time budget was spent'}
    start = time.monotonic()
    with open(log, 'w') as f:
      f.write('$ ' + ' '.join(argv) + '\n')
      f.flush()
      try:
        rc = subprocess.run(argv, cwd=REPO, env=env or self.env, stdout=f,
                            stderr=subprocess.STDOUT, timeout=timeout_s).returncode
      except subprocess.TimeoutExpired:
        rc = None
    with open(log) as f:
      tail = [line.rstrip() for line in f.readlines()[-3:]]
    seconds = round(time.monotonic() - start, 1)
    status = 'ok' if rc == 0 else 'timeout' if rc is None else f'failed (exit {rc})'
    return {'status': status, 'seconds': seconds, 'log': os.path.relpath(log, self.out),
            **({} if rc == 0 else {'last_lines': tail})}

  def save(self):
    with open(os.path.join(self.out, 'results.json'), 'w') as f:
      json.dump(self.results, f, indent=1)
    with open(os.path.join(self.out, 'results.md'), 'w') as f:
      f.write(markdown(self.results))

  def stage(self, name: str, fn):
    print(f'gpu_check: {name} ...', flush=True)
    self.results['stages'][name] = result = fn()
    self.save()
    print(f'gpu_check: {name}: {result["status"]} ({time.monotonic() - self.started:.0f}s in)',
          flush=True)

  # -- stages ------------------------------------------------------------------------------

  def run_env(self) -> dict:
    code = ('import json, jax; d = jax.devices(); print(json.dumps({"jax": jax.__version__, '
            '"backend": jax.default_backend(), "devices": len(d), "device_kind": '
            'd[0].device_kind, "memory_bytes": (d[0].memory_stats() or {}).get("bytes_limit")}))')
    result = self.child('env', [sys.executable, '-c', code], 120)
    found = []
    if 'log' in result:
      with open(os.path.join(self.out, result['log'])) as f:
        found = [json.loads(line) for line in f if line.startswith('{')]
    return {**result, **(found[0] if found else {})}

  def run_tests(self) -> dict:
    xml = os.path.join(self.out, 'tests.xml')
    argv = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-m', 'gpu',
            f'--junitxml={xml}', *(TEST_FILES[:1] if self.dry_run else TEST_FILES)]
    if self.dry_run:  # One real test: the selection is collected, the machinery works.
      argv += ['-k', 'test_causal_future_tokens_do_not_change_past_logits']
    result = self.child('tests', argv, 120 if self.dry_run else 150)
    if os.path.exists(xml):
      result.update(junit_counts(xml))
    return result

  def run_throughput(self) -> dict:
    rows = []
    for path, overrides, remats in DRY_SIZES if self.dry_run else GPU_SIZES:
      for remat in remats:
        name = f'{os.path.basename(path)[:-3]}_{remat}'
        json_out = os.path.join(self.out, f'throughput_{name}.json')
        argv = [sys.executable, 'bench/throughput.py', '--sizes=', f'--config={path}',
                f'--config.model.remat={remat}', f'--json_out={json_out}',
                *[f'--config.{k}={v}' for k, v in overrides.items()],
                *(['--steps=2', '--trials=1', '--min_trial_s=0.3'] if self.dry_run
                  else ['--steps=5', '--trials=2', '--min_trial_s=2'])]
        result = self.child(f'throughput_{name}', argv, 120)
        if result['status'] == 'ok':
          with open(json_out) as f:
            result.update(json.load(f)[0])
        rows.append({'config': name, **result})
    ok = [r for r in rows if r['status'] == 'ok']
    return {'status': 'ok' if ok else 'failed', 'rows': rows}

  def run_federation(self) -> dict:
    workdir = os.path.join(self.out, 'federation')
    config = 'configs/tiny.py' if self.dry_run else 'configs/demo.py'
    argv = [sys.executable, 'scripts/simulate.py', f'--config={config}', f'--workdir={workdir}',
            "--config.federation.silos=('web','text')",
            f'--config.federation.rounds={2 if self.dry_run else 4}']
    if self.dry_run:
      argv += ['--config.federation.inner_steps=2', '--config.train.eval_batches=1']
    # Two silos and an aggregator share one GPU: each takes memory as it needs it.
    env = {**self.env, 'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'}
    result = self.child('federation', argv, 180, env=env)
    rounds_file = os.path.join(workdir, 'rounds.jsonl')
    if os.path.exists(rounds_file):
      with open(rounds_file) as f:
        rounds = [json.loads(line) for line in f if line.strip()]
      result['rounds'] = len(rounds)
      result['eval_by_silo'] = rounds[-1].get('eval_loss_by_silo') if rounds else None
    return result

  def run(self) -> dict:
    self.stage('env', self.run_env)
    self.stage('tests', self.run_tests)
    self.stage('federation', self.run_federation)
    self.stage('throughput', self.run_throughput)  # Last: it takes what time is left.
    self.results['seconds'] = round(time.monotonic() - self.started, 1)
    self.results['targets'] = targets(self.results['stages'].get('throughput', {}))
    self.save()
    return self.results


def junit_counts(path: str) -> dict:
  suite = ET.parse(path).getroot()
  suite = suite if suite.tag == 'testsuite' else suite.find('testsuite')
  failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter('testcase')
            if case.find('failure') is not None or case.find('error') is not None]
  return {'tests': int(suite.get('tests')), 'failed': failed,
          'skipped': int(suite.get('skipped', 0)),
          'passed': int(suite.get('tests')) - len(failed) - int(suite.get('skipped', 0))}


def targets(throughput: dict) -> dict:
  """issue 17's GPU targets, from the rows that ran: met, missed or not measured (None)."""
  rows = [r for r in throughput.get('rows', []) if r['status'] == 'ok']
  one_b = [r for r in rows if r['config'].startswith('1b') and r.get('mfu')]
  memory = [abs(r['peak_over_plan'] - 1) for r in rows if r.get('peak_over_plan')]
  return {
      'best_1b_mfu': max((r['mfu']['fedpt'] for r in one_b), default=None),
      'mfu_1b_at_least_45%': (max(r['mfu']['fedpt'] for r in one_b) >= TARGETS['mfu_1b']
                              if one_b else None),
      'min_ratio': min((r['ratio'] for r in rows), default=None),
      'ratio_at_least_0.97': min(r['ratio'] for r in rows) >= TARGETS['ratio'] if rows else None,
      'memory_within_10%_of_plan': (max(memory) <= TARGETS['memory_over_plan']
                                    if memory else None),
  }


def markdown(results: dict) -> str:
  stages = results['stages']
  env = stages.get('env', {})
  lines = [f"# fedpt GPU check ({results['mode']}), {results['date']}", '',
           f"{env.get('device_kind', '?')} x {env.get('devices', '?')}, jax {env.get('jax', '?')}"
           f", backend {env.get('backend', '?')}, Python {results['python']}", '',
           '| stage | status | seconds | detail |', '|---|---|---|---|']
  for name, s in stages.items():
    if name == 'tests' and 'tests' in s:
      detail = f"{s['passed']} passed, {len(s['failed'])} failed, {s['skipped']} skipped"
    elif name == 'federation' and s.get('eval_by_silo'):
      detail = f"{s['rounds']} rounds; held-out loss by silo {s['eval_by_silo']}"
    else:
      detail = '; '.join(s.get('last_lines', [])) or s.get('reason', '')
    lines.append(f"| {name} | {s.get('status')} | {s.get('seconds', '')} | {detail} |")
  rows = stages.get('throughput', {}).get('rows', [])
  if rows:
    lines += ['', '| config | status | params | batch x seq | dtype | attention | remat | '
              'fedpt tokens/s | floor tokens/s | fedpt/floor | MFU fedpt | peak / plan |',
              '|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
      if r['status'] != 'ok':
        lines.append(f"| {r['config']} | {r['status']} |" + ' |' * 10)
        continue
      mfu = f"{r['mfu']['fedpt']:.1%}" if r.get('mfu') else 'n/a'
      mem = f"{r['peak_over_plan']:.2f}" if r.get('peak_over_plan') else 'n/a'
      lines.append(
          f"| {r['config']} | ok | {r['params'] / 1e6:.1f}M | {r['batch']} x {r['seq_len']} | "
          f"{r['compute_dtype']} | {r['attention']} | {r['remat']} | "
          f"{r['tokens_per_s']['fedpt']:,.0f} | {r['tokens_per_s'][r['floor']]:,.0f} | "
          f"{r['ratio']:.3f} | {mfu} | {mem} |")
  if 'targets' in results:
    fmt = lambda v: f'{v:.3f}' if isinstance(v, float) else str(v)
    lines += ['', 'Targets: ' + ', '.join(f'{k} = {fmt(v)}'
                                          for k, v in results['targets'].items())]
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  if re.search(r'\s', FLAGS.out):
    print(f'gpu_check: --out={FLAGS.out!r} has whitespace. Fix: choose a plain path',
          file=sys.stderr)
    sys.exit(2)
  results = Check(FLAGS.out, FLAGS.dry_run, FLAGS.budget_s).run()
  print(markdown(results))
  failed = [n for n, s in results['stages'].items() if s.get('status') not in ('ok', None)]
  print(f'gpu_check: results in {os.path.join(os.path.abspath(FLAGS.out), "results.json")}'
        + (f'; stages not ok: {", ".join(failed)}' if failed else ''))
  sys.exit(1 if failed else 0)


if __name__ == '__main__':
  app.run(main)
