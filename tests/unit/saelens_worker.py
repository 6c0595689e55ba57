"""Runs inside the sae-lens virtualenv (never imported by the test suite): the SAELens side of
tests/unit/test_saelens_roundtrip.py.

    python saelens_worker.py WORKDIR

WORKDIR holds ``x.safetensors`` (inputs ``x`` [B, d_in]) and ``kestrel/<name>/`` SAEs that
Kestrel exported. This script

1. loads each ``kestrel/<name>`` with ``SAE.load_from_disk`` and encodes ``x``;
2. builds SAEs with sae-lens itself (random, non-trivial weights: decoder rows of varied norm,
   random biases and thresholds), saves them under ``saelens/<name>/`` with ``save_model`` and
   encodes ``x`` the way SAELens defines their meaning;

and writes every encoding to ``encoded.safetensors`` (keys ``kestrel/<name>``, ``saelens/<name>``)
and what it loaded to ``loaded.json`` (architecture, metadata, the version sae-lens reports).

When EleutherAI's sparsify is installed too, it does the same for ``kestrel_sparsify/<name>``
(``SparseCoder.load_from_disk``) and a ``SparseCoder`` it builds and saves under
``sparsify/topk`` (keys ``kestrel_sparsify/<name>``, ``sparsify/topk``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import sae_lens
import torch
from sae_lens import SAE
from safetensors.torch import load_file, save_file

D_IN, D_SAE = 12, 40
D_OUT = 9  # the transcoders' output width
SCALING_FACTOR = 0.37


def _randomise(sae: SAE, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=g) / D_IN**0.5)
        norms = 0.5 + 1.5 * torch.rand(D_SAE, 1, generator=g)  # far from unit norm
        w_dec = torch.randn(*sae.W_dec.shape, generator=g)  # [d_sae, d_out] for a transcoder
        sae.W_dec.copy_(w_dec / w_dec.norm(dim=1, keepdim=True) * norms)
        sae.b_enc.copy_(torch.randn(D_SAE, generator=g) * 0.2)
        sae.b_dec.copy_(torch.randn(*sae.b_dec.shape, generator=g) * 0.3)
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(D_SAE, generator=g) * 0.6)
        if hasattr(sae, "W_skip"):
            sae.W_skip.copy_(torch.randn(*sae.W_skip.shape, generator=g) * 0.2)


def _cfg(architecture: str, **fields) -> dict:
    return {
        "architecture": architecture,
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "metadata": {"model_name": "gpt2", "hook_name": "blocks.3.hook_resid_pre", "prepend_bos": True},
        **fields,
    }


def _transcoder_cfg(architecture: str) -> dict:
    cfg = _cfg(architecture, apply_b_dec_to_input=False, d_out=D_OUT)
    cfg["metadata"] = {**cfg["metadata"], "hook_name": "blocks.3.ln2.hook_normalized"}
    cfg["metadata"]["hook_name_out"] = "blocks.3.hook_mlp_out"
    return cfg


#: name -> (cfg, seed, activation_scaler.json written beside it?)
BUILT = {
    "topk": (_cfg("topk", k=5), 1, False),
    "topk_rescaled": (_cfg("topk", k=5, rescale_acts_by_decoder_norm=True), 2, False),
    "standard": (_cfg("standard"), 3, False),
    "standard_no_b_dec_in": (_cfg("standard", apply_b_dec_to_input=False), 4, False),
    "jumprelu": (_cfg("jumprelu"), 5, False),
    "topk_expected_average": (
        _cfg(
            "topk", k=5, rescale_acts_by_decoder_norm=True, normalize_activations="expected_average_only_in"
        ),
        6,
        True,
    ),
    "jumprelu_expected_average": (
        _cfg("jumprelu", normalize_activations="expected_average_only_in"),
        7,
        False,
    ),
    "transcoder": (_transcoder_cfg("transcoder"), 8, False),
    "skip_transcoder": (_transcoder_cfg("skip_transcoder"), 9, False),
    "jumprelu_skip_transcoder": (_transcoder_cfg("jumprelu_skip_transcoder"), 10, False),
}


def main(workdir: Path) -> None:
    x = load_file(workdir / "x.safetensors")["x"]
    encoded: dict[str, torch.Tensor] = {}
    loaded: dict[str, dict] = {"sae_lens_version": sae_lens.__version__}
    for path in sorted((workdir / "kestrel").iterdir()):
        sae = SAE.load_from_disk(str(path))
        with torch.no_grad():
            encoded[f"kestrel/{path.name}"] = sae.encode(x).contiguous()
            encoded[f"kestrel/{path.name}/decoded"] = sae(x).contiguous()
        loaded[path.name] = {
            "architecture": sae.cfg.architecture(),
            "class": type(sae).__name__,
            "metadata": {k: v for k, v in sae.cfg.metadata.to_dict().items() if _jsonable(v)},
        }
    for name, (cfg, seed, with_scaler) in BUILT.items():
        sae = SAE.from_dict(cfg)
        _randomise(sae, seed)
        target = workdir / "saelens" / name
        sae.save_model(target)
        if with_scaler:
            (target / "activation_scaler.json").write_text(
                json.dumps({"scaling_factor": SCALING_FACTOR, "has_whitening": False})
            )
        reference = SAE.load_from_disk(str(target))
        if cfg["normalize_activations"] == "expected_average_only_in":
            # What the factor means: SAELens folds it in (as its trainer and from_pretrained do).
            reference.fold_activation_norm_scaling_factor(SCALING_FACTOR)
        with torch.no_grad():
            encoded[f"saelens/{name}"] = reference.encode(x).contiguous()
            encoded[f"saelens/{name}/decoded"] = reference(x).contiguous()
    loaded["sparsify_version"] = _sparsify(workdir, x, encoded)
    save_file(encoded, workdir / "encoded.safetensors")
    (workdir / "loaded.json").write_text(json.dumps(loaded, indent=2))


def _sparsify(workdir: Path, x: torch.Tensor, encoded: dict[str, torch.Tensor]) -> str | None:
    """The sparsify legs, when the package is there; its version (None when it is not)."""
    try:
        from importlib.metadata import version

        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:
        return None

    def dense(coder: SparseCoder) -> torch.Tensor:
        with torch.no_grad():
            out = coder.encode(x)
        return torch.zeros(x.shape[0], coder.num_latents).scatter(-1, out.top_indices, out.top_acts)

    for path in sorted((workdir / "kestrel_sparsify").iterdir()):
        encoded[f"kestrel_sparsify/{path.name}"] = dense(SparseCoder.load_from_disk(path))
    coder = SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=5))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        coder.encoder.weight.copy_(torch.randn(D_SAE, D_IN, generator=g) / D_IN**0.5)
        coder.encoder.bias.copy_(torch.randn(D_SAE, generator=g) * 0.2)
        coder.W_dec.copy_(torch.randn(D_SAE, D_IN, generator=g))
        coder.b_dec.copy_(torch.randn(D_IN, generator=g) * 0.3)
    coder.save_to_disk(workdir / "sparsify" / "topk")
    encoded["sparsify/topk"] = dense(coder)
    return version("eai-sparsify")


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True


if __name__ == "__main__":
    main(Path(sys.argv[1]))
