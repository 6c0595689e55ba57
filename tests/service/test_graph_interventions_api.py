"""Testing a graph's feature nodes over HTTP (real Redis, real workers, the tiny Llama): transcoders
of blocks 0 and 1 trained through the API, an unpruned graph over them, then edits of its feature
nodes answered by the interactive worker; and every request the graph cannot serve refused before
anything is queued, each naming what is wrong."""

from __future__ import annotations

import httpx
import pytest
from service_stack import assert_error, tiny_transcoders, wait_for_job

MODEL = "tiny-llama"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def graph(service) -> dict:
    """An unpruned graph (every active feature a node) and a neuron analysis of the same run."""
    with service.client() as http:
        run_id, transcoders = tiny_transcoders(http, (0, 1))
        body = {
            "kind": "graph",
            "model": MODEL,
            "prompt": PROMPT,
            "transcoders": transcoders,
            "node_keep": 1.0,
        }
        submitted = http.post("/v1/analyses", json=body)
        assert submitted.status_code == 202, submitted.text
        analysis_id = wait_for_job(http, submitted.json()["id"])["artifacts"]["analysis_id"]
        neuron = {"kind": "neuron", "run_id": run_id, "layer": "model.layers.0.mlp"}
        other = wait_for_job(http, http.post("/v1/analyses", json=neuron).json()["id"])
        results = http.get(f"/v1/analyses/{analysis_id}").json()["results"]
    return {
        "id": analysis_id,
        "results": results,
        "transcoders": transcoders,
        "neuron_id": other["artifacts"]["analysis_id"],
    }


def intervene(client: httpx.Client, analysis_id: str, **body: object) -> httpx.Response:
    return client.post(f"/v1/analyses/{analysis_id}/graph/interventions", json=body)


def strongest_feature(results: dict) -> dict:
    return max((n for n in results["nodes"] if n["kind"] == "feature"), key=lambda n: n["activation"])


def test_graph_json_names_the_transcoders(graph: dict) -> None:
    results, (block0, block1) = graph["results"], graph["transcoders"]
    assert results["transcoders"] == {"0": block0, "1": block1}
    features = [n for n in results["nodes"] if n["kind"] == "feature"]
    assert features and all(n["sae_id"] == results["transcoders"][str(n["layer"])] for n in features)


def test_ablating_a_feature_on_the_real_model(client: httpx.Client, graph: dict) -> None:
    node = strongest_feature(graph["results"])
    edit = {"node": node["id"], "scale": 0.0}
    answer = intervene(client, graph["id"], edits=[edit], top_k=5, max_new_tokens=3)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["analysis_id"] == graph["id"]
    job = client.get(f"/v1/jobs/{body['job_id']}").json()
    assert job["kind"] == "graph_intervention" and job["status"] == "finished"
    target = body["target"]
    assert target["token"] == graph["results"]["target"]["token"]
    assert target["logit_after"] != target["logit_before"]  # the feature writes into the answer
    for side in ("top_before", "top_after"):
        tops = body[side]
        assert len(tops) == 5 and all(0.0 <= t["prob"] <= 1.0 for t in tops)
        assert [t["logit"] for t in tops] == sorted((t["logit"] for t in tops), reverse=True)
    assert body["top_before"][0]["token"] == target["token"]  # the graph explained the top token
    assert isinstance(body["continuation_before"], str) and isinstance(body["continuation_after"], str)
    [edited] = body["edits"]
    assert edited["node"] == node["id"]
    assert edited["sae_id"] == node["sae_id"] and edited["latent"] == node["latent"]
    assert (edited["layer"], edited["position"]) == (node["layer"], node["position"])
    assert edited["activation_before"] == pytest.approx(node["activation"], rel=1e-4)
    assert edited["activation_after"] == 0.0

    unchanged = intervene(client, graph["id"], edits=[{"node": node["id"], "scale": 1.0}]).json()
    assert unchanged["target"]["logit_after"] == pytest.approx(unchanged["target"]["logit_before"], rel=1e-6)
    assert unchanged["continuation_before"] is None and unchanged["continuation_after"] is None
    assert unchanged["target"]["logit_before"] == pytest.approx(target["logit_before"], rel=1e-6)


def test_requests_a_graph_cannot_serve_are_refused(client: httpx.Client, graph: dict) -> None:
    results, analysis_id = graph["results"], graph["id"]
    feature = strongest_feature(results)
    error_node = next(n for n in results["nodes"] if n["kind"] == "error")
    before = client.get("/v1/jobs").json()["total"]

    unknown = "analysis-20260101t000000-abcdef"
    missing = assert_error(intervene(client, unknown, edits=[{"node": feature["id"], "scale": 0}]), 404)
    assert missing["code"] == "not_found" and unknown in missing["message"]
    neuron = assert_error(intervene(client, graph["neuron_id"], edits=[{"node": "0_1_2", "scale": 0}]), 422)
    assert "neuron analysis" in neuron["message"] and neuron["details"]["kind"] == "neuron"
    typo = f"{feature['id']}9"
    no_node = assert_error(intervene(client, analysis_id, edits=[{"node": typo, "scale": 0}]), 422)
    assert f"no node '{typo}'" in no_node["message"] and no_node["details"]["node"] == typo
    not_feature = assert_error(
        intervene(client, analysis_id, edits=[{"node": error_node["id"], "value": 1}]), 422
    )
    assert "is a error node" in not_feature["message"] and not_feature["details"]["kind"] == "error"
    both = assert_error(
        intervene(client, analysis_id, edits=[{"node": feature["id"], "scale": 0, "value": 1}]), 422
    )
    assert "exactly one of scale and value" in both["message"]
    twice = [{"node": feature["id"], "scale": 0}, {"node": feature["id"], "scale": 2}]
    assert "more than once" in assert_error(intervene(client, analysis_id, edits=twice), 422)["message"]
    for bad in ({"edits": []}, {"edits": [{"node": feature["id"], "scale": 0}], "top_k": 51}):
        assert_error(intervene(client, analysis_id, **bad), 422, "invalid_input")
    assert client.get("/v1/jobs").json()["total"] == before  # nothing was queued
