"""Features of an SAE: start a discovery (202 + job), list and search latents, one latent's page."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response

from kestrel.schemas import DiscoverRequest, FeatureDetail, FeaturePage, JobInfo
from kestrel.server import services
from kestrel.server.deps import IdempotencyKey, Latent, PageDep, RedisDep, SaeId, SettingsDep, StoreDep
from kestrel.server.dispatch import submit_batch
from kestrel.server.errors import error_responses
from kestrel.workers import names as job_names

router = APIRouter(prefix="/saes", tags=["features"], responses=error_responses(401, 422))


def _concepts():
    """The concepts engine, imported when first used."""
    from kestrel.core import concepts

    return concepts


@router.post(
    "/{sae_id}/features/discover",
    response_model=JobInfo,
    status_code=202,
    responses=error_responses(404, 409, 413),
)
def start_discovery(
    sae_id: SaeId,
    response: Response,
    settings: SettingsDep,
    redis: RedisDep,
    store: StoreDep,
    request: DiscoverRequest | None = None,
    idempotency_key: IdempotencyKey = None,
) -> JobInfo:
    """Each latent's top contexts, binned samples, density, histogram and logit effects (a batch job).

    Over the SAE's own run by default (no forward), or a run or dataset of your choice. A re-run
    replaces the result whole; names in the dictionary are kept.
    """
    request = request or DiscoverRequest()
    kwargs = services.prepare_discovery(sae_id, request, settings, store)
    return submit_batch(
        redis,
        settings,
        response,
        job_names.DISCOVER,
        kind="discover",
        kwargs=kwargs,
        artifacts={"sae_id": sae_id},
        idempotency_key=idempotency_key,
        request_body={"sae_id": sae_id, **request.model_dump(mode="json")},
    )


@router.get("/{sae_id}/features", response_model=FeaturePage, responses=error_responses(404))
async def list_features(
    sae_id: SaeId,
    store: StoreDep,
    page: PageDep,
    search: Annotated[
        str | None, Query(max_length=200, description="in names, tags, top and promoted tokens")
    ] = None,
    source: Annotated[
        Literal["manual", "heuristic", "model"] | None, Query(description="label source")
    ] = None,
    sort: Annotated[
        Literal["latent", "density", "max_activation", "detection", "fuzz", "embedding"],
        Query(description="a statistic, or a label score (best first, unscored last)"),
    ] = "latent",
    include_dead: Annotated[bool, Query(description="list latents that never fired")] = True,
    min_detection: Annotated[float | None, Query(ge=0, le=1, description="detection score at least")] = None,
    min_fuzz: Annotated[float | None, Query(ge=0, le=1, description="fuzzing score at least")] = None,
    min_embedding: Annotated[float | None, Query(ge=0, le=1, description="embedding score at least")] = None,
) -> FeaturePage:
    """Latents with their statistics, top tokens and names; searchable by name or label, sortable
    and filterable by their labels' scores."""
    minimum = {"detection": min_detection, "fuzz": min_fuzz, "embedding": min_embedding}
    listing = await asyncio.to_thread(
        _concepts().list_features,
        store,
        sae_id,
        search=search,
        source=source,
        include_dead=include_dead,
        sort=sort,
        min_score={name: value for name, value in minimum.items() if value is not None},
        offset=page.offset,
        limit=page.limit,
    )
    return FeaturePage(**listing)


@router.get("/{sae_id}/features/{latent}", response_model=FeatureDetail, responses=error_responses(404))
async def get_feature(sae_id: SaeId, latent: Latent, store: StoreDep) -> FeatureDetail:
    """One latent's page: statistics, histogram, top contexts, bin samples, logit effects, name."""
    return FeatureDetail(**await asyncio.to_thread(_concepts().feature_page, store, sae_id, latent))
