"""Steering sweeps and measured logit effects (issue #14), and edits of an attribution graph's
feature nodes (issue #15): interactive jobs, awaited by the API. Their own module because
`kestrel.workers.jobs` is near the size limit.

Faults: all only read (the model, the SAE, its discovery result, a graph) and write nothing, so a worker
killed mid-sweep leaves nothing behind; the awaiting call sees the job fail (its waiter answers
the job's error) or, past ``interactive_timeout_s``, a 202 with the job, which then reads failed.
"""

from __future__ import annotations

from typing import Any

from kestrel.core.errors import InvalidInputError
from kestrel.schemas import LogitCheckRequest, SteeringSweepRequest
from kestrel.workers.context import JobContext, job_function
from kestrel.workers.jobs import _steering_model, _steering_plan, sae_cache


def _max_activation(ctx: JobContext, sae_id: str, latent: int) -> float | None:
    from kestrel.core.steering_config import _latent_stats

    stats = _latent_stats(ctx.store, sae_id, [latent])
    return stats[latent]["max_activation"] if latent in stats else None


@job_function("steering_sweep")
def steering_sweep_job(ctx: JobContext, request: dict[str, Any]) -> dict[str, Any]:
    """Continuations at each strength of ``request`` with fluency, keyword effect and a verdict."""
    from kestrel.core import steering_sweep
    from kestrel.core.steering_config import SteeringConfig

    req = SteeringSweepRequest.model_validate(request)
    lm = ctx.models.get(_steering_model(ctx, SteeringConfig(sae_id=req.sae_id), req.model))
    ctx.log(f"sweeping latent {req.latent} of {req.sae_id} over {len(req.strengths)} strengths")
    return steering_sweep.sweep_latent(
        ctx.store,
        lm,
        req,
        lambda config: _steering_plan(ctx, config, lm),
        on_step=lambda i, n: ctx.update(progress=i / n, message=f"strength {i + 1} of {n}"),
    )


@job_function("logit_check")
def logit_check_job(ctx: JobContext, sae_id: str, latent: int, request: dict[str, Any]) -> dict[str, Any]:
    """The latent's direct-path logit effect next to the measured one, and their agreement."""
    from kestrel.core import logit_check
    from kestrel.core.sae.artifacts import get_sae
    from kestrel.core.steering_config import _check_latent, check_steered_model
    from kestrel.workers.jobs import _sae_model_name

    req = LogitCheckRequest.model_validate(request)
    summary = get_sae(ctx.store, sae_id)
    summary.require_sae("the logit check")  # it adds the decoder row at the layer the SAE reads
    _check_latent("latent", latent, summary.n_latents, sae_id)
    model = _sae_model_name(ctx, summary)
    check_steered_model(sae_id, model, req.model)
    scale = req.scale or _max_activation(ctx, sae_id, latent)
    if not scale:
        raise InvalidInputError(
            f"latent {latent} of sae {sae_id!r} has no observed max activation (no discovery result, or "
            "it never fired): run discovery first, or give scale",
            details={"latent": latent, "sae_id": sae_id},
        )
    texts = req.texts or logit_check.latent_contexts(ctx.store, sae_id, latent, req.n_contexts)
    if not texts:
        raise InvalidInputError(f"latent {latent} has no top contexts to measure on: give texts")
    lm = ctx.models.get(model)
    sae, _ = sae_cache.get(ctx, sae_id)
    layer = summary.layer_name or summary.layer
    report = logit_check.check_latent(lm, layer, sae.W_dec.detach()[latent], scale, texts, k=req.k)
    return {"model": lm.name, "sae_id": sae_id, "latent": latent, **report}


@job_function("graph_intervention")
def graph_intervention_job(ctx: JobContext, analysis_id: str, request: dict[str, Any]) -> dict[str, Any]:
    """Edits of a graph analysis's feature nodes run on the real model (issue #15): the target's
    logit and the top tokens before and after, continuations, each feature's activation.

    Checked again here as the API checked it (the graph may have changed since it was queued),
    then the graph's model and the edited blocks' transcoders (this worker's caches) are loaded.
    Faults: it only reads, and its hooks are removed when each pass ends, also on error, so a
    cached model is never left edited; a worker killed mid-call leaves nothing behind and the
    call is answered like any interactive one (the job's error, a 202 with the job past
    ``interactive_timeout_s``, or 503 while no interactive worker is up).
    """
    from kestrel.core.analysis.graph_edits import GraphInterventionRequest, check_intervention
    from kestrel.core.analysis.graph_intervention import intervene

    req = GraphInterventionRequest.model_validate(request)
    checked = check_intervention(ctx.store, analysis_id, req)
    lm = ctx.models.get(checked.model, dtype=checked.model_dtype)
    blocks = sorted({edit.layer for edit in checked.edits})
    transcoders = {block: sae_cache.get(ctx, checked.transcoders[block])[0] for block in blocks}
    ctx.log(f"graph {analysis_id}: {len(checked.edits)} edits in blocks {blocks}")
    result = intervene(
        lm, checked.results, transcoders, checked.edits, top_k=req.top_k, max_new_tokens=req.max_new_tokens
    )
    return {"analysis_id": analysis_id, **result}
