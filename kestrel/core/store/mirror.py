"""``both``: a local store mirrored to S3, for a fast local disk with a durable, shared copy.

Writes go to both: an artifact is staged once, locally, uploaded to S3 (manifest last), then
published locally by the usual rename. S3 goes first so that the copy read first (local) only
appears once both exist; a failed upload publishes nothing anywhere. Reads prefer the local copy
and fall back to S3 (through its download cache), so artifacts written by another machine are
visible too; ``list`` is the union of both.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kestrel.core.errors import ConflictError, NotFoundError
from kestrel.core.store.base import StoredFile
from kestrel.core.store.local import LocalStore, LocalWriter, write_json_atomic
from kestrel.core.store.s3 import MANIFEST, S3Store


class MirrorWriter:
    """A local writer whose commit uploads the staged artifact to S3 before publishing locally."""

    def __init__(self, store: MirrorStore, kind: str, artifact_id: str) -> None:
        self.kind = kind
        self.artifact_id = artifact_id
        self._remote = store.remote
        self._local = LocalWriter(store.local, kind, artifact_id)
        self.directory = self._local.directory

    def commit(self, manifest: dict[str, Any], manifest_name: str = MANIFEST) -> None:
        try:
            write_json_atomic(self.directory / manifest_name, manifest)
            self._remote.publish_directory(self.kind, self.artifact_id, self.directory, manifest_name)
        except BaseException:
            self._local.abort()
            raise
        self._local.commit(manifest, manifest_name)

    def abort(self) -> None:
        self._local.abort()

    def __enter__(self) -> MirrorWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._local.__exit__(exc_type, exc, tb)


class MirrorStore:
    """Reads local first, then S3; writes both. See the module docstring."""

    def __init__(self, local: LocalStore, remote: S3Store) -> None:
        self.local = local
        self.remote = remote

    def __repr__(self) -> str:
        return f"MirrorStore({self.local!r}, {self.remote!r})"

    @property
    def local_root(self) -> Path:
        return self.local.root

    @property
    def models_dir(self) -> Path:
        return self.local.models_dir

    def _holders(self, kind: str, artifact_id: str) -> list[LocalStore | S3Store]:
        """The backends that hold the artifact; NotFoundError if neither does."""
        holders = [s for s in (self.local, self.remote) if s.exists(kind, artifact_id)]
        if not holders:
            raise NotFoundError(f"no {kind} artifact with id {artifact_id!r}", details={"id": artifact_id})
        return holders

    def _reader(self, kind: str, artifact_id: str) -> LocalStore | S3Store:
        return self.local if self.local.exists(kind, artifact_id) else self.remote

    def writer(self, kind: str, artifact_id: str) -> MirrorWriter:
        if self.exists(kind, artifact_id):
            raise ConflictError(
                f"{kind} id {artifact_id!r} already exists; choose another id or delete it first",
                details={"kind": kind, "id": artifact_id},
            )
        return MirrorWriter(self, kind, artifact_id)

    def exists(self, kind: str, artifact_id: str) -> bool:
        return self.local.exists(kind, artifact_id) or self.remote.exists(kind, artifact_id)

    def list(self, kind: str) -> list[str]:
        return sorted(set(self.local.list(kind)) | set(self.remote.list(kind)))

    def read_json(self, kind: str, artifact_id: str, rel: str = MANIFEST) -> Any:
        return self._reader(kind, artifact_id).read_json(kind, artifact_id, rel)

    def local_path(self, kind: str, artifact_id: str, rel: str) -> Path:
        return self._reader(kind, artifact_id).local_path(kind, artifact_id, rel)

    def delete(self, kind: str, artifact_id: str) -> None:
        """Delete from S3 first, so no other machine re-reads what this one just removed."""
        for store in reversed(self._holders(kind, artifact_id)):
            store.delete(kind, artifact_id)

    def local_dir(self, kind: str, artifact_id: str, files: Iterable[str] | None = None) -> Path:
        return self._reader(kind, artifact_id).local_dir(kind, artifact_id, files)

    def list_files(self, kind: str, artifact_id: str, prefix: str = "") -> list[StoredFile]:
        return self._reader(kind, artifact_id).list_files(kind, artifact_id, prefix)

    def stat(self, kind: str, artifact_id: str, rel: str) -> StoredFile:
        return self._reader(kind, artifact_id).stat(kind, artifact_id, rel)

    def put_json(self, kind: str, artifact_id: str, rel: str, obj: Any) -> None:
        for store in reversed(self._holders(kind, artifact_id)):
            store.put_json(kind, artifact_id, rel, obj)

    def scratch_dir(self, kind: str, artifact_id: str, rel: str = "") -> Path:
        return self._reader(kind, artifact_id).scratch_dir(kind, artifact_id, rel)

    def put_tree(self, kind: str, artifact_id: str, rel: str, directory: Path) -> None:
        """Upload a copy to S3 when it holds the artifact, then move the directory in locally."""
        holders = self._holders(kind, artifact_id)
        if self.remote in holders:
            self.remote.upload_tree(kind, artifact_id, rel, Path(directory))
        if self.local in holders:
            self.local.put_tree(kind, artifact_id, rel, directory)
        else:
            shutil.rmtree(directory, ignore_errors=True)

    def delete_tree(self, kind: str, artifact_id: str, rel: str) -> None:
        for store in reversed(self._holders(kind, artifact_id)):
            store.delete_tree(kind, artifact_id, rel)

    def gc(self, older_than_s: float = 3600.0) -> list[Any]:
        return [*self.local.gc(older_than_s), *self.remote.gc(older_than_s)]
