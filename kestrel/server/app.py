"""The app factory: ``create_app(settings)`` wires settings, Redis, the store, auth, errors and routers.

Run it with ``kestrel serve`` (or ``kestrel up``, which also starts Redis and workers), or with any
ASGI server: ``uvicorn --factory kestrel.server.app:create_app``. The API is stateless: jobs live
in Redis and artifacts in the store, so restarting it (or running several) loses nothing. Its only
background task is the reaper, which fails the jobs of workers that died.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute
from prometheus_fastapi_instrumentator import Instrumentator
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from kestrel import __version__
from kestrel.server.deps import ApiKeyMiddleware, require_api_key
from kestrel.server.errors import error_json, install_error_handlers
from kestrel.server.limits import BodyLimitMiddleware
from kestrel.server.metrics import make_registry
from kestrel.server.responses import JSONNewlineMiddleware
from kestrel.server.routers import (
    activations,
    analyses,
    concepts,
    exports,
    features,
    health,
    jobs,
    models,
    saes,
    steering,
    uploads,
)
from kestrel.server.ui import router as ui_router
from kestrel.settings import Settings, get_settings
from kestrel.workers import lifecycle
from kestrel.workers.reaper import Reaper

MULTIPART_OVERHEAD = 1 << 20  # multipart headers and boundaries around an upload at its size limit
DESCRIPTION = """\
Kestrel: capture activations, train sparse autoencoders and read their latents, over HTTP.

Long jobs (capture, training, evaluation, discovery, labelling, analyses) answer **202 Accepted** with
`Location: /v1/jobs/{id}`; poll the job or stream `GET /v1/jobs/{id}/events`. Interactive calls
(encode, generate, steering preview, layer tables, model loads) wait for their result. Errors
always have the shape `{"error": {"code", "message", "details"}}`.
When an API key is configured, send it as `X-API-Key` (health, ready and these docs need none).
"""


def operation_id(route: APIRoute) -> str:
    """Operation ids are the endpoint function names (``start_capture``, ``get_job``), unless a
    route sets ``operation_id=`` (``list_runs``): an SDK's method names, so each reads as a verb."""
    return route.name


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    redis = lifecycle.connect(settings.redis_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        reaper = Reaper(redis, settings.reaper_interval_s).start()
        try:
            yield
        finally:
            reaper.stop()
            redis.close()

    app = FastAPI(
        title="Kestrel",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
    )
    app.state.settings = settings
    app.state.redis = redis
    app.state.store = settings.open_store()
    app.state.metrics_registry = make_registry(redis)

    install_error_handlers(app)
    app.add_exception_handler(RedisConnectionError, _redis_down)  # type: ignore[arg-type]
    app.add_exception_handler(RedisTimeoutError, _redis_down)  # type: ignore[arg-type]

    protected = [Depends(require_api_key)]
    app.include_router(health.router)
    app.include_router(health.metrics_router, dependencies=protected)
    routers = (models, activations, saes, exports, features, concepts, steering, analyses, jobs, uploads)
    for module in routers:
        app.include_router(module.router, prefix="/v1", dependencies=protected)
    app.include_router(steering.features_router, prefix="/v1", dependencies=protected)
    app.include_router(ui_router)  # the dashboard: data-free pages, a client of /v1 like any other
    # Middleware, innermost first: body limits, then the API key (checked before any body is
    # read), the JSON newline (401s and 413s end with one too), metrics (which count the 401s),
    # and CORS outermost (so preflights and errors carry its headers).
    app.add_middleware(
        BodyLimitMiddleware,
        default_limit=settings.max_request_bytes,
        file_limit=settings.max_upload_bytes + MULTIPART_OVERHEAD,
    )
    if settings.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key.get_secret_value())
    app.add_middleware(JSONNewlineMiddleware)  # every JSON body ends with "\n", 401s and 413s too
    Instrumentator(registry=app.state.metrics_registry, excluded_handlers=["/metrics"]).instrument(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["Location"],
        )
    _document_bad_request(app)
    return app


def _document_bad_request(app: FastAPI) -> None:
    """Every operation with a body can answer 400 (a body that does not parse: bad JSON, bad
    multipart) in the error shape; FastAPI raises it but does not document it."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            for operations in build()["paths"].values():
                for operation in operations.values():
                    if "requestBody" in operation:
                        operation["responses"].setdefault("400", _BAD_REQUEST)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


_BAD_REQUEST = {
    "description": "bad_request",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
}


async def _redis_down(request, exc: Exception):
    return error_json(503, "unavailable", f"Redis is unavailable: {exc}", {"redis": False})
