"""Choose and open a store: a local directory, an S3 prefix, or both mirrored.

Every process (API, workers, CLI, tests) opens its store through ``open_store`` so the choice of
backend is made once, from one description, and no call site constructs a backend by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from kestrel.core.errors import InvalidInputError
from kestrel.core.store.base import Store
from kestrel.core.store.local import LocalStore

if TYPE_CHECKING:
    from kestrel.core.store.s3 import S3Store

StoreBackend = Literal["local", "s3", "both"]
S3_SCHEME = "s3://"


class StoreChoice(Protocol):
    """What ``open_store`` reads from a settings object (``kestrel.settings.Settings`` has these)."""

    store_backend: str
    store_root: Path
    s3_url: str | None
    s3_endpoint_url: str | None
    s3_cache_dir: Path | None


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → ``("bucket", "some/prefix")``; the prefix may be empty."""
    if not url.startswith(S3_SCHEME):
        raise InvalidInputError(f"S3 location {url!r} must start with {S3_SCHEME}")
    bucket, _, prefix = url[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise InvalidInputError(f"S3 location {url!r} names no bucket; use s3://bucket/prefix")
    return bucket, prefix.strip("/")


def open_store(
    location: str | Path | StoreChoice,
    *,
    endpoint_url: str | None = None,
    local_root: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> Store:
    """Open the store that ``location`` describes.

    ``location`` is a local directory, an ``s3://bucket/prefix`` URL, or a settings-like object
    (``store_backend`` ∈ local/s3/both, ``store_root``, ``s3_url``, ``s3_endpoint_url``).
    ``local_root`` is where an S3 store keeps what stays on this machine (converted weights,
    download cache, training checkpoints); it defaults to ``./.kestrel``. ``cache_dir`` moves the
    download cache elsewhere (default ``<local_root>/s3-cache``).
    """
    if isinstance(location, (str, Path)):
        text = str(location)
        if text.startswith(S3_SCHEME):
            return _open_s3(text, endpoint_url, Path(local_root or ".kestrel"), cache_dir)
        return LocalStore(location)
    return _open_from_choice(location)


def _open_from_choice(choice: StoreChoice) -> Store:
    backend = choice.store_backend
    if backend == "local":
        return LocalStore(choice.store_root)
    if not choice.s3_url:
        raise InvalidInputError(
            f"store backend {backend!r} needs an S3 location: set KESTREL_S3_URL=s3://bucket/prefix"
        )
    if backend == "s3":
        return _open_s3(choice.s3_url, choice.s3_endpoint_url, Path(choice.store_root), choice.s3_cache_dir)
    if backend == "both":
        from kestrel.core.store.mirror import MirrorStore

        local = LocalStore(choice.store_root)
        remote = _open_s3(choice.s3_url, choice.s3_endpoint_url, local.root, choice.s3_cache_dir)
        return MirrorStore(local, remote)
    raise InvalidInputError(f"unknown store backend {backend!r}; use local, s3 or both")


def _open_s3(url: str, endpoint_url: str | None, local_root: Path, cache_dir: str | Path | None) -> S3Store:
    from kestrel.core.store.s3 import S3Store  # boto3 is imported only when S3 is chosen

    bucket, prefix = parse_s3_url(url)
    return S3Store(bucket, prefix, endpoint_url=endpoint_url, local_root=local_root, cache_dir=cache_dir)
