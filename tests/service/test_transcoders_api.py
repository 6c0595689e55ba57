"""Transcoders over HTTP (real Redis, real workers): capture an MLP's input and output in one run,
train a skip-transcoder between them, read what it is, export it to SAELens; and the clear 4xx
answers for a bad target, a skip without one, and using a transcoder as an SAE."""

from __future__ import annotations

import io
import json
import zipfile

import httpx
from service_stack import TEXTS, assert_error, wait_for_job

MODEL = "tiny-llama"
MLP = "model.layers.1.mlp"
MLP_IN = f"{MLP}:input"


def test_transcoder_capture_train_export(client: httpx.Client) -> None:
    submitted = client.post(
        "/v1/activations",
        json={"model": MODEL, "layers": [MLP, MLP_IN], "dataset": {"kind": "texts", "texts": TEXTS * 4}},
    )
    assert submitted.status_code == 202, submitted.text
    run_id = wait_for_job(client, submitted.json()["id"])["artifacts"]["run_id"]
    layers = client.get(f"/v1/activations/{run_id}").json()["layers"]
    assert list(layers) == [MLP_IN, MLP]
    assert layers[MLP_IN]["hook"] == "input" and layers[MLP_IN]["module"] == MLP
    assert layers[MLP]["hook"] == "output"

    sae = {"architecture": "batchtopk", "n_latents": 64, "k": 4, "skip": True}
    train = {"batch_size": 64, "epochs": 2, "log_every": 5}
    base = {"run_id": run_id, "layer": MLP_IN, "sae": sae, "train": train}
    # refused before anything is queued, each naming what is wrong
    missing = assert_error(client.post("/v1/saes", json={**base, "target_layer": "model.layers.2.mlp"}), 404)
    assert "model.layers.2.mlp" in missing["message"]
    same = assert_error(client.post("/v1/saes", json={**base, "target_layer": MLP_IN}), 422, "invalid_input")
    assert "another layer" in same["message"]
    no_target = assert_error(client.post("/v1/saes", json=base), 422, "invalid_input")
    assert "target_layer" in no_target["message"]
    relu = {**base, "target_layer": MLP, "sae": {"architecture": "relu_l1", "n_latents": 64, "skip": True}}
    assert "topk or batchtopk" in assert_error(client.post("/v1/saes", json=relu), 422)["message"]
    stream = {"model": MODEL, "dataset": {"kind": "texts", "texts": TEXTS}, "target_layer": MLP}
    stream["saes"] = [{"layer": MLP_IN, "sae": {"n_latents": 64, "k": 4}}]
    assert (
        "saes[i].target_layer"
        in assert_error(client.post("/v1/saes", json=stream), 422, "invalid_input")["message"]
    )

    started = client.post("/v1/saes", json={**base, "target_layer": MLP})
    assert started.status_code == 202, started.text
    job = wait_for_job(client, started.json()["id"])
    sae_id = job["artifacts"]["sae_id"]
    summary = client.get(f"/v1/saes/{sae_id}").json()
    assert summary["kind"] == "skip_transcoder" and summary["target_layer"] == MLP
    assert summary["layer"] == MLP_IN and summary["config"]["d_out"] == 32
    assert 0 <= summary["metrics"]["fvu"] < 1.0  # of the MLP's output, held out

    # encoding reads the MLP's input, as its latents do (tests/service/test_transcoder_features_api.py)
    encoded = client.post(f"/v1/saes/{sae_id}/encode", json={"text": "hello"})
    assert encoded.status_code == 200 and encoded.json()["layer"] == MLP_IN, encoded.text
    # an SAE's uses that would be wrong for a transcoder are refused up front
    evaluated = client.post(f"/v1/saes/{sae_id}/evaluate", json={})
    assert "skip_transcoder" in assert_error(evaluated, 422, "invalid_input")["message"]
    for what, path, body in (
        ("the evaluation ledger", f"/v1/saes/{sae_id}/ledger", {}),
        ("the logit check", f"/v1/saes/{sae_id}/features/0/logits/measured", {}),
        ("circuit latent attribution", "/v1/analyses", _circuit_on(sae_id)),
    ):
        message = assert_error(client.post(path, json=body), 422, "invalid_input")["message"]
        assert "skip_transcoder" in message and what in message, (path, message)

    download = client.get(f"/v1/saes/{sae_id}/download", params={"format": "saelens"})
    assert download.status_code == 200, download.text
    files = zipfile.ZipFile(io.BytesIO(download.content))
    cfg = json.loads(files.read("cfg.json"))
    assert cfg["architecture"] == "jumprelu_skip_transcoder" and cfg["metadata"]["hook_name_out"] == MLP
    refused = client.get(f"/v1/saes/{sae_id}/download", params={"format": "sparsify"})
    assert "sparsify" in assert_error(refused, 422, "invalid_input")["message"]


def _circuit_on(sae_id: str) -> dict:
    pair = {"clean": "the cat", "corrupted": "the dog", "correct": " sat", "wrong": " ran"}
    return {"kind": "circuit", "model": MODEL, "pairs": [pair], "components": ["latents"], "sae_id": sae_id}
