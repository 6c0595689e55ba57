"""SAE modules: configs, registry, the sparse kernels against their dense twins, architectures."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor

from kestrel.core.errors import InvalidInputError
from kestrel.core.sae import SAE, LossSettings, SAEConfig, TrainConfig, architectures, create, register
from kestrel.core.sae import base as sae_base
from kestrel.core.sae.base import EncoderOutput
from kestrel.core.sae.batchtopk import batch_topk_select
from kestrel.core.sae.kernels import dense_decode, gather_linear, gather_linear_dense, sparse_decode


def _sae(
    architecture: str = "topk", d_in: int = 16, n_latents: int = 64, seed: int = 0, **fields: Any
) -> SAE:
    if architecture in ("topk", "batchtopk"):
        fields.setdefault("k", 4)
    config = SAEConfig(architecture=architecture, d_in=d_in, n_latents=n_latents, **fields)
    sae = create(config, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # a non-trivial origin, so b_dec's part in every formula is exercised
        sae.b_dec.copy_(torch.randn(d_in, generator=torch.Generator().manual_seed(seed + 1)) * 0.3)
        sae.b_enc.copy_(torch.randn(n_latents, generator=torch.Generator().manual_seed(seed + 2)) * 0.1)
    return sae


# -- configs and registry -----------------------------------------------------------------------------


def test_each_architecture_fills_its_own_defaults_and_rejects_the_others():
    assert SAEConfig(d_in=8, n_latents=32).k == 32
    assert SAEConfig(architecture="batchtopk", d_in=8, n_latents=64, k=5).k == 5
    relu = SAEConfig(architecture="relu_l1", d_in=8, n_latents=32)
    assert relu.k is None and relu.l1_coefficient == 2.0
    with pytest.raises(InvalidInputError, match="k does not apply to architecture 'relu_l1'"):
        SAEConfig(architecture="relu_l1", d_in=8, n_latents=32, k=4)
    with pytest.raises(InvalidInputError, match="l1_coefficient does not apply"):
        SAEConfig(d_in=8, n_latents=32, l1_coefficient=1.0)
    with pytest.raises(InvalidInputError, match="l1_coefficient must be positive"):
        SAEConfig(architecture="relu_l1", d_in=8, n_latents=32, l1_coefficient=-1.0)


def test_config_errors_name_the_field_and_the_value():
    with pytest.raises(InvalidInputError) as caught:
        TrainConfig(lr=-0.5, bogus=1)
    message = caught.value.message
    assert "lr: Input should be greater than 0 (got -0.5)" in message and "bogus" in message
    assert {e["field"] for e in caught.value.details["errors"]} == {"lr", "bogus"}
    with pytest.raises(InvalidInputError, match="k \\(65\\) cannot exceed n_latents \\(64\\)"):
        SAEConfig.from_dict({"d_in": 8, "n_latents": 64, "k": 65})


def test_config_round_trips_through_json():
    config = SAEConfig(d_in=8, n_latents=32, k=3, model="m", layer="model.layers.2", data={"skip_bos": True})
    assert SAEConfig.from_dict(config.model_dump(mode="json")) == config
    train = TrainConfig(lr=1e-3, token_budget=10_000, adam_betas=(0.8, 0.99))
    assert TrainConfig.from_dict(train.model_dump(mode="json")) == train


def test_validate_against_reports_both_widths():
    with pytest.raises(InvalidInputError, match="width 8 but the data has width 9"):
        SAEConfig(d_in=8, n_latents=32).validate_against(9)


def test_a_new_architecture_is_one_registered_class(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sae_base, "_REGISTRY", dict(sae_base._REGISTRY))

    @register("top1")
    class Top1SAE(SAE):
        config_defaults: ClassVar[dict[str, Any]] = {"k": 1}

        def _encode_2d(self, x_BD: Tensor) -> tuple[EncoderOutput, Tensor]:
            centred_BD = x_BD - self.b_dec
            pre_BN = self._dense_pre_acts(centred_BD)
            index_B1 = pre_BN.argmax(dim=1, keepdim=True)
            acts_B1 = self._chosen_values(centred_BD, index_B1, pre_BN).relu()
            return EncoderOutput(acts_B1, index_B1, pre_BN), centred_BD

    assert "top1" in architectures()
    sae = create(SAEConfig(architecture="top1", d_in=8, n_latents=16))
    assert isinstance(sae, Top1SAE) and sae(torch.randn(5, 8)).latent_indices.shape == (5, 1)
    with pytest.raises(InvalidInputError, match=r"unknown SAE architecture 'top2' \(known: .*top1"):
        SAEConfig(architecture="top2", d_in=8, n_latents=16)


# -- kernels: fast path against plain twin -----------------------------------------------------------


def _sparse_problem(seed: int = 0, B: int = 32, D: int = 24, N: int = 96, K: int = 6):
    g = torch.Generator().manual_seed(seed)
    x_BD = torch.randn(B, D, generator=g, dtype=torch.float64)
    weight_ND = torch.randn(N, D, generator=g, dtype=torch.float64)
    bias_N = torch.randn(N, generator=g, dtype=torch.float64)
    indices_BK = torch.rand(B, N, generator=g).topk(K, dim=1).indices
    return x_BD, weight_ND, bias_N, indices_BK


def test_sparse_decode_matches_dense_decode_in_values_and_gradients():
    _, weight_ND, _, indices_BK = _sparse_problem()
    acts_BK = torch.rand(indices_BK.shape, dtype=torch.float64)
    upstream_BD = torch.randn(indices_BK.shape[0], weight_ND.shape[1], dtype=torch.float64)
    results = []
    for decode in (sparse_decode, dense_decode):
        acts = acts_BK.clone().requires_grad_()
        weight = weight_ND.clone().requires_grad_()
        out_BD = decode(acts, indices_BK, weight)
        out_BD.backward(upstream_BD)
        results.append((out_BD.detach(), acts.grad, weight.grad))
    for fast, plain in zip(*results, strict=True):
        torch.testing.assert_close(fast, plain, rtol=1e-12, atol=1e-12)


def test_sparse_decode_backward_touches_only_the_chosen_decoder_rows():
    _, weight_ND, _, indices_BK = _sparse_problem(B=4, K=2)
    weight = weight_ND.clone().requires_grad_()
    sparse_decode(torch.rand(indices_BK.shape, dtype=torch.float64), indices_BK, weight).sum().backward()
    touched = set(indices_BK.reshape(-1).tolist())
    nonzero_rows = set(weight.grad.abs().sum(dim=1).nonzero().reshape(-1).tolist())
    assert nonzero_rows == touched


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gather_linear_matches_the_dense_product_in_values_and_gradients(dtype: torch.dtype):
    problem = _sparse_problem(1)
    x_BD, weight_ND, bias_N, indices_BK = (t.to(dtype) if t.is_floating_point() else t for t in problem)
    upstream_BK = torch.randn(indices_BK.shape, dtype=dtype)
    results = []
    for fn in (gather_linear, gather_linear_dense):
        inputs = [t.clone().requires_grad_() for t in (x_BD, weight_ND, bias_N)]
        values_BK = fn(*inputs, indices_BK)
        values_BK.backward(upstream_BK)
        results.append([values_BK.detach()] + [t.grad for t in inputs])
    tolerance = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    for fast, plain in zip(*results, strict=True):
        torch.testing.assert_close(fast, plain, **tolerance)


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_training_loss_gradients_match_a_dense_autograd_reference(architecture: str):
    """The whole k-sparse training path (gather, decode, FVU) against the textbook computation."""
    sae = _sae(architecture, d_in=12, n_latents=48, k=5).double().train()
    x_BD = torch.randn(40, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    settings = LossSettings(dead_N=None, aux_k=6, aux_k_coefficient=0.0)
    out = sae.training_loss(x_BD, settings)
    out.loss.backward()
    fast = {name: p.grad.clone() for name, p in sae.named_parameters()}

    sae.zero_grad()
    enc = sae.encode(x_BD)  # the same choice of latents, now rebuilt densely
    chosen_BN = torch.zeros(40, 48, dtype=torch.float64).scatter(1, enc.indices, (enc.acts > 0).double())
    pre_BN = sae.pre_acts(x_BD)
    latents_BN = pre_BN.relu() * chosen_BN
    recon_BD = latents_BN @ sae.W_dec + sae.b_dec
    loss = (recon_BD - x_BD).pow(2).sum() / (x_BD - x_BD.mean(0)).pow(2).sum()
    loss.backward()
    torch.testing.assert_close(out.loss.detach(), loss.detach())
    for name, p in sae.named_parameters():
        torch.testing.assert_close(fast[name], p.grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize(("n_dead", "aux_k"), [(5, 8), (20, 8)])
def test_aux_k_loss_follows_its_definition_and_reaches_only_dead_latents(n_dead: int, aux_k: int):
    sae = _sae("topk", d_in=12, n_latents=48, k=4).double()
    x_BD = torch.randn(64, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    dead_N = torch.zeros(48, dtype=torch.bool)
    dead_N[-n_dead:] = True
    grads = {}
    for coefficient in (1.0, 0.0):
        sae.zero_grad()
        out = sae.training_loss(x_BD, LossSettings(dead_N=dead_N, aux_k=aux_k, aux_k_coefficient=coefficient))
        out.loss.backward()
        grads[coefficient] = {name: p.grad.clone() for name, p in sae.named_parameters()}
        if coefficient:
            aux_loss = out.aux_loss
    with torch.no_grad():
        enc = sae.encode(x_BD)
        residual_BD = x_BD - sae.decode(enc.acts, enc.indices)
        dead_pre_BM = sae.pre_acts(x_BD)[:, dead_N]
        top = dead_pre_BM.topk(min(aux_k, n_dead), dim=1)
        aux_acts_BM = torch.zeros_like(dead_pre_BM).scatter(1, top.indices, top.values.relu())
        predicted_BD = aux_acts_BM @ sae.W_dec[dead_N]
        expected = (predicted_BD - residual_BD).pow(2).sum() / (x_BD - x_BD.mean(0)).pow(2).sum()
    torch.testing.assert_close(aux_loss, min(n_dead / aux_k, 1.0) * expected)
    for name in ("W_dec", "W_enc", "b_enc"):
        difference = grads[1.0][name] - grads[0.0][name]
        assert difference[~dead_N].abs().max() == 0, name
        assert difference[dead_N].abs().sum() > 0, name


# -- architectures ---------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "relu_l1", "jumprelu"])
def test_decode_and_forward_agree_with_the_dense_twin(architecture: str):
    sae = _sae(architecture).eval()
    if architecture == "batchtopk":
        sae.threshold.fill_(0.2)
    if architecture == "jumprelu":
        sae.threshold.data.copy_(torch.rand(64, generator=torch.Generator().manual_seed(4)) * 0.4)
    x_BD = torch.randn(20, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = sae(x_BD)
        enc = sae.encode(x_BD)
        torch.testing.assert_close(sae.decode(enc.acts, enc.indices), sae.decode_dense(enc.acts, enc.indices))
        decoded_BD = sae.decode(enc.acts, enc.indices)
        torch.testing.assert_close(out.reconstruction, decoded_BD, rtol=1e-5, atol=1e-5)
        dense_BN = torch.zeros(20, 64).scatter_add(1, enc.indices, enc.acts)
        torch.testing.assert_close(sae.decode_latents(dense_BN), out.reconstruction, rtol=1e-5, atol=1e-5)
    assert (out.latent_acts >= 0).all() and out.pre_acts.shape == (20, 64)


def test_topk_keeps_the_k_largest_pre_activations():
    sae = _sae("topk", k=4)
    x_BD = torch.randn(10, 16)
    with torch.no_grad():
        enc = sae.encode(x_BD)
        expected = sae.pre_acts(x_BD).topk(4, dim=1)
    assert torch.equal(enc.indices.sort(dim=1).values, expected.indices.sort(dim=1).values)
    torch.testing.assert_close(enc.acts.sort(dim=1).values, expected.values.relu().sort(dim=1).values)


def test_encode_accepts_leading_dimensions_and_rejects_the_wrong_width():
    sae = _sae("topk")
    x_BTD = torch.randn(2, 3, 16)
    with torch.no_grad():
        out = sae(x_BTD)
        flat = sae(x_BTD.reshape(6, 16))
    assert out.reconstruction.shape == (2, 3, 16) and out.latent_indices.shape == (2, 3, 4)
    torch.testing.assert_close(out.reconstruction.reshape(6, 16), flat.reconstruction)
    with pytest.raises(InvalidInputError, match="width 15 but this SAE reads width 16"):
        sae.encode(torch.randn(2, 15))


def test_batch_topk_selects_exactly_the_batch_wide_top_entries():
    g = torch.Generator().manual_seed(6)
    for _ in range(5):
        pre_BN = torch.randn(64, 100, generator=g) * torch.rand(64, 1, generator=g) * 3
        pre_BN[:3] += 5.0  # a few busy rows that hold far more than k each (exercises widening)
        indices, keep = batch_topk_select(pre_BN, 4)
        chosen = torch.zeros_like(pre_BN).scatter(1, indices, keep)
        reference = torch.zeros(pre_BN.numel())
        reference[pre_BN.reshape(-1).topk(4 * 64).indices] = 1.0
        assert torch.equal(chosen, reference.view_as(pre_BN) * (pre_BN > 0))


def test_batchtopk_encodes_each_row_on_its_own_at_inference():
    sae = _sae("batchtopk", k=4)
    x_BD = torch.randn(32, 16, generator=torch.Generator().manual_seed(7))
    sae.train()
    settings = LossSettings(dead_N=None, aux_k=8, aux_k_coefficient=0.0)
    for _ in range(3):
        sae.training_loss(x_BD, settings)  # training steps set the inference threshold
    assert float(sae.threshold) > 0
    sae.eval()
    with torch.no_grad():
        together = sae(x_BD).reconstruction
        alone = torch.cat([sae(x_BD[i : i + 1]).reconstruction for i in range(32)])
        pre_BN = sae.pre_acts(x_BD)
        expected_l0 = (pre_BN > sae.threshold).sum(dim=1).float()
        assert torch.equal((sae.encode(x_BD).acts > 0).sum(dim=1).float(), expected_l0)
    torch.testing.assert_close(together, alone)


def test_relu_l1_penalty_weights_activations_by_decoder_norm():
    sae = _sae("relu_l1", l1_coefficient=3.0)
    x_BD = torch.randn(8, 16)
    settings = LossSettings(dead_N=None, aux_k=8, aux_k_coefficient=0.0, l1_scale=0.5)
    with torch.no_grad():
        sae.W_dec.mul_(2.0)
        out = sae.training_loss(x_BD, settings)
        acts_BN = sae.pre_acts(x_BD).relu()
        penalty = (acts_BN * sae.W_dec.norm(dim=1)).sum(dim=1).mean()
        recon_BD = acts_BN @ sae.W_dec + sae.b_dec
        mse = (recon_BD - x_BD).pow(2).sum(dim=1).mean()
    torch.testing.assert_close(out.sparsity_loss, penalty)
    torch.testing.assert_close(out.loss, mse + 3.0 * 0.5 * penalty)


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "relu_l1", "jumprelu"])
def test_folding_the_input_scale_keeps_the_function(architecture: str):
    sae = _sae(architecture).eval()
    if architecture == "batchtopk":
        sae.threshold.fill_(0.1)
    if architecture == "jumprelu":
        sae.threshold.data.copy_(torch.rand(64, generator=torch.Generator().manual_seed(4)) * 0.4)
    x_BD = torch.randn(12, 16, generator=torch.Generator().manual_seed(8)) * 30
    scale = 0.07
    with torch.no_grad():
        expected = sae(x_BD * scale).reconstruction / scale
        sae.fold_input_scale(scale)
        torch.testing.assert_close(sae(x_BD).reconstruction, expected, rtol=1e-4, atol=1e-3)


def test_decoder_constraint_helpers():
    sae = _sae("topk")
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.remove_parallel_decoder_grad()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(dim=1)
    torch.testing.assert_close(parallel, torch.zeros(64), atol=1e-5, rtol=0)
