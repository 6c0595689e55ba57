"""The Store protocol: artifacts addressed by (kind, id), written atomically.

Every artifact (an activation run, an SAE, an analysis) is a small tree of files. A writer builds it
in a private staging directory and publishes it in one step, manifest last; readers list and open
only published artifacts. The protocol is kept small so an S3 backend needs only these verbs.
Ids are generated server-side and always validated: a client never passes a filesystem path.
"""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from kestrel.core.errors import InvalidInputError

ArtifactKind = Literal["activations", "saes", "steering", "analyses", "uploads"]
ARTIFACT_KINDS: tuple[str, ...] = ("activations", "saes", "steering", "analyses", "uploads")
_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


def validate_id(artifact_id: str, what: str = "id") -> str:
    """Reject anything that is not ``[a-z0-9-]``, 1–64 characters, so no id can name a path."""
    if not isinstance(artifact_id, str) or not _ID_PATTERN.match(artifact_id):
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
    """Where artifacts live. ``LocalStore`` now; an S3 backend implements the same verbs."""

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
