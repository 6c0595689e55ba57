"""Scored automatic interpretation: examples, scores, cleaned labels, scores kept with the label.

Examples are checked against the stored run and a brute-force encode; the scorer's cached,
left-padded log-probabilities against plain forwards of the whole sequences; the threshold and
balanced accuracy against their definitions; label cleaning against the debris seen in the field
("Post[gre]SQL", "Break[out"); the dictionary against old files and renames; and the whole label
and score job on SmolLM2 over the four-topic corpus, including a job stopped mid-way and rerun.
"""

from __future__ import annotations

import json

import pytest
import torch
from topic_corpus import topic_corpus

from kestrel.core import concepts
from kestrel.core.activations import capture
from kestrel.core.catalog import DEFAULT_MODEL
from kestrel.core.concepts import examples, labels, scoring
from kestrel.core.concepts.config import ScoringConfig
from kestrel.core.concepts.dictionary import LabelScores
from kestrel.core.errors import CancelledError, InvalidInputError
from kestrel.core.models import load_tokenizer
from kestrel.core.run_reader import RowBatch, iter_row_batches
from kestrel.core.runs import CaptureOptions
from kestrel.core.sae import artifacts

TINY_SAE = {"architecture": "topk", "n_latents": 32, "k": 4}
TINY_TRAIN = {"batch_size": 256, "epochs": 2, "seed": 3}
LAYER = "model.layers.1"


@pytest.fixture
def trained(tiny_lm, store) -> str:
    texts, _ = topic_corpus(per_topic=30, seed=1)
    run = capture(tiny_lm, texts, [LAYER], store, options=CaptureOptions(dtype="fp32"))
    artifacts.train_from_run(store, run.id, LAYER, TINY_SAE, TINY_TRAIN, sae_id="sae-s")
    return run.id


# ---------------------------------------------------------------------------------------------
# Examples


def test_blocks_are_the_runs_tokens_and_activations_are_the_saes(store, trained) -> None:
    config = ScoringConfig(example_ctx_len=8)
    latents = [3, 5, 11]
    blocks = examples.read_blocks(store, "sae-s", latents, config)
    rows = RowBatch.cat(list(iter_row_batches(store, trained, LAYER)))
    order = torch.argsort(rows.doc_index_N.long() * 100_000 + rows.position_N.long())
    doc, pos, token = rows.doc_index_N[order], rows.position_N[order], rows.token_id_N[order]
    sae, _ = artifacts.load_sae(store, "sae-s")
    with torch.no_grad():
        encoded = sae.encode(rows.acts_ND[order])
    dense = torch.zeros(len(rows), sae.n_latents).scatter_add_(1, encoded.indices, encoded.acts)
    dense[pos == 0] = 0.0  # the attention sink counts as silent
    expected_tokens, expected_acts = [], []
    for d in torch.unique(doc).tolist():
        mine = torch.nonzero(doc == d).flatten()
        for start in range(0, len(mine) - 7, 8):
            block = mine[start : start + 8]
            assert torch.equal(pos[block], torch.arange(start, start + 8, dtype=pos.dtype))
            expected_tokens.append(token[block])
            expected_acts.append(dense[block][:, latents])
    assert torch.equal(blocks.tokens_BC, torch.stack(expected_tokens).long())
    acts_BCL = torch.stack(expected_acts)
    for slot in range(len(latents)):
        torch.testing.assert_close(blocks.acts_for(slot), acts_BCL[:, :, slot], atol=1e-5, rtol=1e-5)


def test_latent_examples_follow_delphis_splits_and_never_overlap(store, trained) -> None:
    config = ScoringConfig(example_ctx_len=8, n_train=3, n_contrast=2, n_test=4, n_non_activating=4)
    blocks = examples.read_blocks(store, "sae-s", list(range(32)), config)
    checked = 0
    for slot in range(32):
        item = examples.latent_examples(blocks, slot, config)
        if not item.scorable:
            continue
        checked += 1
        peak = {
            name: getattr(item, name).acts_NC.max(dim=1).values
            for name in ("train", "test_activating", "calibration_activating")
        }
        # the labeller's examples are the top blocks; every scored one ranks below them
        assert float(peak["train"].min()) >= float(peak["test_activating"].max())
        assert (peak["test_activating"] > 0).all() and (peak["calibration_activating"] > 0).all()
        for name in ("contrast", "test_non_activating", "calibration_non_activating"):
            assert (getattr(item, name).acts_NC == 0).all(), name
        assert len(item.test_activating) == 4 and item.test_activating.quantile == sorted(
            item.test_activating.quantile
        )
        splits = ("train", "contrast", "test_activating", "test_non_activating")
        splits += ("calibration_activating", "calibration_non_activating")
        ids = [i for name in splits for i in getattr(item, name).index_N.tolist()]
        assert len(ids) == len(set(ids)), "no block is shown, calibrated on and scored twice"
        again = examples.latent_examples(blocks, slot, config)
        assert torch.equal(again.test_activating.index_N, item.test_activating.index_N), "seeded"
    assert checked >= 5


def test_split_quantiles_is_delphis() -> None:
    generator = torch.Generator().manual_seed(0)
    chosen, quantiles = examples.split_quantiles(100, 10, 20, generator)
    assert len(chosen) == 20 and quantiles == [q for q in range(10) for _ in range(2)]
    assert all(10 * q <= i < 10 * (q + 1) for i, q in zip(chosen, quantiles, strict=True))
    few, few_q = examples.split_quantiles(5, 10, 10, generator)  # fewer examples than quantiles
    assert sorted(few) == [0, 1, 2, 3, 4] and few_q == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# Scorer mechanics


def test_cached_left_padded_logprobs_equal_plain_forwards(smollm) -> None:
    scorer = scoring.Scorer(smollm, ScoringConfig(batch_size=3))
    contexts = [scorer.encode(t) for t in ("Text: the cat sat", "Text: a", "Text: SQL databases store rows")]
    contexts.append(scorer.encode("Text: x y z w v"))
    labels = [scorer.label_ids("animals"), scorer.label_ids("database tables"), scorer.label_ids("x")]
    got_LN = scorer.label_logprobs(contexts, labels)
    for n, context in enumerate(contexts):
        for j, label in enumerate(labels):
            ids = torch.tensor([context + label])
            with torch.no_grad():
                logp = smollm.model(input_ids=ids).logits[0].float().log_softmax(-1)
            expected = sum(float(logp[len(context) - 1 + i, tok]) for i, tok in enumerate(label))
            assert got_LN[j, n].item() == pytest.approx(expected, abs=2e-3), (n, j)


def _plain_logprobs(lm, prefix: list[int], body: list[int]) -> torch.Tensor:
    """log p(body_t | prefix, body_<t) from one unpadded forward of the whole sequence."""
    with torch.no_grad():
        logp = lm.model(input_ids=torch.tensor([prefix + body])).logits[0].float().log_softmax(-1)
    return torch.stack([logp[len(prefix) - 1 + t, token] for t, token in enumerate(body)])


@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
def test_channel_scores_are_two_independent_log_probabilities(smollm, reduce: str) -> None:
    """log p(example | label's prefix) − log p(example | neutral prefix), per token, combined:
    the batched, left-padded forwards against one plain forward per sequence."""
    scorer = scoring.Scorer(smollm, ScoringConfig(form="channel", reduce=reduce, batch_size=2))
    bodies = [scorer.encode(t) for t in (" the cat sat on the mat", " SQL", " rows of a table in a database")]
    names = ["animals", "databases"]
    got_LN = scorer.channel_scores(bodies, names, "About {}:\n", "Text:\n")
    combine = {"sum": torch.sum, "mean": torch.mean, "max": torch.max}[reduce]
    for j, name in enumerate(names):
        for n, body in enumerate(bodies):
            given = _plain_logprobs(smollm, scorer.encode(f"About {name}:\n"), body)
            neutral = _plain_logprobs(smollm, scorer.encode("Text:\n"), body)
            expected = float(combine(given - neutral))
            assert got_LN[j, n].item() == pytest.approx(expected, abs=2e-3), (j, n)
    # the label's prefix makes its own words likelier: the score ranks the matching body first
    assert got_LN[0, 0] > got_LN[1, 0] and got_LN[1, 2] > got_LN[0, 2]


def test_detection_and_its_control_share_the_configured_form(smollm) -> None:
    rows = [smollm.tokenizer.encode(t, add_special_tokens=False) for t in (" a red apple", " the SQL query")]
    for form in ("direct", "channel"):
        scorer = scoring.Scorer(smollm, ScoringConfig(form=form))
        both_LN = scorer.detection_scores(rows, ["fruit", "databases"])
        for j, name in enumerate(["fruit", "databases"]):
            alone_N = scorer.detection_scores(rows, [name])[0]
            assert torch.allclose(both_LN[j], alone_N, atol=2e-3), form
    direct = scoring.Scorer(smollm, ScoringConfig(form="direct")).detection_scores(rows, ["fruit"])
    channel = scoring.Scorer(smollm, ScoringConfig(form="channel")).detection_scores(rows, ["fruit"])
    assert not torch.allclose(direct, channel)


def _examples(lm, texts: list[str], word: str | None) -> examples.Examples:
    """8-token blocks of ``texts``, active (1.0) at the tokens that spell ``word``."""
    rows = [lm.tokenizer.encode(t, add_special_tokens=False)[:8] for t in texts]
    assert all(len(r) == 8 for r in rows)
    tokens_NC = torch.tensor(rows)
    acts_NC = torch.zeros(tokens_NC.shape)
    if word is not None:
        pieces = torch.tensor(lm.tokenizer.encode(" " + word, add_special_tokens=False))
        acts_NC[torch.isin(tokens_NC, pieces)] = 1.0
    return examples.Examples(tokens_NC, acts_NC, torch.arange(len(rows)))


def _cat_latent(lm) -> examples.LatentExamples:
    """A latent firing on "cat": 4 + 2 cat sentences (test, calibration) against table sentences."""
    cats = [f"the cat {v} on the mat and then" for v in ("sat", "slept", "ran", "ate", "purred", "hid")]
    other = [f"the {n} table has rows and a key" for n in ("first", "second", "third", "big", "small", "old")]
    active, silent = _examples(lm, cats, "cat"), _examples(lm, other, None)

    def part(e: examples.Examples, rows: slice) -> examples.Examples:
        return examples.Examples(e.tokens_NC[rows], e.acts_NC[rows], e.index_N[rows])

    return examples.LatentExamples(
        latent=0,
        n_activating=6,
        train=part(active, slice(0, 0)),
        contrast=part(silent, slice(0, 0)),
        test_activating=part(active, slice(0, 4)),
        test_non_activating=part(silent, slice(0, 4)),
        calibration_activating=part(active, slice(4, 6)),
        calibration_non_activating=part(silent, slice(4, 6)),
    )


def test_channel_form_scores_a_latent_and_its_control_the_same_way(smollm) -> None:
    """Detection, fuzzing and embedding in the channel form, end to end on one latent; the chance
    control's value is exactly what its label would score as the latent's own."""
    item = _cat_latent(smollm)
    scorer = scoring.Scorer(smollm, ScoringConfig(form="channel", reduce="max"))
    scores, control = scoring.score_one(scorer, item, "cats", key="k", control="database tables")
    as_own, _ = scoring.score_one(scorer, item, "database tables", key="k")
    assert control == as_own.detection
    for value in (scores.detection, scores.fuzz, scores.embedding):
        assert value is not None and 0.0 <= value <= 1.0
    assert len(scores.examples) == 8 and scores.threshold is not None


def test_threshold_is_fitted_on_calibration_and_balanced_accuracy_is_delphis() -> None:
    positive, negative = torch.tensor([2.0, 3.0, 5.0]), torch.tensor([-1.0, 0.0, 1.0])
    threshold = scoring.fit_threshold(positive, negative)
    assert threshold == pytest.approx(1.5)
    # ties: the middle of the equally good cuts
    assert scoring.fit_threshold(torch.tensor([1.0]), torch.tensor([1.0])) in (0.0, 1.0, 2.0)
    split = scoring._Split(
        torch.cat([positive, negative]),
        torch.tensor([True] * 3 + [False] * 3),
        torch.tensor([4.0, 1.0, 0.5, -3.0]),  # test: TP, FN, FP?, TN at threshold 1.5
        torch.tensor([True, True, False, False]),
    )
    accuracy, fitted, predicted = split.balanced_accuracy()
    assert fitted == pytest.approx(1.5) and predicted.tolist() == [True, False, False, False]
    assert accuracy == pytest.approx((1 / 2 + 2 / 2) / 2)  # (TPR + TNR) / 2


def test_marks_wrap_each_run_of_tokens(smollm) -> None:
    scorer = scoring.Scorer(smollm, ScoringConfig())
    tokens = scorer.encode(" one two three four")
    marked = scorer.marked(tokens, [False, True, True, False])
    assert smollm.tokenizer.decode(marked) == " one[[ two three]] four"


@pytest.fixture(scope="module")
def other_vocab_lm():
    """A tiny random Llama whose vocabulary (300 byte-level BPE tokens) is not SmolLM2's."""
    from tiny_models import other_vocab_llama

    from kestrel.core.models import LoadedModel

    texts = ["the cat sat on the mat", "SQL databases store rows", "Text: This text is about [[ ]]"]
    model, tokenizer = other_vocab_llama(texts * 4)
    return LoadedModel("other-vocab", model, tokenizer, torch.device("cpu"), torch.float32, "local")


def test_a_scorer_with_another_vocabulary_reads_the_examples_text(
    smollm, other_vocab_lm, model_cache_root
) -> None:
    """Examples hold the SAE model's token ids; a scorer with another tokenizer must score the
    same text it would score tokenized its own way (ids of one vocabulary mean nothing in another)."""
    texts = [" the cat sat on the mat", " SQL databases store rows", " a cat and a database"]
    source_rows = [smollm.tokenizer.encode(t, add_special_tokens=False) for t in texts]
    own_rows = [other_vocab_lm.tokenizer.encode(t, add_special_tokens=False) for t in texts]
    assert source_rows != own_rows
    assert not scoring.same_vocabulary(smollm.tokenizer, other_vocab_lm.tokenizer)
    config = ScoringConfig(batch_size=2)
    reading = scoring.Scorer(other_vocab_lm, config, source_tokenizer=smollm.tokenizer)
    native = scoring.Scorer(other_vocab_lm, config)
    for form in ("direct", "channel"):
        reading.config = native.config = ScoringConfig(batch_size=2, form=form)
        got = reading.detection_scores(source_rows, ["cats", "databases"])
        want = native.detection_scores(own_rows, ["cats", "databases"])
        assert torch.allclose(got, want, atol=1e-5), form
    marks = [False, True, True, False, False, False]
    assert len(source_rows[0]) == len(marks)
    marked = reading.marked(source_rows[0], marks)
    assert other_vocab_lm.tokenizer.decode(marked) == " the[[ cat sat]] on the mat"
    assert torch.allclose(reading.embed([reading.row_ids(source_rows[1])]), native.embed([own_rows[1]]))
    special = smollm.tokenizer.all_special_ids[0]  # a document's BOS: not read as the words of its name
    assert reading.row_ids([special, *source_rows[1]]) == own_rows[1]
    # the served model as its own scorer, or one of the same vocabulary, passes ids through as they are
    assert scoring.Scorer(smollm, config, source_tokenizer=smollm.tokenizer).source is None
    copy = load_tokenizer(DEFAULT_MODEL, store_root=model_cache_root)  # another object, same vocabulary
    assert (
        copy is not smollm.tokenizer and scoring.Scorer(smollm, config, source_tokenizer=copy).source is None
    )


def test_the_examples_tokenizer_is_the_runs_models(store, trained, tiny_lm, other_vocab_lm) -> None:
    """A scorer of another model gets the run's model's tokenizer (from the loaded model when it
    is that one, else from the loader); when none can be loaded, the ids are read as the
    scorer's own and a note says so, rather than failing a job the scorer alone could do."""
    asked: list[str] = []

    def loader(name: str):
        asked.append(name)
        return tiny_lm.tokenizer

    assert labels.examples_tokenizer(store, trained, tiny_lm) == (None, None)  # the run's own model
    assert labels.examples_tokenizer(store, trained, other_vocab_lm, tiny_lm) == (tiny_lm.tokenizer, None)
    assert labels.examples_tokenizer(store, trained, other_vocab_lm, loader=loader) == (
        tiny_lm.tokenizer,
        None,
    )
    assert asked == [tiny_lm.name]

    def missing(name: str):
        raise InvalidInputError(f"no model {name!r} here")

    tokenizer, note = labels.examples_tokenizer(store, trained, other_vocab_lm, loader=missing)
    assert tokenizer is None and "no model 'tiny-llama' here" in note and "'other-vocab'" in note


def test_marks_keep_the_text_of_a_tokenizer_that_strips_a_leading_space(other_vocab_lm) -> None:
    """A sentencepiece-style source (Metaspace: "▁cat", the first token's space dropped when
    decoded) marks the same characters as its text decoded whole; a run on a special token alone
    is not marked (an empty [[]] would give a random marking away)."""
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = SentencePieceBPETokenizer()
    bpe.train_from_iterator(["the cat sat on the mat"] * 8, vocab_size=60, special_tokens=["<s>"])
    source = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>")
    ids = source.encode("the cat sat on the mat", add_special_tokens=False)
    # decoded alone, every token loses its space: runs decoded apart would read "the[[cat sat]]on"
    assert [source.decode([i]) for i in ids] == ["the", "cat", "sat", "on", "the", "mat"]
    scorer = scoring.Scorer(other_vocab_lm, ScoringConfig(), source_tokenizer=source)
    marked = scorer.marked(ids, [False, True, True, False, False, False])
    assert other_vocab_lm.tokenizer.decode(marked) == "the[[ cat sat]] on the mat"
    bos = source.bos_token_id
    marked = scorer.marked([bos, *ids], [True, False, False, False, False, False, True])
    assert other_vocab_lm.tokenizer.decode(marked) == "the cat sat on the[[ mat]]"


def test_scores_from_another_vocabulary_store_the_examples_text(smollm, other_vocab_lm) -> None:
    item = _cat_latent(smollm)
    scorer = scoring.Scorer(other_vocab_lm, ScoringConfig(), source_tokenizer=smollm.tokenizer)
    scores, _ = scoring.score_one(scorer, item, "cats", key="k")
    shown = ["".join(example.tokens) for example in scores.examples]
    assert shown[:4] == [smollm.tokenizer.decode(row) for row in item.test_activating.tokens_NC.tolist()]
    assert shown[0].startswith("the cat sat") and scores.fuzz is not None and scores.embedding is not None


# ---------------------------------------------------------------------------------------------
# Labels


@pytest.mark.parametrize(
    ("answer", "cut_off", "expected"),
    [
        ('Post[gre]SQL"', False, "PostgreSQL"),
        ('Break[out" is the word', False, "Breakout"),
        ("[[database]] queries\n", False, "database queries"),
        ("microcontroller programming in emb", True, "microcontroller programming in"),
        ('  Answer: network sockets."', False, "network sockets"),
        ('"', False, "?"),
    ],
)
def test_model_answers_are_cleaned(answer: str, cut_off: bool, expected: str) -> None:
    assert labels.clean_model_answer(answer, cut_off=cut_off) == expected


def test_heuristic_words_are_whole_words() -> None:
    tokens = [" the", " Post", "gre", "SQL", " database", " emul", "ator", ","]
    assert labels.word_at(tokens, 2) == "PostgreSQL"
    assert labels.word_at(tokens, 6) == "emulator"
    assert labels.word_at(tokens, 4) == "database"
    assert labels.window_words(["gre", "SQL", " database", " emul"]) == ["database"]  # edges cut
    assert labels.window_words(["", " A", " database"]) == ["A"]  # a pad: the document's start


def test_a_name_copied_from_one_snippet_is_caught() -> None:
    snippets = ["install [[Claws]] Mail on", "the [[mail]] client reads", "a [[mail]] server"]
    assert labels.copies_one_snippet("Claws Mail", snippets)
    assert not labels.copies_one_snippet("mail", snippets)
    assert not labels.copies_one_snippet("Claws Mail", snippets[:2])  # too few to tell


# ---------------------------------------------------------------------------------------------
# The dictionary keeps scores with their name


def _scores(label: str) -> LabelScores:
    return LabelScores(label=label, scorer="m", detection=0.8, fuzz=0.6, embedding=0.7, key="k")


def test_scores_belong_to_a_name_and_old_dictionaries_load(store, trained) -> None:
    root = store.artifact_dir("saes", "sae-s") / "features"
    root.mkdir(exist_ok=True)
    old = {
        "sae_id": "sae-s",
        "n_latents": 32,
        "concepts": [{"latent": 1, "name": "food", "source": "manual"}],
    }
    (root / "dictionary.json").write_text(json.dumps(old))
    assert concepts.read_dictionary(store, "sae-s")[1].scores is None  # a file from before scores
    concepts.update_concepts(store, "sae-s", [concepts.Concept(latent=2, name="sport", source="heuristic")])
    assert concepts.set_scores(store, "sae-s", [_scores("food"), _scores("stale")], [1, 2]) == 1
    d = concepts.read_dictionary(store, "sae-s")
    assert d[1].scores is not None and d[1].scores.detection == 0.8 and d[2].scores is None
    # the same name rewritten keeps its scores; a new name drops them
    concepts.update_concepts(store, "sae-s", [concepts.Concept(latent=1, name="food", description="x")])
    assert concepts.read_dictionary(store, "sae-s")[1].scores is not None
    concepts.update_concepts(store, "sae-s", [concepts.Concept(latent=1, name="cooking")])
    assert concepts.read_dictionary(store, "sae-s")[1].scores is None
    exported = json.loads(concepts.export_dictionary(store, "sae-s", "json"))
    assert concepts.parse_dictionary(json.dumps(exported), "json", 32)  # scores round-trip


def test_scoring_needs_a_run(store) -> None:
    from kestrel.core.sae import SAEConfig, create
    from kestrel.core.sae import io as sae_io

    sae = create(SAEConfig(d_in=8, n_latents=10, k=2, layer=LAYER))
    with store.writer("saes", "no-run") as writer:
        sae_io.save_sae(sae, writer.directory, metrics={})
        writer.commit({"id": "no-run", "config": sae.config.model_dump(mode="json"), "layer": LAYER})
    with pytest.raises(InvalidInputError, match="no stored run"):
        examples.read_blocks(store, "no-run", [1], ScoringConfig())


def _write_sae(store, sae_id: str, run_id: str | None, *, d_in: int, layer: str, model: str | None) -> None:
    """An SAE's manifest only (the label checks read no weights)."""
    config = {"d_in": d_in, "n_latents": 10, "k": 2, "layer": layer}
    with store.writer("saes", sae_id) as writer:
        writer.commit({"id": sae_id, "config": config, "layer": layer, "run_id": run_id, "model": model})


def test_scoring_run_is_checked_from_manifests(store, trained) -> None:
    """The rule the API applies before queueing and the engine before reading: the SAE's layer,
    at the SAE's width, in the run (the SAE's own, or the one given)."""
    from kestrel.core.concepts.config import scoring_run

    width = artifacts.get_sae(store, "sae-s").config["d_in"]
    assert scoring_run(store, artifacts.get_sae(store, "sae-s"))[:2] == (trained, LAYER)
    _write_sae(store, "other-layer", trained, d_in=width, layer="model.layers.0", model=None)
    _write_sae(store, "other-width", None, d_in=width + 1, layer=LAYER, model=None)
    with pytest.raises(InvalidInputError, match=r"has no layer 'model\.layers\.0'"):
        scoring_run(store, artifacts.get_sae(store, "other-layer"))
    with pytest.raises(InvalidInputError, match=f"of width {width + 1}"):
        scoring_run(store, artifacts.get_sae(store, "other-width"), trained)
    with pytest.raises(InvalidInputError, match="no stored run"):
        scoring_run(store, artifacts.get_sae(store, "other-width"))
    with pytest.raises(InvalidInputError, match="no run 'run-nope'"):
        scoring_run(store, artifacts.get_sae(store, "sae-s"), "run-nope")


def test_label_requests_that_can_only_fail_in_the_worker_are_refused(store, trained) -> None:
    """The label route's check (`check_label_sources`, torch-free): scoring with the SAE's model
    when it records none, or on a run without its layer, is a 422 before a job is queued;
    scoring fields without ``score`` are refused by the request itself."""
    from pydantic import ValidationError

    from kestrel.schemas import LabelRequest
    from kestrel.server.routers.concepts import check_label_sources
    from kestrel.settings import Settings

    settings = Settings(store_root=store.local_root)
    width = artifacts.get_sae(store, "sae-s").config["d_in"]
    _write_sae(store, "no-model", trained, d_in=width, layer=LAYER, model=None)
    check_label_sources(store, settings, "sae-s", LabelRequest(score=True))  # the SAE's model and run
    check_label_sources(store, settings, "no-model", LabelRequest())  # heuristic, unscored: no model
    with pytest.raises(InvalidInputError, match="give a scorer"):
        check_label_sources(store, settings, "no-model", LabelRequest(score=True))
    with pytest.raises(InvalidInputError, match="cannot name its latents"):
        check_label_sources(store, settings, "no-model", LabelRequest(method="model"))
    _write_sae(store, "other-layer", trained, d_in=width, layer="model.layers.0", model=None)
    with pytest.raises(InvalidInputError, match=r"has no layer 'model\.layers\.0'"):
        check_label_sources(store, settings, "other-layer", LabelRequest(score=True, scorer=DEFAULT_MODEL))
    with pytest.raises(ValidationError, match="run_id, scorer, scoring only apply with score: true"):
        LabelRequest(run_id=trained, scorer="m", scoring={"n_test": 4})
    dumped = LabelRequest(score=False).model_dump(mode="json")
    assert LabelRequest.model_validate(dumped).score is False  # a stored request reloads


@pytest.mark.slow
def test_label_and_score_on_smollm_and_resume_after_a_stop(smollm, topic_sae, monkeypatch) -> None:
    """Heuristic names scored by SmolLM2; a job stopped after its first chunk keeps that chunk's
    scores, and the rerun scores only the rest."""
    store, _ = topic_sae
    items = concepts.list_features(store, "topics", sort="density", offset=40, limit=3)["items"]
    latents = [item["latent"] for item in items]
    config = ScoringConfig(n_train=4, n_contrast=2, n_test=4, n_non_activating=4, n_calibration=2)
    monkeypatch.setattr(labels, "SCORE_CHUNK_LATENTS", 1)
    checks = iter([False, True])
    with pytest.raises(CancelledError):
        concepts.label_features(
            store,
            "topics",
            "heuristic",
            latents=latents,
            score=True,
            scorer=smollm,
            scoring=config,
            should_stop=lambda: next(checks, True),
        )
    stored = concepts.read_dictionary(store, "topics")
    assert [stored[i].scores is not None for i in latents] == [True, False, False]
    result = concepts.label_features(
        store, "topics", "heuristic", latents=latents, score=True, scorer=smollm, scoring=config
    )
    assert result["scoring"]["already_scored"] == 1 and result["scoring"]["scored"] == 2
    stored = concepts.read_dictionary(store, "topics")
    complete = []
    for latent in latents:
        scores = stored[latent].scores
        assert scores is not None and scores.label == stored[latent].name and scores.scorer == smollm.name
        if scores.note:  # a latent firing almost everywhere has too few silent blocks to score
            assert "too few" in scores.note and scores.detection is None and not scores.examples
            continue
        complete.append(latent)
        for value in (scores.detection, scores.fuzz, scores.embedding):
            assert value is not None and 0.0 <= value <= 1.0
        assert len(scores.examples) == 8 and sum(e.activating for e in scores.examples) == 4
        assert all(len(e.tokens) == config.example_ctx_len for e in scores.examples)
    assert complete, "at least one of the three latents is scored"
    top = concepts.list_features(store, "topics", sort="detection", limit=len(complete))["items"]
    assert [t["concept"]["scores"]["detection"] for t in top] == sorted(
        (stored[i].scores.detection for i in complete), reverse=True
    )
    assert top[0]["concept"]["scores"]["examples"] == []  # the list leaves examples out
