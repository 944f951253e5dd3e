"""One fixture over both object-store servers the tests start (``tests/s3server.py``,
``tests/gcsserver.py``)::

    from objstores import bucket, gcs, gcs_server, s3, s3_server  # noqa: F401

``bucket`` is a new, empty bucket on the S3 server in one run of the test and on the GCS
server in the other, with the environment pointing at it; ``bucket / "key"`` is its URL.
"""

import pytest

from gcsserver import gcs, gcs_server  # noqa: F401  (pytest fixtures)
from s3server import s3, s3_server  # noqa: F401  (pytest fixtures)


@pytest.fixture(params=["s3", "gcs"])
def bucket(request):
    return request.getfixturevalue(request.param)
