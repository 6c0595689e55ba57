"""Causal importance by ablation: how much the next-token loss and the output distribution change
when a layer's output (or one SAE latent) is replaced by zero or by its dataset mean.

Two passes over the same texts. The first records each target's mean over every non-pad position
(the value mean ablation substitutes). The second runs, per batch, one clean forward and one
forward per (target, method) with a controller from ``kestrel.core.hooks``, and accumulates over
the positions that have a next token (both the position and the next one are real tokens):

* Δloss = mean CE(ablated) − mean CE(clean), the next-token cross-entropy in nats;
* KL = mean KL(p_clean ‖ p_ablated) of the next-token distributions.

SAE latents are ablated through the SAE with its reconstruction error kept
(``steering.sae_edit_controller`` with ``clamp`` to 0 or to the latent's mean), so only that
latent's contribution changes: h' = h + (f' − f)·W_dec[latent].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kestrel.core.activations import execution_order
from kestrel.core.analysis.common import (
    AnalysisOutput,
    ModelLoader,
    ProgressFn,
    StopFn,
    check_stop,
    report_progress,
    require_loader,
)
from kestrel.core.analysis.config import CausalConfig
from kestrel.core.analysis.report import Report, new_figure, table
from kestrel.core.datasets import FileSource, describe_source, iter_texts
from kestrel.core.devices import layer_device
from kestrel.core.errors import InvalidInputError
from kestrel.core.hooks import (
    Controller,
    Detector,
    HookContext,
    hooks,
    mean_ablate,
    run_until_stopped,
    stop_after,
    zero_ablate,
)
from kestrel.core.models import LoadedModel, tokenize
from kestrel.core.store import Store

PLOT_TARGETS = 30


@dataclass
class Target:
    """One thing ablated on its own: a layer's whole output, or one latent of an SAE."""

    name: str
    layer: str
    latent: int | None = None
    mean: Tensor | None = None  # [d] for a layer, a scalar for a latent; set by the mean pass


@dataclass
class LossSums:
    ce: float = 0.0
    kl: float = 0.0
    positions: int = 0


@dataclass
class Batch:
    input_ids_BT: Tensor
    mask_BT: Tensor
    valid_BT: Tensor = field(init=False)  # position t has a real next token

    def __post_init__(self) -> None:
        valid = self.mask_BT[:, :-1].bool() & self.mask_BT[:, 1:].bool()
        self.valid_BT = torch.nn.functional.pad(valid, (0, 1), value=False)


def next_token_logprobs(logits_BTV: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
    """``(log p [P, V] float32, next token [P])`` at the P positions that have a next token."""
    logp_PV = torch.log_softmax(logits_BTV[batch.valid_BT].float(), dim=-1)
    next_BT = torch.roll(batch.input_ids_BT, shifts=-1, dims=1)
    return logp_PV, next_BT[batch.valid_BT]


def ce_and_kl(clean_PV: Tensor, ablated_PV: Tensor, next_P: Tensor) -> tuple[float, float]:
    """Summed CE of the ablated run and summed KL(clean ‖ ablated) over the P positions."""
    ce = -ablated_PV.gather(1, next_P[:, None]).sum()
    kl = (clean_PV.exp() * (clean_PV - ablated_PV)).sum()
    return float(ce), float(kl)


def _batches(lm: LoadedModel, texts: list[str], config: CausalConfig) -> list[Batch]:
    out = []
    for start in range(0, len(texts), config.batch_size):
        encoded = tokenize(lm, texts[start : start + config.batch_size], max_length=config.max_length)
        out.append(Batch(encoded["input_ids"], encoded["attention_mask"]))
    return out


def _forward(lm: LoadedModel, batch: Batch, controls: Sequence[Controller | Detector] = ()) -> Tensor:
    with hooks(lm.model, *controls), torch.no_grad():
        return lm.model(input_ids=batch.input_ids_BT, attention_mask=batch.mask_BT).logits


def _latent_values(sae, x: Tensor, latents_E: Tensor) -> Tensor:
    """[..., E] activations of the chosen latents (0 where a latent is not active)."""
    encoded = sae.encode(x.to(device=sae.W_dec.device, dtype=sae.W_dec.dtype))
    hits = encoded.indices.unsqueeze(-2) == latents_E.unsqueeze(-1)
    return (encoded.acts.unsqueeze(-2) * hits).sum(-1)


def _sum_detector(
    layer: str, keep_BT: Tensor, sums: dict[str, Tensor], values: Callable[[Tensor], Tensor]
) -> Detector:
    """Adds ``values(x)`` summed over one batch's non-pad positions into ``sums[layer]`` (float64)."""

    def record(x: Tensor, _: HookContext) -> None:
        values_BT = values(x)  # on the layer's (or its SAE's) device: a split model's may differ
        total = values_BT[keep_BT.to(values_BT.device)].double().sum(0)
        sums[layer] = sums[layer] + total if layer in sums else total

    return Detector(layer, record)


def compute_means(
    lm: LoadedModel, batches: list[Batch], targets: list[Target], sae: Any, should_stop: StopFn | None
) -> None:
    """Each target's mean over every non-pad position of the dataset (for mean ablation); the
    forward stops after the deepest target layer."""
    layers = sorted({t.layer for t in targets})
    if sae is None:
        values: Callable[[Tensor], Tensor] = lambda x: x  # noqa: E731
    else:
        latents_E = torch.tensor([t.latent for t in targets], device=sae.W_dec.device)
        values = lambda x: _latent_values(sae, x, latents_E)  # noqa: E731
    sums: dict[str, Tensor] = {}
    count = 0
    last = execution_order(lm.model, layers)[-1]
    for batch in batches:
        check_stop(should_stop, "the mean pass")
        keep_BT = batch.mask_BT.bool()
        detectors = [_sum_detector(layer, keep_BT, sums, values) for layer in layers] + [stop_after(last)]
        run_until_stopped(lambda batch=batch, detectors=detectors: _forward(lm, batch, detectors))
        count += int(keep_BT.sum())
    for i, target in enumerate(targets):
        mean = sums[target.layer] / max(count, 1)
        target.mean = mean[i] if sae is not None else mean.float()


def controller(target: Target, method: str, sae) -> Controller:
    if sae is None:
        return zero_ablate(target.layer) if method == "zero" else mean_ablate(target.layer, target.mean)
    from kestrel.core.steering import LatentEdit, sae_edit_controller

    value = 0.0 if method == "zero" else float(target.mean)
    return sae_edit_controller(target.layer, sae, [LatentEdit(latent=target.latent, op="clamp", value=value)])


def _targets(lm: LoadedModel, config: CausalConfig, store: Store) -> tuple[list[Target], Any, dict[str, Any]]:
    """The targets, the SAE (or None) and a description of them for the manifest."""
    if config.layers is not None:
        for layer in config.layers:
            lm.layer(layer)  # NotFoundError naming close layers
        return [Target(layer, layer) for layer in config.layers], None, {"layers": config.layers}
    from kestrel.core.sae.artifacts import load_sae

    sae, summary = load_sae(store, config.sae_id, device=lm.device)
    n_latents = summary.n_latents
    bad = [latent for latent in config.latents if latent >= n_latents]
    if bad:
        raise InvalidInputError(
            f"latents {bad} are out of range: sae {config.sae_id!r} has {n_latents} latents"
        )
    layer = summary.layer_name
    lm.layer(layer)
    sae = sae.to(layer_device(lm, layer))  # a split model: where the ablated layer runs
    targets = [Target(f"latent {latent}", layer, latent) for latent in dict.fromkeys(config.latents)]
    return targets, sae.eval(), {"sae_id": config.sae_id, "layer": layer, "latents": config.latents}


def _model_name(config: CausalConfig, store: Store) -> str:
    """The SAE's model when latents are ablated; a different explicit model is a mistake."""
    if config.sae_id is None:
        return config.model
    from kestrel.core.sae.artifacts import get_sae, require_loadable_model

    summary = get_sae(store, config.sae_id)
    require_loadable_model(store, summary)  # a run captured in training or imported: no model here
    sae_model = summary.model_name
    if "model" in config.model_fields_set and sae_model and config.model != sae_model:
        raise InvalidInputError(f"sae {config.sae_id!r} reads {sae_model!r}, not {config.model!r}")
    return sae_model or config.model


def analyze(
    store: Store,
    config: CausalConfig,
    *,
    model_loader: ModelLoader | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    dataset_record: dict[str, Any] | None = None,
    **_: object,
) -> AnalysisOutput:
    """``dataset_record`` is how the source records the dataset (default: ``describe_source``); a
    worker passes the request's, which names an upload by id, not by the path it resolved to."""
    model_name = _model_name(config, store)
    texts = list(islice(iter_texts(config.dataset), config.max_texts))
    lm = require_loader(model_loader, "causal")(model_name, config.model_dtype)
    targets, sae, target_record = _targets(lm, config, store)
    batches = _batches(lm, texts, config)
    steps = len(batches) * (2 + len(targets) * len(config.methods))
    report_progress(progress, 0.0, "mean pass")
    if "mean" in config.methods:
        compute_means(lm, batches, targets, sae, should_stop)
    clean = LossSums()
    ablated = {(t.name, m): LossSums() for t in targets for m in config.methods}
    done = len(batches)
    for batch in batches:
        check_stop(should_stop, "the ablation pass")
        clean_PV, next_P = next_token_logprobs(_forward(lm, batch), batch)
        ce, _ = ce_and_kl(clean_PV, clean_PV, next_P)
        clean.ce, clean.positions = clean.ce + ce, clean.positions + len(next_P)
        done += 1
        for target in targets:
            for method in config.methods:
                ablated_PV, _ = next_token_logprobs(
                    _forward(lm, batch, [controller(target, method, sae)]), batch
                )
                ce, kl = ce_and_kl(clean_PV, ablated_PV, next_P)
                sums = ablated[(target.name, method)]
                sums.ce, sums.kl, sums.positions = sums.ce + ce, sums.kl + kl, sums.positions + len(next_P)
                done += 1
            report_progress(progress, done / steps, f"{done}/{steps} forwards")
    if clean.positions == 0:
        raise InvalidInputError("no text has two or more tokens: there is no next token to predict")
    ranking = _ranking(targets, config, clean, ablated)
    source = {
        "model": lm.name,
        **target_record,
        "dataset": _dataset_name(config, dataset_record),
        "n_texts": len(texts),
        "n_positions": clean.positions,
    }
    key_numbers = {
        "clean_loss": clean.ce / clean.positions,
        "top_target": ranking[0]["target"],
        "top_delta_loss": max(m["delta_loss"] for m in ranking[0]["methods"].values()),
        "top_kl": max(m["kl"] for m in ranking[0]["methods"].values()),
        "n_targets": len(targets),
    }
    results = {
        "definitions": {
            "delta_loss": "mean next-token CE with the ablation minus without (nats)",
            "kl": "mean KL(p_clean || p_ablated) of the next-token distributions (nats)",
            "positions": "every position with a real next token (padding excluded)",
            "mean": "the target's mean over every non-pad position of the same texts",
            "rank": f"by the larger {config.rank_by} of the methods, descending",
        },
        "clean_loss": clean.ce / clean.positions,
        "n_positions": clean.positions,
        "ranking": ranking,
    }
    return AnalysisOutput(source, key_numbers, results, _report(config, source, key_numbers, ranking))


def _dataset_name(config: CausalConfig, dataset_record: dict[str, Any] | None) -> Any:
    """The dataset as the source names it: a file the worker resolved an upload to is named by the
    request's record (the upload id), never by its path; any other source by ``describe_source``."""
    if dataset_record is not None and isinstance(config.dataset, FileSource):
        return dataset_record
    return describe_source(config.dataset)


def _ranking(targets, config: CausalConfig, clean: LossSums, ablated) -> list[dict[str, Any]]:
    clean_loss = clean.ce / clean.positions
    rows = []
    for target in targets:
        methods = {}
        for method in config.methods:
            sums = ablated[(target.name, method)]
            loss = sums.ce / sums.positions
            methods[method] = {"loss": loss, "delta_loss": loss - clean_loss, "kl": sums.kl / sums.positions}
        rows.append(
            {"target": target.name, "layer": target.layer, "latent": target.latent, "methods": methods}
        )
    rows.sort(key=lambda r: -max(m[config.rank_by] for m in r["methods"].values()))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def _report(config: CausalConfig, source, key_numbers, ranking) -> Report:
    header = ["rank", "target"] + [f"{m} {what}" for m in config.methods for what in ("Δloss", "KL")]
    rows = [
        [r["rank"], r["target"]] + [r["methods"][m][k] for m in config.methods for k in ("delta_loss", "kl")]
        for r in ranking
    ]
    what = f"SAE {config.sae_id} latents on {source.get('layer')}" if config.sae_id else "layer outputs"
    report = Report(
        title=config.title or f"Causal importance by ablation: {what} of {source['model']}",
        measured=(
            f"Each target ({what}) was ablated on its own, by {' and '.join(config.methods)} ablation "
            "(zero: replaced by 0; mean: replaced by its mean over the same texts), at every position. "
            "Reported: Δloss, the change in mean next-token cross-entropy (nats), and KL(clean ‖ ablated) "
            "of the next-token distributions, averaged over every position that has a real next token. "
            + (
                "SAE latents are ablated through the SAE with its reconstruction error kept."
                if config.sae_id
                else ""
            )
        ),
        source=[
            ("model", source["model"]),
            ("targets", ", ".join(r["target"] for r in ranking[:10]) + (" …" if len(ranking) > 10 else "")),
            ("dataset", source["dataset"]),
            ("texts", source["n_texts"]),
            ("positions scored", source["n_positions"]),
        ],
        key_numbers=[
            ("clean loss (nats)", key_numbers["clean_loss"]),
            ("most important target", key_numbers["top_target"]),
            ("its largest Δloss", key_numbers["top_delta_loss"]),
            ("its largest KL", key_numbers["top_kl"]),
        ],
        sections=[(f"Ranking (by the larger {config.rank_by} of the methods)", table(header, rows))],
        notes=[
            "Δloss > 0: the model predicts the next token worse without the target; KL measures any change "
            "of the distribution, helpful or not, so it ranks targets that matter even when Δloss is small.",
            "Zero ablation of a residual-stream layer (a whole block's output) removes everything upstream "
            "too; ablate attention or MLP outputs to compare components.",
            "Mean ablation is the gentler baseline: it keeps the target's average contribution.",
        ],
    )
    report.add_plot(
        "ablation",
        f"Δloss and KL per target (top {min(len(ranking), PLOT_TARGETS)})",
        _figure(ranking[:PLOT_TARGETS], config.methods),
    )
    return report


def _figure(ranking, methods):
    figure = new_figure(10, 2.0 + 0.3 * len(ranking))
    axes = figure.subplots(1, 2, sharey=True)
    names = [r["target"] for r in ranking][::-1]
    y = np.arange(len(names))
    height = 0.8 / len(methods)
    for axis, key, label in ((axes[0], "delta_loss", "Δloss (nats)"), (axes[1], "kl", "KL(clean ‖ ablated)")):
        for j, method in enumerate(methods):
            values = [r["methods"][method][key] for r in ranking][::-1]
            axis.barh(y + j * height, values, height=height, label=method)
        axis.set_xlabel(label)
        axis.axvline(0, color="black", linewidth=0.8)
    axes[0].set_yticks(y + height * (len(methods) - 1) / 2, names)
    axes[1].legend(loc="lower right")
    return figure
