"""Uploads: datasets (txt, jsonl, csv, parquet) and tensors (safetensors only), size-limited."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, File, UploadFile

from kestrel.core import uploads
from kestrel.schemas import DeletedResponse, UploadInfo, UploadPage
from kestrel.server.deps import PageDep, SettingsDep, StoreDep, UploadId
from kestrel.server.errors import error_responses, limit_exceeded

router = APIRouter(prefix="/uploads", tags=["uploads"], responses=error_responses(401, 422))


@router.post("", response_model=UploadInfo, status_code=201, responses=error_responses(413))
async def create_upload(
    settings: SettingsDep,
    store: StoreDep,
    file: Annotated[UploadFile, File(description=".txt .jsonl .csv .parquet datasets or .safetensors")],
) -> UploadInfo:
    """Store a file under a new id; a capture names it with ``{"kind": "upload", "upload_id": ...}``,
    and ``POST /v1/activations/imports`` turns a .safetensors file of activations into a run."""
    try:
        manifest = await asyncio.to_thread(
            uploads.save_upload, store, file.file, file.filename or "", max_bytes=settings.max_upload_bytes
        )
    except uploads.UploadTooLargeError:
        raise limit_exceeded(
            "max_upload_mb", settings.max_upload_mb, round((file.size or 0) / 2**20, 3), "upload too large"
        ) from None
    return UploadInfo(**manifest)


@router.get("", response_model=UploadPage)
def list_uploads(store: StoreDep, page: PageDep) -> UploadPage:
    rows = sorted(uploads.list_uploads(store), key=lambda m: m["created"], reverse=True)
    return UploadPage(**page.page([UploadInfo(**m) for m in rows]))


@router.get("/{upload_id}", response_model=UploadInfo, responses=error_responses(404))
def get_upload(upload_id: UploadId, store: StoreDep) -> UploadInfo:
    return UploadInfo(**uploads.get_upload(store, upload_id))


@router.delete("/{upload_id}", response_model=DeletedResponse, responses=error_responses(404))
def delete_upload(upload_id: UploadId, store: StoreDep) -> DeletedResponse:
    uploads.delete_upload(store, upload_id)
    return DeletedResponse(id=upload_id)
