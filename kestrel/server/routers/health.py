"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kestrel import __version__
from kestrel.schemas import HealthStatus, ReadyStatus
from kestrel.server.deps import RedisDep
from kestrel.server.errors import ApiError, error_responses
from kestrel.workers import registry

router = APIRouter(tags=["health"])
metrics_router = APIRouter(tags=["health"], responses=error_responses(401, 422))


@router.get("/health", response_model=HealthStatus, operation_id="get_health")
def health() -> HealthStatus:
    """Liveness: the API process answers. Says nothing about Redis or workers (see /ready)."""
    return HealthStatus(version=__version__)


@router.get(
    "/ready", response_model=ReadyStatus, responses=error_responses(503), operation_id="get_readiness"
)
async def ready(redis: RedisDep) -> ReadyStatus:
    """Readiness: 200 once Redis answers and at least one worker is alive, else 503 saying which.
    ``workers`` counts live workers per queue (interactive, generate, batch): a call whose queue
    has none answers 503 naming it."""
    return await asyncio.to_thread(_check_ready, redis)


def _check_ready(redis) -> ReadyStatus:
    try:
        redis.ping()
        workers = registry.workers_per_queue(registry.live_workers(redis))
    except Exception as exc:
        raise ApiError(
            503, f"Redis is not answering: {exc}", code="not_ready", details={"redis": False}
        ) from None
    if not any(workers.values()):
        raise ApiError(
            503,
            "no worker is alive; start one with `kestrel worker --queue batch` (or `kestrel up`)",
            code="not_ready",
            details={"redis": True, "workers": workers},
        )
    return ReadyStatus(redis=True, workers=workers)


@metrics_router.get(
    "/metrics",
    operation_id="get_metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}, "description": "metrics"}
    },
)
async def metrics(request: Request) -> Response:
    """Prometheus text format: HTTP metrics plus queue depth, workers and jobs by state."""
    body = await asyncio.to_thread(generate_latest, request.app.state.metrics_registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
