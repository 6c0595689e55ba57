"""Features, concepts, steering and generation over HTTP: real Redis, real workers, the API under
uvicorn, on the tiny local Llama (SmolLM2's tokenizer) so the whole flow takes seconds."""

from __future__ import annotations

import json

import httpx
import pytest
from service_stack import assert_error, tiny_sae, wait_for_job

from kestrel.core.models import DEFAULT_MODEL

MODEL = "tiny-llama"
LAYER = "model.layers.1"


@pytest.fixture(scope="module")
def sae_id(service) -> str:
    """A run and a 64-latent SAE on the tiny model, made through the API."""
    with service.client() as http:
        return tiny_sae(http, LAYER)


def test_discover_list_search_and_feature_page(client: httpx.Client, sae_id: str) -> None:
    assert_error(client.get(f"/v1/saes/{sae_id}/features"), 404, "not_found")  # nothing discovered yet
    submitted = client.post(
        f"/v1/saes/{sae_id}/features/discover", json={"config": {"top_n": 8, "window": 4}}
    )
    assert submitted.status_code == 202 and submitted.headers["Location"].startswith("/v1/jobs/")
    assert submitted.json()["artifacts"] == {"sae_id": sae_id}
    job = wait_for_job(client, submitted.json()["id"])
    assert job["result"]["n_latents"] == 64 and job["result"]["alive_latents"] > 0
    listing = client.get(f"/v1/saes/{sae_id}/features", params={"sort": "density", "limit": 5}).json()
    assert (
        listing["total"] == 64
        and len(listing["items"]) == 5
        and listing["version"] == job["result"]["version"]
    )
    top = listing["items"][0]
    page = client.get(f"/v1/saes/{sae_id}/features/{top['latent']}").json()
    assert page["density"] == pytest.approx(top["density"]) and 0 < len(page["top_contexts"]) <= 8
    assert all(0 <= c["target"] < len(c["tokens"]) for c in page["top_contexts"])
    assert len(page["logits"]["positive"]) == 10 and len(page["bins"]) == 10
    assert_error(client.get(f"/v1/saes/{sae_id}/features/64"), 404, "not_found")
    token = top["top_tokens"][0].strip()
    found = client.get(f"/v1/saes/{sae_id}/features", params={"search": token}).json()
    assert top["latent"] in [item["latent"] for item in found["items"]]
    bad = client.post(f"/v1/saes/{sae_id}/features/discover", json={"config": {"hist_min": 1e-30}})
    assert "histogram" in assert_error(bad, 422, "invalid_input")["message"]
    both = {"run_id": "run-x", "dataset": {"kind": "texts", "texts": ["a"]}}
    assert_error(client.post(f"/v1/saes/{sae_id}/features/discover", json=both), 422)


def test_dictionary_read_write_import_export_label(client: httpx.Client, sae_id: str) -> None:
    base = f"/v1/saes/{sae_id}/concepts"
    written = client.put(f"{base}/3", json={"name": "Pasta", "description": "cooking", "tags": ["food"]})
    assert written.status_code == 200 and written.json()["source"] == "manual"
    assert client.get(f"{base}/3").json()["name"] == "Pasta"
    assert_error(client.put(f"{base}/64", json={"name": "x"}), 422, "invalid_input")
    assert_error(client.get(f"{base}/9"), 404, "not_found")
    bad_csv = b"latent,name\n1,a\n70,b\n"
    error = assert_error(client.post(f"{base}/import", files={"file": ("names.csv", bad_csv)}), 422)
    assert "line 3: latent 70 is out of range" in error["message"]
    wrong_count = json.dumps({"n_latents": 4096, "concepts": []}).encode()
    error = assert_error(client.post(f"{base}/import", files={"file": ("names.json", wrong_count)}), 422)
    assert error["message"].startswith("n_latents:")
    error = assert_error(client.post(f"{base}/import", files={"file": ("names.json", b"{oops")}), 422)
    assert "malformed JSON at line 1" in error["message"]
    good = b"latent,name,tags\n5,Goals,sport;football\n"
    imported = client.post(f"{base}/import", files={"file": ("names.csv", good)})
    assert imported.status_code == 200 and imported.json()["imported"] == 1
    exported = client.get(f"{base}/export", params={"format": "csv"})
    assert exported.headers["content-type"].startswith("text/csv")
    assert exported.text.splitlines()[1:] == ["3,Pasta,cooking,food,manual", "5,Goals,,sport;football,manual"]
    labelled = wait_for_job(client, client.post(f"{base}/label", json={"method": "heuristic"}).json()["id"])
    assert labelled["result"]["labelled"] > 2
    concepts = client.get(base, params={"limit": 500}).json()
    by_latent = {c["latent"]: c for c in concepts["items"]}
    assert by_latent[3]["name"] == "Pasta" and by_latent[3]["source"] == "manual"
    assert {c["source"] for c in concepts["items"]} == {"manual", "heuristic"}
    assert client.delete(f"{base}/5").status_code == 200
    assert_error(client.get(f"{base}/5"), 404)


def test_label_scores_are_stored_and_sort_and_filter(client: httpx.Client, sae_id: str) -> None:
    """Label and score through the batch worker; the scores come back on the concepts (sortable,
    filterable), on the feature list (without examples) and on the feature's page (with them)."""
    base = f"/v1/saes/{sae_id}/concepts"
    bad_scorer = client.post(f"{base}/label", json={"score": True, "scorer": "no-such/model-anywhere"})
    assert bad_scorer.status_code == 422, bad_scorer.text
    assert (
        "run-nope"
        in assert_error(client.post(f"{base}/label", json={"score": True, "run_id": "run-nope"}), 422)[
            "message"
        ]
    )
    bad_config = client.post(f"{base}/label", json={"score": True, "scoring": {"n_test": 0}})
    assert_error(bad_config, 422)
    latents = [
        item["latent"]
        for item in client.get(f"/v1/saes/{sae_id}/features", params={"sort": "density", "limit": 6}).json()[
            "items"
        ]
    ]
    scoring = {"example_ctx_len": 4, "n_train": 1, "n_contrast": 1, "n_test": 2, "n_non_activating": 2}
    scoring.update(n_calibration=1, n_quantiles=2, batch_size=8)
    body = {"method": "heuristic", "latents": latents, "score": True, "scoring": scoring, "overwrite": True}
    job = wait_for_job(client, client.post(f"{base}/label", json=body).json()["id"])
    assert job["result"]["scoring"]["scorer"] == MODEL
    assert job["result"]["scoring"]["scored"] == len(latents)
    listed = client.get(base, params={"sort": "detection", "limit": 500}).json()["items"]
    scored = [c for c in listed if c["scores"] and c["scores"]["detection"] is not None]
    assert scored, listed
    values = [c["scores"]["detection"] for c in scored]
    assert values == sorted(values, reverse=True) and all(0.0 <= v <= 1.0 for v in values)
    assert all(c["scores"]["label"] == c["name"] and c["scores"]["scorer"] == MODEL for c in scored)
    best = values[0]
    kept = client.get(base, params={"min_detection": best}).json()["items"]
    assert kept and all(c["scores"]["detection"] >= best for c in kept)
    features = client.get(
        f"/v1/saes/{sae_id}/features", params={"sort": "detection", "min_detection": 0.0, "limit": 100}
    ).json()
    assert features["total"] == len(scored)
    assert [f["concept"]["scores"]["detection"] for f in features["items"]] == values
    assert all(f["concept"]["scores"]["examples"] == [] for f in features["items"])
    page = client.get(f"/v1/saes/{sae_id}/features/{scored[0]['latent']}").json()
    examples = page["concept"]["scores"]["examples"]
    assert len(examples) == 4 and {e["activating"] for e in examples} == {True, False}
    assert all(len(e["tokens"]) == len(e["activations"]) == 4 for e in examples)

    # a scorer with another vocabulary reads the examples' text (the SAE model's ids would index
    # past its 300 tokens); the examples kept are still the SAE model's tokens
    other = body | {"latents": latents[:2], "scorer": "other-vocab"}
    job = wait_for_job(client, client.post(f"{base}/label", json=other).json()["id"])
    assert job["result"]["scoring"] == job["result"]["scoring"] | {"scorer": "other-vocab", "scored": 2}
    page = client.get(f"/v1/saes/{sae_id}/features/{latents[0]}").json()
    assert page["concept"]["scores"]["scorer"] == "other-vocab"
    again = page["concept"]["scores"]["examples"]
    assert all(len(e["tokens"]) == len(e["activations"]) == 4 for e in again)
    assert_error(client.get(base, params={"sort": "nonsense"}), 422)
    assert_error(client.get(base, params={"min_fuzz": 2}), 422)


def test_label_requests_that_can_only_fail_in_the_worker_are_refused_before_queueing(
    client: httpx.Client, sae_id: str
) -> None:
    """Scoring on a run without the SAE's layer, and scoring fields without ``score``, are 422s
    naming the problem; no label job is queued for either."""
    base = f"/v1/saes/{sae_id}/concepts"
    body = {"model": MODEL, "layers": ["model.layers.0"], "dataset": {"kind": "texts", "texts": ["a b c d"]}}
    captured = wait_for_job(client, client.post("/v1/activations", json=body).json()["id"])
    other_run = captured["artifacts"]["run_id"]
    queued = client.get("/v1/jobs", params={"limit": 1}).json()["total"]
    wrong_layer = client.post(f"{base}/label", json={"score": True, "run_id": other_run})
    error = assert_error(wrong_layer, 422, "invalid_input")
    assert f"run {other_run!r} has no layer {LAYER!r}" in error["message"]
    unused = client.post(f"{base}/label", json={"run_id": other_run, "scorer": MODEL})
    assert "run_id, scorer only apply with score: true" in assert_error(unused, 422)["message"]
    assert client.get("/v1/jobs", params={"limit": 1}).json()["total"] == queued


def test_a_zero_score_is_a_score_on_concepts_and_features(client: httpx.Client, sae_id: str) -> None:
    """min_detection=0 keeps a latent whose detection scored exactly 0.0 on both lists."""
    base = f"/v1/saes/{sae_id}/concepts"
    zero = {"label": "Nothing", "scorer": MODEL, "detection": 0.0}
    names = {"concepts": [{"latent": 61, "name": "Nothing", "source": "manual", "scores": zero}]}
    imported = client.post(f"{base}/import", files={"file": ("n.json", json.dumps(names).encode())})
    assert imported.status_code == 200, imported.text

    def listed(minimum: float) -> list[int]:
        items = client.get(base, params={"min_detection": minimum, "limit": 500}).json()["items"]
        return [c["latent"] for c in items]

    assert 61 in listed(0) and 61 not in listed(0.01)
    features = client.get(f"/v1/saes/{sae_id}/features", params={"min_detection": 0, "limit": 100}).json()
    assert 61 in [f["latent"] for f in features["items"]]


def test_steering_configs_preview_and_generate(client: httpx.Client, sae_id: str) -> None:
    bad = {
        "sae_id": sae_id,
        "edits": [{"latent": 1, "op": "add", "value": 1}, {"latent": 99, "op": "add", "value": 1}],
    }
    assert (
        "edits[1]: latent 99 is out of range"
        in assert_error(client.post("/v1/steering", json=bad), 422)["message"]
    )
    bad_op = {"sae_id": sae_id, "edits": [{"latent": 1, "op": "boost", "value": 1}]}
    assert_error(client.post("/v1/steering", json=bad_op), 422)
    listing = client.get(f"/v1/saes/{sae_id}/features", params={"sort": "density", "limit": 1}).json()
    alive = listing["items"][0]["latent"]  # a relative edit needs a latent that fired in discovery
    relative = {"latent": alive, "op": "clamp", "value": 3, "unit": "max_activation"}  # 3x its max
    config = {"name": "pasta up", "sae_id": sae_id, "edits": [relative]}
    created = client.post("/v1/steering", json=config)
    assert created.status_code == 201, created.text
    steering_id = created.json()["id"]
    assert created.json()["config"]["layer"] == LAYER
    assert steering_id in [r["id"] for r in client.get("/v1/steering").json()["items"]]
    preview = client.post("/v1/steering/preview", json={"config_id": steering_id})
    assert preview.status_code == 200, preview.text
    assert preview.json()["model"] == MODEL and preview.json()["touches"][0]["latent"] == alive
    touch = preview.json()["touches"][0]
    assert touch["unit"] == "max_activation" and touch["absolute_value"] == pytest.approx(
        3 * touch["max_activation"]
    )
    assert preview.json()["warnings"] == []
    far = {
        "sae_id": sae_id,
        "edits": [{"latent": alive, "op": "clamp", "value": 40 * touch["max_activation"]}],
    }
    warned = client.post("/v1/steering/preview", json={"config": far}).json()
    assert len(warned["warnings"]) == 1 and "40× its largest observed activation" in warned["warnings"][0]

    prompts = ["The chef", "A goal"]
    steered = client.post(
        f"/v1/models/{MODEL}/generate",
        json={"prompts": prompts, "steering_id": steering_id, "max_new_tokens": 8},
    )
    assert steered.status_code == 200, steered.text
    body = steered.json()
    assert body["steering_id"] == steering_id and len(body["items"]) == 2 and body["warnings"] == []
    assert any(item["default"]["token_ids"] != item["steered"]["token_ids"] for item in body["items"])
    inline = {
        "prompts": ["The chef"],
        "steering": {"sae_id": sae_id, "edits": [{"latent": 3, "op": "add", "value": 5}]},
        "max_new_tokens": 4,
        "do_sample": True,
        "seed": 11,
        "top_latents": 2,
    }
    first = client.post(f"/v1/models/{MODEL}/generate", json=inline).json()
    second = client.post(f"/v1/models/{MODEL}/generate", json=inline).json()
    assert first["items"] == second["items"], "the same seed gives the same sampled continuations"
    alone = client.post(f"/v1/models/{MODEL}/generate", json={**inline, "compare": False}).json()
    assert alone["items"][0]["default"] is None and set(alone["seconds"]) == {"steered"}
    assert alone["items"][0]["steered"]["token_ids"] == first["items"][0]["steered"]["token_ids"]
    tokens = first["items"][0]["steered"]["tokens"]
    assert len(tokens) == 4 and all(len(t["latents"]) <= 2 for t in tokens)
    plain = client.post(
        f"/v1/models/{MODEL}/generate", json={"prompts": ["Hello"], "max_new_tokens": 3}
    ).json()
    assert plain["items"][0]["steered"] is None and len(plain["items"][0]["default"]["token_ids"]) == 3
    wrong_model = client.post(
        f"/v1/models/{DEFAULT_MODEL}/generate", json={"prompts": ["x"], "steering_id": steering_id}
    )
    assert "cannot steer" in assert_error(wrong_model, 422)["message"]
    too_long = client.post(f"/v1/models/{MODEL}/generate", json={"prompts": ["x"], "max_new_tokens": 100_000})
    assert_error(too_long, 422)
    assert_error(
        client.post(f"/v1/models/{MODEL}/generate", json={"prompts": ["x"], "steering_id": "nope"}), 404
    )
    assert client.delete(f"/v1/steering/{steering_id}").status_code == 200
    assert_error(client.get(f"/v1/steering/{steering_id}"), 404, "not_found")
