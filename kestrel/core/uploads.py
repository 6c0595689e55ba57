"""Uploaded files: written by the API under ``<store>/uploads/<id>/``, read by workers by id.

A client's file name is recorded and never used as a path: the file is stored as ``data.<format>``
inside a directory named by a server-generated id, staged and published atomically like every
other artifact. The format comes from the name's suffix and is checked against the content
(safetensors header, parquet footer, UTF-8 text) before anything is published, so a worker never
opens a file that merely claims to be a dataset.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import IO, Any

from kestrel.core.clientdata import TensorInfo, safetensors_header
from kestrel.core.errors import InvalidInputError
from kestrel.core.sources import FileReading, FileSource
from kestrel.core.store import Store, new_id, read_manifests, validate_id

KIND = "uploads"
SUFFIXES = {
    ".txt": "txt",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".safetensors": "safetensors",
}
TEXT_FORMATS = {"txt", "jsonl", "csv"}
CHUNK = 1 << 20


class UploadTooLargeError(InvalidInputError):
    """The upload passed the configured size limit (the API answers 413)."""


def upload_format(filename: str) -> str:
    """The format a file name's suffix declares; InvalidInputError for anything else."""
    suffix = Path(filename or "").suffix.lower()
    if suffix not in SUFFIXES:
        raise InvalidInputError(
            f"unsupported upload {filename!r}: use one of {', '.join(SUFFIXES)} "
            "(datasets as text, jsonl, csv or parquet; tensors as safetensors only)",
            details={"filename": filename, "supported": list(SUFFIXES)},
        )
    return SUFFIXES[suffix]


def save_upload(store: Store, source: IO[bytes], filename: str, *, max_bytes: int) -> dict[str, Any]:
    """Copy ``source`` into a new upload, checking size and content; return its manifest."""
    fmt = upload_format(filename)
    upload_id = new_id("upload")
    with store.writer(KIND, upload_id) as writer:
        target = writer.directory / f"data.{fmt}"
        size, digest = _copy_limited(source, target, max_bytes)
        _check_content(target, fmt)
        manifest = {
            "id": upload_id,
            "kind": "activations" if fmt == "safetensors" else "dataset",
            "format": fmt,
            "filename": Path(filename).name[:255],
            "file": target.name,
            "size_bytes": size,
            "sha256": digest,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        writer.commit(manifest)
    return manifest


def _copy_limited(source: IO[bytes], target: Path, max_bytes: int) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with target.open("wb") as out:
        while chunk := source.read(CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise UploadTooLargeError(
                    f"upload exceeds the limit max_upload_mb={max_bytes / 1024 / 1024:g}",
                    details={"limit": "max_upload_mb", "max": max_bytes / 1024 / 1024},
                )
            digest.update(chunk)
            out.write(chunk)
    if size == 0:
        raise InvalidInputError("the uploaded file is empty")
    return size, digest.hexdigest()


def _check_content(path: Path, fmt: str) -> None:
    if fmt == "safetensors":
        check_safetensors(path)
    elif fmt == "parquet":
        _check_parquet(path)
    else:
        _check_utf8(path)


def check_safetensors(source: Path | bytes) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header (of a file or bytes) without loading tensors;
    InvalidInputError if it is not one. Nothing else is ever parsed from client tensors: no pickle."""
    return safetensors_header(source)


def _check_parquet(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pq.ParquetFile(path).close()
    except (pa.ArrowException, OSError) as exc:
        raise InvalidInputError(f"not a readable parquet file: {exc}") from None


def _check_utf8(path: Path) -> None:
    with path.open("rb") as fh:
        head = fh.read(CHUNK)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # a multi-byte character cut at the chunk end is fine
            raise InvalidInputError(f"not UTF-8 text (byte offset {exc.start})") from None


def list_uploads(store: Store) -> list[dict[str, Any]]:
    return read_manifests(store, KIND)


def get_upload(store: Store, upload_id: str) -> dict[str, Any]:
    return store.read_json(KIND, validate_id(upload_id, "upload id"))


def delete_upload(store: Store, upload_id: str) -> None:
    store.delete(KIND, validate_id(upload_id, "upload id"))


def require_dataset_upload(store: Store, upload_id: str) -> dict[str, Any]:
    """The upload's manifest; InvalidInputError when it holds tensors rather than texts."""
    manifest = get_upload(store, upload_id)
    if manifest["kind"] != "dataset":
        raise InvalidInputError(
            f"upload {upload_id!r} is {manifest['format']}, not a dataset (txt, jsonl, csv, parquet)"
        )
    return manifest


def upload_file_source(store: Store, upload_id: str, reading: FileReading) -> FileSource:
    """The FileSource a worker reads for an uploaded dataset (a path made here, not by a client),
    read as ``reading`` says (an ``UploadSource`` is one); format auto is the upload's own."""
    manifest = require_dataset_upload(store, upload_id)
    path = store.local_path(KIND, upload_id, manifest["file"])
    format = reading.format
    return FileSource(
        path=str(path),
        format=manifest["format"] if format == "auto" else format,  # type: ignore[arg-type]
        **reading.model_dump(include=FileReading.model_fields.keys() - {"format"}),
    )
