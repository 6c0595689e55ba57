"""Feature absorption on the first-letter task, after SAEBench (``evals/absorption``: Chanin et
al.'s metric with Till's absorption fraction).

A word token's first letter is known. The steps, as SAEBench takes them:

1. Activations: single-token words (``" word"``: a leading space and letters only) each read at
   the word's position of a fixed prompt, ``<3 examples> {word} has the first letter:``.
2. A ground-truth probe per letter (logistic regression, one letter against the rest) on the
   model's activations, train split; letters whose probe reaches F1 < ``min_probe_f1`` on the test
   split are not evaluated (the model does not represent them linearly there).
3. The main latents of each letter by k-sparse probing: an L1 logistic regression on the SAE's
   latents ranks them (largest positive weight first); for k = 1, 2, … a probe on the top k is
   scored by F1 on the test split, and k grows while F1 jumps by more than ``f1_jump`` (feature
   splitting: several main latents share the letter).
4. On each test token of the letter that the ground-truth probe fires on:
   * absorption fraction: the share of the probe projection carried by at most three other
     latents (decoder cosine with the probe ≥ 0.1, together ≥ 40 % of the token's projection)
     rather than by the main latents; 1 when the main latents carry none of it;
   * full absorption: the main latents are silent, and the latent projecting most onto the probe
     (cosine ≥ 0.025) carries ≥ 40 % of the token's projection.
   Per letter: the sum over its tokens divided by how many there were; the score is the mean
   over evaluated letters. Lower is better; 0 is an SAE without absorption.

The control (the ledger's baseline) repeats step 4 with as many main latents drawn at random per
letter: what the metric reads when the "main latents" say nothing about the letter.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import sklearn
import torch
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.model_selection import train_test_split

from kestrel.core.hooks import Detector, HookManager, run_until_stopped, stop_after
from kestrel.core.models import LoadedModel

LETTERS = string.ascii_lowercase
TEMPLATE = " has the first letter:"
#: Three in-context examples: SAEBench uses up to ten; three keep the prompt short on a CPU.
ICL_EXAMPLES = (" table", " orange", " music")
EPS = 1e-8


@dataclass(frozen=True)
class AbsorptionSettings:
    """SAEBench's thresholds (``feature_absorption.py``, ``eval_config.py``)."""

    min_probe_f1: float = 0.6
    f1_jump: float = 0.03
    max_k: int = 10
    fraction_cos_threshold: float = 0.1
    full_cos_threshold: float = 0.025
    projection_share: float = 0.4
    max_absorbers: int = 3
    top_projection_latents: int = 10
    l1_c: float = 0.1
    test_fraction: float = 0.3
    min_words_per_letter: int = 6


# ---------------------------------------------------------------------------------------------
# Words and their activations


def first_letter_words(tokenizer: Any, n_words: int, seed: int) -> tuple[list[int], list[str]]:
    """Token ids and words of up to ``n_words`` single-token words (leading space, letters only,
    two or more), sampled with ``seed``; the prompt's example words are left out."""
    excluded = {w.strip() for w in ICL_EXAMPLES}
    found: list[tuple[int, str]] = []
    for token, token_id in tokenizer.get_vocab().items():
        word = tokenizer.convert_tokens_to_string([token])
        body = word[1:]
        if (
            word.startswith(" ")
            and len(body) >= 2
            and body.isascii()
            and body.isalpha()
            and body not in excluded
        ):
            found.append((token_id, word))
    found.sort()
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(found))[:n_words]
    return [found[i][0] for i in chosen], [found[i][1] for i in chosen]


def prompt_ids(tokenizer: Any, word_id: int) -> tuple[list[int], int]:
    """The prompt's token ids up to ``word_id`` and the word's position (the last). The template's
    tail after the word is left off: a causal model's activation at the word cannot see it."""
    prefix = "".join(f"{w}{TEMPLATE} {w.strip()[0].upper()}\n" for w in ICL_EXAMPLES)
    prefix_ids = tokenizer(prefix, add_special_tokens=True)["input_ids"]
    return [*prefix_ids, word_id], len(prefix_ids)


def word_activations(
    lm: LoadedModel,
    layer: str,
    word_ids: Sequence[int],
    *,
    batch_size: int = 32,
    on_progress: Callable[[float], None] | None = None,
) -> torch.Tensor:
    """The layer's activation at each word's position of its prompt: [words, d] float32 on CPU."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [Detector(layer, lambda h, ctx: seen.__setitem__("h", h.detach())), stop_after(layer)]
    rows = []
    starts = range(0, len(word_ids), batch_size)
    with torch.inference_mode():
        for n, start in enumerate(starts):
            prompts = [prompt_ids(lm.tokenizer, w) for w in word_ids[start : start + batch_size]]
            ids_BT = torch.tensor([ids for ids, _ in prompts], device=lm.device)
            position = prompts[0][1]  # every prompt has the same length: one token differs
            with HookManager(lm.model, hooks):
                forward = partial(lm.model, attention_mask=torch.ones_like(ids_BT), use_cache=False)
                run_until_stopped(partial(forward, input_ids=ids_BT))
            rows.append(seen.pop("h")[:, position].float().cpu())
            if on_progress is not None:
                on_progress((n + 1) / len(starts))
    return torch.cat(rows)


# ---------------------------------------------------------------------------------------------
# The metric (arrays in, scores out)


def absorption_metrics(
    acts_ND: np.ndarray,
    letters: Sequence[str],
    latents_NF: np.ndarray,
    decoder_FD: np.ndarray,
    settings: AbsorptionSettings | None = None,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """Absorption fraction and full-absorption rate (SAEBench), and the random-latents control."""
    settings = settings or AbsorptionSettings()
    letters_N = np.asarray(letters)
    counts = {c: int((letters_N == c).sum()) for c in LETTERS}
    usable = [c for c in LETTERS if counts[c] >= settings.min_words_per_letter]
    keep = np.isin(letters_N, usable)
    idx = np.arange(len(letters_N))[keep]
    if len(usable) < 2:
        return _empty("fewer than two letters have enough words", settings, counts)
    train, test = train_test_split(
        idx, test_size=settings.test_fraction, random_state=seed, stratify=letters_N[idx]
    )
    decoder_unit_FD = decoder_FD / np.maximum(np.linalg.norm(decoder_FD, axis=1, keepdims=True), EPS)
    latents_csr = sparse.csr_matrix(latents_NF)
    rng = np.random.default_rng(seed)
    per_letter: dict[str, Any] = {}
    for letter in usable:
        y = (letters_N == letter).astype(int)
        probe = LogisticRegression(C=1.0, max_iter=1000, class_weight="balanced").fit(
            acts_ND[train], y[train]
        )
        probe_f1 = float(f1_score(y[test], probe.predict(acts_ND[test]), zero_division=0))
        row: dict[str, Any] = {"probe_f1": probe_f1, "n_words": counts[letter]}
        per_letter[letter] = row
        if probe_f1 < settings.min_probe_f1:
            row["skipped"] = f"probe F1 {probe_f1:.2f} < {settings.min_probe_f1}"
            continue
        main, f1s = main_latents(latents_csr, y, train, test, settings)
        fired = test[(y[test] == 1) & (probe.decision_function(acts_ND[test]) > 0)]
        direction_D = probe.coef_[0] / np.linalg.norm(probe.coef_[0])
        cos_F = decoder_unit_FD @ direction_D
        row.update(main_latents=main, main_f1=f1s, n_probe_true_positives=len(fired), tokens=fired.tolist())
        row.update(_letter_scores(acts_ND[fired] @ direction_D, latents_NF[fired], cos_F, main, settings))
        random_main = rng.choice(latents_NF.shape[1], size=len(main), replace=False).tolist()
        control = _letter_scores(
            acts_ND[fired] @ direction_D, latents_NF[fired], cos_F, random_main, settings
        )
        row["control_absorption_fraction"] = control["absorption_fraction"]
        row["control_full_absorption_rate"] = control["full_absorption_rate"]
    return _aggregate(per_letter, settings, counts)


def main_latents(
    latents_csr: sparse.csr_matrix,
    y_N: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    settings: AbsorptionSettings,
) -> tuple[list[int], list[float]]:
    """A letter's main latents by k-sparse probing with SAEBench's F1-jump rule (module doc, 3)."""
    x_train = latents_csr[train]
    ranker = _l1_logistic(settings.l1_c)
    ranker.fit(x_train, y_N[train])
    coef_F = ranker.coef_[0]
    order = [int(i) for i in np.argsort(-coef_F, kind="stable")[: settings.max_k] if coef_F[i] > 0]
    if not order:  # the L1 probe kept no latent: the one whose mean differs most
        x_dense = latents_csr[train].toarray()
        order = [int(np.argmax(x_dense[y_N[train] == 1].mean(0) - x_dense[y_N[train] == 0].mean(0)))]
    best, chosen, f1s = -1.0, order[:1], []
    for k in range(1, len(order) + 1):
        cols = order[:k]
        x_tr, x_te = latents_csr[train][:, cols].toarray(), latents_csr[test][:, cols].toarray()
        if np.all(x_tr == 0):
            f1 = 0.0
        else:
            probe = LogisticRegression(C=1.0, max_iter=1000, class_weight="balanced").fit(x_tr, y_N[train])
            f1 = float(f1_score(y_N[test], probe.predict(x_te), zero_division=0))
        f1s.append(f1)
        if f1 <= best + settings.f1_jump:
            break
        best, chosen = f1, cols
    return chosen, f1s


def _l1_logistic(c: float) -> LogisticRegression:
    """An L1 logistic regression; scikit-learn 1.8 spells the penalty as ``l1_ratio=1``."""
    if tuple(int(p) for p in sklearn.__version__.split(".")[:2]) >= (1, 8):
        return LogisticRegression(l1_ratio=1.0, solver="liblinear", C=c, class_weight="balanced")
    return LogisticRegression(penalty="l1", solver="liblinear", C=c, class_weight="balanced")


def token_absorption(
    probe_projection: float,
    latents_F: np.ndarray,
    cos_F: np.ndarray,
    main: Sequence[int],
    settings: AbsorptionSettings,
) -> tuple[float, bool]:
    """One token's absorption fraction and whether it is fully absorbed (SAEBench's rules)."""
    projection_F = latents_F * cos_F
    main_projection = float(projection_F[list(main)].sum())
    candidates = np.ones(len(latents_F), dtype=bool)
    candidates[list(main)] = False
    candidates &= (cos_F >= settings.fraction_cos_threshold) & (projection_F > 0)
    absorbers = np.sort(projection_F[candidates])[::-1][: settings.max_absorbers]
    absorbed = float(absorbers.sum())
    if main_projection >= probe_projection or absorbed / probe_projection < settings.projection_share:
        fraction = 0.0
    elif main_projection <= 0:
        fraction = 1.0
    else:
        absorbed = min(absorbed, probe_projection - main_projection)
        fraction = float(np.clip(absorbed / (absorbed + main_projection), 0.0, 1.0))
    top = int(np.argmax(projection_F))
    full = (
        bool(np.all(latents_F[list(main)] < EPS))
        and probe_projection >= 0
        and cos_F[top] >= settings.full_cos_threshold
        and projection_F[top] / probe_projection >= settings.projection_share
    )
    return fraction, full


def _letter_scores(
    projections_N: np.ndarray,
    latents_NF: np.ndarray,
    cos_F: np.ndarray,
    main: Sequence[int],
    settings: AbsorptionSettings,
) -> dict[str, Any]:
    scored = [
        token_absorption(float(p), lat, cos_F, main, settings)
        for p, lat in zip(projections_N, latents_NF, strict=True)
    ]
    n = len(scored)
    return {
        "absorption_fraction": sum(f for f, _ in scored) / n if n else None,
        "full_absorption_rate": sum(full for _, full in scored) / n if n else None,
        "token_fractions": [round(f, 4) for f, _ in scored],
    }


def _mean(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return float(np.mean(finite)) if finite else None


def _aggregate(
    per_letter: dict[str, Any], settings: AbsorptionSettings, counts: dict[str, int]
) -> dict[str, Any]:
    evaluated = {
        c: r for c, r in per_letter.items() if "skipped" not in r and r.get("n_probe_true_positives")
    }
    result = {
        "absorption_fraction": _mean([r["absorption_fraction"] for r in evaluated.values()]),
        "full_absorption_rate": _mean([r["full_absorption_rate"] for r in evaluated.values()]),
        "control_absorption_fraction": _mean([r["control_absorption_fraction"] for r in evaluated.values()]),
        "control_full_absorption_rate": _mean(
            [r["control_full_absorption_rate"] for r in evaluated.values()]
        ),
        "mean_main_latents": _mean([len(r["main_latents"]) for r in evaluated.values()]),
        "letters_evaluated": sorted(evaluated),
        "per_letter": per_letter,
        "settings": settings.__dict__,
        "words_per_letter": counts,
    }
    if not evaluated:
        result["reason"] = f"no letter's probe reached F1 {settings.min_probe_f1} (or fired on a test word)"
    return result


def _empty(reason: str, settings: AbsorptionSettings, counts: dict[str, int]) -> dict[str, Any]:
    return {
        "absorption_fraction": None,
        "full_absorption_rate": None,
        "control_absorption_fraction": None,
        "control_full_absorption_rate": None,
        "letters_evaluated": [],
        "reason": reason,
        "settings": settings.__dict__,
        "words_per_letter": counts,
        "per_letter": {},
    }
