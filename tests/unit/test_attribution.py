"""Attribution patching (AtP*) on tiny Llamas: the gradient path against finite differences, the QK
fix's attention pattern against a real patched forward, estimates against real patching, and the
analysis, report and CLI around them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from scipy.stats import spearmanr
from tiny_models import tiny_llama_config

from kestrel.core.analysis import attribution, get_analysis, get_results, plot_path, report_path, run_analysis
from kestrel.core.analysis.qkfix import QKFix, _patched_probs
from kestrel.core.errors import InvalidInputError
from kestrel.core.hooks import ActivationRecorder, Controller, hooks
from kestrel.core.models import DEFAULT_MODEL, LoadedModel
from kestrel.core.sae import SAEConfig, create

VOCAB = 128
CLEAN = [[5, 17, 33, 9, 71, 2], [5, 40, 33, 9, 71, 2]]
CORRUPT = [[5, 17, 33, 60, 71, 2], [5, 40, 33, 61, 71, 2]]
DIFFERS_AT = 3
PAIR = {
    "clean": "The capital of France is",
    "corrupted": "The capital of Italy is",
    "correct": " Paris",
    "wrong": " Rome",
}


def _tiny(
    dtype: torch.dtype = torch.float64, *, seed: int = 0, attention_scale: float = 1.0, **overrides
) -> LoadedModel:
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(tiny_llama_config(**overrides)).eval().to(dtype)
    with torch.no_grad():
        for block in model.model.layers:
            block.self_attn.q_proj.weight.mul_(attention_scale)
            block.self_attn.k_proj.weight.mul_(attention_scale)
    return LoadedModel("tiny", model, None, torch.device("cpu"), dtype, "local")


def _pairs() -> attribution.Pairs:
    ids = lambda rows: torch.tensor(rows, dtype=torch.long)  # noqa: E731
    return attribution.Pairs(ids(CLEAN), ids(CORRUPT), ids([7, 8]), ids([11, 12]))


BLOCKS = ["model.layers.0", "model.layers.1", "model.layers.2"]


def _metric(lm: LoadedModel, controls=()) -> float:
    """The mean logit difference of the corrupted run, in the model's precision (float64 here)."""
    pairs = _pairs()
    with hooks(lm.model, *controls), torch.no_grad():
        return float(attribution.mean_logit_diff(lm.model(input_ids=pairs.corrupt_PT).logits, pairs))


def _nudge(
    layer: str, delta: torch.Tensor, eps: float, when: str = "forward", span=slice(None)
) -> Controller:
    """Add eps × delta (on the last dimension's ``span``): the patch, scaled toward zero."""

    def fn(x, _):
        out = x.clone()
        out[..., span] = out[..., span] + eps * delta.to(x.dtype)
        return out

    return Controller(layer, fn, when)


def _slope(
    lm: LoadedModel, layer: str, delta: torch.Tensor, when: str = "forward", span=slice(None)
) -> float:
    eps = 1e-2
    up = _metric(lm, [_nudge(layer, delta, eps, when, span)])
    return (up - _metric(lm, [_nudge(layer, delta, -eps, when, span)])) / (2 * eps)


def _record(
    lm: LoadedModel, ids: torch.Tensor, layer: str, when: str = "forward", controls=()
) -> torch.Tensor:
    recorder = ActivationRecorder([layer], when=when, to_cpu=False)
    with hooks(lm.model, *controls, *recorder.hooks()), torch.no_grad():
        lm.model(input_ids=ids)
    return recorder.last(layer)


def test_estimates_are_the_directional_derivative_of_the_patch() -> None:
    """The estimate is the derivative of the metric along the patch: the central difference
    (metric(corrupt + ε·Δ) − metric(corrupt − ε·Δ)) / 2ε, Δ = clean − corrupt on the cell, for a
    residual cell, a head and an SAE latent. A float64 model still runs its norms and softmax in
    float32, so ε is 1e-2 (truncation ~ε², roundoff ~1e-7/ε) and the tolerance ~1e-6 absolute.
    Cells the runs do not differ in estimate exactly 0."""
    lm, pairs = _tiny(), _pairs()
    sae = create(
        SAEConfig(d_in=32, n_latents=16, k=16, layer="model.layers.1"),
        generator=torch.Generator().manual_seed(0),
    )
    sae = sae.double().eval().requires_grad_(False)
    sites = attribution.head_sites(lm, BLOCKS)
    est = attribution.estimate(
        lm, pairs, BLOCKS, heads=sites, latents=attribution.LatentSite("s", "model.layers.1", sae)
    )
    assert np.all(est.resid_LT[:, :DIFFERS_AT] == 0.0)
    for layer_index, t in [(0, DIFFERS_AT), (1, DIFFERS_AT), (2, 5)]:
        layer = BLOCKS[layer_index]
        delta = torch.zeros_like(est.clean_resid[layer])
        delta[:, t] = (est.clean_resid[layer] - _record(lm, pairs.corrupt_PT, layer))[:, t]
        assert abs(est.resid_LT[layer_index, t]) > 1e-3
        assert est.resid_LT[layer_index, t] == pytest.approx(_slope(lm, layer, delta), rel=1e-3, abs=5e-6)
    site, head = sites[1], 2
    width = 32 // site.n_heads
    span = slice(head * width, (head + 1) * width)
    delta = (est.clean_heads[site.projection] - _record(lm, pairs.corrupt_PT, site.projection, "pre"))[
        ..., span
    ]
    assert abs(est.heads_LH[1, head]) > 1e-3
    assert est.heads_LH[1, head] == pytest.approx(
        _slope(lm, site.projection, delta, "pre", span), rel=1e-3, abs=5e-6
    )
    latent = int(np.argmax(np.abs(est.latents_N)))
    assert abs(est.latents_N[latent]) > 1e-3
    direction = est.latent_delta_PTN[..., latent, None] * sae.W_dec[latent]
    assert est.latents_N[latent] == pytest.approx(_slope(lm, "model.layers.1", direction), rel=1e-3, abs=5e-6)
    untouched = (est.latent_delta_PTN == 0).all(dim=(0, 1)).numpy()
    assert np.all(est.latents_N[untouched] == 0.0)


def test_identical_runs_estimate_nothing_and_leave_the_model_untouched() -> None:
    lm = _tiny()
    pairs = _pairs()
    same = attribution.Pairs(pairs.clean_PT, pairs.clean_PT, pairs.correct_P, pairs.wrong_P)
    est = attribution.estimate(
        lm, same, BLOCKS, heads=attribution.head_sites(lm, BLOCKS), grad_drop_blocks=BLOCKS
    )
    assert np.all(est.resid_LT == 0.0) and np.all(est.heads_LH == 0.0)
    assert all(np.all(v == 0.0) for v in est.grad_drop.values())
    assert all(p.grad is None for p in lm.model.parameters())  # no parameter gradient was taken


def test_qk_fix_reproduces_the_patched_attention_pattern() -> None:
    """The fix's claim: patching block 0's output at t gives block 1 the clean query and key at t.
    Its pattern must equal block 1's attention weights in a real patched forward."""
    lm = _tiny(torch.float32, attention_scale=4.0)
    lm.model.config._attn_implementation = "eager"
    pairs = _pairs()
    fix = QKFix(lm, BLOCKS)
    attribution.estimate(lm, pairs, BLOCKS, qk_fix=fix)
    clean, corrupt = (fix.state.records[run]["model.layers.1.self_attn"] for run in ("clean", "corrupt"))
    clean_out = _record(lm, pairs.clean_PT, "model.layers.0")
    for t in range(len(CLEAN[0])):
        with hooks(lm.model, _patch_at("model.layers.0", clean_out, t)), torch.no_grad():
            real = lm.model(input_ids=pairs.corrupt_PT, output_attentions=True).attentions[1]
        torch.testing.assert_close(_patched_probs(clean, corrupt, t), real.float(), atol=1e-5, rtol=1e-4)


def test_qk_fix_is_exact_through_the_next_attention() -> None:
    """Two blocks, the second without an MLP: a patch of block 0's output at t < last reaches the
    metric only through block 1's attention. With the fix, the estimate must equal the gradient
    at block 1's head outputs times their real change under the patch (only the final norm stays
    linear); without it, saturated attention makes the estimate far off."""
    lm = _tiny(torch.float32, attention_scale=4.0, num_hidden_layers=2)
    with torch.no_grad():
        lm.model.model.layers[1].mlp.down_proj.weight.zero_()
    pairs, blocks, heads_in = _pairs(), BLOCKS[:2], "model.layers.1.self_attn.o_proj"
    fixed = attribution.estimate(lm, pairs, blocks, qk_fix=QKFix(lm, blocks))
    plain = attribution.estimate(lm, pairs, blocks)
    taps = attribution.GradientTaps()
    with torch.enable_grad(), hooks(lm.model, taps.controller(heads_in, "pre")):
        grad = taps.grads(attribution.mean_logit_diff(lm.model(input_ids=pairs.corrupt_PT).logits, pairs))
    corrupt_z = _record(lm, pairs.corrupt_PT, heads_in, "pre")
    clean_out = _record(lm, pairs.clean_PT, "model.layers.0")
    for t in (DIFFERS_AT, DIFFERS_AT + 1):
        patched_z = _record(
            lm, pairs.corrupt_PT, heads_in, "pre", [_patch_at("model.layers.0", clean_out, t)]
        )
        reference = float((grad[(heads_in, "pre")] * (patched_z - corrupt_z)).sum())
        assert fixed.resid_LT[0, t] == pytest.approx(reference, rel=1e-3, abs=1e-6)
        assert fixed.qk_correction_LT[0, t] == pytest.approx(
            fixed.resid_LT[0, t] - plain.resid_LT[0, t], abs=1e-6
        )
    assert abs(plain.resid_LT[0, DIFFERS_AT] - fixed.resid_LT[0, DIFFERS_AT]) > 0.2 * abs(
        fixed.resid_LT[0, DIFFERS_AT]
    )
    assert np.all(fixed.qk_correction_LT[1] == 0.0)  # the last block: no next attention
    np.testing.assert_allclose(fixed.resid_LT[1], plain.resid_LT[1], atol=1e-6)  # sdpa vs the fix's eager


def _patch_at(layer: str, clean: torch.Tensor, t: int) -> Controller:
    return Controller(
        layer, lambda x, _: torch.cat([x[:, :t], clean[:, t : t + 1].to(x.dtype), x[:, t + 1 :]], 1)
    )


@pytest.fixture(scope="module")
def tokenizer(model_cache_root: Path):
    from kestrel.core.models import BUNDLED, ensure_bundled_cache

    return tf.AutoTokenizer.from_pretrained(ensure_bundled_cache(BUNDLED[DEFAULT_MODEL], model_cache_root))


def _with_tokenizer(lm: LoadedModel, tokenizer) -> LoadedModel:
    return LoadedModel(lm.name, lm.model, tokenizer, lm.device, lm.dtype, "local")


@pytest.fixture(scope="module")
def gentle(tokenizer) -> LoadedModel:
    """A tiny Llama whose blocks write little into the residual stream: patches are small
    perturbations, so a first-order estimate must agree closely with real patching."""
    lm = _tiny(torch.float64, vocab_size=len(tokenizer))
    with torch.no_grad():
        for block in lm.model.model.layers:
            block.self_attn.o_proj.weight.mul_(0.2)
            block.mlp.down_proj.weight.mul_(0.2)
    return _with_tokenizer(lm, tokenizer)


def test_patching_method_reports_estimates_beside_measurements_and_they_agree(store, gentle) -> None:
    config = {
        "kind": "circuit",
        "model": "tiny",
        "pairs": [PAIR, {**PAIR, "clean": "The capital of Spain is", "correct": " Madrid"}],
        "method": "patching",
        "components": ["resid", "heads"],
    }
    analysis_id = run_analysis(store, config, model_loader=lambda *_: gentle)
    results = get_results(store, analysis_id)
    for kind in ("resid", "heads"):
        grid = results["components"][kind]
        estimate, measured = np.array(grid["estimate"]), np.array(grid["measured"], dtype=float)
        assert not np.isnan(measured).any()
        assert np.abs(estimate - measured).max() <= 0.2 * np.abs(measured).max()
        assert results["agreement"][kind]["over"] == "all"
        assert results["agreement"][kind]["spearman"] >= 0.9
    np.testing.assert_allclose(results["fraction_restored"], results["components"]["resid"]["measured"])
    assert len(results["patched_logit_diff"]) == 3
    key = get_analysis(store, analysis_id).key_numbers
    assert key["method"] == "patching" and key["spearman"] >= 0.9 and key["patching_seconds"] > 0


def test_atp_confirms_its_top_candidates_by_real_patching(store, gentle) -> None:
    config = {
        "kind": "circuit",
        "model": "tiny",
        "pairs": [PAIR],
        "components": ["resid", "heads"],
        "confirm_top": 4,
    }
    analysis_id = run_analysis(store, config, model_loader=lambda *_: gentle)
    results = get_results(store, analysis_id)
    assert results["method"] == "atp" and results["timings"]["n_patched"] == 8
    resid = results["components"]["resid"]
    estimate, measured = np.array(resid["estimate"]), np.array(resid["measured"], dtype=float)
    done = ~np.isnan(measured)
    assert done.sum() == 4
    assert np.abs(estimate[done]).min() >= np.abs(estimate[~done]).max()  # the top 4 by |estimate|
    np.testing.assert_allclose(results["fraction_restored"], estimate)
    assert [c["estimate"] for c in resid["confirmed"]] == pytest.approx(list(estimate[done]))
    key = get_analysis(store, analysis_id).key_numbers
    best = (results["layers"].index(key["best_layer"]), key["best_position"])
    assert done[best] and key["best_fraction_restored"] == pytest.approx(np.nanmax(measured))
    report = report_path(store, analysis_id).read_text()
    for phrase in ("Attribution patching (AtP*)", "Spearman, mean", "QK fix on residual cells"):
        assert phrase in report
    for plot in ("patching", "heads", "agreement"):
        assert plot_path(store, analysis_id, plot).read_bytes().startswith(b"\x89PNG")


def test_grad_drop_ranks_candidates_and_latents_go_through_the_sae(store, gentle) -> None:
    from test_split_model import publish_sae

    sae = create(
        SAEConfig(d_in=32, n_latents=16, k=4, layer="model.layers.1", model="tiny"),
        generator=torch.Generator().manual_seed(1),
    )
    with torch.no_grad():
        sae.b_enc.fill_(0.1)
    publish_sae(store, sae.eval(), "tiny-sae")
    config = {
        "kind": "circuit",
        "pairs": [PAIR],
        "method": "patching",
        "components": ["resid", "latents"],
        "sae_id": "tiny-sae",
        "grad_drop": True,
    }
    results = get_results(store, run_analysis(store, config, model_loader=lambda *_: gentle))
    latents = results["components"]["latents"]
    estimate, measured = np.array(latents["estimate"])[0], np.array(latents["measured"], dtype=float)[0]
    assert not np.isnan(measured).any() and np.abs(measured).max() > 0
    assert spearmanr(estimate, measured).statistic >= 0.9
    assert np.array(results["components"]["resid"]["grad_drop"]).min() >= 0.0


def test_bad_circuit_configs_are_clear_errors(store, gentle) -> None:
    base = {"kind": "circuit", "model": "tiny", "pairs": [PAIR]}
    with pytest.raises(InvalidInputError, match="latents component needs sae_id"):
        run_analysis(store, {**base, "components": ["latents"]}, model_loader=lambda *_: gentle)
    with pytest.raises(InvalidInputError, match="method"):
        run_analysis(store, {**base, "method": "guess"}, model_loader=lambda *_: gentle)
    with pytest.raises(InvalidInputError, match="components must not repeat"):
        run_analysis(store, {**base, "components": ["resid", "resid"]}, model_loader=lambda *_: gentle)


def test_cli_circuit_runs_attribution_with_heads(store, gentle, monkeypatch) -> None:
    from typer.testing import CliRunner

    import kestrel.core.models as models
    from kestrel.cli import app

    monkeypatch.setattr(models, "load_model", lambda *a, **k: gentle)
    args = [
        "analyze",
        "circuit",
        "--clean",
        PAIR["clean"],
        "--corrupted",
        PAIR["corrupted"],
        "--correct",
        " Paris",
    ]
    args += [
        "--wrong",
        " Rome",
        "-c",
        "resid",
        "-c",
        "heads",
        "--confirm-top",
        "3",
        "--store",
        str(store.root),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "spearman" in result.output and "atp_seconds" in result.output


def test_a_stopped_attribution_publishes_nothing_and_restores_the_model(store, gentle) -> None:
    """Cancelled between confirmation patches: no analysis is listed, and the attention
    implementation the QK fix switched for its two forwards is the model's own again."""
    from kestrel.core.analysis import list_analyses
    from kestrel.core.errors import CancelledError

    before = gentle.model.config._attn_implementation
    calls = iter(range(100))
    config = {"kind": "circuit", "model": "tiny", "pairs": [PAIR], "confirm_top": 5}
    with pytest.raises(CancelledError, match="nothing was written"):
        run_analysis(store, config, model_loader=lambda *_: gentle, should_stop=lambda: next(calls) >= 3)
    assert list_analyses(store) == [] and gentle.model.config._attn_implementation == before
    assert all(p.grad is None for p in gentle.model.parameters())


def test_grad_drop_has_its_known_value_where_nothing_lies_downstream() -> None:
    """Dropping a block's gradient cannot change a cell after every block: for the last block's
    output each of the L dropped estimates is the plain one, so the score is L/(L−1)·|AtP|. Earlier
    cells do change, and every score is ≥ 0."""
    lm = _tiny()
    est = attribution.estimate(lm, _pairs(), BLOCKS, grad_drop_blocks=BLOCKS)
    score = est.grad_drop["resid"]
    n = len(BLOCKS)
    np.testing.assert_allclose(score[-1], n / (n - 1) * np.abs(est.resid_LT[-1]), rtol=1e-6, atol=1e-12)
    assert np.all(score >= 0) and not np.allclose(score[0], n / (n - 1) * np.abs(est.resid_LT[0]))
