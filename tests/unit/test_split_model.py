"""A model split across devices computes what the whole one does.

On a CPU-only machine the split goes through the same machinery as a multi-GPU one: the tiny
Llama loads with a ``device_map`` dict that keeps some blocks on the CPU and offloads the others
to disk, so accelerate dispatches it (an ``AlignDevicesHook`` on every module, offloaded weights
on the ``meta`` device between forwards, read back for each block). Every consumer of a hook's
tensor must then find the layer's execution device itself: a consumer that asked the layer's
weights where to compute would get ``meta``. What must hold: captures, SAE steering, SAE encoding
and the SAE's model-in-the-loop metrics equal the unsplit model's, within float32 tolerance.
``tests/unit/test_gpu.py`` runs the same with real GPUs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from kestrel.core import loading
from kestrel.core.activations import capture
from kestrel.core.devices import layer_device, model_devices
from kestrel.core.errors import InvalidInputError
from kestrel.core.loading import LoadConfig, parse_device_map, parse_gpu_ids
from kestrel.core.models import forward, load_model
from kestrel.core.run_reader import iter_row_batches
from kestrel.core.runs import CaptureOptions
from kestrel.core.sae import SAEConfig, create
from kestrel.core.sae.artifacts import encode_prompt
from kestrel.core.sae.model_eval import ce_loss_metrics
from kestrel.core.sae.records import SAEManifest
from kestrel.core.steering import (
    LatentEdit,
    SteeringConfig,
    compile_plan,
    sae_on_layer_device,
    steered_forward,
)
from kestrel.core.store import LocalStore

LAYERS = ["model.layers.0", "model.layers.1", "model.layers.2.mlp"]
TEXTS = ["The cat sat on the mat.", "Rivers run to the sea, and the sea is never full.", "Hi"]
#: Block 0 stays on the CPU; blocks 1 and 2, the final norm and the head live on disk and are
#: read back for each forward (their weights sit on ``meta`` in between).
SPLIT = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "disk",
    "model.norm": "disk",
    "lm_head": "disk",
}


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama_dir: Path) -> Path:
    return tiny_llama_dir


@pytest.fixture(scope="module")
def whole(tiny_dir: Path):
    return load_model(str(tiny_dir), device="cpu")


@pytest.fixture(scope="module")
def split(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("split-store")  # offloaded blocks go under <root>/offload
    return load_model(str(tiny_dir), device="cpu", device_map=SPLIT, store_root=root)


def publish_sae(store: LocalStore, sae, sae_id: str) -> None:
    """Put ``sae`` in the store as training would (its layer and model recorded)."""
    from kestrel.core.sae import io as sae_io

    with store.writer("saes", sae_id) as writer:
        sae_io.save_sae(sae, writer.directory, metrics={})
        config = sae.config.model_dump(mode="json")
        writer.commit({"id": sae_id, "layer": sae.config.layer, "model": "tiny", "config": config})


def make_sae(layer: str = "model.layers.1", seed: int = 0):
    sae = create(
        SAEConfig(d_in=32, n_latents=64, k=4, layer=layer), generator=torch.Generator().manual_seed(seed)
    )
    with torch.no_grad():
        sae.b_enc.fill_(0.1)  # some latents fire on random inputs
    return sae.eval().requires_grad_(False)


def test_the_split_model_is_dispatched_with_offloaded_blocks(split) -> None:
    """The premise of every test below: accelerate runs the model, and blocks 1-2 keep no weights
    on a real device between forwards."""
    offloaded = split.model.get_submodule("model.layers.1.mlp.up_proj")
    assert hasattr(split.model, "_hf_hook") and offloaded.weight.device.type == "meta"
    assert layer_device(split, "model.layers.1") == torch.device("cpu")  # its execution device
    assert layer_device(split, "model.layers.2.mlp") == torch.device("cpu")
    assert split.device == torch.device("cpu") and model_devices(split.model) == ["cpu"]
    assert split.placement is not None and split.placement.key().startswith("map:{")
    # transformers reads safetensors blocks back from the checkpoint itself; the folder (under the
    # store root, living as long as the model) takes any other weights accelerate offloads
    offload = Path(split._offload.name)
    assert offload.is_dir() and offload.parent.name == "offload"


def test_the_split_model_has_the_same_layer_table_and_logits(whole, split) -> None:
    assert [(i.name, i.width) for i in split.layers] == [(i.name, i.width) for i in whole.layers]
    torch.testing.assert_close(forward(split, TEXTS).logits_BTV, forward(whole, TEXTS).logits_BTV)


def test_the_split_model_captures_the_same_activations(whole, split, tmp_path: Path) -> None:
    options = CaptureOptions(dtype="fp32", token_budget=64)  # several batches; exact storage
    runs = {}
    for name, lm in (("whole", whole), ("split", split)):
        store = LocalStore(tmp_path / name)
        manifest = capture(lm, TEXTS, LAYERS, store, run_id="run", options=options)
        runs[name] = (store, manifest)
    assert runs["split"][1].n_tokens == runs["whole"][1].n_tokens > 10
    for layer in LAYERS:
        got = [
            torch.cat([b.acts_ND for b in iter_row_batches(store, "run", layer)])
            for store, _ in runs.values()
        ]
        assert got[0].shape == got[1].shape and got[0].abs().sum() > 0
        torch.testing.assert_close(got[1], got[0], rtol=1e-5, atol=1e-5)


def test_steering_a_split_model_with_an_sae_gives_the_same_output(whole, split) -> None:
    sae = make_sae()
    summary = SAEManifest(id="s", layer=sae.config.layer, config=sae.config.model_dump(mode="json"))
    config = SteeringConfig(sae_id="s", edits=[LatentEdit(latent=3, op="clamp", value=8.0)])
    outputs = []
    for lm in (whole, split):
        plan = compile_plan(config, lm, load_sae=lambda _id, lm=lm: sae_on_layer_device(lm, sae, summary))
        outputs.append(steered_forward(lm, TEXTS, plan).logits_BTV)
    torch.testing.assert_close(outputs[1], outputs[0])
    unsteered = forward(whole, TEXTS).logits_BTV
    assert (outputs[0] - unsteered).abs().max() > 1e-3  # the edit did something


def test_an_sae_encodes_and_is_evaluated_the_same_on_a_split_model(whole, split) -> None:
    sae = make_sae("model.layers.2")
    encoded = [encode_prompt(lm, sae, "model.layers.2", TEXTS[1], top_k=3) for lm in (whole, split)]
    assert any(token["latents"] for token in encoded[0])
    for mine, theirs in zip(encoded[1], encoded[0], strict=True):
        assert [x["index"] for x in mine["latents"]] == [x["index"] for x in theirs["latents"]]
        assert [x["value"] for x in mine["latents"]] == pytest.approx(
            [x["value"] for x in theirs["latents"]], rel=1e-4, abs=1e-5
        )
    metrics = [ce_loss_metrics(lm, sae, "model.layers.2", TEXTS) for lm in (whole, split)]
    assert metrics[1]["n_spliced_positions"] == metrics[0]["n_spliced_positions"] > 0
    for key in ("ce_loss_clean", "ce_loss_sae", "ce_loss_zero_ablated", "kl_sae"):
        assert metrics[1][key] == pytest.approx(metrics[0][key], rel=1e-4, abs=1e-6), key


def test_causal_and_circuit_analyses_agree_on_a_split_model(whole, split, tmp_path: Path) -> None:
    """Ablation (layers, and SAE latents: mean pass, error-preserving clamp) and activation
    patching read and edit blocks 1-2, which the split model runs from disk-offloaded weights."""
    from kestrel.core.analysis import get_results, run_analysis

    store = LocalStore(tmp_path / "store")
    publish_sae(store, make_sae("model.layers.1"), "split-sae")
    dataset = {"kind": "texts", "texts": TEXTS}
    pair = {
        "clean": "The animal is a cat",
        "corrupted": "The animal is a dog",
        "correct": " yes",
        "wrong": " no",
    }
    requests = [
        {"kind": "causal", "layers": ["model.layers.0.mlp", "model.layers.2"], "dataset": dataset},
        {"kind": "causal", "sae_id": "split-sae", "latents": [0, 3, 7], "dataset": dataset},
        {
            "kind": "circuit",
            "pairs": [pair],
            "layers": ["model.layers.0", "model.layers.2.mlp"],
            "method": "patching",  # and the AtP* estimate beside it: gradients through offloaded blocks
        },
    ]
    for request in requests:
        results = [
            get_results(store, run_analysis(store, request, model_loader=lambda *_, lm=lm: lm))
            for lm in (whole, split)
        ]
        if request["kind"] == "causal":
            assert results[1]["clean_loss"] == pytest.approx(results[0]["clean_loss"], rel=1e-5)
            for mine, theirs in zip(results[1]["ranking"], results[0]["ranking"], strict=True):
                assert mine["target"] == theirs["target"]
                for method, figures in theirs["methods"].items():
                    assert mine["methods"][method]["kl"] == pytest.approx(figures["kl"], rel=1e-3, abs=1e-6)
        else:
            for key in ("patched_logit_diff", "estimated_fraction_restored"):
                np.testing.assert_allclose(results[1][key], results[0][key], atol=1e-5)


def test_discovery_over_a_dataset_agrees_on_a_split_model(whole, split, tmp_path: Path) -> None:
    """Streaming discovery (masks beside the inputs, activations on the layer's device) and logit
    effects, which read the offloaded head and final norm directly rather than running them."""
    from kestrel.core.concepts import discover
    from kestrel.core.concepts.store import FeatureReader

    names = ("top_values", "top_rows", "fire_count", "logit_pos_ids", "logit_pos_values")
    tables = []
    for lm in (whole, split):
        store = LocalStore(tmp_path / lm.placement.key().replace("/", "_")[:40])
        publish_sae(store, make_sae("model.layers.2"), "split-sae")
        discover(store, "split-sae", lm, dataset=TEXTS * 4, config={"top_n": 4, "window": 2})
        tables.append(FeatureReader(store, "split-sae").full(*names))
    assert tables[0]["fire_count"].sum() > 0 and tables[0]["logit_pos_values"].abs().sum() > 0
    assert torch.equal(tables[1]["fire_count"], tables[0]["fire_count"])
    assert torch.equal(tables[1]["logit_pos_ids"], tables[0]["logit_pos_ids"])
    for name in ("top_values", "logit_pos_values"):
        torch.testing.assert_close(tables[1][name], tables[0][name], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The load configuration


@pytest.mark.parametrize(
    ("device_map", "message"),
    [
        ({}, "empty"),
        ({"model.layers.0/../x": "cpu"}, "module path"),
        ({"model.layers.0": "tpu"}, "cpu, disk"),
        ({"model.layers.0": -1}, ">= 0"),
    ],
)
def test_a_bad_device_map_is_refused_by_name(device_map, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        LoadConfig(device_map=device_map)


def test_the_placement_key_ignores_dict_order_and_names_quantization() -> None:
    a = LoadConfig(device_map={"lm_head": 1, "model": 0})
    b = LoadConfig(device_map={"model": 0, "lm_head": 1})
    assert a.key() == b.key() == 'map:{"lm_head":1,"model":0}'
    assert LoadConfig(device="cuda:0", quantization="4bit").key() == "cuda:0+4bit"
    assert LoadConfig(device="cpu").key() == "cpu" and not LoadConfig(device="cpu").split


def test_device_maps_and_gpu_lists_as_an_operator_writes_them() -> None:
    assert parse_device_map(" auto ") == "auto" and parse_device_map("") is None
    assert parse_device_map('{"model": 0, "lm_head": "cuda:1"}') == {"model": 0, "lm_head": "cuda:1"}
    for bad in ("[0, 1]", "{model: 0}", '{"model": "gpu"}'):
        with pytest.raises(InvalidInputError):
            parse_device_map(bad)
    assert parse_gpu_ids("0, 1") == "0,1" and parse_gpu_ids("none") == "" and parse_gpu_ids("") is None
    with pytest.raises(InvalidInputError):
        parse_gpu_ids("0;1")


def test_a_missing_package_names_the_extra_to_install(monkeypatch, tiny_dir: Path) -> None:
    real = loading.importlib.util.find_spec
    monkeypatch.setattr(
        loading.importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else real(name)
    )
    with pytest.raises(InvalidInputError, match=r"quantization='8bit' needs bitsandbytes.*kestrel\[gpu\]"):
        load_model(str(tiny_dir), device="cpu", quantization="8bit")


# ---------------------------------------------------------------------------------------------
# A worker's settings and model cache


def test_a_killed_workers_offload_folders_are_swept(tmp_path: Path) -> None:
    """Offloaded weights of a worker that was SIGKILLed are removed by the next split load on the
    host; a live process's folder and another host's are kept."""
    import socket
    import subprocess
    import sys

    from kestrel.core.devices import offload_folder

    host = socket.gethostname().replace("-", "_")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    scratch = tmp_path / "offload"
    stale = scratch / f"{host}-{dead.pid}-abc"
    live = scratch / f"{host}-{os.getpid()}-def"
    elsewhere = scratch / f"otherhost-{dead.pid}-ghi"
    for folder in (stale, live, elsewhere):
        folder.mkdir(parents=True)
        (folder / "weights.dat").write_bytes(b"x" * 64)
    fresh = offload_folder(scratch)
    assert not stale.exists() and live.is_dir() and elsewhere.is_dir()
    assert Path(fresh.name).parent == scratch
    fresh.cleanup()


def test_the_model_cache_keeps_a_split_and_a_whole_copy_apart(tiny_dir: Path, tmp_path: Path) -> None:
    from kestrel.workers.model_cache import ModelCache

    cache = ModelCache(
        tmp_path, default_device="cpu", device_map=SPLIT, local_models=lambda: {"tiny": tiny_dir}
    )
    split_lm = cache.get("tiny")  # a job that names no device: the worker's device map
    assert split_lm.placement.device_map == SPLIT and split_lm.name == "tiny"
    whole_lm = cache.get("tiny", device="cpu", dtype="fp32")  # a job that names a device: unsplit
    assert whole_lm is not split_lm and whole_lm.placement.device_map is None
    assert {key[1] for key in cache._models} == {"cpu", cache.placement(None, "fp32").key()}
    assert [m["device"] for m in cache.describe()] == ["cpu", "cpu"]


def test_worker_settings_for_gpus_and_placement(monkeypatch) -> None:
    from kestrel.settings import Settings

    monkeypatch.setenv("KESTREL_WORKER_GPUS", "2,3")
    monkeypatch.setenv("KESTREL_DEVICE_MAP", '{"model": 0, "lm_head": 1}')
    monkeypatch.setenv("KESTREL_MODEL_DTYPE", "bf16")
    settings = Settings()
    assert settings.worker_gpus == "2,3" and settings.device_map == {"model": 0, "lm_head": 1}
    assert settings.model_dtype == "bf16" and settings.quantization == "none"
    monkeypatch.setenv("KESTREL_DEVICE_MAP", '{"model": "gpu"}')
    with pytest.raises(ValueError, match="cpu, disk"):
        Settings()


def test_a_worker_owns_its_gpus_before_cuda_starts(monkeypatch) -> None:
    from kestrel.workers.worker import own_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    own_gpus(None)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"  # unset: every GPU it was given
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("CUDA is up in this process: own_gpus refuses to change it (tested below)")
    own_gpus("2,3")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3" and os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    own_gpus("")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""  # 'none': no GPU at all


def test_the_worker_command_refuses_a_bad_gpu_list_before_starting(monkeypatch) -> None:
    from cli_runner import invoke

    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")  # never reached
    result = invoke("worker", "--queue", "batch", "--gpus", "0;1")
    assert result.exit_code == 2 and "worker GPUs '0;1'" in result.output


def test_a_worker_without_bitsandbytes_refuses_to_start_quantized(monkeypatch) -> None:
    from cli_runner import invoke

    from kestrel.settings import get_settings

    real = loading.importlib.util.find_spec
    monkeypatch.setattr(
        loading.importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else real(name)
    )
    monkeypatch.setenv("KESTREL_QUANTIZATION", "4bit")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")  # never reached
    get_settings.cache_clear()
    try:
        result = invoke("worker", "--queue", "batch")
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2 and "kestrel[gpu]" in result.output
