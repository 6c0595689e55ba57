"""Steering with a sense of scale: how fluent a steered continuation is, what it does to chosen
keywords, and a sweep over strengths that says where a latent steers and where the text breaks.

**Fluency** is the perplexity of a continuation under the *unsteered* model (teacher-forced on
prompt + continuation): the steered text judged by the model it was steered away from. The
unsteered continuation's perplexity is the baseline; a steered one within ``fluency_ratio`` (2×)
of it counts as fluent. Greedy text from the model itself has a low perplexity under it, so the
ratio rises quickly once steering forces unlikely tokens.

**Keyword effect**, for keywords the caller names (a topic's words): how often they occur in each
continuation (case-insensitive, whole words), and the mean change in their log-probability
(``log Σ_kw p(kw's first token)``, over each surface form: with and without a leading space,
capitalised or not) when the steered model reads the *unsteered* continuation, against the
unsteered model reading it. The second does not depend on what greedy decoding happened to pick,
so it shows an effect before the text changes. It is measured for edits on ``all`` positions
only (one teacher-forced pass cannot act as a prompt-only or generated-only edit does).

**Sweep**: one latent edited (``add``, or ``clamp``) at several strengths, in multiples of its
max activation by default, all positions; each strength's continuations with their perplexity,
keyword hits, keyword log-prob change and the share of tokens that differ from the unsteered
text. The summary names the fluent window (strengths, by magnitude from 0, whose perplexity ratio
stays ≤ ``fluency_ratio``), the first strength with an effect (keyword log-prob up by at least
``effect_nats``, or more keyword hits than unsteered; without keywords: ≥ a quarter of tokens
changed), and says plainly when the latent does not steer within the fluent window.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from kestrel.core.hooks import Controller, HookManager
from kestrel.core.models import LoadedModel, generate
from kestrel.core.steering import SteeringPlan
from kestrel.core.steering_config import LatentEdit, SteeringConfig, _latent_stats, check_config
from kestrel.core.store import Store

EFFECT_NATS = math.log(2)  # keywords at least twice as likely
CHANGED_EFFECT = 0.25  # without keywords: a quarter of the tokens differ from the unsteered text


# ---------------------------------------------------------------------------------------------
# Scoring continuations


def trim_continuation(token_ids: Sequence[int], eos_id: int | None) -> list[int]:
    """The generated ids up to (not including) the first end-of-sequence: ``generate`` pads a row
    that stopped early with the pad token, which is the EOS token for most models."""
    ids = list(token_ids)
    if eos_id is not None and eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    return ids


def keyword_token_ids(tokenizer: Any, keywords: Sequence[str]) -> list[int]:
    """First token of each keyword's surface forms (bare, after a space, capitalised)."""
    ids: set[int] = set()
    for word in keywords:
        for form in {word, f" {word}", word.capitalize(), f" {word.capitalize()}"}:
            encoded = tokenizer.encode(form, add_special_tokens=False)
            if encoded:
                ids.add(int(encoded[0]))
    return sorted(ids)


def keyword_hits(text: str, keywords: Sequence[str]) -> int:
    """Occurrences of the keywords in ``text`` (case-insensitive, whole words)."""
    return sum(len(re.findall(rf"\b{re.escape(word)}\b", text, flags=re.IGNORECASE)) for word in keywords)


@torch.no_grad()
def score_continuations(
    lm: LoadedModel,
    prompts: Sequence[str],
    continuations: Sequence[Sequence[int]],
    *,
    hooks: Sequence[Controller] = (),
    keyword_ids: Sequence[int] = (),
) -> list[dict[str, Any]]:
    """Teacher-forced prompt + continuation, per row: the continuation's summed negative
    log-likelihood and token count, and (with ``keyword_ids``) the mean over the continuation's
    positions of the keywords' total log-probability. ``hooks`` run in the one forward (call 0)."""
    tokenizer = lm.tokenizer
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    rows = [list(p) + list(c) for p, c in zip(prompt_ids, continuations, strict=True)]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids_BT = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=lm.device)
    mask_BT = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=lm.device)
    with HookManager(lm.model, hooks) if hooks else nullcontext():
        logits_BTV = lm.model(input_ids=ids_BT, attention_mask=mask_BT).logits
    logprobs_BTV = logits_BTV.float().log_softmax(-1)
    keyword_index = torch.tensor(list(keyword_ids), dtype=torch.int64, device=logprobs_BTV.device)
    out = []
    for row, (prompt, cont) in enumerate(zip(prompt_ids, continuations, strict=True)):
        start, n = len(prompt) - 1, len(cont)  # position start+j predicts continuation token j
        if n == 0:
            out.append({"nll": 0.0, "n_tokens": 0, "keyword_logprob": None})
            continue
        predict_NV = logprobs_BTV[row, start : start + n]
        target_N = torch.tensor(list(cont), dtype=torch.int64, device=predict_NV.device)
        nll = -float(predict_NV.gather(1, target_N[:, None]).sum())
        keyword_lp = None
        if len(keyword_index):
            keyword_lp = float(predict_NV[:, keyword_index].logsumexp(-1).mean())
        out.append({"nll": nll, "n_tokens": n, "keyword_logprob": keyword_lp})
    return out


def perplexity(scores: Sequence[dict[str, Any]]) -> float | None:
    """exp(mean NLL per token) pooled over rows; None when no row has a token."""
    n = sum(s["n_tokens"] for s in scores)
    return math.exp(sum(s["nll"] for s in scores) / n) if n else None


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _changed_fraction(a: Sequence[int], b: Sequence[int]) -> float:
    """Share of positions (over the longer) where two continuations differ."""
    n = max(len(a), len(b))
    if n == 0:
        return 0.0
    same = sum(1 for x, y in zip(a, b, strict=False) if x == y)
    return 1 - same / n


# ---------------------------------------------------------------------------------------------
# Fluency and effect of one steered generation against the unsteered one


def _continuations(lm: LoadedModel, prompts: Sequence[str], hooks: Sequence[Controller], **options: Any):
    eos = lm.tokenizer.eos_token_id
    generations = generate(lm, prompts, hooks=hooks, **options)
    return [(g.text, trim_continuation(g.token_ids, eos)) for g in generations]


def compare_runs(
    lm: LoadedModel,
    prompts: Sequence[str],
    default_ids: Sequence[Sequence[int]],
    steered_ids: Sequence[Sequence[int]],
    steered_texts: Sequence[str],
    default_texts: Sequence[str],
    plan: SteeringPlan,
    keywords: Sequence[str],
) -> dict[str, Any]:
    """Per prompt and pooled: perplexity of both continuations under the unsteered model, keyword
    hits in each, and the keyword log-prob change the plan makes on the unsteered continuation."""
    keyword_ids = keyword_token_ids(lm.tokenizer, keywords) if keywords else []
    clean_default = score_continuations(lm, prompts, default_ids, keyword_ids=keyword_ids)
    clean_steered = score_continuations(lm, prompts, steered_ids)
    # One teacher-forced pass is the prompt pass (call 0): it steers as generation does only for
    # edits on all positions; for prompt- or generated-only edits the change is not measured.
    steered_on_default = (
        score_continuations(lm, prompts, default_ids, hooks=plan.hooks, keyword_ids=keyword_ids)
        if keyword_ids and plan.config.positions == "all"
        else [{"keyword_logprob": None}] * len(prompts)
    )
    rows = []
    for i in range(len(prompts)):
        before, after = clean_default[i]["keyword_logprob"], steered_on_default[i]["keyword_logprob"]
        rows.append(
            {
                "default_perplexity": perplexity([clean_default[i]]),
                "steered_perplexity": perplexity([clean_steered[i]]),
                "default_keyword_hits": keyword_hits(default_texts[i], keywords) if keywords else None,
                "steered_keyword_hits": keyword_hits(steered_texts[i], keywords) if keywords else None,
                "keyword_logprob_delta": after - before if before is not None and after is not None else None,
                "changed_fraction": _changed_fraction(default_ids[i], steered_ids[i]),
            }
        )
    default_ppl, steered_ppl = perplexity(clean_default), perplexity(clean_steered)
    return {
        "rows": rows,
        "default_perplexity": default_ppl,
        "steered_perplexity": steered_ppl,
        "perplexity_ratio": steered_ppl / default_ppl if default_ppl and steered_ppl else None,
        "default_keyword_hits": sum(r["default_keyword_hits"] or 0 for r in rows) if keywords else None,
        "steered_keyword_hits": sum(r["steered_keyword_hits"] or 0 for r in rows) if keywords else None,
        "keyword_logprob_delta": _mean([r["keyword_logprob_delta"] for r in rows]),
        "changed_fraction": _mean([r["changed_fraction"] for r in rows]) or 0.0,
    }


def side_by_side_effects(
    lm: LoadedModel, result: dict[str, Any], plan: SteeringPlan, keywords: Sequence[str]
) -> dict[str, Any]:
    """`generate_side_by_side`'s result (with ``compare``) with fluency and keyword effect added:
    each item gets ``effect`` (its row of `compare_runs`), the result a pooled ``effect``."""
    items = result["items"]
    if not items or items[0].get("default") is None or not plan.hooks:
        return result
    eos = lm.tokenizer.eos_token_id
    default_ids = [trim_continuation(it["default"]["token_ids"], eos) for it in items]
    steered_ids = [trim_continuation(it["steered"]["token_ids"], eos) for it in items]
    report = compare_runs(
        lm,
        [it["prompt"] for it in items],
        default_ids,
        steered_ids,
        [it["steered"]["text"] for it in items],
        [it["default"]["text"] for it in items],
        plan,
        keywords,
    )
    for item, row in zip(items, report.pop("rows"), strict=True):
        item["effect"] = row
    return {**result, "effect": report}


# ---------------------------------------------------------------------------------------------
# Sweep


def sweep(
    lm: LoadedModel,
    prompts: Sequence[str],
    plan_at: Callable[[float], SteeringPlan],
    strengths: Sequence[float],
    *,
    keywords: Sequence[str] = (),
    max_new_tokens: int = 24,
    seed: int | None = 0,
    fluency_ratio: float = 2.0,
    effect_nats: float = EFFECT_NATS,
    on_step: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Greedy continuations of ``prompts`` unsteered and with ``plan_at(s)`` for each strength,
    each scored (see the module docstring); then the fluent window, where the effect appears, and
    a plain verdict."""
    options = {"max_new_tokens": max_new_tokens, "seed": seed}
    baseline = _continuations(lm, prompts, [], **options)
    base_texts, base_ids = [t for t, _ in baseline], [ids for _, ids in baseline]
    points = []
    for step, strength in enumerate(strengths):
        if on_step is not None:
            on_step(step, len(strengths))
        plan = plan_at(strength)
        steered = _continuations(lm, prompts, plan.hooks, **options)
        texts, ids = [t for t, _ in steered], [i for _, i in steered]
        report = compare_runs(lm, prompts, base_ids, ids, texts, base_texts, plan, keywords)
        rows = report.pop("rows")
        ratio = report["perplexity_ratio"]
        fluent = ratio is not None and ratio <= fluency_ratio
        points.append(
            {
                "strength": strength,
                "absolute_value": plan.config.edits[0].value if plan.config.edits else None,
                **report,
                "fluent": fluent,
                "effect": _has_effect(report, keywords, effect_nats),
                "items": [
                    {"prompt": p, "text": t, "token_ids": i, "perplexity": r["steered_perplexity"]}
                    for p, t, i, r in zip(prompts, texts, ids, rows, strict=True)
                ],
            }
        )
    clean = score_continuations(lm, prompts, base_ids)
    return {
        "baseline": {
            "perplexity": perplexity(clean),
            "keyword_hits": sum(keyword_hits(t, keywords) for t in base_texts) if keywords else None,
            "items": [
                {"prompt": p, "text": t, "token_ids": i, "perplexity": perplexity([s])}
                for p, t, i, s in zip(prompts, base_texts, base_ids, clean, strict=True)
            ],
        },
        "points": points,
        **summarize(points, fluency_ratio, bool(keywords)),
    }


def _has_effect(report: dict[str, Any], keywords: Sequence[str], effect_nats: float) -> bool:
    if keywords:
        delta = report["keyword_logprob_delta"]
        more_hits = (report["steered_keyword_hits"] or 0) > (report["default_keyword_hits"] or 0)
        return more_hits or (delta is not None and delta >= effect_nats)
    return report["changed_fraction"] >= CHANGED_EFFECT


def summarize(points: Sequence[dict[str, Any]], fluency_ratio: float, with_keywords: bool) -> dict[str, Any]:
    """The fluent window (by magnitude from 0, up to the first strength that is not fluent), the
    first strength with an effect, whether one lies inside the window, and a sentence saying so."""
    by_size = sorted(points, key=lambda p: abs(p["strength"]))
    fluent_up_to = None
    for point in by_size:
        if not point["fluent"]:
            break
        fluent_up_to = point["strength"]
    effects = [p["strength"] for p in by_size if p["effect"] and p["strength"] != 0]
    effect_from = effects[0] if effects else None
    fluent_limit = abs(fluent_up_to) if fluent_up_to is not None else -1.0
    steers = effect_from is not None and abs(effect_from) <= fluent_limit
    what = "the keywords' log-probability or count rose" if with_keywords else "the text changed"
    window = (
        f"output stays fluent (perplexity ≤ {fluency_ratio:g}× unsteered) up to strength {fluent_up_to:g}"
        if fluent_up_to is not None
        else f"no strength tried keeps perplexity within {fluency_ratio:g}× unsteered"
    )
    if steers:
        verdict = f"steers: {what} from strength {effect_from:g}; {window}"
    elif effect_from is not None:
        verdict = (
            f"does not steer within the fluent window: {what} only from strength {effect_from:g}, "
            f"where the text is no longer fluent; {window}"
        )
    else:
        verdict = f"does not steer at all at the strengths tried: {what.replace('rose', 'never rose')}"
        verdict = verdict.replace("the text changed", "the text never changed enough") + f"; {window}"
    return {"fluent_up_to": fluent_up_to, "effect_from": effect_from, "steers": steers, "verdict": verdict}


def sweep_latent(
    store: Store,
    lm: LoadedModel,
    request: Any,
    plan_for: Callable[[SteeringConfig], SteeringPlan],
    on_step: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """A sweep of one latent as the API and the CLI ask for it: ``request`` has ``sae_id``,
    ``latent``, ``op``, ``unit``, ``strengths``, ``prompts``, ``keywords``, ``max_new_tokens``,
    ``seed`` and ``fluency_ratio`` (`kestrel.schemas.SteeringSweepRequest`); ``plan_for`` compiles
    a config against ``lm`` (from the store, or from a worker's SAE cache). Edits act on all
    positions; relative strengths resolve from the SAE's discovery result."""
    from kestrel.core.concepts.dictionary import read_dictionary

    def config_at(strength: float) -> SteeringConfig:
        edit = LatentEdit(latent=request.latent, op=request.op, value=strength, unit=request.unit)
        return SteeringConfig(sae_id=request.sae_id, edits=[edit], positions="all")

    layer = check_config(store, config_at(1.0)).layer  # latent range; discovery stats for the unit
    result = sweep(
        lm,
        request.prompts,
        lambda s: plan_for(config_at(s).model_copy(update={"layer": layer})),
        request.strengths,
        keywords=request.keywords,
        max_new_tokens=request.max_new_tokens,
        seed=request.seed,
        fluency_ratio=request.fluency_ratio,
        on_step=on_step,
    )
    stats = _latent_stats(store, request.sae_id, [request.latent])
    concept = read_dictionary(store, request.sae_id).get(request.latent)
    return {
        "model": lm.name,
        "sae_id": request.sae_id,
        "latent": request.latent,
        "op": request.op,
        "unit": request.unit,
        "max_activation": stats[request.latent]["max_activation"] if request.latent in stats else None,
        "name": concept.name if concept else None,
        "keywords": list(request.keywords),
        "fluency_ratio": request.fluency_ratio,
        **result,
    }
