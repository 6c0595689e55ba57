"""Request-level behaviour of the API, in process against a real Redis (no workers needed):
API key on every protected route, traversal ids, uploads, request limits, idempotency, the error
shape, pagination and metrics."""

from __future__ import annotations

import io
import json
import re

import pytest
import torch
from fastapi.routing import APIRoute
from safetensors.torch import save as save_safetensors
from service_stack import assert_error

from kestrel.core.models import DEFAULT_MODEL

UNPROTECTED = {"/health", "/ready"}
DATA_FREE = "/ui"  # the dashboard's pages hold no data: they fetch it from /v1 with the key
CAPTURE = {"layers": ["model.layers.3"], "dataset": {"kind": "texts", "texts": ["one text", "another text"]}}


def concrete_path(path: str) -> str:
    """A route path with every parameter filled with a valid-looking value."""
    path = path.replace("{name:path}", DEFAULT_MODEL)
    return re.sub(r"\{[^}]+\}", "some-id", path)


def api_routes(app) -> list[tuple[str, set[str]]]:
    """(path, methods) of every API route, through included routers (FastAPI ≥ 0.16x nests them)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI flattens included routers into app.routes
        return [(r.path, r.methods) for r in app.routes if isinstance(r, APIRoute)]
    return [
        (c.path, c.methods) for c in iter_route_contexts(app.routes) if isinstance(c.original_route, APIRoute)
    ]


def test_every_protected_route_needs_the_api_key(make_client) -> None:
    http = make_client(api_key="s3cret")
    routes = api_routes(http.app)
    protected = [(p, m) for p, m in routes if p not in UNPROTECTED and not p.startswith(DATA_FREE)]
    assert len(protected) >= 25  # every resource's routes, plus /metrics
    for path, methods in protected:
        for method in methods:
            for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": "s3cret "}):
                response = http.request(method, concrete_path(path), headers=headers)
                assert_error(response, 401, "unauthorized")
    for path in ("/health", "/ready", "/docs", "/openapi.json"):
        assert http.get(path).status_code in (200, 503), path  # ready: 503 without workers, never 401
    assert http.get("/v1/jobs", headers={"X-API-Key": "s3cret"}).status_code == 200
    assert http.get("/metrics", headers={"X-API-Key": "s3cret"}).status_code == 200


def test_without_a_configured_key_nothing_asks_for_one(make_client) -> None:
    http = make_client()
    assert http.get("/v1/jobs").status_code == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/activations/..%2Fx"),
        ("GET", "/v1/activations/%2e%2e"),
        ("DELETE", "/v1/activations/%2E%2E"),
        ("GET", "/v1/saes/%2e%2e%2fetc"),
        ("DELETE", "/v1/saes/..%2F..%2Fmodels"),
        ("GET", "/v1/saes/%2e%2e/download"),
        ("GET", "/v1/jobs/..%2F..%2Fetc%2Fpasswd"),
        ("POST", "/v1/jobs/%2e%2e/cancel"),
        ("GET", "/v1/uploads/%2e%2e"),
        ("GET", "/v1/activations/UPPER"),
        ("GET", "/v1/models/..%2F..%2Fetc/layers"),
        ("POST", "/v1/models/%2Ftmp%2Fmodel/load"),
    ],
)
def test_traversal_ids_are_rejected(make_client, method: str, path: str) -> None:
    http = make_client()
    response = http.request(method, path)
    assert 400 <= response.status_code < 500, (path, response.status_code, response.text)
    assert "error" in response.json()


@pytest.mark.parametrize(
    "body",
    [
        {**CAPTURE, "dataset": {"kind": "upload", "upload_id": "../x"}},
        {**CAPTURE, "dataset": {"kind": "file", "path": "/etc/passwd"}},
        {**CAPTURE, "dataset": {"kind": "hf", "name": "../../etc"}},
        {**CAPTURE, "dataset": {"kind": "hf", "name": "/etc/passwd"}},
        {**CAPTURE, "dataset": {"kind": "hf", "name": "json", "data_files": ["/etc/passwd"]}},
        {**CAPTURE, "dataset": {"kind": "hf", "name": "json"}},
        {**CAPTURE, "model": "/tmp/some-checkpoint"},
        {**CAPTURE, "model": f"../models/{DEFAULT_MODEL}"},
    ],
)
def test_no_client_path_reaches_a_worker(make_client, body: dict) -> None:
    http = make_client()
    assert_error(http.post("/v1/activations", json=body), 422)
    assert http.get("/v1/jobs").json()["total"] == 0


def test_training_ids_are_checked_before_queueing(make_client) -> None:
    http = make_client()
    for body in (
        {"run_id": "../x", "layer": "model.layers.3", "sae": {"n_latents": 64}},
        {"resume_from": "..%2fx"},
    ):
        assert_error(http.post("/v1/saes", json=body), 422)
    missing = http.post(
        "/v1/saes", json={"run_id": "run-nope", "layer": "model.layers.3", "sae": {"n_latents": 64}}
    )
    assert "run-nope" in assert_error(missing, 404, "not_found")["message"]


def test_uploads_are_limited_checked_and_stored_by_id(make_client) -> None:
    http = make_client(max_upload_mb=0.01)  # ~10 KB
    good = http.post(
        "/v1/uploads", files={"file": ("../../notes.jsonl", b'{"text": "hello"}\n', "text/plain")}
    )
    assert good.status_code == 201, good.text
    upload = good.json()
    assert upload["kind"] == "dataset" and upload["format"] == "jsonl" and upload["filename"] == "notes.jsonl"
    store = http.app.state.store.root
    assert (store / "uploads" / upload["id"] / "data.jsonl").is_file()
    assert not (store.parent / "notes.jsonl").exists()

    too_big = http.post("/v1/uploads", files={"file": ("big.txt", b"x" * 20_000, "text/plain")})
    assert assert_error(too_big, 413, "limit_exceeded")["details"]["limit"] == "max_upload_mb"
    assert "max_upload_mb" in too_big.json()["error"]["message"]
    assert_error(
        http.post("/v1/uploads", files={"file": ("model.pkl", b"\x80\x04", "application/octet-stream")}), 422
    )
    assert_error(
        http.post(
            "/v1/uploads", files={"file": ("x.safetensors", b"not really", "application/octet-stream")}
        ),
        422,
    )

    tensors = save_safetensors({"acts": torch.zeros(4, 8)})
    ok = http.post("/v1/uploads", files={"file": ("acts.safetensors", tensors, "application/octet-stream")})
    assert ok.status_code == 201 and ok.json()["kind"] == "activations", ok.text
    as_dataset = {**CAPTURE, "dataset": {"kind": "upload", "upload_id": ok.json()["id"]}}
    assert "not a dataset" in assert_error(http.post("/v1/activations", json=as_dataset), 422)["message"]

    listed = http.get("/v1/uploads").json()
    assert listed["total"] == 2 and {u["id"] for u in listed["items"]} == {upload["id"], ok.json()["id"]}
    assert http.delete(f"/v1/uploads/{upload['id']}").status_code == 200
    assert_error(http.get(f"/v1/uploads/{upload['id']}"), 404, "not_found")


def test_request_limits_name_the_limit(make_client) -> None:
    http = make_client(max_texts_per_request=3, max_text_chars=40, max_tokens_per_text=64, max_top_k=16)
    cases = [
        ({**CAPTURE, "dataset": {"kind": "texts", "texts": ["a"] * 4}}, 413, "max_texts_per_request"),
        ({**CAPTURE, "dataset": {"kind": "texts", "texts": ["x" * 41]}}, 413, "max_text_chars"),
        ({**CAPTURE, "options": {"max_length": 128}}, 422, "max_tokens_per_text"),
    ]
    for body, status, limit in cases:
        error = assert_error(http.post("/v1/activations", json=body), status, "limit_exceeded")
        assert error["details"]["limit"] == limit and limit in error["message"]
    encode = http.post("/v1/saes/sae-x/encode", json={"text": "hi", "top_k": 17})
    assert assert_error(encode, 422, "limit_exceeded")["details"]["limit"] == "max_top_k"
    long_text = http.post("/v1/saes/sae-x/encode", json={"text": "y" * 41})
    assert assert_error(long_text, 413)["details"]["limit"] == "max_text_chars"


def test_idempotency_key_returns_the_same_job(make_client) -> None:
    http = make_client()
    first = http.post("/v1/activations", json=CAPTURE, headers={"Idempotency-Key": "k-1"})
    again = http.post("/v1/activations", json=CAPTURE, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert first.json()["artifacts"] == again.json()["artifacts"]
    assert again.headers["Location"] == f"/v1/jobs/{first.json()['id']}"
    other = http.post("/v1/activations", json=CAPTURE, headers={"Idempotency-Key": "k-2"})
    assert other.json()["id"] != first.json()["id"]
    changed = {**CAPTURE, "layers": ["model.layers.4"]}
    assert_error(
        http.post("/v1/activations", json=changed, headers={"Idempotency-Key": "k-1"}), 409, "conflict"
    )
    assert http.get("/v1/jobs").json()["total"] == 2


def test_jobs_list_filters_and_paginates(make_client) -> None:
    http = make_client()
    ids = [http.post("/v1/activations", json=CAPTURE).json()["id"] for _ in range(5)]
    page = http.get("/v1/jobs", params={"limit": 2, "offset": 1}).json()
    assert page["total"] == 5 and page["limit"] == 2 and page["offset"] == 1
    assert [j["id"] for j in page["items"]] == ids[::-1][1:3]  # newest first
    assert http.get("/v1/jobs", params={"status": "queued", "kind": "capture"}).json()["total"] == 5
    assert http.get("/v1/jobs", params={"status": "finished"}).json()["total"] == 0
    assert_error(http.get("/v1/jobs", params={"status": "sleeping"}), 422, "invalid_input")
    cancelled = http.post(f"/v1/jobs/{ids[0]}/cancel")
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "canceled"
    assert_error(http.post(f"/v1/jobs/{ids[0]}/cancel"), 409, "conflict")
    assert http.get("/v1/jobs", params={"status": "canceled"}).json()["total"] == 1


def test_errors_share_one_shape(make_client) -> None:
    http = make_client()
    assert_error(http.get("/v1/nothing-here"), 404)
    assert_error(http.put("/v1/jobs"), 405)
    assert_error(
        http.post("/v1/activations", content=b"{not json", headers={"content-type": "application/json"}), 422
    )
    error = assert_error(
        http.post("/v1/activations", json={**CAPTURE, "colour": "red"}), 422, "invalid_input"
    )
    assert "colour" in error["message"]
    assert_error(http.get("/v1/jobs/job-does-not-exist"), 404, "not_found")
    assert_error(http.get("/v1/activations/run-does-not-exist"), 404, "not_found")
    ready = http.get("/ready")  # no worker in this test
    assert "no worker" in assert_error(ready, 503, "not_ready")["message"]
    encode = http.post(f"/v1/models/{DEFAULT_MODEL}/load")
    assert "no worker" in assert_error(encode, 503)["message"]


def test_metrics_count_http_and_queues(make_client) -> None:
    http = make_client()
    http.post("/v1/activations", json=CAPTURE)
    text = http.get("/metrics").text
    assert 'kestrel_queue_depth{queue="batch"} 1.0' in text
    assert 'kestrel_jobs{queue="batch",state="queued"} 1.0' in text
    assert 'kestrel_workers{queue="interactive"} 0.0' in text
    assert "http_requests_total" in text and 'handler="/v1/activations"' in text


def test_openapi_has_readable_operation_ids_and_models(make_client) -> None:
    spec = make_client().get("/openapi.json").json()
    operations = [op for ops in spec["paths"].values() for op in ops.values()]
    ids = [op["operationId"] for op in operations]
    assert len(ids) == len(set(ids)) and all(re.fullmatch(r"[a-z_]+", i) for i in ids), ids
    for op in operations:
        assert "200" in op["responses"] or "201" in op["responses"] or "202" in op["responses"], op[
            "operationId"
        ]
    assert {"start_capture", "start_training", "encode_text", "get_job", "cancel_job"} <= set(ids)
    assert json.dumps(spec["components"]["schemas"]["ErrorResponse"])


def test_cors_is_off_unless_configured(make_client) -> None:
    preflight = {"Origin": "http://ui.example", "Access-Control-Request-Method": "GET"}
    off = make_client().options("/v1/jobs", headers=preflight)
    assert "access-control-allow-origin" not in off.headers
    on = make_client(cors_origins=["http://ui.example"]).options("/v1/jobs", headers=preflight)
    assert on.headers["access-control-allow-origin"] == "http://ui.example"


def test_upload_body_is_streamed_not_trusted(make_client) -> None:
    """A multipart body declaring a huge length is refused before it is read."""
    http = make_client(max_upload_mb=0.01)
    body = io.BytesIO(b"x" * 100)
    response = http.post(
        "/v1/uploads",
        files={"file": ("a.txt", body, "text/plain")},
        headers={"content-length": str(50 * 1024 * 1024)},
    )
    assert response.status_code in (400, 413)


def test_request_bodies_are_size_limited(make_client) -> None:
    http = make_client(max_request_mb=0.001, max_text_chars=100_000)  # ~1 KB of JSON
    body = {**CAPTURE, "dataset": {"kind": "texts", "texts": ["x" * 2000]}}
    error = assert_error(http.post("/v1/activations", json=body), 413, "limit_exceeded")
    assert error["details"]["limit"] == "max_request_mb" and "max_request_mb" in error["message"]
    small = http.post("/v1/uploads", files={"file": ("a.txt", b"y" * 2000, "text/plain")})
    assert small.status_code == 201, small.text  # uploads have their own, larger limit

    def chunked():  # no Content-Length: counted as it streams
        yield b'{"layers": ["model.layers.3"], "dataset": {"kind": "texts", "texts": ["'
        yield from [b"x" * 500] * 10
        yield b'"]}}'

    streamed = http.post("/v1/activations", content=chunked(), headers={"content-type": "application/json"})
    assert assert_error(streamed, 413, "limit_exceeded")["details"]["limit"] == "max_request_mb"


def test_training_history_serves_curves_and_null_for_a_diverged_step(client, service) -> None:
    """JSON has no NaN: a step whose loss was not finite reads null, and the rest of the curve is kept."""
    from kestrel.core.store import LocalStore

    sae_id = "sae-history-nan"
    with LocalStore(service.store_root).writer("saes", sae_id) as writer:
        lines = [
            {"step": 1, "tokens": 64, "loss": 2.5, "fvu": 0.9, "l0": 8.0, "dead_fraction": 0.0},
            {"step": 2, "tokens": 128, "loss": float("nan"), "fvu": float("inf")}
            | {"l0": 8.0, "dead_fraction": 0.1},
        ]
        (writer.directory / "history.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        writer.commit({"id": sae_id, "kind": "sae"})
    try:
        response = client.get(f"/v1/saes/{sae_id}/history")
        assert response.status_code == 200, response.text
        points = response.json()["points"]
        assert [p["tokens"] for p in points] == [64, 128] and points[0]["loss"] == 2.5
        assert points[1]["loss"] is None and points[1]["fvu"] is None and points[1]["l0"] == 8.0
        assert_error(client.get("/v1/saes/sae-nowhere/history"), 404, "not_found")
    finally:
        LocalStore(service.store_root).delete("saes", sae_id)


def test_every_json_body_ends_with_a_newline_over_real_http(make_stack) -> None:
    """Success bodies (pydantic's fast path, the OpenAPI document) and error bodies (route errors,
    validation, bad JSON, body limit, 404 route, 405) end with one newline, and Content-Length
    counts it: read off a real uvicorn socket."""
    stack = make_stack(KESTREL_MAX_REQUEST_MB="0.001")
    stack.start_api()
    requests = [
        ("GET", "/health", None, 200),
        ("GET", "/v1/jobs", None, 200),
        ("GET", "/openapi.json", None, 200),
        ("GET", "/v1/jobs/job-nobody", None, 404),
        ("POST", "/v1/activations", b'{"layers": []}', 422),
        ("POST", "/v1/activations", b'{"layers": [', 422),
        ("POST", "/v1/activations", b'{"x": "' + b"y" * 4096 + b'"}', 413),
        ("GET", "/v1/no-such-route", None, 404),
        ("DELETE", "/health", None, 405),
    ]
    with stack.client() as http:
        for method, path, body, status in requests:
            response = http.request(method, path, content=body, headers={"content-type": "application/json"})
            assert response.status_code == status, (path, response.text)
            raw = response.content
            assert raw.endswith(b"\n") and not raw.endswith(b"\n\n"), (path, raw[-40:])
            assert int(response.headers["content-length"]) == len(raw), path
            json.loads(raw)
