"""SAE training on a GPU: bf16 autocast quality, sparse kernels, no host sync between log reports.

The CUDA tests skip without a GPU (on a GPU host: ``pytest tests/unit/test_gpu_training.py -q``).
The first tests run everywhere: they hold the sync-free AuxK and fire-count paths the trainer takes
on CUDA equal to the host paths it takes on CPU, so the CUDA path's arithmetic is checked on every
machine and only its speed and its lack of syncs need the GPU.
"""

from __future__ import annotations

import pytest
import torch

from kestrel.core.sae import SAEConfig, TrainConfig, create, train_sae
from kestrel.core.sae.base import LossSettings, _fire_counts, batch_total_variance
from kestrel.core.sae.kernels import dense_decode, sparse_decode
from kestrel.core.sae.trainer import open_run

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

#: float32 sums of a few thousand terms in a different order agree to ~1e-6 relative.
FP32_TOL = {"rtol": 1e-4, "atol": 1e-6}


def dictionary_rows(n_rows: int, n_atoms: int, d: int, active: int, seed: int) -> torch.Tensor:
    """Rows that are sums of `active` unit atoms (coefficients in [0.5, 1.5]) plus a little noise."""
    g = torch.Generator().manual_seed(20_000 + seed)
    atoms = torch.randn(n_atoms, d, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    chosen = torch.randint(0, n_atoms, (n_rows, active), generator=g)
    coefficients = torch.rand(n_rows, active, generator=g) + 0.5
    rows = (coefficients.unsqueeze(-1) * atoms[chosen]).sum(dim=1)
    return rows + 0.01 * torch.randn(n_rows, d, generator=g)


def _aux_and_grads(sae, x_BD: torch.Tensor, dead_N: torch.Tensor, on_device: bool):
    """AuxK through one of the two paths, and the gradients it gives every parameter."""
    sae.zero_grad(set_to_none=True)
    enc, x_centred_BD = sae._encode_2d(x_BD)
    error_BD = (sae._reconstruct(enc) - x_BD).detach()
    settings = LossSettings(dead_N=dead_N, aux_k=16, aux_k_coefficient=1 / 32)
    variance = batch_total_variance(x_BD)
    if on_device:
        aux = sae._aux_k_loss_on_device(x_centred_BD, error_BD, settings, variance, enc)
    else:
        aux = sae._aux_k_loss(x_centred_BD, error_BD, settings, variance)
    if aux.requires_grad:
        aux.backward()
    grads = {
        name: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        for name, p in sae.named_parameters()
    }
    return aux.detach(), grads


@pytest.mark.parametrize("n_dead", [0, 5, 16, 200])
def test_sync_free_aux_k_equals_the_host_path(n_dead: int):
    """The CUDA AuxK (masked top-k, count kept on the device) is the CPU one: same value, same
    gradients, with fewer dead latents than aux_k (16), exactly aux_k, more, and none."""
    torch.manual_seed(0)
    config = SAEConfig(architecture="topk", d_in=32, n_latents=256, k=4)
    sae = create(config, generator=torch.Generator().manual_seed(1))
    x_BD = torch.randn(64, 32)
    dead_N = torch.zeros(256, dtype=torch.bool)
    dead_N[torch.randperm(256, generator=torch.Generator().manual_seed(2))[:n_dead]] = True
    host, host_grads = _aux_and_grads(sae, x_BD, dead_N, on_device=False)
    device, device_grads = _aux_and_grads(sae, x_BD, dead_N, on_device=True)
    if n_dead:
        assert host > 0
    torch.testing.assert_close(device, host, **FP32_TOL)
    for name in host_grads:
        torch.testing.assert_close(device_grads[name], host_grads[name], **FP32_TOL, msg=name)


def test_fire_counts_count_the_rows_each_latent_fired_on():
    config = SAEConfig(architecture="topk", d_in=16, n_latents=64, k=4)
    sae = create(config, generator=torch.Generator().manual_seed(0))
    enc, _ = sae._encode_2d(torch.randn(50, 16))
    expected = torch.bincount(enc.indices[enc.acts > 0], minlength=64).float()
    torch.testing.assert_close(_fire_counts(enc, 64), expected, rtol=0, atol=0)


# -- on a GPU ------------------------------------------------------------------------------------


def _fvu_of_training(device: str, rows: torch.Tensor, held_out: torch.Tensor) -> float:
    sae_config = SAEConfig(architecture="topk", d_in=rows.shape[1], n_latents=512, k=4)
    train_config = TrainConfig(epochs=8, batch_size=1024, seed=0, device=device, autocast=True)
    parts = list(rows.split(4096))
    result = train_sae(
        sae_config,
        train_config,
        lambda epoch: iter(parts),
        rows_per_epoch=rows.shape[0],
        eval_data=lambda: iter([held_out]),
    )
    return float(result.metrics["fvu"])


@needs_cuda
def test_bf16_training_on_cuda_reaches_the_cpu_fp32_fvu():
    """bf16 autocast changes the encoder scores by ~2^-8 relative; the trained SAE must not be
    worse than the fp32 CPU one by more than a few percent of FVU on the same data and seed."""
    rows = dictionary_rows(32_768, n_atoms=256, d=64, active=4, seed=0)
    held_out = rows[-4096:]
    cpu = _fvu_of_training("cpu", rows[:-4096], held_out)
    cuda = _fvu_of_training("cuda", rows[:-4096], held_out)
    assert cpu < 0.3, f"the CPU reference did not train (FVU {cpu:.3f})"
    assert cuda <= cpu * 1.1 + 0.01, f"cuda bf16 FVU {cuda:.4f} against CPU fp32 {cpu:.4f}"


@needs_cuda
@pytest.mark.parametrize("autocast", [False, True])
def test_sparse_and_dense_decoders_agree_on_cuda(autocast: bool):
    g = torch.Generator().manual_seed(0)
    weight_ND = torch.randn(4608, 576, generator=g).cuda().requires_grad_()
    acts_BK = torch.rand(512, 32, generator=g).cuda().requires_grad_()
    indices_BK = torch.stack([torch.randperm(4608, generator=g)[:32] for _ in range(512)]).cuda()
    outs, grads = [], []
    for decode in (sparse_decode, dense_decode):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out_BD = decode(acts_BK, indices_BK, weight_ND)
        (out_BD.float() * torch.linspace(-1, 1, 576, device="cuda")).sum().backward()
        outs.append(out_BD.float())
        grads.append((weight_ND.grad.clone(), acts_BK.grad.clone()))
        weight_ND.grad = acts_BK.grad = None
    # 32 products per output: fp32 sums agree to ~1e-5; a bf16 matmul (dense twin) to ~1e-2
    tol = {"rtol": 2e-2, "atol": 5e-2} if autocast else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(outs[0], outs[1], **tol)
    torch.testing.assert_close(grads[0][0], grads[1][0], **tol)
    torch.testing.assert_close(grads[0][1], grads[1][1], **tol)


@needs_cuda
def test_steps_between_log_reports_make_no_host_sync():
    """Between two progress reports a step never waits for the GPU: loss figures accumulate on the
    device, dead latents feed AuxK through a mask (no nonzero), fire counts use index_add."""
    rows = dictionary_rows(16 * 512, n_atoms=256, d=64, active=4, seed=1).cuda()
    sae_config = SAEConfig(architecture="topk", d_in=64, n_latents=512, k=4)
    # a low dead threshold makes latents dead within a few steps, so AuxK's path runs
    train_config = TrainConfig(
        epochs=1, batch_size=512, seed=0, device="cuda", log_every=8, dead_tokens_threshold=512
    )
    reports = []
    run = open_run(sae_config, train_config, rows.shape[0], on_progress=reports.append)
    run.start()
    batches = rows.split(512)
    run.feed(0, 512, batches[0])  # the first step initialises (reads the input scale back once)
    torch.cuda.synchronize()
    for step in range(1, 7):  # steps 2..7: none of them is a log boundary
        torch.cuda.set_sync_debug_mode("error")
        try:
            run.feed(0, 512 * (step + 1), batches[step])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert reports == []
    run.feed(0, 512 * 8, batches[7])  # step 8 reports (and may read back)
    assert len(reports) == 1 and reports[0].step == 8
    assert bool((run.state.tokens_since_fired_N >= 512).any()), "no latent was dead: AuxK did not run"
