"""SAEs: train (202 + job), list, read, delete, download, import (SAELens, sparsify, Kestrel), evaluate,
encode."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Response, UploadFile
from redis import Redis

from kestrel.core import uploads
from kestrel.core.errors import ConflictError, InvalidInputError, KestrelError, NotFoundError
from kestrel.core.limits import Caps
from kestrel.core.sae import ledger_records, records
from kestrel.core.sae.filesets import LAYOUTS, files_from_zip
from kestrel.core.store import new_id, validate_id
from kestrel.schemas import (
    TERMINAL_STATES,
    DeletedResponse,
    EncodeRequest,
    EncodeResponse,
    EvaluateRequest,
    JobInfo,
    SAEFormat,
    SAEHistory,
    SAEImportFormat,
    SAEManifest,
    SAEPage,
    TrainRequest,
)
from kestrel.schemas.saes import LedgerRequest, SAEComparison, SAELedger
from kestrel.server import services, stream_training
from kestrel.server.deps import IdempotencyKey, PageDep, RedisDep, SaeId, SettingsDep, StoreDep
from kestrel.server.dispatch import STILL_RUNNING_RESPONSE, run_interactive, submit_batch
from kestrel.server.errors import error_responses, limit_exceeded
from kestrel.settings import Settings
from kestrel.workers import lifecycle
from kestrel.workers import names as job_names

router = APIRouter(prefix="/saes", tags=["saes"], responses=error_responses(401, 422))
MAX_CFG_BYTES = 1 << 20


def _artifacts():
    """The SAE engine, imported when first used (torch): only the SAELens import and the download
    need it; every other route reads the store (`kestrel.core.sae.records`)."""
    from kestrel.core.sae import artifacts

    return artifacts


@router.post("", response_model=JobInfo, status_code=202, responses=error_responses(404, 409))
def start_training(
    request: TrainRequest,
    response: Response,
    settings: SettingsDep,
    redis: RedisDep,
    store: StoreDep,
    idempotency_key: IdempotencyKey = None,
) -> JobInfo:
    """Train an SAE on one layer of a run (or resume a cancelled one); ``artifacts.sae_id`` names it.

    With ``dataset`` and ``saes``: one job trains every SAE from one pass of the model
    (``artifacts.sae_ids``, and ``artifacts.run_id`` when ``spill`` stores the pass)."""
    original = None
    if request.resume_from is not None:
        resumed = validate_id(request.resume_from, "SAE id")
        _refuse_while_training(redis, resumed)
        original = stream_training.stream_original(redis, resumed)
    if original is not None or stream_training.is_stream_request(request):
        if original is not None:
            kwargs = stream_training.prepare_stream_resume(request, original, store, settings)
        else:
            kwargs = stream_training.prepare_stream_training(request, store, settings)
        func, artifacts = job_names.TRAIN_STREAM, stream_training.job_artifacts(kwargs)
    else:
        kwargs = services.training_job_kwargs(request, redis, store, settings)
        func, artifacts = job_names.TRAIN, {"sae_id": kwargs["sae_id"], "run_id": kwargs["run_id"]}
    info = submit_batch(
        redis,
        settings,
        response,
        func,
        kind="train",
        kwargs=kwargs,
        artifacts=artifacts,
        idempotency_key=idempotency_key,
        request_body=request.model_dump(mode="json"),
    )
    lifecycle.remember_sae_job(redis, _trained_ids(info), info.id)
    if original is None and stream_training.is_stream_request(request):  # after the job exists
        stream_training.remember_request(redis, kwargs["request"], _trained_ids(info))
    return info


def _refuse_while_training(redis: Redis, sae_id: str) -> None:
    """409 while the job that trains ``sae_id`` runs: its checkpoint is still being written (a
    stream job stops one SAE but trains the others on, holding every SAE's checkpoints)."""
    job_id = lifecycle.sae_job(redis, sae_id)
    if job_id is None:
        return
    with contextlib.suppress(NotFoundError):  # the job has expired: nothing is training it
        job = lifecycle.describe(lifecycle.fetch(redis, job_id))
        if job.status not in TERMINAL_STATES:
            raise ConflictError(
                f"SAE {sae_id!r} is still held by its training job {job_id!r} ({job.status}); "
                "resume it once that job has ended",
                details={"id": sae_id, "job_id": job_id, "status": job.status},
            )


def _trained_ids(info: JobInfo) -> list[str]:
    """The SAE ids a training job makes, from its artifacts (a replayed Idempotency-Key answers
    the first job, whose ids differ from the kwargs prepared for the replay)."""
    artifacts = info.artifacts or {}
    many = artifacts.get("sae_ids")
    one = artifacts.get("sae_id")
    return list(many) if isinstance(many, list) else [one] if isinstance(one, str) else []


@router.post("/{sae_id}/cancel", response_model=JobInfo, status_code=202, responses=error_responses(404, 409))
def cancel_training(sae_id: SaeId, redis: RedisDep, store: StoreDep) -> JobInfo:
    """Stop the training of one SAE, keeping its checkpoint (``resume_from`` continues it).

    A stream job goes on training its other SAEs (the answer is that job, still running); the
    job of a single SAE is cancelled as ``POST /v1/jobs/{id}/cancel`` would. 409 once the SAE's
    job has ended."""
    if store.exists("saes", sae_id):  # published (a stream job may still train its others)
        raise ConflictError(f"SAE {sae_id!r} finished training already", details={"id": sae_id})
    job_id = lifecycle.sae_job(redis, sae_id)
    if job_id is None:
        raise NotFoundError(f"no training of SAE {sae_id!r} is known", details={"id": sae_id})
    job = lifecycle.describe(lifecycle.fetch(redis, job_id))
    if len(_trained_ids(job)) > 1:
        return lifecycle.cancel_part(redis, job_id, sae_id)
    return lifecycle.cancel(redis, job_id)


# Declared before "/{sae_id}": a path matches the first route that fits.
@router.get("/compare", response_model=SAEComparison, responses=error_responses(404))
async def compare_saes(
    store: StoreDep,
    ids: Annotated[str, Query(min_length=1, description="comma-separated SAE ids, in display order")],
) -> SAEComparison:
    """Several SAEs side by side: each ledger's figures (or the stored held-out metrics of an SAE
    without one), with the L0-vs-FVU Pareto front marked."""
    sae_ids = [part.strip() for part in ids.split(",") if part.strip()]
    rows = await asyncio.to_thread(ledger_records.compare_saes, store, sae_ids)
    return SAEComparison(rows=rows)


# Manifests are answered as stored (response_model_exclude_unset): a field the file lacks is
# left out, not sent as null.
@router.get("", response_model=SAEPage, response_model_exclude_unset=True)
async def list_saes(store: StoreDep, page: PageDep) -> SAEPage:
    """Complete SAEs (a training in progress or cancelled is not listed)."""
    rows = await asyncio.to_thread(records.list_saes, store)
    return SAEPage(**page.page(rows))


@router.get(
    "/{sae_id}",
    response_model=SAEManifest,
    response_model_exclude_unset=True,
    responses=error_responses(404),
)
def get_sae(sae_id: SaeId, store: StoreDep) -> SAEManifest:
    """Config and metrics of one SAE."""
    return records.get_sae(store, sae_id)


@router.delete("/{sae_id}", response_model=DeletedResponse, responses=error_responses(404))
def delete_sae(sae_id: SaeId, store: StoreDep) -> DeletedResponse:
    records.delete_sae(store, sae_id)
    return DeletedResponse(id=sae_id)


@router.get(
    "/{sae_id}/download",
    response_class=Response,
    responses={
        200: {"content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}}},
        **error_responses(404),
    },
)
def download_sae(
    sae_id: SaeId,
    store: StoreDep,
    format: Annotated[SAEFormat, Query(description="kestrel, saelens or sparsify file layout")] = "kestrel",
) -> Response:
    """A zip of the SAE's files, in Kestrel's layout, SAELens's (cfg.json + sae_weights.safetensors,
    6.x metadata naming the model's Hugging Face id) or sparsify's (cfg.json + sae.safetensors)."""
    data = _artifacts().export_sae_zip(store, sae_id, format)
    headers = {"Content-Disposition": f'attachment; filename="{sae_id}-{format}.zip"'}
    return Response(data, media_type="application/zip", headers=headers)


@router.post(
    "/import",
    response_model=SAEManifest,
    response_model_exclude_unset=True,
    status_code=201,
    responses=error_responses(413),
)
async def import_saelens_sae(  # the operation id SDKs know it by (it predates other layouts)
    settings: SettingsDep,
    store: StoreDep,
    archive: Annotated[
        UploadFile | None,
        File(
            description="a zip of the SAE's files, whose names say the layout: Kestrel's own download "
            "(config.json + weights.safetensors), SAELens's (cfg.json + sae_weights.safetensors, with "
            "activation_scaler.json if it has one) or sparsify's (cfg.json + sae.safetensors)"
        ),
    ] = None,
    cfg: Annotated[UploadFile | None, File(description="the config file, instead of a zip")] = None,
    weights: Annotated[UploadFile | None, File(description="the .safetensors weights, with cfg")] = None,
    format: Annotated[SAEImportFormat, Form(description="layout of cfg + weights")] = "saelens",
    model: Annotated[str | None, Form(description="model it reads, if the config does not say")] = None,
    layer: Annotated[str | None, Form(description="layer (module path) it reads")] = None,
    norm_scaling_factor: Annotated[
        float | None,
        Form(
            gt=0,
            allow_inf_nan=False,
            description="SAELens normalize_activations='expected_average_only_in': the factor the SAE's "
            "inputs were scaled by (folded into the weights); read from activation_scaler.json when the "
            "zip has one",
        ),
    ] = None,
) -> SAEManifest:
    """Import an SAE saved by SAELens, sparsify or another Kestrel; it gets a new id and is listed
    like a trained one. What its files mean is folded into the weights, or the import is refused
    (422) saying what Kestrel cannot reproduce; nothing is stored unless everything checks out."""
    if model is not None:
        services.require_allowed_model(model, settings)
    files = await _import_files(archive, cfg, weights, format, settings)
    try:
        summary = await asyncio.to_thread(
            _artifacts().import_sae_files,
            store,
            files,
            sae_id=new_id("sae"),
            model=model,
            layer=layer,
            caps=Caps.of(settings),
            norm_scaling_factor=norm_scaling_factor,
        )
    except KestrelError:
        raise
    except Exception as exc:  # client files that parse but do not make an SAE: the client's 422
        raise InvalidInputError(f"could not import the SAE's files: {type(exc).__name__}: {exc}") from exc
    return summary


async def _import_files(
    archive: UploadFile | None,
    cfg: UploadFile | None,
    weights: UploadFile | None,
    layout: str,
    settings: Settings,
) -> dict[str, bytes]:
    """The file set of an import: a zip's files, or the two uploads under their layout's names."""
    if archive is not None:
        if cfg is not None or weights is not None:
            raise InvalidInputError("send either a zip (archive) or cfg + weights, not both")
        data = await _read_limited(archive, settings.max_upload_bytes, "archive", settings)
        return await asyncio.to_thread(files_from_zip, data, max_bytes=settings.max_upload_bytes)
    if cfg is None or weights is None:
        raise InvalidInputError(
            "send the SAE as a zip (archive) or as two files (cfg + weights)",
            details={"missing": [name for name, f in (("cfg", cfg), ("weights", weights)) if f is None]},
        )
    cfg_bytes = await _read_limited(cfg, MAX_CFG_BYTES, "cfg.json", settings)
    weight_bytes = await _read_limited(weights, settings.max_upload_bytes, "weights", settings)
    _check_weights(weights.filename or "", weight_bytes)
    config_name, weights_name = LAYOUTS[layout]  # the names the two uploads stand for
    return {config_name: cfg_bytes, weights_name: weight_bytes}


async def _read_limited(file: UploadFile, max_bytes: int, what: str, settings: Settings) -> bytes:
    data = await file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise limit_exceeded(
            "max_upload_mb", settings.max_upload_mb, round(len(data) / 2**20, 2), f"{what} too large"
        )
    return data


def _check_weights(filename: str, data: bytes) -> None:
    """Weights are safetensors only (no pickle): checked by name and by header before parsing."""
    if uploads.upload_format(filename or "weights.safetensors") != "safetensors":
        raise InvalidInputError("SAE weights must be a .safetensors file (pickle is never read)")
    uploads.check_safetensors(data)


@router.post(
    "/{sae_id}/evaluate",
    response_model=JobInfo,
    status_code=202,
    responses=error_responses(404, 409, 413),
)
def start_evaluation(
    sae_id: SaeId,
    response: Response,
    settings: SettingsDep,
    redis: RedisDep,
    store: StoreDep,
    request: EvaluateRequest | None = None,
    idempotency_key: IdempotencyKey = None,
) -> JobInfo:
    """Model-in-the-loop metrics (CE loss recovered, ...), stored with the SAE."""
    request = request or EvaluateRequest()
    records.get_sae(store, sae_id).require_sae("model-in-the-loop evaluation")
    if request.texts is not None:
        services.check_texts(request.texts, settings)
    return submit_batch(
        redis,
        settings,
        response,
        job_names.EVALUATE,
        kind="evaluate",
        kwargs={"sae_id": sae_id, "texts": request.texts},
        artifacts={"sae_id": sae_id},
        idempotency_key=idempotency_key,
        request_body={"sae_id": sae_id, **request.model_dump(mode="json")},
    )


@router.post(
    "/{sae_id}/encode",
    response_model=EncodeResponse,
    responses={**error_responses(404, 413, 424), **STILL_RUNNING_RESPONSE},
)
async def encode_text(
    sae_id: SaeId, request: EncodeRequest, settings: SettingsDep, redis: RedisDep, store: StoreDep
) -> EncodeResponse:
    """The top latents of each token of a prompt (interactive: answered in about a forward pass)."""
    services.check_texts([request.text], settings)
    services.check_top_k(request.top_k, settings)
    summary = await asyncio.to_thread(records.get_sae, store, sae_id)
    # an imported SAE without a model: 422 before any job; a transcoder's input (MODULE:input) is
    # hooked as capture hooks it, and only its encoder runs
    summary.model_and_layer()
    job_id, result = await run_interactive(
        redis,
        settings,
        job_names.ENCODE,
        kind="encode",
        kwargs={"sae_id": sae_id, "text": request.text, "top_k": request.top_k},
    )
    return EncodeResponse(**result, job_id=job_id)


@router.get("/{sae_id}/history", response_model=SAEHistory, responses=error_responses(404))
async def get_sae_history(sae_id: SaeId, store: StoreDep) -> SAEHistory:
    """The training curves: loss, FVU, L0 and dead fraction at each log step, against tokens."""
    points = await asyncio.to_thread(records.training_history, store, sae_id)
    return SAEHistory(sae_id=sae_id, points=points)


# ---------------------------------------------------------------------------------------------
# Evaluation ledger and comparison (issue 14)


@router.post(
    "/{sae_id}/ledger",
    response_model=JobInfo,
    status_code=202,
    responses=error_responses(404, 409, 413),
)
def start_ledger(
    sae_id: SaeId,
    response: Response,
    settings: SettingsDep,
    redis: RedisDep,
    store: StoreDep,
    request: LedgerRequest | None = None,
    idempotency_key: IdempotencyKey = None,
) -> JobInfo:
    """Compute the SAE's evaluation ledger (a batch job): core metrics, k-sparse probing on the
    labelled ``dataset``, first-letter absorption and synthetic ground-truth recovery, each with
    its chance baseline; ``GET .../ledger`` reads it. Everything checkable is checked first."""
    request = request or LedgerRequest()
    summary = records.get_sae(store, sae_id)
    summary.require_sae("the evaluation ledger")  # its metrics splice it in at the layer it reads
    summary.model_and_layer()  # an import that names no model: 422 before any job
    records.require_loadable_model(store, summary)
    if request.dataset is not None:  # classes, sizes, columns, the texts' limits: 422 now
        texts, _ = ledger_records.resolve_labelled(store, request.dataset, request.options.test_fraction)
        services.check_texts(texts, settings)
    elif not (summary.run_id and store.exists("activations", summary.run_id)):
        raise InvalidInputError(
            f"sae {sae_id!r} has no capture run to evaluate on: give a labelled dataset",
            details={"sae_id": sae_id},
        )
    services.check_max_length(request.options.max_length, settings, "options.max_length")
    body = request.model_dump(mode="json")
    return submit_batch(
        redis,
        settings,
        response,
        job_names.LEDGER,
        kind="ledger",
        kwargs={"sae_id": sae_id, "options": body["options"], "dataset": body["dataset"]},
        artifacts={"sae_id": sae_id},
        idempotency_key=idempotency_key,
        request_body={"sae_id": sae_id, **body},
    )


@router.get("/{sae_id}/ledger", response_model=SAELedger, responses=error_responses(404))
async def get_ledger(sae_id: SaeId, store: StoreDep) -> SAELedger:
    """The SAE's evaluation ledger as last computed (404 until one is)."""
    ledger = await asyncio.to_thread(ledger_records.read_ledger, store, sae_id)
    if ledger is None:
        raise NotFoundError(
            f"sae {sae_id!r} has no ledger yet; compute one with POST /v1/saes/{sae_id}/ledger",
            details={"sae_id": sae_id},
        )
    return SAELedger.model_validate(ledger)
