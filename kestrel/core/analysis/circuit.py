"""Activation patching: which (layer, position) carries the difference between two prompts.

For each pair, the clean prompt's answer is ``correct`` and the corrupted prompt's is ``wrong``;
the metric is the logit difference ``logit(correct) − logit(wrong)`` at the last position. One
clean forward records every chosen layer's output; then, for each (layer, position), the
corrupted prompts run with that one slice replaced by the clean value (a ``Controller`` from
``kestrel.core.hooks``, removed when the forward ends), and the cell's score is

    fraction restored = (mean patched − mean corrupt) / (mean clean − mean corrupt),

means over pairs (a ratio of means: one pair with a near-zero gap cannot blow it up). 1 means the
patch alone restores the clean behaviour; 0 means that slice carries none of it. Clean and
corrupted prompts must have the same number of tokens, so position t means the same slot in both.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from kestrel.core.analysis.common import (
    AnalysisOutput,
    ModelLoader,
    ProgressFn,
    StopFn,
    check_stop,
    report_progress,
    require_loader,
)
from kestrel.core.analysis.config import MAX_PATCH_FORWARDS, CircuitConfig
from kestrel.core.analysis.report import Report, new_figure, table
from kestrel.core.errors import InvalidInputError
from kestrel.core.hooks import ActivationRecorder, Controller, HookContext, hooks
from kestrel.core.models import LoadedModel
from kestrel.core.store import Store

MIN_GAP = 1e-6
TOP_CELLS = 15


def _token_ids(lm: LoadedModel, text: str) -> list[int]:
    """Tokens of a prompt exactly as a forward sees them (special tokens included)."""
    return list(lm.tokenizer(text)["input_ids"])


def answer_id(lm: LoadedModel, answer: str, where: str) -> int:
    ids = lm.tokenizer(answer, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = lm.tokenizer.convert_ids_to_tokens(ids)
        raise InvalidInputError(
            f"{where} {answer!r} is {len(ids)} tokens {pieces}; an answer must be exactly one token "
            "(a leading space often matters, e.g. ' Paris')"
        )
    return int(ids[0])


def encode_pairs(lm: LoadedModel, config: CircuitConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(clean ids [P, T], corrupted ids [P, T], correct ids [P], wrong ids [P])``, checking lengths."""
    clean, corrupt = [], []
    for i, pair in enumerate(config.pairs):
        a, b = _token_ids(lm, pair.clean), _token_ids(lm, pair.corrupted)
        if len(a) != len(b):
            raise InvalidInputError(
                f"pairs[{i}]: the clean prompt is {len(a)} tokens and the corrupted one {len(b)}; "
                "they must have the same number of tokens so positions line up",
                details={"pair": i, "clean_tokens": len(a), "corrupted_tokens": len(b)},
            )
        if clean and len(a) != len(clean[0]):
            raise InvalidInputError(
                f"pairs[{i}] is {len(a)} tokens but pairs[0] is {len(clean[0])}; "
                "every prompt must have the same number of tokens (one heatmap of positions)",
                details={"pair": i},
            )
        clean.append(a)
        corrupt.append(b)
    correct = [answer_id(lm, p.correct, f"pairs[{i}].correct") for i, p in enumerate(config.pairs)]
    wrong = [answer_id(lm, p.wrong, f"pairs[{i}].wrong") for i, p in enumerate(config.pairs)]
    as_tensor = lambda rows: torch.tensor(rows, dtype=torch.long, device=lm.device)  # noqa: E731
    return as_tensor(clean), as_tensor(corrupt), as_tensor(correct), as_tensor(wrong)


def logit_diff(lm: LoadedModel, ids_PT: Tensor, correct_P: Tensor, wrong_P: Tensor, controls=()) -> Tensor:
    """[P] logit(correct) − logit(wrong) at the last position, with ``controls`` active."""
    with hooks(lm.model, *controls), torch.no_grad():
        logits_PV = lm.model(input_ids=ids_PT, attention_mask=torch.ones_like(ids_PT)).logits[:, -1].float()
    rows = torch.arange(len(ids_PT), device=logits_PV.device)
    correct_P, wrong_P = correct_P.to(logits_PV.device), wrong_P.to(logits_PV.device)
    return (logits_PV[rows, correct_P] - logits_PV[rows, wrong_P]).cpu()


def patch_position(layer: str, clean_PTD: Tensor, position: int) -> Controller:
    """Replace one position of the layer's output by the clean run's value there."""

    def patch(x: Tensor, _: HookContext) -> Tensor:
        if x.shape[:2] != clean_PTD.shape[:2]:
            raise InvalidInputError(f"layer {layer!r} output {tuple(x.shape)} is not [pairs, tokens, ...]")
        out = x.clone()
        out[:, position] = clean_PTD[:, position].to(device=x.device, dtype=x.dtype)
        return out

    return Controller(layer, patch)


def _layers(lm: LoadedModel, config: CircuitConfig) -> list[str]:
    if config.layers is None:
        return [info.name for info in lm.layers if info.kind == "block"]
    for layer in config.layers:
        lm.layer(layer)  # NotFoundError naming close layers
    return list(config.layers)


def _labels(lm: LoadedModel, clean_PT: Tensor, corrupt_PT: Tensor) -> list[str]:
    """Position labels from the first pair: the token, or ``clean→corrupt`` where they differ."""
    a = [lm.tokenizer.decode([i]) for i in clean_PT[0].tolist()]
    b = [lm.tokenizer.decode([i]) for i in corrupt_PT[0].tolist()]
    return [f"{x}" if x == y else f"{x}→{y}" for x, y in zip(a, b, strict=True)]


def analyze(
    store: Store,
    config: CircuitConfig,
    *,
    model_loader: ModelLoader | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    **_: object,
) -> AnalysisOutput:
    lm = require_loader(model_loader, "circuit")(config.model, config.model_dtype)
    layers = _layers(lm, config)
    clean_PT, corrupt_PT, correct_P, wrong_P = encode_pairs(lm, config)
    n_positions = clean_PT.shape[1]
    if len(layers) * n_positions > MAX_PATCH_FORWARDS:
        raise InvalidInputError(
            f"{len(layers)} layers × {n_positions} positions = {len(layers) * n_positions} patched forwards; "
            f"the limit is {MAX_PATCH_FORWARDS}: choose fewer layers or shorter prompts"
        )
    recorder = ActivationRecorder(layers, to_cpu=False)
    clean_P = logit_diff(lm, clean_PT, correct_P, wrong_P, recorder.hooks())
    clean_acts = {layer: recorder.last(layer) for layer in layers}
    corrupt_P = logit_diff(lm, corrupt_PT, correct_P, wrong_P)
    gap = float(clean_P.mean() - corrupt_P.mean())
    if abs(gap) < MIN_GAP:
        raise InvalidInputError(
            "the clean and corrupted prompts give the same mean logit difference "
            f"({float(clean_P.mean()):.4g}); "
            "there is nothing to restore: check the prompts and the answers"
        )
    patched_LT = np.zeros((len(layers), n_positions))
    for li, layer in enumerate(layers):
        for t in range(n_positions):
            check_stop(should_stop, "patching")
            diff_P = logit_diff(
                lm, corrupt_PT, correct_P, wrong_P, [patch_position(layer, clean_acts[layer], t)]
            )
            patched_LT[li, t] = float(diff_P.mean())
        report_progress(progress, (li + 1) / len(layers), f"patched {li + 1}/{len(layers)} layers")
    fraction_LT = (patched_LT - float(corrupt_P.mean())) / gap
    labels = _labels(lm, clean_PT, corrupt_PT)
    best = np.unravel_index(int(np.argmax(fraction_LT)), fraction_LT.shape)
    source = {"model": lm.name, "layers": layers, "n_pairs": len(config.pairs), "n_tokens": n_positions}
    key_numbers = {
        "clean_logit_diff": float(clean_P.mean()),
        "corrupt_logit_diff": float(corrupt_P.mean()),
        "best_layer": layers[best[0]],
        "best_position": int(best[1]),
        "best_token": labels[best[1]],
        "best_fraction_restored": float(fraction_LT[best]),
    }
    results = {
        "definitions": {
            "logit_diff": "logit(correct) - logit(wrong) at the last position",
            "fraction_restored": "(mean patched - mean corrupt) / (mean clean - mean corrupt), pair means",
        },
        "layers": layers,
        "positions": labels,
        "clean_logit_diff": clean_P.tolist(),
        "corrupt_logit_diff": corrupt_P.tolist(),
        "patched_logit_diff": patched_LT.tolist(),
        "fraction_restored": fraction_LT.tolist(),
        "pairs": [p.model_dump() for p in config.pairs],
    }
    return AnalysisOutput(
        source, key_numbers, results, _report(config, source, key_numbers, fraction_LT, layers, labels)
    )


def _report(config, source, key_numbers, fraction_LT, layers, labels) -> Report:
    order = np.argsort(-fraction_LT, axis=None)[:TOP_CELLS]
    cells: list[list[Any]] = []
    for flat in order:
        li, t = np.unravel_index(int(flat), fraction_LT.shape)
        cells.append([layers[li], int(t), labels[t], float(fraction_LT[li, t])])
    first = config.pairs[0]
    report = Report(
        title=config.title
        or f"Activation patching: {source['model']}, {len(layers)} layers × {len(labels)} positions",
        measured=(
            "For each layer and token position, the corrupted prompts were run with that one activation "
            "replaced by its value from the clean prompts. The metric is the logit difference "
            "logit(correct) − logit(wrong) at the last position; each cell reports the **fraction of the "
            "clean − corrupt difference it restores**: (patched − corrupt) / (clean − corrupt), pair means."
        ),
        source=[
            ("model", source["model"]),
            ("layers", ", ".join(layers[:8]) + (" …" if len(layers) > 8 else "")),
            ("pairs", source["n_pairs"]),
            ("tokens per prompt", source["n_tokens"]),
            ("first pair", f"{first.clean!r} vs {first.corrupted!r}; {first.correct!r} vs {first.wrong!r}"),
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
        ],
        sections=[
            (
                f"Cells that restore the most (top {len(cells)})",
                table(["layer", "position", "token", "fraction restored"], cells),
            )
        ],
        notes=[
            "1.0: patching that one activation restores the clean answer's advantage fully; 0: it carries "
            "none of the difference; negative: it pushes further toward the corrupted answer.",
            "Patching a whole block's output (the residual stream) at a position carries everything computed "
            "there so far; positions where the prompts differ light up at early layers, and the answer moves "
            "to the last position at the layers that read it.",
            "Token labels come from the first pair; clean→corrupt marks where the prompts differ.",
        ],
    )
    report.add_plot(
        "patching",
        "Fraction of the logit difference restored, layer × position",
        _heatmap(fraction_LT, layers, labels),
    )
    return report


def _heatmap(fraction_LT, layers, labels):
    figure = new_figure(max(6, 0.55 * len(labels) + 3), max(3, 0.35 * len(layers) + 1.5))
    ax = figure.subplots()
    bound = max(1.0, float(np.abs(fraction_LT).max()))
    image = ax.imshow(fraction_LT, cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
    shown = [label.replace("$", r"\$") for label in labels]  # '$' would start mathtext
    ax.set_xticks(np.arange(len(labels)), shown, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(np.arange(len(layers)), layers, fontsize=8)
    ax.set_xlabel("position (token)")
    ax.set_ylabel("layer")
    figure.colorbar(image, ax=ax, label="fraction restored")
    return figure
