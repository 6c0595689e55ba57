"""Analyses over HTTP: real Redis, real workers, the API under uvicorn, on the tiny local Llama
(SmolLM2's tokenizer), so every analysis job takes about a second."""

from __future__ import annotations

import httpx
import pytest
from service_stack import TEXTS, assert_error, wait_for_job

MODEL = "tiny-llama"
LAYER = "model.layers.1"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_id(service) -> str:
    with service.client() as http:
        body = {"model": MODEL, "layers": [LAYER], "dataset": {"kind": "texts", "texts": TEXTS}}
        return wait_for_job(http, http.post("/v1/activations", json=body).json()["id"])["artifacts"]["run_id"]


def start(http: httpx.Client, body: dict) -> dict:
    """Submit an analysis; the finished job."""
    submitted = http.post("/v1/analyses", json=body)
    assert submitted.status_code == 202, submitted.text
    assert submitted.headers["Location"] == f"/v1/jobs/{submitted.json()['id']}"
    return wait_for_job(http, submitted.json()["id"])


def test_neuron_analysis_results_report_plot_list_delete(client: httpx.Client, run_id: str) -> None:
    job = start(client, {"kind": "neuron", "run_id": run_id, "layer": LAYER, "outlier_factor": 5})
    analysis_id = job["artifacts"]["analysis_id"]
    assert job["result"]["analysis_id"] == analysis_id and job["result"]["kind"] == "neuron"
    detail = client.get(f"/v1/analyses/{analysis_id}").json()
    assert detail["source"]["run_id"] == run_id and detail["source"]["d"] == 32
    assert len(detail["results"]["per_dimension"]["kurtosis"]) == 32
    assert set(detail["plots"]) == {"dimensions", "kurtosis"}
    report = client.get(f"/v1/analyses/{analysis_id}/report")
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/markdown")
    assert "## What was measured" in report.text and run_id in report.text
    assert "](plots/dimensions.png)" in report.text
    for name in ("dimensions", "kurtosis.png"):
        plot = client.get(f"/v1/analyses/{analysis_id}/plots/{name}")
        assert plot.headers["content-type"] == "image/png" and plot.content.startswith(PNG_MAGIC)
    listed = client.get("/v1/analyses", params={"kind": "neuron"}).json()
    assert analysis_id in [item["id"] for item in listed["items"]]
    circuits = client.get("/v1/analyses", params={"kind": "circuit"}).json()["items"]
    assert analysis_id not in [item["id"] for item in circuits]
    missing_plot = assert_error(client.get(f"/v1/analyses/{analysis_id}/plots/heatmap"), 404, "not_found")
    assert "dimensions, kurtosis" in missing_plot["message"]
    assert_error(client.get(f"/v1/analyses/{analysis_id}/plots/..%2Fmanifest.json"), 404)
    assert_error(client.get(f"/v1/analyses/{analysis_id}/plots/Bad Name"), 422)
    assert client.delete(f"/v1/analyses/{analysis_id}").status_code == 200
    for path in ("", "/report", "/plots/dimensions"):
        assert_error(client.get(f"/v1/analyses/{analysis_id}{path}"), 404, "not_found")


def test_feature_causal_and_circuit_analyses_run_on_the_worker(client: httpx.Client, run_id: str) -> None:
    feature = start(client, {"kind": "feature", "run_id": run_id, "layer": LAYER, "n_clusters": 3})
    clusters = client.get(f"/v1/analyses/{feature['artifacts']['analysis_id']}").json()["results"]["clusters"]
    assert len(clusters) == 3 and "«" in clusters[0]["nearest"][0]["context"]
    causal = {
        "kind": "causal",
        "model": MODEL,
        "layers": ["model.layers.0.mlp", "model.layers.2.mlp"],
        "dataset": {"kind": "texts", "texts": TEXTS[:4]},
        "methods": ["zero"],
    }
    ranking = start(client, causal)["result"]["key_numbers"]
    assert ranking["n_targets"] == 2 and ranking["top_target"] in causal["layers"]
    pair = {"clean": "The cat sat", "corrupted": "The dog sat", "correct": " down", "wrong": " up"}
    circuit = start(
        client, {"kind": "circuit", "model": MODEL, "pairs": [pair], "layers": ["model.layers.0"]}
    )
    detail = client.get(f"/v1/analyses/{circuit['artifacts']['analysis_id']}").json()
    assert len(detail["results"]["fraction_restored"][0]) == len(detail["results"]["positions"])
    uneven = {**pair, "corrupted": "The big dog sat"}
    submitted = client.post("/v1/analyses", json={"kind": "circuit", "model": MODEL, "pairs": [uneven]})
    failed = wait_for_job(client, submitted.json()["id"], states=("failed",))
    assert failed["error"]["code"] == "invalid_input"
    assert "must have the same number of tokens" in failed["error"]["message"]


def test_circuit_attribution_with_heads_confirms_and_reports_agreement(client: httpx.Client) -> None:
    pair = {"clean": "The cat sat", "corrupted": "The dog sat", "correct": " down", "wrong": " up"}
    body = {"kind": "circuit", "model": MODEL, "pairs": [pair], "components": ["resid", "heads"]}
    body["confirm_top"] = 3
    job = start(client, body)
    analysis_id = job["artifacts"]["analysis_id"]
    detail = client.get(f"/v1/analyses/{analysis_id}").json()
    results, key = detail["results"], detail["key_numbers"]
    assert results["method"] == "atp" and key["method"] == "atp" and key["atp_seconds"] > 0
    assert results["timings"]["n_patched"] == 6
    for kind in ("resid", "heads"):
        agreement = results["agreement"][kind]
        assert agreement["n_cells"] == 3 and agreement["over"] == "confirmed"
        assert len(results["components"][kind]["confirmed"]) == 3
    assert set(detail["plots"]) == {"patching", "heads", "agreement"}
    for name in detail["plots"]:
        assert client.get(f"/v1/analyses/{analysis_id}/plots/{name}").content.startswith(PNG_MAGIC)
    assert "Spearman" in client.get(f"/v1/analyses/{analysis_id}/report").text
    missing = client.post("/v1/analyses", json={**body, "components": ["latents"], "sae_id": "sae-nope"})
    assert "sae-nope" in assert_error(missing, 404, "not_found")["message"]
    no_sae = client.post("/v1/analyses", json={**body, "components": ["latents"]})
    assert "needs sae_id" in assert_error(no_sae, 422, "invalid_input")["message"]
    bad = client.post("/v1/analyses", json={**body, "method": "guess"})
    assert "method" in assert_error(bad, 422, "invalid_input")["message"]


def test_bad_requests_are_rejected_before_queueing(client: httpx.Client, run_id: str) -> None:
    missing_run = client.post("/v1/analyses", json={"kind": "neuron", "run_id": "run-nope", "layer": LAYER})
    assert "run-nope" in assert_error(missing_run, 404, "not_found")["message"]
    wrong_layer = client.post(
        "/v1/analyses", json={"kind": "neuron", "run_id": run_id, "layer": "model.layers.7"}
    )
    assert "model.layers.1" in assert_error(wrong_layer, 404, "not_found")["message"]
    assert_error(client.post("/v1/analyses", json={"kind": "pca", "run_id": run_id}), 422, "invalid_input")
    same = {"clean": "a", "corrupted": "b", "correct": " x", "wrong": " x"}
    error = assert_error(client.post("/v1/analyses", json={"kind": "circuit", "pairs": [same]}), 422)
    assert "correct and wrong must be different" in error["message"]
    no_target = {"kind": "causal", "dataset": {"kind": "texts", "texts": ["a b c"]}}
    assert (
        "layers to ablate, or sae_id"
        in assert_error(client.post("/v1/analyses", json=no_target), 422)["message"]
    )
    bad_model = {**no_target, "layers": ["model.layers.0"], "model": "../etc"}
    assert_error(client.post("/v1/analyses", json=bad_model), 422, "invalid_input")
    unknown_sae = {**no_target, "sae_id": "sae-nope", "latents": [1]}
    assert_error(client.post("/v1/analyses", json=unknown_sae), 404, "not_found")
    assert_error(client.get("/v1/analyses/analysis-nope"), 404, "not_found")
    assert_error(client.get("/v1/analyses/NOT_AN_ID"), 422)


def test_an_uploaded_dataset_is_recorded_by_id_never_by_the_workers_path(client: httpx.Client) -> None:
    texts = "".join(f"{text}\n" for text in TEXTS[:4]).encode()
    uploaded = client.post("/v1/uploads", files={"file": ("texts.txt", texts, "text/plain")})
    assert uploaded.status_code == 201, uploaded.text
    upload_id = uploaded.json()["id"]
    body = {
        "kind": "causal",
        "model": MODEL,
        "layers": ["model.layers.0.mlp"],
        "dataset": {"kind": "upload", "upload_id": upload_id},
        "methods": ["zero"],
    }
    analysis_id = start(client, body)["artifacts"]["analysis_id"]
    detail = client.get(f"/v1/analyses/{analysis_id}").json()
    assert detail["config"]["dataset"]["kind"] == "upload"
    assert detail["config"]["dataset"]["upload_id"] == upload_id
    assert detail["source"]["dataset"]["upload_id"] == upload_id
    report = client.get(f"/v1/analyses/{analysis_id}/report").text
    for text in (str(detail), report):
        assert "data.txt" not in text and '"file"' not in text, "a path in the store reached the client"
