"""Artifact storage: the Store protocol and its backends (a local directory, S3, or both mirrored).

``S3Store`` (``kestrel.core.store.s3``) and ``MirrorStore`` (``.mirror``) import boto3, so they are
imported only when ``open_store`` chooses them.
"""

from kestrel.core.store.base import (
    ARTIFACT_KINDS,
    ArtifactWriter,
    Store,
    StoredFile,
    StoredManifest,
    new_id,
    read_manifests,
    read_typed_manifests,
    validate_id,
)
from kestrel.core.store.factory import StoreBackend, open_store, parse_s3_url
from kestrel.core.store.local import LocalStore, write_json_atomic

__all__ = [
    "ARTIFACT_KINDS",
    "ArtifactWriter",
    "LocalStore",
    "Store",
    "StoreBackend",
    "StoredFile",
    "StoredManifest",
    "new_id",
    "open_store",
    "parse_s3_url",
    "read_manifests",
    "read_typed_manifests",
    "validate_id",
    "write_json_atomic",
]
