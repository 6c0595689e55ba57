"""The graph analysis over HTTP (real Redis, real workers, the tiny Llama): transcoders of blocks 0
and 1 trained through the API, an attribution graph of one prompt over them (results, report and
drawing), and bad requests refused before queueing, each naming what is wrong."""

from __future__ import annotations

import httpx
import pytest
from service_stack import assert_error, tiny_transcoders, wait_for_job

MODEL = "tiny-llama"
PROMPT = "The capital of France is"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(service) -> tuple[str, list[str]]:
    """A run capturing blocks 0 and 1's MLP input and output, and a transcoder per block."""
    with service.client() as http:
        return tiny_transcoders(http, (0, 1))


def graph_request(transcoders: list[str], **extra: object) -> dict:
    return {"kind": "graph", "model": MODEL, "prompt": PROMPT, "transcoders": transcoders, **extra}


def test_graph_results_report_and_drawing(client: httpx.Client, trained: tuple[str, list[str]]) -> None:
    _, transcoders = trained
    submitted = client.post("/v1/analyses", json=graph_request(transcoders, target=" Paris"))
    assert submitted.status_code == 202, submitted.text
    job = wait_for_job(client, submitted.json()["id"])
    analysis_id = job["artifacts"]["analysis_id"]
    detail = client.get(f"/v1/analyses/{analysis_id}").json()
    assert detail["kind"] == "graph" and detail["source"]["blocks"] == [0, 1]
    assert detail["source"]["transcoders"] == transcoders

    results = detail["results"]
    assert results["prompt"] == PROMPT and results["target"]["token"] == " Paris"
    assert len(results["tokens"]) >= 5  # the prompt's tokens (and a BOS, if the tokenizer adds one)
    scores = results["scores"]
    assert set(scores) >= {"replacement", "completeness"}
    assert all(0.0 <= scores[name] <= 1.0 for name in ("replacement", "completeness")), scores
    kinds = [node["kind"] for node in results["nodes"]]
    assert kinds.count("logit") == 1 and "token" in kinds, kinds  # the answer and what it reads
    assert set(kinds) <= {"feature", "error", "token", "logit"}
    ids = {node["id"] for node in results["nodes"]}
    assert results["links"] and all(
        link["source"] in ids and link["target"] in ids for link in results["links"]
    )  # pruning leaves no link to a dropped node
    logit = next(node for node in results["nodes"] if node["kind"] == "logit")
    assert any(link["target"] == logit["id"] for link in results["links"])
    for node in results["nodes"]:
        assert node["layer"] in (None, 0, 1) and 0 <= node["position"] < len(results["tokens"])
    numbers = detail["key_numbers"]
    assert numbers["replacement"] == scores["replacement"] and numbers["links_kept"] == len(results["links"])

    report = client.get(f"/v1/analyses/{analysis_id}/report")
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/markdown")
    assert "replacement score" in report.text and "completeness score" in report.text
    assert "](plots/graph.png)" in report.text and "' Paris'" in report.text
    assert list(detail["plots"]) == ["graph"]
    plot = client.get(f"/v1/analyses/{analysis_id}/plots/graph")
    assert plot.status_code == 200 and plot.headers["content-type"] == "image/png"
    assert plot.content.startswith(PNG_MAGIC)
    kept_features = numbers["features_kept"]
    assert kept_features == kinds.count("feature") <= numbers["features"]
    assert ("No feature carries enough influence" in report.text) == (kept_features == 0)
    listed = client.get("/v1/analyses", params={"kind": "graph"}).json()["items"]
    assert analysis_id in [item["id"] for item in listed]

    # unpruned, the same graph keeps every active feature of both transcoders
    whole = client.post("/v1/analyses", json=graph_request(transcoders, target=" Paris", node_keep=1.0))
    assert whole.status_code == 202, whole.text
    unpruned_id = wait_for_job(client, whole.json()["id"])["artifacts"]["analysis_id"]
    unpruned_results = client.get(f"/v1/analyses/{unpruned_id}").json()["results"]
    assert unpruned_results["scores"] == pytest.approx(scores)  # pruning changes what is shown, not the graph
    features = [node for node in unpruned_results["nodes"] if node["kind"] == "feature"]
    assert {node["layer"] for node in features} == {0, 1}, features
    assert len(unpruned_results["nodes"]) > len(results["nodes"])


def test_graph_bad_requests(client: httpx.Client, trained: tuple[str, list[str]]) -> None:
    run_id, transcoders = trained
    plain = {"run_id": run_id, "layer": "model.layers.0.mlp", "sae": {"n_latents": 32, "k": 4}}
    plain["train"] = {"batch_size": 64, "token_budget": 1_000}
    sae_id = wait_for_job(client, client.post("/v1/saes", json=plain).json()["id"])["artifacts"]["sae_id"]
    before = client.get("/v1/jobs").json()["total"]

    not_one = assert_error(client.post("/v1/analyses", json=graph_request([transcoders[0], sae_id])), 422)
    assert not_one["code"] == "invalid_input" and sae_id in not_one["message"]
    assert "not a transcoder" in not_one["message"] and not_one["details"]["sae_id"] == sae_id
    unknown = "sae-20260101t000000-abcdef"
    missing = assert_error(client.post("/v1/analyses", json=graph_request([unknown])), 404, "not_found")
    assert unknown in missing["message"]
    repeated = assert_error(client.post("/v1/analyses", json=graph_request(transcoders[:1] * 2)), 422)
    assert "repeat" in repeated["message"]
    bad_id = assert_error(client.post("/v1/analyses", json=graph_request(["../sae"])), 422, "invalid_input")
    assert "../sae" in bad_id["message"]
    assert client.get("/v1/jobs").json()["total"] == before  # nothing was queued

    # Whether a target is one token needs the tokenizer, which only the worker loads.
    long_target = " antidisestablishmentarianism"
    submitted = client.post("/v1/analyses", json=graph_request(transcoders, target=long_target))
    assert submitted.status_code == 202, submitted.text
    failed = wait_for_job(client, submitted.json()["id"], states=("failed",))
    assert failed["error"]["code"] == "invalid_input"
    assert long_target in failed["error"]["message"] and "one token" in failed["error"]["message"]
    assert failed["artifacts"]["analysis_id"] not in [
        item["id"] for item in client.get("/v1/analyses", params={"kind": "graph"}).json()["items"]
    ]  # a failed analysis leaves nothing listed
