"""The kestrel CLI end to end: real model (from the shared cache), real store, real files."""

from __future__ import annotations

import json

import pytest
from cli_runner import invoke

from kestrel.core.catalog import DEFAULT_MODEL


@pytest.fixture
def store_root(tmp_path, model_cache_root, smollm):
    """A fresh store whose models/ points at the shared converted-weights cache."""
    root = tmp_path / "store"
    root.mkdir()
    (root / "models").symlink_to(model_cache_root / "models", target_is_directory=True)
    return root


def test_models_and_layers(store_root) -> None:
    result = invoke("models", "--store", str(store_root), "--json")
    assert result.exit_code == 0
    bundled = json.loads(result.stdout)[0]
    assert bundled["name"] == DEFAULT_MODEL and bundled["cached"] is True and bundled["installed"] is True
    result = invoke("layers", DEFAULT_MODEL, "--kind", "block", "--store", str(store_root), "--json")
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == [f"model.layers.{i}" for i in range(30)]
    assert {r["width"] for r in rows} == {576}


def test_capture_list_show_delete(store_root, tmp_path) -> None:
    data = tmp_path / "notes.csv"
    data.write_text("id,body\n1,The first note is short.\n2,The second note is a little longer than that.\n")
    result = invoke(
        "capture",
        "--layer",
        "model.layers.2",
        "--file",
        str(data),
        "--text-field",
        "body",
        "--run-id",
        "notes",
        "--device",
        "cpu",
        "--store",
        str(store_root),
        "--json",
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["id"] == "notes" and manifest["n_docs"] == 2 and manifest["n_tokens"] > 10
    listed = json.loads(invoke("runs", "list", "--store", str(store_root), "--json").stdout)
    assert [m["id"] for m in listed] == ["notes"]
    assert (
        json.loads(invoke("runs", "show", "notes", "--store", str(store_root)).stdout)["dataset"]["kind"]
        == "file"
    )
    assert invoke("runs", "delete", "notes", "--store", str(store_root)).exit_code == 0
    assert json.loads(invoke("runs", "list", "--store", str(store_root), "--json").stdout) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layer", "model.layer.15", "--text", "hi"], "did you mean 'model.layers.15'"),
        (["--layer", "model.layers.1", "--text", "hi", "--max-length", "0"], "max_length must be > 0"),
        (["--layer", "model.layers.1", "--file", "/no/such/file.jsonl"], "not found"),
        (["--layer", "model.layers.1"], "give exactly one dataset"),
        (["--layer", "model.layers.1", "--text", "hi", "--model", "nobody/nothing"], "not in the local"),
    ],
)
def test_errors_are_one_line_and_exit_2(store_root, args, message) -> None:
    result = invoke("capture", *args, "--device", "cpu", "--store", str(store_root))
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_version() -> None:
    from importlib.metadata import version

    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout == f"kestrel {version('kestrel')}\n"


def test_train_eval_list_delete(store_root) -> None:
    texts = [f"Sentence number {i} about rivers, mountains and weather." for i in range(40)]
    args = [a for t in texts for a in ("--text", t)]
    result = invoke(
        "capture",
        "--layer",
        "model.layers.2",
        *args,
        "--device",
        "cpu",
        "--store",
        str(store_root),
        "--json",
    )
    assert result.exit_code == 0, result.output
    run_id = json.loads(result.stdout[result.stdout.index("{") :])["id"]
    # A generated id is long (run-<timestamp>-<hex>): an 80-column table prints it whole.
    listed = invoke("runs", "list", "--store", str(store_root), env={"COLUMNS": "80"})
    created = json.loads(invoke("runs", "list", "--store", str(store_root), "--json").stdout)[0]["created"]
    assert {run_id, "model.layers.2", created} <= set(listed.stdout.split()) and "…" not in listed.stdout
    config = store_root.parent / "train.json"
    config.write_text(
        json.dumps(
            {
                "sae": {"k": 8, "normalize_input": False},
                "train": {"batch_size": 256, "lr_decay_fraction": 0.5, "seed": 3},
            }
        )
    )
    result = invoke(
        "train",
        run_id,
        "--layer",
        "model.layers.2",
        "--n-latents",
        "64",
        "--k",
        "4",
        "--config",
        str(config),
        "--batch-size",
        "128",
        "--sae-id",
        "tiny-sae",
        "--store",
        str(store_root),
        "--json",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["status"] == "complete" and summary["config"]["n_latents"] == 64
    # the file's fields apply, and a flag beats the file (k, batch size)
    trained = summary["train_config"]
    assert summary["config"]["k"] == 4 and summary["config"]["normalize_input"] is False
    assert trained["batch_size"] == 128 and trained["lr_decay_fraction"] == 0.5 and trained["seed"] == 3
    result = invoke("eval", "tiny-sae", "--device", "cpu", "--store", str(store_root), "--json")
    assert result.exit_code == 0, result.output
    assert "ce_loss_recovered" in json.loads(result.stdout[result.stdout.index("{") :])
    listed = json.loads(invoke("saes", "list", "--store", str(store_root), "--json").stdout)
    assert [s["id"] for s in listed] == ["tiny-sae"]
    table = invoke("saes", "list", "--store", str(store_root), env={"COLUMNS": "40"})
    assert {"tiny-sae", "model.layers.2", "complete"} <= set(table.stdout.split()) and "…" not in table.stdout
    bad = invoke("train", run_id, "--layer", "model.layers.2", "--k", "0", "--store", str(store_root))
    assert bad.exit_code == 2 and "k" in bad.output
    assert invoke("saes", "delete", "tiny-sae", "--store", str(store_root)).exit_code == 0


def test_gc_removes_a_crashed_writers_staging_and_keeps_published(tmp_path) -> None:
    import os

    from kestrel.core.store import LocalStore

    store = LocalStore(tmp_path / "s")
    with store.writer("analyses", "kept") as writer:
        writer.commit({"id": "kept"})
    crashed = store.writer("analyses", "crashed")  # never committed: a writer that died
    old = crashed.directory.stat().st_mtime - 2 * 3600
    os.utime(crashed.directory, (old, old))
    result = invoke("gc", "--store", str(tmp_path / "s"), "--older-than-hours", "1")
    assert result.exit_code == 0 and "1 leftover(s) removed" in result.stdout
    assert not crashed.directory.exists() and store.list("analyses") == ["kept"]


def test_edit_values_ending_in_x_count_max_activations() -> None:
    from kestrel.cli.steering import _parse_edit
    from kestrel.core.errors import InvalidInputError

    assert _parse_edit("1234:clamp:3x", 0) == {
        "latent": 1234,
        "op": "clamp",
        "value": 3.0,
        "unit": "max_activation",
    }
    assert _parse_edit("12:add:-0.5", 0) == {"latent": 12, "op": "add", "value": -0.5, "unit": "absolute"}
    with pytest.raises(InvalidInputError, match="VALUE a number"):
        _parse_edit("12:clamp:x", 0)


def test_train_stream_sweeps_k_on_two_layers_in_one_pass(store_root) -> None:
    texts = [f"Sentence number {i} about rivers, mountains and weather." for i in range(40)]
    args = [a for t in texts for a in ("--text", t)]
    common = ["--layer", "model.layers.1", "--layer", "model.layers.2", *args, "--n-latents", "64"]
    result = invoke(
        "train-stream",
        *common,
        "--sweep-k",
        "4,8",
        "--batch-size",
        "64",
        "--spill-run-id",
        "cli-spill",
        "--device",
        "cpu",
        "--store",
        str(store_root),
        "--json",
    )
    assert result.exit_code == 0, result.output
    summaries = json.loads(result.stdout)
    assert [(s["layer"], s["config"]["k"], s["status"]) for s in summaries] == [
        ("model.layers.1", 4, "complete"),
        ("model.layers.1", 8, "complete"),
        ("model.layers.2", 4, "complete"),
        ("model.layers.2", 8, "complete"),
    ]
    assert {s["run_id"] for s in summaries} == {"cli-spill"}
    cpu = ["--batch-size", "64", "--device", "cpu", "--store", str(store_root)]
    table = invoke("train-stream", *common, *cpu)  # the table a person reads
    assert table.exit_code == 0, table.output
    assert "held-out FVU" in table.stdout and table.stdout.count("complete") == 2  # one SAE per layer
    bad = invoke("train-stream", *common, "--sweep-k", "4,x", "--store", str(store_root))
    assert bad.exit_code == 2 and "--sweep-k" in bad.output


def test_train_stream_trains_mlp_transcoders_of_listed_blocks(store_root) -> None:
    texts = [f"Sentence number {i} about rivers, mountains and weather." for i in range(40)]
    args = [a for t in texts for a in ("--text", t)]
    common = [*args, "--n-latents", "32", "--k", "4", "--batch-size", "64", "--device", "cpu"]
    result = invoke("train-stream", "--mlp-transcoders", "0-1", *common, "--store", str(store_root), "--json")
    assert result.exit_code == 0, result.output
    summaries = json.loads(result.stdout)
    assert [(s["layer"], s["target_layer"], s["kind"]) for s in summaries] == [
        (f"model.layers.{b}.mlp:input", f"model.layers.{b}.mlp", "transcoder") for b in (0, 1)
    ]
    for bad, message in [
        ("99", "no MLP in block(s) [99]"),
        ("a-b", "'a-b' is not a block"),
        ("3-1", "'3-1' is not a block"),
    ]:
        refused = invoke("train-stream", "--mlp-transcoders", bad, *common, "--store", str(store_root))
        assert refused.exit_code != 0 and message in refused.output, refused.output
    neither = invoke("train-stream", *common, "--store", str(store_root))
    assert neither.exit_code != 0 and "--mlp-transcoders" in neither.output
