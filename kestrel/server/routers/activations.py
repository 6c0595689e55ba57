"""Activation runs: start a capture (202 + job), list, read a manifest, delete."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response

from kestrel.core.activations import delete_run, get_manifest
from kestrel.schemas import CaptureRequest, DeletedResponse, JobInfo, RunManifest, RunPage
from kestrel.server import services
from kestrel.server.deps import IdempotencyKey, PageDep, RedisDep, RunId, SettingsDep, StoreDep
from kestrel.server.dispatch import submit_batch
from kestrel.server.errors import error_responses
from kestrel.workers import jobs

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
        jobs.capture_job,
        kind="capture",
        kwargs=kwargs,
        artifacts={"run_id": kwargs["run_id"]},
        idempotency_key=idempotency_key,
        request_body=kwargs["request"],
    )


@router.get("", response_model=RunPage, operation_id="list_runs")
async def list_activation_runs(store: StoreDep, page: PageDep) -> RunPage:
    """Complete runs, newest first."""
    return RunPage(**page.page(await asyncio.to_thread(services.run_summaries, store)))


@router.get("/{run_id}", response_model=RunManifest, responses=error_responses(404), operation_id="get_run")
def get_activation_run(run_id: RunId, store: StoreDep) -> RunManifest:
    """A run's manifest: model, layers, widths, token counts, shards, dataset, options."""
    return RunManifest(**get_manifest(store, run_id))


@router.delete(
    "/{run_id}", response_model=DeletedResponse, responses=error_responses(404), operation_id="delete_run"
)
def delete_activation_run(run_id: RunId, store: StoreDep) -> DeletedResponse:
    delete_run(store, run_id)
    return DeletedResponse(id=run_id)
