"""Kestrel inside your own FastAPI app: one call mounts its routes next to yours.

A team serving a model with FastAPI should not have to run a second API to look at its layers,
upload activations or start analyses. ``include_kestrel(app)`` adds Kestrel's routes under a
prefix (``/kestrel/v1/uploads``, ``/kestrel/v1/jobs/{id}``, …) to an app Kestrel did not create::

    app = FastAPI()                                   # the host's own app, routes and handlers
    kestrel = include_kestrel(app, models={"my-model": model})

What makes that work without taking the host app over:

- **A context bound to the router, not to the app.** ``create_app`` keeps settings, Redis and the
  store on ``app.state``; here a router-level dependency binds a ``KestrelContext`` to
  ``request.state.kestrel`` and ``kestrel.server.deps`` reads that first. Redis and the store are
  opened on first use, so including the router does no I/O; the router's lifespan (merged into
  the host's by ``include_router``) closes Redis when the host app shuts down.
- **Errors in Kestrel's shape on Kestrel's routes only.** Each route is a ``KestrelRoute``, whose
  handler turns Kestrel's errors, request validation errors, HTTP errors and Redis outages into
  ``{"error": {...}}`` itself. No exception handler is added to the host app, so the host's own
  validation errors, 404s and 500s look as they did. Unexpected exceptions are left to the host
  (its 500 handling and error reporting see them).
- **The host's OpenAPI grows, nothing else changes.** Operation ids are prefixed ``kestrel_`` and
  tags ``kestrel …`` so they cannot collide with the host's; job locations (``Location`` and the
  ``location`` field) carry the prefix, so they can be polled through the host app.
- **In-process models.** ``models={"name": module}`` lists the host's own models beside Kestrel's;
  their layer tables come from ``kestrel.core.models.layer_table`` (one two-token forward, once,
  on first request) or, for a module that is not a Hugging Face causal LM, from its module names.
  Captures, training and analyses still run on Kestrel's workers, which need Redis and the store.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from torch import nn

from kestrel.core.errors import KestrelError, not_found
from kestrel.core.models import LoadedModel, layer_table
from kestrel.core.store import Store
from kestrel.schemas import EmbeddedModelInfo, EmbeddedModelPage, LayerRow, LayerTable
from kestrel.server import errors, services
from kestrel.server.app import MULTIPART_OVERHEAD, _redis_down
from kestrel.server.deps import PageDep, RedisDep, SettingsDep, require_api_key
from kestrel.server.dispatch import STILL_RUNNING_RESPONSE
from kestrel.server.errors import error_responses
from kestrel.server.limits import FILE_ROUTES
from kestrel.server.routers import (
    activations,
    concepts,
    features,
    health,
    jobs,
    saes,
    steering,
    uploads,
)
from kestrel.server.routers import models as models_routes
from kestrel.settings import Settings, get_settings
from kestrel.workers import lifecycle

log = logging.getLogger("kestrel.server.embed")

DEFAULT_PREFIX = "/kestrel"
DEFAULT_RESOURCES = ("health", "models", "activations", "uploads", "jobs", "analyses")
ALL_RESOURCES = (*DEFAULT_RESOURCES, "saes", "features", "concepts", "steering")
OPERATION_PREFIX = "kestrel_"
Handler = Callable[[Request], Coroutine[Any, Any, Response]]


# ---------------------------------------------------------------------------------------------
# The context: what Kestrel's dependencies read, bound to the included router


class HostModels:
    """The host app's own in-process models, listed by name, each layer table computed once."""

    def __init__(self, models: Mapping[str, Any] | None = None) -> None:
        self._models: dict[str, Any] = {}
        self._tables: dict[str, list[LayerRow]] = {}
        self._lock = threading.Lock()
        for name, model in (models or {}).items():
            self.add(name, model)

    def add(self, name: str, model: Any) -> None:
        """Add or replace a model: an ``nn.Module``, a ``(module, tokenizer)`` pair or a LoadedModel."""
        module = model.model if isinstance(model, LoadedModel) else model
        module = module[0] if isinstance(module, tuple) else module
        if not isinstance(module, nn.Module):
            raise TypeError(f"model {name!r} must be a torch.nn.Module, (module, tokenizer) or LoadedModel")
        with self._lock:
            self._models[name] = model
            self._tables.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._models)

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def layers(self, name: str) -> list[LayerRow]:
        """The model's layer table; computed on first use (a tiny forward) and cached."""
        with self._lock:
            if name not in self._models:
                raise not_found("model", name, self._models)
            if name not in self._tables:
                self._tables[name] = _host_layer_rows(self._models[name])
            return self._tables[name]


def _host_layer_rows(model: Any) -> list[LayerRow]:
    """layer_table where the model takes ``input_ids`` (Hugging Face LMs); module names otherwise."""
    if isinstance(model, LoadedModel):
        return [LayerRow(**asdict(info)) for info in model.layers]
    module, tokenizer = model if isinstance(model, tuple) else (model, None)
    try:
        return [LayerRow(**asdict(info)) for info in layer_table(module, tokenizer)]
    except Exception as exc:  # any forward failure: the module is not an LM taking input_ids
        log.info("layer table by forward failed (%s); listing module names instead", exc)
        return [
            LayerRow(
                name=name, kind="other", index=None, width=_static_width(sub), module_type=type(sub).__name__
            )
            for name, sub in module.named_modules()
            if name
        ]


def _static_width(module: nn.Module) -> int:
    """The output width a module's configuration declares, or -1 where it declares none."""
    for attribute in ("out_features", "embedding_dim", "hidden_size", "out_channels"):
        value = getattr(module, attribute, None)
        if isinstance(value, int):
            return value
    shape = getattr(module, "normalized_shape", None)
    return int(shape[-1]) if shape else -1


class KestrelContext:
    """Settings, Redis and the store for the routes of one included Kestrel router.

    Redis and the store are opened on first use, so building the router costs nothing and a host
    app that never calls Kestrel never connects. ``close`` releases the Redis connections; the
    included router's lifespan calls it when the host app shuts down.
    """

    def __init__(
        self, settings: Settings, *, prefix: str = DEFAULT_PREFIX, models: Mapping[str, Any] | None = None
    ) -> None:
        self.settings = settings
        self.prefix = prefix.rstrip("/")
        self.models = HostModels(models)
        self.resources: list[str] = []
        self._redis: Redis | None = None
        self._store: Store | None = None
        self._lock = threading.Lock()

    @property
    def redis(self) -> Redis:
        with self._lock:
            if self._redis is None:
                self._redis = lifecycle.connect(self.settings.redis_url)
            return self._redis

    @property
    def store(self) -> Store:
        with self._lock:
            if self._store is None:
                self._store = self.settings.open_store()
            return self._store

    def bind(self, request: Request) -> None:
        """The router-level dependency: Kestrel's dependencies read this context, not app.state."""
        request.state.kestrel = self

    def close(self) -> None:
        with self._lock:
            if self._redis is not None:
                self._redis.close()
                self._redis = None

    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        """The router's lifespan, merged into the host's by ``include_router``: closes at shutdown."""
        try:
            yield
        finally:
            self.close()


# ---------------------------------------------------------------------------------------------
# Routes that answer in Kestrel's error shape without the host app's handlers


class KestrelRoute(APIRoute):
    """A route whose errors are rendered by Kestrel, inside the route, whatever the host app does.

    The handler FastAPI builds does everything for a request (body, dependencies, validation, the
    endpoint), so wrapping it sees every error of the route before any app-level handler would.
    """

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()

        async def kestrel_handler(request: Request) -> Response:
            try:
                response = await handler(request)
            except Exception as exc:
                rendered = await _render_error(request, exc)
                if rendered is None:
                    raise
                response = rendered
            return _prefix_locations(request, response)

        return kestrel_handler


async def _render_error(request: Request, exc: Exception) -> Response | None:
    """Kestrel's JSON for the errors Kestrel's app handles; None for anything else (left to the host)."""
    if isinstance(exc, KestrelError):
        return await errors._kestrel_error(request, exc)
    if isinstance(exc, errors.StillRunning):
        return await errors._still_running(request, exc)
    if isinstance(exc, RequestValidationError):
        return await errors._validation_error(request, exc)
    if isinstance(exc, StarletteHTTPException):
        return await errors._http_error(request, exc)
    if isinstance(exc, RedisConnectionError | RedisTimeoutError):
        return await _redis_down(request, exc)
    return None


_LOCATION_FIELD = b'"location":"/v1/'


def _prefix_locations(request: Request, response: Response) -> Response:
    """Job locations are ``/v1/jobs/{id}`` in Kestrel's own app; here they live under the prefix."""
    context = getattr(request.state, "kestrel", None)
    prefix = context.prefix if context is not None else ""
    if not prefix:
        return response
    location = response.headers.get("location")
    if location is not None and location.startswith("/v1/"):
        response.headers["location"] = prefix + location
    body = getattr(response, "body", None)
    if isinstance(body, bytes) and _LOCATION_FIELD in body:
        response.body = body.replace(_LOCATION_FIELD, b'"location":"' + prefix.encode() + b"/v1/")
        response.headers["content-length"] = str(len(response.body))
    return response


# ---------------------------------------------------------------------------------------------
# Layer listing that knows the host's models


def _host_aware_models_router() -> APIRouter:
    """``GET /models`` and ``GET /models/{name}/layers``, with the host's models beside Kestrel's."""
    router = APIRouter(prefix="/models", tags=["models"], responses=error_responses(401, 422, 503))

    @router.get("", response_model=EmbeddedModelPage)
    async def list_models(
        request: Request, settings: SettingsDep, redis: RedisDep, page: PageDep
    ) -> EmbeddedModelPage:
        """The host app's models (source ``app``), then Kestrel's bundled and configured ones."""
        host = request.state.kestrel.models
        rows = [
            EmbeddedModelInfo(
                name=name, source="app", description="served by this app", installed=True, cached=True
            )
            for name in host.names()
        ]
        kestrel_rows = await asyncio.to_thread(services.list_models, settings, redis)
        rows += [EmbeddedModelInfo(**row.model_dump()) for row in kestrel_rows if row.name not in host]
        return EmbeddedModelPage(**page.page(rows))

    @router.get(
        "/{name:path}/layers",
        response_model=LayerTable,
        responses={**error_responses(404, 424), **STILL_RUNNING_RESPONSE},
        operation_id="get_model_layers",
    )
    async def get_layers(name: str, request: Request, settings: SettingsDep, redis: RedisDep) -> LayerTable:
        """A host model's layer table (computed in this process), or a Kestrel model's (by a worker)."""
        host = request.state.kestrel.models
        if name in host:
            return LayerTable(model=name, layers=await asyncio.to_thread(host.layers, name))
        return await models_routes.get_layers(name, settings, redis)

    return router


# ---------------------------------------------------------------------------------------------
# Building the router


def _analyses_router() -> APIRouter | None:
    """The analyses router, where this installation has one."""
    try:
        from kestrel.server.routers import analyses
    except ModuleNotFoundError as exc:
        if exc.name != "kestrel.server.routers.analyses":
            raise
        return None
    return analyses.router


def _resource_routes(name: str) -> list[APIRoute]:
    """The routes behind one resource name; empty when this installation lacks it."""
    if name == "models":
        replaced = {models_routes.list_models, models_routes.get_layers}
        rest = [r for r in _api_routes(models_routes.router) if r.endpoint not in replaced]
        return _api_routes(_host_aware_models_router()) + rest
    if name == "health":
        return _api_routes(health.router)
    if name == "analyses":
        router = _analyses_router()
        return _api_routes(router) if router is not None else []
    modules = {
        "activations": activations,
        "uploads": uploads,
        "jobs": jobs,
        "saes": saes,
        "features": features,
        "concepts": concepts,
        "steering": steering,
    }
    if name not in modules:
        raise ValueError(f"unknown Kestrel resource {name!r}; use some of {', '.join(ALL_RESOURCES)}")
    return _api_routes(modules[name].router)


def _api_routes(router: APIRouter) -> list[APIRoute]:
    return [route for route in router.routes if isinstance(route, APIRoute)]


def _operation_id(route: APIRoute) -> str:
    return OPERATION_PREFIX + route.name


# add_api_route's keyword arguments that an APIRoute keeps as attributes of the same name.
_ROUTE_FIELDS = (
    "response_model",
    "status_code",
    "dependencies",
    "summary",
    "description",
    "response_description",
    "responses",
    "deprecated",
    "methods",
    "response_model_include",
    "response_model_exclude",
    "response_model_by_alias",
    "response_model_exclude_unset",
    "response_model_exclude_defaults",
    "response_model_exclude_none",
    "include_in_schema",
    "response_class",
    "name",
    "callbacks",
    "openapi_extra",
)


def _adopt(target: APIRouter, route: APIRoute, path: str, settings: Settings, *, protected: bool) -> None:
    """Re-register one of Kestrel's routes on ``target`` as a KestrelRoute.

    ``include_router`` keeps a route's own class, so the only way to give Kestrel's existing routes
    Kestrel's error handling is to build them again from the same endpoint and options.
    """
    options = {field: getattr(route, field) for field in _ROUTE_FIELDS if hasattr(route, field)}
    if protected:  # as in Kestrel's app: everything but health and readiness needs the key
        options["dependencies"] = [*options.get("dependencies", []), Depends(require_api_key)]
    takes_files = path.startswith(FILE_ROUTES)  # uploads and SAE imports: the upload limit
    max_body = settings.max_upload_bytes + MULTIPART_OVERHEAD if takes_files else settings.max_request_bytes
    target.add_api_route(
        path,
        route.endpoint,
        **options,
        tags=[f"kestrel {tag}" for tag in route.tags],
        operation_id=OPERATION_PREFIX + route.operation_id if route.operation_id else None,
        max_body_size=max_body,
    )


def build_router(context: KestrelContext, resources: Iterable[str] = DEFAULT_RESOURCES) -> APIRouter:
    """A router with Kestrel's routes for ``resources`` under ``context.prefix``, bound to ``context``."""
    router = APIRouter(
        prefix=context.prefix,
        dependencies=[Depends(context.bind)],  # first, so every other dependency reads the context
        route_class=KestrelRoute,
        lifespan=context.lifespan,  # the host app's shutdown releases Redis
        generate_unique_id_function=_operation_id,
    )
    for name in resources:
        routes = _resource_routes(name)
        if not routes:
            log.warning("Kestrel resource %r is not available in this installation; not mounted", name)
            continue
        version = "" if name == "health" else "/v1"  # as in Kestrel's own app: /health, /v1/uploads
        for route in routes:
            _adopt(router, route, version + route.path, context.settings, protected=name != "health")
        context.resources.append(name)
    return router


def kestrel_router(
    settings: Settings | None = None,
    *,
    prefix: str = DEFAULT_PREFIX,
    models: Mapping[str, Any] | None = None,
    resources: Iterable[str] = DEFAULT_RESOURCES,
) -> APIRouter:
    """Kestrel's routes as a router to ``app.include_router(...)`` (without a further prefix)."""
    return build_router(KestrelContext(settings or get_settings(), prefix=prefix, models=models), resources)


def include_kestrel(
    app: FastAPI,
    settings: Settings | None = None,
    *,
    prefix: str = DEFAULT_PREFIX,
    models: Mapping[str, Any] | None = None,
    resources: Iterable[str] = DEFAULT_RESOURCES,
) -> KestrelContext:
    """Mount Kestrel's routes on ``app`` under ``prefix``; the context (to add models, or close).

    ``settings`` default to the environment's (``KESTREL_*``, ``REDIS_URL``), like Kestrel's own
    API; the workers must share the same Redis and store. ``resources`` picks what is mounted
    (``ALL_RESOURCES`` adds SAEs, features, concepts and steering).
    """
    context = KestrelContext(settings or get_settings(), prefix=prefix, models=models)
    app.include_router(build_router(context, resources))
    return context
