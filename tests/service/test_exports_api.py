"""Neuronpedia export over HTTP: a batch job writes the zip next to the SAE, the download serves
it, and what cannot work is refused before anything is queued."""

from __future__ import annotations

import gzip
import io
import json
import zipfile

import httpx
import pytest
from service_stack import assert_error, tiny_sae, wait_for_job

MODEL = "tiny-llama"
LAYER = "model.layers.1"


@pytest.fixture(scope="module")
def sae_id(service) -> str:
    """A 64-latent SAE on the tiny model, made through the API (not yet discovered)."""
    with service.client() as http:
        return tiny_sae(http, LAYER)


def test_neuronpedia_export_job_and_download(client: httpx.Client, sae_id: str) -> None:
    url = f"/v1/saes/{sae_id}/exports/neuronpedia"
    undiscovered = assert_error(client.post(url, json={}), 404, "not_found")
    assert "run discovery first" in undiscovered["message"]
    discovered = client.post(
        f"/v1/saes/{sae_id}/features/discover", json={"config": {"top_n": 4, "window": 4}}
    )
    wait_for_job(client, discovered.json()["id"])
    assert_error(client.post(url, json={"latents": [64]}), 422, "invalid_input")
    assert "source_set" in assert_error(client.post(url, json={"source_set": "Bad Name"}), 422)["message"]
    assert_error(client.post(url, json={"colour": "red"}), 422)

    accepted = client.post(url, json={"source_set": "res-tiny", "creator": "lab", "bins": False})
    assert accepted.status_code == 202, accepted.text
    export_id = accepted.json()["artifacts"]["export_id"]
    job = wait_for_job(client, accepted.json()["id"])
    assert job["result"]["id"] == export_id and job["result"]["bytes"] > 0

    download = client.get(f"/v1/saes/{sae_id}/exports/{export_id}")
    assert download.status_code == 200 and download.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(download.content)) as archive:
        names = archive.namelist()
        [features_file] = [n for n in names if "/features/" in n]
        features = [json.loads(line) for line in gzip.decompress(archive.read(features_file)).splitlines()]
    assert f"{MODEL}/1-res-tiny/source.jsonl" in names
    d_in = client.get(f"/v1/saes/{sae_id}").json()["config"]["d_in"]
    assert features and all(len(f["vector"]) == d_in for f in features)  # decoder rows: steering vectors
    assert all(f["layer"] == "1-res-tiny" and f["hookName"] == "blocks.1.hook_resid_post" for f in features)
    assert_error(client.get(f"/v1/saes/{sae_id}/exports/export-nope"), 404, "not_found")
