"""The split-model checks of ``test_split_model.py`` on real GPUs (skipped without CUDA).

On a GPU host: ``pytest tests/unit/test_gpu.py -q``. With one GPU, ``device_map="auto"`` in bf16
and a block offloaded to the CPU are checked; with two or more, the tiny Llama is split across
``cuda:0`` and the last GPU, so the hooks on its later blocks see tensors on another device
than the inputs, and every consumer (capture writer, SAE steering, SAE encoding and evaluation)
must follow them there. 8-bit and 4-bit loads run where bitsandbytes is installed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kestrel.core.activations import capture
from kestrel.core.devices import layer_device
from kestrel.core.models import LoadedModel, forward, load_model
from kestrel.core.run_reader import iter_row_batches
from kestrel.core.runs import CaptureOptions
from kestrel.core.sae import SAEConfig, create
from kestrel.core.sae.artifacts import encode_prompt
from kestrel.core.sae.model_eval import ce_loss_metrics
from kestrel.core.steering import (
    LatentEdit,
    SteeringConfig,
    compile_plan,
    sae_on_layer_device,
    steered_forward,
)
from kestrel.core.store import LocalStore

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LAYERS = ["model.layers.0", "model.layers.1", "model.layers.2.mlp"]
TEXTS = ["The cat sat on the mat.", "Rivers run to the sea, and the sea is never full.", "Hi"]
REPO = Path(__file__).resolve().parents[2]
#: bf16 keeps 8 bits of mantissa: two bf16 runs of one model agree to about 2^-7 relative.
BF16_TOL = {"rtol": 2e-2, "atol": 2e-2}
FP32_TOL = {"rtol": 1e-4, "atol": 1e-5}


def two_gpu_map() -> dict[str, int]:
    """Embeddings and block 0 on the first GPU; blocks 1-2, the norm and the head on the last."""
    last = torch.cuda.device_count() - 1
    return {
        "model.embed_tokens": 0,
        "model.rotary_emb": 0,
        "model.layers.0": 0,
        "model.layers.1": last,
        "model.layers.2": last,
        "model.norm": last,
        "lm_head": last,
    }


def make_sae(layer: str):
    sae = create(
        SAEConfig(d_in=32, n_latents=64, k=4, layer=layer), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        sae.b_enc.fill_(0.1)
    return sae.eval().requires_grad_(False)


def captured(lm: LoadedModel, root: Path) -> dict[str, torch.Tensor]:
    """Each layer's rows captured over TEXTS, in fp32, on the CPU."""
    store = LocalStore(root)
    capture(lm, TEXTS, LAYERS, store, run_id="run", options=CaptureOptions(dtype="fp32", token_budget=64))
    return {
        layer: torch.cat([batch.acts_ND for batch in iter_row_batches(store, "run", layer)])
        for layer in LAYERS
    }


def assert_same_captures(lm: LoadedModel, reference: LoadedModel, tmp_path: Path, tol: dict) -> None:
    got, want = captured(lm, tmp_path / "got"), captured(reference, tmp_path / "want")
    for layer in LAYERS:
        assert got[layer].shape == want[layer].shape and want[layer].abs().sum() > 0, layer
        torch.testing.assert_close(got[layer], want[layer], **tol)


def steered(lm: LoadedModel, layer: str = "model.layers.2") -> torch.Tensor:
    sae = make_sae(layer)
    config = SteeringConfig(sae_id="s", edits=[LatentEdit(latent=3, op="clamp", value=8.0)])
    plan = compile_plan(config, lm, load_sae=lambda _id: sae_on_layer_device(lm, sae, {}))
    assert plan.sae is not None and plan.sae.W_dec.device == layer_device(lm, layer)
    return steered_forward(lm, TEXTS, plan).logits_BTV.float().cpu()


@pytest.fixture(scope="module")
def reference(tiny_llama_dir: Path) -> LoadedModel:
    return load_model(str(tiny_llama_dir), device="cuda:0", dtype="fp32")


def test_auto_device_map_in_bf16_captures_what_one_gpu_does(tiny_llama_dir: Path, tmp_path: Path) -> None:
    plain = load_model(str(tiny_llama_dir), device="cuda:0", dtype="bf16")
    auto = load_model(
        str(tiny_llama_dir), device="cuda", device_map="auto", dtype="bf16", store_root=tmp_path
    )
    assert auto.dtype == torch.bfloat16 and auto.device.type == "cuda"
    assert all(device.startswith("cuda") for device in auto.devices), auto.devices
    assert_same_captures(auto, plain, tmp_path, BF16_TOL)
    torch.testing.assert_close(steered(auto), steered(plain), **BF16_TOL)


def test_a_block_offloaded_to_the_cpu_runs_on_the_gpu(
    tiny_llama_dir: Path, reference: LoadedModel, tmp_path: Path
) -> None:
    """accelerate's CPU offload: block 1's weights stay in CPU memory and are brought to cuda:0 for
    its forward; its hooks see cuda:0 tensors."""
    device_map = {**{k: 0 for k in two_gpu_map()}, "model.layers.1": "cpu"}
    offloaded = load_model(str(tiny_llama_dir), device="cuda", device_map=device_map, store_root=tmp_path)
    assert layer_device(offloaded, "model.layers.1") == torch.device("cuda:0")
    assert_same_captures(offloaded, reference, tmp_path, FP32_TOL)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_model_split_across_two_gpus_computes_what_one_gpu_does(
    tiny_llama_dir: Path, reference: LoadedModel, tmp_path: Path
) -> None:
    split = load_model(str(tiny_llama_dir), device="cuda", device_map=two_gpu_map(), store_root=tmp_path)
    last = torch.device(f"cuda:{torch.cuda.device_count() - 1}")
    assert split.device == torch.device("cuda:0") and layer_device(split, "model.layers.2") == last
    assert split.devices == ["cuda:0", str(last)]
    torch.testing.assert_close(
        forward(split, TEXTS).logits_BTV.cpu(), forward(reference, TEXTS).logits_BTV.cpu(), **FP32_TOL
    )
    assert_same_captures(split, reference, tmp_path, FP32_TOL)
    torch.testing.assert_close(steered(split), steered(reference), **FP32_TOL)

    sae = make_sae("model.layers.2").to(last)
    encoded = [encode_prompt(lm, sae, "model.layers.2", TEXTS[1], top_k=3) for lm in (split, reference)]
    assert [[x["index"] for x in t["latents"]] for t in encoded[0]] == [
        [x["index"] for x in t["latents"]] for t in encoded[1]
    ]
    metrics = [ce_loss_metrics(lm, sae, "model.layers.2", TEXTS) for lm in (split, reference)]
    for key in ("ce_loss_clean", "ce_loss_sae", "ce_loss_zero_ablated"):
        assert metrics[0][key] == pytest.approx(metrics[1][key], rel=1e-4), key


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
@pytest.mark.parametrize(("quantization", "dtype"), [("8bit", "fp16"), ("4bit", "bf16")])
def test_quantized_models_take_hooks(
    tiny_llama_dir: Path, quantization: str, dtype: str, tmp_path: Path
) -> None:
    """Quantized weights, activations in ``dtype``: capture and SAE steering work on them."""
    lm = load_model(
        str(tiny_llama_dir), device="cuda:0", dtype=dtype, quantization=quantization, store_root=tmp_path
    )
    rows = captured(lm, tmp_path)
    assert all(torch.isfinite(r).all() and r.abs().sum() > 0 for r in rows.values())
    assert torch.isfinite(steered(lm)).all()


@pytest.mark.parametrize(("gpus", "expected"), [("0", 1), ("none", 0)])
def test_a_worker_sees_only_the_gpus_it_owns(gpus: str, expected: int) -> None:
    """``KESTREL_WORKER_GPUS`` in a fresh process: CUDA starts with only those GPUs visible."""
    probe = (
        "from kestrel.core.loading import parse_gpu_ids\n"
        "from kestrel.workers.worker import own_gpus\n"
        f"own_gpus(parse_gpu_ids({gpus!r}))\n"
        "import torch; print(torch.cuda.device_count())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip().splitlines()[-1]) == expected
