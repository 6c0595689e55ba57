"""The container probes (`python -m kestrel.healthcheck api|worker`) against the live stack."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from service_stack import REPO, Stack

from kestrel import healthcheck


def probe(what: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kestrel.healthcheck", what],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,  # the probe's imports on a busy machine; it answers in well under a second
    )


def test_probes_pass_on_a_live_stack(service: Stack) -> None:
    api = probe("api", KESTREL_PORT=str(service.api_port))
    assert api.returncode == 0, api.stderr
    worker = probe("worker", REDIS_URL=service.redis_url)
    assert worker.returncode == 0 and "interactive" in worker.stdout and "batch" in worker.stdout, worker


def test_probes_fail_without_a_live_process(service: Stack) -> None:
    with pytest.raises(RuntimeError, match="no live worker on host"):
        healthcheck.check_worker(service.redis_url, host="another-container")
    from kestrel.workers.supervisor import free_port

    assert probe("api", KESTREL_PORT=str(free_port())).returncode == 1
    assert healthcheck.main(["nonsense"]) == 2


def test_a_ping_job_runs_on_a_worker(service: Stack) -> None:
    """The trivial job bench/api.py times: through the queue and a worker, bookkeeping included."""
    from service_stack import JOB_TIMEOUT_S, wait_until

    from kestrel.workers import jobs, lifecycle

    redis = lifecycle.connect(service.redis_url)
    try:
        job = lifecycle.enqueue(
            redis,
            lifecycle.BATCH,
            jobs.ping_job,
            kind="ping",
            kwargs={"payload": "x"},
            timeout_s=30,
            ttl_s=300,
        )
        info = wait_until(
            lambda: (i := lifecycle.get_job(redis, job.id)).status == "finished" and i,
            JOB_TIMEOUT_S,
            "the ping job",
        )
    finally:
        redis.close()
    assert info.kind == "ping" and info.result == {"pong": "x"} and info.progress == 1.0
