"""Steering configs: create (checked against their SAEs), preview (interactive: checked against the
model too), list, read, delete; sweeps of one latent over strengths (interactive). Generation with a
config is ``POST /v1/models/{name}/generate``. ``features_router``: a latent's measured logit effect
(``POST /v1/saes/{id}/features/{latent}/logits/measured``), served by the interactive worker."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from kestrel.core.errors import InvalidInputError
from kestrel.core.steering_config import SteeringConfig
from kestrel.schemas import (
    DeletedResponse,
    LogitCheckRequest,
    LogitCheckResponse,
    SteeringPage,
    SteeringPreview,
    SteeringPreviewRequest,
    SteeringRecord,
    SteeringSweepRequest,
    SteeringSweepResponse,
)
from kestrel.server import services
from kestrel.server.deps import Latent, PageDep, RedisDep, SaeId, SettingsDep, SteeringId, StoreDep
from kestrel.server.dispatch import STILL_RUNNING_RESPONSE, run_interactive
from kestrel.server.errors import error_responses
from kestrel.workers import names as job_names

router = APIRouter(prefix="/steering", tags=["steering"], responses=error_responses(401, 422))
features_router = APIRouter(prefix="/saes", tags=["features"], responses=error_responses(401, 422))


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


@router.post(
    "/sweep",
    response_model=SteeringSweepResponse,
    responses={**error_responses(404, 424, 503), **STILL_RUNNING_RESPONSE},
)
async def sweep_steering(
    request: SteeringSweepRequest, settings: SettingsDep, redis: RedisDep, store: StoreDep
) -> SteeringSweepResponse:
    """Greedy continuations with one latent edited at several strengths (default 0, 0.5, 1, 2, 4, 8
    × its max activation), each with its perplexity under the unsteered model and the keywords'
    effect; the fluent window, where the effect appears, and whether the latent steers at all."""
    request.check_size()
    config = SteeringConfig(
        sae_id=request.sae_id,
        edits=[{"latent": request.latent, "op": request.op, "value": 1.0, "unit": request.unit}],
    )
    config = await asyncio.to_thread(services.checked_steering, store, None, config)  # range, discovery
    await asyncio.to_thread(
        services.check_steered_generation,
        request.model,
        request.prompts,
        request.keywords,
        config,
        settings,
        store,
    )
    job_id, result = await run_interactive(
        redis,
        settings,
        job_names.STEERING_SWEEP,
        kind="steering_sweep",
        kwargs={"request": request.model_dump(mode="json")},
    )
    return SteeringSweepResponse(**result, job_id=job_id)


@features_router.post(
    "/{sae_id}/features/{latent}/logits/measured",
    response_model=LogitCheckResponse,
    responses={**error_responses(404, 424, 503), **STILL_RUNNING_RESPONSE},
)
async def measure_logits(
    sae_id: SaeId,
    latent: Latent,
    request: LogitCheckRequest,
    settings: SettingsDep,
    redis: RedisDep,
    store: StoreDep,
) -> LogitCheckResponse:
    """The latent's decoder row, scaled to its max activation, added at its layer on its top
    contexts: the mean change in log-probabilities through the rest of the model, next to the
    direct path the feature page lists, and how well the two agree."""
    from kestrel.core.sae.records import get_sae

    summary = await asyncio.to_thread(get_sae, store, sae_id)
    summary.require_sae("the logit check")  # it adds the decoder row at the layer the SAE reads
    if latent >= summary.n_latents:
        raise InvalidInputError(
            f"latent {latent} is out of range: sae {sae_id!r} has {summary.n_latents} latents",
            details={"latent": latent, "n_latents": summary.n_latents},
        )
    if request.model is not None:
        services.require_allowed_model(request.model, settings)
    job_id, result = await run_interactive(
        redis,
        settings,
        job_names.LOGIT_CHECK,
        kind="logit_check",
        kwargs={"sae_id": sae_id, "latent": latent, "request": request.model_dump(mode="json")},
    )
    return LogitCheckResponse(**result, job_id=job_id)


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
