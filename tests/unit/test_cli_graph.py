"""`kestrel analyze graph` end to end on a tiny local Llama: capture an MLP's input and output with
the CLI, train a transcoder with `train --target-layer`, draw the graph, test a node with
`analyze intervene`; and a transcoder that is not one, refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_runner import invoke

MLP = "model.layers.0.mlp"


@pytest.fixture
def store_root(tmp_path: Path, model_cache_root: Path) -> Path:
    root = tmp_path / "store"
    root.mkdir()
    (root / "models").symlink_to(model_cache_root / "models", target_is_directory=True)
    return root


def cli_json(*args: str) -> dict:
    """Run a command with --json; its JSON (after any progress bar output)."""
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{") :])


def test_analyze_graph_over_a_cli_trained_transcoder(store_root: Path, tiny_llama_dir: Path) -> None:
    store, model = ("--store", str(store_root)), ("--model", str(tiny_llama_dir))
    texts = [a for i in range(24) for a in ("--text", f"Sentence {i} about rivers, hills and the weather.")]
    run_id = cli_json(
        "capture", "--layer", f"{MLP}:input", "--layer", MLP, *texts, *model, "--device", "cpu", *store
    )["id"]
    trained = cli_json(
        "train", run_id, "--layer", f"{MLP}:input", "--target-layer", MLP, "--n-latents", "32", "--k", "4",
        "--batch-size", "64", "--sae-id", "tc-block0", *store,
    )  # fmt: skip
    assert trained["id"] == "tc-block0"

    graph = cli_json(
        "analyze", "graph", "The capital of France is", "-t", "tc-block0", "--node-keep", "1.0",
        *model, "--device", "cpu", *store,
    )  # fmt: skip
    assert graph["kind"] == "graph" and graph["source"]["blocks"] == [0]
    numbers = graph["key_numbers"]
    assert 0.0 <= numbers["replacement"] <= 1.0 and 0.0 <= numbers["completeness"] <= 1.0
    assert numbers["features_kept"] > 0  # unpruned: block 0's active features are shown
    report = Path(graph["report"]).read_text(encoding="utf-8")
    assert "replacement score" in report and (Path(graph["report"]).parent / "plots" / "graph.png").exists()

    # test its strongest feature on the real model: ablated, and set to twice its activation
    results = json.loads((Path(graph["report"]).parent / "results.json").read_text(encoding="utf-8"))
    node = max((n for n in results["nodes"] if n["kind"] == "feature"), key=lambda n: n["activation"])
    tested = cli_json(
        "analyze", "intervene", graph["id"], "--edit", f"{node['id']}=0", "--top-k", "3",
        "--max-new-tokens", "2", "--device", "cpu", *store,
    )  # fmt: skip
    assert tested["target"]["token"] == results["target"]["token"] and len(tested["top_after"]) == 3
    assert tested["edits"][0]["activation_after"] == 0.0 and tested["continuation_after"] is not None
    shown = invoke(
        "analyze", "intervene", graph["id"], "--value-edit", f"{node['id']}={2 * node['activation']}",
        "--device", "cpu", *store,
    )  # fmt: skip
    assert shown.exit_code == 0 and node["id"] in shown.output and "target" in shown.output, shown.output
    malformed = invoke("analyze", "intervene", graph["id"], "--edit", node["id"], *store)
    assert malformed.exit_code == 2 and "expected NODE=SCALE" in malformed.output
    not_a_node = invoke("analyze", "intervene", graph["id"], "--edit", "T_0=0", *store)
    assert not_a_node.exit_code == 2 and "is a token node" in not_a_node.output

    plain = invoke(
        "train", run_id, "--layer", MLP, "--n-latents", "32", "--k", "4", "--sae-id", "plain", *store
    )
    assert plain.exit_code == 0, plain.output
    refused = invoke("analyze", "graph", "The cat", "-t", "plain", *model, "--device", "cpu", *store)
    assert (
        refused.exit_code == 2 and "not a transcoder" in refused.output and "Traceback" not in refused.output
    )
