"""Feature pages of transcoders: discovery, encoding, labels, examples and the Neuronpedia export
over a transcoder read the layer it reads (``model.layers.1.mlp:input``), never its target.

Every check recomputes the latents independently: the input rows (from the run, or from a plain
torch pre-hook on the MLP) times the saved encoder, top-k and ReLU by hand. The MLP's input and
output have the same width here, so code that read the target layer instead would run and give
other numbers; one check says they differ."""

from __future__ import annotations

import gzip
import io
import json
import zipfile

import pytest
import torch
from topic_corpus import topic_corpus

from kestrel.core import concepts
from kestrel.core.activations import capture
from kestrel.core.concepts import examples
from kestrel.core.concepts.config import NeuronpediaExport, ScoringConfig, scoring_run
from kestrel.core.concepts.contexts import final_norm_scale
from kestrel.core.concepts.neuronpedia import export_neuronpedia
from kestrel.core.concepts.store import FeatureReader
from kestrel.core.run_reader import RowBatch, iter_row_batches
from kestrel.core.runs import CaptureOptions, RowFilter, get_manifest
from kestrel.core.sae import artifacts
from kestrel.core.sae.base import SAE

MLP = "model.layers.1.mlp"
MLP_IN = f"{MLP}:input"
UP = f"{MLP}.up_proj"  # the MLP's hidden layer: 64 wide, not the residual stream's 32
NORM = "model.layers.2.input_layernorm"  # 32 wide like the residual stream, but not added to it
WINDOW = 48  # wider than the texts: every context reaches back to its text's first token
K = 4


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return topic_corpus(per_topic=20, seed=3)[0]


@pytest.fixture(scope="module")
def discovered(tiny_lm, texts, tmp_path_factory):
    """One run of block 1's MLP input, output and hidden layer; a transcoder MLP input → output
    (``tc``) and one MLP input → hidden layer (``tc-up``), each discovered over the run."""
    from kestrel.core.store import LocalStore

    store = LocalStore(tmp_path_factory.mktemp("tcfeat") / "store")
    layers = [MLP_IN, MLP, UP, NORM, f"{NORM}:input"]
    run = capture(tiny_lm, texts, layers, store, options=CaptureOptions(dtype="fp32"))
    train = {"batch_size": 128, "epochs": 3, "seed": 0}
    for sae_id, target in (("tc", MLP), ("tc-up", UP), ("tc-norm", NORM)):
        sae = {"architecture": "topk", "n_latents": 64, "k": K}
        artifacts.train_from_run(store, run.id, MLP_IN, sae, train, sae_id=sae_id, target_layer=target)
        concepts.discover(store, sae_id, tiny_lm, config={"top_n": 4, "window": WINDOW, "samples_per_bin": 2})
    plain = (("sae-mlp-in", MLP_IN), ("sae-mlp-out", MLP), ("sae-norm-in", f"{NORM}:input"))
    for sae_id, layer in plain:  # plain SAEs, for their logit effects notes
        sae = {"architecture": "topk", "n_latents": 64, "k": K}
        artifacts.train_from_run(store, run.id, layer, sae, train, sae_id=sae_id)
        concepts.discover(store, sae_id, tiny_lm, config={"top_n": 4, "window": WINDOW, "samples_per_bin": 2})
    return store, run.id


def encode_by_hand(sae: SAE, x_ND: torch.Tensor) -> torch.Tensor:
    """``[N, L]`` latents of a TopK transcoder: x·W_encᵀ + b_enc (no b_dec: a transcoder's input
    is not centred on its decoder bias), the k largest kept, ReLU, zero elsewhere."""
    pre_NL = x_ND.double() @ sae.W_enc.detach().double().T + sae.b_enc.detach().double()
    top = pre_NL.topk(K, dim=1)
    return torch.zeros_like(pre_NL).scatter_(1, top.indices, top.values.relu())


def input_rows(store, run_id: str, layer: str = MLP_IN) -> RowBatch:
    """The run's rows of ``layer`` that discovery keeps (the recommended sink filters)."""
    batches = iter_row_batches(store, run_id, layer, batch_size=100_000, filters=RowFilter.recommended())
    return RowBatch.cat(list(batches))


def mlp_inputs(lm, text: str) -> tuple[list[int], torch.Tensor]:
    """A text's token ids and what block 1's MLP reads at each, by a plain torch pre-hook."""
    module = dict(lm.model.named_modules())[MLP]
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        ids = lm.tokenizer([text], return_tensors="pt")
        with torch.no_grad():
            lm.model(**ids)
    finally:
        handle.remove()
    return ids["input_ids"][0].tolist(), seen[0][0]


def test_discovery_encodes_the_rows_of_the_input_layer(discovered) -> None:
    store, run_id = discovered
    sae, _ = artifacts.load_sae(store, "tc")
    rows = input_rows(store, run_id)
    acts_NL = encode_by_hand(sae, rows.acts_ND)
    reader = FeatureReader(store, "tc")
    t = reader.full("max_activation", "fire_count", "top_values", "top_rows", "density")
    assert reader.manifest["n_rows"] == len(rows)
    by_hand = acts_NL.max(dim=0).values.float()
    assert (by_hand > 0).sum() > 10, "enough latents fire to make the comparison mean something"
    torch.testing.assert_close(t["max_activation"], by_hand, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(t["top_values"][:, 0], by_hand, rtol=1e-4, atol=1e-5)
    # each latent's top context is a row where, by hand, it reaches that maximum
    keys = ((rows.doc_index_N.long() << 24) | rows.position_N.long()).tolist()
    row_of = {key: i for i, key in enumerate(keys)}
    for latent in torch.nonzero(by_hand > 0).flatten().tolist():
        row = row_of[int(t["top_rows"][latent, 0])]
        assert float(acts_NL[row, latent]) == pytest.approx(float(by_hand[latent]), rel=1e-4, abs=1e-5)
    # not a tautology: the transcoder's target layer, encoded, says something else
    target_max = encode_by_hand(sae, input_rows(store, run_id, MLP).acts_ND).max(dim=0).values.float()
    assert (target_max - by_hand).abs().max() > 1e-2
    manifest = reader.manifest
    assert (manifest["layer"], manifest["target_layer"], manifest["kind"]) == (MLP_IN, MLP, "transcoder")


def test_logit_effects_are_the_decoder_rows_through_the_unembedding(tiny_lm, discovered) -> None:
    store, _ = discovered
    sae, _ = artifacts.load_sae(store, "tc")
    reader = FeatureReader(store, "tc")
    t = reader.full("logit_pos_ids", "logit_pos_values", "logit_neg_values")
    unembed_VD = tiny_lm.model.lm_head.weight.detach().double()
    gain_D = final_norm_scale(tiny_lm.model, unembed_VD.shape[1]).double()
    logits_LV = (sae.W_dec.detach().double() * gain_D) @ unembed_VD.T  # the MLP output's direct path
    k = t["logit_pos_values"].shape[1]
    top = logits_LV.topk(k, dim=1)
    torch.testing.assert_close(t["logit_pos_values"].double(), top.values, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(t["logit_neg_values"].double(), -(-logits_LV).topk(k, dim=1).values)
    assert torch.equal(t["logit_pos_ids"][:, 0], top.indices[:, 0])
    assert reader.manifest["logit_effects"].startswith("direct")


def test_a_decoder_off_the_residual_stream_has_no_logit_effects(tiny_lm, discovered) -> None:
    store, _ = discovered
    manifest = concepts.read_manifest(store, "tc-up")
    assert manifest["target_layer"] == UP and manifest["logit_effects"].startswith("none")
    assert "width 64" in manifest["logit_effects"]
    again = concepts.discover(store, "tc-up", tiny_lm, config={"top_n": 4, "window": WINDOW})
    assert again["logit_effects"] == manifest["logit_effects"]  # reused with the note that says why
    latent = concepts.list_features(store, "tc-up", sort="max_activation", limit=1)["items"][0]
    assert latent["max_activation"] > 0 and latent["promoted_tokens"] == []
    page = concepts.feature_page(store, "tc-up", latent["latent"])
    assert page["logits"] == {"positive": [], "negative": [], "note": manifest["logit_effects"]}
    assert page["top_contexts"]


def test_a_decoder_writing_a_norm_output_has_no_logit_effects_even_at_d_model(discovered) -> None:
    store, _ = discovered
    note = concepts.read_manifest(store, "tc-norm")["logit_effects"]
    assert note.startswith("none") and "not added to the residual stream" in note, note


def test_an_sae_of_a_normed_input_has_no_logit_effects_and_one_of_the_mlp_output_has(discovered) -> None:
    """An SAE reconstructs the layer it reads: the MLP's input is the block's normed residual, not
    added to the stream (its rows through the unembedding would mean nothing); the MLP's output is."""
    store, _ = discovered
    note = concepts.read_manifest(store, "sae-mlp-in")["logit_effects"]
    assert note.startswith("none") and MLP_IN in note and "not added to the residual stream" in note, note
    latent = concepts.list_features(store, "sae-mlp-in", sort="max_activation", limit=1)["items"][0]
    assert latent["promoted_tokens"] == []
    assert concepts.read_manifest(store, "sae-mlp-out")["logit_effects"].startswith("direct")
    # a norm's input is the residual stream itself (block 2's input): its rows keep the direct path
    assert concepts.read_manifest(store, "sae-norm-in")["logit_effects"].startswith("direct")
    from cli_runner import invoke

    shown = invoke("features", "sae-mlp-in", "--latent", str(latent["latent"]), "--store", str(store.root))
    assert shown.exit_code == 0, shown.output
    assert "logit effects: none" in " ".join(shown.stdout.split()) and "promotes:" not in shown.stdout


def test_discovery_over_a_dataset_hooks_the_mlp_input(tiny_lm, texts, discovered) -> None:
    """A dataset discovery forwards the texts and reads the MLP's input: equal, within float32,
    to a plain pre-hook on each text alone, encoded by hand (sink rows left out the same way)."""
    store, run_id = discovered
    sae, _ = artifacts.load_sae(store, "tc")
    median = get_manifest(store, run_id).layers[MLP_IN].norm_median
    special = set(tiny_lm.tokenizer.all_special_ids)
    kept = []
    for text in texts:
        ids, x_TD = mlp_inputs(tiny_lm, text)
        keep = [t for t in range(1, len(ids)) if ids[t] not in special and x_TD[t].norm() <= 10 * median]
        kept.append(x_TD[keep])
    by_hand = encode_by_hand(sae, torch.cat(kept)).max(dim=0).values.float()
    manifest = concepts.discover(store, "tc", tiny_lm, dataset=texts, config={"top_n": 4})
    assert manifest["source"]["kind"] == "dataset" and manifest["n_rows"] == sum(len(x) for x in kept)
    assert manifest["logit_effects"].startswith("direct")  # the previous version's, reused
    discovered_max = FeatureReader(store, "tc").full("max_activation")["max_activation"]
    torch.testing.assert_close(discovered_max, by_hand, rtol=1e-3, atol=1e-4)


def test_encoding_a_text_reads_the_mlp_input(tiny_lm, discovered) -> None:
    store, _ = discovered
    sae, _ = artifacts.load_sae(store, "tc")
    text = "Texts about football, goals and a stadium"
    tokens = artifacts.encode_prompt(tiny_lm, sae, MLP_IN, text, top_k=3)
    ids, x_TD = mlp_inputs(tiny_lm, text)
    acts_TL = encode_by_hand(sae, x_TD)
    assert [t["token_id"] for t in tokens] == ids
    for t, token in enumerate(tokens):
        values = acts_TL[t]
        expected = {int(i): float(values[i]) for i in values.topk(3).indices.tolist() if values[i] > 0}
        assert {lat["index"] for lat in token["latents"]} == set(expected), t
        for lat in token["latents"]:
            assert lat["value"] == pytest.approx(expected[lat["index"]], rel=1e-4, abs=1e-5)


def test_labels_and_scoring_examples_of_a_transcoder(tiny_lm, discovered) -> None:
    store, run_id = discovered
    summary = artifacts.get_sae(store, "tc")
    assert scoring_run(store, summary)[:2] == (run_id, MLP_IN)  # examples come from the input layer
    items = concepts.list_features(store, "tc", sort="density", limit=2)["items"]
    latents = [item["latent"] for item in items]
    config = ScoringConfig(example_ctx_len=4, n_train=2, n_contrast=1, n_test=2, n_non_activating=2)
    blocks = examples.read_blocks(store, "tc", latents, config)
    sae, _ = artifacts.load_sae(store, "tc")
    hand_LN = encode_by_hand(sae, input_rows(store, run_id).acts_ND).T
    for slot, latent in enumerate(latents):
        values = blocks.acts_for(slot)
        values = values[values > 0].double()
        assert len(values), latent
        gaps = (values[:, None] - hand_LN[latent][None, :]).abs().min(dim=1).values
        assert float(gaps.max()) <= 1e-4 * float(values.max()), "each example value is an input row's"
    result = concepts.label_features(
        store, "tc", "heuristic", latents=latents, score=True, scorer=tiny_lm, scoring=config
    )
    assert result["labelled"] == 2 and result["scoring"]["scored"] + result["scoring"]["already_scored"] == 2
    stored = concepts.read_dictionary(store, "tc")
    assert all(stored[latent].scores is not None for latent in latents)


def test_neuronpedia_export_of_a_transcoder(tiny_lm, discovered) -> None:
    store, _ = discovered
    options = NeuronpediaExport(model_id="tiny-llama", source_set="tc-64", creator="lab", latents=[0, 1, 2])
    with zipfile.ZipFile(io.BytesIO(export_neuronpedia(store, "tc", tiny_lm, options))) as archive:
        features = [
            json.loads(line)
            for line in gzip.decompress(
                archive.read("tiny-llama/1-tc-64/features/batch-0.jsonl.gz")
            ).splitlines()
        ]
        activations = [
            json.loads(line)
            for line in gzip.decompress(
                archive.read("tiny-llama/1-tc-64/activations/batch-0.jsonl.gz")
            ).splitlines()
        ]
    assert {f["hookName"] for f in features} == {"blocks.1.ln2.hook_normalized"}
    assert not any(f["hasVector"] for f in features)  # the decoder row writes the MLP's output
    stats = FeatureReader(store, "tc").full("top_values")["top_values"]
    top = [a for a in activations if a["binMin"] == -1]
    assert top
    for row in top:  # the model reran each context: the same value at its target token
        stored = stats[int(row["index"])]
        value = row["values"][row["qualifyingTokenIndex"]]
        assert any(abs(value - float(s)) <= 1e-3 * max(1.0, float(s)) for s in stored), (row["index"], value)


@pytest.mark.parametrize(
    ("layer", "hook"),
    [
        ("model.layers.1.mlp:input", "ln2.hook_normalized"),
        ("model.layers.1.post_attention_layernorm", "ln2.hook_normalized"),  # the same vector
        ("model.layers.1.input_layernorm", "ln1.hook_normalized"),
        ("model.layers.1", "hook_resid_post"),
        ("model.layers.1.mlp", "hook_mlp_out"),
    ],
)
def test_neuronpedia_hook_names_follow_what_the_layer_holds(tiny_lm, layer: str, hook: str) -> None:
    from kestrel.core.concepts.neuronpedia import _hook_point

    assert _hook_point(tiny_lm, layer) == (1, hook)
