"""Test setup: 8 fake CPU devices, set before anything imports jax."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


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


@pytest.fixture
def tiny_config(corpus_dir):
  """configs/tiny.py on the small corpus, unlocked so tests can override fields."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('tiny_config', REPO / 'configs' / 'tiny.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.corpus = corpus_dir
  return config
