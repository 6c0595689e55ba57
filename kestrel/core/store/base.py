"""The Store protocol: artifacts addressed by (kind, id), written atomically.

Every artifact (an activation run, an SAE, an analysis) is a small tree of files. A writer builds it
in a private staging directory and publishes it in one step, manifest last; readers list and open
only published artifacts. The protocol is kept small so an S3 backend needs only these verbs.
Ids are generated server-side and always validated: a client never passes a filesystem path.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, ConfigDict, ValidationError

from kestrel.core.errors import InvalidInputError

log = logging.getLogger(__name__)
ArtifactKind = Literal["activations", "saes", "steering", "analyses", "uploads"]
ARTIFACT_KINDS: tuple[str, ...] = ("activations", "saes", "steering", "analyses", "uploads")
_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


def validate_id(artifact_id: str, what: str = "id") -> str:
    """Reject anything that is not ``[a-z0-9-]``, 1–64 characters, so no id can name a path."""
    if not isinstance(artifact_id, str) or not _ID_PATTERN.fullmatch(artifact_id):
        raise InvalidInputError(
            f"invalid {what} {artifact_id!r}: use 1-64 characters of a-z, 0-9 and '-', "
            "starting with a letter or digit",
            details={what: artifact_id},
        )
    return artifact_id


def validate_kind(kind: str) -> str:
    if kind not in ARTIFACT_KINDS:
        raise InvalidInputError(f"unknown artifact kind {kind!r}; use one of {', '.join(ARTIFACT_KINDS)}")
    return kind


def new_id(prefix: str) -> str:
    """A fresh id that sorts by creation time: ``run-20261123t1917-3f9a2c``."""
    return f"{prefix}-{time.strftime('%Y%m%dt%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def validate_relpath(rel: str) -> str:
    """A file path inside an artifact, made by the engine (never by a client), checked all the same."""
    parts = Path(rel).parts
    if not parts or Path(rel).is_absolute() or any(p in ("..", ".", "") for p in parts):
        raise InvalidInputError(f"invalid artifact file name {rel!r}")
    return rel


class StoredFile(NamedTuple):
    """One file of a published artifact, as ``list_files`` and ``stat`` report it."""

    rel: str
    """Path inside the artifact, ``/``-separated (``model.layers.1/00000.safetensors``)."""
    size: int
    """Bytes."""
    modified: float
    """Unix time of the last write, so callers can leave recent files alone."""
    version: str
    """Changes whenever the content is replaced (an S3 ETag; mtime and size locally)."""


class ArtifactWriter(Protocol):
    """A staged artifact: write files under ``directory``, then ``commit`` (or ``abort``)."""

    kind: str
    artifact_id: str
    directory: Path  # local staging directory; nothing in it is visible to readers before commit

    def commit(self, manifest: dict[str, Any], manifest_name: str = "manifest.json") -> None: ...

    def abort(self) -> None: ...

    def __enter__(self) -> ArtifactWriter: ...

    def __exit__(self, exc_type, exc, tb) -> None: ...


@runtime_checkable
class Store(Protocol):
    """Where artifacts live: ``LocalStore``, ``S3Store`` or ``MirrorStore`` (both), same verbs."""

    def writer(self, kind: str, artifact_id: str) -> ArtifactWriter:
        """Start an artifact; ConflictError if the id is already published."""
        ...

    def exists(self, kind: str, artifact_id: str) -> bool: ...

    def list(self, kind: str) -> list[str]:
        """Ids of complete artifacts of one kind, sorted."""
        ...

    def read_json(self, kind: str, artifact_id: str, rel: str = "manifest.json") -> Any: ...

    def local_path(self, kind: str, artifact_id: str, rel: str) -> Path:
        """A readable local file for ``rel`` inside the artifact (a remote store caches it first)."""
        ...

    def delete(self, kind: str, artifact_id: str) -> None: ...

    @property
    def models_dir(self) -> Path:
        """Local directory of the converted-weights cache."""
        ...

    # -- files inside a published artifact ------------------------------------------------------
    # Some artifacts grow after publishing (an SAE gains metrics, discovered features, a concept
    # dictionary). These verbs let that happen without a caller touching the backend's paths.

    @property
    def local_root(self) -> Path:
        """A directory on this machine for what never leaves it: weights cache, checkpoints, caches."""
        ...

    def local_dir(self, kind: str, artifact_id: str, files: Iterable[str] | None = None) -> Path:
        """A local directory holding the artifact's ``files`` (all when None) at their relative paths.

        Treat it as read-only: a remote store returns its download cache.
        """
        ...

    def list_files(self, kind: str, artifact_id: str, prefix: str = "") -> list[StoredFile]:
        """Files of a published artifact whose relative path starts with ``prefix``, sorted."""
        ...

    def stat(self, kind: str, artifact_id: str, rel: str) -> StoredFile:
        """One file's size, time and version; NotFoundError if the artifact or the file is missing."""
        ...

    def put_json(self, kind: str, artifact_id: str, rel: str, obj: Any) -> None:
        """Replace (or add) one JSON file of a published artifact; readers see old or new, whole."""
        ...

    def scratch_dir(self, kind: str, artifact_id: str, rel: str = "") -> Path:
        """A local directory tied to a published artifact for staging ``put_tree`` input and locks.

        For a local store it lies inside the artifact, so ``put_tree`` is one rename.
        """
        ...

    def put_tree(self, kind: str, artifact_id: str, rel: str, directory: Path) -> None:
        """Move a local directory into a published artifact as ``rel`` (which must not exist yet).

        Readers may see the files appear one by one: publish a pointer to them (a manifest
        rewritten with ``put_json``) last.
        """
        ...

    def delete_tree(self, kind: str, artifact_id: str, rel: str) -> None:
        """Remove ``rel`` and everything under it from a published artifact (missing is fine)."""
        ...

    def gc(self, older_than_s: float = 3600.0) -> list[Any]:
        """Remove leftovers of writers that died more than ``older_than_s`` ago; return what went."""
        ...


class StoredManifest(BaseModel):
    """Base of the typed manifests (`RunManifest`, `SAEManifest`, `AnalysisManifest`).

    Every field Kestrel knows is typed; a field this version does not know (written by a newer or
    an older one) passes through a read and a rewrite unchanged (``extra="allow"``). ``to_json``
    writes back exactly the keys that were read or set, so the file on disk keeps its format.
    """

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    def to_json(self) -> dict[str, Any]:
        """The manifest.json object: the keys read or set (none filled from defaults), by alias."""
        return self.model_dump(by_alias=True, exclude_unset=True)


M = TypeVar("M", bound="StoredManifest")


def read_manifests(store: Store, kind: str) -> list[dict[str, Any]]:
    """The manifests of every published artifact of one kind, in ``list`` order.

    An artifact deleted between the listing and its read is left out: one concurrent delete must
    not turn a whole list request into a 404.
    """
    from kestrel.core.errors import NotFoundError

    manifests = []
    for artifact_id in store.list(kind):
        try:
            manifests.append(store.read_json(kind, artifact_id))
        except NotFoundError:
            continue
    return manifests


def read_typed_manifests(store: Store, kind: str, model: type[M]) -> list[M]:
    """`read_manifests` parsed as ``model``; a manifest that does not parse is left out, logged.

    One artifact this version cannot read (a required field missing, say) must not turn every list
    request into a 500; reading that artifact by its id still fails, naming the problem.
    """
    parsed = []
    for manifest in read_manifests(store, kind):
        try:
            parsed.append(model.model_validate(manifest))
        except ValidationError as error:
            log.warning(
                "%s %r left out of the list: its manifest does not parse: %s", kind, manifest.get("id"), error
            )
    return parsed
