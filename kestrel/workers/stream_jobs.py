"""The stream training job: one pass of a model over a dataset trains N SAEs (and may spill the
pass as a run). Its own module because `kestrel.workers.jobs` is near the size limit.

Faults: a cancel stops every SAE with a checkpoint and publishes nothing more (nor the spill);
a cancel of one SAE (`JobContext.part_cancelled`) stops that one with its checkpoint and the job
trains the others to the end. A worker shutdown requeues the job, and the rerun re-streams the
dataset, each SAE continuing from its newest checkpoint (`resume="auto"`) and skipping the SAEs
an earlier run published; an SAE cancelled alone stays cancelled (the set of cancelled parts
outlives the worker), so it stops again at its first step with its checkpoint unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

from kestrel.core import limits
from kestrel.core.limits import Caps
from kestrel.core.sae.progress import TrainingPoint
from kestrel.core.sae.records import checkpoint_dir
from kestrel.schemas import TrainRequest
from kestrel.workers.context import JobContext, job_function
from kestrel.workers.jobs import LOG_EVERY_S, _inline_summary, engine_source


@job_function("train")
def train_stream_job(
    ctx: JobContext,
    request: dict[str, Any],
    sae_ids: list[str],
    spill_run_id: str | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train every SAE of ``request.saes`` from one pass; each is published as its own SAE.

    ``resume`` continues them from their checkpoints (``POST /v1/saes`` with ``resume_from`` a
    stopped stream SAE); a requeued job continues those that have one."""
    from kestrel.core.sae.checkpoint import writer_lock
    from kestrel.core.sae.stream import StreamSAE, stream_width, train_stream

    req = TrainRequest.model_validate(request)
    assert req.dataset is not None and req.saes is not None
    caps = Caps.of(ctx.settings)
    options = req.options
    pending = [i for i, sae_id in enumerate(sae_ids) if not ctx.store.exists("saes", sae_id)]
    ctx.log(f"loading {req.model}")
    lm = ctx.models.get(req.model, dtype=req.model_dtype)
    for i in pending:
        entry = req.saes[i]
        widths = [stream_width(lm, entry.layer, i)]
        if entry.target_layer is not None:
            widths.append(stream_width(lm, entry.target_layer, i))
        limits.check_sae_size(max(widths), entry.sae.n_latents, caps)
    saes = [
        StreamSAE(
            layer=req.saes[i].layer,
            sae=req.saes[i].sae.model_dump(exclude_none=True),
            train=(req.saes[i].train or {}),
            sae_id=sae_ids[i],
            target_layer=req.saes[i].target_layer,
        )
        for i in pending
    ]
    points: dict[str, TrainingPoint] = {}
    last_log = [0.0]

    def on_progress(sae_id: str, p: TrainingPoint) -> None:
        points[sae_id] = p
        fractions = [q.fraction for q in points.values() if q.fraction is not None]
        message = f"{sae_id} {p.headline()}"
        metrics = {"saes": {name: q.model_dump() for name, q in points.items()}}
        ctx.update(progress=min(fractions) if fractions else None, message=message, metrics=metrics)
        if time.monotonic() - last_log[0] >= LOG_EVERY_S:
            last_log[0] = time.monotonic()
            ctx.log(message)

    with ExitStack() as locks:
        for sae in saes:
            assert sae.sae_id is not None
            if not locks.enter_context(writer_lock(checkpoint_dir(ctx.store, sae.sae_id), ctx.should_stop)):
                return ctx.stopped("stopped while another run of this training let go of its checkpoints")
        ctx.log(f"stream training {len(saes)} SAEs on {', '.join(sorted({s.layer for s in saes}))}")
        summaries = train_stream(
            lm,
            engine_source(ctx, req.dataset),
            saes,
            ctx.store,
            options=options,
            spill_run_id=spill_run_id if ctx.attempt == 1 or not _spilled(ctx, spill_run_id) else None,
            resume=True if resume else ("auto" if ctx.attempt > 1 else False),
            on_progress=on_progress,
            should_stop=_stopper(ctx),
            dataset_record=req.dataset.model_dump(exclude={"texts"}) | _inline_summary(req.dataset),
        )
    fields = ("status", "metrics", "step", "tokens", "checkpoint")
    results = {s.id: {k: getattr(s, k, None) for k in fields} for s in summaries}
    if ctx.stop_reason is not None or all(s.status == "stopped" for s in summaries):
        return ctx.stopped("checkpoints kept; resume an SAE with resume_from=<its id>", {"saes": results})
    ctx.update(metrics={"saes": {k: v["metrics"] for k, v in results.items() if v["metrics"]}}, force=True)
    stopped = sorted(name for name, v in results.items() if v["status"] == "stopped")
    if stopped:
        ctx.outcome = f"{len(results) - len(stopped)} SAEs published; cancelled: {', '.join(stopped)}"
    return {"sae_ids": sae_ids, "run_id": spill_run_id, "saes": results}


def _stopper(ctx: JobContext) -> Callable[[str], bool]:
    """``should_stop(sae_id)`` for the engine: the job's cancel, or that SAE's own
    (``POST /v1/saes/{id}/cancel``); says once in the job's log which SAE stopped and why."""
    told: set[str] = set()

    def should_stop(sae_id: str) -> bool:
        if not ctx.part_cancelled(sae_id):
            return False
        if sae_id not in told and ctx.stop_reason is None:
            told.add(sae_id)
            ctx.log(f"{sae_id} cancelled: checkpoint kept; resume with resume_from={sae_id!r}", force=True)
        return True

    return should_stop


def _spilled(ctx: JobContext, run_id: str | None) -> bool:
    return run_id is not None and ctx.store.exists("activations", run_id)
