"""What SAELens and sparsify files mean, read without either package (the real sae-lens is
tests/unit/test_saelens_roundtrip.py): folds, refusals, records, zips, and the JumpReLU SAE."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from kestrel.core.clientdata import safetensors_header
from kestrel.core.errors import InvalidInputError
from kestrel.core.sae import SAE, SAEConfig, create
from kestrel.core.sae.base import LossSettings
from kestrel.core.sae.exchange import files_from_zip, model_metadata, sae_from_files
from kestrel.core.sae.jumprelu import BANDWIDTH
from kestrel.core.sae.saelens import SAELENS_FORMAT_VERSION, saelens_files, saelens_from_bytes
from kestrel.core.sae.sparsify import sparsify_files, sparsify_from_bytes

D, N = 8, 24


def _saelens_weights(seed: int = 0, threshold: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(N, D, generator=g)
    weights = {
        "W_enc": torch.randn(D, N, generator=g) / D**0.5,
        "b_enc": torch.randn(N, generator=g) * 0.2,
        "W_dec": w_dec / w_dec.norm(dim=1, keepdim=True) * (0.5 + 1.5 * torch.rand(N, 1, generator=g)),
        "b_dec": torch.randn(D, generator=g) * 0.3,
    }
    if threshold:
        weights["threshold"] = torch.rand(N, generator=g) * 0.6
    return weights


def _cfg(architecture: str = "topk", **fields) -> dict:
    cfg = {
        "architecture": architecture,
        "d_in": D,
        "d_sae": N,
        "dtype": "float32",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "metadata": {
            "sae_lens_version": "6.54.12",
            "model_name": "gpt2",
            "hook_name": "blocks.2.hook_resid_post",
        },
        **fields,
    }
    if architecture == "topk":
        cfg.setdefault("k", 5)
    return cfg


def _read(cfg: dict, weights: dict[str, torch.Tensor], **kwargs) -> SAE:
    return saelens_from_bytes(json.dumps(cfg).encode(), save(weights), **kwargs)


def _dense(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        enc = sae.encode(x)
    return torch.zeros(x.shape[0], sae.n_latents).scatter_add(1, enc.indices, enc.acts)


X = torch.randn(16, D, generator=torch.Generator().manual_seed(42)) * 1.5


# -- SAELens semantics ----------------------------------------------------------------------------


def test_rescale_acts_by_decoder_norm_is_folded_into_the_encoder():
    weights = _saelens_weights()
    sae = _read(_cfg(rescale_acts_by_decoder_norm=True), weights)
    norms = weights["W_dec"].norm(dim=1)
    hidden_pre = ((X - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]) * norms  # SAELens's TopK
    top = hidden_pre.topk(5, dim=-1)
    expected = torch.zeros_like(hidden_pre).scatter(-1, top.indices, top.values.relu())
    torch.testing.assert_close(_dense(sae, X), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(N))  # unit rows after the fold
    with torch.no_grad():
        recon = (expected / norms) @ weights["W_dec"] + weights["b_dec"]
        torch.testing.assert_close(sae(X).reconstruction, recon, rtol=1e-5, atol=1e-5)
    assert sae.config.data["folded"] == ["rescale_acts_by_decoder_norm"]
    # Ignoring the flag picks other latents: the fold is what makes the two agree.
    plain = _read(_cfg(), weights)
    assert not torch.equal(_dense(plain, X) > 0, expected > 0)


def test_rescale_on_an_architecture_sae_lens_runs_without_it_is_refused():
    with pytest.raises(InvalidInputError, match="rescale_acts_by_decoder_norm is set on a 'standard'"):
        _read(_cfg("standard", rescale_acts_by_decoder_norm=True), _saelens_weights())


def test_expected_average_only_in_needs_and_folds_its_scaling_factor():
    weights = _saelens_weights(threshold=True)
    cfg = _cfg("jumprelu", normalize_activations="expected_average_only_in")
    with pytest.raises(InvalidInputError, match="give its norm_scaling_factor") as caught:
        _read(cfg, weights)
    assert caught.value.details["missing"] == "norm_scaling_factor"
    sae = _read(cfg, weights, norm_scaling_factor=0.25)
    hidden_pre = (X * 0.25 - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]  # trained on 0.25·x
    expected = hidden_pre.relu() * (hidden_pre > weights["threshold"])
    torch.testing.assert_close(_dense(sae, X), expected, rtol=1e-5, atol=1e-6)
    assert sae.config.input_scale == 0.25 and sae.config.normalize_input is True
    scaler = json.dumps({"scaling_factor": 0.25, "has_whitening": False}).encode()
    from_file = saelens_from_bytes(json.dumps(cfg).encode(), save(weights), scaler_json=scaler)
    torch.testing.assert_close(_dense(from_file, X), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(InvalidInputError, match=r"disagrees with activation_scaler\.json"):
        saelens_from_bytes(
            json.dumps(cfg).encode(), save(weights), scaler_json=scaler, norm_scaling_factor=0.3
        )
    with pytest.raises(InvalidInputError, match="already folded"):
        _read(_cfg("jumprelu"), weights, norm_scaling_factor=0.25)
    whitened = json.dumps({"scaling_factor": None, "has_whitening": True}).encode()
    with pytest.raises(InvalidInputError, match="whitening"):
        saelens_from_bytes(json.dumps(cfg).encode(), save(weights), scaler_json=whitened)


def test_per_latent_jumprelu_thresholds_import_as_jumprelu():
    weights = _saelens_weights(threshold=True)
    sae = _read(_cfg("jumprelu"), weights)
    assert sae.config.architecture == "jumprelu"
    hidden_pre = (X - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
    expected = hidden_pre.relu() * (hidden_pre > weights["threshold"])
    assert 0 < int((expected > 0).sum()) < expected.numel()  # the thresholds do cut
    torch.testing.assert_close(_dense(sae, X), expected, rtol=1e-5, atol=1e-6)
    # An older SAELens training checkpoint stores log(threshold) instead.
    logged = {k: v for k, v in weights.items() if k != "threshold"} | {
        "log_threshold": weights["threshold"].log()
    }
    torch.testing.assert_close(_dense(_read(_cfg("jumprelu"), logged), X), expected, rtol=1e-5, atol=1e-6)


def test_imports_record_only_what_the_file_says():
    sae = _read(_cfg("standard"), _saelens_weights())
    config = sae.config
    assert (config.l1_coefficient, config.l0_coefficient, config.k) == (None, None, None)
    assert config.normalize_input is None and config.input_scale is None
    assert config.data["saelens_metadata"]["model_name"] == "gpt2"
    reloaded = SAEConfig.from_dict(config.model_dump(mode="json"))  # as load_sae reads it back
    assert reloaded == config
    topk = _read(_cfg("topk", k=7), _saelens_weights())
    assert topk.config.k == 7
    with pytest.raises(InvalidInputError, match="gives no k"):
        _read({k: v for k, v in _cfg("topk").items() if k != "k"}, _saelens_weights())


def test_pre_6_configs_are_read_as_sae_lens_converts_them():
    cfg = {
        "d_in": D,
        "d_sae": N,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 3},
        "hook_point": "blocks.1.hook_resid_pre",
        "model_name": "gpt2",
        "normalize_activations": False,
    }
    sae = _read(cfg, _saelens_weights())
    assert sae.config.architecture == "topk" and sae.config.k == 3
    assert sae.config.layer == "blocks.1.hook_resid_pre"
    with pytest.raises(InvalidInputError, match="activation_fn 'tanh-relu' is not supported"):
        _read({**cfg, "activation_fn_str": "tanh-relu"}, _saelens_weights())
    with pytest.raises(InvalidInputError, match=r"gives no activation_fn_kwargs\.k"):
        _read({**cfg, "activation_fn_kwargs": {}}, _saelens_weights())  # SAELens would run a ReLU


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"architecture": "gated"}, "architecture 'gated' is not supported"),
        ({"normalize_activations": "constant_norm_rescale"}, "is not supported"),
        ({"reshape_activations": "hook_z"}, "reshape_activations='hook_z'"),
    ],
)
def test_files_whose_meaning_would_be_lost_are_refused(change: dict, message: str):
    with pytest.raises(InvalidInputError, match=message):
        _read({**_cfg("standard"), **change}, _saelens_weights())


def test_tensors_kestrel_would_not_read_are_refused_by_name():
    weights = _saelens_weights()
    with pytest.raises(InvalidInputError, match=r"does not use: \['W_skip'\]"):
        _read(_cfg(), {**weights, "W_skip": torch.zeros(D, D)})
    with pytest.raises(InvalidInputError, match=r"does not use: \['threshold'\]"):
        _read(_cfg(), {**weights, "threshold": torch.zeros(N)})
    with pytest.raises(InvalidInputError, match="finetuning scaling_factor"):
        _read(_cfg(), {**weights, "scaling_factor": torch.full((N,), 2.0)})
    _read(_cfg(), {**weights, "scaling_factor": torch.ones(N)})  # all ones: SAELens drops it too
    with pytest.raises(InvalidInputError, match=r"lack \['threshold'\]"):
        _read(_cfg("jumprelu"), weights)


def test_export_writes_6x_metadata_that_names_the_model():
    config = SAEConfig(
        architecture="jumprelu", d_in=D, n_latents=N, model="smollm2-135m", layer="model.layers.2"
    )
    sae = create(config)
    files = saelens_files(sae, model_metadata("smollm2-135m", Path("/nonexistent-store")))
    cfg = json.loads(files["cfg.json"])
    metadata = cfg["metadata"]
    assert metadata["sae_lens_version"] == SAELENS_FORMAT_VERSION >= "6"
    assert metadata["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (
        metadata["model_class_name"] == "AutoModelForCausalLM" and metadata["hook_name"] == "model.layers.2"
    )
    assert "prepend_bos" not in metadata  # no tokenizer in that store: unknown, so not claimed
    assert cfg["architecture"] == "jumprelu"
    assert safetensors_header(files["sae_weights.safetensors"])["threshold"].shape == (N,)


def test_model_metadata_reads_bos_from_the_tokenizer(model_cache_root: Path, smollm):
    assert model_metadata("smollm2-135m", model_cache_root)["prepend_bos"] is False  # SmolLM2 adds none
    assert model_metadata("org/not-cached-anywhere", model_cache_root) == {
        "model_name": "org/not-cached-anywhere"
    }


# -- sparsify -------------------------------------------------------------------------------------


def test_sparsify_export_then_import_is_exact_and_means_sparsify_topk():
    config = SAEConfig(architecture="topk", d_in=D, n_latents=N, k=4)
    sae = create(config, generator=torch.Generator().manual_seed(3)).eval()
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(N) * 0.2)
        sae.b_dec.copy_(torch.randn(D) * 0.3)
    files = sparsify_files(sae)
    cfg = json.loads(files["cfg.json"])
    assert (cfg["d_in"], cfg["num_latents"], cfg["k"], cfg["activation"]) == (D, N, 4, "topk")
    back = sparsify_from_bytes(files["cfg.json"], files["sae.safetensors"])
    for name, tensor in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    # sparsify's encoder: ReLU(linear(x - b_dec)), then the k largest.
    pre = torch.relu((X - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
    top = pre.topk(4, dim=-1)
    expected = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    torch.testing.assert_close(_dense(back, X), expected.detach(), rtol=1e-5, atol=1e-6)
    assert back.config.data["imported_from"] == "sparsify" and back.config.normalize_input is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"transcode": True}, "transcode=true"),
        ({"skip_connection": True}, "skip_connection=true"),
        ({"activation": "groupmax"}, "activation 'groupmax'"),
        ({"num_latents": 0, "expansion_factor": 2}, "describes 16 latents"),
        ({"d_in": 9}, "d_in=9"),
    ],
)
def test_sparsify_files_that_mean_something_else_are_refused(change: dict, message: str):
    files = sparsify_files(create(SAEConfig(architecture="topk", d_in=D, n_latents=N, k=4)))
    cfg = {**json.loads(files["cfg.json"]), **change}
    with pytest.raises(InvalidInputError, match=message):
        sparsify_from_bytes(json.dumps(cfg).encode(), files["sae.safetensors"])


def test_only_topk_exports_to_sparsify():
    with pytest.raises(InvalidInputError, match="sparsify runs TopK SAEs only"):
        sparsify_files(create(SAEConfig(architecture="relu_l1", d_in=D, n_latents=N)))


# -- file sets and zips ---------------------------------------------------------------------------


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, payload in files.items():
            archive.writestr(name, payload)
    return buffer.getvalue()


@pytest.mark.parametrize("folder", ["", "my-sae/"])
def test_a_zip_flat_or_in_one_folder_imports_by_its_layout(folder: str):
    sae = create(SAEConfig(architecture="topk", d_in=D, n_latents=N, k=4))
    files = {f"{folder}{name}": payload for name, payload in saelens_files(sae).items()}
    files[f"{folder}README.md"] = b"skipped, never read"
    read = files_from_zip(_zip(files), max_bytes=1 << 20)
    assert sorted(read) == ["cfg.json", "sae_weights.safetensors"]
    back, layout = sae_from_files(read)
    assert layout == "saelens" and torch.equal(back.W_enc, sae.W_enc)


def test_zips_that_are_not_one_sae_are_refused():
    with pytest.raises(InvalidInputError, match="not a zip file"):
        files_from_zip(b"PK-but-not-really", max_bytes=1 << 20)
    with pytest.raises(InvalidInputError, match="all in one folder"):
        files_from_zip(_zip({"a/cfg.json": b"{}", "b/sae.safetensors": b""}), max_bytes=1 << 20)
    bomb = _zip({"sae_weights.safetensors": bytes(4 << 20), "cfg.json": b"{}"})  # compresses to ~4 KB
    assert len(bomb) < 64 << 10
    with pytest.raises(InvalidInputError, match="exceed 1,048,576 bytes uncompressed"):
        files_from_zip(bomb, max_bytes=1 << 20)
    with pytest.raises(InvalidInputError, match="cannot tell the SAE's layout"):
        sae_from_files({"cfg.json": b"{}"})


# -- JumpReLU ------------------------------------------------------------------------------------------


def _jumprelu(seed: int = 0, **fields) -> SAE:
    sae = create(SAEConfig(architecture="jumprelu", d_in=D, n_latents=N, **fields))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(N, generator=g) * 0.3)
        sae.threshold.copy_(torch.rand(N, generator=g) * 0.3)
    return sae


def test_jumprelu_threshold_gradients_are_sae_lens_straight_through_estimates():
    sae = _jumprelu(l0_coefficient=0.7).train()
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(1))
    out = sae.training_loss(x, LossSettings(dead_N=None, aux_k=4, aux_k_coefficient=0.0, l1_scale=0.5))
    out.loss.backward()
    with torch.no_grad():
        z = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
        theta = sae.threshold
        recon = (z * (z > theta)) @ sae.W_dec + sae.b_dec
        grad_acts = 2 * (recon - x) @ sae.W_dec.T / 64  # d(mean squared error)/d(acts)
        kernel = (((z - theta) / BANDWIDTH).abs() < 0.5).float()
        from_acts = (-(theta / BANDWIDTH) * kernel * grad_acts).sum(0)
        from_l0 = (-(1 / BANDWIDTH) * kernel * (0.7 * 0.5 / 64)).sum(0)
        mse = (recon - x).pow(2).sum() / 64
        l0 = (z > theta).float().sum() / 64
    assert float(kernel.sum()) > 0  # some pre-activations lie within the band: the STE is exercised
    torch.testing.assert_close(sae.threshold.grad, from_acts + from_l0, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.loss, mse + 0.7 * 0.5 * l0)
    torch.testing.assert_close(out.sparsity_loss, l0)


def test_jumprelu_encodes_each_row_alike_in_batch_and_alone():
    sae = _jumprelu().eval()
    with torch.no_grad():
        together = _dense(sae, X)
        alone = torch.cat([_dense(sae, X[i : i + 1]) for i in range(X.shape[0])])
    torch.testing.assert_close(together, alone)


def test_a_larger_l0_coefficient_trains_a_sparser_jumprelu_sae():
    from kestrel.core.sae import TrainConfig, train_sae

    rows = torch.randn(4096, 16, generator=torch.Generator().manual_seed(2))
    final = {}
    for coefficient in (0.01, 3.0):
        config = SAEConfig(architecture="jumprelu", d_in=16, n_latents=64, l0_coefficient=coefficient)
        train = TrainConfig(batch_size=256, epochs=8, lr=1e-2)
        result = train_sae(config, train, lambda epoch: iter([rows]))
        final[coefficient] = result.metrics["training"]
        assert result.sae.threshold.min() >= 0  # projected back after every step
    assert final[0.01]["final_fvu"] < 0.1, final  # it learns to reconstruct
    assert final[3.0]["final_l0"] < 0.5 * final[0.01]["final_l0"], final  # and the penalty buys sparsity
