"""Jobs: list with filters, read one, cancel, and a Server-Sent Events stream of its progress."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from redis import Redis

from kestrel.schemas import TERMINAL_STATES, JobInfo, JobPage, JobState, StreamToken
from kestrel.server.deps import (
    STREAM_TOKEN_PARAM,
    STREAM_TOKEN_TTL_S,
    JobId,
    PageDep,
    RedisDep,
    SettingsDep,
    sign_stream_token,
)
from kestrel.server.errors import error_responses
from kestrel.workers import lifecycle

router = APIRouter(prefix="/jobs", tags=["jobs"], responses=error_responses(401, 422))
EVENT_POLL_S = 0.25
KEEPALIVE_S = 15.0
# OpenAPI 3.1: the schema of a text/event-stream response describes each event.
SSE_EVENT = {
    "type": "object",
    "properties": {
        "event": {"type": "string", "enum": ["progress", "end"]},
        "data": {"type": "string", "contentMediaType": "application/json", "description": "a JobInfo"},
    },
    "required": ["event", "data"],
}


@router.get("", response_model=JobPage)
def list_jobs(
    redis: RedisDep,
    page: PageDep,
    status: Annotated[JobState | None, Query(description="only jobs in this state")] = None,
    kind: Annotated[
        str | None, Query(max_length=32, description="capture, train, evaluate, encode, ...")
    ] = None,
    queue: Annotated[str | None, Query(pattern="^(interactive|batch)$")] = None,
) -> JobPage:
    """Jobs newest first (kept for a week after they end)."""
    items, total = lifecycle.list_jobs(
        redis, status=status, kind=kind, queue_name=queue, limit=page.limit, offset=page.offset
    )
    return JobPage(items=items, total=total, limit=page.limit, offset=page.offset)


@router.get("/{job_id}", response_model=JobInfo, responses=error_responses(404))
def get_job(job_id: JobId, redis: RedisDep) -> JobInfo:
    """Status, progress 0..1 with a message, latest metrics, log tail, error and artifact ids."""
    return lifecycle.get_job(redis, job_id)


@router.post("/{job_id}/cancel", response_model=JobInfo, status_code=202, responses=error_responses(404, 409))
def cancel_job(job_id: JobId, redis: RedisDep) -> JobInfo:
    """Cancel: a queued job never runs; a running one stops at its next step (training keeps a
    checkpoint, resumable with ``resume_from``)."""
    return lifecycle.cancel(redis, job_id)


@router.get(
    "/{job_id}/events",
    operation_id="stream_job_events",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {"schema": SSE_EVENT}},
            "description": "`event: progress` with a JobInfo as `data` whenever the job changes, "
            "then one `event: end` with the final JobInfo",
        },
        **error_responses(404),
    },
)
def job_events(job_id: JobId, request: Request, redis: RedisDep) -> StreamingResponse:
    """Server-Sent Events: the job's state as it changes, until it ends."""
    lifecycle.get_job(redis, job_id)  # 404 before the stream starts
    return StreamingResponse(
        _events(redis, job_id, request),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post("/{job_id}/events/token", response_model=StreamToken, responses=error_responses(404))
def create_events_token(
    job_id: JobId, request: Request, redis: RedisDep, settings: SettingsDep
) -> StreamToken:
    """A short-lived URL for the job's event stream that needs no X-API-Key header (a browser's
    EventSource cannot send one); connect within a minute, the stream then runs to the end."""
    lifecycle.get_job(redis, job_id)
    path = request.url.path.removesuffix("/token")  # the events path, under whatever prefix
    if settings.api_key is None:
        return StreamToken(url=path)
    expires = int(time.time()) + STREAM_TOKEN_TTL_S
    token = sign_stream_token(settings.api_key.get_secret_value(), path, expires)
    return StreamToken(
        url=f"{path}?{STREAM_TOKEN_PARAM}={token}",
        token=token,
        expires_at=datetime.fromtimestamp(expires, UTC),
    )


async def _events(redis: Redis, job_id: str, request: Request) -> AsyncIterator[str]:
    last, last_sent = "", time.monotonic()
    while not await request.is_disconnected():
        info: JobInfo = await asyncio.to_thread(lifecycle.get_job, redis, job_id)
        payload = info.model_dump_json()
        if info.status in TERMINAL_STATES:
            yield f"event: end\ndata: {payload}\n\n"
            return
        if payload != last:
            yield f"event: progress\ndata: {payload}\n\n"
            last, last_sent = payload, time.monotonic()
        elif time.monotonic() - last_sent > KEEPALIVE_S:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        await asyncio.sleep(EVENT_POLL_S)
