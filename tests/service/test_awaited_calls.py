"""Awaited calls under load, and hub ids: real Redis, real workers, real HTTP.

- An encode answers while a long generate runs: generation has its own queue and worker.
- A call that outlives ``interactive_timeout_s`` answers 202 with its job, whose result then
  holds the answer (never a 504 and a lost result).
- A hub id that is neither cached nor allowed is refused before any job is queued (422 naming the
  setting); one that is allowed but cannot be had (offline, or a hub that never answers) fails
  within the probe's timeout (424), and the worker it ran on serves the next call.

Ordering is read from the jobs' own timestamps, never from wall-clock bounds.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from service_stack import READY_TIMEOUT_S, TEXTS, Stack, assert_error, wait_for_job, wait_until

from kestrel.core.models import DEFAULT_MODEL

MODEL = "tiny-llama"
LAYER = "model.layers.1"
# Counting continues for as long as it is let: greedy decoding of SmolLM2 never ends it early.
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"


@pytest.fixture(scope="module")
def sae_id(service: Stack) -> str:
    """A run and a 64-latent SAE on the tiny model, made through the API."""
    with service.client() as http:
        body = {"model": MODEL, "layers": [LAYER], "dataset": {"kind": "texts", "texts": TEXTS}}
        run = wait_for_job(http, http.post("/v1/activations", json=body).json()["id"])
        train = {"run_id": run["artifacts"]["run_id"], "layer": LAYER, "sae": {"n_latents": 64, "k": 4}}
        train["train"] = {"batch_size": 64, "token_budget": 2_000}
        return wait_for_job(http, http.post("/v1/saes", json=train).json()["id"])["artifacts"]["sae_id"]


def moment(job: dict, field: str) -> datetime:
    return datetime.fromisoformat(job[field])


def test_an_encode_answers_while_a_long_generate_runs(
    service: Stack, client: httpx.Client, sae_id: str
) -> None:
    assert client.post(f"/v1/saes/{sae_id}/encode", json={"text": "warm up"}).status_code == 200
    generated: dict[str, httpx.Response] = {}
    body = {"prompts": [COUNTING] * 4, "max_new_tokens": 256}

    def generate() -> None:
        with httpx.Client(base_url=service.base_url, timeout=300.0) as http:
            generated["response"] = http.post(f"/v1/models/{DEFAULT_MODEL}/generate", json=body)

    thread = threading.Thread(target=generate)
    thread.start()
    try:

        def generating() -> str | None:
            page = client.get("/v1/jobs", params={"kind": "generate", "status": "started"}).json()
            return page["items"][0]["id"] if page["items"] else None

        generate_id = wait_until(generating, READY_TIMEOUT_S, "the generate to start", service)
        encoded = client.post(f"/v1/saes/{sae_id}/encode", json={"text": "The cat sat on the mat."})
        assert encoded.status_code == 200, encoded.text  # not a 504, not a 202: it did not queue behind
        assert encoded.json()["tokens"]
    finally:
        thread.join(300)
    response = generated["response"]
    assert response.status_code in (200, 202), response.text
    generate_job = wait_for_job(client, generate_id, timeout_s=300)
    encode_job = client.get(f"/v1/jobs/{encoded.json()['job_id']}").json()
    assert (encode_job["queue"], generate_job["queue"]) == ("interactive", "generate")
    # the encode started while the generate ran, and ended before it did
    assert moment(generate_job, "started_at") <= moment(encode_job, "started_at")
    assert moment(encode_job, "ended_at") < moment(generate_job, "ended_at")
    assert generate_job["result"]["items"][0]["default"]["text"]


@pytest.mark.parametrize("name", ["gpt2", "0", "00", "nobody/nothing-at-all"])
def test_hub_ids_not_allowed_are_refused_before_any_job(client: httpx.Client, name: str) -> None:
    def jobs() -> int:
        return client.get("/v1/jobs", params={"limit": 1}).json()["total"]

    before = jobs()
    calls = [
        client.post(f"/v1/models/{name}/load"),
        client.get(f"/v1/models/{name}/layers"),
        client.post(f"/v1/models/{name}/generate", json={"prompts": ["Hi"]}),
        client.post(
            "/v1/activations",
            json={"model": name, "layers": [LAYER], "dataset": {"kind": "texts", "texts": ["a"]}},
        ),
    ]
    for response in calls:
        error = assert_error(response, 422, "invalid_input")
        assert "KESTREL_ALLOWED_MODELS" in error["message"] and error["details"]["model"] == name
    dataset = {"kind": "hf", "name": "nobody/nothing-at-all"}
    capture = client.post("/v1/activations", json={"model": MODEL, "layers": [LAYER], "dataset": dataset})
    assert "KESTREL_ALLOWED_DATASETS" in assert_error(capture, 422, "invalid_input")["message"]
    assert jobs() == before  # refused up front: no worker was asked


# ---------------------------------------------------------------------------------------------
# Stacks of their own: a tiny wait, a hub that never answers


@pytest.fixture
def silent_hub() -> Iterator[str]:
    """A hub endpoint that accepts connections and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


def test_a_generate_past_the_wait_answers_202_and_its_job_holds_the_generation(
    make_stack, local_models: Path
) -> None:
    stack: Stack = make_stack(KESTREL_INTERACTIVE_TIMEOUT_S="0.2", KESTREL_MODEL_DIRS=str(local_models))
    stack.start_worker("generate")
    stack.start_api()
    stack.wait_ready({"generate": 1})
    with stack.client() as http:
        # a load and 128 tokens of SmolLM2 take more than 0.2 s on any machine
        response = http.post(
            f"/v1/models/{DEFAULT_MODEL}/generate", json={"prompts": [COUNTING], "max_new_tokens": 128}
        )
        assert response.status_code == 202, response.text
        job = response.json()
        assert response.headers["location"] == job["location"] == f"/v1/jobs/{job['id']}"
        assert (job["kind"], job["queue"]) == ("generate", "generate")
        assert job["status"] in ("queued", "started")
        finished = wait_for_job(http, job["id"], timeout_s=300)
        item = finished["result"]["items"][0]
        assert item["prompt"] == COUNTING and item["default"]["text"]
        assert 0 < len(item["default"]["token_ids"]) <= 128
        # a load past the wait is followed the same way (what `kestrel up`'s preload does)
        load = http.post("/v1/models/tiny-llama/load")
        assert load.status_code in (200, 202), load.text
        result = load.json() if load.status_code == 200 else wait_for_job(http, load.json()["id"])["result"]
        assert result["name"] == "tiny-llama" and result["d_model"] == 32


def test_allowed_hub_ids_that_cannot_be_had_fail_fast_with_424(
    make_stack, local_models: Path, silent_hub: str
) -> None:
    stack: Stack = make_stack(
        HF_HUB_OFFLINE="0",
        HF_ENDPOINT=silent_hub,
        KESTREL_ALLOWED_MODELS="nobody/*",
        KESTREL_HUB_TIMEOUT_S="1",
        KESTREL_MODEL_DIRS=str(local_models),
    )
    stack.start_worker("generate")
    stack.start_worker("interactive")
    stack.start_api()
    stack.wait_ready({"generate": 1, "interactive": 1})
    with stack.client() as http:
        for response in (
            http.post("/v1/models/nobody/model/load"),
            http.get("/v1/models/nobody/model/layers"),
        ):
            error = assert_error(response, 424, "hub_unavailable")
            assert "did not answer" in error["message"] and error["details"]["model"] == "nobody/model"
        assert_error(http.post("/v1/models/somebody/model/load"), 422, "invalid_input")  # not allowed
        # the workers the failures ran on serve the next calls
        generated = http.post(
            f"/v1/models/{MODEL}/generate", json={"prompts": ["Hello"], "max_new_tokens": 3}
        )
        assert generated.status_code == 200, generated.text
        assert http.get(f"/v1/models/{MODEL}/layers").status_code == 200


def test_up_preload_follows_slow_loads_and_warms_both_workers(make_stack) -> None:
    """`kestrel up`'s preload: a load past the wait is followed as a job, with its stage printed."""
    from kestrel.settings import Settings
    from kestrel.workers.supervisor import Preload

    stack: Stack = make_stack(KESTREL_INTERACTIVE_TIMEOUT_S="0.2")
    stack.start_worker("generate")
    stack.start_worker("interactive")
    stack.start_api()
    lines: list[str] = []
    # reading 540 MB of fp32 weights takes longer than 0.2 s: both loads answer 202 and are followed
    Preload(stack.base_url, Settings(preload_model=DEFAULT_MODEL), lines.append).run()
    text = "\n".join(lines)
    assert any(line.startswith("  generate worker: ") for line in lines), text  # a progress line
    assert f"model {DEFAULT_MODEL} loaded in the generate worker" in text, text
    assert f"model {DEFAULT_MODEL} loaded in the interactive worker" in text, text
    assert "failed" not in text and "504" not in text, text
    with stack.client() as http:
        holders = next(m for m in http.get("/v1/models").json()["items"] if m["name"] == DEFAULT_MODEL)
    assert sorted(h["queue"] for h in holders["loaded_by"]) == ["generate", "interactive"]


def test_a_generate_worker_killed_mid_generation_fails_its_job_and_a_new_one_serves(
    make_stack, local_models: Path
) -> None:
    """SIGKILL of the generate worker: the followed job reads failed (worker died), nothing waits
    forever, and a restarted worker serves the next generate."""
    stack: Stack = make_stack(
        KESTREL_INTERACTIVE_TIMEOUT_S="0.5",
        KESTREL_HEARTBEAT_TTL_S="6",
        KESTREL_HEARTBEAT_INTERVAL_S="1",
        KESTREL_MODEL_DIRS=str(local_models),
    )
    stack.start_worker("generate")
    stack.start_api()
    stack.wait_ready({"generate": 1})
    with stack.client() as http:
        body = {"prompts": [COUNTING] * 4, "max_new_tokens": 256}
        accepted = http.post(f"/v1/models/{DEFAULT_MODEL}/generate", json=body)
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["id"]
        wait_for_job(http, job_id, states=("started",))
        stack.kill("worker-generate")
        failed = wait_for_job(http, job_id, states=("failed",), timeout_s=180)
        assert failed["error"]["code"] == "worker_died", failed

        def no_generate_worker() -> bool:  # its liveness record expires within seconds
            ready = http.get("/ready").json()
            return not (ready.get("workers") or ready["error"]["details"]["workers"]).get("generate")

        wait_until(no_generate_worker, 60, "the killed worker's record to expire", stack)
        refused = assert_error(http.post(f"/v1/models/{MODEL}/generate", json={"prompts": ["Hi"]}), 503)
        assert "--queue generate" in refused["message"]
        stack.start_worker("generate", name="worker-generate-2")
        stack.wait_ready({"generate": 1})
        again = http.post(f"/v1/models/{MODEL}/generate", json={"prompts": ["Hi"], "max_new_tokens": 3})
        assert again.status_code in (200, 202), again.text
        if again.status_code == 202:
            assert wait_for_job(http, again.json()["id"])["result"]["items"][0]["default"]["text"] is not None
