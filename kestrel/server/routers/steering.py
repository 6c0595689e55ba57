"""Steering configs: create (checked against their SAEs), preview (interactive: checked against the
model too), list, read, delete. Generation with a config is ``POST /v1/models/{name}/generate``."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from kestrel.core.steering_config import SteeringConfig
from kestrel.schemas import (
    DeletedResponse,
    SteeringPage,
    SteeringPreview,
    SteeringPreviewRequest,
    SteeringRecord,
)
from kestrel.server import services
from kestrel.server.deps import PageDep, RedisDep, SettingsDep, SteeringId, StoreDep
from kestrel.server.dispatch import STILL_RUNNING_RESPONSE, run_interactive
from kestrel.server.errors import error_responses
from kestrel.workers import names as job_names

router = APIRouter(prefix="/steering", tags=["steering"], responses=error_responses(401, 422))


def _steering():
    """Configs and saved configs: torch-free (``kestrel.core.steering_config``)."""
    from kestrel.core import steering_config

    return steering_config


@router.post("", response_model=SteeringRecord, status_code=201, responses=error_responses(404))
async def create_steering(config: SteeringConfig, store: StoreDep) -> SteeringRecord:
    """Save a config after checking it against its SAEs (latent ranges, layer); it gets an id."""
    return SteeringRecord(**await asyncio.to_thread(_steering().save_config, store, config))


@router.post(
    "/preview",
    response_model=SteeringPreview,
    responses={**error_responses(404, 424, 503), **STILL_RUNNING_RESPONSE},
)
async def preview_steering(
    request: SteeringPreviewRequest, settings: SettingsDep, redis: RedisDep, store: StoreDep
) -> SteeringPreview:
    """Validate a saved or inline config against its SAEs and the model; list the latents it
    touches with their names, and its direction edits."""
    config = await asyncio.to_thread(services.checked_steering, store, request.config_id, request.config)
    if request.model is not None:
        services.require_allowed_model(request.model, settings)
    job_id, result = await run_interactive(
        redis,
        settings,
        job_names.STEERING_PREVIEW,
        kind="steering_preview",
        kwargs={"config": config.model_dump(mode="json"), "model": request.model},
    )
    return SteeringPreview(**result, job_id=job_id)


@router.get("", response_model=SteeringPage)
async def list_steering(store: StoreDep, page: PageDep) -> SteeringPage:
    records = await asyncio.to_thread(_steering().list_configs, store)
    return SteeringPage(**page.page([SteeringRecord(**r) for r in records]))


@router.get("/{config_id}", response_model=SteeringRecord, responses=error_responses(404))
async def get_steering(config_id: SteeringId, store: StoreDep) -> SteeringRecord:
    return SteeringRecord(**await asyncio.to_thread(_steering().get_config_record, store, config_id))


@router.delete("/{config_id}", response_model=DeletedResponse, responses=error_responses(404))
async def delete_steering(config_id: SteeringId, store: StoreDep) -> DeletedResponse:
    await asyncio.to_thread(_steering().delete_config, store, config_id)
    return DeletedResponse(id=config_id)
