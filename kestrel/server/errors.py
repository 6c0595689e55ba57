"""One error shape for every 4xx and 5xx: ``{"error": {"code", "message", "details"}}``.

Engine errors map to statuses by class, so a route never needs its own try/except: a missing run
is a 404 and a bad hyperparameter a 422 wherever it is raised. Anything unexpected is a 500 in the
same shape, with the traceback in the server log and never in the response.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kestrel.core.errors import (
    CancelledError,
    ConflictError,
    HubUnavailableError,
    InvalidInputError,
    KestrelError,
    NotFoundError,
)
from kestrel.core.limits import shown
from kestrel.schemas import ErrorResponse, JobInfo
from kestrel.server.responses import JSONLineResponse

log = logging.getLogger("kestrel.server")

STATUS_BY_ERROR: list[tuple[type[KestrelError], int]] = [
    (NotFoundError, 404),
    (InvalidInputError, 422),
    (ConflictError, 409),
    (CancelledError, 409),
    (HubUnavailableError, 424),
]
#: A failed job's error code → status (an awaited route answers with it): the classes' codes, plus
#: what only a job reports. NB a job's limit_exceeded is a 413, while `LimitExceededError` raised
#: in the API process is an InvalidInputError (422): kept as it was.
STATUS_BY_CODE: dict[str, int] = {
    **{cls.code: status for cls, status in STATUS_BY_ERROR},
    "limit_exceeded": 413,
    "worker_died": 503,
}
CODE_BY_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "limit_exceeded",
    415: "unsupported_media_type",
    422: "invalid_input",
    424: "hub_unavailable",
    500: "internal",
    503: "unavailable",
    504: "timeout",
}


class ApiError(KestrelError):
    """An error raised by the service itself, with its own HTTP status (413, 503, 504, ...)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        details: dict | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, details=details)
        self.status = status
        self.code = code or CODE_BY_STATUS.get(status, "error")
        self.headers = headers


class StillRunning(Exception):  # noqa: N818 (not an error: the one non-error answer raised)
    """An awaited job outlived ``interactive_timeout_s``: answered ``202`` with the job, not an error.

    Raised rather than returned so a route keeps its one success type; the handler answers the job
    (``JobInfo``) with ``Location: /v1/jobs/{id}``, whose ``result`` holds the answer once finished.
    """

    def __init__(self, job: JobInfo) -> None:
        super().__init__(f"job {job.id} is still {job.status}")
        self.job = job


def limit_exceeded(limit: str, maximum: float, got: float, what: str, status: int = 413) -> ApiError:
    """A request over one of the configured limits; the message and details name the limit."""
    got = shown(got)
    return ApiError(
        status,
        f"{what}: {got} exceeds the limit {limit}={maximum}",
        code="limit_exceeded",
        details={"limit": limit, "max": maximum, "got": got},
    )


def status_for(exc: KestrelError) -> int:
    if isinstance(exc, ApiError):
        return exc.status
    for cls, status in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return status
    return 500


def error_json(status: int, code: str, message: str, details: Any = None, headers=None) -> JSONLineResponse:
    body = {"error": {"code": code, "message": message, "details": jsonable_encoder(details or {})}}
    return JSONLineResponse(body, status_code=status, headers=headers)


async def _kestrel_error(request: Request, exc: KestrelError) -> JSONLineResponse:
    return error_json(status_for(exc), exc.code, exc.message, exc.details, getattr(exc, "headers", None))


async def _still_running(request: Request, exc: StillRunning) -> JSONLineResponse:
    body = jsonable_encoder(exc.job)
    return JSONLineResponse(body, status_code=202, headers={"Location": exc.job.location})


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONLineResponse:
    errors = [
        {"field": ".".join(str(p) for p in item.get("loc", ())), "reason": item.get("msg", "")}
        for item in exc.errors()
    ]
    text = "; ".join(f"{e['field']}: {e['reason']}" for e in errors)
    return error_json(422, "invalid_input", f"invalid request: {text}", {"errors": errors})


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONLineResponse:
    code = CODE_BY_STATUS.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    return error_json(exc.status_code, code, message, headers=getattr(exc, "headers", None))


#: Modules of the engine (torch and what only workers use). The slim API image leaves them out
#: (pyproject's engine-only-dependencies); the few routes that still compute in the API process
#: (an activations import, a SAELens import or download, feature pages) need them.
ENGINE_MODULES = frozenset(
    {"torch", "transformers", "safetensors", "gguf", "accelerate", "datasets", "numpy", "tqdm"}
    | {"matplotlib", "sklearn"}
)


async def _engine_missing(request: Request, exc: ModuleNotFoundError) -> JSONLineResponse:
    """A route that needs the engine, served by an API installed without it: say so (503)."""
    module = (exc.name or "").partition(".")[0]
    if module not in ENGINE_MODULES:
        return await _unexpected(request, exc)
    return error_json(
        503,
        "unavailable",
        f"{request.method} {request.url.path} needs the engine ({module}), which this API "
        "installation leaves out (the slim `api` image); serve this route from the engine image",
        {"missing_module": module},
    )


async def _unexpected(request: Request, exc: Exception) -> JSONLineResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_json(500, "internal", "internal server error; see the server log")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(KestrelError, _kestrel_error)  # type: ignore[arg-type]
    app.add_exception_handler(StillRunning, _still_running)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(ModuleNotFoundError, _engine_missing)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries documenting the error shape for these statuses."""
    return {
        status: {"model": ErrorResponse, "description": CODE_BY_STATUS.get(status, "error")}
        for status in statuses
    }
