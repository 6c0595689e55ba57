"""Stream training: one model pass feeds N SAEs; the spilled run replays to the same weights; a
stop keeps every SAE's checkpoint and a resume reaches the uninterrupted weights."""

from __future__ import annotations

import pytest
import torch

from kestrel.core.errors import ConflictError, InvalidInputError, NotFoundError
from kestrel.core.runs import CaptureOptions
from kestrel.core.sae import artifacts
from kestrel.core.sae.stream import train_stream

TOPICS = [
    "cooking pasta with garlic and basil",
    "a football match with two goals",
    "stars and galaxies far away",
]
TEXTS = [f"{TOPICS[i % 3]} number {i}, told again and again." * 2 for i in range(90)]
LAYERS = ["model.layers.0", "model.layers.2"]
CONFIGS = [
    ({"architecture": "topk", "n_latents": 64, "k": 4}, {"batch_size": 128, "seed": 3}),
    ({"architecture": "batchtopk", "n_latents": 96, "k": 6}, {"batch_size": 192, "seed": 5}),
]
SAE0 = {"layer": "model.layers.0", "sae": {"n_latents": 64, "k": 4}}
BUFFER = 512  # small enough that rows leave the buffer mid-pass, not only at the end
OPTIONS = CaptureOptions(token_budget=1024, shard_mb=0.01)  # several forward batches and shards


def _saes(prefix: str) -> list[dict]:
    return [
        {"layer": layer, "sae": sae, "train": train, "sae_id": f"{prefix}-{i}-{j}"}
        for i, layer in enumerate(LAYERS)
        for j, (sae, train) in enumerate(CONFIGS)
    ]


def _weights(store, sae_id: str) -> dict[str, torch.Tensor]:
    sae, _ = artifacts.load_sae(store, sae_id)
    return sae.state_dict()


def test_stream_trains_n_saes_and_equals_training_on_the_spilled_run(tiny_lm, store) -> None:
    progress: dict[str, int] = {}

    def seen(sae_id, report) -> None:
        progress[sae_id] = report.step

    summaries = train_stream(
        tiny_lm,
        TEXTS,
        _saes("s"),
        store,
        options=OPTIONS,
        spill_run_id="spill",
        shuffle_buffer=BUFFER,
        on_progress=seen,
    )
    assert [s.status for s in summaries] == ["complete"] * 4
    assert sorted(s.id for s in artifacts.list_saes(store)) == sorted(s.id for s in summaries)
    run = store.read_json("activations", "spill")
    assert list(run["layers"]) == LAYERS and run["n_docs"] == len(TEXTS) and len(run["shards"]) > 3
    for summary in summaries:
        assert summary.run_id == "spill" and summary.config["data"]["order"] == "stream"
        assert 0 < summary.metrics["fvu"] < 1  # held-out documents' rows
        assert summary.metrics["training"]["steps"] == summary.steps == progress[summary.id]
        assert artifacts.training_history(store, summary.id)

    for summary, (sae, train) in zip(summaries[1:3], [CONFIGS[1], CONFIGS[0]], strict=True):
        data = summary.config["data"]
        replay = artifacts.StreamReplay(norm_median=data["norm_median"], shuffle_buffer=BUFFER)
        replayed = artifacts.train_from_run(
            store, "spill", summary.layer, sae, train, sae_id=f"r-{summary.id}", replay=replay
        )
        assert (replayed.steps, replayed.tokens) == (summary.steps, summary.tokens)
        mine, theirs = _weights(store, summary.id), _weights(store, replayed.id)
        for name in mine:
            torch.testing.assert_close(mine[name], theirs[name], msg=name)


def test_stop_keeps_each_checkpoint_and_resume_reaches_the_uninterrupted_weights(tiny_lm, store) -> None:
    saes = _saes("c")[:2]
    calls: dict[str, int] = {}

    def stop_after_five_steps(sae_id: str) -> bool:
        calls[sae_id] = calls.get(sae_id, 0) + 1
        return calls[sae_id] > 5

    stopped = train_stream(
        tiny_lm,
        TEXTS,
        saes,
        store,
        options=OPTIONS,
        spill_run_id="half",
        shuffle_buffer=BUFFER,
        should_stop=stop_after_five_steps,
    )
    assert [(s.status, s.step) for s in stopped] == [("stopped", 5), ("stopped", 5)]
    assert all(s.checkpoint for s in stopped)
    assert artifacts.list_saes(store) == [] and not store.exists("activations", "half")

    resumed = train_stream(tiny_lm, TEXTS, saes, store, options=OPTIONS, shuffle_buffer=BUFFER, resume=True)
    fresh = train_stream(tiny_lm, TEXTS, _saes("f")[:2], store, options=OPTIONS, shuffle_buffer=BUFFER)
    assert [s.status for s in resumed] == ["complete", "complete"] and resumed[0].run_id is None
    for a, b in zip(resumed, fresh, strict=True):
        assert a.steps == b.steps
        mine, theirs = _weights(store, a.id), _weights(store, b.id)
        for name in mine:
            torch.testing.assert_close(mine[name], theirs[name], msg=name)


@pytest.mark.parametrize(
    ("saes", "kwargs", "error", "message"),
    [
        ([], {}, InvalidInputError, "at least one"),
        ([{"layer": "model.layers.9"}], {}, NotFoundError, "model.layers.9"),
        ([{**SAE0, "train": {"epochs": 2}}], {}, InvalidInputError, "one pass"),
        ([{**SAE0, "sae": {"d_in": 7, "n_latents": 64, "k": 4}}], {}, InvalidInputError, "d_in 7"),
        ([{**SAE0, "sae_id": "x"}, {**SAE0, "sae_id": "x"}], {}, InvalidInputError, "repeated"),
        ([SAE0], {"resume": True}, NotFoundError, "no checkpoint"),
        ([SAE0], {"spill_run_id": "taken"}, ConflictError, "taken"),
        ([SAE0], {"shuffle_buffer": 0}, InvalidInputError, "shuffle_buffer"),
    ],
)
def test_bad_requests_fail_before_any_forward(tiny_lm, store, saes, kwargs, error, message) -> None:
    (store.local_root / "activations" / "taken").mkdir(parents=True)
    (store.local_root / "activations" / "taken" / "manifest.json").write_text("{}")

    def no_forward(*args, **kw):
        raise AssertionError("the model ran")

    assert tiny_lm.layers  # the layer table's own probe forward, before the model may not run
    forward, tiny_lm.model.forward = tiny_lm.model.forward, no_forward
    try:
        with pytest.raises(error, match=message):
            train_stream(tiny_lm, TEXTS, saes, store, **kwargs)
    finally:
        tiny_lm.model.forward = forward


def test_one_sae_stops_the_others_finish_and_auto_resume_completes_it(tiny_lm, store) -> None:
    """A requeued job's rerun: the stopped SAE continues from its checkpoint, a missing one starts."""
    saes = _saes("p")[:2]
    stopped_id = saes[0]["sae_id"]
    calls = {"n": 0}

    def stop_the_first(sae_id: str) -> bool:
        calls["n"] += sae_id == stopped_id
        return sae_id == stopped_id and calls["n"] > 3

    first = train_stream(
        tiny_lm,
        TEXTS,
        saes,
        store,
        options=OPTIONS,
        spill_run_id="partial",
        shuffle_buffer=BUFFER,
        should_stop=stop_the_first,
    )
    assert [s.status for s in first] == ["stopped", "complete"] and first[0].step == 3
    assert store.exists("activations", "partial")  # the pass ran to the end for the other SAE
    # A rerun while that SAE is still cancelled (a requeue after its own cancel): it stops at once,
    # its checkpoint where it was; the completed SAE is not trained again.
    [still] = train_stream(
        tiny_lm,
        TEXTS,
        saes[:1],
        store,
        options=OPTIONS,
        shuffle_buffer=BUFFER,
        resume="auto",
        should_stop=lambda sae_id: sae_id == stopped_id,
    )
    assert still.status == "stopped" and still.step == 3
    fresh_id = "p-new"
    again = train_stream(
        tiny_lm,
        TEXTS,
        [saes[0], {**saes[1], "sae_id": fresh_id}],
        store,
        options=OPTIONS,
        shuffle_buffer=BUFFER,
        resume="auto",
    )
    assert [s.status for s in again] == ["complete", "complete"]
    reference = train_stream(tiny_lm, TEXTS, _saes("q")[:1], store, options=OPTIONS, shuffle_buffer=BUFFER)
    for name, tensor in _weights(store, stopped_id).items():
        torch.testing.assert_close(tensor, _weights(store, reference[0].id)[name], msg=name)
    for name, tensor in _weights(store, fresh_id).items():
        torch.testing.assert_close(tensor, _weights(store, saes[1]["sae_id"])[name], msg=name)


def test_an_unset_batch_size_is_chosen_from_the_pass_and_few_steps_are_warned(tiny_lm, store) -> None:
    """As for a stored run: the batch shrinks toward the rows the pass has (never below the auto
    minimum unless the pass is a toy), and an SAE that will take few steps says so."""
    sae = {**SAE0, "sae_id": "auto-batch"}
    [summary] = train_stream(tiny_lm, TEXTS, [sae], store, options=OPTIONS, shuffle_buffer=BUFFER)
    chosen = summary.train_config["batch_size"]
    assert chosen == artifacts.MIN_AUTO_BATCH_SIZE  # ~1k rows: far from 500 steps at any size
    assert any("optimiser steps" in w for w in summary.warnings), summary.warnings
    assert summary.steps == pytest.approx(summary.tokens / chosen, abs=1)


def test_the_pass_ends_once_every_sae_is_through_its_budget_unless_it_spills(tiny_lm, store) -> None:
    forwards: list[int] = []
    handle = tiny_lm.model.model.layers[0].register_forward_pre_hook(lambda *_: forwards.append(1))
    budget = {**SAE0, "train": {"batch_size": 32, "token_budget": 64}}
    try:
        train_stream(tiny_lm, TEXTS, [{**budget, "sae_id": "b1"}], store, options=OPTIONS, shuffle_buffer=64)
        short = len(forwards)
        forwards.clear()
        train_stream(
            tiny_lm,
            TEXTS,
            [{**budget, "sae_id": "b2"}],
            store,
            options=OPTIONS,
            shuffle_buffer=64,
            spill_run_id="whole",
        )
    finally:
        handle.remove()
    assert 0 < short < len(forwards)  # the spill needs the whole dataset; training alone did not
    assert store.exists("saes", "b1") and store.exists("saes", "b2")


TRANSCODER = {
    "layer": "model.layers.1.mlp:input",
    "target_layer": "model.layers.1.mlp",
    "sae": {"architecture": "topk", "n_latents": 64, "k": 4},
    "train": {"batch_size": 128, "seed": 7},
}


def test_one_pass_trains_a_transcoder_beside_an_sae_and_its_spill_replays_to_the_same_weights(
    tiny_lm, store
) -> None:
    """Both sides of block 1's MLP are captured in the SAE's forward; the transcoder trains on them
    paired, and a stored-run training on the spilled pair (replayed as the stream saw it) gives
    the same weights, so the pairing, the filters and the order are a stored run's."""
    saes = [
        {**TRANSCODER, "sae_id": "tc"},
        {**TRANSCODER, "sae": {**TRANSCODER["sae"], "skip": True}, "sae_id": "skip"},
        {**SAE0, "train": {"batch_size": 128, "seed": 3}, "sae_id": "plain"},
    ]
    summaries = train_stream(
        tiny_lm, TEXTS, saes, store, options=OPTIONS, spill_run_id="pair", shuffle_buffer=BUFFER
    )
    assert [s.status for s in summaries] == ["complete"] * 3
    run = store.read_json("activations", "pair")
    assert set(run["layers"]) == {"model.layers.0", "model.layers.1.mlp:input", "model.layers.1.mlp"}
    d_model = tiny_lm.d_model
    for summary, kind in zip(summaries[:2], ["transcoder", "skip_transcoder"], strict=True):
        assert summary.kind == kind and summary.target_layer == "model.layers.1.mlp"
        assert summary.config["d_in"] == summary.config["d_out"] == d_model
        assert 0 < summary.metrics["fvu"] < 1  # against the MLP's output on held-out documents
        data = summary.config["data"]
        assert data["target_norm_median"] > 0 and data["norm_median"] > 0
        replay = artifacts.StreamReplay(
            norm_median=data["norm_median"],
            target_norm_median=data["target_norm_median"],
            shuffle_buffer=BUFFER,
        )
        sae_config = next(s["sae"] for s in saes if s["sae_id"] == summary.id)
        replayed = artifacts.train_from_run(
            store,
            "pair",
            summary.layer,
            sae_config,
            TRANSCODER["train"],
            sae_id=f"r-{summary.id}",
            replay=replay,
            target_layer=summary.target_layer,
        )
        assert (replayed.steps, replayed.tokens) == (summary.steps, summary.tokens)
        mine, theirs = _weights(store, summary.id), _weights(store, replayed.id)
        for name in mine:
            torch.testing.assert_close(mine[name], theirs[name], msg=name)
    assert summaries[2].kind == "sae" and summaries[2].target_layer is None


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({**TRANSCODER, "target_layer": TRANSCODER["layer"]}, "target_layer is the input layer"),
        ({**SAE0, "sae": {"n_latents": 64, "k": 4, "skip": True}}, "skip makes a skip-transcoder"),
        ({**TRANSCODER, "target_layer": "model.layers.1.mlp.nope"}, "model.layers.1.mlp.nope"),
        ({**TRANSCODER, "layer": "model.embed_tokens:input"}, "no known width"),
        ({**TRANSCODER, "layer": "model.layers.1.mlp.down_proj:input"}, "no known width"),  # d_mlp wide
    ],
)
def test_bad_transcoder_entries_fail_before_any_forward(tiny_lm, store, entry, message) -> None:
    def no_forward(*args, **kw):
        raise AssertionError("the model ran")

    assert tiny_lm.layers  # the layer table's own probe forward, before the model may not run
    forward, tiny_lm.model.forward = tiny_lm.model.forward, no_forward
    try:
        with pytest.raises((InvalidInputError, NotFoundError), match=message):
            train_stream(tiny_lm, TEXTS, [entry], store)
    finally:
        tiny_lm.model.forward = forward


def test_many_buffers_share_a_memory_budget_and_say_so(tiny_lm, store, monkeypatch) -> None:
    """Thirty transcoders of a big model would hold 30 full-size shuffle buffers: past the budget
    each gets fewer rows (never under MIN_STREAM_ROWS), recorded where a replay reads it, and warned."""
    from kestrel.core.sae import stream

    monkeypatch.setattr(stream, "BUFFER_BYTES", 1)
    saes = [
        {**TRANSCODER, "sae_id": "budget-tc"},
        {**SAE0, "train": {"batch_size": 128}, "sae_id": "budget-sae"},
    ]
    summaries = train_stream(tiny_lm, TEXTS, saes, store, options=OPTIONS)
    for summary in summaries:
        assert summary.config["data"]["shuffle_buffer"] == stream.MIN_STREAM_ROWS
        assert any("2 buffers of this stream" in warning for warning in summary.warnings), summary.warnings


def test_an_sae_resumed_alone_keeps_the_buffer_its_shared_pass_fitted(tiny_lm, store, monkeypatch) -> None:
    """Buffers shrunk to fit two SAEs: one stopped and resumed alone (the API's resume_from) would
    get a bigger buffer, read its rows in another order and end with other weights; it keeps the
    size its checkpoint recorded and reaches the uninterrupted weights."""
    from kestrel.core.sae import stream

    monkeypatch.setattr(stream, "BUFFER_BYTES", 32 * 1024)
    monkeypatch.setattr(stream, "MIN_STREAM_ROWS", 16)

    def pair(prefix: str) -> list[dict]:
        train = [{"batch_size": 128, "seed": 3}, {"batch_size": 128, "seed": 5}]
        return [{**SAE0, "train": t, "sae_id": f"{prefix}-{i}"} for i, t in enumerate(train)]

    whole = train_stream(tiny_lm, TEXTS, pair("whole"), store, options=OPTIONS, shuffle_buffer=BUFFER)
    fitted = whole[0].config["data"]["shuffle_buffer"]
    assert fitted < BUFFER  # the budget shrank them
    calls = {"n": 0}

    def stop_first(sae_id: str) -> bool:
        calls["n"] += sae_id == "part-0"
        return sae_id == "part-0" and calls["n"] > 3

    first = train_stream(
        tiny_lm, TEXTS, pair("part"), store, options=OPTIONS, shuffle_buffer=BUFFER, should_stop=stop_first
    )
    assert [s.status for s in first] == ["stopped", "complete"]
    [resumed] = train_stream(
        tiny_lm, TEXTS, pair("part")[:1], store, options=OPTIONS, shuffle_buffer=BUFFER, resume=True
    )
    assert resumed.config["data"]["shuffle_buffer"] == fitted
    assert resumed.config["data"]["heldout_max_rows"] == whole[0].config["data"]["heldout_max_rows"]
    mine, theirs = _weights(store, "part-0"), _weights(store, "whole-0")
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], msg=name)
