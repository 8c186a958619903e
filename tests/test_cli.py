"""What every entry point shares (fedpt/cli.py): one-line flag errors and --print_config."""
import json
import re
import subprocess
import sys

import pytest

import conftest
from fedpt import aggregator as aggregator_lib
from fedpt import config as config_lib
from fedpt import loading

TINY = str(conftest.REPO / 'configs' / 'tiny.py')


def _run(script, *args):
  return subprocess.run([sys.executable, str(conftest.REPO / script), *map(str, args)],
                        capture_output=True, text=True, timeout=180, check=False,
                        env=conftest.child_env())


@pytest.mark.parametrize('override, expected', [
    ('--config.inner.lrr=1', 'error: --config.inner.lrr: no such config field. Did you mean '
     'inner.lr?'),
    ('--config.innr.lr=1', 'error: --config.innr.lr: no such config field. Did you mean '
     'inner.lr?'),
    ('--config.model.num_layers=3', 'error: --config.model.num_layers: no such config field. '
     'Did you mean model.n_layers?'),
    ('--config.lr=1', 'error: --config.lr: no such config field. Did you mean inner.lr, '
     'outer.lr or personal.lr?'),
    ('--config.inner.lr.x=1', 'error: --config.inner.lr.x: no such config field: inner.lr is a '
     'float, not a group of fields'),
    ('--config.inner.lr=abc', 'error: --config.inner.lr=abc: must be a finite number. Fix: e.g. '
     '--config.inner.lr=0.003'),
    ('--config.model.n_layers=2.5', 'error: --config.model.n_layers=2.5: must be an integer.'),
    ('--config.model.tie_embeddings=maybe', 'error: --config.model.tie_embeddings=maybe: must '
     'be True or False.'),
    ('--config.inner=3', 'error: --config.inner=3: inner is a group of fields, not a value.'),
    ('--wokdir=x', "error: bad command-line flag: Unknown command line flag 'wokdir'."),
])
def test_a_bad_flag_is_one_clean_line(override, expected, tmp_path):
  done = _run('scripts/train.py', f'--config={TINY}', f'--workdir={tmp_path / "w"}', override)
  assert done.returncode == 2, done.stderr
  assert done.stderr.strip().startswith(expected), done.stderr
  assert len(done.stderr.strip().splitlines()) == 1 and '"' not in done.stderr, done.stderr
  assert not (tmp_path / 'w').exists()


def test_an_override_without_its_config_file_says_so(tmp_path):
  done = _run('scripts/evaluate.py', f'--out={tmp_path}', '--config.data.corpus=x')
  assert done.returncode == 2 and done.stderr.strip() == (
      'error: --config.data.corpus: an override needs the config file it changes. Fix: pass '
      '--config=configs/<name>.py before it'), done.stderr


def test_a_missing_required_flag_is_named_with_its_help():
  done = _run('scripts/status.py')
  assert done.returncode == 2 and done.stderr.strip() == (
      'error: --storage is missing. Fix: pass --storage=... (Shared storage root of the run)'), (
          done.stderr)


def _scripts_with_a_config_flag() -> set[str]:
  return {str(p.relative_to(conftest.REPO))
          for folder in ('scripts', 'bench') for p in (conftest.REPO / folder).glob('*.py')
          if 'DEFINE_config_file(' in p.read_text()}


def test_print_config_on_every_script_prints_the_resolved_config_and_does_nothing(
    tiny_config, tmp_path):
  # A run created with inner.lr=0.02: its contract wins over configs/tiny.py's 0.003.
  tiny_config.inner.lr = 0.02
  bucket = tmp_path / 'bucket'
  aggregator_lib.init_run(tiny_config, str(bucket))
  recorded = tmp_path / 'recorded'  # A plain run's workdir that recorded its config.
  loading.write_config_record(str(recorded), config_lib.flat(tiny_config))
  new = tmp_path / 'new'  # Every path a command would create: none may appear.
  usage = '--config.train.log_every=7'  # A field every command lets the user set.
  cases = {  # script: (arguments, inner.lr it runs with)
      'scripts/train.py': ([f'--workdir={new}/train'], 0.003),
      'scripts/init_run.py': ([f'--storage={new}/bucket'], 0.003),
      'scripts/simulate.py': ([f'--workdir={new}/sim', f'--storage={bucket}'], 0.02),
      'scripts/plan.py': (['--mesh=fsdp=2'], 0.003),
      'scripts/evaluate.py': ([f'--storage={bucket}', f'--eval_set=x={new}/x',
                               f'--out={new}/eval'], 0.02),
      'scripts/sample.py': ([f'--storage={bucket}'], 0.02),
      'scripts/export_hf.py': ([f'--storage={bucket}', f'--out={new}/hf'], 0.02),
      'scripts/personalize.py': ([f'--workdir={new}/p', '--silo=web', f'--storage={bucket}'],
                                 0.02),
      'scripts/member_gain.py': ([f'--storage={bucket}', '--silo=web', f'--eval_set={new}/x',
                                  f'--out={new}/gain'], 0.003),  # Scores: --config's usage.
      'scripts/prepare_silos.py': ([f'--workdir={new}/ps', f'--silo_data=a={new}/a.txt'], 0.003),
      'scripts/watermark.py': ([f'--workdir={new}/wm', '--verify', f'--storage={bucket}'], 0.02),
      'bench/contribution.py': ([], 0.003),
      'bench/round_overhead.py': ([], 0.003),
      'bench/secagg_overhead.py': ([], 0.003),
      'bench/study.py': ([f'--out={new}/study'], 0.003),
      'bench/throughput.py': ([], 0.003),
      'bench/unlearning.py': ([], 0.003),
  }
  assert set(cases) == _scripts_with_a_config_flag()  # A new script is added here too.
  for script, (args, lr) in cases.items():
    done = _run(script, f'--config={TINY}', *args, usage, '--print_config')
    assert done.returncode == 0, (script, done.stderr)
    config = json.loads(done.stdout)
    assert config['train.log_every'] == 7 and config['inner.lr'] == lr, script
    assert config['model.vocab_size'] == tiny_config.model.vocab_size, script
    if script == 'scripts/plan.py':
      assert config['mesh.fsdp'] == 2
  assert not new.exists()

  # A workdir's recorded config needs no --config; a typed change to the run is refused.
  done = _run('scripts/train.py', f'--workdir={recorded}', '--print_config')
  assert done.returncode == 0 and json.loads(done.stdout)['inner.lr'] == 0.02, done.stderr
  done = _run('scripts/train.py', f'--config={TINY}', f'--workdir={recorded}',
              '--config.inner.lr=0.5', '--print_config')
  assert done.returncode == 2 and re.match(r'error: .* inner\.lr=0\.5 \(yours\) vs 0\.02',
                                           done.stderr), done.stderr
  assert sorted(p.name for p in recorded.iterdir()) == ['config.json']
