"""A transcoder's feature pages over HTTP (real Redis, real workers, the tiny Llama): a transcoder of
block 1's MLP trained through the API, its features discovered from the run's MLP-input rows, a
feature page read, the same text encoded live (the MLP's input hooked in a forward) agreeing with
the page, heuristic names; and what stays undefined for a transcoder still refused by name."""

from __future__ import annotations

import httpx
import pytest
from service_stack import TEXTS, assert_error, tiny_transcoders, wait_for_job

MLP_IN = "model.layers.1.mlp:input"


@pytest.fixture(scope="module")
def transcoder(service) -> str:
    """A transcoder of block 1's MLP (input → output) trained through the API on TEXTS * 2."""
    with service.client() as http:
        return tiny_transcoders(http, (1,))[1][0]


def test_transcoder_discovery_feature_page_and_encoding(client: httpx.Client, transcoder: str) -> None:
    base = f"/v1/saes/{transcoder}"
    submitted = client.post(f"{base}/features/discover", json={"config": {"top_n": 4}})
    assert submitted.status_code == 202, submitted.text
    job = wait_for_job(client, submitted.json()["id"])
    assert job["status"] == "finished" and job["result"]["alive_latents"] > 0, job
    top = client.get(f"{base}/features", params={"sort": "max_activation", "limit": 1}).json()["items"][0]
    assert top["max_activation"] > 0 and len(top["promoted_tokens"]) == 5  # the decoder's direct path
    page = client.get(f"{base}/features/{top['latent']}").json()
    assert page["max_activation"] == pytest.approx(top["max_activation"])
    assert len(page["logits"]["positive"]) == 10 and len(page["logits"]["negative"]) == 10
    context = page["top_contexts"][0]
    assert context["activation"] == pytest.approx(page["max_activation"])

    # the page's strongest context, encoded live: the MLP's input hooked in a forward of the text
    # (fp32) gives the value discovery read from the run's stored rows (fp16)
    text = (TEXTS * 2)[context["doc_index"]]
    encoded = client.post(f"{base}/encode", json={"text": text, "top_k": 8})
    assert encoded.status_code == 200, encoded.text
    body = encoded.json()
    assert body["layer"] == MLP_IN and body["sae_id"] == transcoder
    at = {latent["index"]: latent["value"] for latent in body["tokens"][context["position"]]["latents"]}
    assert at.get(top["latent"]) == pytest.approx(context["activation"], rel=2e-2), at

    labelled = wait_for_job(
        client, client.post(f"{base}/concepts/label", json={"method": "heuristic"}).json()["id"]
    )
    assert labelled["status"] == "finished" and labelled["result"]["labelled"] > 0, labelled
    named = client.get(f"{base}/features/{top['latent']}").json()["concept"]
    assert named is not None and named["source"] == "heuristic" and named["name"]


def test_what_is_undefined_for_a_transcoder_stays_refused(client: httpx.Client, transcoder: str) -> None:
    """Steering the layer it reads and the measured logit check would add its decoder row (which
    writes the MLP's output) to its input: refused before any job, naming both layers."""
    measured = client.post(f"/v1/saes/{transcoder}/features/0/logits/measured", json={})
    message = assert_error(measured, 422, "invalid_input")["message"]
    assert "transcoder" in message and "the logit check" in message and MLP_IN in message
    steering = {"sae_id": transcoder, "edits": [{"latent": 0, "op": "clamp", "value": 1.0}]}
    message = assert_error(client.post("/v1/steering", json=steering), 422, "invalid_input")["message"]
    assert "transcoder" in message and "steering" in message
