"""What the routes do, one function per route, kept out of the routers so those stay thin.

Everything cheap is checked here, before a job is enqueued: ids, request limits, that a run and
its layer exist, that hyperparameters parse. What only a loaded model can tell (layer names of a
capture) is checked by the worker, and the job fails with the engine's message.
"""

from __future__ import annotations

import json
from typing import Any

from redis import Redis

from kestrel.core import hub, limits, uploads
from kestrel.core.catalog import available_models, validate_model_name
from kestrel.core.errors import InvalidInputError, NotFoundError
from kestrel.core.limits import Caps
from kestrel.core.runs import get_manifest, list_runs
from kestrel.core.sae.records import checkpoint_dir, get_sae, training_configs
from kestrel.core.sources import HFSource, TextsSource
from kestrel.core.steering_config import SteeringConfig, check_steered_model
from kestrel.core.store import Store, new_id, validate_id
from kestrel.schemas import (
    CaptureRequest,
    DiscoverRequest,
    GenerateRequest,
    ModelInfo,
    ModelLoadedBy,
    RunSummary,
    SAEHyperparameters,
    TrainRequest,
    UploadSource,
)
from kestrel.server.errors import limit_exceeded
from kestrel.settings import Settings
from kestrel.workers import lifecycle, registry

TRAIN_REQUEST_TTL_S = 90 * 24 * 3600


# ---------------------------------------------------------------------------------------------
# Limits


def check_texts(texts: list[str], settings: Settings) -> None:
    """Inline texts within ``max_texts_per_request`` and ``max_text_chars`` (413 naming the limit)."""
    if len(texts) > settings.max_texts_per_request:
        raise limit_exceeded(
            "max_texts_per_request", settings.max_texts_per_request, len(texts), "too many texts"
        )
    for i, text in enumerate(texts):
        if len(text) > settings.max_text_chars:
            raise limit_exceeded(
                "max_text_chars", settings.max_text_chars, len(text), f"text {i} is too long"
            )


def check_top_k(top_k: int, settings: Settings) -> None:
    if top_k > settings.max_top_k:
        raise limit_exceeded("max_top_k", settings.max_top_k, top_k, "top_k too large", status=422)


# ---------------------------------------------------------------------------------------------
# Models


def list_models(settings: Settings, redis: Redis) -> list[ModelInfo]:
    """Bundled and configured local models, plus any hub model a live worker holds."""
    loaded: dict[str, list[ModelLoadedBy]] = {}
    for worker in registry.live_workers(redis):
        for model in worker.get("models", []):
            loaded.setdefault(model["name"], []).append(
                ModelLoadedBy(
                    worker=worker["name"],
                    queue=",".join(worker.get("queues", [])),
                    device=model["device"],
                    dtype=model["dtype"],
                )
            )
    rows = [
        ModelInfo(
            name=m["name"],
            source="bundled",
            description=m["description"],
            installed=m["installed"],
            cached=m["cached"],
            loaded_by=loaded.pop(m["name"], []),
        )
        for m in available_models(settings.store_root)
    ]
    for name in settings.local_models():
        if any(r.name == name for r in rows):
            continue
        rows.append(
            ModelInfo(
                name=name,
                source="local",
                description="local checkpoint",
                installed=True,
                cached=True,
                loaded_by=loaded.pop(name, []),
            )
        )
    rows += [
        ModelInfo(name=name, source="hub", installed=True, cached=False, loaded_by=holders)
        for name, holders in sorted(loaded.items())
    ]
    return rows


def require_allowed_model(name: str, settings: Settings) -> str:
    """A name the service may load (bundled, local, or an allowed hub id), else 422 before any job."""
    return validate_model_name(name, settings.local_models(), settings.allowed_models)


def cached_layer_table(redis: Redis, name: str) -> dict[str, Any] | None:
    raw = redis.get(lifecycle.LAYERS_KEY.format(name))
    return json.loads(raw) if raw else None


MAX_UNLOAD_REQUESTS = 256


def request_unload(redis: Redis, name: str, now: float, settings: Settings) -> None:
    """Workers drop the model at their next heartbeat (and before their next job).

    The hash of requests stays small whatever names clients send: a request is needed only until
    every live worker has seen it (a worker silent for ``heartbeat_ttl_s`` is dead, and a new one
    holds nothing), so older entries are trimmed, and past ``MAX_UNLOAD_REQUESTS`` the oldest go.
    """
    keep_s = max(60.0, 10 * settings.heartbeat_ttl_s)
    redis.hset(lifecycle.UNLOAD_HASH, name, now)
    entries = sorted(
        ((float(at), key) for key, at in redis.hgetall(lifecycle.UNLOAD_HASH).items()), reverse=True
    )
    stale = [key for i, (at, key) in enumerate(entries) if at < now - keep_s or i >= MAX_UNLOAD_REQUESTS]
    if stale:
        redis.hdel(lifecycle.UNLOAD_HASH, *stale)


# ---------------------------------------------------------------------------------------------
# Activations


def check_dataset(dataset: Any, settings: Settings, store: Store) -> None:
    """Inline texts within the limits; an upload that exists and holds texts; a hub id that is
    cached or allowed (``KESTREL_ALLOWED_DATASETS``; whether it loads: the worker)."""
    if isinstance(dataset, TextsSource):
        check_texts(dataset.texts, settings)
    elif isinstance(dataset, UploadSource):
        uploads.require_dataset_upload(store, validate_id(dataset.upload_id, "upload id"))
    elif isinstance(dataset, HFSource):
        hub.check_allowed(dataset.name, "dataset", settings.allowed_datasets)


def check_max_length(max_length: int, settings: Settings, field: str) -> None:
    """Tokens kept per text may not pass ``max_tokens_per_text`` (422 naming the field)."""
    limit = settings.max_tokens_per_text
    if max_length > limit:
        raise limit_exceeded("max_tokens_per_text", limit, max_length, f"{field} too large", 422)


def prepare_capture(request: CaptureRequest, settings: Settings, store: Store) -> dict[str, Any]:
    """Validate a capture request; return the job's kwargs with a fresh run id."""
    require_allowed_model(request.model, settings)
    check_dataset(request.dataset, settings, store)
    check_max_length(request.options.max_length, settings, "options.max_length")
    request.options.check()
    limits.check_capture_options(request.options, Caps.of(settings))
    if any(not layer.strip() for layer in request.layers):
        raise InvalidInputError("layer names must not be empty")
    return {"request": request.model_dump(mode="json"), "run_id": new_id("run")}


def run_summaries(store: Store) -> list[RunSummary]:
    return [
        RunSummary(
            id=m.id,
            model=m.model.name,
            layers=list(m.layers),
            d_model=m.d_model,
            dtype=m.dtype,
            n_tokens=m.n_tokens,
            n_docs=m.n_docs,
            created=m.created,
        )
        for m in sorted(list_runs(store), key=lambda m: m.created, reverse=True)
    ]


# ---------------------------------------------------------------------------------------------
# SAEs


def training_job_kwargs(
    request: TrainRequest, redis: Redis, store: Store, settings: Settings
) -> dict[str, Any]:
    """Validate a training request against its run and the caps; return the job's kwargs.

    A resume (``resume_from``) continues a cancelled training under the same SAE id; fields the
    request leaves out are taken from the original request. The run, layer and config checks are
    the engine's own (`training_configs`), so the API and the worker cannot disagree.
    """
    from kestrel.core.sae.config import TrainConfig

    resume = request.resume_from is not None
    if resume:
        sae_id = validate_id(request.resume_from, "SAE id")
        request = _merge_original(request, redis, sae_id)
        check_resumable(store, sae_id)
    else:
        sae_id = new_id("sae")
    if request.run_id is None or request.layer is None or request.sae is None:
        raise InvalidInputError("run_id, layer and sae are required (unless resuming a known SAE)")
    sae = request.sae.model_dump(exclude_none=True)
    train = (request.train or TrainConfig()).model_dump(mode="json")
    # 404 for an unknown run or layer, 422 for a bad config: before anything is queued
    target = request.target_layer
    sae_config, _, _ = training_configs(store, request.run_id, request.layer, sae, train, target_layer=target)
    caps = Caps.of(settings)
    limits.check_sae_size(max(sae_config.d_in, sae_config.output_width), sae_config.n_latents, caps)
    limits.check_train(train, caps)
    kwargs = {"run_id": request.run_id, "layer": request.layer, "sae": sae, "train": train, "sae_id": sae_id}
    if target is not None:  # only a transcoder's job names it (older workers take no such argument)
        kwargs["target_layer"] = target
    original = {k: v for k, v in kwargs.items() if k != "sae_id"}
    redis.set(lifecycle.TRAIN_REQUEST_KEY.format(sae_id), json.dumps(original), ex=TRAIN_REQUEST_TTL_S)
    return {**kwargs, "resume": resume}


def _merge_original(request: TrainRequest, redis: Redis, sae_id: str) -> TrainRequest:
    raw = redis.get(lifecycle.TRAIN_REQUEST_KEY.format(sae_id))
    if raw is None:
        return request
    original = json.loads(raw)
    return TrainRequest(
        run_id=request.run_id or original["run_id"],
        layer=request.layer or original["layer"],
        target_layer=request.target_layer or original.get("target_layer"),
        sae=request.sae or SAEHyperparameters.model_validate(original["sae"]),
        train=request.train or original["train"],
        resume_from=sae_id,
    )


def check_resumable(store: Store, sae_id: str) -> None:
    if store.exists("saes", sae_id):
        raise InvalidInputError(f"SAE {sae_id!r} finished training already; nothing to resume")
    if not checkpoint_dir(store, sae_id).is_dir():
        raise NotFoundError(f"no checkpoint for SAE {sae_id!r} to resume from", details={"id": sae_id})


# ---------------------------------------------------------------------------------------------
# Features, concepts and steering


def prepare_discovery(sae_id: str, request: DiscoverRequest, settings: Settings, store: Store) -> dict:
    """Check the SAE, the source and the limits before a discovery is queued; the job's kwargs.

    A transcoder is discovered like an SAE: its latents encode the layer it reads (``layer``,
    an MLP's input), which its run captured; nothing of discovery decodes back into it."""
    summary = get_sae(store, sae_id)
    if request.run_id is not None and request.dataset is not None:
        raise InvalidInputError("give run_id or dataset, not both")
    dataset = request.dataset
    check_dataset(dataset, settings, store)
    check_max_length(request.config.max_length, settings, "config.max_length")
    limits.check_batch_tokens(request.config.token_budget, Caps.of(settings), "config.token_budget")
    limits.check_batch_size(request.config.batch_rows, Caps.of(settings), "config.batch_rows")
    run_id = request.run_id if dataset is None else None
    run_id = run_id or (summary.run_id if dataset is None else None)
    if dataset is None:
        if not run_id:
            raise InvalidInputError(f"sae {sae_id!r} has no training run; give run_id or a dataset")
        manifest = get_manifest(store, validate_id(run_id, "run id"))
        if summary.layer not in manifest.layers:
            raise InvalidInputError(f"run {run_id!r} did not capture the SAE's layer {summary.layer!r}")
    request.config.check_size(summary.n_latents)  # histogram and state bounds
    return {"sae_id": sae_id, "request": request.model_dump(mode="json")}


def checked_steering(store: Store, config_id: str | None, config: SteeringConfig | None) -> SteeringConfig:
    """A saved or inline config (exactly one), checked against its SAEs' summaries."""
    from kestrel.core import steering_config as steering

    if (config_id is None) == (config is None):
        raise InvalidInputError("give a saved steering config id or an inline config (exactly one)")
    if config_id is not None:
        config = steering.load_config(store, validate_id(config_id, "steering id"))
    return steering.check_config(store, config)


def check_steered_generation(
    model: str | None,
    prompts: list[str],
    keywords: list[str],
    config: SteeringConfig | None,
    settings: Settings,
    store: Store,
) -> None:
    """What every steered generation checks before queueing (generate, the steering sweep): the
    model is one the service may load, prompts and keywords are within the text limits, and the
    config's SAE reads that model (``model`` None: the SAE's own, so no mismatch)."""
    if model is not None:
        require_allowed_model(model, settings)
    check_texts(prompts, settings)
    check_texts(keywords, settings)
    if config is not None and config.sae_id is not None:
        check_steered_model(config.sae_id, get_sae(store, config.sae_id).model_name, model)


def prepare_generate(name: str, request: GenerateRequest, settings: Settings, store: Store) -> dict:
    """Limits, the model name and the steering config, checked before the job is queued."""
    config = None
    if request.steering_id is not None or request.steering is not None:
        config = checked_steering(store, request.steering_id, request.steering)
    elif request.top_latents:
        raise InvalidInputError("top_latents needs a steering config with an SAE")
    check_steered_generation(name, request.prompts, request.keywords, config, settings, store)
    if request.max_new_tokens > settings.max_new_tokens:
        raise limit_exceeded(
            "max_new_tokens", settings.max_new_tokens, request.max_new_tokens, "max_new_tokens too large", 422
        )
    check_top_k(request.top_latents, settings)
    options = request.model_dump(include={"max_new_tokens", "do_sample", "temperature", "top_p", "seed"})
    if config is not None:
        options.update(top_latents=request.top_latents, compare=request.compare)
    return {
        "model": name,
        **({"keywords": request.keywords} if config is not None and request.keywords else {}),
        "prompts": request.prompts,
        "options": options,
        "steering_config": config.model_dump(mode="json") if config is not None else None,
        "steering_id": request.steering_id,
    }
