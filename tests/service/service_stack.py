"""A service *stack* for tests: one Redis database, one store, and the real processes serving them.

Processes are `python -m kestrel.cli worker|serve` subprocesses with their output in log files,
whose tails every timeout message includes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from kestrel.workers.supervisor import free_port, stop_process

REPO = Path(__file__).resolve().parents[2]
# Deadlines sized for a busy 2-core machine, where a worker's start (torch, transformers) or a
# model load alone can take a minute: a wait only ends early, so a long deadline costs nothing
# when all is well and keeps a slow machine from failing a correct service.
READY_TIMEOUT_S = 180.0
API_START_TIMEOUT_S = 120.0
JOB_TIMEOUT_S = 300.0
#: How long the shared stacks' awaited calls (load, layers, encode, generate) wait before a 202:
#: the tests that expect a 200 get one however slow the machine; those about the 202 set their own.
AWAITED_TIMEOUT_S = 120.0
#: One worker per queue: what the shared stacks (service, contract, dashboard) run.
FULL_WORKERS = {"interactive": 1, "generate": 1, "batch": 1}
# Redis databases of the session's redis-server (256 of them): the shared stack's, the ones that
# module- and session-long stacks keep to themselves, and the first that `make_stack` counts up from.
SHARED_DB, CONTRACT_DB, DASHBOARD_DB, REAPER_DB, FIRST_FREE_DB = 0, 200, 201, 250, 1

TEXTS = [
    f"Text {i} is about {topic}." + " It goes on for a little while longer." * (i % 4)
    for i, topic in enumerate(
        ["cooking pasta with garlic", "a football match", "stars and galaxies", "interest rates and bonds"]
        * 6
    )
]


def make_store(root: Path, model_cache_root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "models").symlink_to(model_cache_root / "models", target_is_directory=True)
    return root


def full_stack(redis_url: str, base: Path, model_cache_root: Path, local_models: Path) -> Stack:
    """A stack on a store of its own under ``base`` serving the bundled model and the local ones,
    with one worker per queue started (not yet awaited: the caller waits as it needs)."""
    env = {"KESTREL_MODEL_DIRS": str(local_models), "KESTREL_INTERACTIVE_TIMEOUT_S": str(AWAITED_TIMEOUT_S)}
    stack = Stack(redis_url, make_store(base / "store", model_cache_root), base, env)
    for queue in FULL_WORKERS:
        stack.start_worker(queue)
    return stack


@dataclass
class Stack:
    """One Redis database + one store + the processes serving them, started on demand."""

    redis_url: str
    store_root: Path
    logs: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    api_port: int = 0
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "REDIS_URL": self.redis_url,
            "KESTREL_STORE_ROOT": str(self.store_root),
            "KESTREL_DEVICE": "cpu",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
            **self.extra_env,
        }

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "kestrel.cli", *args],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes[name] = process
        return process

    def start_worker(self, queue: str, name: str | None = None) -> subprocess.Popen:
        name = name or f"worker-{queue}"
        return self._spawn(
            name, "worker", "--queue", queue, "--name", f"{name}-{os.getpid()}-{time.time_ns()}"
        )

    def start_api(self) -> subprocess.Popen:
        self.api_port = free_port()
        process = self._spawn("api", "serve", "--port", str(self.api_port))
        wait_until(
            lambda: _answers(f"{self.base_url}/health"), API_START_TIMEOUT_S, "the API to answer", self
        )
        return process

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int | None:
        process = self.processes.pop(name)
        return stop_process(process, timeout_s, sig)

    def kill(self, name: str) -> None:
        process = self.processes.pop(name)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.stop(name, timeout_s=20)

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60.0, **kwargs)

    def wait_ready(self, workers: dict[str, int]) -> None:
        """Until /ready reports at least these live workers per queue."""

        def ready() -> bool:
            response = httpx.get(f"{self.base_url}/ready", timeout=5)
            counts = response.json().get("workers") or response.json()["error"]["details"].get("workers", {})
            return all(counts.get(q, 0) >= n for q, n in workers.items())

        wait_until(ready, READY_TIMEOUT_S, f"workers {workers}", self)

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for path in sorted(self.logs.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"==> {path.name}\n" + "\n".join(text))
        return "\n".join(out)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(check: Callable[[], Any], timeout_s: float, what: str, stack: Stack | None = None) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = check()
        except (httpx.HTTPError, KeyError, ValueError):
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout_s} s waiting for {what}\n{stack.log_tail() if stack else ''}"
            )
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------
# Helpers shared by the tests


def wait_for_job(
    http: httpx.Client,
    job_id: str,
    states: tuple[str, ...] = ("finished",),
    timeout_s: float = JOB_TIMEOUT_S,
    prefix: str = "",
) -> dict[str, Any]:
    """Poll a job until it reaches one of ``states`` (fails fast on another terminal state).
    ``prefix``: where the API is mounted in a host app (``/kestrel``), empty for Kestrel's own."""
    deadline = time.monotonic() + timeout_s
    while True:
        job = http.get(f"{prefix}/v1/jobs/{job_id}").json()
        if job["status"] in states:
            return job
        if job["status"] in ("finished", "failed", "canceled"):
            raise AssertionError(f"job {job_id} ended {job['status']}, expected {states}: {job}")
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} after {timeout_s} s: {job}")
        time.sleep(0.1)


def capture_run(http: httpx.Client, layer: str = "model.layers.3", texts: list[str] | None = None) -> str:
    """Capture ``layer`` of the bundled model over sample texts; the new run's id."""
    response = http.post(
        "/v1/activations",
        json={"layers": [layer], "dataset": {"kind": "texts", "texts": texts or TEXTS}},
    )
    assert response.status_code == 202, response.text
    job = wait_for_job(http, response.json()["id"])
    return job["artifacts"]["run_id"]


def tiny_sae(http: httpx.Client, layer: str = "model.layers.1") -> str:
    """A run of the tiny Llama over the sample texts (twice) and a 64-latent SAE on ``layer``,
    made through the API; the SAE's id."""
    body = {"model": "tiny-llama", "layers": [layer], "dataset": {"kind": "texts", "texts": TEXTS * 2}}
    run_id = wait_for_job(http, http.post("/v1/activations", json=body).json()["id"])["artifacts"]["run_id"]
    train = {"run_id": run_id, "layer": layer, "sae": {"n_latents": 64, "k": 4}}
    train["train"] = {"batch_size": 64, "token_budget": 4_000}
    return wait_for_job(http, http.post("/v1/saes", json=train).json()["id"])["artifacts"]["sae_id"]


def tiny_transcoders(http: httpx.Client, blocks: tuple[int, ...] = (0, 1)) -> tuple[str, list[str]]:
    """One run of the tiny Llama capturing each block's MLP input and output, and a small
    transcoder per block trained through the API (seconds each); the run's id and the
    transcoders' SAE ids, in block order."""
    layers = [f"model.layers.{b}.mlp{hook}" for b in blocks for hook in (":input", "")]
    body = {"model": "tiny-llama", "layers": layers, "dataset": {"kind": "texts", "texts": TEXTS * 2}}
    run_id = wait_for_job(http, http.post("/v1/activations", json=body).json()["id"])["artifacts"]["run_id"]
    sae_ids = []
    for block in blocks:
        mlp = f"model.layers.{block}.mlp"
        train = {"run_id": run_id, "layer": f"{mlp}:input", "target_layer": mlp}
        train |= {"sae": {"n_latents": 32, "k": 4}, "train": {"batch_size": 64, "token_budget": 2_000}}
        submitted = http.post("/v1/saes", json=train)
        assert submitted.status_code == 202, submitted.text
        sae_ids.append(wait_for_job(http, submitted.json()["id"])["artifacts"]["sae_id"])
    return run_id, sae_ids


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The response has this status and the one error shape; its ``error`` object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and {"code", "message", "details"} <= set(body["error"]), body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]
