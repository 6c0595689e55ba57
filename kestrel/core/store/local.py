"""A store in a local directory (the default).

Atomicity comes from the filesystem: an artifact is staged in ``<root>/<kind>/.staging-<id>-<rand>``
and published by one ``rename`` to ``<root>/<kind>/<id>`` after its manifest is written. A process
killed at any moment leaves at most a staging directory, which no reader lists and ``gc`` removes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kestrel.core.errors import ConflictError, NotFoundError
from kestrel.core.store.base import (
    ARTIFACT_KINDS,
    StoredFile,
    validate_id,
    validate_kind,
    validate_relpath,
)

STAGING_PREFIX = ".staging-"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LocalWriter:
    """Stages one artifact in a private directory and publishes it by renaming it into place."""

    def __init__(self, store: LocalStore, kind: str, artifact_id: str) -> None:
        self.kind = kind
        self.artifact_id = artifact_id
        self._final = store.artifact_dir(kind, artifact_id)
        self._final.parent.mkdir(parents=True, exist_ok=True)
        self.directory = Path(
            tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{artifact_id}-", dir=self._final.parent)
        )
        self._done = False

    def commit(self, manifest: dict[str, Any], manifest_name: str = "manifest.json") -> None:
        """Write the manifest last, then publish the whole directory with one rename."""
        write_json_atomic(self.directory / manifest_name, manifest)
        self.directory.chmod(0o755)  # mkdtemp made it private; published artifacts are shared
        try:
            # rename of a directory onto an existing non-empty one fails: two writers racing for
            # one id cannot both win, and the loser's work is discarded rather than mixed in.
            os.rename(self.directory, self._final)
        except OSError as exc:
            self.abort()
            raise ConflictError(f"{self.kind} id {self.artifact_id!r} already exists") from exc
        self._done = True

    def abort(self) -> None:
        if not self._done:
            shutil.rmtree(self.directory, ignore_errors=True)
            self._done = True

    def __enter__(self) -> LocalWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._done:
            self.abort()


class LocalStore:
    """Artifacts under one root directory; see ARCHITECTURE.md for the layout."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def local_root(self) -> Path:
        return self.root

    def artifact_dir(self, kind: str, artifact_id: str) -> Path:
        return self.root / validate_kind(kind) / validate_id(artifact_id)

    def writer(self, kind: str, artifact_id: str) -> LocalWriter:
        if self.exists(kind, artifact_id):
            raise ConflictError(
                f"{kind} id {artifact_id!r} already exists; choose another id or delete it first",
                details={"kind": kind, "id": artifact_id},
            )
        return LocalWriter(self, kind, artifact_id)

    def exists(self, kind: str, artifact_id: str) -> bool:
        return self.artifact_dir(kind, artifact_id).is_dir()

    def list(self, kind: str) -> list[str]:
        directory = self.root / validate_kind(kind)
        if not directory.is_dir():
            return []
        return sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))

    def require(self, kind: str, artifact_id: str) -> Path:
        directory = self.artifact_dir(kind, artifact_id)
        if not directory.is_dir():
            raise NotFoundError(f"no {kind} artifact with id {artifact_id!r}", details={"id": artifact_id})
        return directory

    def read_json(self, kind: str, artifact_id: str, rel: str = "manifest.json") -> Any:
        return json.loads(self.local_path(kind, artifact_id, rel).read_text())

    def local_path(self, kind: str, artifact_id: str, rel: str) -> Path:
        path = self.require(kind, artifact_id) / validate_relpath(rel)
        if not path.is_file():
            raise NotFoundError(f"{kind} {artifact_id!r} has no file {rel!r}")
        return path

    def delete(self, kind: str, artifact_id: str) -> None:
        """Delete by first renaming out of sight, so a reader never sees a half-deleted artifact."""
        directory = self.require(kind, artifact_id)
        trash = directory.with_name(f".deleting-{artifact_id}-{os.getpid()}-{time.monotonic_ns()}")
        os.rename(directory, trash)
        shutil.rmtree(trash, ignore_errors=True)

    # -- files inside a published artifact ------------------------------------------------------

    def local_dir(self, kind: str, artifact_id: str, files: Iterable[str] | None = None) -> Path:
        return self.require(kind, artifact_id)

    def list_files(self, kind: str, artifact_id: str, prefix: str = "") -> list[StoredFile]:
        directory = self.require(kind, artifact_id)
        found = []
        for path in sorted(directory.rglob("*")):
            rel = path.relative_to(directory).as_posix()
            hidden = any(part.startswith(".") for part in path.relative_to(directory).parts)
            if rel.startswith(prefix) and not hidden and path.is_file():
                found.append(_stored_file(rel, path))
        return found

    def stat(self, kind: str, artifact_id: str, rel: str) -> StoredFile:
        return _stored_file(rel, self.local_path(kind, artifact_id, rel))

    def put_json(self, kind: str, artifact_id: str, rel: str, obj: Any) -> None:
        write_json_atomic(self.require(kind, artifact_id) / validate_relpath(rel), obj)

    def scratch_dir(self, kind: str, artifact_id: str, rel: str = "") -> Path:
        directory = self.require(kind, artifact_id)
        if rel:
            directory = directory / validate_relpath(rel)
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    def put_tree(self, kind: str, artifact_id: str, rel: str, directory: Path) -> None:
        """One rename when ``directory`` is on the store's filesystem (``scratch_dir``), else a copy."""
        target = self.require(kind, artifact_id) / validate_relpath(rel)
        if target.exists():
            raise ConflictError(f"{kind} {artifact_id!r} already has {rel!r}", details={"rel": rel})
        target.parent.mkdir(parents=True, exist_ok=True)
        Path(directory).chmod(0o755)  # mkdtemp made it private; published files are shared
        try:
            os.rename(directory, target)
        except OSError:  # another filesystem: copy next to the target, then rename
            staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=target.parent))
            shutil.copytree(directory, staging, dirs_exist_ok=True)
            staging.chmod(0o755)
            os.rename(staging, target)
            shutil.rmtree(directory, ignore_errors=True)

    def delete_tree(self, kind: str, artifact_id: str, rel: str) -> None:
        target = self.require(kind, artifact_id) / validate_relpath(rel)
        if target.is_dir():
            trash = target.with_name(f".deleting-{target.name}-{os.getpid()}-{time.monotonic_ns()}")
            os.rename(target, trash)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)

    def gc(self, older_than_s: float = 3600.0) -> list[Path]:
        """Remove staging leftovers of crashed writers older than ``older_than_s``."""
        removed = []
        cutoff = time.time() - older_than_s
        for kind_dir in (self.root / k for k in ARTIFACT_KINDS):
            if not kind_dir.is_dir():
                continue
            for p in kind_dir.iterdir():
                if p.name.startswith((STAGING_PREFIX, ".deleting-")) and p.stat().st_mtime < cutoff:
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
        return removed


def _stored_file(rel: str, path: Path) -> StoredFile:
    info = path.stat()
    return StoredFile(rel, info.st_size, info.st_mtime, f"{info.st_mtime_ns}-{info.st_size}")
