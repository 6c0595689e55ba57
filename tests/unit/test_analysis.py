"""Analyses on data made here: synthetic stored runs (written through the Store protocol) and a
two-layer Llama whose weights are set so that one layer carries the answer."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from safetensors.torch import save_file
from tiny_models import tiny_llama_config

from kestrel.core.analysis import (
    get_analysis,
    get_results,
    list_analyses,
    plot_path,
    report_path,
    run_analysis,
)
from kestrel.core.errors import CancelledError, InvalidInputError, NotFoundError
from kestrel.core.models import DEFAULT_MODEL, LoadedModel

LAYER = "model.layers.0"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NO_FILTERS = {"skip_position_0": False, "skip_special": False, "max_norm_multiple": None}


def write_run(
    store, run_id: str, acts_ND: torch.Tensor, shards: int = 3, docs: list[str] | None = None
) -> None:
    """A stored run of one layer, in the layout capture writes, split into ``shards`` shards."""
    n, d = acts_ND.shape
    per_doc = 8
    doc_index_N = torch.arange(n, dtype=torch.int32) // per_doc
    position_N = torch.arange(n, dtype=torch.int32) % per_doc
    docs = docs or [
        f"document {i} says hello to the reader again and again" for i in range(int(doc_index_N[-1]) + 1)
    ]
    bounds = np.linspace(0, n, shards + 1).astype(int)
    with store.writer("activations", run_id) as writer:
        directory = Path(writer.directory)
        (directory / LAYER).mkdir(parents=True)
        (directory / "tokens").mkdir()
        records = []
        for k, (lo, hi) in enumerate(itertools.pairwise(bounds)):
            name = f"{k:05d}"
            save_file({"acts": acts_ND[lo:hi].contiguous()}, str(directory / LAYER / f"{name}.safetensors"))
            meta = {
                "token_id": torch.zeros(hi - lo, dtype=torch.int32),
                "doc_index": doc_index_N[lo:hi].contiguous(),
                "position": position_N[lo:hi].contiguous(),
            }
            save_file(meta, str(directory / "tokens" / f"{name}.safetensors"))
            records.append({"name": name, "n_tokens": int(hi - lo)})
        (directory / "docs.jsonl").write_text(
            "".join(json.dumps({"doc_index": i, "text": t}) + "\n" for i, t in enumerate(docs))
        )
        writer.commit(
            {
                "id": run_id,
                "created": "2026-11-23T00:00:00+00:00",
                "model": {"name": "tiny"},
                "layers": {LAYER: {"d": d, "kind": "block", "norm_median": 1.0}},
                "d_model": d,
                "dtype": "fp32",
                "n_tokens": n,
                "n_docs": len(docs),
                "shards": records,
                "special_token_ids": [],
                "options": {"max_length": 64},
                "dataset": {},
            }
        )


def check_report(store, analysis_id: str, *must_contain: str) -> str:
    """The report has every section, names what it measured, and each plot it links is a PNG."""
    manifest = get_analysis(store, analysis_id)
    report = report_path(store, analysis_id).read_text()
    for heading in (
        "# ",
        "## What was measured",
        "## Source",
        "## Key numbers",
        "## Plots",
        "## How to read it",
    ):
        assert heading in report
    for text in must_contain:
        assert text in report, text
    assert manifest.plots
    for name in manifest.plots:
        assert f"](plots/{name}.png)" in report
        assert plot_path(store, analysis_id, name).read_bytes().startswith(PNG_MAGIC)
    return report


# ---------------------------------------------------------------------------------------------
# neuron


def test_neuron_stats_match_numpy_and_name_the_planted_outlier(store) -> None:
    from scipy.stats import kurtosis

    generator = torch.Generator().manual_seed(0)
    acts_ND = torch.randn(3000, 12, generator=generator) * 0.5
    acts_ND[:, 7] += 40.0  # a massive constant offset
    acts_ND[::97, 3] = 60.0  # rare, huge spikes
    write_run(store, "run-synthetic", acts_ND)
    analysis_id = run_analysis(
        store, {"kind": "neuron", "run_id": "run-synthetic", "layer": LAYER, "filters": NO_FILTERS}
    )
    per_dim = get_results(store, analysis_id)["per_dimension"]
    x = acts_ND.double().numpy()
    np.testing.assert_allclose(per_dim["mean"], x.mean(0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(per_dim["std"], x.std(0), rtol=1e-9)
    np.testing.assert_allclose(per_dim["max"], x.max(0))
    np.testing.assert_allclose(per_dim["min"], x.min(0))
    np.testing.assert_allclose(per_dim["fraction_active"], (x > 0).mean(0))
    np.testing.assert_allclose(per_dim["kurtosis"], kurtosis(x, axis=0, fisher=True, bias=True), rtol=1e-7)
    manifest = get_analysis(store, analysis_id)
    assert manifest.kind == "neuron" and manifest.source["n_rows"] == 3000
    assert set(manifest.key_numbers["outlier_dimensions"]) == {3, 7}
    check_report(store, analysis_id, "run-synthetic", LAYER, "excess", "outlier")


def test_neuron_max_rows_filters_and_cancel(store) -> None:
    write_run(store, "run-small", torch.randn(200, 4))
    limited = run_analysis(store, {"kind": "neuron", "run_id": "run-small", "layer": LAYER, "max_rows": 50})
    assert get_analysis(store, limited).source["n_rows"] == 50
    with pytest.raises(NotFoundError, match="unknown layer"):
        run_analysis(store, {"kind": "neuron", "run_id": "run-small", "layer": "model.layers.9"})
    with pytest.raises(InvalidInputError, match="outlier_factor"):
        run_analysis(store, {"kind": "neuron", "run_id": "run-small", "layer": LAYER, "outlier_factor": 0})
    with pytest.raises(CancelledError):
        run_analysis(
            store, {"kind": "neuron", "run_id": "run-small", "layer": LAYER}, should_stop=lambda: True
        )
    assert [m.id for m in list_analyses(store)] == [limited]  # a cancelled analysis leaves nothing


# ---------------------------------------------------------------------------------------------
# feature


def test_feature_pca_variance_and_planted_clusters(store, tokenizer) -> None:
    generator = torch.Generator().manual_seed(1)
    centres_KD = torch.randn(4, 16, generator=generator) * 10
    truth_N = torch.arange(800) % 4
    acts_ND = centres_KD[truth_N] + torch.randn(800, 16, generator=generator) * 0.3
    write_run(store, "run-blobs", acts_ND)
    config = {
        "kind": "feature",
        "run_id": "run-blobs",
        "layer": LAYER,
        "filters": NO_FILTERS,
        "n_clusters": 4,
        "n_components": 16,
        "texts_per_cluster": 3,
        "window": 2,
    }
    analysis_id = run_analysis(store, config, model_loader=lambda name, dtype="fp32": _Holder(tokenizer))
    results = get_results(store, analysis_id)
    ratio = np.array(results["explained_variance_ratio"])
    assert np.all(np.diff(ratio) <= 1e-12) and ratio.sum() == pytest.approx(1.0, abs=1e-6)
    assert ratio[:3].sum() > 0.95  # four blobs span three directions
    assert get_analysis(store, analysis_id).key_numbers["components_for_90pct"] <= 3
    clusters = results["clusters"]
    assert sorted(c["size"] for c in clusters) == [200, 200, 200, 200]
    for cluster in clusters:
        rows = [item["doc_index"] * 8 + item["position"] for item in cluster["nearest"]]
        assert len({int(truth_N[r]) for r in rows}) == 1, "a cluster's nearest rows share one planted blob"
        assert all("«" in item["context"] for item in cluster["nearest"])
    check_report(store, analysis_id, "run-blobs", "PCA", "Cluster 0", "«")


# ---------------------------------------------------------------------------------------------
# causal and circuit, on a model where one layer carries the answer


class _Holder:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer


@pytest.fixture(scope="module")
def tokenizer(model_cache_root: Path):
    from kestrel.core.models import BUNDLED, ensure_bundled_cache

    directory = ensure_bundled_cache(BUNDLED[DEFAULT_MODEL], model_cache_root)
    return tf.AutoTokenizer.from_pretrained(directory)


def _one(tokenizer, word: str) -> int:
    (token,) = tokenizer(word, add_special_tokens=False)["input_ids"]
    return token


@pytest.fixture(scope="module")
def answer_lm(tokenizer) -> LoadedModel:
    """Two blocks; attention and block 0's MLP write nothing; block 1's MLP turns ' cat' at a
    position into a large 'yes minus no' direction, and nothing else moves that direction."""
    torch.manual_seed(0)
    config = tiny_llama_config(num_hidden_layers=2, vocab_size=len(tokenizer))
    model = tf.LlamaForCausalLM(config).eval()
    cat, dog, yes, no = (_one(tokenizer, w) for w in (" cat", " dog", " yes", " no"))
    with torch.no_grad():
        for block in model.model.layers:
            block.self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        embed = model.model.embed_tokens.weight
        embed[:, :3] = 0.0  # dims 0-2 are reserved: cat → 0, dog → 1, answer → 2
        embed[cat].zero_()
        embed[cat, 0] = 1.0
        embed[dog].zero_()
        embed[dog, 1] = 1.0
        mlp = model.model.layers[1].mlp
        for weight in (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight):
            weight.zero_()
        mlp.gate_proj.weight[0, 0] = 1.0
        mlp.up_proj.weight[0, 0] = 1.0
        mlp.down_proj.weight[2, 0] = 1.0
        head = model.lm_head.weight
        head[:, 2] = 0.0
        head[yes, 2], head[no, 2] = 5.0, -5.0
    return LoadedModel("answer-llama", model, tokenizer, torch.device("cpu"), torch.float32, "local")


def loader(lm: LoadedModel):
    return lambda name, dtype="fp32": lm


MLPS = ["model.layers.0.mlp", "model.layers.1.mlp"]


def test_causal_ranks_the_layer_that_carries_the_answer_first(store, answer_lm: LoadedModel) -> None:
    texts = ["I saw a cat yes and a cat yes", "the cat yes", "a dog no but a cat yes", "one more cat yes"]
    config = {
        "kind": "causal",
        "model": "answer-llama",
        "layers": MLPS,
        "dataset": {"kind": "texts", "texts": texts},
        "batch_size": 3,
    }
    analysis_id = run_analysis(store, config, model_loader=loader(answer_lm))
    ranking = get_results(store, analysis_id)["ranking"]
    assert [r["target"] for r in ranking] == ["model.layers.1.mlp", "model.layers.0.mlp"]
    top, idle = ranking[0]["methods"], ranking[1]["methods"]
    assert top["zero"]["delta_loss"] > 1.0 and top["zero"]["kl"] > 1.0
    assert top["mean"]["kl"] > 0.1
    assert abs(idle["zero"]["delta_loss"]) < 1e-5 and idle["zero"]["kl"] < 1e-5
    check_report(store, analysis_id, "model.layers.1.mlp", "Δloss", "KL", "answer-llama")


def test_patching_the_answer_layer_at_the_last_position_restores_the_logit_difference(
    store, answer_lm: LoadedModel
) -> None:
    pairs = [
        {
            "clean": "The animal is a cat",
            "corrupted": "The animal is a dog",
            "correct": " yes",
            "wrong": " no",
        },
        {"clean": "My pet is a cat", "corrupted": "My pet is a dog", "correct": " yes", "wrong": " no"},
    ]
    config = {"kind": "circuit", "model": "answer-llama", "pairs": pairs, "layers": MLPS}
    config["method"] = "patching"
    analysis_id = run_analysis(store, config, model_loader=loader(answer_lm))
    results = get_results(store, analysis_id)
    fraction_LT = np.array(results["fraction_restored"])
    assert fraction_LT.shape == (2, 5)
    assert fraction_LT[1, -1] >= 0.9
    assert np.abs(fraction_LT[0]).max() < 1e-6 and np.abs(fraction_LT[1, :-1]).max() < 0.05
    key = get_analysis(store, analysis_id).key_numbers
    assert (key["best_layer"], key["best_position"]) == ("model.layers.1.mlp", 4)
    assert results["positions"][-1] == " cat→ dog"
    check_report(store, analysis_id, "fraction", "model.layers.1.mlp", "plots/patching.png")
    blocks = run_analysis(store, {**config, "layers": None}, model_loader=loader(answer_lm))
    assert get_results(store, blocks)["layers"] == ["model.layers.0", "model.layers.1"]


def test_circuit_rejects_unaligned_prompts_and_multi_token_answers(store, answer_lm: LoadedModel) -> None:
    base = {"kind": "circuit", "model": "answer-llama", "layers": MLPS}
    uneven = [{"clean": "a cat", "corrupted": "a big dog", "correct": " yes", "wrong": " no"}]
    with pytest.raises(
        InvalidInputError, match=r"pairs\[0\]: the clean prompt is 2 tokens and the corrupted one 3"
    ):
        run_analysis(store, {**base, "pairs": uneven}, model_loader=loader(answer_lm))
    long_answer = [{"clean": "a cat", "corrupted": "a dog", "correct": " yesterday's", "wrong": " no"}]
    with pytest.raises(InvalidInputError, match="exactly one token"):
        run_analysis(store, {**base, "pairs": long_answer}, model_loader=loader(answer_lm))
    with pytest.raises(InvalidInputError, match="correct and wrong must be different"):
        run_analysis(
            store, {**base, "pairs": [{**uneven[0], "wrong": " yes"}]}, model_loader=loader(answer_lm)
        )
    same = [{"clean": "a bird", "corrupted": "a bird", "correct": " yes", "wrong": " no"}]
    with pytest.raises(InvalidInputError, match="nothing to restore"):
        run_analysis(store, {**base, "pairs": same}, model_loader=loader(answer_lm))
    with pytest.raises(InvalidInputError, match="layers to ablate, or sae_id"):
        run_analysis(store, {"kind": "causal", "dataset": {"kind": "texts", "texts": ["x"]}})


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_analyze_neuron_prints_where_the_report_is(store) -> None:
    from typer.testing import CliRunner

    from kestrel.cli import app

    write_run(store, "run-cli", torch.randn(100, 6))
    runner = CliRunner()
    result = runner.invoke(app, ["analyze", "neuron", "run-cli", "-l", LAYER, "--store", str(store.root)])
    assert result.exit_code == 0, result.output
    (analysis,) = list_analyses(store)
    assert f"analysis {analysis.id}" in result.output
    assert "report.md" in result.output and str(report_path(store, analysis.id)) in result.output.replace(
        "\n", ""
    )
    bad = runner.invoke(app, ["analyze", "circuit", "--clean", "a", "--store", str(store.root)])
    assert bad.exit_code == 2 and "needs all of --clean, --corrupted" in bad.output


def test_causal_ablates_sae_latents_keeping_the_error(store, answer_lm: LoadedModel) -> None:
    """An SAE on block 1's output whose latent 0 reads and writes the answer direction: ablating
    it is what matters; latent 1 (an unrelated direction) barely does."""
    from kestrel.core.sae import SAEConfig, create
    from kestrel.core.sae import io as sae_io

    config = SAEConfig(d_in=32, n_latents=4, k=1, layer="model.layers.1", model="answer-llama")
    sae = create(config)
    with torch.no_grad():
        for weight in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec):
            weight.zero_()
        sae.W_enc[0, 2] = sae.W_dec[0, 2] = 1.0
        sae.W_enc[1, 5] = sae.W_dec[1, 5] = 1.0
    with store.writer("saes", "answer-sae") as writer:
        sae_io.save_sae(sae, writer.directory, metrics={})
        summary = {
            "config": config.model_dump(mode="json"),
            "layer": "model.layers.1",
            "model": "answer-llama",
        }
        writer.commit({"id": "answer-sae", **summary})
    request = {
        "kind": "causal",
        "sae_id": "answer-sae",
        "latents": [1, 0],
        "dataset": {"kind": "texts", "texts": ["a cat yes", "the cat yes and more"]},
    }
    analysis_id = run_analysis(store, request, model_loader=loader(answer_lm))
    ranking = get_results(store, analysis_id)["ranking"]
    assert [r["latent"] for r in ranking] == [0, 1]
    assert ranking[0]["methods"]["zero"]["delta_loss"] > 1.0
    assert ranking[1]["methods"]["zero"]["kl"] < ranking[0]["methods"]["zero"]["kl"] / 10
    assert get_analysis(store, analysis_id).source["sae_id"] == "answer-sae"
    with pytest.raises(InvalidInputError, match=r"latents \[9\] are out of range"):
        run_analysis(store, {**request, "latents": [9]}, model_loader=loader(answer_lm))
    with pytest.raises(InvalidInputError, match="reads 'answer-llama', not 'other'"):
        run_analysis(store, {**request, "model": "other"}, model_loader=loader(answer_lm))


def _refuse(name, dtype="fp32"):
    raise AssertionError(f"the analysis tried to load {name!r}, a model the service cannot load")


def test_analyses_never_load_the_model_of_a_run_the_service_cannot_load(store) -> None:
    """A run captured in training or imported names a model the service never had: the feature
    analysis shows documents instead of loading it, and a causal analysis of an SAE trained on
    such a run fails with the reason before any model is loaded."""
    from kestrel.core.sae import SAEConfig, create
    from kestrel.core.sae import io as sae_io

    write_run(store, "run-external", torch.randn(64, 8))
    manifest = store.read_json("activations", "run-external")
    manifest["model"] = {"name": "gpt2", "source": "external", "loadable": False}
    store.put_json("activations", "run-external", "manifest.json", manifest)
    feature = {"kind": "feature", "run_id": "run-external", "layer": LAYER, "filters": NO_FILTERS}
    analysis_id = run_analysis(store, {**feature, "n_clusters": 2, "window": 1}, model_loader=_refuse)
    context = get_results(store, analysis_id)["clusters"][0]["nearest"][0]["context"]
    assert context.startswith("doc ") and "«" not in context

    config = SAEConfig(d_in=8, n_latents=4, k=1, layer=LAYER, model="gpt2")
    with store.writer("saes", "external-sae") as writer:
        sae_io.save_sae(create(config), writer.directory, metrics={})
        summary = {"config": config.model_dump(mode="json"), "layer": LAYER, "model": "gpt2"}
        writer.commit({"id": "external-sae", "run_id": "run-external", **summary})
    request = {
        "kind": "causal",
        "sae_id": "external-sae",
        "latents": [0],
        "dataset": {"kind": "texts", "texts": ["a cat"]},
    }
    with pytest.raises(InvalidInputError, match="cannot load"):
        run_analysis(store, request, model_loader=_refuse)
