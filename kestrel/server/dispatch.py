"""Submitting work: batch jobs answered with 202, awaited jobs answered with their result.

The API never runs a model. A long job is enqueued on ``batch`` and its description returned at
once (202, ``Location: /v1/jobs/{id}``). An awaited one is enqueued on ``interactive`` (about a
forward pass: encode, layer tables, previews) or ``generate`` (model loads, generation) and the
request waits for its result up to ``interactive_timeout_s``. One that takes longer is answered
like a batch job (202 with the job and its Location), never with an error: it keeps running, and
``GET /v1/jobs/{id}`` (or its event stream) then holds the result, which is not lost. Every awaited
route behaves so, encode included, so a client needs one rule: 200 is the answer, 202 a job to
follow. Redis calls are blocking, so they run in threads off the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from fastapi import Response
from redis import Redis
from rq.job import JobStatus

from kestrel.core.errors import NotFoundError
from kestrel.schemas import TERMINAL_STATES, JobInfo
from kestrel.server.errors import STATUS_BY_CODE, ApiError, StillRunning
from kestrel.settings import Settings
from kestrel.workers import idempotency, lifecycle, registry

# An interactive job takes about a forward pass: poll finely at first, so the answer is not late by
# a backoff step (a growing delay added up to half the job's time), then settle to a slow poll.
POLL_FAST_S = 0.005
POLL_FAST_FOR_S = 2.0
POLL_SLOW_S = 0.1
# OpenAPI ``responses=`` entry of every awaited route: what a client gets when the wait runs out.
STILL_RUNNING_RESPONSE: dict[int | str, dict[str, Any]] = {
    202: {
        "model": JobInfo,
        "description": "still running after KESTREL_INTERACTIVE_TIMEOUT_S: the job, to poll at its "
        "Location (GET /v1/jobs/{id}, or its event stream); once finished its `result` holds this "
        "route's answer (its job_id is the job's id)",
    }
}


def submit_batch(
    redis: Redis,
    settings: Settings,
    response: Response,
    func: Callable[..., Any] | str,
    *,
    kind: str,
    kwargs: dict[str, Any],
    artifacts: dict[str, str | list[str]] | None = None,
    idempotency_key: str | None = None,
    request_body: Any = None,
) -> JobInfo:
    """Enqueue a long job on the batch queue; set 202 + Location; honour an Idempotency-Key.

    ``request_body`` is what the client sent (for the idempotency fingerprint): ``kwargs`` hold
    server-generated ids that differ between two submissions of the same request.
    """
    job_id: str | None = None
    if idempotency_key:
        fingerprint = idempotency.request_fingerprint({"kind": kind, "body": request_body})
        job_id, is_new = idempotency.claim_idempotency_key(
            redis, kind, idempotency_key, fingerprint, settings.idempotency_ttl_s
        )
        if not is_new:
            info = _existing_job(redis, job_id)
            _accepted(response, info)
            return info
    try:
        job = lifecycle.enqueue(
            redis,
            lifecycle.BATCH,
            func,
            kind=kind,
            kwargs=kwargs,
            artifacts=artifacts,
            timeout_s=settings.batch_job_timeout_s,
            ttl_s=settings.job_ttl_s,
            job_id=job_id,
        )
    except BaseException:
        if idempotency_key:
            idempotency.release_idempotency_key(redis, kind, idempotency_key)
        raise
    info = lifecycle.describe(job)
    _accepted(response, info)
    return info


def _existing_job(redis: Redis, job_id: str, wait_s: float = 2.0) -> JobInfo:
    """The job bound to an idempotency key; the first request may still be enqueueing it."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return lifecycle.get_job(redis, job_id)
        except NotFoundError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _accepted(response: Response, info: JobInfo) -> None:
    response.status_code = 202
    response.headers["Location"] = info.location


async def run_interactive(
    redis: Redis,
    settings: Settings,
    func: Callable[..., Any] | str,
    *,
    kind: str,
    kwargs: dict[str, Any],
    queue_name: str = lifecycle.INTERACTIVE,
) -> tuple[str, dict[str, Any]]:
    """Enqueue on an awaited queue and wait for the result: ``(job id, return value)``.

    Past ``interactive_timeout_s`` raises ``StillRunning`` (answered 202 with the job).
    """
    await asyncio.to_thread(_require_worker, redis, queue_name)
    job = await asyncio.to_thread(
        lifecycle.enqueue,
        redis,
        queue_name,
        func,
        kind=kind,
        kwargs=kwargs,
        timeout_s=settings.interactive_job_timeout_s,
        ttl_s=settings.interactive_job_ttl_s,
    )
    started = time.monotonic()
    deadline = started + settings.interactive_timeout_s
    while True:
        status = await asyncio.to_thread(job.get_status)
        if status == JobStatus.FINISHED:
            return job.id, await asyncio.to_thread(job.return_value, True)
        if status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
            info = await asyncio.to_thread(lifecycle.get_job, redis, job.id)
            raise _job_error(info)
        if time.monotonic() > deadline:
            info = await asyncio.to_thread(lifecycle.get_job, redis, job.id)
            if info.status == "finished":  # it ended between the two reads: answer it, not the job
                return job.id, await asyncio.to_thread(job.return_value, True)
            if info.status in TERMINAL_STATES:
                raise _job_error(info)
            raise StillRunning(info)
        fast = time.monotonic() - started < POLL_FAST_FOR_S
        await asyncio.sleep(POLL_FAST_S if fast else POLL_SLOW_S)


def _require_worker(redis: Redis, queue_name: str) -> None:
    """Fail fast (503) when no worker serves the queue, rather than time out."""
    counts = registry.workers_per_queue(registry.live_workers(redis))
    if not counts.get(queue_name):
        raise ApiError(
            503,
            f"no worker is serving the {queue_name!r} queue; "
            f"start one with `kestrel worker --queue {queue_name}`",
            code="unavailable",
            details={"queue": queue_name},
        )


def _job_error(info: JobInfo) -> ApiError:
    """The failed job's own error, with the HTTP status its code implies."""
    if info.error is None:
        return ApiError(500, f"job {info.id} {info.status}", details={"job_id": info.id})
    status = STATUS_BY_CODE.get(info.error.code, 500)  # a failed job's code → this route's status
    details = {**info.error.details, "job_id": info.id}
    return ApiError(status, info.error.message, code=info.error.code, details=details)
