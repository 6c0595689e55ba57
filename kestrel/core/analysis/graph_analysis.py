"""The ``graph`` analysis: an attribution graph of one prompt over stored transcoders, pruned,
stored as results.json (the graph's nodes and links), a report, and a drawing of the graph.

Each transcoder is an SAE of the store trained from an MLP's input to its output
(``target_layer`` ``model.layers.<i>.mlp``); blocks without one count as whole error nodes, so
completeness says how much of the answer the chosen transcoders explain.
"""

from __future__ import annotations

from typing import Any

from kestrel.core.analysis.common import (
    AnalysisOutput,
    ModelLoader,
    ProgressFn,
    StopFn,
    check_stop,
    report_progress,
    require_loader,
)
from kestrel.core.analysis.config import GraphConfig
from kestrel.core.analysis.graph import attribution_graph, graph_json, prune
from kestrel.core.analysis.report import Report, new_figure, table
from kestrel.core.sae.records import transcoder_blocks
from kestrel.core.store import Store

TOP_NODES = 20


def load_transcoders(store: Store, sae_ids: list[str], model: str) -> tuple[dict[int, Any], dict[int, str]]:
    """Block index → loaded transcoder, and block index → its SAE id, checked by
    `transcoder_blocks` (read once: the graph's JSON names the transcoders it was built with,
    even if one is deleted while the backward passes run)."""
    from kestrel.core.sae.artifacts import load_sae

    loaded = [load_sae(store, sae_id) for sae_id in sae_ids]
    blocks = transcoder_blocks([summary for _, summary in loaded], model)
    by_id = {summary.id: sae for sae, summary in loaded}
    return {block: by_id[sae_id].eval() for block, sae_id in blocks.items()}, blocks


def analyze(
    store: Store,
    config: GraphConfig,
    *,
    model_loader: ModelLoader | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    **_: object,
) -> AnalysisOutput:
    lm = require_loader(model_loader, "graph")(config.model, config.model_dtype)
    transcoders, transcoder_ids = load_transcoders(store, config.transcoders, lm.name)
    for sae in transcoders.values():
        sae.to(lm.device)

    def on_batch(done: int, total: int) -> None:
        check_stop(should_stop, "the backward passes")
        report_progress(progress, done / total, f"{done}/{total} target nodes attributed")

    graph = attribution_graph(
        lm,
        config.prompt,
        transcoders,
        target=config.target,
        max_features=config.max_features,
        on_batch=on_batch,
    )
    nodes, edges = prune(graph, config.node_keep, config.edge_keep)
    exported = graph_json(graph, nodes, edges, transcoder_ids)
    n_features = int(graph.kinds("feature").sum())
    kept_features = int((nodes & graph.kinds("feature")).sum())
    source = {
        "model": lm.name,
        "prompt": config.prompt,
        "transcoders": config.transcoders,
        "blocks": sorted(transcoders),
    }
    key_numbers = {
        "target": exported["target"]["token"],
        "replacement": graph.scores["replacement"],
        "completeness": graph.scores["completeness"],
        "features": n_features,
        "features_kept": kept_features,
        "links_kept": len(exported["links"]),
    }
    results = {
        "definitions": {
            "edge": "direct effect of the source on the target in the frozen replacement model",
            "influence": "the node's total effect on the logit over all paths, |A| row-normalised",
            "replacement": "token influence / (token + error influence)",
            "completeness": "influence-weighted share of each node's input that is not from error nodes",
        },
        **exported,
    }
    return AnalysisOutput(source, key_numbers, results, _report(config, source, key_numbers, exported))


def _report(
    config: GraphConfig, source: dict[str, Any], numbers: dict[str, Any], graph: dict[str, Any]
) -> Report:
    features = sorted(
        (n for n in graph["nodes"] if n["kind"] == "feature"), key=lambda n: n["influence"], reverse=True
    )[:TOP_NODES]
    columns = ("layer", "position", "latent", "activation", "influence")
    rows = [[n[c] for c in columns[:2]] + [graph["tokens"][n["position"]]] + [n[c] for c in columns[2:]]
            for n in features]  # fmt: skip
    report = Report(
        title=config.title or f"Attribution graph: {config.prompt!r} → {numbers['target']!r}",
        measured=(
            "The direct effect of every active transcoder feature, error node and token embedding on "
            "every active feature and on the target logit (demeaned), in the model with its MLPs "
            "replaced by transcoders plus errors and its attention patterns and norm scales frozen on "
            f"this prompt; pruned to the nodes that carry {config.node_keep:.0%} of the influence on "
            f"the logit and the edges that carry {config.edge_keep:.0%} of theirs."
        ),
        source=[
            ("model", source["model"]),
            ("prompt", repr(source["prompt"])),
            ("transcoder blocks", ", ".join(str(b) for b in source["blocks"])),
        ],
        key_numbers=[
            ("target token", repr(numbers["target"])),
            ("replacement score", numbers["replacement"]),
            ("completeness score", numbers["completeness"]),
            ("active features", numbers["features"]),
            ("features kept", numbers["features_kept"]),
            ("links kept", numbers["links_kept"]),
        ],
        sections=[
            (
                f"Most influential features (top {len(rows)})" if rows else "Most influential features",
                table(["layer", "position", "token", "latent", "activation", "influence"], rows)
                if rows
                else f"No feature carries enough influence to be kept at node_keep {config.node_keep}: "
                "the tokens and error nodes explain the logit (raise node_keep to see more).",
            )
        ],
        notes=[
            "Completeness 1.0: every node's input comes from features and tokens; blocks without a "
            "transcoder are whole error nodes and lower it.",
            "Edges are exact for the frozen replacement model (tested against finite differences); "
            "they linearise attention, so check a claim by steering or ablating the feature.",
        ],
    )
    report.add_plot("graph", "The pruned attribution graph: position across, layer up", _drawing(graph))
    return report


def _drawing(graph: dict[str, Any]):
    """Nodes at (position, layer): tokens at the bottom, the logit on top; edge width by weight,
    blue for positive, red for negative."""
    layers = [n["layer"] for n in graph["nodes"] if n["layer"] is not None]
    top = (max(layers) + 1) if layers else 1
    n_pos = len(graph["tokens"])
    figure = new_figure(max(6.0, 0.9 * n_pos + 2), max(4.0, 0.28 * top + 2.5))
    ax = figure.subplots()
    place: dict[str, tuple[float, float]] = {}
    cell: dict[tuple[int, int], int] = {}  # features drawn so far at (position, layer)
    for node in graph["nodes"]:
        y = -1.0 if node["kind"] == "token" else (top if node["kind"] == "logit" else node["layer"])
        offset = 0.18 if node["kind"] == "error" else 0.0
        if node["kind"] == "feature":  # side by side to the left, not one dot hiding the others
            seen = cell[node["position"], node["layer"]] = cell.get((node["position"], node["layer"]), 0) + 1
            offset = -0.4 * (1 - 0.6 ** (seen - 1))
        place[node["id"]] = (node["position"] + offset, y)
    biggest = max((abs(link["weight"]) for link in graph["links"]), default=1.0) or 1.0
    for link in graph["links"]:
        (x0, y0), (x1, y1) = place[link["source"]], place[link["target"]]
        colour = "#2563eb" if link["weight"] > 0 else "#dc2626"
        ax.plot(
            [x0, x1], [y0, y1], color=colour, alpha=0.5, linewidth=0.3 + 2.5 * abs(link["weight"]) / biggest
        )
    styles = {
        "feature": ("o", "#111827"),
        "error": ("s", "#9ca3af"),
        "token": ("^", "#059669"),
        "logit": ("*", "#d97706"),
    }
    for kind, (marker, colour) in styles.items():
        points = [place[n["id"]] for n in graph["nodes"] if n["kind"] == kind]
        if points:
            ax.scatter(*zip(*points, strict=True), marker=marker, color=colour, s=28, label=kind, zorder=3)
    shown = [t.replace("$", r"\$") for t in graph["tokens"]]
    ax.set_xticks(range(n_pos), shown, rotation=60, ha="right", fontsize=8)
    rows = [-1, *range(top), top]  # whole rows, named: not a fractional axis when no feature is kept
    ax.set_yticks(rows, ["tokens", *(str(layer) for layer in range(top)), "logit"], fontsize=8)
    ax.set_ylim(-1.6, top + 0.6)
    ax.set_ylabel("layer")
    ax.legend(loc="upper left", fontsize=8)
    return figure
