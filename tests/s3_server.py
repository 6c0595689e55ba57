"""A real S3-compatible server for tests: moto's standalone server as a subprocess on loopback.

Shared by the unit and service tests of the S3 store. Nothing is mocked in the test process:
boto3 talks HTTP to a server that enforces S3's semantics (conditional writes included).
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Dummy credentials: moto accepts any, boto3 insists on some.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
UNSET_ENV = ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")
START_TIMEOUT_S = 120.0  # moto's imports alone take a while on a busy machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_up(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"moto server did not answer on {url} within {START_TIMEOUT_S} s")


@contextmanager
def moto_server(log: Path) -> Iterator[str]:
    """Run ``python -m moto.server`` on 127.0.0.1 and a free port; yields its endpoint URL.

    The caller sets ``AWS_ENV`` in the environment of every process that talks to it.
    """
    port = free_port()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextmanager
def moto_endpoint(log: Path) -> Iterator[str]:
    """``moto_server`` with ``AWS_ENV`` set (and the user's own AWS profile unset) in this process's
    environment while it runs, restored after: what every S3 fixture wants."""
    import pytest

    with pytest.MonkeyPatch.context() as patch:
        for name, value in AWS_ENV.items():
            patch.setenv(name, value)
        for name in UNSET_ENV:
            patch.delenv(name, raising=False)
        with moto_server(log) as url:
            yield url


def new_bucket(endpoint: str, prefix: str = "team/store") -> str:
    """Create a fresh bucket; its ``s3://bucket/prefix`` location."""
    import boto3

    bucket = f"kestrel-test-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/{prefix}"
