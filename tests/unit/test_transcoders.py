"""Transcoders: paired capture of a module's input and output in one run, training against the
target layer (plain and skip), the SAELens exchange of both, and the refusals where a transcoder
would be used as an SAE."""

from __future__ import annotations

import io
import zipfile

import pytest
import torch

from kestrel.core.activations import capture
from kestrel.core.errors import InvalidInputError, NotFoundError
from kestrel.core.models import LoadedModel
from kestrel.core.run_reader import RowBatch, iter_row_batches
from kestrel.core.runs import CaptureOptions, RowFilter, RunManifest, get_manifest
from kestrel.core.sae import artifacts, saelens
from kestrel.core.sae.base import create
from kestrel.core.sae.config import SAEConfig
from kestrel.core.sae.metrics import evaluate

MLP = "model.layers.1.mlp"
MLP_IN = f"{MLP}:input"
TOPICS = ["cooking pasta with garlic", "a football match", "stars and galaxies", "interest rates and bonds"]


def corpus(n: int) -> list[str]:
    return [
        f"Text {i} is about {TOPICS[i % 4]}." + " It goes on a little longer." * (i % 5) for i in range(n)
    ]


def rows_of(store, run_id: str, layer: str, **kwargs) -> RowBatch:
    return RowBatch.cat(list(iter_row_batches(store, run_id, layer, batch_size=100_000, **kwargs)))


@pytest.fixture(scope="module")
def paired_run(tiny_lm: LoadedModel, tmp_path_factory):
    """The tiny Llama's block-1 MLP, input and output, captured in one fp32 run."""
    from kestrel.core.store import LocalStore

    store = LocalStore(tmp_path_factory.mktemp("transcoders") / "store")
    options = CaptureOptions(dtype="fp32", shard_mb=0.05)
    manifest = capture(tiny_lm, corpus(160), [MLP, MLP_IN], store, run_id="paired", options=options)
    return store, manifest


def test_paired_capture_matches_a_manual_forward_hook(tiny_lm: LoadedModel, paired_run) -> None:
    store, manifest = paired_run
    assert list(manifest.layers) == [MLP_IN, MLP]  # the order they are seen in: input first
    assert manifest.layers[MLP_IN].hook == "input" and manifest.layers[MLP_IN].module == MLP
    assert manifest.layers[MLP].hook == "output" and manifest.layers[MLP].module is None
    assert len(manifest.shards) > 1  # several shards, each with both layers' rows
    inputs, outputs = rows_of(store, "paired", MLP_IN), rows_of(store, "paired", MLP)
    assert torch.equal(inputs.doc_index_N, outputs.doc_index_N)
    assert torch.equal(inputs.position_N, outputs.position_N)
    # the same rows by a plain torch hook on the module, one document at a time
    texts = corpus(160)
    seen: dict[str, torch.Tensor] = {}
    module = dict(tiny_lm.model.named_modules())[MLP]
    for doc in (0, 7, 93):
        seen.clear()
        handle = module.register_forward_hook(
            lambda _m, args, out: seen.update(x=args[0].detach(), y=out.detach())
        )
        try:
            ids = tiny_lm.tokenizer([texts[doc]], return_tensors="pt")
            with torch.no_grad():
                tiny_lm.model(**ids)
        finally:
            handle.remove()
        mine = inputs.doc_index_N == doc
        assert torch.allclose(inputs.acts_ND[mine], seen["x"][0], atol=1e-5, rtol=1e-4)
        assert torch.allclose(outputs.acts_ND[mine], seen["y"][0], atol=1e-5, rtol=1e-4)


def test_paired_reader_pairs_rows_and_filters_each_layer_on_its_median(paired_run) -> None:
    store, manifest = paired_run
    both = rows_of(store, "paired", MLP_IN, target_layer=MLP)
    d = manifest.layers[MLP].d
    assert both.acts_ND.shape[1] == manifest.layers[MLP_IN].d + d
    assert torch.equal(both.acts_ND[:, -d:], rows_of(store, "paired", MLP).acts_ND)
    tight = RowFilter(max_norm_multiple=1.0)  # keeps rows at most the median norm, per layer
    kept = rows_of(store, "paired", MLP_IN, target_layer=MLP, filters=tight)
    x_norms, y_norms = kept.acts_ND[:, :-d].norm(dim=1), kept.acts_ND[:, -d:].norm(dim=1)
    assert bool((x_norms <= manifest.layers[MLP_IN].norm_median).all())
    assert bool((y_norms <= manifest.layers[MLP].norm_median).all())
    assert 0 < len(kept) < len(both)
    with pytest.raises(NotFoundError, match="layer"):
        rows_of(store, "paired", MLP_IN, target_layer="model.layers.2.mlp")


def test_old_manifests_without_hook_fields_still_load(paired_run) -> None:
    store, manifest = paired_run
    raw = manifest.to_json()
    for record in raw["layers"].values():
        record.pop("hook", None)
        record.pop("module", None)
    old = RunManifest.model_validate(raw)
    assert old.layers[MLP_IN].hook == "output"  # what an old run meant: module outputs
    assert get_manifest(store, "paired").layers[MLP_IN].hook == "input"


def test_bad_layer_specs_are_named(tiny_lm: LoadedModel, store) -> None:
    with pytest.raises(InvalidInputError, match="suffix ':input'"):
        capture(tiny_lm, ["text"], [f"{MLP}:inpt"], store)
    with pytest.raises(NotFoundError):
        capture(tiny_lm, ["text"], ["model.layers.1.mpl:input"], store)


@pytest.mark.parametrize(("architecture", "skip"), [("topk", False), ("topk", True), ("batchtopk", True)])
def test_transcoder_trains_against_its_target(paired_run, architecture: str, skip: bool) -> None:
    store, manifest = paired_run
    sae_config = {"architecture": architecture, "n_latents": 128, "k": 8, "skip": skip}
    train = {"batch_size": 128, "epochs": 6, "seed": 0}
    sae_id = f"tc-{architecture}-{'skip' if skip else 'plain'}"
    summary = artifacts.train_from_run(
        store, "paired", MLP_IN, sae_config, train, sae_id=sae_id, target_layer=MLP
    )
    assert summary.kind == ("skip_transcoder" if skip else "transcoder")
    assert summary.target_layer == MLP and summary.layer == MLP_IN
    sae, _ = artifacts.load_sae(store, sae_id)
    assert sae.config.d_in == manifest.layers[MLP_IN].d and sae.config.d_out == manifest.layers[MLP].d
    assert tuple(sae.W_dec.shape) == (128, manifest.layers[MLP].d)
    assert hasattr(sae, "W_skip") == skip
    # the held-out FVU is of the MLP's output, recomputed by hand from the weights as saved
    heldout = rows_of(
        store, "paired", MLP_IN, target_layer=MLP, filters=RowFilter.recommended(), split="heldout"
    )
    d_in = sae.config.d_in
    x, y = heldout.acts_ND[:, :d_in], heldout.acts_ND[:, d_in:]
    with torch.no_grad():
        pred = sae(x).reconstruction
    by_hand = float((pred - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert summary.metrics["fvu"] == pytest.approx(by_hand, rel=1e-4, abs=1e-6)
    assert summary.metrics["fvu"] < 0.6  # it learnt the MLP (a constant prediction scores 1)
    identity = float((x - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert summary.metrics["fvu"] < identity  # and is no SAE of its input in disguise


def test_skip_transcoder_computes_latents_plus_skip(paired_run) -> None:
    store, _ = paired_run
    sae, _ = artifacts.load_sae(store, "tc-topk-skip")
    x = torch.randn(5, sae.config.d_in)
    enc = sae.encode(x)
    manual = sae.decode(enc.acts, enc.indices) + x @ sae.W_skip.T
    assert torch.allclose(sae(x).reconstruction, manual, atol=1e-5)
    assert float(sae.W_skip.abs().max()) > 0  # the skip term trained


def test_transcoder_config_rules() -> None:
    with pytest.raises(InvalidInputError, match="target_layer"):
        SAEConfig(d_in=8, n_latents=16, k=4, skip=True)
    with pytest.raises(InvalidInputError, match="topk or batchtopk"):
        SAEConfig(architecture="relu_l1", d_in=8, n_latents=16, target_layer="b", d_out=4)
    config = SAEConfig(d_in=8, n_latents=16, k=4, layer="a", target_layer="b", d_out=4)
    assert config.kind == "transcoder" and config.row_width == 12
    sae = create(config)
    with pytest.raises(InvalidInputError, match="side by side"):
        evaluate(sae, [torch.randn(10, 8)])


def test_training_refuses_bad_targets(paired_run) -> None:
    store, _ = paired_run
    config, train = {"n_latents": 64, "k": 4}, {"batch_size": 64}
    with pytest.raises(NotFoundError, match="layer"):
        artifacts.train_from_run(store, "paired", MLP_IN, config, train, target_layer="model.layers.9.mlp")
    with pytest.raises(InvalidInputError, match="another layer"):
        artifacts.train_from_run(store, "paired", MLP, config, train, target_layer=MLP)
    with pytest.raises(InvalidInputError, match="target_layer"):
        artifacts.train_from_run(store, "paired", MLP, {**config, "skip": True}, train)


@pytest.mark.parametrize("sae_id", ["tc-batchtopk-skip"])
def test_saelens_round_trip_of_a_skip_transcoder(paired_run, sae_id: str) -> None:
    store, _ = paired_run
    sae, _ = artifacts.load_sae(store, sae_id)
    files = zipfile.ZipFile(io.BytesIO(artifacts.export_sae_zip(store, sae_id, "saelens")))
    cfg = __import__("json").loads(files.read(saelens.SAELENS_CONFIG_FILE))
    assert cfg["architecture"] == "jumprelu_skip_transcoder"
    assert cfg["d_out"] == sae.config.d_out and cfg["apply_b_dec_to_input"] is False
    assert cfg["metadata"]["hook_name"] == MLP_IN and cfg["metadata"]["hook_name_out"] == MLP
    back = artifacts.import_saelens(
        store,
        files.read(saelens.SAELENS_CONFIG_FILE),
        files.read(saelens.SAELENS_WEIGHTS_FILE),
        sae_id="back",
    )
    assert back.kind == "skip_transcoder" and back.target_layer == MLP
    again, _ = artifacts.load_sae(store, "back")
    for name, tensor in sae.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    x = torch.randn(7, sae.config.d_in)
    assert torch.equal(again(x).reconstruction, sae(x).reconstruction)


def test_topk_transcoder_export_to_saelens_is_refused(paired_run) -> None:
    store, _ = paired_run
    with pytest.raises(InvalidInputError, match="batchtopk"):
        artifacts.export_sae_zip(store, "tc-topk-plain", "saelens")
    kestrel_zip = zipfile.ZipFile(io.BytesIO(artifacts.export_sae_zip(store, "tc-topk-plain", "kestrel")))
    assert "config.json" in kestrel_zip.namelist()


def test_encoding_a_transcoder_as_an_sae_is_refused(paired_run) -> None:
    store, _ = paired_run
    summary = artifacts.get_sae(store, "tc-topk-plain")
    with pytest.raises(InvalidInputError, match="transcoder"):
        summary.require_sae("steering")


def test_sigkill_mid_paired_capture_leaves_nothing_listed(store) -> None:
    """A paired capture is one RunWriter like any other: killed mid-pass, no run is visible."""
    import subprocess
    import sys
    from pathlib import Path

    from test_activations import KILL_SCRIPT

    from kestrel.core.runs import list_runs

    single = '["model.layers.1"]'
    assert single in KILL_SCRIPT
    script = KILL_SCRIPT.replace(single, f"[{MLP_IN!r}, {MLP!r}]").format(
        tests=str(Path(__file__).parents[1]), root=str(store.root)
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    staged = [p for p in (store.root / "activations").iterdir()]
    assert staged and all(p.name.startswith(".staging-") for p in staged)
    assert any((p / MLP_IN).is_dir() and (p / MLP).is_dir() for p in staged)  # both were being written
    assert list_runs(store) == [] and not store.exists("activations", "killed")


def test_cli_trains_a_skip_transcoder(paired_run) -> None:
    import json

    from cli_runner import invoke

    store, _ = paired_run
    args = ["train", "paired", "--layer", MLP_IN, "--target-layer", MLP, "--skip", "--n-latents", "32"]
    args += ["--k", "4", "--batch-size", "128", "--sae-id", "cli-tc", "--store", str(store.root), "--json"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["kind"] == "skip_transcoder" and summary["target_layer"] == MLP
    assert summary["config"]["d_out"] == 32 and summary["config"]["skip"] is True
    no_target = invoke("train", "paired", "--layer", MLP, "--skip", "--store", str(store.root))
    assert no_target.exit_code != 0 and "target_layer" in no_target.output


def test_a_stopped_skip_transcoder_resumes_to_the_uninterrupted_weights(paired_run) -> None:
    """Stop (checkpoint kept, nothing published), resume: the weights an uninterrupted run
    reaches, the target's scale restored from the checkpoint (a requeued job does the same)."""
    store, _ = paired_run
    config = {"n_latents": 32, "k": 4, "skip": True}
    train = {"batch_size": 128, "epochs": 2, "seed": 1, "checkpoint_every": 100}
    calls = {"n": 0}

    def stop_after_three() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    kwargs = {"target_layer": MLP}
    stopped = artifacts.train_from_run(
        store, "paired", MLP_IN, config, train, sae_id="tc-resumed", should_stop=stop_after_three, **kwargs
    )
    assert stopped.status == "stopped" and stopped.checkpoint
    assert not store.exists("saes", "tc-resumed")
    done = artifacts.train_from_run(
        store, "paired", MLP_IN, config, train, sae_id="tc-resumed", resume=True, **kwargs
    )
    whole = artifacts.train_from_run(store, "paired", MLP_IN, config, train, sae_id="tc-whole", **kwargs)
    a, _ = artifacts.load_sae(store, "tc-resumed")
    b, _ = artifacts.load_sae(store, "tc-whole")
    assert done.steps == whole.steps and a.config.output_scale == b.config.output_scale is not None
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4, msg=name)
