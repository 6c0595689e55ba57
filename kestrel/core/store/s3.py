"""A store in an S3 bucket (AWS, or any S3-compatible server: MinIO, moto, Ceph).

Keys mirror the local layout: ``<prefix>/<kind>/<id>/<rel>``. S3 has no directory rename, so the
atomic rule rests on the manifest instead: an artifact is published exactly when its
``manifest.json`` key exists. A writer stages files in a local directory, uploads every file, and
puts the manifest last; ``list`` and ``exists`` look only at manifests, so a writer killed
mid-upload leaves keys that nothing lists, and ``gc`` removes them once they are old.

Two writers racing for one id are kept apart by a claim key (``<id>/.claim``) created with a
conditional put (``If-None-Match: *``) before anything is uploaded, and the manifest itself is put
conditionally, so a published artifact is never overwritten. Reads download into a local cache
(``<local_root>/s3-cache/``) checked against the object's ETag, so a re-published id never serves
stale bytes. Credentials come from the usual boto3 chain (environment, profile, instance role).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from kestrel.core.errors import ConflictError, NotFoundError
from kestrel.core.store.base import (
    _ID_PATTERN,
    ARTIFACT_KINDS,
    StoredFile,
    validate_id,
    validate_kind,
    validate_relpath,
)
from kestrel.core.store.local import STAGING_PREFIX, write_json_atomic

MANIFEST = "manifest.json"
CLAIM = ".claim"
CACHE_DIR = "s3-cache"
STAGING_DIR = "s3-staging"
SCRATCH_DIR = "s3-scratch"
_DELETE_BATCH = 1000  # DeleteObjects takes at most 1000 keys
_HEAD_THREADS = 16  # boto3 clients are thread-safe; the client's pool is sized to match
_MISSING = {"404", "NoSuchKey", "NotFound"}
_PRECONDITION = {"412", "PreconditionFailed", "ConditionalRequestConflict"}


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _is_missing(exc: ClientError) -> bool:
    return _error_code(exc) in _MISSING


def _is_precondition(exc: ClientError) -> bool:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return _error_code(exc) in _PRECONDITION or status in (409, 412)


def make_client(endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client; path-style addressing for custom endpoints (MinIO and moto need it)."""
    config = Config(
        retries={"max_attempts": 5, "mode": "standard"},
        max_pool_connections=_HEAD_THREADS,
        s3={"addressing_style": "path"} if endpoint_url else None,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url or None, config=config)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes of one machine (the cache is per machine)."""
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _local_files(directory: Path) -> Iterator[tuple[Path, str]]:
    """Every file under ``directory`` with its ``/``-separated relative path, sorted."""
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            yield path, path.relative_to(directory).as_posix()


def _is_hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


class S3Writer:
    """Stages one artifact locally; ``commit`` uploads it, manifest last."""

    def __init__(self, store: S3Store, kind: str, artifact_id: str) -> None:
        self.kind = kind
        self.artifact_id = artifact_id
        self._store = store
        parent = store.local_root / STAGING_DIR / kind
        parent.mkdir(parents=True, exist_ok=True)
        self.directory = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{artifact_id}-", dir=parent))
        self._done = False

    def commit(self, manifest: dict[str, Any], manifest_name: str = MANIFEST) -> None:
        """Write the manifest into the staging directory, upload everything (manifest last)."""
        try:
            write_json_atomic(self.directory / manifest_name, manifest)
            self._store.publish_directory(self.kind, self.artifact_id, self.directory, manifest_name)
        finally:
            self.abort()
        self._done = True

    def abort(self) -> None:
        if not self._done:
            shutil.rmtree(self.directory, ignore_errors=True)
            self._done = True

    def __enter__(self) -> S3Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._done:
            self.abort()


class S3Store:
    """Artifacts under ``s3://<bucket>/<prefix>/``; see the module docstring for the atomic rule."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        local_root: str | Path = ".kestrel",
        cache_dir: str | Path | None = None,
        client: Any = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            validate_relpath(self.prefix)  # no '..' or empty parts: it also names the cache directory
        self.endpoint_url = endpoint_url
        self.client = client or make_client(endpoint_url)
        self._local_root = Path(local_root).expanduser().resolve()
        self._local_root.mkdir(parents=True, exist_ok=True)
        cache = Path(cache_dir).expanduser().resolve() if cache_dir else self._local_root / CACHE_DIR
        self.cache_root = cache.joinpath(bucket, *self.prefix.split("/"))

    def __repr__(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}"
        return f"S3Store({where!r}, endpoint_url={self.endpoint_url!r})"

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    @property
    def local_root(self) -> Path:
        return self._local_root

    @property
    def models_dir(self) -> Path:
        return self._local_root / "models"

    # -- keys -----------------------------------------------------------------------------------

    def _key(self, kind: str, artifact_id: str, rel: str = "") -> str:
        parts = [self.prefix, validate_kind(kind), validate_id(artifact_id)]
        if rel:
            parts.append(validate_relpath(rel))
        return "/".join(p for p in parts if p)

    def _kind_prefix(self, kind: str) -> str:
        return "/".join(p for p in (self.prefix, validate_kind(kind)) if p) + "/"

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _is_missing(exc):
                return None
            raise

    def _keys(self, prefix: str) -> Iterator[dict[str, Any]]:
        """Every object under ``prefix`` (``Key``, ``Size``, ``LastModified``, ``ETag``)."""
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            yield from page.get("Contents", [])

    def _delete_keys(self, keys: Iterable[str]) -> None:
        batch: list[str] = []
        for key in keys:
            batch.append(key)
            if len(batch) == _DELETE_BATCH:
                self._delete_batch(batch)
                batch = []
        if batch:
            self._delete_batch(batch)

    def _delete_batch(self, keys: list[str]) -> None:
        self.client.delete_objects(
            Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True}
        )

    # -- the Store verbs ------------------------------------------------------------------------

    def writer(self, kind: str, artifact_id: str) -> S3Writer:
        if self.exists(kind, artifact_id):
            raise ConflictError(
                f"{kind} id {artifact_id!r} already exists; choose another id or delete it first",
                details={"kind": kind, "id": artifact_id},
            )
        return S3Writer(self, kind, artifact_id)

    def exists(self, kind: str, artifact_id: str) -> bool:
        return self._head(self._key(kind, artifact_id, MANIFEST)) is not None

    def list(self, kind: str) -> list[str]:
        """Ids whose manifest exists: keys of unfinished uploads are never listed."""
        paginator = self.client.get_paginator("list_objects_v2")
        ids = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._kind_prefix(kind), Delimiter="/"):
            for common in page.get("CommonPrefixes", []):
                name = common["Prefix"].rstrip("/").rsplit("/", 1)[-1]
                if _ID_PATTERN.fullmatch(name):  # anything else in the bucket is not ours to list
                    ids.append(name)
        with ThreadPoolExecutor(max_workers=_HEAD_THREADS) as pool:  # one HEAD per id, in parallel
            published = list(pool.map(lambda i: self.exists(kind, i), ids))
        return sorted(i for i, ok in zip(ids, published, strict=True) if ok)

    def require(self, kind: str, artifact_id: str) -> None:
        """NotFoundError unless the artifact is published."""
        if not self.exists(kind, artifact_id):
            raise NotFoundError(f"no {kind} artifact with id {artifact_id!r}", details={"id": artifact_id})

    def read_json(self, kind: str, artifact_id: str, rel: str = MANIFEST) -> Any:
        """Read straight from the bucket (small files; always the current version)."""
        if rel != MANIFEST:
            self.require(kind, artifact_id)
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(kind, artifact_id, rel))["Body"]
        except ClientError as exc:
            if not _is_missing(exc):
                raise
            if rel == MANIFEST:
                raise NotFoundError(
                    f"no {kind} artifact with id {artifact_id!r}", details={"id": artifact_id}
                ) from None
            raise NotFoundError(f"{kind} {artifact_id!r} has no file {rel!r}") from None
        with body:
            return json.loads(body.read())

    def local_path(self, kind: str, artifact_id: str, rel: str) -> Path:
        self.require(kind, artifact_id)
        return self._current_copy(kind, artifact_id, rel)

    def _current_copy(self, kind: str, artifact_id: str, rel: str) -> Path:
        """The cached copy of one file of a published artifact, at its current version."""
        head = self._head(self._key(kind, artifact_id, rel))
        if head is None:
            raise NotFoundError(f"{kind} {artifact_id!r} has no file {rel!r}")
        return self._cached(kind, artifact_id, rel, head["ETag"].strip('"'))

    def delete(self, kind: str, artifact_id: str) -> None:
        """Remove the manifest first (readers stop seeing the artifact), then the rest."""
        self.require(kind, artifact_id)
        self.client.delete_object(Bucket=self.bucket, Key=self._key(kind, artifact_id, MANIFEST))
        prefix = self._key(kind, artifact_id) + "/"
        self._delete_keys(obj["Key"] for obj in self._keys(prefix))
        shutil.rmtree(self.cache_root / kind / artifact_id, ignore_errors=True)

    # -- publishing -----------------------------------------------------------------------------

    def publish_directory(
        self, kind: str, artifact_id: str, directory: Path, manifest_name: str = MANIFEST
    ) -> None:
        """Upload a staged artifact: claim the id, upload every file, put the manifest last.

        On any failure the keys uploaded so far are removed (best effort; ``gc`` catches the
        rest), so nothing half-written is ever listed.
        """
        claim = self._claim(kind, artifact_id)
        uploaded = [claim]
        try:
            for path, rel in _local_files(directory):
                if rel == manifest_name:
                    continue
                key = self._key(kind, artifact_id, rel)
                uploaded.append(key)
                self.client.upload_file(str(path), self.bucket, key)
            self._put_manifest(kind, artifact_id, directory / manifest_name, manifest_name)
        except BaseException:
            self._rollback(uploaded)
            raise
        self._rollback([claim])

    def _claim(self, kind: str, artifact_id: str) -> str:
        """Create ``<id>/.claim`` only if absent, so one writer at a time uploads under an id."""
        conflict = ConflictError(
            f"{kind} id {artifact_id!r} already exists; choose another id or delete it first",
            details={"kind": kind, "id": artifact_id},
        )
        if self.exists(kind, artifact_id):
            raise conflict
        key = self._key(kind, artifact_id, CLAIM)
        stamp = json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "time": time.time()})
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=stamp.encode(), IfNoneMatch="*")
        except ClientError as exc:
            if _is_precondition(exc):
                raise ConflictError(
                    f"{kind} id {artifact_id!r} is being written by another writer (or one that "
                    "died: gc removes its leftovers)",
                    details={"kind": kind, "id": artifact_id},
                ) from None
            raise
        if self.exists(kind, artifact_id):  # published between the check and the claim
            self._rollback([key])
            raise conflict
        return key

    def _put_manifest(self, kind: str, artifact_id: str, path: Path, manifest_name: str) -> None:
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=self._key(kind, artifact_id, manifest_name),
                Body=path.read_bytes(),
                ContentType="application/json",
                IfNoneMatch="*",
            )
        except ClientError as exc:
            if _is_precondition(exc):
                raise ConflictError(f"{kind} id {artifact_id!r} already exists") from None
            raise

    def _rollback(self, keys: list[str]) -> None:
        with contextlib.suppress(Exception):  # leftovers are unlisted; gc removes them
            self._delete_keys(keys)

    # -- files inside a published artifact ------------------------------------------------------

    def _cached(self, kind: str, artifact_id: str, rel: str, etag: str) -> Path:
        """The cached copy of one object version, downloaded unless the cache already holds it.

        The file and the ETag it was downloaded at are two files, so one process per machine fills
        them at a time (a lock file beside the tag), and the download asks for exactly the version
        the caller saw (``If-Match``): two processes racing over a re-published object can never
        leave one version's bytes under the other's tag.
        """
        path = self.cache_root / kind / artifact_id / rel
        tag_path = self.cache_root / ".etags" / kind / artifact_id / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tag_path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(tag_path.with_name(f".{tag_path.name}.lock")):
            if path.is_file() and tag_path.is_file() and tag_path.read_text() == etag:
                return path
            self._download_version(self._key(kind, artifact_id, rel), etag, path)
            tag_tmp = tag_path.with_name(f".{tag_path.name}.{secrets.token_hex(6)}.tmp")
            tag_tmp.write_text(etag)
            os.replace(tag_tmp, tag_path)
        return path

    def _download_version(self, key: str, etag: str, path: Path) -> None:
        """Download ``key`` at ``etag`` to ``path`` through a temp file and a rename."""
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        os.close(fd)
        try:
            # get_object, not download_file: the transfer manager refuses If-Match
            response = self.client.get_object(Bucket=self.bucket, Key=key, IfMatch=f'"{etag}"')
            with response["Body"] as body, open(tmp, "wb") as out:
                shutil.copyfileobj(body, out, length=1 << 20)
            os.replace(tmp, path)
        except ClientError as exc:
            Path(tmp).unlink(missing_ok=True)
            if _is_precondition(exc) or _is_missing(exc):
                raise ConflictError(
                    f"{key!r} changed or was deleted while it was being read; read it again"
                ) from None
            raise
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def local_dir(self, kind: str, artifact_id: str, files: Iterable[str] | None = None) -> Path:
        """Download ``files`` (every file when None) into the cache; return the artifact's cache dir."""
        if files is None:
            for info in self.list_files(kind, artifact_id):
                self._cached(kind, artifact_id, info.rel, info.version)
        else:
            self.require(kind, artifact_id)  # once for the artifact, not once per file
            for rel in files:
                self._current_copy(kind, artifact_id, rel)
        return self.cache_root / kind / artifact_id

    def list_files(self, kind: str, artifact_id: str, prefix: str = "") -> list[StoredFile]:
        self.require(kind, artifact_id)
        base = self._key(kind, artifact_id) + "/"
        found = []
        for obj in self._keys(base + prefix):
            rel = obj["Key"][len(base) :]
            if rel and not _is_hidden(rel):
                found.append(_stored_file(rel, obj["Size"], obj["LastModified"], obj["ETag"]))
        return sorted(found)

    def stat(self, kind: str, artifact_id: str, rel: str) -> StoredFile:
        self.require(kind, artifact_id)
        head = self._head(self._key(kind, artifact_id, rel))
        if head is None:
            raise NotFoundError(f"{kind} {artifact_id!r} has no file {rel!r}")
        return _stored_file(rel, head["ContentLength"], head["LastModified"], head["ETag"])

    def put_json(self, kind: str, artifact_id: str, rel: str, obj: Any) -> None:
        """One PUT: S3 replaces an object whole, so readers see the old or the new file.

        Rewriting the manifest is conditional on the version just seen (``If-Match``): a delete
        that lands between the check and the PUT must not bring a half-deleted artifact back
        into the listing.
        """
        self.require(kind, artifact_id)
        key = self._key(kind, artifact_id, rel)
        condition: dict[str, str] = {}
        if rel == MANIFEST:
            head = self._head(key)
            if head is None:
                raise NotFoundError(f"no {kind} artifact with id {artifact_id!r}")
            condition = {"IfMatch": head["ETag"]}
        body = json.dumps(obj, indent=2).encode()
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=key, Body=body, ContentType="application/json", **condition
            )
        except ClientError as exc:
            if condition and (_is_precondition(exc) or _is_missing(exc)):
                raise ConflictError(
                    f"{kind} {artifact_id!r} was changed or deleted while its manifest was being "
                    "rewritten; read it again",
                    details={"id": artifact_id},
                ) from None
            raise

    def scratch_dir(self, kind: str, artifact_id: str, rel: str = "") -> Path:
        self.require(kind, artifact_id)
        directory = self._local_root / SCRATCH_DIR / validate_kind(kind) / artifact_id
        if rel:
            directory = directory / validate_relpath(rel)
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    def put_tree(self, kind: str, artifact_id: str, rel: str, directory: Path) -> None:
        """Upload every file of ``directory`` under ``rel``, then remove the local directory."""
        self.upload_tree(kind, artifact_id, rel, directory)
        shutil.rmtree(directory, ignore_errors=True)

    def upload_tree(self, kind: str, artifact_id: str, rel: str, directory: Path) -> None:
        """Upload every file of ``directory`` under ``rel``; the local directory stays."""
        self.require(kind, artifact_id)
        base = self._key(kind, artifact_id, rel)
        if next(self._keys(base + "/"), None) is not None or self._head(base) is not None:
            raise ConflictError(f"{kind} {artifact_id!r} already has {rel!r}", details={"rel": rel})
        for path, sub in _local_files(Path(directory)):
            self.client.upload_file(str(path), self.bucket, f"{base}/{sub}")

    def delete_tree(self, kind: str, artifact_id: str, rel: str) -> None:
        self.require(kind, artifact_id)
        base = self._key(kind, artifact_id, rel)
        self._delete_keys([base, *(obj["Key"] for obj in self._keys(base + "/"))])
        shutil.rmtree(self.cache_root / kind / artifact_id / rel, ignore_errors=True)

    def gc(self, older_than_s: float = 3600.0) -> list[str]:
        """Remove keys of artifacts that never got a manifest and were last written before the cutoff.

        A writer still uploading keeps writing keys, so its newest key stays recent and it is
        left alone; local staging directories of dead writers go too.
        """
        cutoff = time.time() - older_than_s
        removed: list[str] = []
        for kind in ARTIFACT_KINDS:
            groups: dict[str, list[dict[str, Any]]] = {}
            prefix = self._kind_prefix(kind)
            for obj in self._keys(prefix):
                artifact_id = obj["Key"][len(prefix) :].split("/", 1)[0]
                groups.setdefault(artifact_id, []).append(obj)
            for artifact_id, objects in groups.items():
                manifest = f"{prefix}{artifact_id}/{MANIFEST}"
                published = any(o["Key"] == manifest for o in objects)
                newest = max(o["LastModified"].timestamp() for o in objects)
                if not published and newest < cutoff:
                    keys = [o["Key"] for o in objects]
                    self._delete_keys(keys)
                    removed.extend(keys)
        self._gc_local_staging(cutoff)
        return removed

    def _gc_local_staging(self, cutoff: float) -> None:
        staging = self._local_root / STAGING_DIR
        for path in staging.glob(f"*/{STAGING_PREFIX}*"):
            try:
                if path.stat().st_mtime < cutoff:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass


def _stored_file(rel: str, size: int, modified: Any, etag: str) -> StoredFile:
    return StoredFile(rel, int(size), modified.timestamp(), etag.strip('"'))
