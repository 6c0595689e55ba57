"""The evaluation ledger over HTTP: real Redis, real workers, the API under uvicorn, on the tiny
local Llama. Bad requests are refused before any job; a ledger is computed from an uploaded
labelled file, read back and compared; a worker killed mid-ledger leaves no ledger and the
requeued job computes all of it."""

from __future__ import annotations

import json

import httpx
import pytest
from service_stack import TEXTS, assert_error, wait_for_job, wait_until

MODEL = "tiny-llama"
LAYER = "model.layers.1"
QUICK = {"ks": [1, 2], "absorption_words": 200, "synthetic_rows": 4096, "eval_texts": 4, "max_length": 32}
TOPICS = ["cooking pasta with garlic", "a football match", "stars and galaxies", "interest rates"]
LABELLED = [{"text": f"{TOPICS[i % 4]}, example {i}.", "topic": TOPICS[i % 4].split()[0]} for i in range(32)]
FAST_REAPER = {
    "KESTREL_HEARTBEAT_INTERVAL_S": "1",
    "KESTREL_HEARTBEAT_TTL_S": "6",
    "KESTREL_REAPER_INTERVAL_S": "1",
}


def capture_and_train(http: httpx.Client, k: int = 4) -> str:
    body = {"model": MODEL, "layers": [LAYER], "dataset": {"kind": "texts", "texts": TEXTS}}
    run_id = wait_for_job(http, http.post("/v1/activations", json=body).json()["id"])["artifacts"]["run_id"]
    train = {"run_id": run_id, "layer": LAYER, "sae": {"n_latents": 64, "k": k}, "train": {"batch_size": 32}}
    return wait_for_job(http, http.post("/v1/saes", json=train).json()["id"])["artifacts"]["sae_id"]


@pytest.fixture(scope="module")
def sae_ids(service) -> list[str]:
    with service.client() as http:
        return [capture_and_train(http, k=4), capture_and_train(http, k=8)]


def upload(http: httpx.Client, name: str, body: bytes) -> str:
    response = http.post("/v1/uploads", files={"file": (name, body, "text/plain")})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_bad_ledger_requests_are_refused_before_any_job(client: httpx.Client, sae_ids: list[str]) -> None:
    sae = sae_ids[0]
    jobs_before = client.get("/v1/jobs", params={"kind": "ledger"}).json()["total"]
    assert_error(client.post("/v1/saes/nobody/ledger", json={}), 404, "not_found")
    one_class = {"kind": "texts", "texts": [f"t{i}" for i in range(8)], "labels": ["a"] * 8}
    refused = assert_error(client.post(f"/v1/saes/{sae}/ledger", json={"dataset": one_class}), 422)
    assert "two classes" in refused["message"]
    mismatch = {"kind": "texts", "texts": [f"t{i}" for i in range(8)], "labels": ["a", "b"]}
    assert_error(client.post(f"/v1/saes/{sae}/ledger", json={"dataset": mismatch}), 422)
    assert_error(client.post(f"/v1/saes/{sae}/ledger", json={"options": {"ks": [0]}}), 422)
    no_label = upload(client, "plain.csv", b"text\nhello\nworld\n")
    wrong_column = {"kind": "upload", "upload_id": no_label, "label_field": "topic"}
    refused = assert_error(client.post(f"/v1/saes/{sae}/ledger", json={"dataset": wrong_column}), 422)
    assert "no field 'topic'" in refused["message"]
    assert_error(
        client.post(f"/v1/saes/{sae}/ledger", json={"dataset": {"kind": "upload", "upload_id": "nope"}}), 404
    )
    many_small = {
        "kind": "texts",
        "texts": [f"t{i}" for i in range(256)],
        "labels": [i // 4 for i in range(256)],
    }
    refused = assert_error(client.post(f"/v1/saes/{sae}/ledger", json={"dataset": many_small}), 422)
    assert "at least 5 texts" in refused["message"] and "test_fraction 0.2" in refused["message"]
    rows = [json.dumps(row) for row in LABELLED]
    too_long = [*rows, json.dumps({"text": "x" * 20_001, "topic": "cooking"})]
    long_id = upload(client, "long.jsonl", "\n".join(too_long).encode())
    long_set = {"kind": "upload", "upload_id": long_id, "label_field": "topic"}
    refused = assert_error(client.post(f"/v1/saes/{sae}/ledger", json={"dataset": long_set}), 413)
    assert "max_text_chars" in json.dumps(refused)
    late_bad = ("\n".join(rows * 800) + "\n").encode() + b'{"text": "bad \xff", "topic": "a"}\n'
    assert len(late_bad) > 2**20  # past what the upload itself checked
    bad_set = {"kind": "upload", "upload_id": upload(client, "late.jsonl", late_bad), "label_field": "topic"}
    refused = assert_error(client.post(f"/v1/saes/{sae}/ledger", json={"dataset": bad_set}), 422)
    assert "not valid UTF-8" in refused["message"]
    assert client.get("/v1/jobs", params={"kind": "ledger"}).json()["total"] == jobs_before
    missing = assert_error(client.get(f"/v1/saes/{sae}/ledger"), 404, "not_found")
    assert "POST /v1/saes" in missing["message"]
    assert_error(client.get("/v1/saes/compare", params={"ids": f"{sae},nobody"}), 404, "not_found")
    assert_error(client.get("/v1/saes/compare", params={"ids": f"{sae},{sae}"}), 422)


def test_a_ledger_is_computed_read_and_compared(client: httpx.Client, sae_ids: list[str]) -> None:
    sae, other = sae_ids
    lines = "\n".join(json.dumps(row) for row in LABELLED).encode()
    dataset = {"kind": "upload", "upload_id": upload(client, "topics.jsonl", lines), "label_field": "topic"}
    submitted = client.post(f"/v1/saes/{sae}/ledger", json={"dataset": dataset, "options": QUICK})
    assert submitted.status_code == 202, submitted.text
    job = wait_for_job(client, submitted.json()["id"])
    assert job["kind"] == "ledger" and job["artifacts"]["sae_id"] == sae

    ledger = client.get(f"/v1/saes/{sae}/ledger")
    assert ledger.status_code == 200, ledger.text
    body = ledger.json()
    entries = body["entries"]
    assert body["options"]["ks"] == [1, 2] and body["layer"] == LAYER
    assert {"fvu", "l0", "dead_fraction", "ce_loss_recovered", "kl_divergence"} <= set(entries)
    assert {"sparse_probing_top_1", "sparse_probing_top_2", "dense_probe", "synthetic_recovery"} <= set(
        entries
    )
    assert entries["sparse_probing_top_1"]["settings"]["classes"] == 4
    assert entries["sparse_probing_top_1"]["baseline"] == pytest.approx(0.5, abs=0.15)
    assert entries["fvu"]["baseline"] == 1.0 and entries["ce_loss_recovered"]["ceiling"] == 1.0
    assert job["result"]["values"]["fvu"] == entries["fvu"]["value"]
    assert all(e["computed_at"] for e in entries.values())

    rows = client.get("/v1/saes/compare", params={"ids": f"{sae},{other}"}).json()["rows"]
    assert [r["id"] for r in rows] == [sae, other]
    assert rows[0]["has_ledger"] and not rows[1]["has_ledger"]
    assert rows[0]["fvu"] == entries["fvu"]["value"] and rows[1]["fvu"] is not None  # held-out metrics
    assert any(r["pareto"] for r in rows)
    assert rows[0]["sparse_probing"]["top_1"] == entries["sparse_probing_top_1"]["value"]


def test_a_worker_killed_mid_ledger_leaves_none_and_the_rerun_computes_it(make_stack, local_models) -> None:
    stack = make_stack(**FAST_REAPER, KESTREL_MODEL_DIRS=str(local_models))
    stack.start_worker("batch", name="first")
    stack.start_api()
    stack.wait_ready({"batch": 1})
    with stack.client() as http:
        sae = capture_and_train(http)
        slow = {**QUICK, "synthetic_rows": 2_000_000, "absorption": False}
        submitted = http.post(f"/v1/saes/{sae}/ledger", json={"options": slow})
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]

        def in_synthetic():
            job = http.get(f"/v1/jobs/{job_id}").json()
            return job["status"] == "started" and "synthetic" in (job["message"] or "")

        wait_until(in_synthetic, 300, "the ledger's synthetic stage", stack)
        stack.kill("first")
        assert_error(http.get(f"/v1/saes/{sae}/ledger"), 404)  # nothing half-written is visible
        job = wait_for_job(http, job_id, states=("queued",), timeout_s=120)
        assert "requeued to run again" in job["message"], job
        assert not list((stack.store_root / "saes" / sae).glob("*ledger*"))

        stack.start_worker("batch", name="second")
        done = wait_for_job(http, job_id, timeout_s=300)
        assert any("computing the ledger again" in line for line in done["log"]), done["log"]
        ledger = http.get(f"/v1/saes/{sae}/ledger").json()
        assert ledger["entries"]["synthetic_recovery"]["settings"]["rows"] == 2_000_000
