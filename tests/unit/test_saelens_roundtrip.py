"""SAEs round-trip through the real sae-lens package, in its own virtualenv.

sae-lens pins transformer-lens and friends, so it does not live in Kestrel's environment:
``make saelens-venv`` builds ``.venv-saelens`` (reusing this environment's torch), and
``KESTREL_SAELENS_PYTHON`` may name another interpreter. Without one the test skips, saying so.
The sae-lens side runs in a subprocess (tests/unit/saelens_worker.py); nothing of it is
imported here.

Both directions are checked on the same inputs: Kestrel's exports (topk, standard = relu_l1,
jumprelu, and batchtopk as a jumprelu) loaded with ``SAE.load_from_disk`` encode as Kestrel
does; SAEs built and saved by sae-lens (topk with and without rescale_acts_by_decoder_norm,
standard with and without b_dec at the input, jumprelu with per-latent thresholds, and
expected_average_only_in with its scaling factor from activation_scaler.json or given) import
into Kestrel and encode as SAELens defines them. Transcoders too: a Kestrel batchtopk
skip-transcoder loads as SAELens's JumpReLUSkipTranscoder and predicts alike, and SAELens's
transcoder, skip_transcoder and jumprelu_skip_transcoder import and predict as SAELens's do.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kestrel.core.catalog import cache_complete, cache_dir
from kestrel.core.sae import SAE, SAEConfig, create
from kestrel.core.sae.exchange import files_from_directory, model_metadata, sae_from_files
from kestrel.core.sae.saelens import export_saelens, import_saelens
from kestrel.core.sae.sparsify import sparsify_files

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("saelens_worker.py")
SAELENS_VERSION = "6.54.12"
D_IN, D_SAE = 12, 40  # as saelens_worker.py
D_OUT = 9  # the transcoders' output width, as saelens_worker.py
SCALING_FACTOR = 0.37


def saelens_python() -> Path | None:
    """``$KESTREL_SAELENS_PYTHON`` when set (only it), else the venv ``make saelens-venv`` builds,
    else the shared one on the development machine."""
    named = os.environ.get("KESTREL_SAELENS_PYTHON")
    candidates = (
        [Path(named)]
        if named
        else [ROOT / ".venv-saelens/bin/python", Path("/work/.saelens-venv/bin/python")]
    )
    return next((candidate for candidate in candidates if candidate.is_file()), None)


def _kestrel_sae(architecture: str, seed: int) -> SAE:
    fields = {"k": 5} if architecture in ("topk", "batchtopk") else {}
    config = SAEConfig(
        architecture=architecture,
        d_in=D_IN,
        n_latents=D_SAE,
        model="smollm2-135m",
        layer="model.layers.3",
        **fields,
    )
    sae = create(config, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        sae.W_dec.mul_(0.5 + torch.rand(D_SAE, 1, generator=g))  # as a folded input scale leaves them
        sae.b_enc.copy_(torch.randn(D_SAE, generator=g) * 0.2)
        sae.b_dec.copy_(torch.randn(D_IN, generator=g) * 0.3)
        if architecture == "batchtopk":
            sae.threshold.fill_(0.3)
        if architecture == "jumprelu":
            sae.threshold.copy_(torch.rand(D_SAE, generator=g) * 0.6)
    return sae.eval()


def _kestrel_skip_transcoder(seed: int) -> SAE:
    """A batchtopk skip-transcoder with non-trivial weights (exported as jumprelu_skip_transcoder)."""
    config = SAEConfig(
        architecture="batchtopk",
        d_in=D_IN,
        n_latents=D_SAE,
        k=5,
        model="smollm2-135m",
        layer="model.layers.3.mlp:input",
        target_layer="model.layers.3.mlp",
        d_out=D_OUT,
        skip=True,
    )
    sae = create(config, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(D_SAE, generator=g) * 0.2)
        sae.b_dec.copy_(torch.randn(D_OUT, generator=g) * 0.3)
        sae.W_skip.copy_(torch.randn(D_OUT, D_IN, generator=g) * 0.2)
        sae.threshold.fill_(0.3)
    return sae.eval()


def _write(directory: Path, files: dict[str, bytes]) -> None:
    directory.mkdir(parents=True)
    for name, payload in files.items():
        (directory / name).write_bytes(payload)


def _dense(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        enc = sae.encode(x)
    return torch.zeros(x.shape[0], sae.n_latents).scatter_add(1, enc.indices, enc.acts)


def _assert_encodes_alike(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    """Agreement to 1e-5 relative: elementwise, against the largest activation (float32 sums in
    another order differ by a few ulps, ~1e-7 relative); the same latents active."""
    assert ours.shape == theirs.shape, what
    assert torch.equal(ours > 0, theirs > 0), f"{what}: different latents active"
    scale = float(theirs.abs().max())
    assert scale > 0, f"{what}: nothing active, the comparison would prove nothing"
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * scale, msg=what)


@pytest.fixture(scope="module")
def roundtrip(tmp_path_factory: pytest.TempPathFactory, model_cache_root: Path) -> tuple[Path, torch.Tensor]:
    python = saelens_python()
    if python is None:
        named = os.environ.get("KESTREL_SAELENS_PYTHON")
        where = f"KESTREL_SAELENS_PYTHON={named} does not exist" if named else "no sae-lens virtualenv"
        pytest.skip(f"{where}: run `make saelens-venv` (or set KESTREL_SAELENS_PYTHON)")
    workdir = tmp_path_factory.mktemp("saelens")
    x = torch.randn(24, D_IN, generator=torch.Generator().manual_seed(0)) * 1.5
    save_file({"x": x}, workdir / "x.safetensors")
    for seed, architecture in enumerate(("topk", "relu_l1", "jumprelu", "batchtopk")):
        sae = _kestrel_sae(architecture, seed)
        metadata = model_metadata(sae.config.model, model_cache_root)
        export_saelens(sae, workdir / "kestrel" / architecture, metadata=metadata)
        if architecture == "topk":  # the one architecture sparsify runs
            _write(workdir / "kestrel_sparsify" / architecture, sparsify_files(sae))
        save_file({"encoded": _dense(sae, x)}, workdir / f"kestrel-{architecture}.safetensors")
    transcoder = _kestrel_skip_transcoder(7)
    export_saelens(transcoder, workdir / "kestrel" / "skip_transcoder")
    with torch.no_grad():
        predicted = transcoder(x).reconstruction
    save_file(
        {"encoded": _dense(transcoder, x), "decoded": predicted},
        workdir / "kestrel-skip_transcoder.safetensors",
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # sae-lens's side stands alone
    done = subprocess.run(
        [str(python), str(WORKER), str(workdir)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**env, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"},
        check=False,
    )
    assert done.returncode == 0, f"saelens_worker.py failed:\n{done.stderr[-4000:]}"
    return workdir, x


def test_the_installed_sae_lens_is_the_version_checked(roundtrip) -> None:
    workdir, _ = roundtrip
    assert json.loads((workdir / "loaded.json").read_text())["sae_lens_version"] == SAELENS_VERSION


@pytest.mark.parametrize(
    ("architecture", "saelens_class"),
    [
        ("topk", "TopKSAE"),
        ("relu_l1", "StandardSAE"),
        ("jumprelu", "JumpReLUSAE"),
        ("batchtopk", "JumpReLUSAE"),
    ],
)
def test_kestrel_exports_load_in_sae_lens_and_encode_alike(
    roundtrip, model_cache_root: Path, architecture: str, saelens_class: str
):
    workdir, _ = roundtrip
    encoded = load_file(workdir / "encoded.safetensors")
    ours = load_file(workdir / f"kestrel-{architecture}.safetensors")["encoded"]
    _assert_encodes_alike(ours, encoded[f"kestrel/{architecture}"], architecture)
    loaded = json.loads((workdir / "loaded.json").read_text())[architecture]
    assert loaded["class"] == saelens_class
    metadata = loaded["metadata"]  # read as 6.x: kept, not replaced by pre-6.0 defaults
    assert metadata["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert metadata["model_class_name"] == "AutoModelForCausalLM"
    assert metadata["hook_name"] == "model.layers.3"
    if cache_complete(cache_dir(model_cache_root, "smollm2-135m")):  # its tokenizer is here
        assert metadata["prepend_bos"] is False  # SmolLM2's tokenizer adds no BOS
    else:
        assert "prepend_bos" not in metadata  # unknown, so not claimed


@pytest.mark.parametrize(
    ("name", "architecture"),
    [
        ("topk", "topk"),
        ("topk_rescaled", "topk"),
        ("standard", "relu_l1"),
        ("standard_no_b_dec_in", "relu_l1"),
        ("jumprelu", "jumprelu"),
        ("topk_expected_average", "topk"),
        ("jumprelu_expected_average", "jumprelu"),
    ],
)
def test_sae_lens_saes_import_and_encode_alike(roundtrip, name: str, architecture: str):
    workdir, x = roundtrip
    directory = workdir / "saelens" / name
    given = SCALING_FACTOR if name == "jumprelu_expected_average" else None  # no scaler file beside it
    sae = import_saelens(directory, norm_scaling_factor=given)
    assert sae.config.architecture == architecture
    encoded = load_file(workdir / "encoded.safetensors")
    _assert_encodes_alike(_dense(sae, x), encoded[f"saelens/{name}"], name)
    with torch.no_grad():
        decoded = sae(x).reconstruction
    reference = encoded[f"saelens/{name}/decoded"]
    torch.testing.assert_close(decoded, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
    cfg = json.loads((directory / "cfg.json").read_text())
    assert sae.config.model == "gpt2" and sae.config.layer == cfg["metadata"]["hook_name"]
    assert sae.config.l1_coefficient is None and sae.config.l0_coefficient is None
    if "expected_average" in name:
        assert sae.config.input_scale == pytest.approx(SCALING_FACTOR) and sae.config.normalize_input
    else:
        assert sae.config.input_scale is None and sae.config.normalize_input is None


def test_the_same_files_import_through_the_generic_reader(roundtrip):
    workdir, x = roundtrip
    files = files_from_directory(workdir / "saelens" / "topk_expected_average")
    assert "activation_scaler.json" in files
    sae, layout = sae_from_files(files)
    assert layout == "saelens"
    encoded = load_file(workdir / "encoded.safetensors")
    _assert_encodes_alike(_dense(sae, x), encoded["saelens/topk_expected_average"], "generic reader")


def _require_sparsify(workdir: Path) -> None:
    if json.loads((workdir / "loaded.json").read_text())["sparsify_version"] is None:
        pytest.skip(
            "eai-sparsify is not installed in the sae-lens virtualenv (make saelens-venv installs it)"
        )


def test_kestrel_topk_exports_load_in_sparsify_and_encode_alike(roundtrip):
    workdir, _ = roundtrip
    _require_sparsify(workdir)
    encoded = load_file(workdir / "encoded.safetensors")
    ours = load_file(workdir / "kestrel-topk.safetensors")["encoded"]
    _assert_encodes_alike(ours, encoded["kestrel_sparsify/topk"], "sparsify topk")


def test_sparsify_saes_import_and_encode_alike(roundtrip):
    workdir, x = roundtrip
    _require_sparsify(workdir)
    sae, layout = sae_from_files(files_from_directory(workdir / "sparsify" / "topk"))
    assert layout == "sparsify" and sae.config.k == 5 and sae.config.architecture == "topk"
    encoded = load_file(workdir / "encoded.safetensors")
    _assert_encodes_alike(_dense(sae, x), encoded["sparsify/topk"], "sparsify import")


def test_kestrel_skip_transcoder_loads_in_sae_lens_and_predicts_alike(roundtrip):
    workdir, _ = roundtrip
    encoded = load_file(workdir / "encoded.safetensors")
    ours = load_file(workdir / "kestrel-skip_transcoder.safetensors")
    _assert_encodes_alike(ours["encoded"], encoded["kestrel/skip_transcoder"], "skip-transcoder latents")
    reference = encoded["kestrel/skip_transcoder/decoded"]
    assert reference.shape[1] == D_OUT
    torch.testing.assert_close(
        ours["decoded"], reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max())
    )
    loaded = json.loads((workdir / "loaded.json").read_text())["skip_transcoder"]
    assert loaded["class"] == "JumpReLUSkipTranscoder"
    assert loaded["metadata"]["hook_name_out"] == "model.layers.3.mlp"


@pytest.mark.parametrize(
    ("name", "architecture", "skip"),
    [
        ("transcoder", "relu_l1", False),
        ("skip_transcoder", "relu_l1", True),
        ("jumprelu_skip_transcoder", "jumprelu", True),
    ],
)
def test_sae_lens_transcoders_import_and_predict_alike(roundtrip, name: str, architecture: str, skip: bool):
    workdir, x = roundtrip
    sae = import_saelens(workdir / "saelens" / name)
    assert (sae.config.architecture, sae.config.skip, sae.config.d_out) == (architecture, skip, D_OUT)
    assert sae.config.kind == ("skip_transcoder" if skip else "transcoder")
    assert sae.config.target_layer == "blocks.3.hook_mlp_out"
    encoded = load_file(workdir / "encoded.safetensors")
    _assert_encodes_alike(_dense(sae, x), encoded[f"saelens/{name}"], name)
    with torch.no_grad():
        predicted = sae(x).reconstruction
    reference = encoded[f"saelens/{name}/decoded"]
    torch.testing.assert_close(predicted, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
