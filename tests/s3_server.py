"""An S3-compatible server for the tests: moto's server mode (PyPI ``moto[server]``) over HTTP on a free port,
started like Redis (``tests.service_fixtures``). The project's client code talks to it exactly as to MinIO or
AWS: through boto3 and the standard variables below, nothing provider-specific."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bench.servers import free_port, wait_for


def s3_env(endpoint: str) -> dict[str, str]:
    """The variables boto3 reads (and a worker or API process is given) to reach ``endpoint``."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server on a free port; its endpoint URL. Skips the test where moto_server is not installed."""
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if exe is None:
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    port = free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        def up() -> bool:
            try:
                return httpx.get(url, timeout=1).status_code < 500
            except httpx.TransportError:
                return False

        wait_for(up, 30, "moto's S3 server")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def make_bucket(endpoint: str, name: str) -> str:
    """A new bucket named after ``name`` (a test's node name); its name."""
    import boto3

    bucket = "ldd-" + re.sub(r"[^a-z0-9]+", "-", name.lower())[:40].strip("-")
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                 region_name="us-east-1").create_bucket(Bucket=bucket)  # fmt: skip
    return bucket
