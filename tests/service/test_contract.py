"""Schemathesis over the whole OpenAPI document, in process against the ASGI app.

Every operation gets generated requests, valid and invalid; no answer may be a 5xx, use a status
the operation does not document, or break the documented schema. The app talks to a real Redis
(a fresh database) and a real interactive worker (so /ready is 200 and model routes can answer);
batch jobs just queue. Bounded: ``MAX_EXAMPLES`` requests per operation, no deadline.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from service_stack import (
    AWAITED_TIMEOUT_S,
    CONTRACT_DB,
    FULL_WORKERS,
    READY_TIMEOUT_S,
    TEXTS,
    Stack,
    full_stack,
    wait_for_job,
    wait_until,
)

from kestrel.server.openapi import build_spec
from kestrel.workers import lifecycle, registry
from kestrel.workers.supervisor import EmbeddedRedis

MAX_EXAMPLES = 25
LAYER = "model.layers.1"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def contract_stack(
    redis_server: EmbeddedRedis, warm_model_cache, local_models, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    url = f"redis://127.0.0.1:{redis_server.port}/{CONTRACT_DB}"
    stack = full_stack(url, tmp_path_factory.mktemp("contract"), warm_model_cache, local_models)
    redis = lifecycle.connect(stack.redis_url)
    try:  # no API process here: the workers' own records say they are up
        wait_until(
            lambda: registry.workers_per_queue(registry.live_workers(redis)) == FULL_WORKERS,
            READY_TIMEOUT_S,
            "the workers to start",
            stack,
        )
    finally:
        redis.close()
    yield stack
    stack.stop_all()


@pytest.fixture(scope="module")
def contract(contract_stack: Stack) -> Iterator[tuple[Any, dict[str, str]]]:
    """The app, and ids of real resources made through it: a run and an SAE on the tiny model, an
    upload, a finished job and (the batch worker stopped by then) a queued one."""
    from fastapi.testclient import TestClient

    from kestrel.server.app import create_app
    from kestrel.settings import Settings

    app_settings = Settings(
        store_root=contract_stack.store_root,
        redis_url=contract_stack.redis_url,
        model_dirs=[contract_stack.extra_env["KESTREL_MODEL_DIRS"]],
        interactive_timeout_s=AWAITED_TIMEOUT_S,
    )
    app = create_app(app_settings)
    with TestClient(app) as http:  # the lifespan (the reaper) runs around the whole module
        body = {"model": "tiny-llama", "layers": [LAYER], "dataset": {"kind": "texts", "texts": TEXTS}}
        run_id = wait_for_job(http, http.post("/v1/activations", json=body).json()["id"])["artifacts"][
            "run_id"
        ]
        train = {"run_id": run_id, "layer": LAYER, "sae": {"n_latents": 64, "k": 4}}
        train["train"] = {"batch_size": 64, "token_budget": 2_000}
        finished = wait_for_job(http, http.post("/v1/saes", json=train).json()["id"])
        upload = http.post("/v1/uploads", files={"file": ("notes.txt", b"one line\nanother line\n")})
        contract_stack.stop("worker-batch")
        queued = http.post("/v1/activations", json=body).json()["id"]
        yield (
            app,
            {
                "run_id": run_id,
                "sae_id": finished["artifacts"]["sae_id"],
                "upload_id": upload.json()["id"],
                "finished_job": finished["id"],
                "queued_job": queued,
            },
        )


# The document the app serves (the same one `make openapi` exports); requests go to the fixture's app.
schema = schemathesis.openapi.from_dict(build_spec())


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_contract(case, contract) -> None:
    app, _ = contract
    case.call_and_validate(app=app, checks=CHECKS)


def test_real_resources_conform(contract) -> None:
    """Generated ids never name a real resource; these requests do, and pass the same checks."""
    app, ids = contract
    run, sae, upload = ({key: ids[key]} for key in ("run_id", "sae_id", "upload_id"))
    finished, queued = {"job_id": ids["finished_job"]}, {"job_id": ids["queued_job"]}
    tiny = {"name": "tiny-llama"}
    requests: list[tuple[str, str, dict[str, Any], int]] = [
        ("GET", "/ready", {}, 200),
        ("GET", "/metrics", {}, 200),
        ("GET", "/v1/models", {}, 200),
        ("POST", "/v1/models/{name}/load", {"path_parameters": tiny}, 200),
        ("GET", "/v1/models/{name}/layers", {"path_parameters": tiny}, 200),
        ("GET", "/v1/activations", {}, 200),
        ("GET", "/v1/activations/{run_id}", {"path_parameters": run}, 200),
        ("GET", "/v1/saes", {}, 200),
        ("GET", "/v1/saes/{sae_id}", {"path_parameters": sae}, 200),
        ("POST", "/v1/saes/{sae_id}/encode", {"path_parameters": sae, "body": {"text": "The cat sat."}}, 200),
        ("POST", "/v1/saes/{sae_id}/evaluate", {"path_parameters": sae, "body": {}}, 202),
        ("GET", "/v1/saes/{sae_id}/download", {"path_parameters": sae, "query": {"format": "saelens"}}, 200),
        ("POST", "/v1/saes/{sae_id}/ledger", {"path_parameters": sae, "body": {}}, 202),
        ("GET", "/v1/saes/{sae_id}/ledger", {"path_parameters": sae}, 404),
        ("GET", "/v1/saes/compare", {"query": {"ids": ids["sae_id"]}}, 200),
        ("GET", "/v1/uploads", {}, 200),
        ("GET", "/v1/uploads/{upload_id}", {"path_parameters": upload}, 200),
        ("GET", "/v1/jobs", {"query": {"limit": 500}}, 200),
        ("GET", "/v1/jobs/{job_id}", {"path_parameters": finished}, 200),
        ("GET", "/v1/jobs/{job_id}", {"path_parameters": queued}, 200),
        ("GET", "/v1/jobs/{job_id}/events", {"path_parameters": finished}, 200),
        ("POST", "/v1/jobs/{job_id}/cancel", {"path_parameters": queued}, 202),
        ("POST", "/v1/jobs/{job_id}/cancel", {"path_parameters": finished}, 409),
        ("DELETE", "/v1/saes/{sae_id}", {"path_parameters": sae}, 200),
        ("DELETE", "/v1/activations/{run_id}", {"path_parameters": run}, 200),
        ("DELETE", "/v1/uploads/{upload_id}", {"path_parameters": upload}, 200),
    ]
    for method, path, parts, expected in requests:
        response = schema[path][method].Case(**parts).call_and_validate(app=app, checks=CHECKS)
        assert response.status_code == expected, (method, path, response.status_code, response.text)
