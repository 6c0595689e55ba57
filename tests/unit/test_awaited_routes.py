"""Awaited routes document what a client gets when the wait runs out: 202 with the job, never 504."""

from __future__ import annotations

import pytest

from kestrel.server import openapi

AWAITED = [
    ("post", "/v1/saes/{sae_id}/encode"),
    ("get", "/v1/models/{name}/layers"),
    ("post", "/v1/models/{name}/load"),
    ("post", "/v1/models/{name}/generate"),
    ("post", "/v1/steering/preview"),
    ("post", "/v1/steering/sweep"),
    ("post", "/v1/saes/{sae_id}/features/{latent}/logits/measured"),
    ("post", "/v1/analyses/{analysis_id}/graph/interventions"),
]


@pytest.fixture(scope="module")
def spec() -> dict:
    return openapi.build_spec()


@pytest.mark.parametrize(("method", "path"), AWAITED)
def test_awaited_routes_document_202_with_the_job(spec: dict, method: str, path: str) -> None:
    responses = spec["paths"][path][method]["responses"]
    assert responses["202"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/JobInfo"
    }
    assert "KESTREL_INTERACTIVE_TIMEOUT_S" in responses["202"]["description"]
    assert "504" not in responses
    assert "424" in responses  # a hub model that cannot be had


def test_no_route_answers_504(spec: dict) -> None:
    statuses = {status for ops in spec["paths"].values() for op in ops.values() for status in op["responses"]}
    assert "504" not in statuses
