"""What must survive: a worker SIGKILLed mid-training (its training is requeued and resumes from
its checkpoint), a Redis restart under a running job, an API restart, a Redis restart with queued
jobs; and a training cancelled mid-way, which stops at its next step and resumes from its checkpoint."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from subprocess import Popen

from redis import Redis
from rq.executions import Execution
from rq.job import JobStatus
from service_stack import JOB_TIMEOUT_S, REAPER_DB, TEXTS, Stack, capture_run, wait_for_job, wait_until

from kestrel.workers import lifecycle
from kestrel.workers.reaper import TRAIN_REQUEUES, reap
from kestrel.workers.supervisor import EmbeddedRedis, free_port

LAYER = "model.layers.3"
LONG_TRAINING = {"batch_size": 64, "token_budget": 50_000_000, "log_every": 5, "checkpoint_every": 50}
#: A dead worker is noticed within seconds: heartbeats every second, dead after 6 s of silence.
FAST_REAPER = {
    "KESTREL_HEARTBEAT_INTERVAL_S": "1",
    "KESTREL_HEARTBEAT_TTL_S": "6",
    "KESTREL_REAPER_INTERVAL_S": "1",
}


def wait_for_progress(http, job_id: str, minimum: float = 0.0, timeout_s: float = JOB_TIMEOUT_S) -> dict:
    """Until the job runs and has reported progress above ``minimum``."""

    def progressed():
        job = http.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] in ("queued", "started"), job
        return job if job["status"] == "started" and job["progress"] > minimum and job["metrics"] else None

    return wait_until(progressed, timeout_s, f"job {job_id} to progress past {minimum}")


def checkpoints_of(stack, sae_id: str) -> list[Path]:
    root = stack.store_root / "checkpoints" / sae_id
    return sorted(p for p in root.glob("step-*") if (p / "state.json").is_file()) if root.is_dir() else []


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("step-"))


def batch_stack(make_stack, worker: str | None = None, **stack_options: str) -> tuple[Stack, Popen]:
    """A stack of its own with one batch worker (named ``worker``) and the API, ready."""
    stack = make_stack(**stack_options)
    process = stack.start_worker("batch", name=worker)
    stack.start_api()
    stack.wait_ready({"batch": 1})
    return stack, process


def submit_training(http, run_id: str, **train: object) -> tuple[str, str]:
    """Start a small SAE training of ``run_id`` (batches of 64, logged every 5 steps): its job
    id and the SAE's id."""
    body = {
        "run_id": run_id,
        "layer": LAYER,
        "sae": {"n_latents": 256, "k": 8},
        "train": {"batch_size": 64, "log_every": 5, **train},
    }
    submitted = http.post("/v1/saes", json=body).json()
    return submitted["id"], submitted["artifacts"]["sae_id"]


def training_with_a_checkpoint(stack: Stack, http) -> tuple[str, str]:
    """A training of 200,000 tokens checkpointing every second, running and past its first
    checkpoint: its job id and SAE id."""
    run_id = capture_run(http, LAYER, TEXTS)
    job_id, sae_id = submit_training(http, run_id, token_budget=200_000, checkpoint_every_s=1.0)
    wait_for_progress(http, job_id)
    wait_until(lambda: checkpoints_of(stack, sae_id), 120, "a time-based checkpoint", stack)
    return job_id, sae_id


def test_worker_killed_mid_training_is_requeued_and_resumes_from_its_checkpoint(make_stack) -> None:
    stack, _ = batch_stack(make_stack, "first", **FAST_REAPER)
    with stack.client() as http:
        job_id, sae_id = training_with_a_checkpoint(stack, http)

        stack.kill("first")
        killed_at_step = step_of(checkpoints_of(stack, sae_id)[-1])
        job = wait_for_job(http, job_id, states=("queued",), timeout_s=120)
        assert "requeue 1 of 3" in job["message"], job
        assert job["error"] is None

        stack.start_worker("batch", name="second")  # what `kestrel up` does after a death
        done = wait_for_job(http, job_id, timeout_s=300)
        assert done["result"]["sae_id"] == sae_id, done
        resumed = [line for line in done["log"] if "resuming" in line]
        assert resumed, done["log"]
        resumed_step = int(resumed[-1].split("from step ")[1].split()[0])
        assert resumed_step >= killed_at_step > 0, (resumed_step, killed_at_step)
        summary = http.get(f"/v1/saes/{sae_id}").json()
        assert 200_000 <= summary["tokens"] < 200_000 + 64  # the planned budget, once: not a restart's
        assert not (stack.store_root / "checkpoints" / f"{sae_id}.lock").exists()


def test_a_stalled_worker_lets_go_of_a_requeued_training_before_another_resumes_it(make_stack) -> None:
    """Worker "a" freezes (SIGSTOP: a VM pause, a swap storm) past the heartbeat ttl, so the reaper
    requeues its training and worker "b" takes it. "b" must not train while "a" may still write
    checkpoints; once "a" thaws it notices the job is no longer its own, checkpoints, lets go, and
    "b" resumes from that checkpoint."""
    stack, first = batch_stack(make_stack, "a", **FAST_REAPER)
    with stack.client() as http:
        job_id, sae_id = training_with_a_checkpoint(stack, http)
        stack.start_worker("batch", name="b")
        stack.wait_ready({"batch": 2})

        os.kill(first.pid, signal.SIGSTOP)
        try:
            wait_until(
                lambda: any(
                    "requeue 1 of 3" in line for line in http.get(f"/v1/jobs/{job_id}").json()["log"]
                ),
                120,
                "the reaper to requeue the frozen worker's training",
                stack,
            )
            wait_until(
                lambda: http.get(f"/v1/jobs/{job_id}").json()["status"] == "started", 120, "b to take it"
            )
            frozen = checkpoints_of(stack, sae_id)
            time.sleep(3)
            assert checkpoints_of(stack, sae_id) == frozen  # b waits for a's lock: no second trainer
        finally:
            os.kill(first.pid, signal.SIGCONT)

        done = wait_for_job(http, job_id, timeout_s=300)
        assert done["result"]["sae_id"] == sae_id, done
        resumed = [line for line in done["log"] if "resuming" in line]
        assert resumed and int(resumed[-1].split("from step ")[1].split()[0]) >= step_of(frozen[-1]), done[
            "log"
        ]
        assert first.poll() is None, stack.log_tail()  # "a" let go of the job and lives on
        assert "taken from this worker" in (stack.logs / "a.log").read_text()
        assert 200_000 <= http.get(f"/v1/saes/{sae_id}").json()["tokens"] < 200_000 + 64


def test_reaper_requeues_a_dead_workers_training_three_times_then_fails_it(redis_server) -> None:
    """No processes: jobs put in the started registry by a 'worker' that never heartbeats."""
    redis = Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/{REAPER_DB}")
    redis.flushdb()
    try:
        job = lifecycle.enqueue(
            redis,
            lifecycle.BATCH,
            "kestrel.workers.jobs.ping_job",
            kind="train",
            kwargs={},
            timeout_s=60,
            ttl_s=60,
        )
        other = lifecycle.enqueue(
            redis,
            lifecycle.BATCH,
            "kestrel.workers.jobs.ping_job",
            kind="capture",
            kwargs={},
            timeout_s=60,
            ttl_s=60,
        )
        for attempt in range(1, TRAIN_REQUEUES + 2):
            for dying in (job, other) if attempt == 1 else (job,):
                lifecycle.queue(redis, lifecycle.BATCH).remove(dying.id)
                with redis.pipeline() as pipe:
                    dying.prepare_for_execution("ghost", pipe)
                    Execution.create(dying, ttl=0, pipeline=pipe, worker_name="ghost")  # expired at once
                    pipe.execute()
            assert sorted(reap(redis, lock_ms=1)) == sorted([job.id, other.id] if attempt == 1 else [job.id])
            job.refresh()
            if attempt <= TRAIN_REQUEUES:
                assert job.get_status() == JobStatus.QUEUED
                assert job.meta["requeues"] == attempt
                assert f"requeue {attempt} of {TRAIN_REQUEUES}" in job.meta["message"]
            time.sleep(0.01)  # the reaper's lock (1 ms) lapses
        assert job.get_status() == JobStatus.FAILED
        assert job.meta["error"]["code"] == "worker_died"
        assert f"after {TRAIN_REQUEUES} requeues" in job.meta["error"]["message"]
        other.refresh()
        assert other.get_status() == JobStatus.FAILED and other.meta["error"]["code"] == "worker_died"
        assert lifecycle.describe(other).error.code == "worker_died"
    finally:
        redis.flushdb()
        redis.close()


def test_a_worker_rides_out_a_redis_restart_mid_training(make_stack, tmp_path) -> None:
    """redis-server SIGKILLed and started again (append-only file) while a training runs: the
    same worker process finishes the same run, without a requeue or a restart from scratch."""
    redis = EmbeddedRedis(tmp_path / "redis", free_port()).start()
    try:
        stack, worker = batch_stack(make_stack, redis_url=redis.url, **FAST_REAPER)
        with stack.client() as http:
            run_id = capture_run(http, LAYER, TEXTS)
            job_id, _ = submit_training(http, run_id, token_budget=120_000)
            before = wait_for_progress(http, job_id, minimum=0.02)

            redis.process.kill()
            redis.process.wait(10)
            time.sleep(3)  # the worker trains on, unable to report
            redis.start()

            done = wait_for_job(http, job_id, timeout_s=300)
            assert worker.poll() is None, stack.log_tail()  # the same process, still serving
            assert not any("resuming" in line or "requeue" in line for line in done["log"]), done["log"]
            assert done["metrics"]["training"]["steps"] >= before["metrics"]["step"]
            # and it still takes jobs
            wait_for_job(
                http,
                http.post(
                    "/v1/activations",
                    json={"layers": [LAYER], "dataset": {"kind": "texts", "texts": TEXTS[:2]}},
                ).json()["id"],
            )
    finally:
        redis.stop()


def test_cancel_stops_training_at_its_next_step_and_it_resumes(client, service) -> None:
    run_id = capture_run(client, LAYER, TEXTS)
    job_id, sae_id = submit_training(client, run_id, token_budget=200_000, checkpoint_every=100)
    before = wait_for_progress(client, job_id, minimum=0.02)

    cancelled = client.post(f"/v1/jobs/{job_id}/cancel")
    assert cancelled.status_code == 202, cancelled.text
    # What happened, not just "started": the job stops at its next step (or already has).
    answer = cancelled.json()
    assert (answer["status"], answer["cancel_requested"]) in (("started", True), ("canceled", False))
    assert cancelled.content.endswith(b"}\n")
    # The cancel, not the end of the budget, stopped it (a finished or failed job fails the wait).
    job = wait_for_job(client, job_id, states=("canceled",), timeout_s=120)
    assert job["message"].startswith("canceled: "), f"{job}\n{service.log_tail()}"
    assert job["result"]["resumable"] is True and job["result"]["sae_id"] == sae_id
    assert job["progress"] < 1.0 and job["progress"] >= before["progress"]
    assert sae_id not in [s["id"] for s in client.get("/v1/saes").json()["items"]]
    assert job["cancel_requested"] is False
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 409

    resumed = client.post("/v1/saes", json={"resume_from": sae_id})
    assert resumed.status_code == 202, resumed.text
    assert resumed.json()["artifacts"]["sae_id"] == sae_id
    first_progress = wait_for_progress(client, resumed.json()["id"])["progress"]
    assert first_progress >= job["progress"] * 0.9, (
        first_progress,
        job["progress"],
    )  # continued, not restarted
    done = wait_for_job(client, resumed.json()["id"], timeout_s=240)
    assert done["result"]["sae_id"] == sae_id
    assert sae_id in [s["id"] for s in client.get("/v1/saes").json()["items"]]
    client.delete(f"/v1/saes/{sae_id}")
    client.delete(f"/v1/activations/{run_id}")


def test_restarting_the_api_loses_no_job(make_stack) -> None:
    stack = make_stack()  # no worker: the job stays queued across the restart
    stack.start_api()
    with stack.client() as http:
        body = {"layers": [LAYER], "dataset": {"kind": "texts", "texts": TEXTS[:3]}}
        submitted = http.post("/v1/activations", json=body).json()
    stack.stop("api")
    stack.start_api()  # a new process on a new port
    with stack.client() as http:
        job = http.get(f"/v1/jobs/{submitted['id']}").json()
        assert job["status"] == "queued" and job["artifacts"] == submitted["artifacts"]
        assert [j["id"] for j in http.get("/v1/jobs").json()["items"]] == [submitted["id"]]
        stack.start_worker("batch")
        done = wait_for_job(http, submitted["id"])
        assert done["result"]["run_id"] == submitted["artifacts"]["run_id"]


def in_append_only_file(directory: Path, jobs: list[dict]) -> bool:
    """Every job's id is written in Redis's append-only file(s) (6.x: one file, 7.x: a directory)."""
    data = b"".join(p.read_bytes() for p in directory.rglob("appendonly*") if p.is_file())
    return all(job["id"].encode() in data for job in jobs)


def test_restarting_redis_with_persistence_loses_no_queued_job(make_stack, tmp_path) -> None:
    redis = EmbeddedRedis(tmp_path / "redis", free_port()).start()
    try:
        stack = make_stack(redis_url=redis.url)
        stack.start_api()
        with stack.client() as http:
            body = {"layers": [LAYER], "dataset": {"kind": "texts", "texts": TEXTS[:3]}}
            submitted = [http.post("/v1/activations", json=body).json() for _ in range(2)]
            # appendfsync everysec: what is in the file survives a SIGKILL, and a write can trail its
            # reply by up to a second or two while a slow fsync runs (a loaded disk). Wait for the
            # file to hold both jobs, as the documented guarantee is "up to the last second".
            wait_until(lambda: in_append_only_file(redis.directory, submitted), 30, "the jobs in the AOF")
            redis.process.kill()  # no shutdown save: only the append-only file keeps the jobs
            redis.process.wait(10)
            redis.start()
            jobs = [http.get(f"/v1/jobs/{job['id']}").json() for job in submitted]
            assert [j["status"] for j in jobs] == ["queued", "queued"], jobs
            assert http.get("/v1/jobs").json()["total"] == 2
            stack.start_worker("batch")
            for job in submitted:
                wait_for_job(http, job["id"])
    finally:
        redis.stop()


def test_a_worker_shut_down_mid_training_requeues_it_for_another(make_stack) -> None:
    """SIGTERM (a deploy, Ctrl-C): the training checkpoints and is requeued; the next worker resumes."""
    stack, _ = batch_stack(make_stack, "first")
    with stack.client() as http:
        run_id = capture_run(http, LAYER, TEXTS)
        job_id, sae_id = submit_training(http, run_id, token_budget=200_000, checkpoint_every=100)
        before = wait_for_progress(http, job_id, minimum=0.02)

        assert stack.stop("first", timeout_s=120) == 0  # warm shutdown: the worker exits by itself
        job = http.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "queued" and "requeued" in job["message"], job

        stack.start_worker("batch", name="second")
        resumed = wait_for_progress(http, job_id)
        assert resumed["progress"] >= before["progress"] * 0.9, (resumed["progress"], before["progress"])
        done = wait_for_job(http, job_id, timeout_s=240)
        assert done["result"]["sae_id"] == sae_id
        assert sae_id in [s["id"] for s in http.get("/v1/saes").json()["items"]]
