"""Stream training requests (``POST /v1/saes`` with ``dataset`` and ``saes``): every check that
needs no model, then the job's kwargs. The worker checks what needs the model (layers exist,
their widths against ``d_in`` and the SAE size caps) before its first forward."""

from __future__ import annotations

import json
from typing import Any

from redis import Redis

from kestrel.core import limits
from kestrel.core.errors import InvalidInputError, NotFoundError
from kestrel.core.limits import Caps
from kestrel.core.runs import CaptureOptions
from kestrel.core.sae.config import TrainConfig
from kestrel.core.sae.records import check_transcoder_request
from kestrel.core.store import Store, new_id
from kestrel.schemas import TrainRequest
from kestrel.server import services
from kestrel.settings import Settings
from kestrel.workers import lifecycle

#: The request of a stream job, kept (like a run training's) so one of its SAEs can resume alone.
STREAM_REQUEST_KEY = lifecycle.PREFIX + ":stream-request:{}"


def is_stream_request(request: TrainRequest) -> bool:
    return request.dataset is not None or request.saes is not None


def job_artifacts(kwargs: dict[str, Any]) -> dict[str, str | list[str]]:
    """The SAEs the job makes, and the run when it spills."""
    artifacts: dict[str, str | list[str]] = {"sae_ids": list(kwargs["sae_ids"])}
    if kwargs["spill_run_id"] is not None:
        artifacts["run_id"] = kwargs["spill_run_id"]
    return artifacts


def prepare_stream_training(request: TrainRequest, store: Store, settings: Settings) -> dict[str, Any]:
    """Validate a stream training request; the job's kwargs with fresh SAE ids (and run id)."""
    mixed = [name for name in ("run_id", "layer", "sae", "resume_from") if getattr(request, name) is not None]
    if mixed:
        raise InvalidInputError(
            f"give dataset and saes (stream training) or run_id, layer and sae, not both: {', '.join(mixed)} "
            "given with dataset/saes",
            details={"fields": mixed},
        )
    if request.target_layer is not None:  # a stream's transcoders name theirs per entry
        raise InvalidInputError(
            "stream training takes target_layer per SAE: give saes[i].target_layer (a top-level "
            "target_layer goes with run_id and layer)",
            details={"fields": ["target_layer"]},
        )
    if request.dataset is None or not request.saes:
        missing = "dataset" if request.dataset is None else "saes"
        raise InvalidInputError(f"stream training needs both dataset and saes; {missing} is missing")
    services.require_allowed_model(request.model, settings)
    services.check_dataset(request.dataset, settings, store)
    options = request.options or CaptureOptions()
    services.check_max_length(options.max_length, settings, "options.max_length")
    options.check()
    caps = Caps.of(settings)
    limits.check_capture_options(options, caps)
    for i, entry in enumerate(request.saes):
        if not entry.layer.strip():
            raise InvalidInputError(f"saes[{i}].layer must not be empty")
        check_transcoder_request(entry.layer, entry.target_layer, entry.sae.model_dump(), f"saes[{i}]")
        train = entry.train or TrainConfig()
        limits.check_train(train.model_dump(mode="json"), caps)
        train.check_one_pass(i)
    return {
        "request": request.model_dump(mode="json"),
        "sae_ids": [new_id("sae") for _ in request.saes],
        "spill_run_id": new_id("run") if request.spill else None,
    }


def remember_request(redis: Redis, request: dict[str, Any], sae_ids: list[str]) -> None:
    """Keep a submitted stream job's request (once) and a pointer from each of its SAE ids, for
    `TRAIN_REQUEST_TTL_S`, so that ``resume_from`` can continue any one of them later."""
    group = sae_ids[0]
    ttl = services.TRAIN_REQUEST_TTL_S
    with redis.pipeline() as pipe:
        pipe.set(STREAM_REQUEST_KEY.format(group), json.dumps(request), ex=ttl)
        for i, sae_id in enumerate(sae_ids):
            pointer = {"stream": group, "index": i}
            pipe.set(lifecycle.TRAIN_REQUEST_KEY.format(sae_id), json.dumps(pointer), ex=ttl)
        pipe.execute()


def stream_original(redis: Redis, sae_id: str) -> dict[str, Any] | None:
    """The stream request that trained ``sae_id``, narrowed to that SAE; None when the SAE was
    trained from a run (or its request has expired)."""
    raw = redis.get(lifecycle.TRAIN_REQUEST_KEY.format(sae_id))
    pointer = json.loads(raw) if raw is not None else {}
    if "stream" not in pointer:
        return None
    raw_request = redis.get(STREAM_REQUEST_KEY.format(pointer["stream"]))
    if raw_request is None:
        raise NotFoundError(
            f"the stream request that trained SAE {sae_id!r} has expired; start a new training",
            details={"id": sae_id},
        )
    request = json.loads(raw_request)
    return {**request, "saes": [request["saes"][pointer["index"]]], "spill": False}


def prepare_stream_resume(
    request: TrainRequest, original: dict[str, Any], store: Store, settings: Settings
) -> dict[str, Any]:
    """The kwargs of a job that continues one stopped stream SAE from its checkpoint: one more pass
    over the original dataset, the SAE skipping the rows its checkpoint consumed."""
    sae_id = request.resume_from
    assert sae_id is not None
    given = sorted(request.model_fields_set - {"resume_from"})
    if given:
        raise InvalidInputError(
            f"SAE {sae_id!r} was trained from a stream; it resumes with its original dataset and "
            f"config, so give resume_from alone (also given: {', '.join(given)})",
            details={"fields": given},
        )
    services.check_resumable(store, sae_id)
    original_request = TrainRequest.model_validate(original)
    services.require_allowed_model(original_request.model, settings)
    return {"request": original, "sae_ids": [sae_id], "spill_run_id": None, "resume": True}
