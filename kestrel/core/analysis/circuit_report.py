"""The circuit analysis's artifact: results, key numbers, report and plots from its grids.

Each component kind is a grid (``circuit.Grid``): rows × columns of estimated fractions restored
(AtP*), the cells real patching measured (NaN elsewhere), and the GradDrop score when asked for.
The heatmap named ``patching`` stays the residual grid (measured for ``patching``, estimated for
``atp``), so links to ``plots/patching`` keep working whichever method ran.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kestrel.core.analysis.common import AnalysisOutput
from kestrel.core.analysis.report import Report, new_figure, table

TOP_CELLS = 15


def output(config, lm, layers, clean_P, corrupt_P, grids, qk: dict[str, Any], timings) -> AnalysisOutput:
    resid = grids[0]
    shown = resid.measured if config.method == "patching" else resid.estimate
    labels = resid.columns
    source = {
        "model": lm.name,
        "layers": layers,
        "n_pairs": len(config.pairs),
        "n_tokens": len(labels),
        "method": config.method,
        "components": list(config.components),
        **({"sae_id": config.sae_id} if config.sae_id else {}),
    }
    r, c = _best(resid)
    agreement = {grid.kind: grid.agreement() for grid in grids}
    key_numbers = {
        "clean_logit_diff": float(clean_P.mean()),
        "corrupt_logit_diff": float(corrupt_P.mean()),
        "best_layer": layers[r],
        "best_position": c,
        "best_token": labels[c],
        "best_fraction_restored": float(
            shown[r, c] if np.isnan(resid.measured[r, c]) else resid.measured[r, c]
        ),
        "method": config.method,
        "spearman": agreement["resid"]["spearman"],
        "mean_abs_error": agreement["resid"]["mean_abs_error"],
        "atp_seconds": round(timings["atp_s"], 3),
        "patching_seconds": round(timings["patching_s"], 3),
    }
    results = {
        "definitions": {
            "logit_diff": "logit(correct) - logit(wrong) at the last position",
            "fraction_restored": "(mean patched - mean corrupt) / (mean clean - mean corrupt), pair means",
            "estimate": "AtP*: sum of (clean - corrupt) * d(mean logit diff)/d(activation) at the corrupted "
            "run over the cell, divided by (mean clean - mean corrupt)",
            "grad_drop": "AtP* GradDrop: mean over blocks of |estimate with that block's gradient dropped|",
        },
        "method": config.method,
        "layers": layers,
        "positions": labels,
        "clean_logit_diff": clean_P.tolist(),
        "corrupt_logit_diff": corrupt_P.tolist(),
        "fraction_restored": shown.tolist(),
        "estimated_fraction_restored": resid.estimate.tolist(),
        **(
            {
                "patched_logit_diff": (
                    resid.measured * _gap(clean_P, corrupt_P) + float(corrupt_P.mean())
                ).tolist()
            }
            if config.method == "patching"
            else {}
        ),
        "components": {grid.kind: _grid_record(grid) for grid in grids},
        "agreement": agreement,
        "qk_fix": qk,
        "timings": timings,
        "pairs": [p.model_dump() for p in config.pairs],
    }
    return AnalysisOutput(
        source, key_numbers, results, _report(config, source, key_numbers, grids, qk, agreement, timings)
    )


def _gap(clean_P, corrupt_P) -> float:
    return float(clean_P.mean() - corrupt_P.mean())


def _best(grid) -> tuple[int, int]:
    """The measured cell that restores most; the best estimate when none was measured."""
    values = grid.measured if not np.all(np.isnan(grid.measured)) else grid.estimate
    flat = int(np.nanargmax(values))
    r, c = np.unravel_index(flat, values.shape)
    return int(r), int(c)


def _grid_record(grid) -> dict[str, Any]:
    return {
        "rows": grid.rows,
        "columns": grid.columns,
        "estimate": grid.estimate.tolist(),
        "measured": grid.measured.tolist(),  # NaN (null in results.json) where not patched
        "grad_drop": None if grid.grad_drop is None else grid.grad_drop.tolist(),
        "confirmed": [
            {
                "row": grid.rows[r],
                "column": grid.columns[c],
                "estimate": grid.estimate[r, c],
                "measured": grid.measured[r, c],
            }
            for r, c in np.argwhere(~np.isnan(grid.measured))
        ][:1000],
    }


def _cells(grid, labels: list[str] | None) -> list[list[Any]]:
    """The top cells: by measured value where patched, the rest by estimate below them."""
    measured = ~np.isnan(grid.measured)
    key = np.where(measured, grid.measured, grid.estimate)
    order = np.lexsort((-key.ravel(), ~measured.ravel()))[:TOP_CELLS]
    rows = []
    for flat in order:
        r, c = np.unravel_index(int(flat), key.shape)
        column = grid.columns[c] if labels is None else f"{c} ({labels[c]})"
        rows.append([grid.rows[r], column, float(grid.estimate[r, c]), _or_dash(grid.measured[r, c])])
    return rows


def _or_dash(value: float) -> Any:
    return "–" if np.isnan(value) else float(value)


def _report(config, source, key_numbers, grids, qk, agreement, timings) -> Report:
    resid = grids[0]
    labels = resid.columns
    first = config.pairs[0]
    atp = config.method == "atp"
    what = "Attribution patching (AtP*)" if atp else "Activation patching"
    report = Report(
        title=config.title
        or f"{what}: {source['model']}, {len(resid.rows)} layers × {len(labels)} positions",
        measured=(
            "The metric is the logit difference logit(correct) − logit(wrong) at the last position; "
            "each cell reports the **fraction of the clean − corrupt difference it restores** when that "
            "one activation of the corrupted run is replaced by its clean value: (patched − corrupt) / "
            "(clean − corrupt), pair means. "
            + (
                "Every cell was **estimated** from one forward and one backward per run (AtP*: activation "
                "difference × gradient at the corrupted run), and the top candidates of each component were "
                "**confirmed** by real patching."
                if atp
                else "Every cell was **patched** for real (one forward each); the AtP* estimate is "
                "reported beside it, with their agreement over all cells."
            )
        ),
        source=[
            ("model", source["model"]),
            ("layers", ", ".join(resid.rows[:8]) + (" …" if len(resid.rows) > 8 else "")),
            ("pairs", source["n_pairs"]),
            ("tokens per prompt", source["n_tokens"]),
            ("first pair", f"{first.clean!r} vs {first.corrupted!r}; {first.correct!r} vs {first.wrong!r}"),
            ("method", config.method + (f", {config.confirm_top} confirmed per component" if atp else "")),
            (
                "components",
                ", ".join(config.components) + (f" (SAE {config.sae_id})" if config.sae_id else ""),
            ),
        ],
        key_numbers=[
            ("clean logit difference", key_numbers["clean_logit_diff"]),
            ("corrupted logit difference", key_numbers["corrupt_logit_diff"]),
            (
                "best cell",
                f"{key_numbers['best_layer']} @ position {key_numbers['best_position']} "
                f"({key_numbers['best_token']})",
            ),
            ("fraction restored there", key_numbers["best_fraction_restored"]),
            *[
                (
                    f"estimate vs patching ({kind}, {a['n_cells']} {a['over']} cells): "
                    "Spearman, mean |error|",
                    "–" if a["n_cells"] == 0 else f"{_fmt(a['spearman'])}, {_fmt(a['mean_abs_error'])}",
                )
                for kind, a in agreement.items()
            ],
            ("attribution time (s)", round(timings["atp_s"], 2)),
            (f"real patching time (s), {timings['n_patched']} cells", round(timings["patching_s"], 2)),
        ],
        sections=[
            (
                f"{grid.kind}: cells that restore the most (top {min(TOP_CELLS, grid.estimate.size)})",
                table(
                    [*_headers(grid.kind), "estimated", "measured"],
                    _cells(grid, labels if grid.kind == "resid" else None),
                ),
            )
            for grid in grids
        ],
        notes=_notes(qk, config),
    )
    shown = resid.measured if not atp else resid.estimate
    caption = "measured" if not atp else "estimated (AtP*)"
    report.add_plot(
        "patching",
        f"Fraction of the logit difference restored, layer × position, {caption}",
        _heatmap(shown, resid.rows, labels),
    )
    if any(grid.kind == "heads" for grid in grids):
        heads = next(grid for grid in grids if grid.kind == "heads")
        values = heads.measured if not atp else heads.estimate
        report.add_plot(
            "heads",
            f"Fraction restored per attention head, {caption}",
            _heatmap(values, heads.rows, heads.columns, "head"),
        )
    if sum(int((~np.isnan(g.measured)).sum()) for g in grids) >= 2:
        report.add_plot(
            "agreement", "Estimated vs measured fraction restored, patched cells", _scatter(grids)
        )
    return report


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


def _headers(kind: str) -> list[str]:
    return {"resid": ["layer", "position"], "heads": ["block", "head"], "latents": ["layer", "latent"]}[kind]


def _notes(qk: dict[str, Any], config) -> list[str]:
    notes = [
        "1.0: patching that one activation restores the clean answer's advantage fully; 0: it carries "
        "none of the difference; negative: it pushes further toward the corrupted answer.",
        "Estimates are first-order: exact for a patch the model responds to linearly, least reliable for "
        "large changes through saturated nonlinearities. The measured column is ground truth; over a few "
        "confirmed cells of similar size, the mean error says more than the rank correlation.",
        "Token labels come from the first pair; clean→corrupt marks where the prompts differ.",
    ]
    if qk["applied"]:
        notes.append(
            "AtP* QK fix on residual cells: the next block's attention under the patch (pattern and "
            "values: its query, key and value at the patched position are the clean run's) is computed "
            "exactly; later blocks' queries and keys, and head and latent cells, stay linear."
        )
    else:
        notes.append(f"AtP* QK fix not applied: {qk['reason']}.")
    if config.grad_drop:
        notes.append(
            "Candidates were ranked by AtP* GradDrop: the mean over blocks of |estimate with that "
            "block's gradient dropped|."
        )
    if config.sae_id:
        notes.append(
            "Latents are patched through the SAE with its reconstruction error kept, at every position."
        )
    return notes


def _heatmap(values, rows, columns, xlabel: str = "position (token)"):
    figure = new_figure(max(6, 0.55 * len(columns) + 3), max(3, 0.35 * len(rows) + 1.5))
    ax = figure.subplots()
    finite = values[np.isfinite(values)]
    bound = max(1.0, float(np.abs(finite).max())) if finite.size else 1.0
    image = ax.imshow(np.nan_to_num(values), cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
    shown = [label.replace("$", r"\$") for label in columns]  # '$' would start mathtext
    ax.set_xticks(np.arange(len(columns)), shown, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(np.arange(len(rows)), rows, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer")
    figure.colorbar(image, ax=ax, label="fraction restored")
    return figure


def _scatter(grids):
    figure = new_figure(5.5, 5)
    ax = figure.subplots()
    for grid in grids:
        done = ~np.isnan(grid.measured)
        ax.scatter(grid.estimate[done], grid.measured[done], s=14, label=grid.kind)
    low, high = ax.get_xlim()
    ax.plot([low, high], [low, high], color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("estimated (AtP*)")
    ax.set_ylabel("measured (patching)")
    ax.legend()
    return figure
