"""Automatic names for latents: a cheap one from tokens, one the loaded model writes, and scores.

* **heuristic**: the whole word the latent fires on most among its top contexts (subword pieces
  merged into the word they belong to: "PostgreSQL", never "gre"), else the words most common
  around its top contexts, else the tokens its decoder direction promotes. Free, instant.
* **model**: the loaded language model is shown the latent's top examples, the firing tokens
  marked, contrasted with examples where it is silent, and asked what the first share that the
  others lack. Its answer is cleaned (marker debris and cut-off words removed), and a name that
  only copies words found in one snippet is replaced by the heuristic word: a label should
  name the common theme, not one example.
* **scores** (``score=True``): each latent's name, whoever wrote it, is scored by
  `kestrel.core.concepts.scoring` on examples the labeller never saw, and the scores are stored
  with the name.

Both write dictionary entries with their ``source`` and never overwrite a manual name unless told.
Examples come from a stored run (`kestrel.core.concepts.examples`); without one, model labels
fall back to discovery's top contexts (no contrast) and scoring is refused.

On a crash the dictionary holds the names written (one atomic write) and the scores of every
chunk of latents finished (one atomic write per chunk); a rerun rewrites the same names (greedy
generation is deterministic, and an unchanged name keeps its scores) and scores only the latents
whose stored scores are not for this scorer, settings and run (`scoring.scoring_key`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kestrel.core.concepts.config import ScoringConfig
from kestrel.core.concepts.contexts import PAD_TOKEN
from kestrel.core.concepts.dictionary import Concept, LabelMethod, read_dictionary, update_concepts
from kestrel.core.concepts.store import FeatureReader
from kestrel.core.errors import InvalidInputError, KestrelError
from kestrel.core.models import LoadedModel, generate
from kestrel.core.store import Store

MODEL_CONTEXTS = 6
MODEL_BATCH = 8
MODEL_NEW_TOKENS = 16
MAX_MODEL_LATENTS = 512
MARK_OPEN, MARK_CLOSE = "[[", "]]"
MAX_NAME_WORDS = 5
MAX_NAME_CHARS = 80
ANSWER_PREFIX = 'The common theme is "'
SCORE_CHUNK_LATENTS = 8


def label_features(
    store: Store,
    sae_id: str,
    method: LabelMethod,
    *,
    lm: LoadedModel | None = None,
    latents: Sequence[int] | None = None,
    overwrite: bool = False,
    on_progress: Callable[[float], None] | None = None,
    score: bool = False,
    scorer: LoadedModel | None = None,
    scoring: ScoringConfig | None = None,
    run_id: str | None = None,
    should_stop: Callable[[], bool] | None = None,
    tokenizer_loader: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Label ``latents`` (default: every latent that fired; for ``model`` or ``score``, at most
    512 of them); with ``score``, then score their names with ``scorer`` (default ``lm``).

    A scorer of another model reads the examples as text (`scoring.Scorer`), which needs the
    tokenizer of the model the run's token ids are from: ``lm``'s when it is that model, else
    loaded by ``tokenizer_loader`` (a worker resolves names its own way; default
    `models.load_tokenizer`)."""
    from kestrel.core.concepts import examples as ex

    reader = FeatureReader(store, sae_id)
    bounded = method == "model" or score
    chosen = _chosen_latents(reader, latents, bounded)
    config = scoring or ScoringConfig()
    if score and (scorer or lm) is None:
        raise InvalidInputError("scoring labels needs a scorer model")
    blocks = None
    if bounded and chosen:
        try:
            blocks = ex.read_blocks(store, sae_id, chosen, config, run_id=run_id)
        except InvalidInputError:
            if score or run_id is not None:
                raise
    examples = [ex.latent_examples(blocks, i, config) for i in range(len(chosen))] if blocks else None
    share = 0.5 if score else 1.0
    labelling = _scaled(on_progress, 0.0, share)
    if method == "heuristic":
        concepts = heuristic_labels(reader, chosen)
    elif method == "model":
        if lm is None:
            raise InvalidInputError("model labels need the loaded model")
        if examples is not None:
            concepts = model_labels_from_examples(lm, examples, on_progress=labelling)
        else:
            concepts = model_labels(reader, lm, chosen, on_progress=labelling)
    else:
        raise InvalidInputError(f"unknown label method {method!r}; use 'heuristic' or 'model'")
    update_concepts(store, sae_id, concepts, keep_manual=not overwrite)
    result: dict[str, Any] = {
        "sae_id": sae_id,
        "method": method,
        "labelled": len(concepts),
        "latents": [c.latent for c in concepts],
        "labels": {str(c.latent): c.name for c in concepts},
    }
    if score and examples is not None and blocks is not None:
        scorer_lm: LoadedModel = scorer or lm  # type: ignore[assignment]
        source, note = examples_tokenizer(store, blocks.run_id, scorer_lm, lm, tokenizer_loader)
        result["scoring"] = score_dictionary(
            store,
            sae_id,
            scorer_lm,
            examples,
            config,
            blocks.run_id,
            on_progress=_scaled(on_progress, share, 1.0),
            should_stop=should_stop,
            source_tokenizer=source,
        )
        if note is not None:
            result["scoring"]["note"] = note
    return result


def examples_tokenizer(
    store: Store,
    run_id: str,
    scorer: LoadedModel,
    lm: LoadedModel | None = None,
    loader: Callable[[str], Any] | None = None,
) -> tuple[Any | None, str | None]:
    """The tokenizer of the model whose token ids the run holds, when the scorer is another model
    (None when it is that model); and a note when it cannot be had (a user's own model of a
    training capture, a hub id offline): the ids are then read as the scorer's own, as before
    scorers could be of another vocabulary, and the note says so."""
    from kestrel.core.runs import get_manifest

    name = get_manifest(store, run_id).model.name
    if not name or name == scorer.name:
        return None, None
    if lm is not None and lm.name == name:
        return lm.tokenizer, None
    try:
        if loader is not None:
            return loader(name), None
        from kestrel.core.models import load_tokenizer

        return load_tokenizer(name, store_root=getattr(store, "local_root", None)), None
    except (KestrelError, OSError, ValueError) as exc:
        return None, (
            f"the run's model {name!r} has no tokenizer here ({exc}); its token ids were read as "
            f"{scorer.name!r}'s own, which is right only if the two share a vocabulary"
        )


def score_dictionary(
    store: Store,
    sae_id: str,
    scorer_lm: LoadedModel,
    examples: Sequence[Any],
    config: ScoringConfig,
    run_id: str,
    *,
    on_progress: Callable[[float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    source_tokenizer: Any | None = None,
) -> dict[str, Any]:
    """Score the current name of each latent in ``examples``, a chunk of latents at a time, each
    chunk's scores written at once; latents already scored with this key are skipped."""
    from kestrel.core.concepts import scoring
    from kestrel.core.concepts.dictionary import set_scores

    key = scoring.scoring_key(scorer_lm.name, config, run_id)
    current = read_dictionary(store, sae_id)
    todo = [
        item
        for item in examples
        if item.latent in current
        and not (
            current[item.latent].scores is not None
            and current[item.latent].scores.key == key  # type: ignore[union-attr]
            and current[item.latent].scores.label == current[item.latent].name  # type: ignore[union-attr]
        )
    ]
    scorer = scoring.Scorer(scorer_lm, config, source_tokenizer=source_tokenizer)
    done = 0
    for start in range(0, len(todo), SCORE_CHUNK_LATENTS):
        chunk = todo[start : start + SCORE_CHUNK_LATENTS]
        labels = {item.latent: current[item.latent].name for item in chunk}
        results = scoring.score_latents(scorer, chunk, labels, key=key, should_stop=should_stop)
        done += set_scores(store, sae_id, [r[0] for r in results.values()], list(results))
        if on_progress is not None:
            on_progress(min(1.0, (start + len(chunk)) / len(todo)))
    return {"scorer": scorer_lm.name, "key": key, "scored": done, "already_scored": len(examples) - len(todo)}


def _scaled(
    on_progress: Callable[[float], None] | None, low: float, high: float
) -> Callable[[float], None] | None:
    if on_progress is None:
        return None
    return lambda fraction: on_progress(low + (high - low) * fraction)


def _chosen_latents(reader: FeatureReader, latents: Sequence[int] | None, bounded: bool) -> list[int]:
    fire_count = reader.full("fire_count")["fire_count"]
    if latents is None:
        alive = torch.nonzero(fire_count > 0).flatten().tolist()
        return alive[:MAX_MODEL_LATENTS] if bounded else alive
    chosen = [reader.check_latent(int(i)) for i in dict.fromkeys(latents)]
    if bounded and len(chosen) > MAX_MODEL_LATENTS:
        raise InvalidInputError(
            f"model labels and scores take at most {MAX_MODEL_LATENTS} latents per call, got {len(chosen)}"
        )
    return [i for i in chosen if int(fire_count[i]) > 0]


def heuristic_labels(reader: FeatureReader, latents: Sequence[int]) -> list[Concept]:
    """A name from tokens alone, in order of how specific it is.

    A latent that fires within one word in most of its top contexts is named by that whole word
    (a token detector; the firing piece is merged with the subword pieces around it). Otherwise it
    is named by the whole words most common around its top contexts (a topic or context latent
    fires on "the" and "." inside cooking texts: "chef / oven" says more), else by the tokens its
    direction promotes. The description lists all three.
    """
    if not latents:
        return []
    t = reader.full("top_token_ids", "top_token_counts", "logit_pos_ids", "top_values", "top_windows")
    center = int(reader.manifest["window_center"])
    out = []
    for latent in latents:
        n_top = int((t["top_values"][latent] > 0).sum())
        windows = [
            [reader.token(i) if i != PAD_TOKEN else "" for i in window]
            for window in t["top_windows"][latent][:n_top].tolist()
        ]
        fires_on = Counter(word_at(window, center) for window in windows)
        fires_on.pop("", None)
        around = Counter(word for window in windows for word in set(window_words(window)) if _is_word(word))
        context_words = [w for w, _ in around.most_common(3)]
        promotes = [_clean(reader.token(i)) for i in t["logit_pos_ids"][latent][:5].tolist()]
        top_word, top_count = fires_on.most_common(1)[0] if fires_on else ("", 0)
        if _is_word(top_word) and top_count * 2 >= n_top:
            name = top_word
        elif context_words:
            name = " / ".join(context_words[:2])
        else:
            name = " / ".join([w for w in promotes if _is_word(w)][:2] or list(fires_on)[:2] or ["?"])
        share = ", ".join(f"'{w}' {c}/{n_top}" for w, c in fires_on.most_common(3))
        description = (
            f"fires on {share or 'mixed tokens'}; around: {', '.join(context_words) or '-'}; "
            f"promotes {', '.join(repr(p) for p in promotes)}"
        )
        out.append(Concept(latent=latent, name=name[:200], description=description, source="heuristic"))
    return out


def _starts_word(token: str) -> bool:
    return not token or not token[0].isalnum()


def word_at(tokens: Sequence[str], index: int) -> str:
    """The whole word that token ``index`` is a piece of: pieces that continue a word (no leading
    space or punctuation, after a letter or digit) are joined on both sides."""
    if not tokens[index].strip():
        return ""
    low = index
    while low > 0 and not _starts_word(tokens[low]) and tokens[low - 1][-1:].isalnum():
        low -= 1
    high = index + 1
    while high < len(tokens) and not _starts_word(tokens[high]) and tokens[high - 1][-1:].isalnum():
        high += 1
    return _clean("".join(tokens[low:high]))


def window_words(tokens: Sequence[str]) -> list[str]:
    """The whole words of a token window, leaving out a word cut by either edge of the window."""
    text = "".join(tokens)
    words = re.findall(r"[^\W\d_]+", text)
    if words and tokens and tokens[0] and text[:1].isalpha():
        words = words[1:]  # the window starts inside a word (not at the document's start: a pad)
    if words and tokens and tokens[-1] and text[-1:].isalpha():
        words = words[:-1]  # and may end inside one
    return words


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


def label_prompt(active: Sequence[str], silent: Sequence[str] = ()) -> str:
    """The question put to the labeller: numbered snippets with the firing tokens in [[ ]], and
    (when there are some) snippets where the latent is silent, to contrast them with."""
    lines = "\n".join(f"{i + 1}. {text}" for i, text in enumerate(active))
    question = f"Group A snippets, with words marked [[like this]]:\n{lines}\n"
    if silent:
        others = "\n".join(f"- {text}" for text in silent)
        question += f"Group B snippets:\n{others}\n"
        ask = "What do the marked words of group A have in common, unlike group B?"
    else:
        ask = "What do the marked words have in common?"
    return f"{question}{ask} Answer with a short name of one to three words."


def model_prompt(reader: FeatureReader, latent: int, n_contexts: int = MODEL_CONTEXTS) -> str:
    """The question from discovery's top contexts (no run to draw contrast examples from)."""
    t = reader.latent(latent, "top_windows", "top_rows")
    center = int(reader.manifest["window_center"])
    snippets = []
    for window, row in zip(t["top_windows"].tolist(), t["top_rows"].tolist(), strict=True):
        if row < 0 or len(snippets) >= n_contexts:
            continue
        strings = [reader.token(tok) if tok != PAD_TOKEN else "" for tok in window]
        snippets.append(marked_text(strings, [j == center for j in range(len(window))]))
    return label_prompt(snippets)


def marked_text(strings: Sequence[str], marks: Sequence[bool]) -> str:
    """The tokens joined, each run of marked tokens in [[ ]], on one line."""
    pieces = []
    for i, (text, mark) in enumerate(zip(strings, marks, strict=True)):
        opens = mark and (i == 0 or not marks[i - 1])
        closes = mark and (i == len(marks) - 1 or not marks[i + 1])
        pieces.append(f"{MARK_OPEN if opens else ''}{text}{MARK_CLOSE if closes else ''}")
    return " ".join("".join(pieces).split())


def example_snippets(
    lm: LoadedModel, tokens_NC: torch.Tensor, acts_NC: torch.Tensor, threshold: float
) -> list[str]:
    """Examples as marked text: tokens at or above ``threshold`` × the example's max are marked."""
    out = []
    for tokens, acts in zip(tokens_NC.tolist(), acts_NC, strict=True):
        strings = lm.tokenizer.batch_decode([[t] for t in tokens], clean_up_tokenization_spaces=False)
        peak = float(acts.max())
        marks = [peak > 0 and a >= threshold * peak for a in acts.tolist()]
        out.append(marked_text(strings, marks))
    return out


def model_labels_from_examples(
    lm: LoadedModel, examples: Sequence[Any], *, on_progress: Callable[[float], None] | None = None
) -> list[Concept]:
    """Name each latent from its top examples contrasted with silent ones (greedy, batched)."""
    threshold = ScoringConfig().fuzz_threshold
    latents, prompts, snippets, fallbacks = [], [], [], []
    for item in examples:
        if not len(item.train):
            continue
        active = example_snippets(lm, item.train.tokens_NC, item.train.acts_NC, threshold)
        silent = example_snippets(lm, item.contrast.tokens_NC, item.contrast.acts_NC, threshold)
        latents.append(item.latent)
        prompts.append(label_prompt(active, silent))
        snippets.append(active)
        fallbacks.append(_peak_word(lm, item.train.tokens_NC, item.train.acts_NC))
    described = f"from {len(examples[0].train) if examples else 0} top examples and silent ones"
    return _ask(lm, latents, prompts, snippets, fallbacks, described, on_progress)


def _peak_word(lm: LoadedModel, tokens_NC: torch.Tensor, acts_NC: torch.Tensor) -> str:
    """The whole word most often at the examples' peak activation ('' if none is a word)."""
    words: Counter[str] = Counter()
    for tokens, acts in zip(tokens_NC.tolist(), acts_NC, strict=True):
        strings = lm.tokenizer.batch_decode([[t] for t in tokens], clean_up_tokenization_spaces=False)
        words[word_at(strings, int(acts.argmax()))] += 1
    word = next((w for w, _ in words.most_common() if _is_word(w)), "")
    return word


def model_labels(
    reader: FeatureReader,
    lm: LoadedModel,
    latents: Sequence[int],
    *,
    on_progress: Callable[[float], None] | None = None,
) -> list[Concept]:
    """Ask the model to name each latent from discovery's top contexts (greedy, batched)."""
    prompts = [model_prompt(reader, latent) for latent in latents]
    heuristic = {c.latent: c.name for c in heuristic_labels(reader, latents)}
    fallbacks = [heuristic[latent] if "/" not in heuristic[latent] else "" for latent in latents]
    snippets = [prompt.splitlines()[1 : 1 + MODEL_CONTEXTS] for prompt in prompts]
    described = f"from {MODEL_CONTEXTS} top contexts (no silent ones to contrast)"
    return _ask(lm, list(latents), prompts, snippets, fallbacks, described, on_progress)


def _ask(
    lm: LoadedModel,
    latents: list[int],
    prompts: list[str],
    snippets: list[list[str]],
    fallbacks: list[str],
    described: str,
    on_progress: Callable[[float], None] | None,
) -> list[Concept]:
    """Generate the names, clean them, and replace a name copied from one snippet."""
    out: list[Concept] = []
    for start in range(0, len(latents), MODEL_BATCH):
        batch = slice(start, start + MODEL_BATCH)
        generations = generate(lm, [_chat(lm, p) for p in prompts[batch]], max_new_tokens=MODEL_NEW_TOKENS)
        for latent, generation, active, fallback in zip(
            latents[batch], generations, snippets[batch], fallbacks[batch], strict=True
        ):
            cut_off = len(generation.token_ids) >= MODEL_NEW_TOKENS
            name = clean_model_answer(generation.text, cut_off=cut_off)
            note = ""
            problem = answer_problem(name, active)
            if fallback and problem:
                note = f"; the model's answer {name!r} {problem}, so its peak word is used"
                name = fallback
            description = f"named by {lm.name} {described}{note}"
            out.append(Concept(latent=latent, name=name, description=description, source="model"))
        if on_progress is not None:
            on_progress(min(1.0, (start + MODEL_BATCH) / len(latents)))
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


#: Marker debris: whole or half markers, and brackets of any kind ("Post[gre]SQL", "Break[out").
MARKER_DEBRIS = re.compile(r"\[\[|\]\]|<<|>>|[\[\]<>{}|]")


def clean_model_answer(text: str, *, cut_off: bool = False) -> str:
    """The name up to the closing quote (or the line's end), tidied; '?' if nothing is left.

    Marker debris is removed (joining the word it split); an answer that ran out of tokens before
    its closing quote (``cut_off``) loses its last word, which may be cut; a name is at most
    five words and is shortened at a word boundary.
    """
    closed = '"' in text
    line = text.split('"', 1)[0]
    ended = "\n" in line.strip()
    line = next((part for part in line.strip().splitlines() if part.strip()), "")
    line = re.sub(r"^(answer|name|topic|theme)\s*:\s*", "", line.strip(), flags=re.IGNORECASE)
    words = MARKER_DEBRIS.sub("", line).split()
    if cut_off and not closed and not ended and len(words) > 1:
        words = words[:-1]
    words = words[:MAX_NAME_WORDS]
    while len(" ".join(words)) > MAX_NAME_CHARS and len(words) > 1:
        words = words[:-1]
    name = " ".join(words).strip(" '`*.,;:-")
    return name[:MAX_NAME_CHARS] or "?"


#: Words of the question itself: an answer made of them describes the prompt, not the latent.
PROMPT_WORDS = frozenset(
    ["group", "snippet", "snippets", "marked", "words", "word", "feature", "active", "common", "unlike"]
)


def answer_problem(name: str, snippets: Sequence[str]) -> str:
    """Why a model's answer is no name ('' when it is one): empty, made of the question's own
    words ("The feature is not active"), or copied from a single snippet."""
    if name == "?":
        return "was empty"
    words = {w.lower() for w in re.findall(r"\w+", name)}
    if words & PROMPT_WORDS:
        return "repeats the question"
    if copies_one_snippet(name, snippets):
        return "only copies one snippet"
    return ""


def copies_one_snippet(name: str, snippets: Sequence[str]) -> bool:
    """The name's words all occur in exactly one of three or more snippets: it names that snippet
    (a product or person in it), not what the snippets share."""
    words = [w.lower() for w in re.findall(r"\w+", name) if _is_word(w)]
    if not words or len(snippets) < 3:
        return False
    texts = [MARKER_DEBRIS.sub("", snippet).lower() for snippet in snippets]
    return sum(all(word in text for word in words) for text in texts) == 1
