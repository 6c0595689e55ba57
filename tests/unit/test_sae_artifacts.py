"""SAEs as store artifacts: train from a capture run, stop and resume, evaluate with the model in
the loop, export/import, encode a prompt."""

from __future__ import annotations

import io
import zipfile

import pytest
import torch

from kestrel.core.activations import capture
from kestrel.core.errors import ConflictError, InvalidInputError, NotFoundError
from kestrel.core.runs import CaptureOptions
from kestrel.core.sae import artifacts

TOPICS = [
    "cooking pasta with garlic and basil",
    "a football match with two goals",
    "stars and galaxies far away",
]
SAE = {"architecture": "topk", "n_latents": 64, "k": 4}
TRAIN = {"batch_size": 256, "epochs": 2, "seed": 3}


@pytest.fixture
def run(tiny_lm, store) -> str:
    texts = [f"{TOPICS[i % 3]} number {i}, told again and again." * 3 for i in range(120)]
    return capture(tiny_lm, texts, ["model.layers.1"], store, options=CaptureOptions(dtype="fp32")).id


def test_train_publish_evaluate_encode_delete(tiny_lm, store, run) -> None:
    seen = []
    summary = artifacts.train_from_run(
        store, run, "model.layers.1", SAE, TRAIN, sae_id="sae-a", on_progress=seen.append
    )
    assert summary.status == "complete" and summary.config["d_in"] == 32
    assert summary.config["data"]["filters"]["skip_position_0"] is True
    assert 0 <= summary.metrics["fvu"] < 1 and "all_rows" in summary.metrics and seen
    assert [s.id for s in artifacts.list_saes(store)] == ["sae-a"]
    directory = store.artifact_dir("saes", "sae-a")
    assert {"config.json", "weights.safetensors", "metrics.json", "history.jsonl", "manifest.json"} <= {
        p.name for p in directory.iterdir()
    }
    metrics = artifacts.evaluate_sae(store, "sae-a", tiny_lm)
    assert metrics["ce_loss_zero_ablated"] != metrics["ce_loss_clean"] and metrics["n_spliced_positions"] > 0
    assert "model_in_the_loop" in artifacts.get_sae(store, "sae-a").metrics
    sae, _ = artifacts.load_sae(store, "sae-a")
    tokens = artifacts.encode_prompt(tiny_lm, sae, "model.layers.1", "stars and galaxies", top_k=3)
    assert len(tokens) == len(tiny_lm.tokenizer.tokenize("stars and galaxies"))
    assert all(0 < len(t["latents"]) <= 3 for t in tokens)
    values = [lat["value"] for lat in tokens[1]["latents"]]
    assert values == sorted(values, reverse=True)
    artifacts.delete_sae(store, "sae-a")
    assert artifacts.list_saes(store) == []


def test_stop_keeps_a_checkpoint_and_resume_finishes(store, run) -> None:
    calls = {"n": 0}

    def stop_after_three() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    stopped = artifacts.train_from_run(
        store,
        run,
        "model.layers.1",
        SAE,
        {**TRAIN, "checkpoint_every": 100},
        sae_id="sae-b",
        should_stop=stop_after_three,
    )
    assert stopped.status == "stopped" and stopped.checkpoint
    assert artifacts.list_saes(store) == []
    done = artifacts.train_from_run(
        store, run, "model.layers.1", SAE, {**TRAIN, "checkpoint_every": 100}, sae_id="sae-b", resume=True
    )
    assert done.status == "complete"
    uninterrupted = artifacts.train_from_run(
        store, run, "model.layers.1", SAE, {**TRAIN, "checkpoint_every": 100}, sae_id="sae-c"
    )
    a, _ = artifacts.load_sae(store, "sae-b")
    b, _ = artifacts.load_sae(store, "sae-c")
    assert done.steps == uninterrupted.steps
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    ("layer", "sae", "train", "error", "message"),
    [
        ("model.layers.2", SAE, TRAIN, NotFoundError, "did you mean 'model.layers.1'"),
        ("model.layers.1", {**SAE, "k": 65}, TRAIN, InvalidInputError, "k"),
        ("model.layers.1", {**SAE, "k": 0}, TRAIN, InvalidInputError, "k"),
        ("model.layers.1", SAE, {**TRAIN, "lr": -1}, InvalidInputError, "lr"),
        ("model.layers.1", {**SAE, "d_in": 48}, TRAIN, InvalidInputError, "width 32"),
    ],
)
def test_bad_requests_fail_before_work(store, run, layer, sae, train, error, message) -> None:
    with pytest.raises(error, match=message):
        artifacts.train_from_run(store, run, layer, sae, train)
    assert artifacts.list_saes(store) == [] and not (store.root / "checkpoints").exists()


def test_resume_without_checkpoint_and_id_reuse(store, run) -> None:
    with pytest.raises(NotFoundError, match="no checkpoint"):
        artifacts.train_from_run(store, run, "model.layers.1", SAE, TRAIN, sae_id="never", resume=True)
    artifacts.train_from_run(store, run, "model.layers.1", SAE, {**TRAIN, "epochs": 1}, sae_id="once")
    with pytest.raises(ConflictError):
        artifacts.train_from_run(store, run, "model.layers.1", SAE, TRAIN, sae_id="once")


def test_saelens_export_import_round_trip(store, run) -> None:
    artifacts.train_from_run(store, run, "model.layers.1", SAE, {**TRAIN, "epochs": 1}, sae_id="orig")
    archive = zipfile.ZipFile(io.BytesIO(artifacts.export_sae_zip(store, "orig", "saelens")))
    assert set(archive.namelist()) == {"cfg.json", "sae_weights.safetensors"}
    imported = artifacts.import_saelens(
        store, archive.read("cfg.json"), archive.read("sae_weights.safetensors"), sae_id="copy"
    )
    assert imported.config["n_latents"] == 64
    a, _ = artifacts.load_sae(store, "orig")
    b, _ = artifacts.load_sae(store, "copy")
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    kestrel_zip = zipfile.ZipFile(io.BytesIO(artifacts.export_sae_zip(store, "orig", "kestrel")))
    assert {"config.json", "weights.safetensors", "manifest.json"} <= set(kestrel_zip.namelist())
    with pytest.raises(InvalidInputError):
        artifacts.import_saelens(store, b"{not json", b"", sae_id="bad")
    assert "bad" not in store.list("saes")


@pytest.mark.parametrize(
    ("train", "rows", "batch", "warned"),
    [
        ({}, 20_000_000, 4096, False),  # a large run keeps the default
        ({}, 1_000_000, 1024, False),  # halved until >= 500 steps: 976 steps of 1,024
        ({"epochs": 4}, 1_000_000, 4096, False),  # epochs count: 976 steps of 4,096
        ({"token_budget": 300_000}, 20_000_000, 512, False),  # the budget, not the run, decides
        ({}, 30_000, 128, False),  # the floor: 234 steps, fewer than 500 but no warning
        ({}, 20_000, 128, True),  # 156 steps at the floor: warned
        ({"batch_size": 4096}, 36_000, 4096, True),  # the case: 8 steps, kept but warned
        ({"epochs": 3}, 12, 8, True),  # a toy run: the batch fits an epoch's rows
    ],
)
def test_batch_size_is_chosen_from_the_run_size(train, rows, batch, warned) -> None:
    from kestrel.core.sae.config import TrainConfig

    chosen, warnings = artifacts.choose_batch_size(TrainConfig.from_dict(train), rows)
    assert chosen.batch_size == batch
    steps = (train.get("token_budget") or rows * train.get("epochs", 1)) // batch
    assert bool(warnings) == (steps < artifacts.FEW_STEPS), (steps, warnings)
    if warned:
        assert warnings and f"only about {steps} optimiser steps" in warnings[0]


def test_a_tiny_run_trains_with_a_smaller_batch_and_says_so(store, run) -> None:
    warned: list[str] = []
    summary = artifacts.train_from_run(
        store, run, "model.layers.1", SAE, {"seed": 3}, sae_id="sae-small", on_warning=warned.append
    )
    n_tokens = artifacts.get_manifest(store, run).n_tokens
    assert n_tokens < 100 * artifacts.MIN_AUTO_BATCH_SIZE  # the fixture is a tiny run
    assert summary.train_config["batch_size"] == artifacts.MIN_AUTO_BATCH_SIZE
    assert summary.steps >= n_tokens * 0.8 // artifacts.MIN_AUTO_BATCH_SIZE  # not 1 step of 4,096
    assert summary.warnings == warned and "undertrained" in warned[0]
    assert artifacts.get_sae(store, "sae-small").warnings == warned
