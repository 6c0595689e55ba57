"""Stream training requests (``POST /v1/saes`` with ``dataset`` and ``saes``): every check that
needs no model, then the job's kwargs. The worker checks what needs the model (layers exist,
their widths against ``d_in`` and the SAE size caps) before its first forward."""

from __future__ import annotations

from typing import Any

from kestrel.core import limits
from kestrel.core.errors import InvalidInputError
from kestrel.core.limits import Caps
from kestrel.core.runs import CaptureOptions
from kestrel.core.sae.config import TrainConfig
from kestrel.core.store import Store, new_id
from kestrel.schemas import TrainRequest
from kestrel.server import services
from kestrel.settings import Settings


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
        train = entry.train or TrainConfig()
        limits.check_train(train.model_dump(mode="json"), caps)
        train.check_one_pass(i)
    return {
        "request": request.model_dump(mode="json"),
        "sae_ids": [new_id("sae") for _ in request.saes],
        "spill_run_id": new_id("run") if request.spill else None,
    }
