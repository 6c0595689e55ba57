"""FastAPI dependencies: settings, Redis, store, API key, pagination, typed ids and headers.

Routes take what they need as parameters; nothing reaches for a global. The app factory puts one
settings object, one Redis client and one store on ``app.state``; these read them back.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Header, Path, Query, Request
from redis import Redis

from kestrel.core.store import LocalStore
from kestrel.core.store.base import _ID_PATTERN
from kestrel.server.errors import ApiError
from kestrel.settings import Settings

ID_PATTERN = _ID_PATTERN.pattern


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_redis(request: Request) -> Redis:
    return request.app.state.redis


def get_store(request: Request) -> LocalStore:
    return request.app.state.store


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[Redis, Depends(get_redis)]
StoreDep = Annotated[LocalStore, Depends(get_store)]


def require_api_key(
    request: Request,
    x_api_key: Annotated[str | None, Header(alias="X-API-Key", include_in_schema=False)] = None,
) -> None:
    """When an API key is configured, the request must carry it (compared in constant time)."""
    expected = request.app.state.settings.api_key
    if expected is None:
        return
    given = (x_api_key or "").encode()
    if not secrets.compare_digest(given, expected.get_secret_value().encode()):
        raise ApiError(
            401,
            "missing or wrong API key: send it in the X-API-Key header",
            code="unauthorized",
            headers={"WWW-Authenticate": "ApiKey"},
        )


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
JobId = Annotated[str, _id_path("job")]
UploadId = Annotated[str, _id_path("upload")]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=255,
        description="resubmitting with the same key returns the same job instead of starting another",
    ),
]
