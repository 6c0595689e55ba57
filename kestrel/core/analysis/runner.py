"""``run_analysis``: one entry for every analysis, and the reading side of the artifacts.

An analysis is computed first, entirely in memory (its results are summaries, never the run's
rows), and only then written through ``store.writer("analyses", id)``: ``results.json``,
``report.md``, ``plots/<name>.png``, and ``manifest.json`` last, so a listing never shows a
half-written analysis and a cancelled one leaves nothing. Only the Store protocol's verbs are
used (writer, exists, list, read_json, local_path, delete), so any backend serves it.
"""

from __future__ import annotations

import json
import math
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from kestrel.core.analysis import causal, circuit, feature, graph_analysis, neuron
from kestrel.core.analysis.common import AnalysisOutput, ModelLoader, ProgressFn, StopFn, check_stop
from kestrel.core.analysis.config import parse_config
from kestrel.core.analysis.records import FORMAT_VERSION, KIND, AnalysisManifest

# Re-exported: the store reads live in the torch-free records module.
from kestrel.core.analysis.records import PLOT_NAME as PLOT_NAME
from kestrel.core.analysis.records import delete_analysis as delete_analysis
from kestrel.core.analysis.records import get_analysis as get_analysis
from kestrel.core.analysis.records import get_results as get_results
from kestrel.core.analysis.records import list_analyses as list_analyses
from kestrel.core.analysis.records import plot_path as plot_path
from kestrel.core.analysis.records import report_path as report_path
from kestrel.core.errors import ConflictError
from kestrel.core.store import Store, new_id, validate_id

ANALYZERS = {
    "neuron": neuron.analyze,
    "feature": feature.analyze,
    "causal": causal.analyze,
    "circuit": circuit.analyze,
    "graph": graph_analysis.analyze,
}


def run_analysis(
    store: Store,
    config: Any,
    *,
    model_loader: ModelLoader | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    analysis_id: str | None = None,
    record: dict[str, Any] | None = None,
) -> str:
    """Run one analysis (a config or its dict) and publish it; return its id.

    ``model_loader(name, dtype)`` gives a loaded model (a worker passes its model cache); the
    neuron analysis needs none, the feature analysis uses one only for its tokenizer. ``record``
    is the request as the client made it, stored as the manifest's ``config`` in place of the
    engine's (a worker resolves an upload id to a path in the store; the manifest keeps the id).
    """
    config = parse_config(config)
    analysis_id = validate_id(analysis_id, "analysis id") if analysis_id else new_id("analysis")
    if store.exists(KIND, analysis_id):
        raise ConflictError(f"analysis id {analysis_id!r} already exists", details={"id": analysis_id})
    started = time.perf_counter()
    output = ANALYZERS[config.kind](
        store,
        config,
        model_loader=model_loader,
        progress=progress,
        should_stop=should_stop,
        dataset_record=(record or {}).get("dataset"),
    )
    check_stop(should_stop, "writing the report")
    manifest = _manifest(analysis_id, config, output, time.perf_counter() - started)
    if record is not None:
        manifest.config = jsonable(record)
    _publish(store, analysis_id, output, manifest)
    if progress is not None:
        progress(1.0, "written")
    return analysis_id


def _manifest(analysis_id: str, config: Any, output: AnalysisOutput, seconds: float) -> AnalysisManifest:
    return AnalysisManifest.model_validate(
        jsonable(
            {
                "format_version": FORMAT_VERSION,
                "id": analysis_id,
                "kind": config.kind,
                "title": output.report.title,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "source": output.source,
                "config": config.model_dump(mode="json"),
                "key_numbers": output.key_numbers,
                "plots": [plot.name for plot in output.report.plots],
                "files": ["results.json", "report.md"]
                + [f"plots/{plot.name}.png" for plot in output.report.plots],
                "seconds": round(seconds, 3),
            }
        )
    )


def _publish(store: Store, analysis_id: str, output: AnalysisOutput, manifest: AnalysisManifest) -> None:
    with store.writer(KIND, analysis_id) as writer:
        directory = Path(writer.directory)
        (directory / "results.json").write_text(json.dumps(jsonable(output.results), indent=1))
        (directory / "report.md").write_text(output.report.markdown(), encoding="utf-8")
        (directory / "plots").mkdir()
        for plot in output.report.plots:
            (directory / "plots" / f"{plot.name}.png").write_bytes(plot.png)
        writer.commit(manifest.to_json())


def jsonable(value: Any) -> Any:
    """Plain JSON: numpy scalars and arrays as Python values, NaN and ±inf as null (strict parsers)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------------------------------------
# Reading
