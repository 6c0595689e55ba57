"""How well a latent's label predicts its activations: detection, fuzzing and an embedding score.

The definitions are EleutherAI delphi's (`kestrel.core.concepts.examples` builds the examples):

* **detection**: the scorer is given the label and one example at a time and says whether the
  latent is active in it; the examples are ``n_test`` activating blocks (quantile-sampled) and
  as many random non-activating ones; the score is the **balanced accuracy** of its yes/no
  answers, ``(TPR + TNR) / 2`` (delphi's ``compute_classification_metrics``), chance 0.5;
* **fuzzing**: the same activating test blocks, once with the tokens the latent fires on marked
  (activation ≥ ``fuzz_threshold`` × the example's max, delphi's threshold 0.3) and once with as
  many random other tokens marked (delphi's ``n_incorrect``: the ceiling of the mean count of
  active tokens; delphi's fuzz type ``active``); balanced accuracy of "the marks are right";
* **embedding**: no generation, no forward: the AUROC of cos(label, example) separating the
  activating test blocks from the non-activating ones, each embedded as the mean of the scorer's
  input token embeddings (centred on the test examples' mean, which takes out the direction all
  of them share; no truth is used). A contextual state would be richer, but a 3-token label and
  a 16-token example sit at different positions and lengths, and that difference, not their
  meaning, dominated their cosine (AUROC below chance on the bench).

A 135M scorer cannot be trusted to write "yes"/"no" in a format, so it answers by
log-probabilities instead of generation, in one of two forms (``ScoringConfig.form``):

* ``direct`` (the default): the pointwise mutual information of the label with the example,
  ``log p(label | "Text:" + example + "\\nThis text is about") − log p(label | "Text:\\nThis text
  is about")``, read in one forward of the example with the label's tokens continued from its
  cached keys and values (so the chance control's shuffled label costs the label's tokens only);
* ``channel``: how much likelier the example is once the label is named,
  ``log p(example | "A text about <label>:\\n") − log p(example | "A text:\\n")``, per token,
  combined by ``reduce`` (sum, mean or max over the example's tokens): a small LM copies, so a
  label naming the example's words raises exactly those tokens. Fuzzing's channel form reads the
  marked example after "Words marked [[like this]] are about <label>:" against the same without
  the label. On the bench neither form beat the other beyond noise (bench/README.md), so the
  default stays ``direct``.

The scorer may be another model than the SAE's, with another tokenizer: the examples are token
ids of the SAE's model, so such a scorer reads each example's text, decoded with that model's
tokenizer and encoded with its own (marked runs decoded whole and wrapped); a scorer of the same
vocabulary reads the ids as they are.

The chance control is scored in the same form. The yes/no answer is "score > threshold", the
threshold being the one that best separates a separate **calibration** split of the latent (its own
activating and non-activating blocks, never scored); ties go to the middle of the best range.
Nothing is fitted on the examples scored.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from torch import Tensor

from kestrel.core.concepts.config import ScoringConfig
from kestrel.core.concepts.dictionary import LabelScores, ScoredExample
from kestrel.core.concepts.examples import Examples, LatentExamples, mean_active_tokens
from kestrel.core.errors import CancelledError
from kestrel.core.models import LoadedModel, bos_prefix

DETECT_PREFIX = "Text:"
DETECT_SUFFIX = "\nThis text is about"
FUZZ_SUFFIX = "\nThe words marked [[like this]] are about"
MARK_OPEN, MARK_CLOSE = "[[", "]]"
CHANNEL_PREFIX, CHANNEL_NEUTRAL = "A text about {}:\n", "A text:\n"
FUZZ_CHANNEL_PREFIX = "Words marked [[like this]] are about {}:\n"
FUZZ_CHANNEL_NEUTRAL = "Words marked [[like this]]:\n"
MAX_LABEL_TOKENS = 16
MAX_EXAMPLES_STORED = 24
#: How a scorer reads examples, in the scoring key: 2 reads another vocabulary's examples as text
#: and starts with the scorer's BOS, so scores stored by version 1 (raw ids) are scored again.
READING_VERSION = 2


def scoring_key(scorer: str, config: ScoringConfig, run_id: str) -> str:
    """What a label's scores depend on besides the label: a rerun with the same key can skip it."""
    blob = {"scorer": scorer, "run": run_id, "reading": READING_VERSION, **config.model_dump(mode="json")}
    blob = json.dumps(blob, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Scorer:
    """A language model answering by log-probabilities (see the module docstring)."""

    def __init__(self, lm: LoadedModel, config: ScoringConfig, source_tokenizer: Any | None = None) -> None:
        """``source_tokenizer``: the tokenizer of the model whose token ids the examples are (the
        SAE's model), when it may not be the scorer's: then each example is decoded to text with
        it and read in the scorer's own tokens (ids of one vocabulary mean nothing in another)."""
        self.lm = lm
        self.config = config
        tok = lm.tokenizer
        self.source = (
            None if source_tokenizer is None or same_vocabulary(source_tokenizer, tok) else source_tokenizer
        )
        self.text_tokenizer = self.source or tok
        """Turns the examples' token ids into text (what is stored with the scores)."""
        self.bos = bos_prefix(tok)
        """What the scorer's tokenizer puts first (Gemma's, Llama's BOS; none for SmolLM2): every
        sequence read starts with it, as the model was trained (without, Gemma 3's loss doubles)."""
        self.prefix = self.bos + self.encode(DETECT_PREFIX)
        self.suffix = self.encode(DETECT_SUFFIX)
        self.fuzz_suffix = self.encode(FUZZ_SUFFIX)
        self.mark_open, self.mark_close = self.encode(MARK_OPEN), self.encode(MARK_CLOSE)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    def encode(self, text: str) -> list[int]:
        return list(self.lm.tokenizer.encode(text, add_special_tokens=False))

    def row_ids(self, tokens: Sequence[int]) -> list[int]:
        """An example's token ids in the scorer's vocabulary."""
        if self.source is None:
            return [int(t) for t in tokens]
        return self.encode(self._text(tokens)) or [self.pad_id]  # never empty (an all-special block)

    def _text(self, tokens: Sequence[int]) -> str:
        """The source tokens as text, its special tokens (a document's BOS) left out: the scorer
        would read their names as words."""
        return self.source.decode(
            [int(t) for t in tokens], skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def label_ids(self, label: str) -> list[int]:
        return self.encode(" " + label.strip())[:MAX_LABEL_TOKENS] or self.encode(" ?")

    @torch.inference_mode()
    def label_logprobs(self, contexts: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]) -> Tensor:
        """``[len(labels), len(contexts)]`` log p(label | context), summed over the label's tokens:
        each batch of contexts (left-padded) is read once, and every label is continued from its
        cached keys and values, cropped back after each."""
        body = self.lm.model.base_model
        head = self.lm.model.get_output_embeddings()
        device = self.lm.device
        out_LN = torch.zeros(len(labels), len(contexts))
        for start in range(0, len(contexts), self.config.batch_size):
            chunk = contexts[start : start + self.config.batch_size]
            width = max(len(c) for c in chunk)
            ids_BT = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask_BT = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, context in enumerate(chunk):  # left-padded: every context ends where labels begin
                ids_BT[i, width - len(context) :] = torch.tensor(list(context))
                mask_BT[i, width - len(context) :] = 1
            ids_BT, mask_BT = ids_BT.to(device), mask_BT.to(device)
            out = body(
                input_ids=ids_BT,
                attention_mask=mask_BT,
                position_ids=(mask_BT.cumsum(1) - 1).clamp_min(0),
                use_cache=True,
            )
            cache = out.past_key_values
            first_BV = head(out.last_hidden_state[:, -1]).float().log_softmax(-1)
            lengths_B1 = mask_BT.sum(dim=1, keepdim=True)
            for j, label in enumerate(labels):
                logp_B = first_BV[:, label[0]]
                if len(label) > 1:
                    given_BL = torch.tensor(list(label[:-1]), device=device).expand(len(chunk), -1)
                    target_BL = torch.tensor(list(label[1:]), device=device).expand(len(chunk), -1)
                    with warnings.catch_warnings():  # transformers 5 renames past_key_values
                        warnings.filterwarnings("ignore", ".*past_key_values.*", FutureWarning)
                        step = body(
                            input_ids=given_BL,
                            attention_mask=torch.cat([mask_BT, torch.ones_like(given_BL)], dim=1),
                            position_ids=lengths_B1 + torch.arange(len(label) - 1, device=device),
                            past_key_values=cache,
                            use_cache=True,
                        )
                    logp_BLV = head(step.last_hidden_state).float().log_softmax(-1)
                    logp_B = logp_B + logp_BLV.gather(2, target_BL[..., None])[..., 0].sum(dim=1)
                    cache.crop(-(len(label) - 1))  # back to the context (negative: 4.x and 5.x)
                out_LN[j, start : start + len(chunk)] = logp_B.cpu()
        return out_LN

    @torch.inference_mode()
    def body_logprobs(self, prefix: Sequence[int], bodies: Sequence[Sequence[int]]) -> list[Tensor]:
        """``log p(token | prefix, the body's tokens before it)`` of every token of each body:
        ``prefix + body`` left-padded, ``batch_size`` sequences a forward."""
        body_model = self.lm.model.base_model
        head = self.lm.model.get_output_embeddings()
        out: list[Tensor] = []
        for start in range(0, len(bodies), self.config.batch_size):
            chunk = [list(b) for b in bodies[start : start + self.config.batch_size]]
            width = len(prefix) + max(len(b) for b in chunk)
            ids_BT = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask_BT = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, b in enumerate(chunk):  # left-padded: every body ends at the last position
                ids_BT[i, width - len(prefix) - len(b) :] = torch.tensor(list(prefix) + b)
                mask_BT[i, width - len(prefix) - len(b) :] = 1
            ids_BT, mask_BT = ids_BT.to(self.lm.device), mask_BT.to(self.lm.device)
            hidden = body_model(
                input_ids=ids_BT, attention_mask=mask_BT, position_ids=(mask_BT.cumsum(1) - 1).clamp_min(0)
            ).last_hidden_state
            longest = max(len(b) for b in chunk)  # positions that predict a body token
            logp_BLV = head(hidden[:, width - longest - 1 : width - 1]).float().log_softmax(-1)
            target_BL = ids_BT[:, width - longest :]
            logp_BL = logp_BLV.gather(2, target_BL[..., None])[..., 0].cpu()
            out += [logp_BL[i, longest - len(b) :] for i, b in enumerate(chunk)]
        return out

    def channel_scores(
        self, bodies: Sequence[Sequence[int]], labels: Sequence[str], template: str, neutral: str
    ) -> Tensor:
        """``[len(labels), len(bodies)]``: how much more likely each body is after the label's
        prefix than after the neutral one, its per-token log-ratios combined by ``reduce``."""
        base = self.body_logprobs(self.bos + self.encode(neutral), bodies)
        out_LN = torch.zeros(len(labels), len(bodies))
        for j, label in enumerate(labels):
            given = self.body_logprobs(self.channel_prefix(template, label), bodies)
            out_LN[j] = torch.stack(
                [_reduce(g - b, self.config.reduce) for g, b in zip(given, base, strict=True)]
            )
        return out_LN

    def channel_prefix(self, template: str, label: str) -> list[int]:
        """The prefix naming ``label``, its name cut to ``MAX_LABEL_TOKENS`` tokens."""
        name = self.lm.tokenizer.decode(self.label_ids(label)).strip()
        return self.bos + self.encode(template.format(name))

    def detection_scores(self, rows: Sequence[Sequence[int]], labels: Sequence[str]) -> Tensor:
        """``[len(labels), len(rows)]`` detection score of each example under each label (its
        form is the config's: higher means "the latent is active here")."""
        rows = [self.row_ids(row) for row in rows]
        if self.config.form == "channel":
            return self.channel_scores(rows, labels, CHANNEL_PREFIX, CHANNEL_NEUTRAL)
        ids = [self.label_ids(label) for label in labels]
        logp_LN = self.label_logprobs([self.prefix + list(row) + self.suffix for row in rows], ids)
        return logp_LN - self.label_logprobs([self.prefix + self.suffix], ids)

    def fuzz_scores(self, marked_rows: Sequence[Sequence[int]], label: str) -> Tensor:
        """``[len(marked_rows)]`` score of "the marked tokens are what ``label`` names"."""
        if self.config.form == "channel":
            return self.channel_scores(marked_rows, [label], FUZZ_CHANNEL_PREFIX, FUZZ_CHANNEL_NEUTRAL)[0]
        contexts = [self.prefix + list(row) + self.fuzz_suffix for row in marked_rows]
        return self.label_logprobs(contexts, [self.label_ids(label)])[0]

    @torch.inference_mode()
    def embed(self, rows: Sequence[Sequence[int]]) -> Tensor:
        """``[N, d]`` mean input embedding of each row of the scorer's token ids."""
        table = self.lm.model.get_input_embeddings()
        device = self.lm.device
        return torch.stack(
            [table(torch.tensor(list(r), device=device)).float().mean(dim=0).cpu() for r in rows]
        )

    def marked(self, tokens: Sequence[int], marks: Sequence[bool]) -> list[int]:
        """Token ids with each run of marked tokens wrapped in [[ ]] (delphi's ``_highlight``)."""
        if self.source is not None:
            return self.encode(self._marked_text(tokens, marks))
        out: list[int] = []
        for i, (token, mark) in enumerate(zip(tokens, marks, strict=True)):
            if mark and (i == 0 or not marks[i - 1]):
                out += self.mark_open
            out.append(int(token))
            if mark and (i == len(marks) - 1 or not marks[i + 1]):
                out += self.mark_close
        return out

    def _marked_text(self, tokens: Sequence[int], marks: Sequence[bool]) -> str:
        """The example as text with each run of marked tokens wrapped in [[ ]], placed by each
        token's characters in the decoded text (decoding growing prefixes), so a tokenizer that
        strips a leading space or splits a character across tokens keeps the text as decoded
        whole. A run of no characters (special tokens) is not marked."""
        ids = [int(t) for t in tokens]
        text = self._text(ids)
        prefixes = [self._text(ids[:i]) for i in range(len(ids) + 1)]
        if not all(text.startswith(prefix) for prefix in prefixes):
            return self._marked_runs(ids, marks)  # a decoder whose prefixes are not the text's
        cuts = [len(prefix) for prefix in prefixes]
        parts: list[str] = []
        done = 0
        for start, end in _marked_spans(marks):
            lo, hi = cuts[start], cuts[end]
            if hi > lo:
                parts += [text[done:lo], MARK_OPEN, text[lo:hi], MARK_CLOSE]
                done = hi
        return "".join(parts) + text[done:]

    def _marked_runs(self, ids: list[int], marks: Sequence[bool]) -> str:
        """The fallback: each run of marked or unmarked tokens decoded on its own."""
        parts: list[str] = []
        start = 0
        for i in range(1, len(ids) + 1):
            if i == len(ids) or marks[i] != marks[start]:
                text = self._text(ids[start:i])
                parts.append(MARK_OPEN + text + MARK_CLOSE if marks[start] and text else text)
                start = i
        return "".join(parts)


def _marked_spans(marks: Sequence[bool]) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of marked tokens."""
    spans: list[tuple[int, int]] = []
    start = None
    for i, mark in enumerate([*marks, False]):
        if mark and start is None:
            start = i
        elif not mark and start is not None:
            spans.append((start, i))
            start = None
    return spans


def same_vocabulary(a: Any, b: Any) -> bool:
    """Whether two tokenizers give every token the same id (then ids pass between them as they are)."""
    return a is b or (len(a) == len(b) and a.get_vocab() == b.get_vocab())


def _reduce(values: Tensor, how: str) -> Tensor:
    if how == "max":
        return values.max()
    return values.mean() if how == "mean" else values.sum()


@dataclass
class _Split:
    """Scores of one classification: calibration and test, each with its truth."""

    calibration: Tensor
    calibration_truth: Tensor
    test: Tensor
    test_truth: Tensor

    def balanced_accuracy(self) -> tuple[float, float, Tensor]:
        threshold = fit_threshold(
            self.calibration[self.calibration_truth], self.calibration[~self.calibration_truth]
        )
        predicted = self.test > threshold
        value = balanced_accuracy_score(self.test_truth.numpy(), predicted.numpy())
        return float(value), threshold, predicted


def fit_threshold(positive: Tensor, negative: Tensor) -> float:
    """The cut (between two sorted calibration scores) with the best balanced accuracy on them;
    of equally good cuts, the middle one."""
    values = torch.cat([positive, negative]).sort().values
    cuts = torch.cat([values[:1] - 1.0, (values[1:] + values[:-1]) / 2, values[-1:] + 1.0])
    tpr = (positive[None, :] > cuts[:, None]).float().mean(dim=1)
    tnr = (negative[None, :] <= cuts[:, None]).float().mean(dim=1)
    accuracy = (tpr + tnr) / 2
    best = torch.nonzero(accuracy >= accuracy.max() - 1e-9).flatten()
    return float(cuts[best[len(best) // 2]])


def score_latents(
    scorer: Scorer,
    examples: Sequence[LatentExamples],
    labels: dict[int, str],
    *,
    key: str,
    controls: dict[int, str] | None = None,
    on_progress: Callable[[float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[int, tuple[LabelScores, float | None]]:
    """Scores of each latent's label (and, with ``controls``, the detection balanced accuracy of
    the control label on the same examples: the chance control)."""
    out: dict[int, tuple[LabelScores, float | None]] = {}
    for done, item in enumerate(examples, start=1):
        if should_stop is not None and should_stop():
            raise CancelledError("scoring cancelled; the latents scored so far are kept")
        control = controls.get(item.latent) if controls else None
        out[item.latent] = score_one(scorer, item, labels[item.latent], key=key, control=control)
        if on_progress is not None:
            on_progress(done / len(examples))
    return out


def score_one(
    scorer: Scorer, item: LatentExamples, label: str, *, key: str, control: str | None = None
) -> tuple[LabelScores, float | None]:
    """Detection, fuzzing and embedding scores of ``label`` on one latent's examples."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    base = {"label": label, "scorer": scorer.lm.name, "key": key, "scored": stamp}
    if not item.scorable:
        note = f"too few examples: {item.n_activating} activating blocks in the rows read"
        return LabelScores(**base, note=note), None
    labels = [label] + ([control] if control is not None else [])
    detection = _detection(scorer, item, labels)
    scores = LabelScores(
        **base,
        detection=detection.accuracy,
        fuzz=_fuzz(scorer, item, label),
        embedding=_embedding(scorer, item, scorer.label_ids(label)),
        threshold=detection.threshold,
        n_activating=len(item.test_activating),
        n_non_activating=len(item.test_non_activating),
        examples=detection.examples,
    )
    return scores, detection.control


@dataclass
class _Detection:
    accuracy: float
    control: float | None
    threshold: float
    examples: list[ScoredExample]


def _detection(scorer: Scorer, item: LatentExamples, labels: list[str]) -> _Detection:
    sets = (
        item.test_activating,
        item.test_non_activating,
        item.calibration_activating,
        item.calibration_non_activating,
    )
    values_LN = scorer.detection_scores([row for s in sets for row in s.tokens_NC.tolist()], labels)
    sizes = [len(s) for s in sets]
    n_test = sizes[0] + sizes[1]
    truth = torch.tensor([True] * sizes[0] + [False] * sizes[1] + [True] * sizes[2] + [False] * sizes[3])
    results = []
    for values_N in values_LN:
        split = _Split(values_N[n_test:], truth[n_test:], values_N[:n_test], truth[:n_test])
        results.append(split.balanced_accuracy())
    accuracy, threshold, predicted = results[0]
    return _Detection(
        accuracy=accuracy,
        control=results[1][0] if len(results) > 1 else None,
        threshold=threshold,
        examples=_stored_examples(scorer, (sets[0], sets[1]), values_LN[0], predicted),
    )


def _fuzz(scorer: Scorer, item: LatentExamples, label: str) -> float:
    n_incorrect = mean_active_tokens(item.test_activating)
    generator = torch.Generator().manual_seed(scorer.config.seed)
    bodies: list[list[int]] = []
    for examples in (item.test_activating, item.calibration_activating):
        right = [_correct_marks(scorer, row) for row in examples.acts_NC]
        wrong = [
            _random_marks(scorer, acts, tokens, n_incorrect, generator)
            for acts, tokens in zip(examples.acts_NC, examples.tokens_NC, strict=True)
        ]
        for marks in (right, wrong):
            for tokens, m in zip(examples.tokens_NC.tolist(), marks, strict=True):
                bodies.append(scorer.marked(tokens, m))
    scores = scorer.fuzz_scores(bodies, label)
    n_test, n_cal = len(item.test_activating), len(item.calibration_activating)
    test_truth = torch.tensor([True] * n_test + [False] * n_test)
    cal_truth = torch.tensor([True] * n_cal + [False] * n_cal)
    split = _Split(scores[2 * n_test :], cal_truth, scores[: 2 * n_test], test_truth)
    return split.balanced_accuracy()[0]


def _correct_marks(scorer: Scorer, acts_C: Tensor) -> list[bool]:
    return (acts_C >= scorer.config.fuzz_threshold * acts_C.max()).tolist()


def _random_marks(
    scorer: Scorer, acts_C: Tensor, tokens_C: Tensor, n: int, generator: torch.Generator
) -> list[bool]:
    """``n`` random tokens at or below the threshold (delphi's false-positive highlighting); never
    a special token (a document's BOS): the latent never fires there, so a mark on one would tell
    a random marking from the right one by itself."""
    special = torch.tensor(scorer.text_tokenizer.all_special_ids, dtype=tokens_C.dtype)
    eligible = (acts_C <= scorer.config.fuzz_threshold * acts_C.max()) & ~torch.isin(tokens_C, special)
    below = torch.nonzero(eligible).flatten()
    chosen = below[torch.randperm(len(below), generator=generator)[:n]]
    marks = torch.zeros(len(acts_C), dtype=torch.bool)
    marks[chosen] = True
    return marks.tolist()


def _embedding(scorer: Scorer, item: LatentExamples, label: list[int]) -> float:
    rows = item.test_activating.tokens_NC.tolist() + item.test_non_activating.tokens_NC.tolist()
    examples_ND = scorer.embed([scorer.row_ids(row) for row in rows])
    centre_D = examples_ND.mean(dim=0)  # of all test examples: no truth used
    label_D = scorer.embed([label])[0] - centre_D
    cos_N = torch.nn.functional.cosine_similarity(examples_ND - centre_D, label_D[None], dim=1)
    truth = [1] * len(item.test_activating) + [0] * len(item.test_non_activating)
    return float(roc_auc_score(truth, cos_N.numpy()))


def _stored_examples(
    scorer: Scorer, sets: tuple[Examples, Examples], values_N: Tensor, predicted: Tensor
) -> list[ScoredExample]:
    """The scored test examples as text, with the scorer's value and answer (kept with the label)."""
    out: list[ScoredExample] = []
    texts = scorer.text_tokenizer.batch_decode
    i = 0
    for activating, examples in zip((True, False), sets, strict=True):
        for row, (tokens, acts) in enumerate(
            zip(examples.tokens_NC.tolist(), examples.acts_NC.tolist(), strict=True)
        ):
            if len(out) < MAX_EXAMPLES_STORED:
                out.append(
                    ScoredExample(
                        tokens=texts([[t] for t in tokens], clean_up_tokenization_spaces=False),
                        activations=[round(a, 4) for a in acts],
                        activating=activating,
                        quantile=examples.quantile[row] if examples.quantile else None,
                        score=round(float(values_N[i]), 4),
                        predicted=bool(predicted[i]),
                    )
                )
            i += 1
    return out
