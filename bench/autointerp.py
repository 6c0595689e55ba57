"""Scored automatic interpretation of SmolLM2 `model.layers.15` latents, with a chance control.

1. Capture `model.layers.15` over the first ``--docs`` paragraphs of the docstring corpus
   (bench/corpus.py, max 256 tokens each; by default all of it) into the bench store and train a
   TopK SAE on it (default 4,608 latents, k = 8, 8 epochs: sparser latents are more nameable,
   bench/README.md), once; discover its features over that run.
2. Examples (`kestrel.core.concepts.examples`, delphi's construction): blocks of the run's
   documents; the first ``--latents`` latents (by index) with enough examples to score.
3. Labels: the model (SmolLM2-135M-Instruct, the served model) names each latent from its top
   examples contrasted with silent ones (`labels.model_labels_from_examples`); ``--labels
   heuristic`` uses the token heuristic instead.
4. Scores (`kestrel.core.concepts.scoring`): detection and fuzzing balanced accuracy and the
   embedding AUROC, by the same model (or ``--scorer``: any local model, any tokenizer), on
   examples the labeller never saw; and the chance
   control: detection with the labels shuffled among the latents (a seeded derangement), on the
   same examples, the same calibration and the same scorer (``--form``: direct or channel).
   Two controls without a model: what a word-list label could reach (`word_match_detection`).

    python bench/autointerp.py                 # prints JSON; figures in bench/README.md
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from sklearn.metrics import balanced_accuracy_score

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import docstring_corpus

from kestrel.core.activations import capture
from kestrel.core.concepts import DiscoveryConfig, discover, examples, labels, scoring, update_concepts
from kestrel.core.concepts.config import ScoringConfig
from kestrel.core.concepts.dictionary import set_scores
from kestrel.core.concepts.store import FeatureReader
from kestrel.core.models import default_store_root, load_model
from kestrel.core.runs import CaptureOptions
from kestrel.core.sae import artifacts
from kestrel.core.store import LocalStore

LAYER = "model.layers.15"
MAX_LENGTH = 256
PROGRESS_EVERY = 10


def run_id(n_docs: int) -> str:
    return f"bench-autointerp-l15-{n_docs}d"


def ensure_features(store: LocalStore, lm, sae_id: str, n_docs: int, sae: dict, train: dict) -> dict:
    """Capture, train and discover once (kept in the bench store between runs); their timings."""
    timings = {}
    run = run_id(n_docs)
    if not store.exists("activations", run):
        started = time.perf_counter()
        texts = docstring_corpus(max_docs=n_docs)
        capture(lm, texts, [LAYER], store, run_id=run, options=CaptureOptions(max_length=MAX_LENGTH))
        timings["capture_s"] = round(time.perf_counter() - started, 1)
    if not store.exists("saes", sae_id):
        started = time.perf_counter()
        artifacts.train_from_run(store, run, LAYER, sae, train, sae_id=sae_id)
        timings["train_s"] = round(time.perf_counter() - started, 1)
    try:
        FeatureReader(store, sae_id)
    except Exception:
        started = time.perf_counter()
        discover(store, sae_id, lm, config=DiscoveryConfig(max_length=MAX_LENGTH))
        timings["discover_s"] = round(time.perf_counter() - started, 1)
    return timings


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation with no fixed point: every latent gets another latent's label."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=generator).tolist()
        if n < 2 or all(i != p for i, p in enumerate(perm)):
            return perm


def word_match_detection(item: examples.LatentExamples, source: examples.Examples, n_words: int = 5) -> float:
    """What a word list could reach: an example's score is how many of ``source``'s ``n_words``
    commonest peak tokens it contains, thresholded on the calibration split like a label's score.
    With ``source`` the labeller's examples this is a perfect reader of a perfect lexical label;
    with the test examples themselves it is fitted on what is scored (an upper bound, not a score)."""
    peaks = Counter(int(t[int(a.argmax())]) for t, a in zip(source.tokens_NC, source.acts_NC, strict=True))
    ids = torch.tensor([token for token, _ in peaks.most_common(n_words)])

    def hits(split: examples.Examples) -> torch.Tensor:
        return torch.isin(split.tokens_NC, ids).sum(dim=1).float()

    threshold = scoring.fit_threshold(
        hits(item.calibration_activating), hits(item.calibration_non_activating)
    )
    test = torch.cat([hits(item.test_activating), hits(item.test_non_activating)])
    truth = [True] * len(item.test_activating) + [False] * len(item.test_non_activating)
    return float(balanced_accuracy_score(truth, (test > threshold).numpy()))


def mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return round(statistics.fmean(kept), 4) if kept else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--docs", type=int, default=5000, help="documents (docstring paragraphs; the corpus has about 4,600)"
    )
    parser.add_argument("--latents", type=int, default=100, help="latents to label and score")
    parser.add_argument("--labels", choices=("model", "heuristic"), default="model")
    parser.add_argument("--n-latents", type=int, default=4608)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1024, help="SAE training batch")
    parser.add_argument("--form", choices=("direct", "channel"), default=ScoringConfig().form)
    parser.add_argument("--reduce", choices=("sum", "mean", "max"), default=ScoringConfig().reduce)
    parser.add_argument("--dtype", default="fp32", help="the scorer's and labeller's dtype")
    parser.add_argument(
        "--scorer",
        default=None,
        help="the scoring model (a local directory or a model name; default: SmolLM2 itself); "
        "bench/README.md says how to make Gemma 3 270M's directory from its PyPI GGUF",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffled control")
    parser.add_argument("--store", type=Path, default=default_store_root() / "bench")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    store = LocalStore(args.store)
    lm = load_model("smollm2-135m", device="cpu", dtype=args.dtype, store_root=default_store_root())
    sae_id = f"bench-autointerp-{args.docs}d-{args.n_latents}-k{args.k}-e{args.epochs}-b{args.batch_size}"
    sae = {"architecture": "topk", "n_latents": args.n_latents, "k": args.k}
    train = {"batch_size": args.batch_size, "epochs": args.epochs}
    timings = ensure_features(store, lm, sae_id, args.docs, sae, train)
    config = ScoringConfig(form=args.form, reduce=args.reduce)

    started = time.perf_counter()
    alive = torch.nonzero(FeatureReader(store, sae_id).full("fire_count")["fire_count"] > 0).flatten()
    candidates = alive[: 3 * args.latents].tolist()
    blocks = examples.read_blocks(store, sae_id, candidates, config)
    items = [examples.latent_examples(blocks, i, config) for i in range(len(candidates))]
    chosen = [item for item in items if item.scorable][: args.latents]
    timings["examples_s"] = round(time.perf_counter() - started, 1)

    started = time.perf_counter()
    if args.labels == "model":
        concepts = labels.model_labels_from_examples(lm, chosen)
    else:
        concepts = labels.heuristic_labels(FeatureReader(store, sae_id), [item.latent for item in chosen])
    update_concepts(store, sae_id, concepts, replace=True)
    named = {c.latent: c.name for c in concepts}
    print(json.dumps({"labels": named}), file=sys.stderr, flush=True)
    timings["labelling_s"] = round(time.perf_counter() - started, 1)

    started = time.perf_counter()
    order = [item.latent for item in chosen]
    shuffled = derangement(len(order), args.seed)
    controls = {latent: named[order[j]] for latent, j in zip(order, shuffled, strict=True)}
    scorer_lm = lm if args.scorer is None else load_model(args.scorer, device="cpu", dtype=args.dtype)
    key = scoring.scoring_key(scorer_lm.name, config, blocks.run_id)
    scorer = scoring.Scorer(scorer_lm, config, source_tokenizer=lm.tokenizer)
    results: dict = {}
    for start in range(0, len(chosen), PROGRESS_EVERY):  # a line per chunk: figures survive a kill
        chunk = chosen[start : start + PROGRESS_EVERY]
        part = scoring.score_latents(scorer, chunk, named, key=key, controls=controls)
        set_scores(store, sae_id, [r[0] for r in part.values()], list(part))
        results.update(part)
        progress = {
            "scored": len(results),
            "seconds": round(time.perf_counter() - started, 1),
            "detection_mean": mean([r[0].detection for r in results.values()]),
            "fuzz_mean": mean([r[0].fuzz for r in results.values()]),
            "embedding_mean": mean([r[0].embedding for r in results.values()]),
            "random_label_detection_mean": mean([r[1] for r in results.values()]),
        }
        print(json.dumps(progress), file=sys.stderr, flush=True)
    timings["scoring_s"] = round(time.perf_counter() - started, 1)

    scores = [r[0] for r in results.values()]
    detection = mean([s.detection for s in scores])
    control = mean([r[1] for r in results.values()])
    out = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads},
        "torch": torch.__version__,
        "layer": LAYER,
        "sae": {
            "id": sae_id,
            "n_latents": args.n_latents,
            "k": args.k,
            "run": run_id(args.docs),
            "training": train,
            "tokens_in_full_blocks": int(blocks.tokens_BC.numel()),
        },
        "labeller": f"{lm.name} ({args.dtype})",
        "scorer": f"{scorer_lm.name} ({args.dtype})",
        "labels": args.labels,
        "scoring_config": config.model_dump(),
        "n_latents_scored": len(scores),
        "n_candidates_skipped": sum(not item.scorable for item in items[: items.index(chosen[-1]) + 1])
        if chosen
        else 0,
        "detection_balanced_accuracy_mean": detection,
        "fuzz_balanced_accuracy_mean": mean([s.fuzz for s in scores]),
        "embedding_auroc_mean": mean([s.embedding for s in scores]),
        "random_label_detection_mean": control,
        "detection_minus_control": round(detection - control, 4) if detection and control else None,
        "word_match_detection_mean": mean([word_match_detection(item, item.train) for item in chosen]),
        "word_match_oracle_detection_mean": mean(
            [word_match_detection(item, item.test_activating) for item in chosen]
        ),
        "detection_at_least_0.75": sum((s.detection or 0) >= 0.75 for s in scores),
        "timings_s": timings,
        "seconds_per_latent": {
            "labelling": round(timings["labelling_s"] / max(len(scores), 1), 2),
            "scoring": round(timings["scoring_s"] / max(len(scores), 1), 2),
        },
        "examples": [
            {
                "latent": s.label and latent,
                "label": s.label,
                "detection": s.detection,
                "fuzz": s.fuzz,
                "embedding": s.embedding,
            }
            for latent, s in list(zip(results, scores, strict=True))[:12]
        ],
        "targets": {"detection_balanced_accuracy_mean": ">= 0.75", "detection_minus_control": ">= 0.15"},
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
