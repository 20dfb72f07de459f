"""An S3-compatible server for the tests: moto's server mode (``bench.servers.moto_s3_server``, shared with the
chaos bench) over HTTP on a free port, started like Redis. The project's client code talks to it exactly as to
MinIO or AWS: through boto3 and the standard variables of ``s3_env``, nothing provider-specific."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from bench.servers import make_bucket, moto_executable, moto_s3_server, s3_env

__all__ = ["make_bucket", "moto_server", "s3_env"]


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server; its endpoint URL. Skips the test where moto_server is not installed."""
    if moto_executable() is None:
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    with moto_s3_server() as url:
        yield url
