"""Kestrel included in an app of the test's own: ``include_kestrel(app, ...)`` with one call.

The host app has its own route and its own (FastAPI default) error handling; Kestrel's routes run
next to them under ``/kestrel`` against real Redis and a real batch worker, with the app served by
uvicorn on a free port. The host's routes, errors and OpenAPI must be as they were, plus Kestrel's.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import asynccontextmanager

import httpx
import pytest
import torch
import transformers as tf
import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from pydantic import BaseModel
from safetensors.torch import save
from service_stack import READY_TIMEOUT_S, Stack, assert_error, wait_for_job, wait_until
from tiny_models import tiny_llama_config

from kestrel.core.models import DEFAULT_MODEL
from kestrel.server.embed import KestrelContext, include_kestrel, kestrel_router
from kestrel.settings import Settings
from kestrel.workers.supervisor import free_port

HIDDEN = 16
N_ROWS = 400


class Prediction(BaseModel):
    x: int


def host_app(settings: Settings) -> tuple[FastAPI, KestrelContext]:
    """A model-serving app as a user would write it, with Kestrel included by one call."""
    torch.manual_seed(0)
    config = tiny_llama_config(
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
    )
    model = tf.LlamaForCausalLM(config).eval()
    app = FastAPI(title="host app")

    @app.post("/predict")
    def predict(body: Prediction) -> dict[str, int]:
        return {"y": body.x * 2}

    context = include_kestrel(app, settings, models={"host-lm": model})
    return app, context


class UvicornThread:
    """The app served by uvicorn in a thread of the test process, on a free port."""

    def __init__(self, app: FastAPI) -> None:
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> UvicornThread:
        self.thread.start()
        wait_until(lambda: self.server.started, 60, "uvicorn to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture
def stack(make_stack) -> Stack:
    stack = make_stack()
    stack.start_worker("batch")
    return stack


@pytest.fixture
def served(stack: Stack) -> Iterator[tuple[httpx.Client, KestrelContext]]:
    settings = Settings(store_root=stack.store_root, redis_url=stack.redis_url)
    app, context = host_app(settings)
    with (
        UvicornThread(app) as server,
        httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=60) as http,
    ):
        yield http, context
    context.close()


def test_kestrel_inside_a_host_app(served, stack: Stack) -> None:
    http, context = served

    # The host's own route and its own error shape are untouched.
    assert http.post("/predict", json={"x": 21}).json() == {"y": 42}
    assert http.get("/kestrel/nowhere").json() == {"detail": "Not Found"}, "unknown paths stay the host's"
    host_error = http.post("/predict", json={"x": "not a number"})
    assert host_error.status_code == 422 and "detail" in host_error.json()

    # Kestrel answers under the prefix, through the host app, with a real worker behind it.
    wait_until(
        lambda: http.get("/kestrel/ready").json()["workers"].get("batch", 0) >= 1,
        READY_TIMEOUT_S,
        "the batch worker",
        stack,
    )

    # Layer listing: the host's in-process model beside Kestrel's bundled ones.
    models = {m["name"]: m for m in http.get("/kestrel/v1/models").json()["items"]}
    assert models["host-lm"]["source"] == "app" and models[DEFAULT_MODEL]["source"] == "bundled"
    layers = http.get("/kestrel/v1/models/host-lm/layers").json()
    by_name = {row["name"]: row for row in layers["layers"]}
    assert by_name["model.layers.1"]["kind"] == "block" and by_name["model.layers.1"]["width"] == HIDDEN

    # An upload of a safetensors file becomes a run.
    acts = torch.randn(N_ROWS, HIDDEN)
    meta = {"doc_index": torch.arange(N_ROWS) // 20, "position": torch.arange(N_ROWS) % 20}
    file = save({"resid": acts, **meta})
    uploaded = http.post("/kestrel/v1/uploads", files={"file": ("acts.safetensors", file)})
    assert uploaded.status_code == 201, uploaded.text
    imported = http.post(
        "/kestrel/v1/activations/imports",
        json={"upload_id": uploaded.json()["id"], "tensors": {"resid": "model.layers.1"}, "model": "host-lm"},
    )
    assert imported.status_code == 201, imported.text
    run = imported.json()
    assert run["n_tokens"] == N_ROWS and run["model"]["loadable"] is False
    assert http.get(f"/kestrel/v1/activations/{run['id']}").json()["id"] == run["id"]

    # An analysis of the imported run, started and polled through the host app.
    if "analyses" in context.resources:
        started = http.post(
            "/kestrel/v1/analyses", json={"kind": "neuron", "run_id": run["id"], "layer": "model.layers.1"}
        )
        assert started.status_code == 202, started.text
        job_id, location = started.json()["id"], started.headers["location"]
        assert location == f"/kestrel/v1/jobs/{job_id}" and started.json()["location"] == location
        job = wait_for_job(http, job_id, prefix="/kestrel")  # polls the location: a failed job fails here
        analysis = http.get(f"/kestrel/v1/analyses/{job['artifacts']['analysis_id']}")
        assert analysis.status_code == 200 and analysis.json()["kind"] == "neuron"

    # Kestrel's errors keep Kestrel's shape.
    assert_error(http.get("/kestrel/v1/activations/run-nope"), 404, "not_found")
    assert_error(http.get("/kestrel/v1/activations/Not_An_Id"), 422, "invalid_input")
    bad = http.post(
        "/kestrel/v1/activations/imports", json={"upload_id": uploaded.json()["id"], "dtype": "fp8"}
    )
    assert_error(bad, 422, "invalid_input")
    wrong_rows = save({"a": torch.zeros(4, 3), "b": torch.zeros(5, 3)})
    upload_id = http.post("/kestrel/v1/uploads", files={"file": ("x.safetensors", wrong_rows)}).json()["id"]
    error = assert_error(http.post("/kestrel/v1/activations/imports", json={"upload_id": upload_id}), 422)
    assert "tensor 'b' has 5 rows" in error["message"]

    # The host's OpenAPI has both: its own route and Kestrel's, operation ids unique.
    spec = http.get("/openapi.json").json()
    assert spec["info"]["title"] == "host app"
    assert {"/predict", "/kestrel/v1/uploads", "/kestrel/v1/activations/imports"} <= set(spec["paths"])
    assert "/kestrel/v1/models/{name}/layers" in spec["paths"]
    operation_ids = [op["operationId"] for path in spec["paths"].values() for op in path.values()]
    assert len(operation_ids) == len(set(operation_ids))
    assert "kestrel_import_run" in operation_ids and "ErrorResponse" in spec["components"]["schemas"]


def test_each_app_keeps_its_own_errors_and_keys(tmp_path) -> None:
    """The host's handlers never see Kestrel's errors and Kestrel's never see the host's; the API
    key guards Kestrel's routes only. No Redis needed: nothing here reaches it."""
    settings = Settings(store_root=tmp_path / "store", redis_url="redis://127.0.0.1:1/0", api_key="s3cret")
    app, _ = host_app(settings)

    @app.exception_handler(RequestValidationError)
    async def host_validation_error(request, exc) -> JSONResponse:
        return JSONResponse({"host_says": "bad input"}, status_code=400)

    key = {"X-API-Key": "s3cret"}
    with TestClient(app) as client:
        assert client.post("/predict", json={"x": 1}).json() == {"y": 2}
        assert client.post("/predict", json={"x": "a"}).json() == {"host_says": "bad input"}
        assert client.get("/nowhere").json() == {"detail": "Not Found"}
        assert_error(client.get("/kestrel/v1/uploads/Not_An_Id", headers=key), 422, "invalid_input")
        assert_error(client.get("/kestrel/v1/uploads/upload-nope", headers=key), 404, "not_found")
        assert_error(client.get("/kestrel/v1/uploads"), 401, "unauthorized")
        assert client.get("/kestrel/v1/uploads", headers=key).status_code == 200
        assert client.get("/kestrel/health").status_code == 200, "health needs no key, as in Kestrel's app"
        assert_error(client.get("/kestrel/v1/jobs", headers=key), 503, "unavailable")  # Redis is down


def test_kestrel_router_for_include_router(tmp_path) -> None:
    """The same routes as a router, for hosts that prefer ``app.include_router``."""
    settings = Settings(store_root=tmp_path / "store", redis_url="redis://127.0.0.1:1/0")
    app = FastAPI()
    app.include_router(kestrel_router(settings, prefix="/tools/kestrel", resources=["health", "uploads"]))
    with TestClient(app) as client:
        assert client.get("/tools/kestrel/health").json()["status"] == "ok"
        assert client.get("/tools/kestrel/v1/uploads").json()["total"] == 0
        assert client.get("/tools/kestrel/v1/jobs").status_code == 404, "only the resources asked for"


def test_the_host_apps_shutdown_closes_kestrels_redis(tmp_path, monkeypatch) -> None:
    """Both ways of including Kestrel release its Redis client when the host app shuts down, beside
    the host's own lifespan (which still runs)."""
    settings = Settings(store_root=tmp_path / "store", redis_url="redis://127.0.0.1:1/0")
    closed: list[KestrelContext] = []
    close = KestrelContext.close
    monkeypatch.setattr(KestrelContext, "close", lambda self: (closed.append(self), close(self)))
    host_events: list[str] = []

    @asynccontextmanager
    async def host_lifespan(app: FastAPI):
        host_events.append("startup")
        yield
        host_events.append("shutdown")

    app = FastAPI(lifespan=host_lifespan)
    app.include_router(kestrel_router(settings, prefix="/a", resources=["health"]))
    context = include_kestrel(app, settings, prefix="/b", resources=["health"])
    with TestClient(app) as client:
        assert client.get("/b/health").status_code == 200
        assert context.redis is not None and closed == []
    assert host_events == ["startup", "shutdown"]
    assert len(closed) == 2 and context in closed and context._redis is None
