"""Exports of an SAE that need the model: its feature pages in Neuronpedia's bulk-import layout
(a batch job, 202), then the stored zip to download."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import FileResponse

from kestrel.core.concepts.config import EXPORT_FILE, NeuronpediaExport, export_rel, neuronpedia_layer_number
from kestrel.core.concepts.store import read_manifest
from kestrel.core.errors import InvalidInputError
from kestrel.core.sae.records import get_sae, require_loadable_model
from kestrel.core.store import new_id
from kestrel.schemas import JobInfo
from kestrel.server.deps import ExportId, IdempotencyKey, RedisDep, SaeId, SettingsDep, StoreDep
from kestrel.server.dispatch import submit_batch
from kestrel.server.errors import error_responses
from kestrel.workers import names as job_names

router = APIRouter(prefix="/saes", tags=["saes"], responses=error_responses(401, 422))


@router.post(
    "/{sae_id}/exports/neuronpedia",
    response_model=JobInfo,
    status_code=202,
    responses=error_responses(404, 409),
)
def start_neuronpedia_export(
    sae_id: SaeId,
    response: Response,
    settings: SettingsDep,
    redis: RedisDep,
    store: StoreDep,
    request: NeuronpediaExport | None = None,
    idempotency_key: IdempotencyKey = None,
) -> JobInfo:
    """The SAE's feature pages (decoder rows, histograms, logit effects, top and binned contexts
    with per-token values, names) as Neuronpedia's bulk-import files, zipped; a batch job whose
    ``artifacts.export_id`` names the zip (``GET /v1/saes/{id}/exports/{export_id}``).

    Needs discovered features (404 naming the fix otherwise). The model reruns each stored context
    for the latent's value at every token."""
    request = request or NeuronpediaExport()
    summary = get_sae(store, sae_id)
    n_latents = summary.n_latents
    read_manifest(store, sae_id)  # 404 naming the fix when nothing is discovered
    require_loadable_model(store, summary)  # the job runs the model: refuse what it cannot load
    neuronpedia_layer_number(summary.model_and_layer()[1])
    outside = sorted({i for i in request.latents or () if not 0 <= i < n_latents})
    if outside:
        raise InvalidInputError(
            f"latents {outside} are out of range: sae {sae_id!r} has {n_latents} latents",
            details={"latents": outside, "n_latents": n_latents},
        )
    export_id = new_id("export")
    return submit_batch(
        redis,
        settings,
        response,
        job_names.NEURONPEDIA_EXPORT,
        kind="export",
        kwargs={"sae_id": sae_id, "request": request.model_dump(mode="json"), "export_id": export_id},
        artifacts={"sae_id": sae_id, "export_id": export_id},
        idempotency_key=idempotency_key,
        request_body={"sae_id": sae_id, **request.model_dump(mode="json")},
    )


@router.get(
    "/{sae_id}/exports/{export_id}",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}}},
        **error_responses(404),
    },
)
def download_export(sae_id: SaeId, export_id: ExportId, store: StoreDep) -> FileResponse:
    """A finished export's zip (404 while its job runs, or for an unknown id)."""
    get_sae(store, sae_id)
    path = store.local_path("saes", sae_id, export_rel(export_id, EXPORT_FILE))
    filename = f"{sae_id}-{export_id}-neuronpedia.zip"
    return FileResponse(path, media_type="application/zip", filename=filename)
