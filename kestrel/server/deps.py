"""FastAPI dependencies: settings, Redis, store, API key, pagination, typed ids and headers.

Routes take what they need as parameters; nothing reaches for a global. The app factory puts one
settings object, one Redis client and one store on ``app.state``; these read them back. When
Kestrel's routes are included in someone else's app (``kestrel.server.embed``), that app's state
is not Kestrel's: the included router binds its own context to ``request.state.kestrel`` first,
and these read that instead.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import Annotated, Any

from fastapi import Depends, Header, Path, Query, Request
from redis import Redis
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from kestrel.core.store import Store
from kestrel.core.store.base import _ID_PATTERN
from kestrel.server.errors import ApiError, error_json
from kestrel.settings import Settings

ID_PATTERN = _ID_PATTERN.pattern


def kestrel_state(request: Request) -> Any:
    """Where this request's settings, Redis and store are: the context an embedded Kestrel router
    bound to the request, else the state of the app ``create_app`` made."""
    bound = getattr(request.state, "kestrel", None)
    return bound if bound is not None else request.app.state


def get_settings(request: Request) -> Settings:
    return kestrel_state(request).settings


def get_redis(request: Request) -> Redis:
    return kestrel_state(request).redis


def get_store(request: Request) -> Store:
    return kestrel_state(request).store


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[Redis, Depends(get_redis)]
StoreDep = Annotated[Store, Depends(get_store)]


def require_api_key(
    request: Request,
    x_api_key: Annotated[str | None, Header(alias="X-API-Key", include_in_schema=False)] = None,
) -> None:
    """When an API key is configured, the request must carry it (compared in constant time).

    A GET may instead carry a stream token for its own path (``?token=``, see
    ``sign_stream_token``): a browser's EventSource cannot send headers. Kestrel's own app checks
    the same thing earlier, before any body is read (``ApiKeyMiddleware``); this dependency keeps
    routers included in another app (``kestrel.server.embed``) protected too.
    """
    expected = get_settings(request).api_key
    if expected is None:
        return
    if not key_accepted(expected.get_secret_value(), request, x_api_key):
        raise unauthorized()


def key_accepted(expected: str, connection: HTTPConnection, given: str | None) -> bool:
    """The request carries the key (or, for a GET, a valid stream token for its path)."""
    token = connection.query_params.get(STREAM_TOKEN_PARAM)
    if (
        given is None
        and token is not None
        and connection.scope.get("method") == "GET"
        and stream_token_valid(expected, connection.url.path, token)
    ):
        return True
    return secrets.compare_digest((given or "").encode(), expected.encode())


def unauthorized() -> ApiError:
    return ApiError(
        401,
        "missing or wrong API key: send it in the X-API-Key header",
        code="unauthorized",
        headers={"WWW-Authenticate": "ApiKey"},
    )


#: Paths that never need the key: probes, the API docs, and the dashboard's data-free pages.
PUBLIC_PATHS = frozenset({"/health", "/ready", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
PUBLIC_PREFIXES = ("/ui/",)


class ApiKeyMiddleware:
    """Checks the API key from the request's headers before the app reads a byte of its body.

    A dependency runs only after FastAPI has parsed the body (a multipart upload is spooled to
    disk first), so without this an unauthenticated client could make the API read and store
    hundreds of megabytes before its 401. The answer is the same 401, in the same error shape.
    """

    def __init__(self, app: ASGIApp, *, api_key: str) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _is_public(scope["path"]):
            await self.app(scope, receive, send)
            return
        connection = HTTPConnection(scope)
        if key_accepted(self.api_key, connection, connection.headers.get("x-api-key")):
            await self.app(scope, receive, send)
            return
        error = unauthorized()
        response = error_json(error.status, error.code, error.message, error.details, error.headers)
        await response(scope, receive, send)


def _is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path == "/ui" or path.startswith(PUBLIC_PREFIXES)


STREAM_TOKEN_PARAM = "token"
STREAM_TOKEN_TTL_S = 60


def sign_stream_token(api_key: str, path: str, expires: int) -> str:
    """A token good for GETs of one path until ``expires`` (unix seconds): ``<expires>.<hmac>``.

    Stateless (an HMAC keyed by a hash of the API key), so any API process checks what another
    minted, and rotating the key revokes every token. Short-lived and bound to one path, it is
    safer in a URL (and so in access logs) than the key itself.
    """
    secret = hashlib.sha256(b"kestrel-stream-token\0" + api_key.encode()).digest()
    mac = hmac.new(secret, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()
    return f"{expires}.{mac}"


def stream_token_valid(api_key: str, path: str, token: str, now: float | None = None) -> bool:
    """The token was signed for ``path`` with this key and has not expired."""
    expires, _, _ = token.partition(".")
    # ASCII digits of a sane length: int() raises on '²' or 5,000 digits (a 500 where a 401 is due)
    if not (expires.isascii() and expires.isdigit() and len(expires) <= 12):
        return False
    if int(expires) < (time.time() if now is None else now):
        return False
    return secrets.compare_digest(sign_stream_token(api_key, path, int(expires)).encode(), token.encode())


MAX_OFFSET = 1_000_000_000  # Redis range arguments are int64; an offset past this lists nothing anyway


class Pagination:
    """``?limit=&offset=`` on every list."""

    def __init__(
        self,
        limit: Annotated[int, Query(ge=1, le=500, description="items per page")] = 50,
        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="items to skip")] = 0,
    ) -> None:
        self.limit = limit
        self.offset = offset

    def page(self, items: list) -> dict:
        return {
            "items": items[self.offset : self.offset + self.limit],
            "total": len(items),
            "limit": self.limit,
            "offset": self.offset,
        }


PageDep = Annotated[Pagination, Depends()]


def _id_path(what: str):
    return Path(pattern=ID_PATTERN, max_length=64, description=f"{what} id ([a-z0-9-], server-generated)")


RunId = Annotated[str, _id_path("run")]
SaeId = Annotated[str, _id_path("SAE")]
ExportId = Annotated[str, _id_path("export")]
JobId = Annotated[str, _id_path("job")]
UploadId = Annotated[str, _id_path("upload")]
AnalysisId = Annotated[str, _id_path("analysis")]
SteeringId = Annotated[str, _id_path("steering config")]
Latent = Annotated[int, Path(ge=0, le=1 << 24, description="latent index")]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=255,
        description="resubmitting with the same key returns the same job instead of starting another",
    ),
]
