"""The service with its store on S3: real Redis, real workers and the API, all three talking to a
moto S3 server on loopback (a subprocess). Capture, train, evaluate and discover over HTTP, and
every artifact lands in the bucket, not in the local store directory (which keeps only caches)."""

from __future__ import annotations

import boto3
import pytest
from s3_server import AWS_ENV, new_bucket
from service_stack import TEXTS, wait_for_job

from kestrel.core.store import parse_s3_url

pytest.importorskip("moto.server", reason="the S3 tests need moto[server] (the dev extra)")

MODEL = "tiny-llama"
LAYER = "model.layers.1"


@pytest.fixture
def s3_env(s3_endpoint: str) -> dict[str, str]:
    """The environment that puts a stack's store on a fresh bucket of the moto server."""
    return {
        **AWS_ENV,
        "KESTREL_STORE_BACKEND": "s3",
        "KESTREL_S3_URL": new_bucket(s3_endpoint),
        "KESTREL_S3_ENDPOINT_URL": s3_endpoint,
    }


def _keys(env: dict[str, str]) -> set[str]:
    bucket, prefix = parse_s3_url(env["KESTREL_S3_URL"])
    client = boto3.client("s3", endpoint_url=env["KESTREL_S3_ENDPOINT_URL"], region_name="us-east-1")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return {obj["Key"][len(prefix) + 1 :] for page in pages for obj in page.get("Contents", [])}


def test_capture_train_discover_over_http_with_the_store_on_s3(make_stack, s3_env, local_models) -> None:
    stack = make_stack(**s3_env, KESTREL_MODEL_DIRS=str(local_models))
    stack.start_worker("batch")
    stack.start_api()
    stack.wait_ready({"batch": 1})
    with stack.client() as http:
        body = {"model": MODEL, "layers": [LAYER], "dataset": {"kind": "texts", "texts": TEXTS * 2}}
        run_id = wait_for_job(http, http.post("/v1/activations", json=body).json()["id"])["artifacts"][
            "run_id"
        ]
        assert run_id in [r["id"] for r in http.get("/v1/activations").json()["items"]]
        train = {"run_id": run_id, "layer": LAYER, "sae": {"n_latents": 64, "k": 4}}
        train["train"] = {"batch_size": 64, "token_budget": 4_000}
        job = wait_for_job(http, http.post("/v1/saes", json=train).json()["id"])
        sae_id = job["artifacts"]["sae_id"]
        assert http.get(f"/v1/saes/{sae_id}").json()["status"] == "complete"
        discovered = http.post(f"/v1/saes/{sae_id}/features/discover", json={"config": {"top_n": 4}})
        assert discovered.status_code == 202, discovered.text
        version = wait_for_job(http, discovered.json()["id"])["result"]["version"]
        listing = http.get(f"/v1/saes/{sae_id}/features", params={"limit": 3}).json()
        assert listing["total"] == 64 and listing["version"] == version

    keys = _keys(s3_env)
    assert {f"activations/{run_id}/manifest.json", f"saes/{sae_id}/manifest.json"} <= keys
    assert f"saes/{sae_id}/features/{version}/features.safetensors" in keys
    assert not any(key.endswith("/.claim") for key in keys), "every writer released its claim"
    for kind in ("activations", "saes"):
        assert not (stack.store_root / kind).exists(), "artifacts live in the bucket, not on disk"
