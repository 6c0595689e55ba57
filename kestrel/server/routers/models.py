"""Models: what can be loaded, what workers hold, load and unload, and the layer table.

Model names contain '/' (hub ids), so the name is the rest of the path before the action.
A name is a bundled name, a hub id or a server-configured local model; never a path.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Body

from kestrel.schemas import (
    GenerateRequest,
    GenerateResponse,
    LayerTable,
    ModelLoadRequest,
    ModelLoadResult,
    ModelPage,
    ModelUnloadResult,
)
from kestrel.server import services
from kestrel.server.deps import PageDep, RedisDep, SettingsDep, StoreDep
from kestrel.server.dispatch import STILL_RUNNING_RESPONSE, run_interactive
from kestrel.server.errors import error_responses
from kestrel.workers import lifecycle
from kestrel.workers import names as job_names

router = APIRouter(prefix="/models", tags=["models"], responses=error_responses(401, 422, 503))


@router.get("", response_model=ModelPage)
async def list_models(settings: SettingsDep, redis: RedisDep, page: PageDep) -> ModelPage:
    """Bundled and configured models, and which workers have each loaded."""
    rows = await asyncio.to_thread(services.list_models, settings, redis)
    return ModelPage(**page.page(rows))


@router.post(
    "/{name:path}/load",
    response_model=ModelLoadResult,
    responses={**error_responses(404, 424), **STILL_RUNNING_RESPONSE},
)
async def load_model(
    name: str, settings: SettingsDep, redis: RedisDep, body: ModelLoadRequest | None = Body(None)
) -> ModelLoadResult:
    """Load a model into a generate worker's cache (``queue``: or an interactive worker's); every
    worker also loads a model it lacks on first use. A first conversion may outlive the wait: 202."""
    body = body or ModelLoadRequest()
    services.require_allowed_model(name, settings)
    _, result = await run_interactive(
        redis,
        settings,
        job_names.LOAD_MODEL,
        kind="load_model",
        kwargs={"name": name, "device": body.device, "dtype": body.dtype},
        queue_name=body.queue,
    )
    return ModelLoadResult(**result)


@router.post(
    "/{name:path}/unload", response_model=ModelUnloadResult, status_code=202, responses=error_responses(404)
)
async def unload_model(name: str, settings: SettingsDep, redis: RedisDep) -> ModelUnloadResult:
    """Ask every worker to drop the model; they do within a heartbeat (a few seconds)."""
    services.require_allowed_model(name, settings)
    now = time.time()
    await asyncio.to_thread(services.request_unload, redis, name, now, settings)
    return ModelUnloadResult(name=name, requested_at=now)


@router.get(
    "/{name:path}/layers",
    response_model=LayerTable,
    responses={**error_responses(404, 424), **STILL_RUNNING_RESPONSE},
    operation_id="get_model_layers",
)
async def get_layers(name: str, settings: SettingsDep, redis: RedisDep) -> LayerTable:
    """The layer table (names captures and SAEs take), computed once by a worker and cached."""
    services.require_allowed_model(name, settings)
    table = await asyncio.to_thread(services.cached_layer_table, redis, name)
    if table is None:
        _, table = await run_interactive(
            redis, settings, job_names.LAYERS, kind="layers", kwargs={"name": name}
        )
    return LayerTable(**table)


@router.post(
    "/{name:path}/generate",
    response_model=GenerateResponse,
    responses={**error_responses(404, 413, 424), **STILL_RUNNING_RESPONSE},
)
async def generate_text(
    name: str, request: GenerateRequest, settings: SettingsDep, redis: RedisDep, store: StoreDep
) -> GenerateResponse:
    """Continue the prompts; with a steering config (``steering_id`` or inline ``steering``) the default
    and the steered continuations come side by side, same seed, optionally with the SAE's top
    latents at each generated token. Runs on the generate workers, so it never delays an encode;
    one that outlives the wait answers 202 with its job, whose result then holds the generation."""
    kwargs = await asyncio.to_thread(services.prepare_generate, name, request, settings, store)
    job_id, result = await run_interactive(
        redis, settings, job_names.GENERATE, kind="generate", kwargs=kwargs, queue_name=lifecycle.GENERATE
    )
    return GenerateResponse(**result, job_id=job_id)
