"""`kestrel up` (what `make run` runs): embedded Redis with an append-only file, two workers, the
API; a capture through it; Ctrl-C stops every process; a child that dies is started again."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
from service_stack import FULL_WORKERS, READY_TIMEOUT_S, REPO, TEXTS, make_store, wait_for_job, wait_until

from kestrel.core.models import DEFAULT_MODEL
from kestrel.workers.supervisor import free_port


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_up_runs_the_service_and_ctrl_c_stops_it(tmp_path, warm_model_cache) -> None:
    store = make_store(tmp_path / "store", warm_model_cache)
    api_port, redis_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "KESTREL_REDIS_URL")}
    env.update(HF_HUB_OFFLINE="1", KESTREL_DEVICE="cpu", OMP_NUM_THREADS="1")
    log_path = tmp_path / "up.log"
    argv = [sys.executable, "-m", "kestrel.cli", "up", "--store", str(store)]
    argv += ["--port", str(api_port), "--redis-port", str(redis_port)]
    with log_path.open("wb") as log:
        up = subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{api_port}"
    try:

        def ready() -> bool:
            response = httpx.get(f"{base}/ready", timeout=5)
            return response.status_code == 200 and response.json()["workers"] == FULL_WORKERS

        try:
            wait_until(ready, READY_TIMEOUT_S, "kestrel up to be ready")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- up.log ---\n{log_path.read_text()[-5000:]}") from None
        # `up` prints once its own health check passes, which may trail ours by a poll
        wait_until(lambda: f"docs  {base}/docs\n" in log_path.read_text(), 60, "the docs line")
        with httpx.Client(base_url=base, timeout=60) as http:

            def preloaded() -> bool:
                models = http.get("/v1/models").json()["items"]
                return any(m["name"] == DEFAULT_MODEL and m["loaded_by"] for m in models)

            wait_until(preloaded, READY_TIMEOUT_S, "the default model preloaded in the interactive worker")
            body = {"layers": ["model.layers.1"], "dataset": {"kind": "texts", "texts": ["Hello there."]}}
            job = wait_for_job(http, http.post("/v1/activations", json=body).json()["id"])
            assert (store / "activations" / job["artifacts"]["run_id"] / "manifest.json").is_file()
        redis_dir = store / "redis"
        assert (redis_dir / "appendonly.aof").exists() or (redis_dir / "appendonlydir").is_dir()
    finally:
        up.send_signal(signal.SIGINT)  # Ctrl-C
        code = up.wait(90)
    assert code == 0, log_path.read_text()[-3000:]
    assert not listening(api_port) and not listening(redis_port), log_path.read_text()[-3000:]


def children_of(pid: int) -> dict[int, str]:
    """{pid: command line} of the live processes whose parent is ``pid`` (Linux /proc)."""
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found[int(entry)] = cmdline
    return found


def child_pid(up: subprocess.Popen, marker: str) -> int | None:
    pids = [pid for pid, cmdline in children_of(up.pid).items() if marker in cmdline]
    return pids[0] if len(pids) == 1 else None


def test_up_restarts_a_killed_worker_redis_server_and_api(tmp_path, warm_model_cache) -> None:
    store = make_store(tmp_path / "store", warm_model_cache)
    api_port, redis_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "KESTREL_REDIS_URL")}
    env.update(HF_HUB_OFFLINE="1", KESTREL_DEVICE="cpu", OMP_NUM_THREADS="1", KESTREL_PRELOAD_MODEL="")
    env.update(KESTREL_HEARTBEAT_INTERVAL_S="1", KESTREL_HEARTBEAT_TTL_S="6")
    log_path = tmp_path / "up.log"
    argv = [sys.executable, "-m", "kestrel.cli", "up", "--store", str(store)]
    argv += ["--port", str(api_port), "--redis-port", str(redis_port)]
    with log_path.open("wb") as log:
        up = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    base = f"http://127.0.0.1:{api_port}"

    def ready() -> bool:
        response = httpx.get(f"{base}/ready", timeout=5)
        return response.status_code == 200 and response.json()["workers"] == FULL_WORKERS

    def log_text() -> str:
        return log_path.read_text(errors="replace")

    def kill_and_wait(marker: str, exit_line: str) -> None:
        """SIGKILL the child whose command line holds ``marker``; wait for a new one and /ready."""
        old = wait_until(lambda: child_pid(up, marker), 120, f"the {marker!r} child")
        os.kill(old, signal.SIGKILL)
        new = wait_until(lambda: (pid := child_pid(up, marker)) != old and pid, 180, f"a new {marker!r}")
        assert new != old
        wait_until(ready, 240, f"/ready after killing {marker!r}")
        assert exit_line in log_text(), log_text()[-3000:]

    try:
        try:
            wait_until(ready, READY_TIMEOUT_S, "kestrel up to be ready")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- up.log ---\n{log_text()[-5000:]}") from None
        kill_and_wait("--queue batch", "batch worker exited with signal SIGKILL; restarting")
        kill_and_wait("redis-server", "redis-server exited with signal SIGKILL; restarting")
        kill_and_wait("kestrel.cli serve", "api exited with signal SIGKILL; restarting")
        assert "restarted (pid" in log_text()
        with httpx.Client(base_url=base, timeout=60) as http:  # everything reconnected: a job runs
            body = {"layers": ["model.layers.1"], "dataset": {"kind": "texts", "texts": TEXTS[:2]}}
            response = http.post("/v1/activations", json=body)
            assert response.status_code == 202, response.text
            wait_for_job(http, response.json()["id"])
        assert up.poll() is None
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(90)
    assert code == 0, log_text()[-3000:]
    assert not listening(api_port) and not listening(redis_port), log_text()[-3000:]
    assert children_of(up.pid) == {}
