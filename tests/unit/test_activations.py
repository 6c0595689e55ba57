"""Activation capture and reading: exactness against output_hidden_states, padding, atomicity,
row metadata, filters, shuffling and the errors a user can cause."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from kestrel.core.activations import capture
from kestrel.core.datasets import FileSource, token_batches
from kestrel.core.errors import CancelledError, ConflictError, InvalidInputError, NotFoundError
from kestrel.core.models import LoadedModel
from kestrel.core.run_reader import RowBatch, iter_batches, iter_row_batches, read_docs
from kestrel.core.runs import CaptureOptions, RowFilter, delete_run, list_runs

TOPICS = ["cooking pasta with garlic", "a football match", "stars and galaxies", "interest rates and bonds"]


def corpus(n: int) -> list[str]:
    """Varied lengths so batches need padding."""
    return [
        f"Text {i} is about {TOPICS[i % 4]}." + " It goes on a little longer." * (i % 5) for i in range(n)
    ]


def all_rows(store, run_id: str, layer: str, **kwargs) -> RowBatch:
    return RowBatch.cat(list(iter_row_batches(store, run_id, layer, batch_size=10_000, **kwargs)))


def by_doc_and_position(rows: RowBatch) -> RowBatch:
    order = torch.argsort(rows.doc_index_N.long() * 100_000 + rows.position_N.long())
    return rows.select(order)


def test_capture_equals_output_hidden_states(smollm: LoadedModel, store) -> None:
    """Same batches through a plain forward with output_hidden_states: the stored rows are exact."""
    texts = corpus(240)
    layers = ["model.layers.15", "model.layers.3"]
    options = CaptureOptions(dtype="fp32", token_budget=4096)
    manifest = capture(smollm, texts, layers, store, options=options)
    assert list(manifest.layers) == ["model.layers.3", "model.layers.15"]  # execution order
    assert manifest.n_docs == len(texts)
    expected: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    token_ids = []
    for batch in token_batches(texts, smollm.tokenizer, max_length=512, token_budget=4096):
        mask = batch.attention_mask_BT.bool()
        with torch.no_grad():
            hidden = smollm.model(
                input_ids=batch.input_ids_BT,
                attention_mask=batch.attention_mask_BT,
                output_hidden_states=True,
            ).hidden_states
        expected["model.layers.15"].append(hidden[16][mask])
        expected["model.layers.3"].append(hidden[4][mask])
        token_ids.append(batch.input_ids_BT[mask])
    assert manifest.n_tokens == sum(len(t) for t in token_ids)
    for layer in layers:
        rows = all_rows(store, manifest.id, layer)
        assert (rows.acts_ND - torch.cat(expected[layer])).abs().max() <= 1e-5
        assert torch.equal(rows.token_id_N.long(), torch.cat(token_ids))
    assert read_docs(store, manifest.id) == texts
    # every row traces back to its text: re-tokenizing the document gives the stored token
    docs = smollm.tokenizer(texts)["input_ids"]
    for doc, pos, tok in zip(
        rows.doc_index_N.tolist()[::97],
        rows.position_N.tolist()[::97],
        rows.token_id_N.tolist()[::97],
        strict=True,
    ):
        assert docs[doc][pos] == tok


def test_padded_batches_equal_one_text_at_a_time(smollm: LoadedModel, store) -> None:
    texts = corpus(24)
    batched = capture(smollm, texts, ["model.layers.15"], store, options=CaptureOptions(dtype="fp32"))
    single = capture(
        smollm, texts, ["model.layers.15"], store, options=CaptureOptions(dtype="fp32", max_batch_size=1)
    )
    a = by_doc_and_position(all_rows(store, batched.id, "model.layers.15"))
    b = by_doc_and_position(all_rows(store, single.id, "model.layers.15"))
    assert torch.equal(a.token_id_N, b.token_id_N) and torch.equal(a.position_N, b.position_N)
    torch.testing.assert_close(a.acts_ND, b.acts_ND, rtol=1e-5, atol=1e-4)


def test_attention_sink_and_recommended_filter(smollm: LoadedModel, store) -> None:
    manifest = capture(smollm, corpus(40), ["model.layers.15"], store)
    rows = all_rows(store, manifest.id, "model.layers.15")
    norms = rows.acts_ND.float().norm(dim=-1)
    ratio = norms[rows.position_N == 0].mean() / norms[rows.position_N > 0].mean()
    assert ratio > 50, "SmolLM2's first token is an attention sink"
    kept = all_rows(store, manifest.id, "model.layers.15", filters=RowFilter.recommended())
    assert (kept.position_N > 0).all() and len(kept) == int((rows.position_N > 0).sum())
    kept_norms = kept.acts_ND.float().norm(dim=-1)
    assert kept_norms.max() <= 10 * manifest.layers["model.layers.15"].norm_median


def test_storage_layout_and_bounded_shards(tiny_lm: LoadedModel, store) -> None:
    options = CaptureOptions(dtype="fp16", shard_mb=0.01)  # 0.01 MiB / (32 * 2 B) = 163 rows a shard
    manifest = capture(tiny_lm, corpus(60), ["model.layers.1", "model.layers.0.mlp"], store, options=options)
    run_dir = store.artifact_dir("activations", manifest.id)
    shard_rows = [s.n_tokens for s in manifest.shards]
    assert len(shard_rows) > 3 and max(shard_rows) == 163 and sum(shard_rows) == manifest.n_tokens
    from safetensors.torch import load_file

    acts = load_file(run_dir / "model.layers.1" / "00000.safetensors")["acts"]
    meta = load_file(run_dir / "tokens" / "00000.safetensors")
    assert acts.dtype == torch.float16 and acts.shape == (163, 32)
    assert {k: v.dtype for k, v in meta.items()} == dict.fromkeys(
        ("token_id", "doc_index", "position"), torch.int32
    )
    row_bytes = sum(v.element_size() for v in meta.values())
    assert row_bytes <= 16
    assert json.loads((run_dir / "manifest.json").read_text())["n_tokens"] == manifest.n_tokens
    assert [m.id for m in list_runs(store)] == [manifest.id]
    delete_run(store, manifest.id)
    assert list_runs(store) == [] and not run_dir.exists()


def test_drop_special_tokens(tiny_lm: LoadedModel, store) -> None:
    texts = ["<|im_start|>user hello<|im_end|>", "plain words"]
    kept = capture(tiny_lm, texts, ["model.layers.0"], store, options=CaptureOptions(drop_special=True))
    everything = capture(tiny_lm, texts, ["model.layers.0"], store)
    rows = all_rows(store, kept.id, "model.layers.0")
    special = torch.tensor(tiny_lm.tokenizer.all_special_ids, dtype=torch.int32)
    assert not torch.isin(rows.token_id_N, special).any()
    assert kept.n_tokens == everything.n_tokens - 2
    # positions still count the dropped tokens, so each row traces back to its place in the text
    assert 0 not in rows.position_N[rows.doc_index_N == 0].tolist()


def test_shuffle_and_splits(tiny_lm: LoadedModel, store) -> None:
    manifest = capture(tiny_lm, corpus(80), ["model.layers.2"], store, options=CaptureOptions(shard_mb=0.01))
    run, layer = manifest.id, "model.layers.2"
    plain = all_rows(store, run, layer)
    shuffled = [
        b.acts_ND for b in iter_row_batches(store, run, layer, batch_size=64, shuffle_buffer=300, seed=1)
    ]
    again = [
        b.acts_ND for b in iter_row_batches(store, run, layer, batch_size=64, shuffle_buffer=300, seed=1)
    ]
    other = torch.cat(list(iter_batches(store, run, layer, batch_size=64, shuffle_buffer=300, seed=2)))
    assert all(len(b) == 64 for b in shuffled[:-1])
    assert all(torch.equal(x, y) for x, y in zip(shuffled, again, strict=True))
    joined = torch.cat(shuffled)
    assert not torch.equal(joined, plain.acts_ND) and not torch.equal(joined, other)
    assert torch.equal(joined.sum(0), plain.acts_ND.sum(0)) or torch.allclose(
        joined.sum(0), plain.acts_ND.sum(0)
    )
    train = all_rows(store, run, layer, split="train")
    held = all_rows(store, run, layer, split="heldout")
    assert len(train) + len(held) == len(plain) and len(held) > 0
    assert not set(train.doc_index_N.tolist()) & set(held.doc_index_N.tolist())


def test_failed_capture_leaves_nothing_listed(tiny_lm: LoadedModel, store) -> None:
    def explode(progress) -> None:
        if progress.batches == 2:
            raise RuntimeError("boom")

    options = CaptureOptions(max_batch_size=4)
    with pytest.raises(RuntimeError, match="boom"):
        capture(
            tiny_lm,
            corpus(40),
            ["model.layers.0"],
            store,
            run_id="doomed",
            options=options,
            on_progress=explode,
        )
    with pytest.raises(CancelledError):
        capture(tiny_lm, corpus(40), ["model.layers.0"], store, options=options, should_stop=lambda: True)
    assert list_runs(store) == [] and store.list("activations") == []
    assert not any((store.root / "activations").iterdir()), "staging directories are removed on errors"
    capture(tiny_lm, corpus(4), ["model.layers.0"], store, run_id="doomed")  # the id is still free


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    from tiny_models import build
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    from kestrel.core.activations import capture
    from kestrel.core.runs import CaptureOptions
    from kestrel.core.models import LoadedModel
    from kestrel.core.store import LocalStore
    tok = Tokenizer(models.WordLevel({{"[UNK]": 0, "[PAD]": 1}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    lm = LoadedModel("tiny", build("llama"), tokenizer, torch.device("cpu"), torch.float32, "local")
    def die(progress):
        if progress.batches == 3:
            os.kill(os.getpid(), signal.SIGKILL)
    texts = ["a b c d e f"] * 200
    capture(lm, texts, ["model.layers.1"], LocalStore({root!r}), run_id="killed",
            options=CaptureOptions(max_batch_size=2, shard_mb=0.001), on_progress=die)
    """
)


def test_sigkill_mid_capture_leaves_nothing_listed(store, tmp_path) -> None:
    tests = __import__("pathlib").Path(__file__).parents[1]  # where tiny_models.py is
    script = KILL_SCRIPT.format(tests=str(tests), root=str(store.root))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    leftovers = list((store.root / "activations").iterdir())
    assert leftovers and all(p.name.startswith(".staging-") for p in leftovers)  # it did write shards
    assert store.list("activations") == [] and list_runs(store) == []
    assert not store.exists("activations", "killed")
    assert store.gc(older_than_s=0) == leftovers


def test_reusing_a_run_id_is_a_conflict(tiny_lm: LoadedModel, store) -> None:
    capture(tiny_lm, ["one text"], ["model.layers.0"], store, run_id="taken")
    with pytest.raises(ConflictError, match="'taken' already exists"):
        capture(tiny_lm, ["another"], ["model.layers.0"], store, run_id="taken")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"layers": ["model.layer.1"]}, NotFoundError, "did you mean 'model.layers.1'"),
        ({"layers": []}, InvalidInputError, "no layers"),
        ({"dataset": ["", "   "]}, InvalidInputError, "empty"),
        ({"dataset": FileSource(path="/nonexistent/texts.jsonl")}, NotFoundError, "texts.jsonl"),
        ({"options": CaptureOptions(max_length=0)}, InvalidInputError, "max_length must be > 0"),
        ({"run_id": "../escape"}, InvalidInputError, "invalid run id"),
    ],
)
def test_bad_input_is_named(tiny_lm: LoadedModel, store, kwargs, error, message) -> None:
    args = {"dataset": ["some text"], "layers": ["model.layers.1"], **kwargs}
    with pytest.raises(error, match=message):
        capture(tiny_lm, args.pop("dataset"), args.pop("layers"), store, **args)
    assert list_runs(store) == []


def test_missing_text_field_lists_the_fields(tiny_lm: LoadedModel, store, tmp_path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"body": "hello"}\n')
    with pytest.raises(NotFoundError, match="body"):
        capture(tiny_lm, FileSource(path=str(path)), ["model.layers.1"], store)


def test_reader_rejects_unknown_layer(tiny_lm: LoadedModel, store) -> None:
    manifest = capture(tiny_lm, ["text"], ["model.layers.1"], store)
    with pytest.raises(NotFoundError, match=r"did you mean 'model\.layers\.1'"):
        next(iter_batches(store, manifest.id, "model.layers.11"))
