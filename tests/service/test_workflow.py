"""The whole workflow over HTTP with the bundled SmolLM2: real Redis, real workers, the API under
uvicorn. Load the model, capture a run, train a small SAE while its progress rises, read its
metrics, encode a prompt, download it, delete what was made."""

from __future__ import annotations

import io
import json
import time
import zipfile

import httpx
from redis import Redis
from service_stack import JOB_TIMEOUT_S, TEXTS, assert_error, capture_run, wait_for_job, wait_until

from kestrel.core.models import DEFAULT_MODEL
from kestrel.workers.lifecycle import LAYERS_KEY

LAYER = "model.layers.3"
SMALL_SAE = {"n_latents": 256, "k": 8}


def small_training(run_id: str, token_budget: int = 60_000, **train: object) -> dict:
    return {
        "run_id": run_id,
        "layer": LAYER,
        "sae": SMALL_SAE,
        "train": {"batch_size": 64, "token_budget": token_budget, "log_every": 5, **train},
    }


def test_health_ready_and_models(client: httpx.Client, service) -> None:
    assert client.get("/health").json()["status"] == "ok"
    ready = client.get("/ready").json()
    assert ready["redis"] is True and ready["workers"] == {"interactive": 1, "generate": 1, "batch": 1}
    models = client.get("/v1/models").json()["items"]
    bundled = next(m for m in models if m["name"] == DEFAULT_MODEL)
    assert bundled["installed"] and bundled["cached"]

    loaded = client.post(f"/v1/models/{DEFAULT_MODEL}/load", json={"dtype": "fp32"})
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["d_model"] == 576 and loaded.json()["n_blocks"] == 30
    holders = next(m for m in client.get("/v1/models").json()["items"] if m["name"] == DEFAULT_MODEL)
    assert any(h["queue"] == "generate" for h in holders["loaded_by"])  # loads warm generate workers

    table = client.get(f"/v1/models/{DEFAULT_MODEL}/layers")
    assert table.status_code == 200, table.text  # answered within the awaited call, not a 202 job
    rows = {row["name"]: row for row in table.json()["layers"]}
    assert rows[LAYER]["kind"] == "block" and rows[LAYER]["width"] == 576
    # A worker computed it once and cached it for every later caller (the API reads Redis first).
    redis = Redis.from_url(service.redis_url)
    try:
        assert json.loads(redis.get(LAYERS_KEY.format(DEFAULT_MODEL))) == table.json()
    finally:
        redis.close()
    refused = assert_error(client.post("/v1/models/nobody/nothing-at-all/load"), 422, "invalid_input")
    assert "KESTREL_ALLOWED_MODELS" in refused["message"]  # not cached, not allowed: refused up front


def test_capture_train_encode_download_delete(client: httpx.Client, service) -> None:
    # capture
    submitted = client.post(
        "/v1/activations", json={"layers": [LAYER], "dataset": {"kind": "texts", "texts": TEXTS}}
    )
    assert (
        submitted.status_code == 202 and submitted.headers["Location"] == f"/v1/jobs/{submitted.json()['id']}"
    )
    capture_job = wait_for_job(client, submitted.json()["id"])
    run_id = capture_job["artifacts"]["run_id"]
    assert capture_job["result"]["run_id"] == run_id and capture_job["progress"] == 1.0
    manifest = client.get(f"/v1/activations/{run_id}").json()
    assert manifest["layers"][LAYER]["d"] == 576 and manifest["n_docs"] == len(TEXTS)
    # The job's last word agrees with the run it made, whatever progress report was saved last.
    final = f"{manifest['n_docs']} documents, {manifest['n_tokens']} tokens in run {run_id}"
    assert capture_job["message"] == f"finished: {final}", capture_job["message"]
    assert (capture_job["metrics"]["tokens"], capture_job["metrics"]["docs"]) == (
        manifest["n_tokens"],
        manifest["n_docs"],
    )
    assert run_id in [r["id"] for r in client.get("/v1/activations").json()["items"]]

    # train, watching progress rise
    submitted = client.post("/v1/saes", json=small_training(run_id))
    assert submitted.status_code == 202, submitted.text
    job_id, sae_id = submitted.json()["id"], submitted.json()["artifacts"]["sae_id"]
    seen: list[float] = []
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] not in (
        "finished",
        "failed",
        "canceled",
    ):
        if job["status"] == "started":
            seen.append(job["progress"])
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert job["status"] == "finished", f"{job}\n{service.log_tail()}"
    partial = [p for p in seen if 0 < p < 1]
    assert len(set(partial)) >= 2 and partial == sorted(partial), seen
    assert job["metrics"] and job["result"]["sae_id"] == sae_id

    # read config and metrics
    sae = client.get(f"/v1/saes/{sae_id}").json()
    config = sae["config"]
    assert (config["architecture"], config["d_in"], config["n_latents"], config["k"]) == ("topk", 576, 256, 8)
    assert (config["model"], config["layer"], config["run_id"]) == (DEFAULT_MODEL, LAYER, run_id)
    assert sae["metrics"]
    assert sae_id in [s["id"] for s in client.get("/v1/saes").json()["items"]]

    # encode a prompt (interactive queue)
    encoded = client.post(f"/v1/saes/{sae_id}/encode", json={"text": "The cat sat on the mat.", "top_k": 5})
    assert encoded.status_code == 200, encoded.text
    tokens = encoded.json()["tokens"]
    assert len(tokens) >= 6 and [t["position"] for t in tokens] == list(range(len(tokens)))
    assert (
        all(len(t["latents"]) <= 5 for t in tokens)
        and sum(bool(t["latents"]) for t in tokens) >= len(tokens) - 1
    )
    assert all(0 <= latent["index"] < 256 for t in tokens for latent in t["latents"])

    # download both formats
    for fmt, expected in (("kestrel", "config.json"), ("saelens", "cfg.json")):
        download = client.get(f"/v1/saes/{sae_id}/download", params={"format": fmt})
        assert download.status_code == 200 and download.headers["content-type"] == "application/zip"
        names = zipfile.ZipFile(io.BytesIO(download.content)).namelist()
        assert any(n.endswith(expected) for n in names), names
        assert any(n.endswith(".safetensors") for n in names), names

    # model-in-the-loop evaluation, stored with the SAE
    evaluation = client.post(f"/v1/saes/{sae_id}/evaluate", json={"texts": TEXTS[:4]})
    assert evaluation.status_code == 202, evaluation.text
    evaluated = wait_for_job(client, evaluation.json()["id"])
    assert evaluated["result"]["metrics"] and evaluated["artifacts"]["sae_id"] == sae_id

    # delete what was made
    assert client.delete(f"/v1/saes/{sae_id}").status_code == 200
    assert client.delete(f"/v1/activations/{run_id}").status_code == 200
    assert_error(client.get(f"/v1/saes/{sae_id}"), 404, "not_found")
    assert_error(client.get(f"/v1/activations/{run_id}"), 404, "not_found")
    assert sae_id not in [s["id"] for s in client.get("/v1/saes").json()["items"]]


def test_import_saelens_roundtrip(client: httpx.Client) -> None:
    run_id = capture_run(client, LAYER, TEXTS[:8])
    job = wait_for_job(client, client.post("/v1/saes", json=small_training(run_id, 5_000)).json()["id"])
    sae_id = job["artifacts"]["sae_id"]
    archive = zipfile.ZipFile(io.BytesIO(client.get(f"/v1/saes/{sae_id}/download?format=saelens").content))
    cfg = next(n for n in archive.namelist() if n.endswith("cfg.json"))
    weights = next(n for n in archive.namelist() if n.endswith(".safetensors"))
    imported = client.post(
        "/v1/saes/import",
        files={
            "cfg": ("cfg.json", archive.read(cfg), "application/json"),
            "weights": ("sae_weights.safetensors", archive.read(weights), "application/octet-stream"),
        },
        data={"model": DEFAULT_MODEL, "layer": LAYER},
    )
    assert imported.status_code == 201, imported.text
    new_id = imported.json()["id"]
    assert new_id != sae_id and imported.json()["config"]["n_latents"] == 256
    assert client.post(f"/v1/saes/{new_id}/encode", json={"text": "Hello there"}).status_code == 200
    pickle_weights = client.post(
        "/v1/saes/import",
        files={"cfg": ("cfg.json", archive.read(cfg)), "weights": ("sae.pt", b"\x80\x04pickle")},
    )
    assert_error(pickle_weights, 422)
    for artifact in (f"/v1/saes/{sae_id}", f"/v1/saes/{new_id}", f"/v1/activations/{run_id}"):
        client.delete(artifact)


def test_events_stream_progress_then_end(client: httpx.Client) -> None:
    submitted = client.post(
        "/v1/activations", json={"layers": [LAYER], "dataset": {"kind": "texts", "texts": TEXTS}}
    )
    job_id = submitted.json()["id"]
    events: list[tuple[str, dict]] = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=120) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: "):
                events.append((event, json.loads(line[len("data: ") :])))
                if event == "end":
                    break
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "end" and set(kinds[:-1]) <= {"progress"} and len(kinds) >= 2, kinds
    assert events[-1][1]["status"] == "finished" and events[-1][1]["id"] == job_id
    client.delete(f"/v1/activations/{events[-1][1]['artifacts']['run_id']}")


def test_a_bad_layer_fails_the_job_with_the_engine_message(client: httpx.Client) -> None:
    submitted = client.post(
        "/v1/activations", json={"layers": ["model.layer.3"], "dataset": {"kind": "texts", "texts": ["hi"]}}
    )
    job = wait_for_job(client, submitted.json()["id"], states=("failed",))
    assert job["error"]["code"] == "not_found"
    assert "did you mean 'model.layers.3'" in job["error"]["message"]
    # the traceback stays in the worker's log: the job's log and error are public
    assert not any("Traceback" in line or "File " in line for line in [job["error"]["message"], *job["log"]])
    assert job["log"][-1].endswith(f"failed: {job['error']['message']}")


def test_an_uploaded_dataset_can_be_captured(client: httpx.Client) -> None:
    lines = "".join(json.dumps({"body": text}) + "\n" for text in TEXTS[:6])
    upload = client.post("/v1/uploads", files={"file": ("notes.jsonl", lines.encode(), "application/json")})
    assert upload.status_code == 201, upload.text
    body = {
        "layers": [LAYER],
        "dataset": {"kind": "upload", "upload_id": upload.json()["id"], "text_field": "body", "limit": 4},
    }
    job = wait_for_job(client, client.post("/v1/activations", json=body).json()["id"])
    manifest = client.get(f"/v1/activations/{job['artifacts']['run_id']}").json()
    assert manifest["n_docs"] == 4 and manifest["dataset"]["text_field"] == "body"
    # the manifest records the request (an upload id), never the worker's path to the file
    assert manifest["dataset"]["upload_id"] == upload.json()["id"]
    assert "/" not in json.dumps(manifest["dataset"]).replace("\\/", "")
    client.delete(f"/v1/activations/{manifest['id']}")
    client.delete(f"/v1/uploads/{upload.json()['id']}")


def test_a_local_model_is_named_never_pathed(client: httpx.Client, local_models) -> None:
    """A server-configured local checkpoint: listed, captured by name; its path never leaks."""
    listed = {m["name"]: m for m in client.get("/v1/models").json()["items"]}
    assert listed["tiny-llama"]["source"] == "local"
    body = {"model": "tiny-llama", "layers": ["model.layers.1"], "dataset": {"kind": "texts", "texts": TEXTS}}
    job = wait_for_job(client, client.post("/v1/activations", json=body).json()["id"])
    manifest = client.get(f"/v1/activations/{job['artifacts']['run_id']}").json()
    assert manifest["model"]["name"] == "tiny-llama" and manifest["layers"]["model.layers.1"]["d"] == 32
    assert str(local_models) not in json.dumps(manifest)
    assert_error(client.post("/v1/models/" + str(local_models / "tiny-llama").lstrip("/") + "/load"), 422)
    client.delete(f"/v1/activations/{manifest['id']}")


def test_load_then_unload_a_model(client: httpx.Client) -> None:
    def holders() -> list[dict]:
        models = {m["name"]: m for m in client.get("/v1/models").json()["items"]}
        return models["tiny-llama"]["loaded_by"]

    assert client.post("/v1/models/tiny-llama/load").status_code == 200
    assert "generate" in [h["queue"] for h in holders()]  # other workers may hold it too
    unloaded = client.post("/v1/models/tiny-llama/unload")
    assert unloaded.status_code == 202 and unloaded.json()["name"] == "tiny-llama"
    wait_until(lambda: holders() == [], 60, "the worker to drop tiny-llama")
