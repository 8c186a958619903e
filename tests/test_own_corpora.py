"""Each silo its own corpus: simulate.py --silo_data, fedpt/corpora.py, real processes."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import conftest
from fedpt import corpora
from fedpt import data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'tiny.py')


def _alpha_docs():
  return [''.join(f'def alpha_{i}_{j}(x):\n    return x * {i} + {j}\n' for j in range(12))
          for i in range(40)]


def _beta_docs():
  return [''.join(f'The river {i} flows past hill {j}, and the birds sing.\n' for j in range(10))
          for i in range(30)]


@pytest.fixture(scope='module')
def sources(tmp_path_factory):
  """alpha: a JSONL file; beta: a directory of text files; gamma: a dir prepared with --val."""
  root = tmp_path_factory.mktemp('sources')
  with open(root / 'alpha.jsonl', 'w', encoding='utf-8') as f:
    for doc in _alpha_docs():
      f.write(json.dumps({'text': doc}) + '\n')
  (root / 'beta' / 'sub').mkdir(parents=True)
  for i, doc in enumerate(_beta_docs()):
    (root / 'beta' / ('sub' if i % 2 else '') / f'doc{i:02d}.txt').write_text(doc)
  data.prepare_data(
      [''.join(f'SELECT c{j} FROM t{j % 7} WHERE id = {j};\n' for j in range(200))],
      data.default_tokenizer_path(), str(root / 'gamma'),
      val_documents=[''.join(f'SELECT v{j} FROM o{j % 5};\n' for j in range(60))])
  return {'alpha': str(root / 'alpha.jsonl'), 'beta': str(root / 'beta'),
          'gamma': str(root / 'gamma')}


def _simulate(workdir, *args, timeout=600):
  return subprocess.run(
      [sys.executable, os.path.join(REPO, 'scripts', 'simulate.py'), f'--config={TINY}',
       f'--workdir={workdir}', *args],
      cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
      # One CPU device per child, not the test process's 8 fake ones: less to compile.
      env=conftest.child_env())


def _silo_data(sources):
  return ','.join(f'{name}={path}' for name, path in sources.items())


RUN_ARGS = ('--config.federation.rounds=1', '--config.federation.inner_steps=2',
            '--config.federation.poll_s=0.2', '--config.train.eval_batches=1', '--baselines')


@pytest.fixture(scope='module')
def simulated(sources, tmp_path_factory):
  """One 3-silo federation, 1 round of 2 steps, with its isolated baselines, for every assertion."""
  workdir = tmp_path_factory.mktemp('sim') / 'w'
  result = _simulate(workdir, f'--silo_data={_silo_data(sources)}', *RUN_ARGS)
  assert result.returncode == 0, result.stdout + result.stderr
  return workdir, result


def _documents(data_dir, split):
  """The token lists of a prepared split's documents (each ends with EOS)."""
  meta = json.loads(open(os.path.join(data_dir, 'meta.json'), encoding='utf-8').read())
  tokens = np.fromfile(os.path.join(data_dir, f'{split}.bin'), dtype=meta['dtype']).tolist()
  docs, start = [], 0
  for i, t in enumerate(tokens):
    if t == meta['eos_id']:
      docs.append(tokens[start:i])
      start = i + 1
  assert start == len(tokens)
  return docs, meta


@pytest.mark.slow
def test_each_silo_trains_on_exactly_its_own_corpus(simulated, sources):
  workdir, result = simulated
  tokenizer = data.load_tokenizer(data.default_tokenizer_path())
  expected = {'alpha': _alpha_docs(), 'beta': _beta_docs()}
  for silo, docs in expected.items():
    corpus = workdir / 'data' / silo
    train, meta = _documents(corpus, 'train')
    val, _ = _documents(corpus, 'val')
    assert train and val
    want = [tokenizer.encode(d) for d in docs]
    assert sorted(train + val) == sorted(want)
    assert (meta['splits']['train']['tokens'] + meta['splits']['val']['tokens']
            == sum(len(t) + 1 for t in want))
  assert 'rounds' not in result.stderr
  assert 'round   0 | train alpha' in result.stdout
  for silo, path in sources.items():
    corpus = str(workdir / 'data' / silo) if silo != 'gamma' else path
    recorded = json.loads((workdir / 'silos' / silo / 'config.json').read_text())
    assert recorded['data.corpus'] == corpus, recorded
    log = (workdir / 'logs' / f'silo_{silo}.log').read_text()
    assert f'--config.data.corpus={corpus} ' in log and f'silo {silo}: round 0 published' in log
    # Its isolated baseline trained alone on the same corpus, and the member-gain report
    # scored every model on that silo's own held-out split.
    base = json.loads((workdir / 'baselines' / silo / 'config.json').read_text())
    assert base['data.corpus'] == corpus and base['train.steps'] == 2, base
  gain = json.loads((workdir / 'member_gain' / 'member_gain.json').read_text())
  tokens = {r['silo']: r['tokens'] for r in gain['rows']}
  for silo, path in sources.items():
    corpus = str(workdir / 'data' / silo) if silo != 'gamma' else path
    val = data.TokenDataset(corpus, 'val')
    assert tokens[silo] == val.scored_tokens(64), silo  # configs/tiny.py: seq_len 64.
  assert len(set(tokens.values())) == 3  # Three different held-out splits, not one.
  assert all(r['baseline_steps'] == r['silo_steps'] == 2 for r in gain['rows'])
  run = json.loads((workdir / 'bucket' / 'run.json').read_text())
  assert [s['id'] for s in run['silos']] == ['alpha', 'beta', 'gamma']
  assert run['tokenizer_sha256'] == data.file_sha256(data.default_tokenizer_path())
  assert 'corpus' not in json.dumps(run)  # A party field: the run records only the hash.


@pytest.mark.slow
def test_a_rerun_reuses_the_prepared_corpora(simulated, sources):
  workdir, _ = simulated
  before = {p: os.stat(p).st_mtime_ns for p in (workdir / 'data').rglob('*')}
  result = _simulate(workdir, f'--silo_data={_silo_data(sources)}', *RUN_ARGS)
  assert result.returncode == 0, result.stderr
  assert 'is finished' in result.stdout and 'tokenising' not in result.stdout
  assert before == {p: os.stat(p).st_mtime_ns for p in (workdir / 'data').rglob('*')}


def test_a_changed_source_is_tokenised_again(tmp_path):
  config = corpora_config(seq_len=16)
  src = tmp_path / 'a.jsonl'
  src.write_text(''.join(json.dumps({'text': f'x = {i} * {i}\n' * 5}) + '\n' for i in range(30)))
  lines = []
  dirs, _ = corpora.prepare(config, {'a': str(src)}, str(tmp_path / 'w'), log=lines.append)
  first = json.loads(open(os.path.join(dirs['a'], 'meta.json')).read())['splits']
  corpora.prepare(config, {'a': str(src)}, str(tmp_path / 'w'), log=lines.append)
  assert sum('tokenising' in line for line in lines) == 1  # Cached.
  with open(src, 'a', encoding='utf-8') as f:
    f.write(json.dumps({'text': 'y = 1\n' * 40}) + '\n')
  corpora.prepare(config, {'a': str(src)}, str(tmp_path / 'w'), log=lines.append)
  assert sum('tokenising' in line for line in lines) == 2
  again = json.loads(open(os.path.join(dirs['a'], 'meta.json')).read())['splits']
  assert (sum(s['documents'] for s in again.values())
          == sum(s['documents'] for s in first.values()) + 1)


def corpora_config(seq_len=16, vocab_size=4096, silos=('a',)):
  from fedpt import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.base_config()
  config.data.seq_len = seq_len
  config.model.vocab_size = vocab_size
  config.federation.silos = silos
  return config


def test_a_trained_tokenizer_serves_every_silo_and_is_cached(tmp_path, sources):
  config = corpora_config(vocab_size=400, silos=('alpha', 'beta'))
  silo_data = {'alpha': sources['alpha'], 'beta': sources['beta']}
  lines = []
  dirs, model = corpora.prepare(config, silo_data, str(tmp_path), tokenizer='train',
                                log=lines.append)
  assert model == str(tmp_path / 'tokenizer' / 'sp.model')
  assert data.load_tokenizer(model).get_piece_size() == 400
  sha = data.file_sha256(model)
  for silo in silo_data:
    assert json.loads(open(os.path.join(dirs[silo], 'meta.json')).read())[
        'tokenizer_sha256'] == sha
  corpora.prepare(config, silo_data, str(tmp_path), tokenizer='train', log=lines.append)
  assert sum('training' in line for line in lines) == 1
  # A prepared dir of another tokenizer (gamma: the shipped one) is refused with both hashes.
  shipped = data.file_sha256(data.default_tokenizer_path())
  config.federation.silos = ('alpha', 'gamma')
  with pytest.raises(corpora.CorpusError, match=rf"silo 'gamma': .* sha256 {shipped[:12]}.*"
                     rf"{sha[:12]}.*Fix: prepare its text again"):
    corpora.prepare(_with_tokenizer(config, model),
                    {'alpha': sources['alpha'], 'gamma': sources['gamma']},
                    str(tmp_path / 'other'), log=lines.append)


def _with_tokenizer(config, model):
  config = config.copy_and_resolve_references()
  config.data.tokenizer = model
  return config


def _bad_cases(sources, tmp_path):
  one_doc = tmp_path / 'one.txt'
  one_doc.write_text('just one document\n' * 20)
  return {
      'missing file': ([f'--silo_data=alpha={sources["alpha"]},beta={tmp_path}/nope.txt'],
                       f"error: --silo_data: silo 'beta': {tmp_path}/nope.txt does not exist"),
      'unknown silo': ([f'--silo_data=alpha={sources["alpha"]},zeta={sources["beta"]}',
                        "--config.federation.silos=('alpha','beta')"],
                       "error: --silo_data names silo 'zeta', which is not one of the run's"),
      'duplicate': ([f'--silo_data=alpha={sources["alpha"]}', f'--silo_data=alpha={sources["beta"]}'],
                    "error: --silo_data names silo 'alpha' twice"),
      'no data': ([f'--silo_data=alpha={sources["alpha"]}',
                   "--config.federation.silos=('alpha','beta')"],
                  "error: silo 'beta' has no --silo_data while the others have"),
      'empty val': ([f'--silo_data=alpha={sources["alpha"]},one={one_doc}'],
                    f"error: silo 'one' ({one_doc}): The val split would be empty"),
  }


def test_bad_silo_data_is_one_line_and_starts_nothing(sources, tmp_path):
  for case, (args, line) in _bad_cases(sources, tmp_path).items():
    workdir = tmp_path / case.replace(' ', '_')
    result = _simulate(workdir, *args, timeout=120)
    assert result.returncode == 2, (case, result.stdout, result.stderr)
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(line), (
        case, result.stderr)
    assert not (workdir / 'logs').exists() and not (workdir / 'bucket').exists(), case
    assert not (workdir / 'keys').exists(), case
