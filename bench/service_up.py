"""The real service for the bench scripts: ``kestrel up`` on free ports over a temporary store.

One place for what api.py, concepts.py, contract.py and faults.py each need: start it (embedded
Redis, every worker of ``kestrel up``, the API) with the machine's environment plus the bench's
settings, know when it is ready (``/ready`` 200 with a worker on every queue), wait for a job, and
stop it the way a user does (Ctrl-C).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from kestrel.workers.supervisor import free_port

REPO = Path(__file__).resolve().parents[1]
TERMINAL = ("finished", "failed", "canceled")


@dataclass
class Service:
    process: subprocess.Popen
    base: str
    redis_url: str


def link_warm_models(store: Path) -> None:
    """Point the store's ``models/`` at the repository's converted-weights cache, when there is
    one, so the bench never pays for the GGUF conversion again."""
    warm = REPO / ".kestrel" / "models"
    if warm.is_dir() and not (store / "models").exists():
        store.mkdir(parents=True, exist_ok=True)
        (store / "models").symlink_to(warm, target_is_directory=True)


def ready(base: str) -> bool:
    """/ready is 200 with a worker on every queue."""
    try:
        response = httpx.get(f"{base}/ready", timeout=5)
        return response.status_code == 200 and all(response.json()["workers"].values())
    except (httpx.HTTPError, KeyError, ValueError):
        return False


def start(store: Path, log: Path, *, timeout_s: float = 240, **settings: str) -> Service:
    """``kestrel up --store STORE`` with ``settings`` (environment variables) on top of the
    bench defaults (offline, CPU); returns once it is ready, or raises with the log's tail."""
    api_port, redis_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "KESTREL_REDIS_URL")}
    env.update(HF_HUB_OFFLINE="1", KESTREL_DEVICE="cpu", TOKENIZERS_PARALLELISM="false", **settings)
    argv = [sys.executable, "-m", "kestrel.cli", "up", "--store", str(store)]
    argv += ["--port", str(api_port), "--redis-port", str(redis_port)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    base = f"http://127.0.0.1:{api_port}"
    deadline = time.monotonic() + timeout_s
    while not ready(base):
        if process.poll() is not None or time.monotonic() > deadline:
            stop(Service(process, base, ""))
            raise RuntimeError(f"kestrel up did not become ready:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)
    return Service(process, base, f"redis://127.0.0.1:{redis_port}/0")


def stop(service: Service, timeout_s: float = 90) -> int | None:
    """Ctrl-C, as a user stops it; SIGKILL to the whole process group if it does not end."""
    if service.process.poll() is None:
        service.process.send_signal(signal.SIGINT)
        try:
            service.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(service.process.pid, signal.SIGKILL)
            service.process.wait(10)
    return service.process.returncode


def wait_job(http: httpx.Client, job_id: str, timeout_s: float = 900) -> dict:
    """The job once finished; raises if it failed, was canceled or is still running at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in TERMINAL:
            if job["status"] != "finished":
                raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}")
            return job
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} still {job['status']} after {timeout_s} s")
        time.sleep(0.3)
