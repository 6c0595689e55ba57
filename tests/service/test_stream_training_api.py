"""Stream training over HTTP: one POST /v1/saes with a dataset and a list of SAEs is one job that
runs the model once and publishes N SAEs (each with its own metrics and curves), plus the spilled
run; malformed stream requests are refused before anything is queued."""

from __future__ import annotations

import httpx
from service_stack import Stack, assert_error, wait_for_job

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
