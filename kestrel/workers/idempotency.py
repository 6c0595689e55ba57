"""Idempotency keys: a client's ``Idempotency-Key`` bound to the job its first request made, so a
retried POST returns that job instead of queuing the work twice."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from redis import Redis

from kestrel.core.errors import ConflictError
from kestrel.workers.lifecycle import PREFIX, new_job_id

IDEMPOTENCY_KEY = PREFIX + ":idempotency:{}"


def request_fingerprint(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _idempotency_redis_key(scope: str, key: str) -> str:
    return IDEMPOTENCY_KEY.format(hashlib.sha256(f"{scope}\0{key}".encode()).hexdigest())


def claim_idempotency_key(
    redis: Redis, scope: str, key: str, fingerprint: str, ttl_s: int
) -> tuple[str, bool]:
    """Bind ``key`` to a job id: ``(new id, True)`` for a first request, ``(bound id, False)`` after.

    The first request with a key wins (SET NX); a resubmission gets the same job. The same key with
    a different request body is a client bug, answered with 409 rather than silently ignored.
    """
    redis_key = _idempotency_redis_key(scope, key)
    job_id = new_job_id()
    if redis.set(redis_key, json.dumps({"job_id": job_id, "fingerprint": fingerprint}), nx=True, ex=ttl_s):
        return job_id, True
    existing = json.loads(redis.get(redis_key) or b"{}")
    if existing.get("fingerprint") != fingerprint:
        raise ConflictError(
            "Idempotency-Key was already used for a different request; use a new key",
            details={"job_id": existing.get("job_id")},
        )
    return existing["job_id"], False


def release_idempotency_key(redis: Redis, scope: str, key: str) -> None:
    """Forget a key whose job could not be enqueued, so a retry is not bound to nothing."""
    redis.delete(_idempotency_redis_key(scope, key))
