"""Concept discovery, the dictionary and automatic labels.

The streaming statistics are checked against brute force on synthetic codes; discovery against
the store (contexts are the stored tokens, sinks are left out, a dataset and its stored run give
the same result, a re-run replaces the result whole); dictionary files against every way they can
be wrong. The acceptance test trains an SAE on a corpus of four topics with SmolLM2 and checks
that discovery finds pure latents and that boosting one moves the model towards its topic.
"""

from __future__ import annotations

import json

import pytest
import torch
from topic_corpus import TOPICS, topic_corpus

from kestrel.core import concepts, steering
from kestrel.core.activations import capture
from kestrel.core.concepts.accumulate import FeatureAccumulator, GroupedBottomK, LogBins, pack_rows
from kestrel.core.concepts.contexts import most_common_per_row
from kestrel.core.concepts.store import FeatureReader, features_root
from kestrel.core.errors import InvalidInputError, NotFoundError
from kestrel.core.run_reader import RowBatch, iter_row_batches
from kestrel.core.runs import CaptureOptions, RowFilter, get_manifest
from kestrel.core.sae import artifacts

TINY_SAE = {"architecture": "topk", "n_latents": 64, "k": 4}
TINY_TRAIN = {"batch_size": 256, "epochs": 2, "seed": 3}


# ---------------------------------------------------------------------------------------------
# Streaming statistics against brute force


def test_grouped_bottom_k_matches_a_full_sort() -> None:
    generator = torch.Generator().manual_seed(0)
    kept = GroupedBottomK(40, 5, {"payload": torch.float32})
    groups, keys = [], []
    for _ in range(30):
        group = torch.randint(0, 40, (257,), generator=generator)
        key = torch.rand(257, generator=generator)
        kept.update(group, key, payload=key * 3)
        groups.append(group)
        keys.append(key)
    group, key = torch.cat(groups), torch.cat(keys)
    for g in range(40):
        expected = key[group == g].sort().values[:5]
        assert torch.equal(kept.keys_GM[g, : len(expected)], expected)
        torch.testing.assert_close(kept.payload_GM["payload"][g, : len(expected)], expected * 3)


def synthetic_codes(n_rows: int, n_latents: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    indices = torch.rand(n_rows, n_latents, generator=generator).topk(k, dim=1).indices
    acts = torch.rand(n_rows, k, generator=generator).pow(3) * 10
    acts[torch.rand(n_rows, k, generator=generator) < 0.1] = 0.0  # some unused slots, as TopK has
    return acts, indices


def test_accumulator_top_density_histogram_and_bins_against_dense() -> None:
    n_rows, n_latents, k = 3000, 24, 4
    acts, indices = synthetic_codes(n_rows, n_latents, k, seed=1)
    rows = pack_rows(torch.arange(n_rows) // 7, torch.arange(n_rows) % 7)
    log_bins = LogBins(1e-3, 1e3, 10)
    acc = FeatureAccumulator(n_latents, top_n=6, n_bins=5, samples_per_bin=3, log_bins=log_bins, seed=0)
    for start in range(0, n_rows, 512):  # batches of any size
        acc.add(acts[start : start + 512], indices[start : start + 512], rows[start : start + 512])
    tables = acc.finish()
    dense = torch.zeros(n_rows, n_latents).scatter_add_(1, indices, acts)
    top = dense.topk(6, dim=0)
    torch.testing.assert_close(tables.top_values_LN, top.values.T)
    assert torch.equal(tables.fire_count_L, (dense > 0).sum(0))
    torch.testing.assert_close(tables.mean_activation_L, dense.sum(0) / (dense > 0).sum(0))
    assert tables.n_rows == n_rows and int(tables.hist_counts_LF.sum()) == int((dense > 0).sum())
    for latent in range(n_latents):
        fired = dense[:, latent][dense[:, latent] > 0]
        expected = torch.bincount(log_bins.index(fired), minlength=log_bins.n_bins)
        assert torch.equal(tables.hist_counts_LF[latent], expected)
        top_rows = set(tables.top_rows_LN[latent].tolist())
        width = float(tables.max_activation_L[latent]) / 5
        for b in range(5):
            used = tables.bin_rows_LBM[latent, b] >= 0
            values = tables.bin_values_LBM[latent, b][used]
            assert ((values >= b * width - 1e-5) & (values <= (b + 1) * width + 1e-5)).all()
            assert not top_rows & set(tables.bin_rows_LBM[latent, b][used].tolist())
            row_ids = tables.bin_rows_LBM[latent, b][used]
            stored = dense[torch.searchsorted(rows, row_ids), latent]
            torch.testing.assert_close(stored, values)
        # A bin with enough firings below the top is filled.
        below = fired[~torch.isin(fired, tables.top_values_LN[latent])]
        in_bin0 = int((below < width).sum())
        assert int((tables.bin_rows_LBM[latent, 0] >= 0).sum()) == min(3, in_bin0)


def test_bin_samples_are_uniform_within_a_bin() -> None:
    """Many firings in one bin: every row is about equally likely to be sampled, early or late."""
    n_latents, n_rows = 125, 200
    counts = torch.zeros(n_rows)
    for seed in range(8):
        acc = FeatureAccumulator(
            n_latents, top_n=1, n_bins=1, samples_per_bin=4, log_bins=LogBins(1e-3, 1e3, 10), seed=seed
        )
        values = torch.full((n_rows, n_latents), 0.5)
        values[0] = 5.0  # the top row, excluded from the samples
        indices = torch.arange(n_latents).expand(n_rows, n_latents)
        acc.add(values[:100], indices[:100], torch.arange(100))  # two batches: the merge is exercised
        acc.add(values[100:], indices[100:], torch.arange(100, n_rows))
        chosen = acc.finish().bin_rows_LBM[:, 0].reshape(-1)
        counts += torch.bincount(chosen[chosen >= 0], minlength=n_rows)
    assert counts[0] == 0
    mean = counts[1:].mean()  # 8 × 125 × 4 draws over 199 rows: about 20 each, sd about 4.5
    assert counts[1:].max() < mean + 6 * mean.sqrt() and counts[1:].min() > mean - 6 * mean.sqrt()
    early, late = counts[1:100].sum(), counts[100:].sum()
    assert 0.9 < (early / 99) / (late / 100) < 1.1, "rows seen early and late are sampled alike"


def test_most_common_per_row() -> None:
    ids = torch.tensor([[5, 3, 5, -1, 3, 5], [7, 7, 2, 2, 9, -1], [-1, -1, -1, -1, -1, -1]])
    top, count = most_common_per_row(ids, 2)
    assert top.tolist() == [[5, 3], [2, 7], [-1, -1]] and count.tolist() == [[3, 2], [2, 2], [0, 0]]


# ---------------------------------------------------------------------------------------------
# Discovery against the store


@pytest.fixture
def tiny_texts() -> list[str]:
    texts, _ = topic_corpus(per_topic=30, seed=1)
    return texts


@pytest.fixture
def trained(tiny_lm, store, tiny_texts) -> str:
    run = capture(tiny_lm, tiny_texts, ["model.layers.1"], store, options=CaptureOptions(dtype="fp32"))
    artifacts.train_from_run(store, run.id, "model.layers.1", TINY_SAE, TINY_TRAIN, sae_id="sae-a")
    return run.id


def test_discover_over_a_run_layout_contexts_and_sinks(tiny_lm, store, trained) -> None:
    manifest = concepts.discover(store, "sae-a", tiny_lm, config={"top_n": 8, "window": 3})
    root = features_root(store, "sae-a")
    assert (root / "manifest.json").is_file() and (
        root / manifest["version"] / "features.safetensors"
    ).is_file()
    assert manifest["source"] == {"kind": "run", "run_id": trained} and manifest["n_latents"] == 64
    assert not [p for p in root.iterdir() if p.name.startswith(".staging-")]
    rows = RowBatch.cat(list(iter_row_batches(store, trained, "model.layers.1")))
    token_at = {
        (int(d), int(p)): int(t)
        for d, p, t in zip(rows.doc_index_N, rows.position_N, rows.token_id_N, strict=True)
    }
    reader = FeatureReader(store, "sae-a")
    t = reader.full("top_rows", "top_windows", "top_values", "density", "fire_count")
    used = t["top_rows"] >= 0
    assert used.any()
    doc, position = t["top_rows"][used] >> 24, t["top_rows"][used] & ((1 << 24) - 1)
    assert (position > 0).all(), "attention-sink rows (position 0) must be left out by default"
    centre = t["top_windows"][used][:, 3]
    expected = torch.tensor([token_at[(int(d), int(p))] for d, p in zip(doc, position, strict=True)])
    assert torch.equal(centre.long(), expected), "a context's centre token is the stored row's token"
    kept = RowBatch.cat(
        list(iter_row_batches(store, trained, "model.layers.1", filters=RowFilter.recommended()))
    )
    assert manifest["n_rows"] == len(kept) < len(rows)
    torch.testing.assert_close(t["density"], t["fire_count"].float() / manifest["n_rows"])
    values = t["top_values"]
    assert (values[:, :-1] >= values[:, 1:]).all()


def test_discover_over_a_dataset_equals_the_stored_run(tiny_lm, store, trained, tiny_texts) -> None:
    from_run = concepts.discover(store, "sae-a", tiny_lm)
    run_tables = FeatureReader(store, "sae-a").full("top_values", "top_rows", "fire_count", "hist_counts")
    from_data = concepts.discover(store, "sae-a", tiny_lm, dataset=tiny_texts)
    data_tables = FeatureReader(store, "sae-a").full("top_values", "top_rows", "fire_count", "hist_counts")
    assert from_data["source"]["kind"] == "dataset" and from_data["n_tokens"] == from_run["n_tokens"]
    assert from_data["version"] != from_run["version"]
    torch.testing.assert_close(data_tables["top_values"], run_tables["top_values"], atol=1e-4, rtol=1e-4)
    assert torch.equal(data_tables["fire_count"], run_tables["fire_count"])
    assert not list(features_root(store, "sae-a").glob("**/docs.jsonl")), "temporary docs are removed"


@pytest.mark.parametrize("source", ["run", "texts", "file"])
def test_discovery_progress_moves_during_the_streaming_pass(
    tiny_lm, store, trained, tiny_texts, tmp_path, source
):
    """Progress counts documents read of those known up front (a run's n_docs, the inline texts, a
    dataset's limit): it rises during streaming, never falls, and ends at 1.0."""
    from kestrel.core.datasets import FileSource

    data = tmp_path / "texts.txt"
    data.write_text("\n".join(tiny_texts) + "\n")
    dataset = {
        "run": None,
        "texts": tiny_texts,
        "file": FileSource(path=str(data), limit=len(tiny_texts) - 10),
    }
    seen = []
    small = {"batch_rows": 64, "token_budget": 256}  # many batches from a small corpus
    concepts.discover(store, "sae-a", tiny_lm, dataset=dataset[source], config=small, on_progress=seen.append)
    fractions = [p.fraction for p in seen]
    assert all(f is not None for f in fractions), fractions
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    streaming = [p.fraction for p in seen if p.stage == "streaming"]
    assert len(streaming) > 3 and 0 < streaming[0] < 0.5 and streaming[-1] == pytest.approx(0.9)
    if source == "run":  # rows: every token but each document's position 0
        manifest = get_manifest(store, trained)
        assert seen[-1].unit == "rows" and seen[-1].done <= manifest.n_tokens - manifest.n_docs
    else:
        assert seen[-1].unit == "documents"
        assert seen[-1].done == seen[-1].total == len(tiny_texts) - (10 if source == "file" else 0)


def test_discovery_progress_of_a_dataset_of_unknown_length_is_indeterminate(
    tiny_lm, store, trained, tmp_path
):
    from kestrel.core.datasets import FileSource

    data = tmp_path / "texts.txt"
    data.write_text("one text about pasta\nanother about goals\n")
    seen = []
    concepts.discover(store, "sae-a", tiny_lm, dataset=FileSource(path=str(data)), on_progress=seen.append)
    assert [p.fraction for p in seen if p.stage == "streaming"] == [None]
    assert [p.fraction for p in seen if p.stage != "streaming"] == [0.9, 1.0]


def test_rerun_replaces_whole_and_keeps_the_previous_version(tiny_lm, store, trained) -> None:
    first = concepts.discover(store, "sae-a", tiny_lm, config={"top_n": 4})
    second = concepts.discover(store, "sae-a", tiny_lm, config={"top_n": 6})
    root = features_root(store, "sae-a")
    assert json.loads((root / "manifest.json").read_text())["version"] == second["version"]
    assert (root / first["version"]).is_dir(), "a reader may still hold the previous version"
    assert FeatureReader(store, "sae-a").full("top_values")["top_values"].shape == (64, 6)


def test_cancel_keeps_the_previous_result(tiny_lm, store, trained) -> None:
    first = concepts.discover(store, "sae-a", tiny_lm)
    from kestrel.core.errors import CancelledError

    with pytest.raises(CancelledError):
        concepts.discover(store, "sae-a", tiny_lm, should_stop=lambda: True)
    assert concepts.read_manifest(store, "sae-a")["version"] == first["version"]
    assert not [p for p in features_root(store, "sae-a").iterdir() if p.name.startswith(".staging-")]


def test_feature_page_list_search_and_heuristic_labels(tiny_lm, store, trained) -> None:
    concepts.discover(store, "sae-a", tiny_lm, config={"window": 4})
    listed = concepts.list_features(store, "sae-a", sort="density", limit=5)
    assert listed["total"] == 64 and len(listed["items"]) == 5
    densities = [item["density"] for item in listed["items"]]
    assert densities == sorted(densities, reverse=True)
    latent = listed["items"][0]["latent"]
    page = concepts.feature_page(store, "sae-a", latent)
    assert page["fire_count"] > 0 and len(page["top_contexts"]) == 20
    ctx = page["top_contexts"][0]
    assert ctx["activation"] == pytest.approx(page["max_activation"]) and 0 <= ctx["target"] < len(
        ctx["tokens"]
    )
    assert len(page["bins"]) == 10 and page["bins"][-1]["upper"] == pytest.approx(page["max_activation"])
    assert len(page["logits"]["positive"]) == 10 and len(page["histogram"]["edges"]) == 61
    assert sum(page["histogram"]["counts"]) == page["fire_count"]
    with pytest.raises(NotFoundError, match="out of range"):
        concepts.feature_page(store, "sae-a", 64)
    concepts.update_concepts(
        store, "sae-a", [concepts.Concept(latent=latent, name="Pasta things", tags=["food"])]
    )
    result = concepts.label_features(store, "sae-a", "heuristic")
    assert result["labelled"] > 1 and str(latent) in result["labels"]
    dictionary = concepts.read_dictionary(store, "sae-a")
    assert dictionary[latent].name == "Pasta things" and dictionary[latent].source == "manual"
    other = next(i for i in dictionary if i != latent)
    assert dictionary[other].source == "heuristic" and dictionary[other].name
    assert concepts.list_features(store, "sae-a", search="pasta things")["items"][0]["latent"] == latent
    assert concepts.list_features(store, "sae-a", search="FOOD")["total"] == 1
    assert concepts.list_features(store, "sae-a", source="heuristic")["total"] == len(dictionary) - 1


def test_discovery_errors(tiny_lm, store, trained) -> None:
    with pytest.raises(NotFoundError, match="no discovered features"):
        concepts.feature_page(store, "sae-a", 0)
    with pytest.raises(InvalidInputError, match="top_n"):
        concepts.discover(store, "sae-a", tiny_lm, config={"top_n": 0})
    with pytest.raises(InvalidInputError, match="not both"):
        concepts.discover(store, "sae-a", tiny_lm, run_id=trained, dataset=["x"])
    with pytest.raises(NotFoundError):
        concepts.discover(store, "no-such-sae", tiny_lm)


# ---------------------------------------------------------------------------------------------
# The dictionary: import, export, validation


@pytest.fixture
def small_sae(store) -> str:
    """An imported SAE: the dictionary needs only its summary."""
    from kestrel.core.sae import SAEConfig, create

    sae = create(SAEConfig(d_in=8, n_latents=10, k=2))
    from kestrel.core.sae import io as sae_io

    with store.writer("saes", "dict-sae") as writer:
        sae_io.save_sae(sae, writer.directory, metrics={})
        writer.commit({"id": "dict-sae", "config": sae.config.model_dump(mode="json"), "layer": None})
    return "dict-sae"


def test_dictionary_round_trips_json_and_csv(store, small_sae) -> None:
    csv_text = 'latent,name,description,tags\n3,Cooking,"fires on food, recipes",food;kitchen\n7,Goals,,\n'
    assert concepts.import_dictionary(store, small_sae, csv_text.encode(), "csv")["imported"] == 2
    exported = json.loads(concepts.export_dictionary(store, small_sae, "json"))
    assert exported["n_latents"] == 10 and [c["latent"] for c in exported["concepts"]] == [3, 7]
    assert exported["concepts"][0]["tags"] == ["food", "kitchen"]
    assert exported["concepts"][0]["description"] == "fires on food, recipes"
    concepts.import_dictionary(store, small_sae, json.dumps(exported), "json", replace=True)
    assert concepts.export_dictionary(store, small_sae, "csv").splitlines()[1].startswith("3,Cooking,")
    concepts.import_dictionary(store, small_sae, b'[{"latent": 1, "name": "One"}]', "json")
    assert sorted(concepts.read_dictionary(store, small_sae)) == [1, 3, 7]
    concepts.import_dictionary(store, small_sae, b'[{"latent": 2, "name": "Two"}]', "json", replace=True)
    assert sorted(concepts.read_dictionary(store, small_sae)) == [2]
    concepts.delete_concept(store, small_sae, 2)
    assert concepts.read_dictionary(store, small_sae) == {}


@pytest.mark.parametrize(
    ("fmt", "content", "message"),
    [
        (
            "json",
            '{"n_latents": 10, "concepts": [{"latent": 3, "name": "a"}, {"latent": 12, "name": "b"}]}',
            r"concepts\[1\]: latent 12 is out of range; this SAE has 10 latents \(0..9\)",
        ),
        (
            "json",
            '{"n_latents": 4096, "concepts": []}',
            r"n_latents: the file is for an SAE with 4096 latents",
        ),
        (
            "json",
            '{"concepts": [{"latent": 3, "name": "a"},\n {"latent": 3, "name": "b"}]}',
            r"concepts\[1\]: latent 3 appears twice \(also concepts\[0\]\)",
        ),
        (
            "json",
            '{"concepts": [{"latent": 3, "name": "a"}\n {"latent": 4}]}',
            r"malformed JSON at line 2, column 2",
        ),
        ("json", '{"concepts": [{"latent": -1, "name": "a"}]}', r"concepts\[0\]\.latent"),
        ("json", '{"concepts": [{"latent": 1, "name": ""}]}', r"concepts\[0\]\.name"),
        ("json", '{"concepts": [{"latent": 1, "name": "x", "colour": 1}]}', r"concepts\[0\]\.colour"),
        ("json", '{"concepts": [{"latent": 1, "name": "x", "source": "oracle"}]}', r"concepts\[0\]\.source"),
        ("json", '{"concept": []}', r"unknown top-level key"),
        ("json", '"hello"', r"expected a list of concepts"),
        ("csv", "latent,name\n1,a\n2,b\n10,c\n", r"line 4: latent 10 is out of range"),
        ("csv", "latent,name\n1,a\n2,b\n1,c\n", r"line 4: latent 1 appears twice \(also line 2\)"),
        ("csv", "latent,name\n1,a\nabc,b\n", r"line 3: latent 'abc' is not an integer"),
        ("csv", "latent,name\n1,a\n2,b,extra\n", r"line 3: expected 2 fields"),
        ("csv", "index,label\n1,a\n", r"line 1: the header must name the columns latent and name"),
        ("csv", 'latent,name\n1,"unterminated\n', r"line \d+: malformed CSV"),
        ("csv", "latent,name,source\n1,a,oracle\n", r"line 2: source 'oracle'"),
        ("csv", "", r"the file is empty"),
    ],
)
def test_dictionary_import_rejects_bad_files_naming_the_place(
    store, small_sae, fmt, content, message
) -> None:
    concepts.import_dictionary(store, small_sae, b'[{"latent": 5, "name": "kept"}]', "json")
    with pytest.raises(InvalidInputError, match=message):
        concepts.import_dictionary(store, small_sae, content.encode(), fmt)
    assert list(concepts.read_dictionary(store, small_sae)) == [5], "a bad file changes nothing"


def test_dictionary_rejects_non_utf8(store, small_sae) -> None:
    with pytest.raises(InvalidInputError, match="not UTF-8"):
        concepts.import_dictionary(store, small_sae, b"latent,name\n1,\xff\xfe\n", "csv")


def test_dictionary_score_filter_counts_zero_as_a_score() -> None:
    """One filter for /concepts, /features and the CLI: a score of exactly 0.0 is a score (it
    passes a minimum of 0), a missing one passes no minimum and sorts below every score."""
    from kestrel.core.concepts.dictionary import LabelScores, score_key, scores_at_least

    zero = concepts.Concept(latent=1, name="z", scores=LabelScores(label="z", scorer="m", detection=0.0))
    unscored = concepts.Concept(latent=2, name="u")
    no_fuzz = concepts.Concept(latent=3, name="f", scores=LabelScores(label="f", scorer="m", detection=0.9))
    assert scores_at_least(zero, {"detection": 0.0}) and not scores_at_least(zero, {"detection": 0.1})
    assert not scores_at_least(unscored, {"detection": 0.0}) and not scores_at_least(None, {"fuzz": 0.0})
    assert not scores_at_least(no_fuzz, {"detection": 0.5, "fuzz": 0.0})
    assert scores_at_least(unscored, {})  # no minimum: everything passes
    assert score_key(zero, "detection") == 0.0 and score_key(unscored, "detection") == -1.0


# ---------------------------------------------------------------------------------------------
# Acceptance: a corpus of four topics through SmolLM2


NEUTRAL_PROMPTS = ["I think that", "Yesterday we talked about the", "Here is what happened next:"]


@pytest.mark.slow
def test_topics_have_pure_latents_and_boosting_one_moves_the_model(smollm, topic_sae) -> None:
    store, labels = topic_sae
    reader = FeatureReader(store, "topics")
    t = reader.full("top_rows", "density", "max_activation")
    top20_LN = t["top_rows"][:, :20]
    topic_of_doc = torch.tensor([list(TOPICS).index(label) for label in labels])
    topic_LN = topic_of_doc[(top20_LN >> 24).clamp_min(0)]
    complete_L = (top20_LN >= 0).all(dim=1)
    report = {}
    for k, topic in enumerate(TOPICS):
        purity_L = torch.where(complete_L, (topic_LN == k).float().mean(dim=1), 0.0)
        pure = torch.nonzero(purity_L >= 0.9).flatten()
        if not len(pure):
            continue
        # The purest latent; among equally pure ones the densest (a topic, not one word).
        best = max(pure.tolist(), key=lambda i: (float(purity_L[i]), float(t["density"][i])))
        word_ids = sorted({smollm.tokenizer.encode(word)[0] for word in TOPICS[topic]["words"]})
        config = steering.SteeringConfig(
            sae_id="topics",
            edits=[{"latent": best, "op": "clamp", "value": 4 * float(t["max_activation"][best])}],
        )
        plan = steering.plan_from_store(store, smollm, config)
        before = steering.next_token_probs(smollm, NEUTRAL_PROMPTS)[:, word_ids].sum(dim=1).mean()
        after = steering.next_token_probs(smollm, NEUTRAL_PROMPTS, plan)[:, word_ids].sum(dim=1).mean()
        report[topic] = {
            "pure_latents": len(pure),
            "latent": best,
            "purity": float(purity_L[best]),
            "p_topic_words_before": float(before),
            "p_topic_words_after": float(after),
        }
    print(json.dumps(report, indent=1))
    assert len(report) >= 3, report
    risen = [
        topic for topic, r in report.items() if r["p_topic_words_after"] > 1.2 * r["p_topic_words_before"]
    ]
    assert len(risen) >= 3, report


@pytest.mark.slow
def test_model_labels_name_latents_from_their_contexts(smollm, topic_sae) -> None:
    store, _ = topic_sae
    alive = concepts.list_features(store, "topics", sort="density", limit=2)["items"]
    result = concepts.label_features(
        store, "topics", "model", lm=smollm, latents=[i["latent"] for i in alive]
    )
    assert result["labelled"] == 2
    entry = concepts.read_dictionary(store, "topics")[alive[0]["latent"]]
    assert entry.source == "model" and entry.name
    prompt = concepts.labels.model_prompt(FeatureReader(store, "topics"), alive[0]["latent"])
    assert "[[" in prompt and prompt.count("\n") >= 3
