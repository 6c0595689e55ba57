"""Fault drills against a real ``kestrel up``: does the service survive its processes dying?

Starts ``kestrel up`` (embedded Redis, the workers, the API) on free ports with a temporary store
(its ``models/`` links to the warm converted-weights cache, so nothing is converted again),
captures a few documents, queues a capture behind it and starts a training with the default
training settings (time-based checkpoints every 60 s, heartbeat ttl 30 s; only the token budget is
set, so the run outlasts the drills). Then, in turn:

    SIGKILL the batch worker (which is running the training)
    SIGKILL the interactive worker
    SIGKILL the generate worker
    SIGKILL the API
    SIGKILL the embedded redis-server
    SIGTERM the embedded redis-server

After each it waits for recovery: ``/ready`` answers 200 with every worker alive (counting only
workers started after the drill where the killed process was a worker) and the training is
running again (or finished). If the training has finished, the next drill first starts another.
At the end it waits for every job it submitted to end, and prints one JSON object:

- ``drills``, ``stack_survived`` (drills after which /ready answered 200 again while ``up`` kept
  running, with no manual restart), ``recovery_s`` / ``recovery_s_max`` (drill → /ready 200);
- ``training_back_s`` (drill → the training is progressing again; a dead batch worker's job waits
  for its heartbeat to expire, ``heartbeat_ttl_s``);
- ``jobs_lost``: submitted jobs (queued or running at some drill) that ended failed or vanished;
- ``training_resumed``: drills after which the training resumed from a checkpoint and then
  finished; ``training_restarted``: drills after which the training job ran again at all (from a
  checkpoint or, without one, from scratch); ``work_lost_s`` / ``work_lost_s_max``: training time
  redone after each of those (seconds of training at the kill, estimated from the last progress
  report plus the time since, minus the checkpoint's). The batch worker is killed once the
  training has run 15 s past its first time-based checkpoint.

    python bench/faults.py            # prints JSON; the latest figures are in bench/README.md
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import service_up
from corpus import docstring_corpus
from redis.exceptions import RedisError

from kestrel.core.models import BUNDLED, ensure_bundled_cache
from kestrel.core.sae.config import DEFAULT_CHECKPOINT_EVERY_S
from kestrel.workers import lifecycle, registry

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
LAYER = "model.layers.15"
TERMINAL = ("finished", "failed", "canceled")

#: (name, marker in the child's command line, signal).
DRILLS = (
    ("SIGKILL batch worker", "--queue batch", signal.SIGKILL),
    ("SIGKILL interactive worker", "--queue interactive", signal.SIGKILL),
    ("SIGKILL generate worker", "--queue generate", signal.SIGKILL),
    ("SIGKILL api", "kestrel.cli serve", signal.SIGKILL),
    ("SIGKILL redis-server", "redis-server", signal.SIGKILL),
    ("SIGTERM redis-server", "redis-server", signal.SIGTERM),
)


# ---------------------------------------------------------------------------------------------
# Processes


def children_of(pid: int) -> dict[int, str]:
    """{pid: command line} of the live children of ``pid`` (Linux /proc)."""
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


def worker_serving(redis_url: str, pid: int) -> bool:
    """The worker process ``pid`` has published its liveness record (it is taking jobs)."""
    redis = lifecycle.connect(redis_url)
    try:
        return any(record.get("pid") == pid for record in registry.live_workers(redis))
    except RedisError:
        return False
    finally:
        redis.close()


def wait_for(check, timeout_s: float, interval_s: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval_s)
    return False


# ---------------------------------------------------------------------------------------------
# Jobs


@dataclass
class Training:
    job_id: str
    runs_seen: int = 1
    last_elapsed: float = 0.0
    last_elapsed_at: float = 0.0
    history: list[str] = field(default_factory=list)


def job(http: httpx.Client, job_id: str) -> dict | None:
    response = http.get(f"/v1/jobs/{job_id}")
    return response.json() if response.status_code == 200 else None


def run_lines(info: dict) -> list[str]:
    """The log lines each run of a training job starts with ("training ..." or "resuming ...")."""
    return [line for line in info["log"] if " training sae" in line or " resuming sae" in line]


def watch(http: httpx.Client, training: Training) -> dict | None:
    """Read the training's job; remember when its reported training time last moved."""
    info = job(http, training.job_id)
    if info is None:
        return None
    elapsed = float((info.get("metrics") or {}).get("elapsed_s") or 0.0)
    if info["status"] == "started" and elapsed != training.last_elapsed:
        training.last_elapsed, training.last_elapsed_at = elapsed, time.monotonic()
    return info


def start_training(http: httpx.Client, run_id: str, args: argparse.Namespace) -> Training:
    body = {
        "run_id": run_id,
        "layer": LAYER,
        "sae": {"architecture": "topk", "n_latents": args.n_latents, "k": 16},
        "train": {"token_budget": args.token_budget},  # every other setting at its default
    }
    response = http.post("/v1/saes", json=body)
    response.raise_for_status()
    training = Training(response.json()["id"])
    if not wait_for(lambda: (i := watch(http, training)) and i["status"] == "started" and i["metrics"], 600):
        raise RuntimeError(f"training {training.job_id} did not start: {job(http, training.job_id)}")
    return training


def capture(http: httpx.Client, n_docs: int) -> str:
    body = {
        "model": MODEL,
        "layers": [LAYER],
        "dataset": {"kind": "texts", "texts": docstring_corpus(max_docs=n_docs)},
        "options": {"max_length": 128},
    }
    response = http.post("/v1/activations", json=body)
    response.raise_for_status()
    return response.json()["id"]


def wait_terminal(http: httpx.Client, job_id: str, timeout_s: float) -> dict | None:
    info: dict | None = None

    def done() -> bool:
        nonlocal info
        info = job(http, job_id)
        return info is None or info["status"] in TERMINAL

    wait_for(done, timeout_s, 1.0)
    return info


# ---------------------------------------------------------------------------------------------
# Drills


def drill(
    up: subprocess.Popen,
    base: str,
    redis_url: str,
    http: httpx.Client,
    training: Training,
    spec: tuple,
    timeout_s: float,
) -> dict:
    name, marker, sig = spec
    if marker == "--queue batch":  # kill it mid-run: after its first time-based checkpoint
        wait_for(
            lambda: (
                (watch(http, training) or {}).get("status") in TERMINAL
                or (training.last_elapsed >= DEFAULT_CHECKPOINT_EVERY_S + 15)
            ),
            timeout_s * 2,
        )
    pid = child_pid(up, marker)
    if pid is None:
        raise RuntimeError(f"no single child matching {marker!r}: {children_of(up.pid)}")
    for _ in range(12):  # a fresh progress report, so the estimate of training time at the kill is tight
        watch(http, training)
        time.sleep(0.25)
    before = watch(http, training) or {}
    killed_at = time.monotonic()
    elapsed_at_kill = training.last_elapsed + (killed_at - training.last_elapsed_at)
    os.kill(pid, sig)
    result: dict = {"drill": name, "pid": pid, "training_job": training.job_id}

    def recovered() -> bool:
        new = child_pid(up, marker)
        if up.poll() is not None or new is None or new == pid or not service_up.ready(base):
            return False
        return "worker" not in name or worker_serving(redis_url, new)

    result["survived"] = wait_for(recovered, timeout_s)
    result["recovery_s"] = round(time.monotonic() - killed_at, 2) if result["survived"] else None

    def training_back() -> bool:
        try:
            info = watch(http, training)
        except httpx.HTTPError:
            return False
        if info is None or info["status"] in TERMINAL:
            return True
        return info["status"] == "started" and training.last_elapsed_at > killed_at

    back = wait_for(training_back, timeout_s)
    result["training_back_s"] = round(time.monotonic() - killed_at, 2) if back else None
    info = watch(http, training) or {}
    result["training_status"] = info.get("status")
    runs = run_lines(info) if info else []
    if len(runs) > training.runs_seen:  # the job started again: from a checkpoint, or from scratch
        training.runs_seen = len(runs)
        resumed = "resuming" in runs[-1]
        checkpoint_s = float(runs[-1].split("(")[-1].split(" s in")[0]) if resumed else 0.0
        result["resumed_from_checkpoint"] = resumed
        result["resumed_from_s"] = checkpoint_s
        result["work_lost_s"] = round(max(elapsed_at_kill - checkpoint_s, 0.0), 1)
        result["step_before"] = (before.get("metrics") or {}).get("step")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=64, help="documents captured for the training")
    parser.add_argument("--n-latents", type=int, default=2048)
    parser.add_argument("--token-budget", type=int, default=1_000_000, help="rows the training runs for")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds a drill may take to recover")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds between drills")
    parser.add_argument("--cache", type=Path, default=REPO / ".kestrel", help="converted-weights cache")
    args = parser.parse_args()

    ensure_bundled_cache(BUNDLED[MODEL], args.cache)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kestrel-bench-faults-") as tmp:
        store = Path(tmp) / "store"
        store.mkdir()
        (store / "models").symlink_to(args.cache.resolve() / "models", target_is_directory=True)
        service = service_up.start(store, Path(tmp) / "up.log", KESTREL_PRELOAD_MODEL="")
        up, base, redis_url = service.process, service.base, service.redis_url
        submitted: list[str] = []
        drills: list[dict] = []
        try:
            with httpx.Client(base_url=base, timeout=60) as http:
                first = capture(http, args.docs)
                info = wait_terminal(http, first, 900)
                if not info or info["status"] != "finished":
                    raise RuntimeError(f"the capture did not finish: {info}")
                run_id = info["artifacts"]["run_id"]
                training = start_training(http, run_id, args)
                submitted += [training.job_id, capture(http, 8)]  # the capture waits behind it
                for spec in DRILLS:
                    current = watch(http, training)
                    if current is None or current["status"] in TERMINAL:
                        training = start_training(http, run_id, args)
                        submitted.append(training.job_id)
                    drills.append(drill(up, base, redis_url, http, training, spec, args.timeout))
                    print(json.dumps(drills[-1]), file=sys.stderr)
                    time.sleep(args.settle)
                finals = {job_id: wait_terminal(http, job_id, 3600) for job_id in submitted}
        finally:
            code = service_up.stop(service, 120)
            log_tail = (Path(tmp) / "up.log").read_text(errors="replace")[-4000:]
    lost = [job_id for job_id, info in finals.items() if info is None or info["status"] != "finished"]
    recoveries = [d["recovery_s"] for d in drills if d["recovery_s"] is not None]
    lost_work = [d["work_lost_s"] for d in drills if "work_lost_s" in d]
    resumed = [  # drills after which the training resumed from a checkpoint, and then finished
        d
        for d in drills
        if d.get("resumed_from_checkpoint")
        and (finals.get(d["training_job"]) or {}).get("status") == "finished"
    ]
    result = {
        "drills": len(drills),
        "stack_survived": sum(1 for d in drills if d["survived"]),
        "recovery_s_max": max(recoveries) if recoveries else None,
        "recovery_s": recoveries,
        "training_back_s": [d["training_back_s"] for d in drills],
        "jobs_lost": len(lost),
        "jobs_submitted": len(submitted),
        "lost_jobs": {job_id: finals[job_id] and finals[job_id]["status"] for job_id in lost},
        "training_resumed": len(resumed),
        "training_restarted": len(lost_work),
        "work_lost_s_max": max(lost_work) if lost_work else 0.0,
        "work_lost_s": lost_work,
        "up_exit_code": code,
        "wall_s": round(time.monotonic() - started, 1),
        "per_drill": drills,
    }
    if lost or code != 0:
        result["up_log_tail"] = log_tail
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
