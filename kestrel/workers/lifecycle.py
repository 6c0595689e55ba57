"""Queues, Redis keys and the job lifecycle as the API sees it: enqueue, describe, cancel, wait.

Three queues, each with its own workers, so slow work never delays fast work:

- ``interactive``: encode, layer tables, steering previews: about a forward pass, awaited by the
  request;
- ``generate``: model loads and generation (plain and steered): seconds to minutes on a CPU, also
  awaited, but never in front of an encode (a 20-token generate behind which every encode queued
  was the reason for this queue);
- ``batch``: capture, training, evaluation: minutes to hours, answered with 202 and polled.

An awaited call that outlives ``interactive_timeout_s`` is answered 202 with its job, like a batch
job, instead of an error: the job keeps running and its result is read from ``GET /v1/jobs/{id}``.

Everything a client reads about a job comes from rq's job hash plus our fields in its ``meta``
(kind, progress, message, metrics, log, error, artifacts), mapped to a small public vocabulary:
queued, started, finished, failed, canceled.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from redis import Redis
from rq import Queue
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus

from kestrel.core.errors import ConflictError, NotFoundError
from kestrel.core.store import new_id, validate_id
from kestrel.schemas import TERMINAL_STATES, ErrorBody, JobInfo

INTERACTIVE = "interactive"
GENERATE = "generate"
BATCH = "batch"
QUEUES = (INTERACTIVE, GENERATE, BATCH)

PREFIX = "kestrel"
JOBS_INDEX = f"{PREFIX}:jobs"  # zset: job id → created (unix time), newest last
CANCEL_KEY = PREFIX + ":cancel:{}"
CANCEL_PARTS_KEY = PREFIX + ":cancel-parts:{}"  # set: the parts of a job (SAE ids) to stop alone
SAE_JOB_KEY = PREFIX + ":sae-job:{}"  # the job training an SAE (for a cancel by SAE id)
UNLOAD_HASH = f"{PREFIX}:unload"
LAYERS_KEY = PREFIX + ":layers:{}"
TRAIN_REQUEST_KEY = PREFIX + ":train-request:{}"
CANCEL_TTL_S = 7 * 24 * 3600
LOG_LINES = 50
WORKER_DIED = "worker died (heartbeat lost): the process running this job stopped answering"

_QUEUED_STATES = {
    JobStatus.QUEUED,
    JobStatus.DEFERRED,
    JobStatus.SCHEDULED,
    JobStatus.CREATED,
    JobStatus.READY_TO_ENQUEUE,
    JobStatus.RATE_LIMITED,
}


def connect(url: str) -> Redis:
    """A Redis client for the URL; rq stores pickled bytes, so responses are not decoded."""
    return Redis.from_url(url, health_check_interval=30, socket_connect_timeout=5)


def queue(redis: Redis, name: str) -> Queue:
    return Queue(name, connection=redis)


# ---------------------------------------------------------------------------------------------
# Enqueue


def new_job_id() -> str:
    return new_id("job")


def enqueue(
    redis: Redis,
    queue_name: str,
    func: Callable[..., Any] | str,
    *,
    kind: str,
    kwargs: dict[str, Any],
    artifacts: dict[str, str | list[str]] | None = None,
    timeout_s: int,
    ttl_s: int,
    job_id: str | None = None,
    description: str | None = None,
) -> Job:
    """Put one job on a queue with our meta fields, and index it for listing."""
    job_id = job_id or new_job_id()
    meta = {
        "kind": kind,
        "progress": 0.0,
        "message": "queued",
        "metrics": {},
        "log": [],
        "artifacts": dict(artifacts or {}),
    }
    job = queue(redis, queue_name).enqueue_call(
        func,
        kwargs=kwargs,
        job_id=job_id,
        timeout=timeout_s,
        result_ttl=ttl_s,
        failure_ttl=ttl_s,
        ttl=ttl_s,
        meta=meta,
        description=description or kind,
    )
    redis.zadd(JOBS_INDEX, {job.id: time.time()})
    return job


# ---------------------------------------------------------------------------------------------
# Describe


def fetch(redis: Redis, job_id: str) -> Job:
    validate_id(job_id, "job id")
    try:
        return Job.fetch(job_id, connection=redis)
    except NoSuchJobError:
        raise NotFoundError(
            f"no job with id {job_id!r} (jobs are kept for a week)", details={"id": job_id}
        ) from None


def public_status(job: Job) -> str:
    status = job.get_status(refresh=False)
    if status in _QUEUED_STATES:
        return "queued"
    if status == JobStatus.STARTED:
        return "started"
    if status == JobStatus.FINISHED:
        return "canceled" if job.meta.get("outcome") == "canceled" else "finished"
    if status in (JobStatus.CANCELED, JobStatus.STOPPED):
        return "canceled"
    return "failed"


def _error(job: Job, status: str) -> ErrorBody | None:
    error = job.meta.get("error")
    if error:
        return ErrorBody(**{k: error[k] for k in ("code", "message", "details") if k in error})
    if status != "failed":
        return None
    result = job.latest_result()
    text = (result.exc_string or "").strip() if result is not None else ""
    if "AbandonedJobError" in text:  # rq's own maintenance reaped it before our reaper could say why
        return ErrorBody(code="worker_died", message=WORKER_DIED)
    return ErrorBody(code="job_failed", message=_public_failure(text))


def _public_failure(exc_string: str) -> str:
    """What a client may read of an exception rq recorded (no job error of ours): rq's timeout
    message as is; otherwise only the exception's name, since its text can hold server paths."""
    if not exc_string:
        return "the job failed without a message"
    last_line = exc_string.splitlines()[-1]
    name = last_line.partition(":")[0].strip().rpartition(".")[2]
    if name == "JobTimeoutException":
        return last_line
    return f"the job failed ({name or 'unknown error'}); see the worker log"


def _aware(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def describe(job: Job) -> JobInfo:
    """The public view of a job (see the module docstring for the status mapping)."""
    meta = job.meta or {}
    status = public_status(job)
    result = job.return_value() if status in ("finished", "canceled") else None
    progress = float(meta.get("progress") or 0.0)
    if status == "finished":
        progress = 1.0
    message = str(meta.get("message") or status)
    stopping = status in ("queued", "started") and cancel_requested(job.connection, job.id)
    if stopping:
        message = f"cancel requested, stops at its next step; {message}"
    return JobInfo(
        id=job.id,
        kind=str(meta.get("kind") or job.func_name or "job"),
        queue=job.origin,
        status=status,  # type: ignore[arg-type]
        progress=min(max(progress, 0.0), 1.0),
        message=message,
        cancel_requested=stopping,
        metrics=dict(meta.get("metrics") or {}),
        log=list(meta.get("log") or [])[-LOG_LINES:],
        error=_error(job, status),
        artifacts=dict(meta.get("artifacts") or {}),
        result=result if isinstance(result, dict) else None,
        created_at=_aware(job.created_at),
        started_at=_aware(job.started_at),
        ended_at=_aware(job.ended_at),
        location=f"/v1/jobs/{job.id}",
    )


def get_job(redis: Redis, job_id: str) -> JobInfo:
    job = fetch(redis, job_id)
    job.get_status()
    return describe(job)


def list_jobs(
    redis: Redis,
    *,
    status: str | None = None,
    kind: str | None = None,
    queue_name: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[JobInfo], int]:
    """Jobs newest first, filtered; ids whose job has expired are dropped from the index.

    Without filters only the page is read; with filters every indexed job is (jobs expire after
    ``job_ttl_s``, which bounds the index).
    """
    if not (status or kind or queue_name):
        return _page_unfiltered(redis, limit, offset)
    ids = [i.decode() for i in redis.zrevrange(JOBS_INDEX, 0, -1)]
    matching: list[JobInfo] = []
    expired: list[str] = []
    for chunk in _chunks(ids, 200):
        for job_id, job in zip(chunk, Job.fetch_many(chunk, connection=redis), strict=True):
            if job is None:
                expired.append(job_id)
                continue
            info = describe(job)
            if status and info.status != status:
                continue
            if kind and info.kind != kind:
                continue
            if queue_name and info.queue != queue_name:
                continue
            matching.append(info)
    if expired:
        redis.zrem(JOBS_INDEX, *expired)
    return matching[offset : offset + limit], len(matching)


def _page_unfiltered(redis: Redis, limit: int, offset: int) -> tuple[list[JobInfo], int]:
    while True:
        ids = [i.decode() for i in redis.zrevrange(JOBS_INDEX, offset, offset + limit - 1)]
        jobs = Job.fetch_many(ids, connection=redis) if ids else []
        expired = [job_id for job_id, job in zip(ids, jobs, strict=True) if job is None]
        if not expired:
            return [describe(job) for job in jobs if job is not None], int(redis.zcard(JOBS_INDEX))
        redis.zrem(JOBS_INDEX, *expired)  # then read the page again, now without them


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ---------------------------------------------------------------------------------------------
# Cancel


def cancel(redis: Redis, job_id: str) -> JobInfo:
    """Cancel a job: a queued one never runs; a running one stops at its next check.

    A running job is told through a Redis key its job function polls between steps, so it can
    stop cleanly (training saves a checkpoint) instead of being killed mid-write. The answer is
    the job as it is now: a queued job reads ``canceled`` at once; a started one still reads
    ``started``, with ``cancel_requested`` true, until it stops and reads ``canceled`` (or
    ``finished``, if it completed before its next check).
    """
    job, status = _live_job(redis, job_id)
    redis.set(CANCEL_KEY.format(job_id), "1", ex=CANCEL_TTL_S)
    if status == "queued":
        with contextlib.suppress(InvalidJobOperation):  # picked up meanwhile: the key stops it
            job.cancel()
    job.get_status()
    return describe(job)


def _live_job(redis: Redis, job_id: str) -> tuple[Job, str]:
    """The job and its public status; ConflictError once it has ended (nothing left to cancel)."""
    job = fetch(redis, job_id)
    status = public_status(job) if job.get_status() else "failed"
    if status in TERMINAL_STATES:
        raise ConflictError(f"job {job_id!r} is already {status}", details={"id": job_id, "status": status})
    return job, status


def cancel_requested(redis: Redis, job_id: str) -> bool:
    return bool(redis.exists(CANCEL_KEY.format(job_id)))


def cancel_part(redis: Redis, job_id: str, part: str) -> JobInfo:
    """Stop one part of a running job (an SAE of a stream training) and let the rest go on.

    The job polls the set with its cancel key (`JobContext.part_cancelled`); a part cancelled
    while the job is queued is stopped before its first step. When every part is stopped the job
    ends as a cancel would."""
    job, _ = _live_job(redis, job_id)
    key = CANCEL_PARTS_KEY.format(job_id)
    with redis.pipeline() as pipe:
        pipe.sadd(key, part)
        pipe.expire(key, CANCEL_TTL_S)
        pipe.execute()
    return describe(job)


def remember_sae_job(redis: Redis, sae_ids: list[str], job_id: str) -> None:
    """Which job trains these SAEs, so ``POST /v1/saes/{id}/cancel`` can find it."""
    with redis.pipeline() as pipe:
        for sae_id in sae_ids:
            pipe.set(SAE_JOB_KEY.format(sae_id), job_id, ex=CANCEL_TTL_S)
        pipe.execute()


def sae_job(redis: Redis, sae_id: str) -> str | None:
    raw = redis.get(SAE_JOB_KEY.format(sae_id))
    return raw.decode() if isinstance(raw, bytes) else raw
