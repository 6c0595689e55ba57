"""The ledger job: an SAE's evaluation ledger (`kestrel.core.sae.ledger`), computed in a batch
worker. Its own module because `kestrel.workers.jobs` is near the size limit.

Faults: nothing is written until the whole ledger is computed, and then in one rename, so a job
killed midway leaves the SAE's previous ledger (or none) and never half of one. A worker shutdown
stops the job at its next check and requeues it; a dead worker's job is requeued by the reaper
(``ledger`` is among its requeued kinds); either way the rerun computes the ledger from the start.
A cancel writes nothing.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from kestrel.core.sae.ledger_records import LabelledDataset, LedgerOptions, resolve_labelled
from kestrel.workers.context import JobContext, job_function


@job_function("ledger")
def ledger_job(
    ctx: JobContext, sae_id: str, options: dict[str, Any] | None = None, dataset: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Compute and store the SAE's ledger; return its headline values."""
    from kestrel.core.sae.artifacts import get_sae, require_loadable_model
    from kestrel.core.sae.ledger import compute_ledger

    opts = LedgerOptions.model_validate(options or {})
    texts = labels = None
    if dataset is not None:  # the API checked it; read again, as the worker sees the store now
        spec = TypeAdapter(LabelledDataset).validate_python(dataset)
        texts, labels = resolve_labelled(ctx.store, spec, opts.test_fraction)
    summary = get_sae(ctx.store, sae_id)
    require_loadable_model(ctx.store, summary)
    model, _ = summary.model_and_layer()
    lm = ctx.models.get(model)
    if ctx.attempt > 1:
        ctx.log(f"run {ctx.attempt}: computing the ledger again from the start", force=True)
    ctx.log(f"ledger of {sae_id} with {lm.name}" + (f" and {len(texts)} labelled texts" if texts else ""))

    def on_progress(fraction: float, stage: str) -> None:
        ctx.update(progress=fraction, message=f"ledger: {stage}")

    ledger = compute_ledger(
        ctx.store,
        sae_id,
        lm,
        opts,
        texts=texts,
        labels=labels,
        on_progress=on_progress,
        should_stop=ctx.should_stop,
    )
    if ledger is None:
        return ctx.stopped("no ledger written", {"sae_id": sae_id})  # type: ignore[return-value]
    values = {name: e["value"] for name, e in ledger["entries"].items()}
    ctx.update(metrics=values, force=True)
    return {"sae_id": sae_id, "computed_at": ledger["computed_at"], "values": values}
