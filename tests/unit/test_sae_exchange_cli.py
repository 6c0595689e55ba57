"""``kestrel saes import`` and ``kestrel saes export``: real store, real files, no model needed."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from cli_runner import invoke
from safetensors.torch import load_file, save_file

D, N = 8, 24
WIDE = {"COLUMNS": "1000"}  # error lines hold temporary paths: no wrapping inside them


def _saelens_dir(directory: Path) -> dict[str, torch.Tensor]:
    """A TopK SAE saved as SAELens 6.x does, trained on inputs scaled by 0.5 (not yet folded)."""
    g = torch.Generator().manual_seed(0)
    weights = {
        "W_enc": torch.randn(D, N, generator=g),
        "b_enc": torch.randn(N, generator=g) * 0.1,
        "W_dec": torch.randn(N, D, generator=g),
        "b_dec": torch.randn(D, generator=g) * 0.1,
    }
    directory.mkdir(parents=True)
    save_file(weights, directory / "sae_weights.safetensors")
    cfg = {
        "architecture": "topk",
        "d_in": D,
        "d_sae": N,
        "k": 3,
        "dtype": "float32",
        "normalize_activations": "expected_average_only_in",
        "metadata": {
            "sae_lens_version": "6.54.12",
            "model_name": "gpt2",
            "hook_name": "blocks.0.hook_resid_pre",
        },
    }
    (directory / "cfg.json").write_text(json.dumps(cfg))
    return weights


def _words(output: str) -> str:
    """The output with the console's line wrapping undone."""
    return " ".join(output.split())


def test_import_export_and_import_again(tmp_path: Path) -> None:
    store = tmp_path / "store"
    weights = _saelens_dir(tmp_path / "lens")
    missing = invoke("saes", "import", str(tmp_path / "lens"), "--store", str(store), env=WIDE)
    assert missing.exit_code == 2 and "norm_scaling_factor" in _words(missing.output)

    args = ("--norm-scaling-factor", "0.5", "--model", "smollm2-135m", "--layer", "model.layers.0")
    result = invoke(
        "saes", "import", str(tmp_path / "lens"), *args, "--sae-id", "lens", "--store", str(store), "--json"
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["id"] == "lens" and summary["imported_from"] == "saelens"
    assert summary["config"]["input_scale"] == 0.5 and summary["layer"] == "model.layers.0"

    out = tmp_path / "exported"
    result = invoke("saes", "export", "lens", "--format", "saelens", "-o", str(out), "--store", str(store))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["normalize_activations"] == "none"  # the factor is in the weights now
    assert cfg["metadata"]["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    exported = load_file(out / "sae_weights.safetensors")
    torch.testing.assert_close(exported["W_enc"], weights["W_enc"] * 0.5)  # SAELens's fold
    torch.testing.assert_close(exported["W_dec"], weights["W_dec"] / 0.5)

    again = invoke(
        "saes", "export", "lens", "--format", "saelens", "-o", str(out), "--store", str(store), env=WIDE
    )
    assert again.exit_code == 2 and "pass --force to replace it" in _words(again.output)

    zipped = tmp_path / "lens-sparsify.zip"
    result = invoke("saes", "export", "lens", "-f", "sparsify", "-o", str(zipped), "--store", str(store))
    assert result.exit_code == 0, result.output
    result = invoke("saes", "import", str(zipped), "--store", str(store), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["imported_from"] == "sparsify"

    nowhere = invoke("saes", "import", str(tmp_path / "nowhere.zip"), "--store", str(store), env=WIDE)
    assert nowhere.exit_code == 2 and "nowhere.zip does not exist" in _words(nowhere.output)
    listed = json.loads(invoke("saes", "list", "--store", str(store), "--json").stdout)
    assert len(listed) == 2
