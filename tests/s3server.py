"""A real S3-compatible server on 127.0.0.1 for the tests: moto's server mode, started once per
session in a thread, on a free port. Import the fixtures into a test module::

    from s3server import s3, s3_server  # noqa: F401  (pytest fixtures)

``s3`` points the environment at the server for one test (``AWS_ENDPOINT_URL``, fake
credentials, a region: what botocore reads itself, so emtile passes no option) and gives a new
bucket, as ``s3.url`` (``s3://emtile-test-N``). Subprocesses and Dask workers started in the test
inherit the environment. Needs ``moto[server]`` and ``s3fs`` (the ``test`` extra).
"""

import itertools
import socket

import pytest

_buckets = itertools.count()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """The endpoint URL of a moto S3 server running for the whole session."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = _free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


class S3Bucket:
    def __init__(self, endpoint, name):
        self.endpoint, self.name, self.url = endpoint, name, f"s3://{name}"

    def __truediv__(self, key):
        return f"{self.url}/{key}"

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A new, empty bucket on the session's server, with the environment pointing at it."""
    import s3fs

    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
                 "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")  # no profile of the user's leaks in
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = S3Bucket(s3_server, f"emtile-test-{next(_buckets)}")
    bucket.fs().mkdir(bucket.name)
    yield bucket
    s3fs.S3FileSystem.clear_instance_cache()
