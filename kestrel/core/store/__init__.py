"""Artifact storage: the Store protocol and its backends (local directory now, S3 later)."""

from kestrel.core.store.base import ARTIFACT_KINDS, ArtifactWriter, Store, new_id, validate_id
from kestrel.core.store.local import LocalStore, write_json_atomic

__all__ = [
    "ARTIFACT_KINDS",
    "ArtifactWriter",
    "LocalStore",
    "Store",
    "new_id",
    "validate_id",
    "write_json_atomic",
]
