"""Stream training over HTTP: one POST /v1/saes with a dataset and a list of SAEs is one job that
runs the model once and publishes N SAEs (each with its own metrics and curves), plus the spilled
run; malformed stream requests are refused before anything is queued."""

from __future__ import annotations

import json

import httpx
from service_stack import JOB_TIMEOUT_S, Stack, assert_error, wait_for_job, wait_until

TEXTS = [
    f"the {w} sat on the mat number {i} and looked around the room."
    for i, w in enumerate(["cat", "dog"] * 40)
]
SAES = [
    {"layer": layer, "sae": sae, "train": {"batch_size": 64}}
    for layer in ("model.layers.0", "model.layers.2")
    for sae in (
        {"architecture": "topk", "n_latents": 64, "k": 4},
        {"architecture": "topk", "n_latents": 96, "k": 8},
    )
]


def test_one_job_trains_n_saes_from_one_pass_and_spills_the_run(client: httpx.Client, service: Stack) -> None:
    body = {
        "model": "tiny-llama",
        "dataset": {"kind": "texts", "texts": TEXTS},
        "saes": SAES,
        "spill": True,
    }
    accepted = client.post("/v1/saes", json=body)
    assert accepted.status_code == 202, accepted.text
    job = wait_for_job(client, accepted.json()["id"])
    sae_ids, run_id = job["artifacts"]["sae_ids"], job["artifacts"]["run_id"]
    assert len(sae_ids) == len(set(sae_ids)) == 4 and job["result"]["sae_ids"] == sae_ids
    run = client.get(f"/v1/activations/{run_id}").json()
    assert sorted(run["layers"]) == ["model.layers.0", "model.layers.2"] and run["n_docs"] == len(TEXTS)
    for sae_id, request in zip(sae_ids, SAES, strict=True):
        sae = client.get(f"/v1/saes/{sae_id}").json()
        assert sae["status"] == "complete" and sae["layer"] == request["layer"] and sae["run_id"] == run_id
        assert sae["config"]["n_latents"] == request["sae"]["n_latents"]
        assert 0 < sae["metrics"]["fvu"] < 1  # held-out documents
        history = client.get(f"/v1/saes/{sae_id}/history")
        assert history.status_code == 200 and history.json()["points"], history.text


def test_malformed_stream_requests_are_refused_before_queueing(client: httpx.Client) -> None:
    texts = {"kind": "texts", "texts": TEXTS[:4]}
    mixed = {"run_id": "run-x", "dataset": texts, "saes": SAES[:1]}
    assert "not both" in assert_error(client.post("/v1/saes", json=mixed), 422, "invalid_input")["message"]
    no_saes = {"dataset": texts}
    assert "saes is missing" in assert_error(client.post("/v1/saes", json=no_saes), 422)["message"]
    epochs = {"dataset": texts, "saes": [{**SAES[0], "train": {"epochs": 3}}]}
    assert "one pass" in assert_error(client.post("/v1/saes", json=epochs), 422)["message"]
    assert_error(client.post("/v1/saes", json={"dataset": texts, "saes": []}), 422)


LONG_DOCS = 10_000  # an uploaded dataset at a point a step: many minutes for a whole pass


def _long_dataset(client: httpx.Client) -> dict:
    """An uploaded JSONL dataset far longer than the test waits (inline texts are capped)."""
    lines = "".join(json.dumps({"text": TEXTS[i % len(TEXTS)]}) + "\n" for i in range(LONG_DOCS))
    uploaded = client.post("/v1/uploads", files={"file": ("long.jsonl", lines.encode(), "text/plain")})
    assert uploaded.status_code == 201, uploaded.text
    return {"kind": "upload", "upload_id": uploaded.json()["id"], "text_field": "text"}


def _point(client: httpx.Client, job_id: str, sae_id: str) -> dict | None:
    """The SAE's latest progress point in the job's metrics, once it has taken a step."""
    job = client.get(f"/v1/jobs/{job_id}").json()
    point = ((job.get("metrics") or {}).get("saes") or {}).get(sae_id)
    return point if point and point.get("step", 0) >= 1 else None


def test_one_sae_of_a_stream_job_is_cancelled_alone_and_resumed(client: httpx.Client) -> None:
    """``POST /v1/saes/{id}/cancel`` stops one SAE with its checkpoint while the job trains the
    other to the end; ``resume_from`` then continues that SAE from its checkpoint in a job of its
    own. No wait depends on speed: the cancelled SAE reads a dataset far longer than the test (it
    is cancelled once it has stepped), the other stops at a small token budget."""
    train = {"batch_size": 8, "log_every": 1}
    long_sae = {**SAES[0], "train": train}
    short_sae = {**SAES[1], "train": {**train, "token_budget": 256}}
    body = {"model": "tiny-llama", "dataset": _long_dataset(client), "saes": [long_sae, short_sae]}
    accepted = client.post("/v1/saes", json=body)
    assert accepted.status_code == 202, accepted.text
    job_id, (long_id, short_id) = accepted.json()["id"], accepted.json()["artifacts"]["sae_ids"]
    wait_until(lambda: _point(client, job_id, long_id), JOB_TIMEOUT_S, f"{long_id} to take a step")

    cancelled = client.post(f"/v1/saes/{long_id}/cancel")
    assert cancelled.status_code == 202, cancelled.text
    assert cancelled.json()["id"] == job_id and not cancelled.json()["cancel_requested"]  # the job goes on
    job = wait_for_job(client, job_id)
    stopped, published = job["result"]["saes"][long_id], job["result"]["saes"][short_id]
    assert stopped["status"] == "stopped" and stopped["checkpoint"] and stopped["step"] >= 1, stopped
    assert published["status"] == "complete", published
    assert client.get(f"/v1/saes/{short_id}").json()["status"] == "complete"
    assert_error(client.get(f"/v1/saes/{long_id}"), 404)
    assert long_id in job["message"]  # "finished: 1 SAEs published; cancelled: <id>"
    assert_error(client.post(f"/v1/saes/{short_id}/cancel"), 409, "conflict")
    assert_error(client.post("/v1/saes/sae-unknown/cancel"), 404)
    mixed = client.post("/v1/saes", json={"resume_from": long_id, "train": {"batch_size": 16}})
    assert "resume_from alone" in assert_error(mixed, 422, "invalid_input")["message"]

    resumed = client.post("/v1/saes", json={"resume_from": long_id})
    assert resumed.status_code == 202, resumed.text
    resumed_id = resumed.json()["id"]
    assert resumed.json()["artifacts"]["sae_ids"] == [long_id] and resumed_id != job_id
    later = wait_until(
        lambda: (p := _point(client, resumed_id, long_id)) and p["step"] > stopped["step"] and p,
        JOB_TIMEOUT_S,
        f"{long_id} to step on from its checkpoint",
    )
    assert later["tokens"] > stopped["tokens"]
    again = client.post("/v1/saes", json={"resume_from": long_id})  # its job still holds it
    assert "still held by its training job" in assert_error(again, 409, "conflict")["message"]
    assert client.post(f"/v1/saes/{long_id}/cancel").json()["cancel_requested"]  # its own job: all of it
    final = wait_for_job(client, resumed_id, states=("canceled",))
    assert final["result"]["saes"][long_id]["step"] >= later["step"]


def _transcoder_entry(block: int) -> dict:
    mlp = f"model.layers.{block}.mlp"
    sae = {"architecture": "topk", "n_latents": 32, "k": 4}
    return {"layer": f"{mlp}:input", "target_layer": mlp, "sae": sae, "train": {"batch_size": 64}}


def test_one_pass_trains_a_transcoder_per_block_and_a_graph_uses_them(client: httpx.Client) -> None:
    """Both sides of two blocks' MLPs in one stream job: each transcoder is published as such (its
    target layer, d_out, FVU against the MLP's output) and an attribution graph accepts them."""
    body = {
        "model": "tiny-llama",
        "dataset": {"kind": "texts", "texts": TEXTS},
        "saes": [_transcoder_entry(0), _transcoder_entry(1)],
    }
    accepted = client.post("/v1/saes", json=body)
    assert accepted.status_code == 202, accepted.text
    sae_ids = wait_for_job(client, accepted.json()["id"])["artifacts"]["sae_ids"]
    for block, sae_id in enumerate(sae_ids):
        sae = client.get(f"/v1/saes/{sae_id}").json()
        assert sae["kind"] == "transcoder" and sae["target_layer"] == f"model.layers.{block}.mlp"
        assert (
            sae["layer"] == f"model.layers.{block}.mlp:input"
            and sae["config"]["d_out"] == sae["config"]["d_in"]
        )
        assert 0 < sae["metrics"]["fvu"] < 1
    graph = {"kind": "graph", "model": "tiny-llama", "prompt": "The cat sat on the", "transcoders": sae_ids}
    submitted = client.post("/v1/analyses", json={**graph, "node_keep": 1.0})
    assert submitted.status_code == 202, submitted.text
    analysis_id = wait_for_job(client, submitted.json()["id"])["artifacts"]["analysis_id"]
    scores = client.get(f"/v1/analyses/{analysis_id}").json()["key_numbers"]
    assert 0 <= scores["completeness"] <= 1 and 0 <= scores["replacement"] <= 1


def test_malformed_stream_transcoders_are_refused_before_queueing(client: httpx.Client) -> None:
    texts = {"kind": "texts", "texts": TEXTS[:4]}
    same = {**_transcoder_entry(0), "target_layer": "model.layers.0.mlp:input"}
    refused = assert_error(client.post("/v1/saes", json={"dataset": texts, "saes": [same]}), 422)
    assert "target_layer is the input layer" in refused["message"]
    skip = {**SAES[0], "sae": {**SAES[0]["sae"], "skip": True}}
    refused = assert_error(client.post("/v1/saes", json={"dataset": texts, "saes": [skip]}), 422)
    assert "saes[0].target_layer" in refused["message"]
    relu = {**_transcoder_entry(0), "sae": {"architecture": "relu_l1", "n_latents": 32}}
    refused = assert_error(client.post("/v1/saes", json={"dataset": texts, "saes": [relu]}), 422)
    assert "a transcoder trains with architecture topk or batchtopk" in refused["message"]
    top = {"dataset": texts, "saes": SAES[:1], "target_layer": "model.layers.0.mlp"}
    assert "per SAE" in assert_error(client.post("/v1/saes", json=top), 422)["message"]
