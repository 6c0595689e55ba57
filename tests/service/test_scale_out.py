"""Scale-out on one machine (docs/scaling.md): two "hosts", each a batch worker with a store
directory of its own (its own model cache and S3 read cache), pull jobs from one Redis and keep
every artifact in one S3 bucket (a moto server). Nothing but RQ and the store coordinates them.

Two captures submitted together both finish, whichever worker takes each (the queue decides; no
test here depends on timing), and their runs are in the bucket. Then one host leaves (SIGTERM):
a training on a run the two hosts wrote must be done by the one that stays, which reads its
input from the bucket, not from a disk the other host had.
"""

from __future__ import annotations

import boto3
import pytest
from redis import Redis
from s3_server import AWS_ENV, new_bucket
from service_stack import TEXTS, wait_for_job

from kestrel.core.store import parse_s3_url

pytest.importorskip("moto.server", reason="the S3 tests need moto[server] (the dev extra)")

MODEL = "tiny-llama"
LAYER = "model.layers.1"


def _bucket_keys(env: dict[str, str]) -> set[str]:
    bucket, prefix = parse_s3_url(env["KESTREL_S3_URL"])
    client = boto3.client("s3", endpoint_url=env["KESTREL_S3_ENDPOINT_URL"], region_name="us-east-1")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return {obj["Key"][len(prefix) + 1 :] for page in pages for obj in page.get("Contents", [])}


def _worker_of(redis_url: str, job_id: str) -> str:
    """The rq worker that ran the job (rq records it on the job's hash)."""
    name = Redis.from_url(redis_url).hget(f"rq:job:{job_id}", "worker_name")
    return (name or b"").decode()


def test_two_hosts_share_one_redis_and_one_bucket(make_stack, s3_endpoint, local_models) -> None:
    s3_env = {
        **AWS_ENV,
        "KESTREL_STORE_BACKEND": "s3",
        "KESTREL_S3_URL": new_bucket(s3_endpoint),
        "KESTREL_S3_ENDPOINT_URL": s3_endpoint,
        "KESTREL_MODEL_DIRS": str(local_models),
    }
    host_a = make_stack(**s3_env)  # the API and one worker
    host_b = make_stack(redis_url=host_a.redis_url, **s3_env)  # one more worker, its own disk
    assert host_a.store_root != host_b.store_root
    host_a.start_worker("batch", name="host-a")
    host_b.start_worker("batch", name="host-b")
    host_a.start_api()
    host_a.wait_ready({"batch": 2})

    with host_a.client() as http:
        jobs = []
        for half in (TEXTS[:12], TEXTS[12:]):
            body = {"model": MODEL, "layers": [LAYER], "dataset": {"kind": "texts", "texts": half}}
            response = http.post("/v1/activations", json=body)
            assert response.status_code == 202, response.text
            jobs.append(response.json()["id"])
        runs = [wait_for_job(http, job_id)["artifacts"]["run_id"] for job_id in jobs]
        assert len(set(runs)) == 2
        workers = {_worker_of(host_a.redis_url, job_id) for job_id in jobs}
        assert workers and all(w.startswith(("host-a-", "host-b-")) for w in workers), workers
        listed = {r["id"] for r in http.get("/v1/activations").json()["items"]}
        assert set(runs) <= listed

        # Host A leaves; its warm shutdown ends it between jobs. The training that follows can
        # only run on host B, reading a run (maybe host A's) from the bucket.
        assert host_a.stop("host-a") == 0
        train = {"run_id": runs[0], "layer": LAYER, "sae": {"n_latents": 32, "k": 4}}
        train["train"] = {"batch_size": 64, "token_budget": 2_000}
        response = http.post("/v1/saes", json=train)
        assert response.status_code == 202, response.text
        sae_id = wait_for_job(http, response.json()["id"])["artifacts"]["sae_id"]
        assert _worker_of(host_a.redis_url, response.json()["id"]).startswith("host-b-")

    keys = _bucket_keys(s3_env)
    assert {f"activations/{run}/manifest.json" for run in runs} <= keys
    assert f"saes/{sae_id}/manifest.json" in keys
    for host in (host_a, host_b):  # artifacts live in the bucket; a host's disk holds only caches
        assert not (host.store_root / "activations").exists()
        assert not (host.store_root / "saes").exists()
