"""SAE files (Kestrel and SAELens layouts) and the evaluation metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kestrel.core.errors import ConflictError, InvalidInputError, NotFoundError
from kestrel.core.sae import (
    SAE,
    SAEConfig,
    create,
    evaluate,
    export_saelens,
    import_saelens,
    load_sae,
    save_sae,
)
from kestrel.core.sae.io import read_history, read_metrics
from kestrel.core.sae.metrics import StreamingFVU


def _trained_looking(architecture: str, seed: int = 0, **fields) -> SAE:
    """An SAE with every tensor non-trivial (random biases, a set threshold, metadata)."""
    if architecture in ("topk", "batchtopk"):
        fields.setdefault("k", 4)
    config = SAEConfig(
        architecture=architecture,
        d_in=12,
        n_latents=40,
        model="HuggingFaceTB/SmolLM2-135M",
        layer="model.layers.3",
        run_id="run-1",
        data={"skip_bos": True},
        input_scale=0.25,
        **fields,
    )
    sae = create(config, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(40, generator=g))
        sae.b_dec.copy_(torch.randn(12, generator=g))
        if architecture == "batchtopk":
            sae.threshold.fill_(0.375)
        if architecture == "jumprelu":
            sae.threshold.copy_(torch.rand(40, generator=g))
    return sae.eval()


def _assert_identical(a: SAE, b: SAE) -> None:
    assert a.config == b.config and type(a) is type(b)
    assert a.state_dict().keys() == b.state_dict().keys()
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "relu_l1", "jumprelu"])
def test_saelens_export_then_import_is_exact(tmp_path: Path, architecture: str):
    sae = _trained_looking(architecture)
    export_saelens(sae, tmp_path / "lens")
    assert sorted(p.name for p in (tmp_path / "lens").iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    back = import_saelens(tmp_path / "lens")
    _assert_identical(sae, back)
    x = torch.randn(5, 12)
    with torch.no_grad():
        assert torch.equal(sae(x).reconstruction, back(x).reconstruction)


def test_saelens_files_use_saelens_names_shapes_and_semantics(tmp_path: Path):
    sae = _trained_looking("topk")
    export_saelens(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 4 and cfg["rescale_acts_by_decoder_norm"] is False
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (12, 40, "float32")
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    metadata = cfg["metadata"]
    assert metadata["hook_name"] == metadata["hf_hook_name"] == "model.layers.3"
    assert metadata["model_class_name"] == "AutoModelForCausalLM" and metadata["sae_lens_version"] >= "6"
    weights = load_file(tmp_path / "sae_weights.safetensors")
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        "W_enc": (12, 40),
        "b_enc": (40,),
        "W_dec": (40, 12),
        "b_dec": (12,),
    }
    x_BD = torch.randn(6, 12)
    hidden_pre = (x_BD - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]  # SAELens's TopK SAE
    top = hidden_pre.topk(4, dim=-1)
    feature_acts = torch.zeros_like(hidden_pre).scatter(-1, top.indices, top.values.relu())
    with torch.no_grad():
        expected = feature_acts @ weights["W_dec"] + weights["b_dec"]
        torch.testing.assert_close(sae(x_BD).reconstruction, expected, rtol=1e-5, atol=1e-5)


def test_importing_a_foreign_saelens_sae(tmp_path: Path):
    g = torch.Generator().manual_seed(9)
    weights = {
        "W_enc": torch.randn(8, 24, generator=g),
        "b_enc": torch.randn(24, generator=g),
        "W_dec": torch.randn(24, 8, generator=g),
        "b_dec": torch.randn(8, generator=g),
    }
    save_file(weights, tmp_path / "sae_weights.safetensors")
    cfg = {  # SAELens < 6 style: a "standard" SAE with a ReLU, bias not subtracted at the input
        "architecture": "standard",
        "d_in": 8,
        "d_sae": 24,
        "dtype": "torch.float32",
        "activation_fn_str": "relu",
        "apply_b_dec_to_input": False,
        "model_name": "gpt2",
        "hook_name": "blocks.3.hook_resid_pre",
        "normalize_activations": "none",
    }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    sae = import_saelens(tmp_path)
    assert sae.config.architecture == "relu_l1" and sae.config.model == "gpt2"
    assert sae.config.layer == "blocks.3.hook_resid_pre"
    x_BD = torch.randn(5, 8, generator=g)
    expected = torch.relu(x_BD @ weights["W_enc"] + weights["b_enc"]) @ weights["W_dec"] + weights["b_dec"]
    with torch.no_grad():
        torch.testing.assert_close(sae(x_BD).reconstruction, expected, rtol=1e-5, atol=1e-5)

    # What the file does not say is not invented: no L1 coefficient, no input normalisation.
    assert sae.config.l1_coefficient is None and sae.config.normalize_input is None
    assert sae.config.data["imported_from"] == "saelens"

    cfg["normalize_activations"] = "layer_norm"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidInputError, match="normalize_activations='layer_norm' is not supported"):
        import_saelens(tmp_path)


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "relu_l1", "jumprelu"])
def test_save_then_load_is_exact_with_metrics_and_history(tmp_path: Path, architecture: str):
    sae = _trained_looking(architecture)
    target = tmp_path / "saes" / "sae-1"
    save_sae(sae, target, metrics={"fvu": 0.2, "l0": 4.0}, history=[{"step": 10, "loss": 0.5}])
    assert sorted(p.name for p in target.iterdir()) == [
        "config.json",
        "history.jsonl",
        "metrics.json",
        "weights.safetensors",
    ]
    assert [p.name for p in target.parent.iterdir()] == ["sae-1"]  # no temporary leftovers
    back = load_sae(target)
    _assert_identical(sae, back)
    assert not any(p.requires_grad for p in back.parameters()) and not back.training
    assert read_metrics(target) == {"fvu": 0.2, "l0": 4.0}
    assert read_history(target) == [{"step": 10, "loss": 0.5}]


def test_save_refuses_to_overwrite_unless_asked_and_keeps_other_files(tmp_path: Path):
    target = tmp_path / "sae"
    (target / "checkpoints").mkdir(parents=True)  # training wrote checkpoints here first
    first, second = _trained_looking("topk", seed=1), _trained_looking("topk", seed=2)
    save_sae(first, target)
    with pytest.raises(ConflictError):
        save_sae(second, target)
    save_sae(second, target, overwrite=True)
    _assert_identical(second, load_sae(target))
    assert (target / "checkpoints").is_dir()
    assert not [p for p in target.iterdir() if p.name.startswith(".")]


def test_loading_rejects_missing_or_mismatched_files(tmp_path: Path):
    with pytest.raises(NotFoundError, match=r"config\.json"):
        load_sae(tmp_path / "nothing")
    save_sae(_trained_looking("topk"), tmp_path / "sae")
    config = json.loads((tmp_path / "sae" / "config.json").read_text())
    config["n_latents"] = 41
    (tmp_path / "sae" / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidInputError, match="do not fit the config"):
        load_sae(tmp_path / "sae")


# -- metrics ---------------------------------------------------------------------------------------


def test_evaluate_fvu_matches_the_definition_on_a_tiny_tensor():
    sae = _trained_looking("topk")
    g = torch.Generator().manual_seed(3)
    x_ND = torch.randn(37, 12, generator=g) * 2 + 3
    metrics = evaluate(sae, [x_ND[:10], x_ND[10:11], x_ND[11:]])
    with torch.no_grad():
        out = sae(x_ND)
    x64 = x_ND.double()
    fvu = float((x64 - out.reconstruction.double()).pow(2).sum() / (x64 - x64.mean(dim=0)).pow(2).sum())
    # The reference decodes all 37 rows at once, evaluate() in batches of 10, 1 and 26: float32
    # matmuls of different shapes round differently (a few ulps, ~1e-7 relative per element), so
    # the sums agree to float32 precision, not float64's. rel=1e-5 leaves room for that, and no more.
    assert metrics["fvu"] == pytest.approx(fvu, rel=1e-5)
    assert metrics["explained_variance"] == pytest.approx(1 - fvu, rel=1e-5, abs=1e-6)
    assert metrics["n_rows"] == 37 and metrics["l0"] == pytest.approx(float((out.latent_acts > 0).sum()) / 37)
    fired = torch.zeros(40, dtype=torch.bool)
    fired[out.latent_indices[out.latent_acts > 0]] = True
    assert metrics["dead_latents"] == int((~fired).sum())
    assert "37 evaluation rows" in metrics["dead_definition"]
    histogram = metrics["density_histogram"]
    assert sum(histogram["counts"]) + histogram["never_fired"] == 40
    assert len(histogram["counts"]) == len(histogram["log10_frequency_edges"]) - 1
    assert evaluate(sae, [x_ND], max_rows=20)["n_rows"] == 20


def test_evaluate_relu_and_batchtopk_count_latents_like_topk():
    for architecture in ("relu_l1", "batchtopk"):
        sae = _trained_looking(architecture)
        x_ND = torch.randn(50, 12, generator=torch.Generator().manual_seed(4))
        metrics = evaluate(sae, [x_ND])
        with torch.no_grad():
            out = sae(x_ND)
        assert metrics["l0"] == pytest.approx(float((out.latent_acts > 0).sum()) / 50)
        assert sae.eval() is sae and not sae.training


def test_streaming_fvu_survives_a_large_common_offset():
    g = torch.Generator().manual_seed(5)
    x_ND = (torch.randn(4000, 8, generator=g, dtype=torch.float64) * 1e-3 + 1e4).float()
    recon_ND = x_ND + 1e-4
    stream = StreamingFVU()
    for x_BD, r_BD in zip(x_ND.split(333), recon_ND.split(333), strict=True):
        stream.add(x_BD, r_BD)
    x64 = x_ND.double()
    exact = float((x64 - recon_ND.double()).pow(2).sum() / (x64 - x64.mean(0)).pow(2).sum())
    assert stream.fvu == pytest.approx(exact, rel=1e-6)


def test_evaluate_rejects_empty_or_mismatched_input():
    sae = _trained_looking("topk")
    with pytest.raises(InvalidInputError, match="no evaluation rows"):
        evaluate(sae, [])
    with pytest.raises(InvalidInputError, match="d_in mismatch"):
        evaluate(sae, [torch.randn(4, 13)])
