"""``kestrel saes ledger`` and ``kestrel saes compare`` on a real store with a tiny local model."""

from __future__ import annotations

import json
from pathlib import Path

from cli_runner import invoke

from kestrel.core.activations import capture
from kestrel.core.runs import CaptureOptions
from kestrel.core.sae import artifacts

LAYER = "model.layers.1"
TOPICS = ["cooking pasta with garlic", "a football match", "stars and galaxies"]


def test_ledger_from_a_labelled_file_then_show_and_compare(tiny_lm, store, tiny_llama_dir, tmp_path: Path):
    texts = [f"{TOPICS[i % 3]}, told again, {i}." * 2 for i in range(60)]
    run = capture(tiny_lm, texts, [LAYER], store, options=CaptureOptions(dtype="fp32")).id
    for sae_id, k in (("s4", 4), ("s8", 8)):
        artifacts.train_from_run(
            store, run, LAYER, {"n_latents": 64, "k": k}, {"batch_size": 128}, sae_id=sae_id
        )
    data = tmp_path / "topics.csv"
    data.write_text("text,topic\n" + "".join(f"{TOPICS[i % 3]} {i},{i % 3}\n" for i in range(24)))
    root = str(store.local_root)
    quick = ["--absorption-words", "200", "--synthetic-rows", "4096", "--eval-texts", "4", "--ks", "1,2"]
    args = ["saes", "ledger", "s4", "--data", str(data), "--label-field", "topic", *quick]
    computed = invoke(*args, "--model", str(tiny_llama_dir), "--device", "cpu", "--store", root, "--json")
    assert computed.exit_code == 0, computed.output
    ledger = json.loads(computed.output[computed.output.index("{") :])
    assert ledger["entries"]["sparse_probing_top_2"]["settings"]["classes"] == 3
    shown = invoke("saes", "ledger", "s4", "--show", "--store", root)
    assert shown.exit_code == 0 and "sparse_probing_top_1" in shown.output and "chance" in shown.output
    missing = invoke("saes", "ledger", "s8", "--show", "--store", root)
    assert missing.exit_code != 0 and "no ledger yet" in missing.output
    compared = invoke("saes", "compare", "s4", "s8", "--store", root, "--json")
    rows = json.loads(compared.output)
    assert [r["id"] for r in rows] == ["s4", "s8"] and rows[0]["has_ledger"] and not rows[1]["has_ledger"]
    table = invoke("saes", "compare", "s4", "s8", "--store", root)
    assert table.exit_code == 0 and "pareto" in table.output
    bad = invoke("saes", "ledger", "s4", "--data", str(data), "--label-field", "nope", "--store", root)
    assert bad.exit_code != 0 and "no field 'nope'" in bad.output
