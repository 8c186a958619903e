"""Test setup: 8 fake CPU devices, set before anything imports jax.

FEDPT_TEST_DEVICES=1 gives one, as on a one-GPU machine: bench/gpu_check.sh's dry run
proves its test selection (`-m gpu`) passes there; tests that need a mesh of several
devices skip (`needs_devices`)."""
import atexit
import os
import shutil
import signal
import tempfile

# Tiny models compile for longer than they run, so LLVM's expensive passes are skipped, in
# this process and in every process a test starts (`child_env`): runs compared bit for bit
# are compiled alike.
CHILD_XLA_FLAGS = "--xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""),
    f"--xla_force_host_platform_device_count={os.environ.get('FEDPT_TEST_DEVICES', '8')}",
    CHILD_XLA_FLAGS
]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A suite started in the background of a non-interactive shell (CI, `cmd &`) inherits SIGINT
# ignored, and so would every process it starts: the Ctrl-C tests could not reach them.
# A handler, unlike SIG_IGN, is reset to the default in each child at exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
  signal.signal(signal.SIGINT, signal.default_int_handler)
# One persistent compilation cache for the session, inherited by every process a test
# starts: the tiny model's steps compile once, not once per silo, host and restart. A size
# cap turns on the cache's file lock, so concurrent processes never read a half-written
# entry. A fresh directory per session: nothing carries over between runs.
_CACHE = tempfile.mkdtemp(prefix="fedpt-test-jax-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def child_env(**overrides) -> dict:
  """This environment for a process with one CPU device (a silo, a script): less to compile
  than the 8 fake devices here, and the same compilation cache and XLA flags."""
  return {**os.environ, "XLA_FLAGS": CHILD_XLA_FLAGS, "JAX_PLATFORMS": "cpu", **overrides}


def needs_devices(n: int):
  """Skips a test whose mesh needs `n` devices where fewer exist (e.g. on one GPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  return pytest.mark.skipif(jax.device_count() < n, reason=f'needs {n} devices')


# The suite's longest files (federations, killed and restarted processes), longest first, by
# `pytest -n 2 --dist loadfile --durations=60` on the 2-core VM (2026-12-02). xdist's
# default queue puts the files with most tests first, which sent these single long tests
# last: one worker ran them alone for minutes while the other idled. Longest first, the
# short files fill in at the end.
LONGEST_FILES = (
    'test_fragments.py', 'test_federation.py', 'test_overlap.py', 'test_multihost.py',
    'test_secagg.py', 'test_trainer.py', 'test_integrity.py', 'test_study.py',
    'test_gpu_check.py', 'test_dp.py', 'test_muon.py', 'test_own_corpora.py', 'test_launch.py',
    'test_simulation.py', 'test_link.py', 'test_sparse_deltas.py', 'test_evaluate.py',
    'test_personal.py', 'test_model_only.py', 'test_member_gain.py', 'test_export_hf.py',
    'test_cli.py', 'test_loading.py', 'test_gcs.py', 'test_throughput.py', 'test_copies.py',
    'test_drift.py', 'test_compression.py', 'test_privacy.py', 'test_contribution.py',
    'test_downlink.py')


def pytest_configure(config):
  if hasattr(config.option, 'loadscopereorder'):  # pytest-xdist: keep the order below.
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable within a file.


@pytest.fixture(scope="session")
def repo_root():
  return REPO


@pytest.fixture(scope='session')
def corpus_dir(tmp_path_factory):
  """A small real-text corpus (stdlib sources) tokenised with the shipped tokenizer."""
  from fedpt import data  # pylint: disable=g-import-not-at-top
  out = tmp_path_factory.mktemp('corpus') / 'stdlib_small'
  docs = data.stdlib_documents('all')[:400]
  data.prepare_data(docs, data.default_tokenizer_path(), str(out), val_fraction=0.05)
  return str(out)


def load_config(name: str, corpus_dir: str):
  """configs/<name>.py on the small corpus, unlocked so tests can override fields."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(f'{name}_config', REPO / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.corpus = corpus_dir
  return config


@pytest.fixture
def tiny_config(corpus_dir):
  """configs/tiny.py on the small corpus."""
  return load_config('tiny', corpus_dir)


@pytest.fixture(scope='session')
def gcs_server(tmp_path_factory):
  """A real GCS-protocol server for the whole session; tests may stop and restart it."""
  from fedpt import gcs_emulator  # pylint: disable=g-import-not-at-top
  server = gcs_emulator.GcsEmulator(tmp_path_factory.mktemp('gcs')).start()
  with server.environment():
    yield server
  server.stop()


@pytest.fixture
def gcs_bucket(gcs_server, request):
  """A fresh, empty bucket for one test: gs://<name>."""
  import re  # pylint: disable=g-import-not-at-top
  import uuid  # pylint: disable=g-import-not-at-top
  name = re.sub(r'[^a-z0-9-]', '-', request.node.name.lower())[:40].strip('-')
  return gcs_server.create_bucket(f'{name}-{uuid.uuid4().hex[:8]}')

