"""What must survive: a worker SIGKILLed mid-training, an API restart, a Redis restart; and a
training cancelled mid-way, which stops within 5 s and resumes from its checkpoint."""

from __future__ import annotations

import time

from service_stack import TEXTS, capture_run, wait_for_job, wait_until

from kestrel.workers.runner import EmbeddedRedis, free_port

LAYER = "model.layers.3"
LONG_TRAINING = {"batch_size": 64, "token_budget": 50_000_000, "log_every": 5, "checkpoint_every": 50}


def wait_for_progress(http, job_id: str, minimum: float = 0.0, timeout_s: float = 120.0) -> dict:
    """Until the job runs and has reported progress above ``minimum``."""

    def progressed():
        job = http.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] in ("queued", "started"), job
        return job if job["status"] == "started" and job["progress"] > minimum and job["metrics"] else None

    return wait_until(progressed, timeout_s, f"job {job_id} to progress past {minimum}")


def test_worker_killed_mid_training_fails_its_job_within_60_s(make_stack) -> None:
    stack = make_stack()
    stack.start_worker("batch")
    stack.start_api()
    stack.wait_ready({"batch": 1})
    with stack.client() as http:
        run_id = capture_run(http, LAYER, TEXTS)
        body = {"run_id": run_id, "layer": LAYER, "sae": {"n_latents": 256, "k": 8}, "train": LONG_TRAINING}
        submitted = http.post("/v1/saes", json=body).json()
        job_id, sae_id = submitted["id"], submitted["artifacts"]["sae_id"]
        wait_for_progress(http, job_id)

        stack.kill("worker-batch")
        killed_at = time.monotonic()
        job = wait_for_job(http, job_id, states=("failed", "queued"), timeout_s=60)
        elapsed = time.monotonic() - killed_at
        assert elapsed < 60, elapsed
        assert job["status"] == "failed", job
        assert "worker died" in job["error"]["message"], job["error"]
        assert job["error"]["code"] == "worker_died"
        assert sae_id not in [s["id"] for s in http.get("/v1/saes").json()["items"]]
        assert not (stack.store_root / "saes" / sae_id).exists()
        assert http.get("/metrics").text.count('kestrel_jobs{queue="batch",state="started"} 0.0') == 1


def test_cancel_stops_training_within_5_s_and_it_resumes(client, service) -> None:
    run_id = capture_run(client, LAYER, TEXTS)
    train = {"batch_size": 64, "token_budget": 200_000, "log_every": 5, "checkpoint_every": 100}
    body = {"run_id": run_id, "layer": LAYER, "sae": {"n_latents": 256, "k": 8}, "train": train}
    submitted = client.post("/v1/saes", json=body).json()
    job_id, sae_id = submitted["id"], submitted["artifacts"]["sae_id"]
    before = wait_for_progress(client, job_id, minimum=0.02)

    cancelled = client.post(f"/v1/jobs/{job_id}/cancel")
    assert cancelled.status_code == 202, cancelled.text
    # What happened, not just "started": the job stops at its next step (or already has).
    answer = cancelled.json()
    assert (answer["status"], answer["cancel_requested"]) in (("started", True), ("canceled", False))
    assert cancelled.content.endswith(b"}\n")
    asked_at = time.monotonic()
    job = wait_for_job(client, job_id, states=("canceled",), timeout_s=30)
    assert time.monotonic() - asked_at < 5.0, f"{job}\n{service.log_tail()}"
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
        done = wait_for_job(http, submitted["id"], timeout_s=120)
        assert done["result"]["run_id"] == submitted["artifacts"]["run_id"]


def test_restarting_redis_with_persistence_loses_no_queued_job(make_stack, tmp_path) -> None:
    redis = EmbeddedRedis(tmp_path / "redis", free_port()).start()
    try:
        stack = make_stack(redis_url=redis.url)
        stack.start_api()
        with stack.client() as http:
            body = {"layers": [LAYER], "dataset": {"kind": "texts", "texts": TEXTS[:3]}}
            submitted = [http.post("/v1/activations", json=body).json() for _ in range(2)]
            redis.process.kill()  # no shutdown save: only the append-only file keeps the jobs
            redis.process.wait(10)
            redis.start()
            jobs = [http.get(f"/v1/jobs/{job['id']}").json() for job in submitted]
            assert [j["status"] for j in jobs] == ["queued", "queued"], jobs
            assert http.get("/v1/jobs").json()["total"] == 2
            stack.start_worker("batch")
            for job in submitted:
                wait_for_job(http, job["id"], timeout_s=120)
    finally:
        redis.stop()


def test_a_worker_shut_down_mid_training_requeues_it_for_another(make_stack) -> None:
    """SIGTERM (a deploy, Ctrl-C): the training checkpoints and is requeued; the next worker resumes."""
    stack = make_stack()
    stack.start_worker("batch", name="first")
    stack.start_api()
    stack.wait_ready({"batch": 1})
    with stack.client() as http:
        run_id = capture_run(http, LAYER, TEXTS)
        train = {"batch_size": 64, "token_budget": 200_000, "log_every": 5, "checkpoint_every": 100}
        body = {"run_id": run_id, "layer": LAYER, "sae": {"n_latents": 256, "k": 8}, "train": train}
        submitted = http.post("/v1/saes", json=body).json()
        job_id, sae_id = submitted["id"], submitted["artifacts"]["sae_id"]
        before = wait_for_progress(http, job_id, minimum=0.02)

        assert stack.stop("first", timeout_s=30) == 0  # warm shutdown: the worker exits by itself
        job = http.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "queued" and "requeued" in job["message"], job

        stack.start_worker("batch", name="second")
        resumed = wait_for_progress(http, job_id)
        assert resumed["progress"] >= before["progress"] * 0.9, (resumed["progress"], before["progress"])
        done = wait_for_job(http, job_id, timeout_s=240)
        assert done["result"]["sae_id"] == sae_id
        assert sae_id in [s["id"] for s in http.get("/v1/saes").json()["items"]]
