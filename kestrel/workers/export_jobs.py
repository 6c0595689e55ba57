"""Export jobs: an SAE's feature pages in Neuronpedia's bulk-import layout (the model reruns each
stored context, so it is a batch job). Its own module because `kestrel.workers.jobs` is near the
size limit.

Faults: a cancel stops between batches of 128 latents and stores nothing; a kill leaves at most a
hidden ``exports/.staging-<id>`` directory (never listed or served); the reaper requeues the job,
which starts over under the same export id (or answers at once if the first run had published).
The export appears whole (one rename) or not at all.
"""

from __future__ import annotations

import time
from typing import Any

from kestrel.core.concepts.config import EXPORT_FILE, EXPORT_RECORD, NeuronpediaExport, export_rel
from kestrel.core.errors import CancelledError
from kestrel.workers.context import JobContext, job_function
from kestrel.workers.jobs import _sae_model_name


@job_function("export")
def neuronpedia_job(ctx: JobContext, sae_id: str, request: dict[str, Any], export_id: str) -> dict[str, Any]:
    """Write the SAE's feature pages for Neuronpedia and store the zip with the SAE."""
    from kestrel.core.concepts.neuronpedia import export_neuronpedia, publish_export
    from kestrel.core.sae.artifacts import get_sae

    options = NeuronpediaExport.from_dict(request)
    if _exists(ctx, sae_id, export_id):  # a requeued job whose first run published it already
        return ctx.store.read_json("saes", sae_id, export_rel(export_id, EXPORT_RECORD))
    summary = get_sae(ctx.store, sae_id)
    lm = ctx.models.get(_sae_model_name(ctx, summary))
    ctx.log(f"exporting the feature pages of {sae_id} for Neuronpedia ({options.source_set})")

    def on_progress(fraction: float) -> None:
        if ctx.should_stop():
            raise CancelledError("export cancelled; nothing was stored")
        ctx.update(progress=fraction, message=f"{fraction:.0%} of the latents written")

    data = export_neuronpedia(ctx.store, sae_id, lm, options, on_progress=on_progress)
    record = {
        "id": export_id,
        "format": "neuronpedia",
        "sae_id": sae_id,
        "options": options.model_dump(mode="json"),
        "bytes": len(data),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    publish_export(ctx.store, sae_id, export_id, data, record)
    ctx.outcome = f"{len(data):,} bytes in export {export_id} ({EXPORT_FILE})"
    return record


def _exists(ctx: JobContext, sae_id: str, export_id: str) -> bool:
    return bool(ctx.store.list_files("saes", sae_id, export_rel(export_id) + "/"))
