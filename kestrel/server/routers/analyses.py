"""Analyses: start one (202 + job), list, read (manifest + results), the report as Markdown, a plot
as PNG, delete; edit a graph's feature nodes on the real model (interactive). What can be checked
without a model is checked before the job is queued: the run and its layer, the SAE and its latent
range, model names, dataset uploads, request limits, and a graph's nodes."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from kestrel.core.analysis.config import CircuitConfig, GraphConfig
from kestrel.core.analysis.graph_edits import check_intervention
from kestrel.core.analysis.records import AnalysisKind
from kestrel.core.errors import InvalidInputError
from kestrel.core.runs import get_manifest
from kestrel.core.sae.records import get_sae, require_loadable_model, transcoder_blocks
from kestrel.core.store import new_id, validate_id
from kestrel.schemas import (
    AnalysisDetail,
    AnalysisPage,
    AnalysisRequest,
    CausalAnalysisRequest,
    DeletedResponse,
    GraphInterventionRequest,
    GraphInterventionResponse,
    JobInfo,
)
from kestrel.server import services
from kestrel.server.deps import AnalysisId, IdempotencyKey, PageDep, RedisDep, SettingsDep, StoreDep
from kestrel.server.dispatch import STILL_RUNNING_RESPONSE, run_interactive, submit_batch
from kestrel.server.errors import error_responses
from kestrel.settings import Settings
from kestrel.workers import names as job_names

router = APIRouter(prefix="/analyses", tags=["analyses"], responses=error_responses(401, 422))
PlotName = Annotated[
    str,
    Path(
        pattern=r"^[a-z0-9][a-z0-9_-]{0,63}(\.png)?$",
        description="a name from the analysis's `plots` (with or without .png)",
    ),
]
PNG_RESPONSE = {200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}}
MARKDOWN_RESPONSE = {200: {"content": {"text/markdown": {"schema": {"type": "string"}}}}}


def _analysis():
    """The analysis engine, imported when first used (matplotlib, scikit-learn)."""
    from kestrel.core import analysis

    return analysis


@router.post("", response_model=JobInfo, status_code=202, responses=error_responses(404, 409, 413))
def start_analysis(
    request: AnalysisRequest,
    response: Response,
    settings: SettingsDep,
    redis: RedisDep,
    store: StoreDep,
    idempotency_key: IdempotencyKey = None,
) -> JobInfo:
    """Start a neuron, feature, causal, circuit or graph analysis (a batch job); ``artifacts.analysis_id``
    names the result. Its report is at ``/v1/analyses/{id}/report`` once the job finishes."""
    check_request(request, settings, store)
    analysis_id = new_id("analysis")
    body = request.model_dump(mode="json")
    return submit_batch(
        redis,
        settings,
        response,
        job_names.ANALYSIS,
        kind="analysis",
        kwargs={"request": body, "analysis_id": analysis_id},
        artifacts={"analysis_id": analysis_id},
        idempotency_key=idempotency_key,
        request_body=body,
    )


def check_request(request: AnalysisRequest, settings: Settings, store) -> None:
    """Everything a request names that exists without a model: 404 / 422 / 413 before queueing."""
    if request.kind in ("neuron", "feature"):
        get_manifest(store, validate_id(request.run_id, "run id")).layer(request.layer)
    elif isinstance(request, CausalAnalysisRequest):
        _check_causal(request, settings, store)
    elif isinstance(request, CircuitConfig):
        services.require_allowed_model(request.model, settings)
        services.check_texts([text for p in request.pairs for text in (p.clean, p.corrupted)], settings)
        if request.sae_id is not None:  # the SAE whose latents are attributed: 404 before queueing
            summary = get_sae(store, validate_id(request.sae_id, "sae id"))
            summary.require_sae("circuit latent attribution")
            require_loadable_model(store, summary)
    elif isinstance(request, GraphConfig):
        services.require_allowed_model(request.model, settings)
        services.check_texts([request.prompt], settings)
        # 404 for an unknown id; 422 for an SAE that is not a transcoder of a block's MLP, two for
        # one block, or another model's: the worker's own check (`transcoder_blocks`), up front
        summaries = [get_sae(store, validate_id(sae_id, "sae id")) for sae_id in request.transcoders]
        transcoder_blocks(summaries, request.model)


def _check_causal(request: CausalAnalysisRequest, settings: Settings, store) -> None:
    services.require_allowed_model(request.model, settings)
    services.check_dataset(request.dataset, settings, store)
    services.check_max_length(request.max_length, settings, "max_length")
    if request.sae_id is not None:
        summary = get_sae(store, validate_id(request.sae_id, "sae id"))
        require_loadable_model(store, summary)
        n_latents = summary.n_latents
        bad = [latent for latent in request.latents or [] if latent >= n_latents]
        if bad:
            raise InvalidInputError(
                f"latents {bad} are out of range: sae {request.sae_id!r} has {n_latents} latents",
                details={"sae_id": request.sae_id, "n_latents": n_latents, "latents": bad},
            )


# Manifests are answered as stored (response_model_exclude_unset): a field the file lacks is
# left out, not sent as null.
@router.get("", response_model=AnalysisPage, response_model_exclude_unset=True)
async def list_analyses(
    store: StoreDep,
    page: PageDep,
    kind: Annotated[AnalysisKind | None, Query(description="only this kind")] = None,
) -> AnalysisPage:
    """Complete analyses, newest first (a running or cancelled one is not listed)."""
    manifests = await asyncio.to_thread(_analysis().list_analyses, store)
    rows = [m for m in manifests if kind is None or m.kind == kind]
    return AnalysisPage(**page.page(rows))


@router.get(
    "/{analysis_id}",
    response_model=AnalysisDetail,
    response_model_exclude_unset=True,
    responses=error_responses(404),
)
async def get_analysis(analysis_id: AnalysisId, store: StoreDep) -> AnalysisDetail:
    """The manifest (source, config, key numbers, plot names) and every result."""
    a = _analysis()
    manifest = await asyncio.to_thread(a.get_analysis, store, analysis_id)
    results = await asyncio.to_thread(a.get_results, store, analysis_id)
    return AnalysisDetail(**manifest.to_json(), results=results)


@router.get(
    "/{analysis_id}/report",
    response_class=Response,
    responses={**MARKDOWN_RESPONSE, **error_responses(404)},
)
async def get_analysis_report(analysis_id: AnalysisId, store: StoreDep) -> Response:
    """The report as Markdown; its plots are linked as ``plots/<name>.png``, relative to this URL's
    directory, so they resolve to ``/v1/analyses/{id}/plots/<name>.png``."""
    path = await asyncio.to_thread(_analysis().report_path, store, analysis_id)
    text = await asyncio.to_thread(path.read_text, encoding="utf-8")
    return Response(text, media_type="text/markdown; charset=utf-8")


@router.get(
    "/{analysis_id}/plots/{name}",
    response_class=Response,
    responses={**PNG_RESPONSE, **error_responses(404)},
)
async def get_analysis_plot(analysis_id: AnalysisId, name: PlotName, store: StoreDep) -> Response:
    """One plot as PNG; a name the analysis does not have is a 404 listing the ones it has."""
    path = await asyncio.to_thread(_analysis().plot_path, store, analysis_id, name)
    return Response(await asyncio.to_thread(path.read_bytes), media_type="image/png")


@router.post(
    "/{analysis_id}/graph/interventions",
    response_model=GraphInterventionResponse,
    responses={**error_responses(404, 409, 424, 503), **STILL_RUNNING_RESPONSE},
)
async def intervene_graph(
    analysis_id: AnalysisId,
    request: GraphInterventionRequest,
    settings: SettingsDep,
    redis: RedisDep,
    store: StoreDep,
) -> GraphInterventionResponse:
    """Scale or set feature nodes of a graph analysis at their positions and run the real model
    (the transcoder's error term kept, every later layer live): the target token's logit and
    probability and the top next tokens before and after, greedy continuations if asked, and each
    feature's activation before and after. 404 for an unknown analysis; 422 for one that is not a
    graph, or a node that is not one of its feature nodes; 409 when its transcoder was deleted."""
    checked = await asyncio.to_thread(check_intervention, store, analysis_id, request)
    services.require_allowed_model(checked.model, settings)
    job_id, result = await run_interactive(
        redis,
        settings,
        job_names.GRAPH_INTERVENTION,
        kind="graph_intervention",
        kwargs={"analysis_id": analysis_id, "request": request.model_dump(mode="json")},
    )
    return GraphInterventionResponse(**result, job_id=job_id)


@router.delete("/{analysis_id}", response_model=DeletedResponse, responses=error_responses(404))
async def delete_analysis(analysis_id: AnalysisId, store: StoreDep) -> DeletedResponse:
    await asyncio.to_thread(_analysis().delete_analysis, store, analysis_id)
    return DeletedResponse(id=analysis_id)
