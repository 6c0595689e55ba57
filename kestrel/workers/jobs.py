"""Job functions: parse the arguments, call the engine, report progress, return artifact ids.

Each runs inside a worker (``kestrel worker``) through ``job_function``, which supplies the
``JobContext`` (store, model cache, progress, stop flag) and turns exceptions into the job's
public error. Arguments are plain JSON-able dicts validated again with the API's schemas, so a job
enqueued by an older API or by hand fails with a clear message instead of half-running.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kestrel.core import hub, limits, uploads
from kestrel.core.datasets import HFSource, TextsSource
from kestrel.core.errors import InvalidInputError
from kestrel.core.limits import Caps
from kestrel.core.sae.progress import TrainingPoint
from kestrel.core.sae.records import SAEManifest, checkpoint_dir
from kestrel.schemas import (
    CaptureRequest,
    DiscoverRequest,
    HubDatasetSource,
    SAEHyperparameters,
    UploadSource,
)
from kestrel.workers.context import JobContext, job_function
from kestrel.workers.lifecycle import LAYERS_KEY

LOG_EVERY_S = 5.0
LAYERS_CACHE_TTL_S = 30 * 24 * 3600


# ---------------------------------------------------------------------------------------------
# Models


@job_function("load_model")
def load_model_job(
    ctx: JobContext, name: str, device: str | None = None, dtype: str = "fp32"
) -> dict[str, Any]:
    """Load into this worker's cache, saying which stage it is in (``kestrel up`` prints it)."""
    from kestrel.core.models import needs_conversion

    if needs_conversion(name, ctx.models.store_root):
        stage = f"converting the bundled {name} weights to safetensors (once per store, ~30 s on a CPU)"
    else:
        stage = f"loading {name}"
    ctx.update(progress=0.1, message=stage, force=True)
    ctx.log(stage, force=True)
    lm = ctx.models.get(name, device=device, dtype=dtype)
    ctx.log(f"{name} loaded on {lm.placement_label} in {lm.load_seconds:.1f} s", force=True)
    worker = ctx.job.worker_name if ctx.job is not None else ""
    return {
        "name": name,
        "worker": worker or "",
        "device": lm.placement_label,
        "dtype": dtype,
        "load_seconds": round(lm.load_seconds, 3),
        "d_model": lm.d_model,
        "n_blocks": lm.n_blocks,
    }


@job_function("layers")
def layers_job(ctx: JobContext, name: str) -> dict[str, Any]:
    """The layer table, cached in Redis: it never changes for a given model name."""
    lm = ctx.models.get(name)
    table = {"model": name, "layers": [asdict(info) for info in lm.layers]}
    if ctx.job is not None:
        ctx.job.connection.set(LAYERS_KEY.format(name), json.dumps(table), ex=LAYERS_CACHE_TTL_S)
    return table


@job_function("ping")
def ping_job(ctx: JobContext, payload: str = "") -> dict[str, Any]:
    """A job that does nothing but the bookkeeping every job does: measures the queue itself
    (bench/api.py) and checks that a worker takes jobs."""
    return {"pong": payload}


# ---------------------------------------------------------------------------------------------
# Capture


def engine_source(ctx: JobContext, dataset: TextsSource | UploadSource | HubDatasetSource):
    """The engine's source for a request's dataset; only here does an upload id become a path."""
    if isinstance(dataset, UploadSource):
        return uploads.upload_file_source(ctx.store, dataset.upload_id, dataset)
    if isinstance(dataset, HubDatasetSource):
        if Path(dataset.name).expanduser().exists():
            raise InvalidInputError(
                f"dataset {dataset.name!r} names a path on the worker; refusing to read it"
            )
        hub.check_allowed(dataset.name, "dataset", ctx.settings.allowed_datasets)
        if not hub.is_cached(dataset.name, "dataset"):  # offline or no answer: 424 now, not later
            hub.require_reachable(dataset.name, "dataset", ctx.settings.hub_timeout_s)
        return HFSource(**dataset.model_dump(exclude={"data_files"}))
    return dataset


def _inline_summary(dataset: Any) -> dict[str, Any]:
    """Inline texts are in docs.jsonl; the manifest only says how many there were."""
    if isinstance(dataset, TextsSource):
        return {"texts": f"<{len(dataset.texts)} inline texts, see docs.jsonl>"}
    return {}


def _planned_docs(dataset: Any) -> int | None:
    """How many documents a capture will read, when that is known up front (for progress)."""
    if isinstance(dataset, TextsSource):
        return min(len(dataset.texts), dataset.limit or len(dataset.texts))
    return getattr(dataset, "limit", None)


@job_function("capture")
def capture_job(ctx: JobContext, request: dict[str, Any], run_id: str) -> dict[str, Any]:
    from kestrel.core.activations import capture

    req = CaptureRequest.model_validate(request)
    limits.check_capture_options(req.options, Caps.of(ctx.settings))
    source = engine_source(ctx, req.dataset)
    planned = _planned_docs(req.dataset)
    ctx.log(f"loading {req.model}")
    lm = ctx.models.get(req.model, dtype=req.model_dtype)
    ctx.log(f"capturing {', '.join(req.layers)} into {run_id}")

    last: dict[str, Any] = {}

    def on_progress(p) -> None:
        last.update(docs=p.docs, tokens=p.tokens, batches=p.batches, tokens_per_s=p.tokens_per_s)
        ctx.update(
            progress=min(p.forwarded / planned, 0.99) if planned else None,
            message=f"{p.docs} documents, {p.tokens} tokens",
            metrics=dict(last),
        )

    manifest = capture(
        lm,
        source,
        req.layers,
        ctx.store,
        run_id=run_id,
        options=req.options,
        on_progress=on_progress,
        should_stop=ctx.should_stop,
        dataset_record=req.dataset.model_dump(exclude={"texts"}) | _inline_summary(req.dataset),
    )
    # The last progress report may not have been saved (meta writes are throttled): the final
    # figures are the run's own, and the job's last message and metrics state them.
    stored = f"{manifest.n_docs} documents, {manifest.n_tokens} tokens"
    ctx.update(metrics={**last, "docs": manifest.n_docs, "tokens": manifest.n_tokens})
    ctx.outcome = f"{stored} in run {run_id}"
    ctx.log(f"stored {stored}", force=True)
    return {"run_id": run_id, "n_tokens": manifest.n_tokens, "n_docs": manifest.n_docs}


# ---------------------------------------------------------------------------------------------
# SAEs


@job_function("train")
def train_job(
    ctx: JobContext,
    run_id: str,
    layer: str,
    sae: dict[str, Any],
    train: dict[str, Any],
    sae_id: str,
    resume: bool = False,
    target_layer: str | None = None,
) -> dict[str, Any]:
    """Train (or resume) an SAE (a transcoder of ``layer`` -> ``target_layer``); a cancel keeps
    the checkpoint and publishes nothing.

    A rerun of the same job (requeued after a worker shutdown, or by the reaper after its worker
    died) continues from the newest checkpoint, and returns the SAE a previous run had already
    published when only the job's bookkeeping was lost. One process at a time trains into a
    checkpoint directory: a rerun whose first run is still alive waits for it to let go.
    """
    from kestrel.core.sae.checkpoint import writer_lock

    hyper = SAEHyperparameters.model_validate(sae)
    _check_training_caps(ctx, run_id, layer, hyper.n_latents, train)
    with writer_lock(checkpoint_dir(ctx.store, sae_id), ctx.should_stop) as held:
        if not held:
            return ctx.stopped("stopped while another run of this training let go of its checkpoint")
        if ctx.attempt > 1 and ctx.store.exists("saes", sae_id):
            return _published(ctx, sae_id)
        resume = resume or _resumable(ctx, sae_id)
        return _train(ctx, run_id, layer, sae, train, sae_id, resume, target_layer)


def _resumable(ctx: JobContext, sae_id: str) -> bool:
    """A rerun continues when an earlier run left a complete checkpoint (else it starts over)."""
    from kestrel.core.sae.checkpoint import latest_checkpoint

    return ctx.attempt > 1 and latest_checkpoint(checkpoint_dir(ctx.store, sae_id)) is not None


def _published(ctx: JobContext, sae_id: str) -> dict[str, Any]:
    """An earlier run of this job published the SAE, then its worker died before saying so."""
    from kestrel.core.sae.artifacts import get_sae

    summary = get_sae(ctx.store, sae_id)
    ctx.log(f"{sae_id} was published by an earlier run of this job", force=True)
    ctx.update(metrics=dict(summary.metrics), force=True)
    return {"sae_id": sae_id, "status": "complete", "metrics": summary.metrics}


def _train(
    ctx: JobContext,
    run_id: str,
    layer: str,
    sae: dict[str, Any],
    train: dict[str, Any],
    sae_id: str,
    resume: bool,
    target_layer: str | None = None,
) -> dict[str, Any]:
    from kestrel.core.sae.artifacts import TrainingStopped, train_from_run
    from kestrel.core.sae.checkpoint import latest_checkpoint, read_checkpoint

    if resume:
        newest = latest_checkpoint(checkpoint_dir(ctx.store, sae_id))
        state = read_checkpoint(newest).meta if newest is not None else {}
        ctx.record(resumed_from={"step": state.get("step"), "elapsed_s": state.get("elapsed_s")})
        seconds = float(state.get("elapsed_s") or 0.0)
        ctx.log(f"resuming {sae_id} on {run_id} {layer} from step {state.get('step')} ({seconds:.1f} s in)")
    else:
        ctx.log(f"training {sae_id} on {run_id} {layer}" + (f" -> {target_layer}" if target_layer else ""))
    last_log = [0.0]

    def on_progress(p: TrainingPoint) -> None:
        message = p.headline()
        ctx.update(progress=p.fraction, message=message, metrics=p.model_dump())
        if time.monotonic() - last_log[0] >= LOG_EVERY_S:
            last_log[0] = time.monotonic()
            ctx.log(message)

    result = train_from_run(
        ctx.store,
        run_id,
        layer,
        sae,
        train,
        sae_id=sae_id,
        on_progress=on_progress,
        should_stop=ctx.should_stop,
        resume=resume,
        on_warning=lambda warning: ctx.log(f"warning: {warning}", force=True),
        target_layer=target_layer,
    )
    if isinstance(result, TrainingStopped):
        return ctx.stopped(
            f"checkpoint kept; resume with resume_from={sae_id!r}",
            {"sae_id": sae_id, "checkpoint": result.checkpoint or "", "resumable": True},
        )
    skipped = result.metrics.get("model_in_the_loop", {})
    if skipped.get("skipped"):
        ctx.log(f"model-in-the-loop evaluation skipped: {skipped['reason']}", force=True)
    ctx.update(metrics=dict(result.metrics), force=True)
    return {"sae_id": result.id, "status": "complete", "metrics": result.metrics, "warnings": result.warnings}


def _check_training_caps(
    ctx: JobContext, run_id: str, layer: str, n_latents: int, train: dict[str, Any]
) -> None:
    """The API's caps again, for a job that reached the queue some other way (one manifest read)."""
    from kestrel.core.runs import get_manifest

    caps = Caps.of(ctx.settings)
    limits.check_train(train, caps)
    layers = get_manifest(ctx.store, run_id).layers
    if layer in layers:
        limits.check_sae_size(layers[layer].d, n_latents, caps)


@job_function("evaluate")
def evaluate_job(ctx: JobContext, sae_id: str, texts: list[str] | None = None) -> dict[str, Any]:
    from kestrel.core.sae.artifacts import evaluate_sae, get_sae, require_loadable_model

    summary = get_sae(ctx.store, sae_id)
    require_loadable_model(ctx.store, summary)  # a run captured during training: no model to load
    lm = ctx.models.get(summary.model_name)
    ctx.log(f"evaluating {sae_id} with {lm.name}")

    def on_progress(p: Any) -> None:
        fraction = p if isinstance(p, float) else getattr(p, "fraction", None)
        ctx.update(progress=fraction, message="evaluating")

    metrics = evaluate_sae(ctx.store, sae_id, lm, texts, on_progress=on_progress)
    ctx.update(metrics=dict(metrics), force=True)
    return {"sae_id": sae_id, "metrics": metrics}


@job_function("encode")
def encode_job(ctx: JobContext, sae_id: str, text: str, top_k: int = 8) -> dict[str, Any]:
    from kestrel.core.sae.artifacts import encode_prompt

    sae, summary = sae_cache.get(ctx, sae_id)
    model, layer = summary.model_and_layer()
    lm = ctx.models.get(model)  # sae_cache checked the model is one the service can load
    tokens = encode_prompt(lm, sae, layer, text, top_k=top_k)
    return {"sae_id": sae_id, "model": model, "layer": layer, "tokens": tokens}


class _SAECache:
    """Loaded SAEs of this worker by id (few, small), reloaded if the stored one changed.

    Only SAEs whose model the service can load are cached (encode and steering run them inside it).
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._items: dict[str, tuple[str, Any, SAEManifest]] = {}

    def get(self, ctx: JobContext, sae_id: str) -> tuple[Any, SAEManifest]:
        from kestrel.core.sae.artifacts import load_sae, require_loadable_model

        stamp = ctx.store.stat("saes", sae_id, "manifest.json").version
        cached = self._items.get(sae_id)
        if cached is not None and cached[0] == stamp:
            return cached[1], cached[2]
        sae, summary = load_sae(ctx.store, sae_id)
        # every user of a cached SAE runs it inside its model: check once, on load, not per call
        require_loadable_model(ctx.store, summary)
        self._items[sae_id] = (stamp, sae, summary)
        while len(self._items) > self.size:
            self._items.pop(next(iter(self._items)))
        return sae, summary


sae_cache = _SAECache()


# ---------------------------------------------------------------------------------------------
# Concepts and steering


def _sae_model_name(ctx: JobContext, summary: SAEManifest) -> str:
    """The model an SAE reads, refusing SAEs of runs whose model the service cannot load."""
    from kestrel.core.sae.artifacts import require_loadable_model

    require_loadable_model(ctx.store, summary)
    name = summary.model_name
    if not name:
        raise InvalidInputError(f"sae {summary.id!r} does not record the model it reads")
    return name


@job_function("discover")
def discover_job(ctx: JobContext, sae_id: str, request: dict[str, Any]) -> dict[str, Any]:
    """Top contexts, bins, density, histogram and logit effects of every latent of an SAE."""
    from kestrel.core.concepts import discover
    from kestrel.core.sae.artifacts import get_sae

    req = DiscoverRequest.model_validate(request)
    limits.check_batch_tokens(req.config.token_budget, Caps.of(ctx.settings), "config.token_budget")
    limits.check_batch_size(req.config.batch_rows, Caps.of(ctx.settings), "config.batch_rows")
    summary = get_sae(ctx.store, sae_id)
    source = engine_source(ctx, req.dataset) if req.dataset is not None else None
    lm = ctx.models.get(_sae_model_name(ctx, summary))
    ctx.log(f"discovering the features of {sae_id} with {lm.name}")

    def on_progress(p) -> None:
        read = f"{p.done}/{p.total} {p.unit}" if p.total else f"{p.done} {p.unit}"
        if p.unit != "rows":  # a dataset: its tokens, and the rows the filters kept of them
            read += f", {p.tokens} tokens, {p.rows} rows"
        ctx.update(
            progress=p.fraction,  # of the streaming pass's length when known up front; None: unknown
            message=f"{p.stage}: {read}",
            metrics={"tokens": p.tokens, "rows": p.rows, "tokens_per_s": p.tokens_per_s},
        )

    manifest = discover(
        ctx.store,
        sae_id,
        lm,
        run_id=req.run_id,
        dataset=source,
        config=req.config,
        on_progress=on_progress,
        should_stop=ctx.should_stop,
    )
    ctx.log(f"{manifest['alive_latents']} of {manifest['n_latents']} latents fired", force=True)
    keys = ("version", "n_tokens", "n_rows", "alive_latents", "n_latents", "tokens_per_s", "seconds")
    return {"sae_id": sae_id, **{key: manifest[key] for key in keys}}


@job_function("label")
def label_job(
    ctx: JobContext,
    sae_id: str,
    method: str,
    latents: list[int] | None = None,
    overwrite: bool = False,
    score: bool = False,
    scorer: str | None = None,
    run_id: str | None = None,
    scoring: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Automatic names for latents: heuristic (tokens) or model (the SAE's model names them); with
    ``score``, each name is then scored by ``scorer`` (default: the SAE's model). A requeued job
    rewrites the same names and scores only the latents not scored yet (`labels` docstring)."""
    from kestrel.core.concepts import label_features
    from kestrel.core.concepts.config import ScoringConfig
    from kestrel.core.sae.artifacts import get_sae

    summary = get_sae(ctx.store, sae_id)
    lm = ctx.models.get(_sae_model_name(ctx, summary)) if method == "model" else None
    scorer_lm = ctx.models.get(scorer or _sae_model_name(ctx, summary)) if score else None
    result = label_features(
        ctx.store,
        sae_id,
        method,  # type: ignore[arg-type]
        lm=lm,
        latents=latents,
        overwrite=overwrite,
        on_progress=lambda f: ctx.update(progress=min(f, 0.99), message="labelling and scoring"),
        score=score,
        scorer=scorer_lm,
        scoring=ScoringConfig.from_dict(scoring or {}),
        run_id=run_id,
        should_stop=ctx.should_stop,
        tokenizer_loader=ctx.models.tokenizer,  # a scorer of another model reads the examples' text
    )
    if "note" in result.get("scoring", {}):
        ctx.log(result["scoring"]["note"], force=True)
    return {key: result[key] for key in ("sae_id", "method", "labelled", "scoring") if key in result}


def _steering_plan(ctx: JobContext, config: Any, lm: Any):
    """The config compiled against the loaded model, SAEs from this worker's cache on its device;
    relative (max_activation) edits resolved from the SAE's current discovery result."""
    from kestrel.core import steering

    def load(sae_id: str):
        sae, summary = sae_cache.get(ctx, sae_id)
        layer = config.layer if sae_id == config.sae_id else None
        return steering.sae_on_layer_device(lm, sae, summary, layer)

    return steering.compile_plan(steering.resolve_edits(ctx.store, config), lm, load_sae=load)


def _steering_model(ctx: JobContext, config: Any, model: str | None) -> str:
    from kestrel.core.models import DEFAULT_MODEL
    from kestrel.core.sae.artifacts import get_sae
    from kestrel.core.steering_config import check_steered_model

    if config.sae_id is None:
        return model or DEFAULT_MODEL
    sae_model = _sae_model_name(ctx, get_sae(ctx.store, config.sae_id))
    check_steered_model(config.sae_id, sae_model, model)
    return sae_model


@job_function("steering_preview")
def steering_preview_job(ctx: JobContext, config: dict[str, Any], model: str | None = None) -> dict[str, Any]:
    """Validate a steering config against its SAEs and the loaded model; list what it touches."""
    from kestrel.core import steering

    cfg = steering.check_config(ctx.store, steering.SteeringConfig.from_dict(config))
    lm = ctx.models.get(_steering_model(ctx, cfg, model))
    _steering_plan(ctx, cfg, lm)  # checks layer, widths and latents against the loaded model
    return {**steering.preview(ctx.store, cfg), "model": lm.name}


@job_function("generate")
def generate_job(
    ctx: JobContext,
    model: str,
    prompts: list[str],
    options: dict[str, Any],
    steering_config: dict[str, Any] | None = None,
    steering_id: str | None = None,
    keywords: list[str] | None = None,
) -> dict[str, Any]:
    """Default and steered continuations side by side (or only the default without a config);
    with both, the steered text's fluency and keyword effect (`steering_sweep`)."""
    from kestrel.core import steering
    from kestrel.core.concepts import read_dictionary
    from kestrel.core.models import generate
    from kestrel.core.steering_sweep import side_by_side_effects

    lm = ctx.models.get(model)
    if steering_config is None:
        started = time.perf_counter()
        outputs = generate(lm, prompts, **options)
        seconds = time.perf_counter() - started
        items = [{"prompt": g.prompt, "default": {"text": g.text, "token_ids": g.token_ids}} for g in outputs]
        return {"model": model, "items": items, "seconds": {"default": round(seconds, 4)}}
    cfg = steering.SteeringConfig.from_dict(steering_config)
    _steering_model(ctx, cfg, model)
    plan = _steering_plan(ctx, cfg, lm)
    names = {i: c.name for i, c in read_dictionary(ctx.store, cfg.sae_id).items()} if cfg.sae_id else {}
    result = steering.generate_side_by_side(lm, prompts, plan, names=names, **options)
    result = side_by_side_effects(lm, result, plan, keywords or [])
    warnings = steering.edit_warnings(ctx.store, cfg)
    edits = [
        {**given.model_dump(), "absolute_value": applied.value}
        for given, applied in zip(cfg.edits, plan.config.edits, strict=True)
    ]
    return {"model": model, "steering_id": steering_id, **result, "warnings": warnings, "edits": edits}


# ---------------------------------------------------------------------------------------------
# Analyses


def _analysis_config(ctx: JobContext, request: Any) -> Any:
    """The engine's config for a request: only a causal dataset needs resolving (an upload id
    becomes a file under the store here, as for captures)."""
    from kestrel.core.analysis import CausalConfig

    if request.kind != "causal":
        return request
    fields = request.model_dump(exclude={"dataset"}, exclude_unset=True)
    return CausalConfig.model_validate({**fields, "dataset": engine_source(ctx, request.dataset)})


@job_function("analysis")
def analysis_job(ctx: JobContext, request: dict[str, Any], analysis_id: str) -> dict[str, Any]:
    """Neuron, feature, causal or circuit analysis; publishes results.json, report.md and plots."""
    from kestrel.core.analysis import get_analysis, run_analysis
    from kestrel.schemas import parse_analysis_request

    config = _analysis_config(ctx, parse_analysis_request(request))
    ctx.log(f"{config.kind} analysis {analysis_id}")

    def load(name: str, dtype: str | None = None) -> Any:
        ctx.log(f"loading {name}")
        return ctx.models.get(name, dtype=dtype)

    run_analysis(
        ctx.store,
        config,
        model_loader=load,
        progress=lambda fraction, message: ctx.update(progress=fraction, message=message),
        should_stop=ctx.should_stop,
        analysis_id=analysis_id,
        record=request,  # an upload stays an id in the manifest, never the worker's path to it
    )
    manifest = get_analysis(ctx.store, analysis_id)
    ctx.update(metrics=manifest.key_numbers, force=True)
    ctx.log(f"report: /v1/analyses/{analysis_id}/report", force=True)
    return {"analysis_id": analysis_id, "kind": config.kind, "key_numbers": manifest.key_numbers}
