"""The concept dictionary of an SAE: names per latent, read and written; JSON/CSV import and export;
automatic labels (a batch job)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal, get_args

from fastapi import APIRouter, File, Form, Query, Response, UploadFile

from kestrel.core.concepts.dictionary import DictionaryFormat, ScoreName, score_key, scores_at_least
from kestrel.core.errors import InvalidInputError
from kestrel.core.store import Store
from kestrel.schemas import (
    ConceptImportResult,
    ConceptInput,
    ConceptPage,
    DeletedResponse,
    FeatureConcept,
    JobInfo,
    LabelRequest,
)
from kestrel.server.deps import IdempotencyKey, Latent, PageDep, RedisDep, SaeId, SettingsDep, StoreDep
from kestrel.server.dispatch import submit_batch
from kestrel.server.errors import error_responses, limit_exceeded
from kestrel.settings import Settings
from kestrel.workers import names as job_names

router = APIRouter(prefix="/saes", tags=["concepts"], responses=error_responses(401, 422))
MAX_DICTIONARY_BYTES = 16 << 20
MEDIA_TYPES = {"json": "application/json", "csv": "text/csv"}


def _dictionary():
    from kestrel.core.concepts import dictionary

    return dictionary


@router.get("/{sae_id}/concepts", response_model=ConceptPage, responses=error_responses(404))
async def list_concepts(
    sae_id: SaeId,
    store: StoreDep,
    page: PageDep,
    sort: Annotated[
        Literal["latent"] | ScoreName, Query(description="by index, or by a label score (best first)")
    ] = "latent",
    min_detection: Annotated[float | None, Query(ge=0, le=1, description="detection score at least")] = None,
    min_fuzz: Annotated[float | None, Query(ge=0, le=1, description="fuzzing score at least")] = None,
    min_embedding: Annotated[float | None, Query(ge=0, le=1, description="embedding score at least")] = None,
) -> ConceptPage:
    """Every named latent, by index or by score; filtered by minimum scores (unscored: left out)."""
    d = _dictionary()
    concepts = await asyncio.to_thread(d.read_dictionary, store, sae_id)
    n_latents = await asyncio.to_thread(d.sae_latent_count, store, sae_id)
    given = {"detection": min_detection, "fuzz": min_fuzz, "embedding": min_embedding}
    minimum = {name: value for name, value in given.items() if value is not None}
    rows = [concepts[i] for i in sorted(concepts) if scores_at_least(concepts[i], minimum)]
    if sort != "latent":
        rows.sort(key=lambda c: score_key(c, sort), reverse=True)
    items = [FeatureConcept(**c.model_dump()) for c in rows]
    return ConceptPage(**page.page(items), sae_id=sae_id, n_latents=n_latents)


@router.get(
    "/{sae_id}/concepts/export",
    response_class=Response,
    responses={
        200: {"content": {"application/json": {}, "text/csv": {"schema": {"type": "string"}}}},
        **error_responses(404),
    },
)
async def download_concepts(
    sae_id: SaeId,
    store: StoreDep,
    format: Annotated[DictionaryFormat, Query(description="json or csv")] = "json",
) -> Response:
    """The dictionary as a JSON or CSV file (the formats import reads)."""
    text = await asyncio.to_thread(_dictionary().export_dictionary, store, sae_id, format)
    headers = {"Content-Disposition": f'attachment; filename="{sae_id}-concepts.{format}"'}
    return Response(text, media_type=MEDIA_TYPES[format], headers=headers)


@router.post(
    "/{sae_id}/concepts/import", response_model=ConceptImportResult, responses=error_responses(404, 413)
)
async def import_concepts(
    sae_id: SaeId,
    settings: SettingsDep,
    store: StoreDep,
    file: Annotated[UploadFile, File(description="a .json or .csv dictionary")],
    format: Annotated[
        DictionaryFormat | None, Form(description="json or csv [default: from the name]")
    ] = None,
    replace: Annotated[bool, Form(description="drop names not in the file")] = False,
) -> ConceptImportResult:
    """Import names, validated whole against the SAE (index range, duplicates, latent count);
    a bad file is a 422 naming the line or key, and changes nothing."""
    data = await file.read(MAX_DICTIONARY_BYTES + 1)
    if len(data) > MAX_DICTIONARY_BYTES:
        raise limit_exceeded(
            "dictionary_mb", MAX_DICTIONARY_BYTES >> 20, round(len(data) / 2**20, 2), "too large"
        )
    fmt = format or _format_from_name(file.filename or "")
    result = await asyncio.to_thread(
        _dictionary().import_dictionary, store, sae_id, data, fmt, replace=replace
    )
    return ConceptImportResult(**result)


def _format_from_name(filename: str) -> DictionaryFormat:
    suffix = filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
    if suffix not in get_args(DictionaryFormat):
        raise InvalidInputError(f"cannot tell the format of {filename!r}; send format=json or format=csv")
    return suffix  # type: ignore[return-value]


@router.post(
    "/{sae_id}/concepts/label",
    response_model=JobInfo,
    status_code=202,
    responses=error_responses(404, 409),
)
def start_labelling(
    sae_id: SaeId,
    response: Response,
    settings: SettingsDep,
    redis: RedisDep,
    store: StoreDep,
    request: LabelRequest | None = None,
    idempotency_key: IdempotencyKey = None,
) -> JobInfo:
    """Automatic names (a batch job): heuristic from tokens and logit effects, or by the model itself.
    Manual names are kept unless ``overwrite``. With ``score``, each name (manual ones too) is then
    scored by ``scorer`` on examples from the run that the labeller never saw."""
    from kestrel.core.concepts.store import read_manifest

    request = request or LabelRequest()
    read_manifest(store, sae_id)  # 404 naming discovery when there is nothing to label from
    check_label_sources(store, settings, sae_id, request)
    return submit_batch(
        redis,
        settings,
        response,
        job_names.LABEL,
        kind="label",
        kwargs={"sae_id": sae_id, **request.model_dump()},
        artifacts={"sae_id": sae_id},
        idempotency_key=idempotency_key,
        request_body={"sae_id": sae_id, **request.model_dump(mode="json")},
    )


def check_label_sources(store: Store, settings: Settings, sae_id: str, request: LabelRequest) -> None:
    """What the label job would load, checked from manifests (no torch) so a request that can only
    fail is a 4xx now, not a failed job after a model load: the labelling and scoring models
    (named, allowed, loadable) and the run the scoring examples come from (the SAE's layer, its width)."""
    from kestrel.core.concepts.config import scoring_run
    from kestrel.core.sae.records import get_sae, require_loadable_model
    from kestrel.server import services

    summary = get_sae(store, sae_id)
    if request.scorer is not None:
        services.require_allowed_model(request.scorer, settings)
    needs_sae_model = request.method == "model" or (request.score and request.scorer is None)
    if needs_sae_model:
        if not summary.model_name:
            raise InvalidInputError(
                f"sae {sae_id!r} does not record the model it reads: give a scorer to score with"
                if request.method != "model"
                else f"sae {sae_id!r} does not record the model it reads, so it cannot name its latents "
                "(use method: heuristic)",
                details={"sae_id": sae_id, "method": request.method, "scorer": request.scorer},
            )
        require_loadable_model(store, summary)
    if request.score:
        scoring_run(store, summary, request.run_id)


@router.get("/{sae_id}/concepts/{latent}", response_model=FeatureConcept, responses=error_responses(404))
async def get_concept(sae_id: SaeId, latent: Latent, store: StoreDep) -> FeatureConcept:
    concept = await asyncio.to_thread(_dictionary().get_concept, store, sae_id, latent)
    return FeatureConcept(**concept.model_dump())


@router.put("/{sae_id}/concepts/{latent}", response_model=FeatureConcept, responses=error_responses(404))
async def update_concept(
    sae_id: SaeId, latent: Latent, body: ConceptInput, store: StoreDep
) -> FeatureConcept:
    """Name a latent (source ``manual``); an index out of the SAE's range is a 422."""
    d = _dictionary()
    concept = d.Concept(latent=latent, **body.model_dump(), source="manual")
    written = await asyncio.to_thread(d.update_concepts, store, sae_id, [concept])
    return FeatureConcept(**written[latent].model_dump())


@router.delete("/{sae_id}/concepts/{latent}", response_model=DeletedResponse, responses=error_responses(404))
async def delete_concept(sae_id: SaeId, latent: Latent, store: StoreDep) -> DeletedResponse:
    await asyncio.to_thread(_dictionary().delete_concept, store, sae_id, latent)
    return DeletedResponse(id=f"{sae_id}/{latent}")
