"""The concept and steering commands end to end: capture, train, discover, features, label,
concepts import/export/set, steer, steering list/show/delete (SmolLM2 from the shared cache)."""

from __future__ import annotations

import json

import pytest
from cli_runner import invoke


def json_out(result) -> object:
    text = result.stdout
    start = min(i for i in (text.find("{"), text.find("[")) if i >= 0)
    return json.loads(text[start:])


@pytest.fixture(scope="module")
def sae_store(tmp_path_factory, model_cache_root, smollm):
    """A store with a small SAE on SmolLM2's layer 2 (made through the CLI)."""
    root = tmp_path_factory.mktemp("cli") / "store"
    root.mkdir()
    (root / "models").symlink_to(model_cache_root / "models", target_is_directory=True)
    texts = [f"Sentence {i} is about {('pasta', 'goals', 'stars')[i % 3]} and more." for i in range(45)]
    args = [a for t in texts for a in ("--text", t)]
    store = ("--store", str(root))
    assert (
        invoke("capture", "-l", "model.layers.2", *args, "--run-id", "r", "--device", "cpu", *store).exit_code
        == 0
    )
    result = invoke(
        "train", "r", "-l", "model.layers.2", "--n-latents", "64", "--k", "4", "--batch-size", "128",
        "--sae-id", "cli-sae", *store,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return root


def test_discover_features_label_and_dictionary(sae_store, tmp_path) -> None:
    store = ("--store", str(sae_store))
    result = invoke(
        "discover", "cli-sae", "--device", "cpu", "--top-n", "5", "--window", "3", *store, "--json"
    )
    assert result.exit_code == 0, result.output
    manifest = json_out(result)
    assert manifest["source"] == {"kind": "run", "run_id": "r"} and manifest["config"]["top_n"] == 5
    listing = json_out(invoke("features", "cli-sae", "--sort", "density", "--limit", "3", *store, "--json"))
    assert listing["total"] == 64 and len(listing["items"]) == 3
    latent = listing["items"][0]["latent"]
    page = invoke("features", "cli-sae", "--latent", str(latent), *store)
    assert page.exit_code == 0 and f"latent {latent}" in page.stdout and "promotes:" in page.stdout
    assert invoke("concepts", "set", "cli-sae", str(latent), "Pasta", "--tag", "food", *store).exit_code == 0
    labelled = json_out(invoke("label", "cli-sae", *store, "--json"))
    assert labelled["labelled"] > 1
    found = json_out(invoke("features", "cli-sae", "--search", "pasta", *store, "--json"))
    assert latent in [item["latent"] for item in found["items"]]
    out = tmp_path / "names.csv"
    assert invoke("concepts", "export", "cli-sae", "-o", str(out), *store).exit_code == 0
    assert out.read_text().splitlines()[0] == "latent,name,description,tags,source"
    bad = tmp_path / "bad.csv"
    bad.write_text("latent,name\n3,ok\n64,too far\n")
    result = invoke("concepts", "import", "cli-sae", str(bad), *store)
    assert result.exit_code == 2 and "line 3: latent 64 is out of range" in " ".join(result.output.split())
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"n_latents": 64, "concepts": [{"latent": 1, "name": "One"}]}))
    assert invoke("concepts", "import", "cli-sae", str(good), "--replace", *store).exit_code == 0
    exported = json.loads(invoke("concepts", "export", "cli-sae", *store).stdout)
    assert [c["latent"] for c in exported["concepts"]] == [1]


def _densest(sae_store, n: int) -> list[int]:
    """The ``n`` densest latents of ``cli-sae`` (discovered first when a test runs alone)."""
    store = ("--store", str(sae_store))
    if invoke("features", "cli-sae", *store, "--json").exit_code != 0:
        assert invoke("discover", "cli-sae", "--device", "cpu", *store).exit_code == 0
    listing = json_out(
        invoke("features", "cli-sae", "--sort", "density", "--limit", str(n), *store, "--json")
    )
    return [item["latent"] for item in listing["items"]]


def _scoring_args(sae_store, n: int) -> tuple[list[str], list[str]]:
    """``--latent`` options for the ``n`` densest latents and scoring options small enough for
    the tiny store."""
    latents = [a for latent in _densest(sae_store, n) for a in ("--latent", str(latent))]
    small = ["--example-ctx-len", "4", "--n-train", "1", "--n-contrast", "1", "--n-test", "2"]
    small += ["--n-non-activating", "2", "--n-calibration", "1", "--n-quantiles", "2"]
    return latents, small


def test_label_with_scores_and_list_them_by_score(sae_store) -> None:
    store = ("--store", str(sae_store))
    latents, small = _scoring_args(sae_store, 4)
    result = invoke(
        "label", "cli-sae", *latents, "--score", "--overwrite", "--device", "cpu", *small, *store, "--json"
    )
    assert result.exit_code == 0, result.output
    scoring = json_out(result)["scoring"]
    assert scoring["scored"] == 4 and scoring["scorer"] == "smollm2-135m"
    listed = json_out(invoke("concepts", "list", "cli-sae", "--sort", "detection", *store, "--json"))
    values = [
        c["scores"]["detection"] for c in listed if c["scores"] and c["scores"]["detection"] is not None
    ]
    assert values and values == sorted(values, reverse=True)
    table = invoke("concepts", "list", "cli-sae", "--sort", "detection", *store)
    assert table.exit_code == 0 and "detection" in table.stdout and "smollm2-135m" in table.stdout
    bad = invoke("concepts", "list", "cli-sae", "--sort", "nonsense", *store)
    assert bad.exit_code != 0 and "--sort" in bad.output


def test_a_scorer_of_another_vocabulary_reads_the_examples_text(sae_store, tmp_path) -> None:
    """--scorer names a local model whose tokenizer is not SmolLM2's: it reads each example's text
    (SmolLM2's ids would index past its 300-token vocabulary), and the scores keep that text."""
    from tiny_models import other_vocab_llama

    model, tokenizer = other_vocab_llama(
        [f"Sentence {i} is about pasta and goals and stars." for i in range(9)]
    )
    scorer_dir = tmp_path / "other-vocab"
    model.save_pretrained(scorer_dir)
    tokenizer.save_pretrained(scorer_dir)
    store = ("--store", str(sae_store))
    latents, small = _scoring_args(sae_store, 2)
    scorer = ("--scorer", str(scorer_dir))
    result = invoke(
        "label", "cli-sae", *latents, "--score", *scorer, "--device", "cpu", *small, *store, "--json"
    )
    assert result.exit_code == 0, result.output
    assert json_out(result)["scoring"]["scored"] == 2
    listed = json_out(invoke("concepts", "list", "cli-sae", *store, "--json"))
    ours = [c for c in listed if c["scores"] and c["scores"]["scorer"] == str(scorer_dir)]
    assert len(ours) == 2
    shown = ["".join(e["tokens"]) for c in ours for e in c["scores"]["examples"]]
    assert shown and any(word in text for text in shown for word in ("Sentence", "about", "pasta"))


def test_steer_side_by_side_save_list_show_delete(sae_store) -> None:
    store = ("--store", str(sae_store))
    [alive] = _densest(sae_store, 1)  # a relative edit needs a latent that fired in discovery
    other = 5 if alive != 5 else 6
    result = invoke(
        "steer", "-p", "The weather today", "--sae", "cli-sae",
        "-e", f"{alive}:clamp:4x", "-e", f"{other}:scale:0",
        "--max-new-tokens", "5", "--top-latents", "2", "--save", "--device", "cpu", *store, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = json_out(result)
    item = out["items"][0]
    assert len(item["steered"]["tokens"]) == 5 and out["config_id"].startswith("steer-")
    assert out["warnings"] == []
    listed = json_out(invoke("steering", "list", *store, "--json"))
    assert [r["id"] for r in listed] == [out["config_id"]]
    shown = json_out(invoke("steering", "show", out["config_id"], *store))
    assert [t["latent"] for t in shown["touches"]] == [alive, other]
    assert shown["touches"][0]["absolute_value"] == pytest.approx(4 * shown["touches"][0]["max_activation"])
    far_edit = f"{alive}:clamp:{1000 * shown['touches'][0]['max_activation']}"
    far = invoke("steer", "-p", "x", "--sae", "cli-sae", "-e", far_edit,
                 "--max-new-tokens", "1", "--device", "cpu", *store)  # fmt: skip
    assert far.exit_code == 0 and "warning: edits[0]: clamp" in " ".join(far.stderr.split())
    again = invoke("steer", "-p", "The weather today", "--config", out["config_id"], "--max-new-tokens", "5",
                   "--device", "cpu", *store, "--json")  # fmt: skip
    assert json_out(again)["items"][0]["steered"]["text"] == item["steered"]["text"]
    bad = invoke("steer", "-p", "x", "--sae", "cli-sae", "-e", "99:clamp:1", *store)
    assert bad.exit_code == 2 and "edits[0]: latent 99 is out of range" in " ".join(bad.output.split())
    bad = invoke("steer", "-p", "x", "--sae", "cli-sae", "-e", "3:boost:1", *store)
    assert bad.exit_code == 2 and "edits.0.op" in bad.output
    by_direction = invoke(
        "steer", "-p", "The weather today", "--sae", "cli-sae", "-d", "model.layers.1:6:3",
        "--max-new-tokens", "3", "--device", "cpu", *store, "--json",
    )  # fmt: skip
    assert by_direction.exit_code == 0, by_direction.output
    assert len(json_out(by_direction)["items"][0]["steered"]["token_ids"]) == 3
    assert invoke("steering", "delete", out["config_id"], *store).exit_code == 0
    assert json_out(invoke("steering", "list", *store, "--json")) == []


def test_saes_neuronpedia_writes_the_bulk_import_zip(sae_store, tmp_path) -> None:
    import zipfile

    store = ("--store", str(sae_store))
    discovered = invoke("discover", "cli-sae", "--device", "cpu", "--top-n", "3", "--window", "3", *store)
    assert discovered.exit_code == 0, discovered.output
    out = tmp_path / "np.zip"
    args = ("saes", "neuronpedia", "cli-sae", "-o", str(out), "--source-set", "res-64", "--no-bins")
    args = (*args, "--latent")
    result = invoke(*args, "1", "--latent", "2", "--device", "cpu", *store)
    assert result.exit_code == 0, result.output
    with zipfile.ZipFile(out) as archive:
        names = archive.namelist()
    assert any(n.endswith("/2-res-64/features/batch-0.jsonl.gz") for n in names), names
    again = invoke(*args, "1", "--device", "cpu", *store)
    assert again.exit_code == 2 and "--force" in again.output  # never overwrites without --force


def test_steer_sweep_table_json_and_bounds(sae_store) -> None:
    store = ("--store", str(sae_store))
    [alive] = _densest(sae_store, 1)
    args = ("steer", "sweep", "--sae", "cli-sae", "-l", str(alive), "-p", "The weather today",
            "-s", "0", "-s", "4", "-k", "weather", "--max-new-tokens", "4",
            "--device", "cpu", *store)  # fmt: skip
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    out = json_out(result)
    zero, strong = out["points"]
    assert zero["items"][0]["token_ids"] == out["baseline"]["items"][0]["token_ids"]
    assert strong["absolute_value"] == pytest.approx(4 * out["max_activation"])
    assert out["verdict"] and out["keywords"] == ["weather"]
    table = invoke(*args)
    assert table.exit_code == 0 and "unsteered" in table.stdout and out["verdict"][:20] in table.stdout
    many = [a for s in range(13) for a in ("-s", str(s))]
    bad = invoke("steer", "sweep", "--sae", "cli-sae", "-l", str(alive), "-p", "x", *many, *store)
    assert bad.exit_code == 2 and "strengths" in bad.output
    assert invoke("steer", *store).exit_code == 2  # no prompt and no subcommand


def test_scoring_flags_without_score_are_refused_not_ignored(sae_store) -> None:
    store = ("--store", str(sae_store))
    for flags, named in [
        (["--scorer", "smollm2-135m"], "--scorer"),
        (["--run", "r"], "--run"),
        (["--n-test", "4"], "--n-test"),
    ]:
        result = invoke("label", "cli-sae", *flags, *store)
        assert result.exit_code != 0 and named in result.output and "--score" in result.output, result.output
