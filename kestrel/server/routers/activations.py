"""Activation runs: start a capture (202 + job), import an uploaded file, list, read a manifest, delete."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response
from redis import Redis

from kestrel.core import uploads
from kestrel.core.errors import InvalidInputError
from kestrel.core.limits import Caps, check_shard_mb
from kestrel.core.runs import delete_run, get_manifest
from kestrel.core.store import Store, validate_id
from kestrel.schemas import (
    CaptureRequest,
    DeletedResponse,
    JobInfo,
    RunImportRequest,
    RunManifest,
    RunPage,
)
from kestrel.server import services
from kestrel.server.deps import IdempotencyKey, PageDep, RedisDep, RunId, SettingsDep, StoreDep
from kestrel.server.dispatch import submit_batch
from kestrel.server.errors import error_responses
from kestrel.settings import Settings
from kestrel.workers import names as job_names

router = APIRouter(prefix="/activations", tags=["activations"], responses=error_responses(401, 422))


@router.post("", response_model=JobInfo, status_code=202, responses=error_responses(404, 409, 413))
def start_capture(
    request: CaptureRequest,
    response: Response,
    settings: SettingsDep,
    redis: RedisDep,
    store: StoreDep,
    idempotency_key: IdempotencyKey = None,
) -> JobInfo:
    """Capture layers over a dataset; the job's ``artifacts.run_id`` names the run it makes."""
    kwargs = services.prepare_capture(request, settings, store)
    return submit_batch(
        redis,
        settings,
        response,
        job_names.CAPTURE,
        kind="capture",
        kwargs=kwargs,
        artifacts={"run_id": kwargs["run_id"]},
        idempotency_key=idempotency_key,
        request_body=kwargs["request"],
    )


# Manifests are answered as stored (response_model_exclude_unset): a field the file lacks is
# left out, not sent as null.
@router.post(
    "/imports",
    response_model=RunManifest,
    response_model_exclude_unset=True,
    status_code=201,
    responses=error_responses(404, 409),
)
async def import_run(
    request: RunImportRequest, settings: SettingsDep, redis: RedisDep, store: StoreDep
) -> RunManifest:
    """Turn an uploaded safetensors file of activations into a run, ready for training and analyses.

    Answered directly (201), not as a job: the file is at most ``max_upload_mb`` and needs no model,
    so the conversion takes about as long as copying it. Each problem is a 422 naming the tensor.
    """
    return await asyncio.to_thread(_import_upload, request, settings, redis, store)


def _import_upload(request: RunImportRequest, settings: Settings, redis: Redis, store: Store) -> RunManifest:
    from kestrel.core.imports import import_activations  # torch, imported on the first import

    check_shard_mb(request.shard_mb, Caps.of(settings))
    upload = uploads.get_upload(store, validate_id(request.upload_id, "upload id"))
    if upload["format"] != "safetensors":
        raise InvalidInputError(
            f"upload {request.upload_id!r} is {upload['format']}, not safetensors activations",
            details={"upload_id": request.upload_id, "format": upload["format"]},
        )
    return import_activations(
        store,
        store.local_path(uploads.KIND, upload["id"], upload["file"]),
        tensors=request.tensors,
        row_fields=request.row_fields,
        dtype=request.dtype,
        model=request.model,
        model_source=_loadable_source(request.model, settings, redis),
        shard_mb=request.shard_mb,
        source={"kind": "upload", "upload_id": upload["id"], "filename": upload["filename"]},
    )


def _loadable_source(model: str | None, settings: Settings, redis: Redis) -> str | None:
    """How a worker could load ``model`` (bundled, local, a hub model a worker holds), or None when
    none can; the imported run is marked loadable (CE-loss evaluation works) only in the first case."""
    if model is None:
        return None
    return next((row.source for row in services.list_models(settings, redis) if row.name == model), None)


@router.get("", response_model=RunPage, operation_id="list_runs")
async def list_activation_runs(store: StoreDep, page: PageDep) -> RunPage:
    """Complete runs, newest first."""
    return RunPage(**page.page(await asyncio.to_thread(services.run_summaries, store)))


@router.get(
    "/{run_id}",
    response_model=RunManifest,
    response_model_exclude_unset=True,
    responses=error_responses(404),
    operation_id="get_run",
)
def get_activation_run(run_id: RunId, store: StoreDep) -> RunManifest:
    """A run's manifest: model, layers, widths, token counts, shards, dataset, options."""
    return get_manifest(store, run_id)


@router.delete(
    "/{run_id}", response_model=DeletedResponse, responses=error_responses(404), operation_id="delete_run"
)
def delete_activation_run(run_id: RunId, store: StoreDep) -> DeletedResponse:
    delete_run(store, run_id)
    return DeletedResponse(id=run_id)
