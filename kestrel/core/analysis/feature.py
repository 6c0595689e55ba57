"""PCA and k-means of a stored layer, on a bounded uniform sample of its rows.

The run is streamed once; a uniform sample of at most ``sample_rows`` rows is kept by giving each
row a random key and keeping the smallest keys (memory: the sample plus one batch). PCA
(scikit-learn ``PCA``) and k-means (``MiniBatchKMeans``) both run on that sample, which the report
says: the explained-variance ratios are fractions of the *sample's* total variance. The rows
nearest each cluster centre are traced back through ``doc_index`` and ``position`` to
``docs.jsonl`` and shown as the token in its context (with the run's tokenizer when a model
loader is given; otherwise as the start of the document).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kestrel.core.analysis.common import (
    AnalysisOutput,
    ModelLoader,
    ProgressFn,
    StopFn,
    check_stop,
    report_progress,
    stored_run_rows,
    stored_run_source,
)
from kestrel.core.analysis.config import FeatureConfig
from kestrel.core.analysis.report import Report, new_figure, table
from kestrel.core.concepts.accumulate import pack_rows, unpack_rows
from kestrel.core.concepts.contexts import iter_docs_jsonl, token_windows
from kestrel.core.errors import InvalidInputError, KestrelError
from kestrel.core.run_reader import iter_row_batches
from kestrel.core.runs import RunManifest, get_manifest
from kestrel.core.store import Store

BATCH_ROWS = 8192
SCATTER_POINTS = 4000
DOC_PREVIEW_CHARS = 160


def uniform_sample(
    store: Store, config: FeatureConfig, total: int, progress: ProgressFn | None, should_stop: StopFn | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(acts [S, d] float32, packed rows [S])``: a uniform sample of at most ``sample_rows`` rows."""
    generator = torch.Generator().manual_seed(config.seed)
    keys = torch.empty(0)
    acts = torch.empty(0)
    rows = torch.empty(0, dtype=torch.int64)
    seen = 0
    for batch in iter_row_batches(
        store, config.run_id, config.layer, batch_size=BATCH_ROWS, filters=config.filters
    ):
        check_stop(should_stop, "sampling")
        keys = torch.cat([keys, torch.rand(len(batch), generator=generator)])
        acts = torch.cat([acts, batch.acts_ND.float()]) if len(acts) else batch.acts_ND.float()
        rows = torch.cat([rows, pack_rows(batch.doc_index_N, batch.position_N)])
        if len(keys) > config.sample_rows:
            keep = torch.topk(keys, config.sample_rows, largest=False).indices
            keys, acts, rows = keys[keep], acts[keep], rows[keep]
        seen += len(batch)
        report_progress(progress, 0.6 * seen / max(total, 1), f"sampled from {seen:,} rows")
    if len(acts) < 2:
        raise InvalidInputError(
            f"run {config.run_id!r} layer {config.layer!r} has {len(acts)} row(s) after the filters; "
            "PCA and k-means need at least 2"
        )
    return acts, rows


def contexts(
    store: Store, run_id: str, manifest: RunManifest, rows_R: torch.Tensor, tokenizer: Any, window: int
) -> list[str]:
    """Each packed row as a readable context: tokens around it with the token in «»."""
    docs_path = store.local_path("activations", run_id, "docs.jsonl")
    order = torch.argsort(rows_R)
    unique_U, inverse_R = torch.unique(rows_R[order], return_inverse=True)
    doc_U, position_U = unpack_rows(unique_U)
    if tokenizer is None:
        wanted = set(doc_U.tolist())
        texts = {i: t for i, t in iter_docs_jsonl(docs_path) if i in wanted}
        shown = [
            f"doc {d}, token {p}: {texts.get(int(d), '')[:DOC_PREVIEW_CHARS]}"
            for d, p in zip(doc_U.tolist(), position_U.tolist(), strict=True)
        ]
    else:
        max_length = manifest.options.max_length or 512
        windows_UW = token_windows(
            unique_U, iter_docs_jsonl(docs_path), tokenizer, max_length=max_length, window=window
        )
        shown = [_window_text(tokenizer, w.tolist(), window) for w in windows_UW]
    result = [""] * len(rows_R)
    for slot, u in zip(order.tolist(), inverse_R.tolist(), strict=True):
        result[slot] = shown[u]
    return result


def _window_text(tokenizer, ids: list[int], window: int) -> str:
    before = tokenizer.decode([i for i in ids[:window] if i >= 0])
    target = tokenizer.decode([ids[window]]) if ids[window] >= 0 else ""
    after = tokenizer.decode([i for i in ids[window + 1 :] if i >= 0])
    return f"{before}«{target}»{after}"


def analyze(
    store: Store,
    config: FeatureConfig,
    *,
    model_loader: ModelLoader | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    **_: object,
) -> AnalysisOutput:
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.decomposition import PCA

    manifest = get_manifest(store, config.run_id)
    manifest.layer(config.layer)  # NotFoundError naming the run's layers
    acts_SD, rows_S = uniform_sample(store, config, manifest.n_tokens, progress, should_stop)
    x_SD = acts_SD.numpy().astype(np.float64)
    n, d = x_SD.shape
    n_components = min(config.n_components, d, n)
    report_progress(progress, 0.65, f"PCA on {n:,} rows")
    pca = PCA(n_components=n_components, random_state=config.seed).fit(x_SD)
    check_stop(should_stop, "PCA")
    n_clusters = min(config.n_clusters, n)
    report_progress(progress, 0.75, f"k-means, {n_clusters} clusters")
    kmeans = MiniBatchKMeans(
        n_clusters=n_clusters, random_state=config.seed, n_init=3, batch_size=min(2048, n)
    ).fit(x_SD)
    labels_S = kmeans.labels_
    distances_S = kmeans.transform(x_SD)[np.arange(n), labels_S]
    nearest = _nearest_per_cluster(labels_S, distances_S, n_clusters, config.texts_per_cluster)
    report_progress(progress, 0.85, "contexts nearest each centre")
    tokenizer = _tokenizer(model_loader, manifest)
    picked = [i for members in nearest for i in members]
    shown = (
        contexts(store, config.run_id, manifest, rows_S[picked], tokenizer, config.window) if picked else []
    )
    texts = iter(shown)
    ratio = pca.explained_variance_ratio_
    cumulative = np.cumsum(ratio)
    clusters = []
    for c, members in enumerate(nearest):
        docs, positions = unpack_rows(rows_S[members]) if members else (torch.empty(0), torch.empty(0))
        clusters.append(
            {
                "cluster": c,
                "size": int((labels_S == c).sum()),
                "nearest": [
                    {
                        "doc_index": int(di),
                        "position": int(p),
                        "distance": float(distances_S[i]),
                        "context": next(texts),
                    }
                    for i, di, p in zip(members, docs.tolist(), positions.tolist(), strict=True)
                ],
            }
        )
    source = stored_run_source(config, manifest, d, n_sample=n)
    key_numbers = {
        "sample_rows": n,
        "components_for_50pct": _components_for(cumulative, 0.5),
        "components_for_90pct": _components_for(cumulative, 0.9),
        "pc1_variance": float(ratio[0]),
        "variance_explained_kept": float(cumulative[-1]),
        "n_clusters": n_clusters,
        "kmeans_inertia_per_row": float(kmeans.inertia_ / n),
    }
    results = {
        "method": {
            "sample": f"uniform sample of at most {config.sample_rows} rows (seed {config.seed})",
            "pca": "sklearn.decomposition.PCA on the sample; ratios are of the sample's total variance",
            "kmeans": "sklearn.cluster.MiniBatchKMeans on the raw (uncentred, unscaled) sampled rows",
        },
        "explained_variance_ratio": ratio.tolist(),
        "cumulative_explained_variance": cumulative.tolist(),
        "singular_values": pca.singular_values_.tolist(),
        "clusters": clusters,
        "kmeans_inertia": float(kmeans.inertia_),
    }
    report = _report(config, source, key_numbers, ratio, cumulative, clusters, pca, kmeans, x_SD, labels_S)
    return AnalysisOutput(source, key_numbers, results, report)


def _tokenizer(model_loader, manifest: RunManifest):
    """The run's tokenizer, to show tokens in context; None (document text instead) when the
    run's model cannot be loaded here, e.g. a run captured inside someone's training loop."""
    name = manifest.model.name
    if model_loader is None or not name or not manifest.model.loadable:
        return None  # the name is not one the service can load, and could name an unrelated model
    try:
        return model_loader(name).tokenizer
    except (KestrelError, OSError):
        return None


def _nearest_per_cluster(labels_S, distances_S, n_clusters: int, k: int) -> list[list[int]]:
    nearest = []
    for c in range(n_clusters):
        members = np.flatnonzero(labels_S == c)
        nearest.append([int(i) for i in members[np.argsort(distances_S[members])[:k]]])
    return nearest


def _components_for(cumulative: np.ndarray, fraction: float) -> int | None:
    """Smallest number of components reaching ``fraction`` of the variance (None if the kept ones don't)."""
    hits = np.flatnonzero(cumulative >= fraction - 1e-12)
    return int(hits[0]) + 1 if len(hits) else None


def _report(config, source, key_numbers, ratio, cumulative, clusters, pca, kmeans, x_SD, labels_S) -> Report:
    cluster_lines = []
    for cluster in clusters:
        cluster_lines.append(f"**Cluster {cluster['cluster']}** ({cluster['size']:,} rows)\n")
        for item in cluster["nearest"]:
            context = item["context"].replace("\n", "⏎").replace("`", "'")
            cluster_lines.append(f"- `{context}` (doc {item['doc_index']}, token {item['position']})")
        cluster_lines.append("")
    pct = [(f"PC{i + 1}", float(ratio[i]), float(cumulative[i])) for i in range(min(10, len(ratio)))]
    report = Report(
        title=config.title or f"Feature structure: {config.layer} of run {config.run_id}",
        measured=(
            f"Principal components (scikit-learn PCA) and k-means clusters (MiniBatchKMeans, "
            f"k = {key_numbers['n_clusters']}) of the layer's activations, both on a uniform sample of "
            f"{key_numbers['sample_rows']:,} rows (at most {config.sample_rows:,}). For each cluster, the "
            "rows nearest its centre are shown as their token in context («token»)."
        ),
        source=stored_run_rows(source, "sampled rows", "n_sample"),
        key_numbers=[
            ("variance of PC1", key_numbers["pc1_variance"]),
            ("components for 50% of the variance", key_numbers["components_for_50pct"]),
            ("components for 90% of the variance", key_numbers["components_for_90pct"]),
            (f"variance in the {len(ratio)} components kept", key_numbers["variance_explained_kept"]),
            ("clusters", key_numbers["n_clusters"]),
            ("k-means inertia per row", key_numbers["kmeans_inertia_per_row"]),
        ],
        sections=[
            ("Explained variance", table(["component", "ratio", "cumulative"], pct)),
            ("Clusters and the contexts nearest each centre", "\n".join(cluster_lines)),
        ],
        notes=[
            "Ratios are fractions of the sample's total variance; a steep curve means a few directions "
            "carry most of the variance (often a large constant offset shows as a dominant PC1).",
            "k-means runs on raw activations, so clusters may separate by norm as much as by direction.",
            "Contexts nearest a centre are its most typical rows, not its most extreme ones.",
        ],
    )
    report.add_plot(
        "explained_variance",
        "Explained variance ratio per component (bars) and cumulative (line)",
        _variance_figure(ratio, cumulative),
    )
    report.add_plot(
        "clusters",
        "Sampled rows on PC1 × PC2, coloured by k-means cluster; × marks the centres",
        _cluster_figure(pca, kmeans, x_SD, labels_S, config.seed),
    )
    return report


def _variance_figure(ratio, cumulative):
    figure = new_figure(8, 4)
    ax = figure.subplots()
    components = np.arange(1, len(ratio) + 1)
    ax.bar(components, ratio, color="tab:blue", label="per component")
    ax.set_xlabel("principal component")
    ax.set_ylabel("explained variance ratio")
    twin = ax.twinx()
    twin.plot(components, cumulative, color="tab:orange", marker=".", label="cumulative")
    twin.set_ylim(0, 1.02)
    twin.set_ylabel("cumulative")
    return figure


def _cluster_figure(pca, kmeans, x_SD, labels_S, seed: int):
    figure = new_figure(7, 6)
    ax = figure.subplots()
    rng = np.random.default_rng(seed)
    shown = rng.choice(len(x_SD), size=min(SCATTER_POINTS, len(x_SD)), replace=False)
    projected = pca.transform(x_SD[shown])
    centres = pca.transform(kmeans.cluster_centers_)
    second = projected[:, 1] if projected.shape[1] > 1 else np.zeros(len(projected))
    ax.scatter(projected[:, 0], second, c=labels_S[shown], cmap="tab20", s=6, alpha=0.6)
    ax.scatter(
        centres[:, 0],
        centres[:, 1] if centres.shape[1] > 1 else np.zeros(len(centres)),
        marker="x",
        s=80,
        c="black",
    )
    for c, centre in enumerate(centres):
        xy = (centre[0], centre[1] if len(centre) > 1 else 0.0)
        ax.annotate(str(c), xy, xytext=(6, 6), textcoords="offset points", fontsize=9)
    ax.set_xlabel("PC1")
    ax.set_ylabel("PC2")
    return figure
