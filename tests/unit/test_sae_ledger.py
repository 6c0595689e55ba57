"""The evaluation ledger's metrics on data whose answer is known, and the ledger end to end on a
tiny model: k-sparse probing, first-letter absorption, ground-truth recovery, storage, stops."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from kestrel.core.activations import capture
from kestrel.core.errors import InvalidInputError
from kestrel.core.runs import CaptureOptions
from kestrel.core.sae import absorption, artifacts, ledger, ledger_records, probing, synthetic
from kestrel.core.sae.config import SAEConfig

# ---------------------------------------------------------------------------------------------
# k-sparse probing


def _labelled_latents(n: int = 400, f: int = 50, seed: int = 0):
    """Three classes; latent 7 fires exactly on class "b", the rest is noise."""
    rng = np.random.default_rng(seed)
    labels = [("a", "b", "c")[i % 3] for i in range(n)]
    latents = rng.exponential(1.0, size=(n, f)) * (rng.random((n, f)) < 0.3)
    latents[:, 7] = [2.0 if label == "b" else 0.0 for label in labels]
    acts = rng.normal(size=(n, 16))
    acts[np.arange(n), ["abc".index(label) for label in labels]] += 4.0  # a direction per class
    return torch.tensor(acts), torch.tensor(latents), labels


def test_tasks_are_balanced_one_vs_rest() -> None:
    labels = ["a"] * 40 + ["b"] * 20 + ["c"] * 60
    tasks = probing.binary_tasks(labels, 0.25, seed=0)
    assert [t.name for t in tasks] == ["a", "b", "c"]
    for task in tasks:
        assert task.train_y.sum() * 2 == len(task.train_y) and task.test_y.sum() * 2 == len(task.test_y)
        assert not set(task.train_idx) & set(task.test_idx)
        assert all(labels[i] == task.name for i in task.train_idx[task.train_y == 1])
    assert len(probing.binary_tasks(["x", "y"] * 10, 0.25, seed=0)) == 1  # two classes: one task


def test_a_perfectly_separating_latent_probes_at_accuracy_one() -> None:
    acts, latents, labels = _labelled_latents()
    task = next(t for t in probing.binary_tasks(labels, 0.25, 0) if t.name == "b")
    assert probing.top_k_mean_diff(latents.numpy()[task.train_idx], task.train_y, 1).tolist() == [7]
    result = probing.sparse_probing(acts, latents, labels, [1, 5], test_fraction=0.25, seed=0)
    b = next(t for t in result["tasks"] if t["class"] == "b")
    assert b["top_k"]["1"] == 1.0 and b["latents"]["1"] == [7]
    assert result["chance"] == pytest.approx(0.5, abs=0.05)
    assert result["dense_accuracy"] > 0.9  # each class has its own direction


def test_random_latents_probe_near_chance() -> None:
    rng = np.random.default_rng(1)
    labels = [("a", "b")[i % 2] for i in range(600)]
    latents = torch.tensor(rng.exponential(1.0, size=(600, 40)) * (rng.random((600, 40)) < 0.2))
    result = probing.sparse_probing(torch.tensor(rng.normal(size=(600, 8))), latents, labels, [1, 2, 5])
    for k in ("1", "2", "5"):
        assert abs(result["accuracy"][k] - 0.5) < 0.12  # 120 held-out texts: ±0.12 is > 2.5 sd
    assert abs(result["dense_accuracy"] - 0.5) < 0.12


# ---------------------------------------------------------------------------------------------
# Absorption


def _letter_data(absorbed_share: float, seed: int = 0):
    """Words whose activation is 2·e_letter + noise, an SAE with one latent per letter (decoder =
    e_letter); for letter "a", ``absorbed_share`` of its words instead fire a latent of their own
    (decoder e_a too) while the "a" latent stays silent: full absorption by construction."""
    rng = np.random.default_rng(seed)
    d, per_letter = 64, 40
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0].T[:26]
    letters = [c for c in absorption.LETTERS for _ in range(per_letter)]
    letter_ids = np.array([absorption.LETTERS.index(c) for c in letters])
    acts = 2.0 * basis[letter_ids] + rng.normal(scale=0.1, size=(len(letters), d))
    a_words = np.flatnonzero(letter_ids == 0)
    absorbed = a_words[: int(absorbed_share * len(a_words))]
    decoder = np.concatenate([basis, np.repeat(basis[:1], len(absorbed), axis=0)])
    latents = np.zeros((len(letters), decoder.shape[0]))
    latents[np.arange(len(letters)), letter_ids] = np.maximum((acts * basis[letter_ids]).sum(1), 0)
    for j, word in enumerate(absorbed):
        latents[word, 26 + j], latents[word, 0] = latents[word, 0], 0.0
    return acts, letters, latents, decoder, set(absorbed.tolist())


def test_an_sae_without_absorption_scores_zero_and_random_main_latents_score_high() -> None:
    acts, letters, latents, decoder, _ = _letter_data(0.0)
    result = absorption.absorption_metrics(acts, letters, latents, decoder)
    assert len(result["letters_evaluated"]) == 26
    assert result["absorption_fraction"] == 0.0 and result["full_absorption_rate"] == 0.0
    assert result["mean_main_latents"] == 1.0
    assert result["control_absorption_fraction"] > 0.9  # random "main" latents: the real one absorbs


def test_absorbed_tokens_are_found_exactly() -> None:
    acts, letters, latents, decoder, absorbed = _letter_data(0.5)
    result = absorption.absorption_metrics(acts, letters, latents, decoder)
    a = result["per_letter"]["a"]
    assert a["main_latents"] == [0]
    expected = [1.0 if token in absorbed else 0.0 for token in a["tokens"]]
    assert a["token_fractions"] == expected and 0 < sum(expected) < len(expected)
    assert a["full_absorption_rate"] == pytest.approx(sum(expected) / len(expected))
    others = [r["absorption_fraction"] for c, r in result["per_letter"].items() if c != "a"]
    assert others == [0.0] * 25
    assert result["absorption_fraction"] == pytest.approx(a["absorption_fraction"] / 26)


def test_token_absorption_rules() -> None:
    settings = absorption.AbsorptionSettings()
    cos = np.array([0.9, 0.8, 0.05, 0.0])
    # main latent carries it all: no absorption
    assert absorption.token_absorption(1.8, np.array([2.0, 0, 0, 0]), cos, [0], settings) == (0.0, False)
    # main silent, latent 1 carries ≥ 40 %: full absorption
    assert absorption.token_absorption(1.8, np.array([0, 2.0, 0, 0]), cos, [0], settings) == (1.0, True)
    # main carries half, latent 1 the rest: partial
    fraction, full = absorption.token_absorption(1.8, np.array([1.0, 1.125, 0, 0]), cos, [0], settings)
    assert fraction == pytest.approx(0.5) and not full
    # the other latent is barely aligned with the probe: not absorption
    assert absorption.token_absorption(1.8, np.array([0, 0, 20.0, 0]), cos, [0], settings)[0] == 0.0


def test_word_prompts_put_the_word_at_one_position(smollm) -> None:
    ids, words = absorption.first_letter_words(smollm.tokenizer, 50, seed=0)
    assert len(ids) == 50 and all(w.startswith(" ") and w[1:].isalpha() for w in words)
    prompts = [absorption.prompt_ids(smollm.tokenizer, i) for i in ids]
    assert len({len(p) for p, _ in prompts}) == 1 and {pos for _, pos in prompts} == {prompts[0][1]}
    assert all(p[pos] == i for (p, pos), i in zip(prompts, ids, strict=True))


# ---------------------------------------------------------------------------------------------
# Synthetic ground truth


def test_the_true_dictionary_recovers_one_and_a_random_one_is_chance() -> None:
    truth = synthetic.SparseDictionary(256, 32, 4, seed=0).features_FD
    assert synthetic.recovery_scores(truth, truth)["recovery"] == pytest.approx(1.0, abs=1e-5)
    permuted = truth[torch.randperm(256)] * -1  # order and sign do not matter
    assert synthetic.recovery_scores(permuted, truth)["recovery"] == pytest.approx(1.0, abs=1e-5)
    chance = synthetic.random_decoder_scores(256, truth)["recovery"]
    assert 0.3 < chance < 0.75  # near sqrt(2 ln 256 / 32) ≈ 0.59, far from 1


def test_synthetic_rows_are_sparse_nonnegative_combinations() -> None:
    dictionary = synthetic.SparseDictionary(128, 16, 4, seed=3)
    rows = torch.cat(list(dictionary.rows(2048, chunk=500)))
    again = torch.cat(list(dictionary.rows(2048, chunk=500)))
    assert rows.shape == (2048, 16) and torch.equal(rows, again)
    coeffs = torch.linalg.lstsq(dictionary.features_FD.T, rows[:8].T).solution  # underdetermined: any
    assert coeffs.shape == (128, 8)
    norms = rows.norm(dim=1)
    assert 1.0 < float(norms.mean()) < 6.0  # about 4 unit features with weights in [0.5, 1.5]


def test_kestrels_trainer_recovers_a_known_dictionary() -> None:
    cfg = SAEConfig.from_dict({"architecture": "topk", "d_in": 32, "n_latents": 128, "k": 4})
    result = synthetic.ground_truth_recovery(cfg.model_dump(mode="json"), None, n_rows=32768, seed=0)
    assert result is not None
    assert result["recovery"] > result["chance"]["recovery"] + 0.2
    assert result["settings"]["n_features"] == 128 and result["settings"]["l0"] == 4


def test_a_stop_request_ends_the_synthetic_training() -> None:
    cfg = SAEConfig.from_dict({"architecture": "relu_l1", "d_in": 16, "n_latents": 32})
    assert (
        synthetic.ground_truth_recovery(
            cfg.model_dump(mode="json"), None, n_rows=4096, should_stop=lambda: True
        )
        is None
    )


# ---------------------------------------------------------------------------------------------
# Labelled datasets


def test_labelled_files_and_their_checks(tmp_path) -> None:
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"t{i}", "topic": i % 2}) for i in range(8)) + "\n")
    texts, labels = ledger_records.read_labelled_file(jsonl, label_field="topic")
    assert texts[:2] == ["t0", "t1"] and labels[:2] == ["0", "1"]
    ledger_records.check_labelled(texts, labels, 0.25)
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("text,label\nhello,pos\nworld,neg\n")
    assert ledger_records.read_labelled_file(csv_path) == (["hello", "world"], ["pos", "neg"])
    with pytest.raises(InvalidInputError, match="no field 'topic'"):
        ledger_records.read_labelled_file(csv_path, label_field="topic")
    with pytest.raises(InvalidInputError, match="at least two classes"):
        ledger_records.check_labelled(["x"] * 8, ["a"] * 8, 0.25)
    with pytest.raises(InvalidInputError, match="at least 4 texts"):
        ledger_records.check_labelled(["x"] * 8, ["a"] * 6 + ["b"] * 2, 0.25)


def test_many_small_classes_are_refused_before_the_split_would_fail() -> None:
    labels = [f"c{i}" for i in range(64) for _ in range(4)]  # 256 texts, 52 held out at 0.2
    with pytest.raises(InvalidInputError, match="at least 5 texts") as err:
        ledger_records.check_labelled(["x"] * len(labels), labels, 0.2)
    assert err.value.details["n_test"] == 52
    labels = [f"c{i}" for i in range(64) for _ in range(5)]
    ledger_records.check_labelled(["x"] * len(labels), labels, 0.2)


@pytest.mark.parametrize("seed", range(40))
def test_every_accepted_dataset_splits_with_each_class_on_both_sides(seed: int) -> None:
    rng = np.random.default_rng(seed)
    fraction = float(rng.choice([0.1, 0.15, 0.2, 0.3, 0.5]))
    counts = rng.integers(ledger_records.MIN_PER_CLASS, 40, size=int(rng.integers(2, 65)))
    labels = [f"c{i}" for i, n in enumerate(counts) for _ in range(n)]
    try:
        ledger_records.check_labelled(["x"] * len(labels), labels, fraction)
    except InvalidInputError:
        return  # refused with a 422: fine; what is accepted must split
    for task in probing.binary_tasks(labels, fraction, seed):
        assert task.test_y.sum() >= 1 and (task.test_y == 0).sum() >= 1
        assert task.train_y.sum() >= 1 and (task.train_y == 0).sum() >= 1


def test_a_task_with_an_empty_test_side_is_skipped(monkeypatch) -> None:
    labels = ["a", "b", "c"] * 8
    real = probing.binary_tasks

    def one_empty(*args, **kwargs):
        tasks = real(*args, **kwargs)
        empty = np.array([], dtype=int)
        return [dataclasses.replace(tasks[0], test_idx=empty, test_y=empty), *tasks[1:]]

    monkeypatch.setattr(probing, "binary_tasks", one_empty)
    result = probing.sparse_probing(torch.randn(24, 4), torch.rand(24, 6), labels, [1], test_fraction=0.25)
    assert [t["class"] for t in result["tasks"]] == ["b", "c"]


def test_labelled_files_are_read_as_utf8_with_a_bom_and_long_fields(tmp_path) -> None:
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbftext,label\nhello,pos\n")
    assert ledger_records.read_labelled_file(bom) == (["hello"], ["pos"])
    bom_jsonl = tmp_path / "bom.jsonl"
    bom_jsonl.write_bytes(b'\xef\xbb\xbf{"text": "hi", "label": 1}\n')
    assert ledger_records.read_labelled_file(bom_jsonl) == (["hi"], ["1"])
    long = tmp_path / "long.csv"
    long.write_text(f"text,label\n{'w' * 200_000},pos\n")  # over csv's default 131072-char field
    assert ledger_records.read_labelled_file(long)[0] == ["w" * 200_000]


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_bad_byte_past_the_first_mib_names_its_line(tmp_path, fmt: str) -> None:
    rows = [json.dumps({"text": "x" * 100, "label": "a"}) if fmt == "jsonl" else "x" * 100 + ",a"]
    good = rows * 20_000  # ~2 MiB of valid rows, the upload check read only the first
    path = tmp_path / f"d.{fmt}"
    head = "" if fmt == "jsonl" else "text,label\n"
    path.write_bytes((head + "\n".join(good) + "\n").encode() + b"bad \xff byte,a\n")
    with pytest.raises(InvalidInputError, match="not valid UTF-8") as err:
        ledger_records.read_labelled_file(path)
    assert err.value.details["line"] > 15_000  # the neighbourhood of the bad line, not line 1


def test_pareto_front_marks_the_undominated() -> None:
    rows = [
        {"id": "a", "l0": 10, "fvu": 0.3},
        {"id": "b", "l0": 20, "fvu": 0.2},
        {"id": "c", "l0": 30, "fvu": 0.25},  # b beats it on both
        {"id": "d", "l0": None, "fvu": None},
    ]
    marked = {r["id"]: r.get("pareto") for r in ledger_records.mark_pareto(rows)}
    assert marked == {"a": True, "b": True, "c": False, "d": None}


# ---------------------------------------------------------------------------------------------
# The ledger end to end (tiny model)

TEXTS = [
    "cooking pasta with garlic and basil",
    "a football match with two goals",
    "stars and galaxies far away",
]
QUICK = ledger_records.LedgerOptions(
    ks=[1, 2], absorption_words=200, synthetic_rows=4096, eval_texts=4, max_length=32
)


@pytest.fixture
def trained(tiny_lm, store) -> str:
    texts = [f"{TEXTS[i % 3]} number {i}, told again." * 2 for i in range(60)]
    run = capture(tiny_lm, texts, ["model.layers.1"], store, options=CaptureOptions(dtype="fp32")).id
    sae = {"architecture": "topk", "n_latents": 64, "k": 4}
    artifacts.train_from_run(store, run, "model.layers.1", sae, {"batch_size": 128, "seed": 0}, sae_id="s")
    return "s"


def _probing_set():
    texts = [f"{TEXTS[i % 3]} again, {i}" for i in range(36)]
    return texts, [str(i % 3) for i in range(36)]


def test_the_ledger_is_computed_stored_and_compared(tiny_lm, store, trained) -> None:
    texts, labels = _probing_set()
    assert ledger_records.read_ledger(store, trained) is None
    stages = []
    result = ledger.compute_ledger(
        store, trained, tiny_lm, QUICK, texts=texts, labels=labels, on_progress=lambda f, s: stages.append(s)
    )
    assert result is not None and ledger_records.read_ledger(store, trained) == result
    entries = result["entries"]
    expected = {"fvu", "l0", "dead_fraction", "ce_loss_recovered", "kl_divergence", "dense_probe"}
    expected |= {"sparse_probing_top_1", "sparse_probing_top_2", "absorption_fraction", "synthetic_recovery"}
    assert expected <= set(entries)
    for name, e in entries.items():
        assert {"value", "baseline", "baseline_kind", "settings", "computed_at"} <= set(e), name
    assert entries["fvu"]["baseline"] == 1.0 and entries["fvu"]["settings"]["source"].startswith("held-out")
    assert entries["sparse_probing_top_1"]["baseline"] == pytest.approx(0.5, abs=0.1)
    # a random tiny model spells nothing: no letter probe passes, which the entry says
    assert entries["absorption_fraction"]["value"] is None and "reason" in entries["absorption_fraction"]
    assert 0 <= entries["synthetic_recovery"]["value"] <= 1
    assert set(stages) == set(ledger.STAGES) == set(result["details"]["stage_seconds"])
    rows = ledger_records.compare_saes(store, [trained])
    assert rows[0]["has_ledger"] and rows[0]["fvu"] == entries["fvu"]["value"] and rows[0]["pareto"]


def test_a_stopped_ledger_writes_nothing(tiny_lm, store, trained) -> None:
    texts, labels = _probing_set()
    calls = {"n": 0}

    def stop_at_third_check() -> bool:
        calls["n"] += 1
        return calls["n"] >= 3

    result = ledger.compute_ledger(
        store, trained, tiny_lm, QUICK, texts=texts, labels=labels, should_stop=stop_at_third_check
    )
    assert result is None and ledger_records.read_ledger(store, trained) is None
    assert not list(store.local_path("saes", trained, "manifest.json").parent.glob("ledger*"))
