"""Automatic names for latents: a cheap one from tokens, and one the loaded model writes itself.

* **heuristic**: the tokens the latent fires on most among its top contexts, and the tokens its
  decoder direction promotes most (logit effects). Free, instant, often enough to tell a token
  detector from a topic.
* **model**: the loaded language model is shown the latent's top contexts, the firing token
  marked, and asked what they share. Costs a short generation per latent (batched), so it takes a
  list of latents; quality is whatever the model can do (a 135M model names obvious topics).

Both write dictionary entries with their ``source`` and never overwrite a manual name unless told.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kestrel.core.concepts.contexts import PAD_TOKEN
from kestrel.core.concepts.dictionary import Concept, LabelMethod, update_concepts
from kestrel.core.concepts.store import FeatureReader
from kestrel.core.errors import InvalidInputError
from kestrel.core.models import LoadedModel, generate
from kestrel.core.store import Store

MODEL_CONTEXTS = 6
MODEL_BATCH = 8
MODEL_NEW_TOKENS = 10
MAX_MODEL_LATENTS = 512
MARK_OPEN, MARK_CLOSE = "[[", "]]"
MAX_NAME_WORDS = 5
ANSWER_PREFIX = 'The shared topic is "'


def label_features(
    store: Store,
    sae_id: str,
    method: LabelMethod,
    *,
    lm: LoadedModel | None = None,
    latents: Sequence[int] | None = None,
    overwrite: bool = False,
    on_progress: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    """Label ``latents`` (default: every latent that fired; for ``model``, at most 512 of them)."""
    reader = FeatureReader(store, sae_id)
    chosen = _chosen_latents(reader, latents, method)
    if method == "heuristic":
        concepts = heuristic_labels(reader, chosen)
    elif method == "model":
        if lm is None:
            raise InvalidInputError("model labels need the loaded model")
        concepts = model_labels(reader, lm, chosen, on_progress=on_progress)
    else:
        raise InvalidInputError(f"unknown label method {method!r}; use 'heuristic' or 'model'")
    update_concepts(store, sae_id, concepts, keep_manual=not overwrite)
    return {
        "sae_id": sae_id,
        "method": method,
        "labelled": len(concepts),
        "latents": [c.latent for c in concepts],
        "labels": {str(c.latent): c.name for c in concepts},
    }


def _chosen_latents(reader: FeatureReader, latents: Sequence[int] | None, method: LabelMethod) -> list[int]:
    fire_count = reader.full("fire_count")["fire_count"]
    if latents is None:
        alive = torch.nonzero(fire_count > 0).flatten().tolist()
        return alive[:MAX_MODEL_LATENTS] if method == "model" else alive
    chosen = [reader.check_latent(int(i)) for i in dict.fromkeys(latents)]
    if method == "model" and len(chosen) > MAX_MODEL_LATENTS:
        raise InvalidInputError(
            f"model labels take at most {MAX_MODEL_LATENTS} latents per call, got {len(chosen)}"
        )
    return [i for i in chosen if int(fire_count[i]) > 0]


def heuristic_labels(reader: FeatureReader, latents: Sequence[int]) -> list[Concept]:
    """A name from tokens alone, in order of how specific it is.

    A latent that fires on one word in most of its top contexts is named by that word (a token
    detector). Otherwise it is named by the words most common around its top contexts (a topic
    or context latent fires on "the" and "." inside cooking texts: "chef / oven" says more),
    else by the tokens its direction promotes. The description lists all three.
    """
    if not latents:
        return []
    t = reader.full("top_token_ids", "top_token_counts", "logit_pos_ids", "top_values", "top_windows")
    out = []
    for latent in latents:
        n_top = int((t["top_values"][latent] > 0).sum())
        ids_counts = zip(
            t["top_token_ids"][latent].tolist(), t["top_token_counts"][latent].tolist(), strict=True
        )
        fires_on = [(_clean(reader.token(i)), c) for i, c in ids_counts if i != PAD_TOKEN and c > 0]
        around = Counter(
            word
            for window in t["top_windows"][latent][:n_top].tolist()
            for word in (_clean(reader.token(i)) for i in window if i != PAD_TOKEN)
            if _is_word(word)
        )
        context_words = [w for w, _ in around.most_common(3)]
        promotes = [_clean(reader.token(i)) for i in t["logit_pos_ids"][latent][:5].tolist()]
        if fires_on and _is_word(fires_on[0][0]) and fires_on[0][1] * 2 >= n_top:
            name = fires_on[0][0]
        elif context_words:
            name = " / ".join(context_words[:2])
        else:
            name = " / ".join(
                [w for w in promotes if _is_word(w)][:2] or [w for w, _ in fires_on][:2] or ["?"]
            )
        share = ", ".join(f"'{w}' {c}/{n_top}" for w, c in fires_on)
        description = (
            f"fires on {share or 'mixed tokens'}; around: {', '.join(context_words) or '-'}; "
            f"promotes {', '.join(repr(p) for p in promotes)}"
        )
        out.append(Concept(latent=latent, name=name[:200], description=description, source="heuristic"))
    return out


STOPWORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "but",
        "of",
        "to",
        "in",
        "on",
        "at",
        "for",
        "with",
        "by",
        "from",
        "as",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "it",
        "its",
        "this",
        "that",
        "these",
        "those",
        "he",
        "she",
        "they",
        "we",
        "you",
        "i",
        "his",
        "her",
        "their",
        "our",
        "your",
        "my",
        "later",
        "then",
        "than",
        "so",
        "not",
        "no",
    ]
)


def _is_word(token: str) -> bool:
    """Alphabetic, longer than two letters and not a stopword: worth putting in a name."""
    return len(token) > 2 and token.isalpha() and token.lower() not in STOPWORDS


def _clean(token: str) -> str:
    return token.strip().replace("\n", "\\n")


def model_prompt(reader: FeatureReader, latent: int, n_contexts: int = MODEL_CONTEXTS) -> str:
    """The question put to the model: numbered snippets with the firing token in [[ ]]."""
    t = reader.latent(latent, "top_windows", "top_rows")
    center = int(reader.manifest["window_center"])
    lines = []
    for window, row in zip(t["top_windows"].tolist(), t["top_rows"].tolist(), strict=True):
        if row < 0 or len(lines) >= n_contexts:
            continue
        pieces = []
        for j, tok in enumerate(window):
            if tok == PAD_TOKEN:
                continue
            text = reader.token(tok)
            pieces.append(f"{MARK_OPEN}{text}{MARK_CLOSE}" if j == center else text)
        lines.append(f"{len(lines) + 1}. {''.join(pieces).strip()}")
    snippets = "\n".join(lines)
    return (
        "Here are text snippets. In each, one word is marked like [[this]].\n"
        f"{snippets}\n"
        "What topic do these snippets and marked words share? "
        "Answer with a short name of one to three words."
    )


def model_labels(
    reader: FeatureReader,
    lm: LoadedModel,
    latents: Sequence[int],
    *,
    on_progress: Callable[[float], None] | None = None,
) -> list[Concept]:
    """Ask the model to name each latent from its top contexts (greedy, batched)."""
    out: list[Concept] = []
    for start in range(0, len(latents), MODEL_BATCH):
        batch = list(latents[start : start + MODEL_BATCH])
        prompts = [_chat(lm, model_prompt(reader, latent)) for latent in batch]
        generations = generate(lm, prompts, max_new_tokens=MODEL_NEW_TOKENS)
        for latent, generation in zip(batch, generations, strict=True):
            name = clean_model_answer(generation.text)
            out.append(
                Concept(
                    latent=latent,
                    name=name,
                    description=f"named by {lm.name} from {MODEL_CONTEXTS} top contexts",
                    source="model",
                )
            )
        if on_progress is not None:
            on_progress(min(1.0, (start + len(batch)) / len(latents)))
    return out


def _chat(lm: LoadedModel, question: str) -> str:
    """The question in the model's chat template (else plain text), with the answer begun.

    Starting the answer with an open quote makes even a small model write just the name and
    close the quote, instead of a sentence about it.
    """
    template = getattr(lm.tokenizer, "chat_template", None)
    if template:
        prompt = lm.tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    else:
        prompt = f"{question}\n"
    return prompt + ANSWER_PREFIX


def clean_model_answer(text: str) -> str:
    """The name up to the closing quote (or the line's end), tidied; '?' if nothing is left."""
    line = text.split('"', 1)[0] if '"' in text else text
    line = next((part for part in line.strip().splitlines() if part.strip()), "")
    line = re.sub(r"^(answer|name|topic)\s*:\s*", "", line.strip(), flags=re.IGNORECASE)
    line = line.replace(MARK_OPEN, " ").replace(MARK_CLOSE, " ")
    line = " ".join(line.split()[:MAX_NAME_WORDS]).strip("'`*").rstrip(".").strip()
    return line[:80] or "?"
