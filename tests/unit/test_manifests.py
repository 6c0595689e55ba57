"""Typed manifests: what is on disk today loads, unknown fields pass through, each kind reads typed.

The dicts below are shaped exactly like the manifest.json files Kestrel has written (a capture, a
training capture, an import; a trained and an imported SAE; an analysis), so a change to a model
that would stop an existing store from loading fails here.
"""

from __future__ import annotations

import copy
import json

import pytest

from kestrel.core.analysis.records import AnalysisManifest, get_analysis, list_analyses
from kestrel.core.errors import InvalidInputError, NotFoundError
from kestrel.core.runs import RunManifest, get_manifest, list_runs
from kestrel.core.sae.records import (
    SAEManifest,
    get_sae,
    list_saes,
    require_loadable_model,
    training_configs,
)
from kestrel.core.store import LocalStore

CAPTURED_RUN = {
    "format_version": 1,
    "id": "run-captured",
    "kind": "activations",
    "created": "2026-11-23T19:37:42Z",
    "model": {
        "name": "smollm2-135m",
        "source": "bundled",
        "architecture": "LlamaForCausalLM",
        "model_type": "llama",
        "d_model": 576,
        "n_blocks": 30,
        "dtype": "fp32",
        "device": "cpu",
    },
    "layers": {
        "model.layers.3": {"d": 576, "kind": "block", "norm_median": 12.5},
        "model.layers.3.mlp": {"d": 576, "kind": "mlp", "norm_median": None},
    },
    "d_model": 576,
    "dtype": "fp16",
    "n_tokens": 300,
    "n_docs": 4,
    "shards": [{"name": "00000", "n_tokens": 256}, {"name": "00001", "n_tokens": 44}],
    "row_fields": {"token_id": "int32", "doc_index": "int32", "position": "int32"},
    "special_token_ids": [0, 1, 2],
    "bos_token_id": 1,
    "dataset": {"kind": "texts", "texts": "<4 inline texts, see docs.jsonl>", "limit": None},
    "options": {
        "max_length": 512,
        "token_budget": 8192,
        "max_batch_size": None,
        "dtype": "fp16",
        "drop_bos": False,
        "drop_special": False,
        "shard_mb": 64.0,
    },
    "capture_seconds": 1.234,
}

TRAINING_RUN = {
    **copy.deepcopy(CAPTURED_RUN),
    "id": "run-training",
    "model": {
        "name": "tiny-net",
        "source": "training",
        "architecture": "TinyNet",
        "model_type": None,
        "d_model": 16,
        "n_blocks": None,
        "dtype": "fp32",
        "device": "cpu",
        "loadable": False,
        "note": "a model of the user's own training loop",
    },
    "layers": {"blocks.0": {"d": 16, "kind": "block", "norm_median": 3.0}},
    "shards": [{"name": "00000", "n_tokens": 40, "step": 0}, {"name": "00001", "n_tokens": 40, "step": 50}],
    "dataset": {"kind": "training", "note": "batches of a training loop; see docs.jsonl"},
    "options": {
        "every_n_steps": 50,
        "rows_per_shard": 32,
        "max_rows_per_step": 40,
        "dtype": "fp32",
        "seed": 0,
    },
    "source": {
        "kind": "training",
        "framework": "lightning",
        "status": "interrupted",
        "error": "RuntimeError: boom",
        "every_n_steps": 50,
        "last_step_seen": 73,
    },
    "steps": [0, 50],
}

IMPORTED_RUN = {
    **copy.deepcopy(CAPTURED_RUN),
    "id": "run-imported",
    "model": {"name": "unknown", "source": "external", "loadable": False, "d_model": 32},
    "layers": {"resid.3": {"d": 32, "kind": "other", "norm_median": 1.5}},
    "special_token_ids": [],
    "bos_token_id": None,
    "dataset": {"kind": "upload", "upload_id": "upload-1", "filename": "acts.safetensors"},
    "options": {"dtype": "fp32", "shard_mb": 64.0},
    "import": {
        "tensors": {"x": "resid.3"},
        "row_fields": {},
        "synthetic_row_fields": ["token_id", "doc_index", "position"],
    },
}

TRAINED_SAE = {
    "id": "sae-trained",
    "status": "complete",
    "created": "2026-11-23T20:00:00Z",
    "model": "smollm2-135m",
    "run_id": "run-captured",
    "layer": "model.layers.3",
    "config": {"architecture": "topk", "d_in": 576, "n_latents": 4608, "k": 32, "model": "smollm2-135m"},
    "train_config": {"lr": None, "batch_size": 4096, "epochs": 1, "seed": 0},
    "metrics": {"fvu": 0.21, "l0": 32.0, "dead_fraction": 0.01, "all_rows": {"fvu": 0.4}},
    "steps": 500,
    "tokens": 2048000,
    "train_seconds": 81.5,
    "warnings": [],
}

# An import whose cfg.json names the model but not at the top level (older summaries) and no layer.
IMPORTED_SAE = {
    "id": "sae-imported",
    "status": "imported",
    "created": "2026-11-23T21:00:00Z",
    "model": None,
    "run_id": None,
    "layer": None,
    "config": {"architecture": "relu_l1", "d_in": 64, "n_latents": 256, "model": "gpt2", "layer": None},
    "metrics": {},
}

ANALYSIS = {
    "format_version": 1,
    "id": "analysis-1",
    "kind": "neuron",
    "title": "Neurons of model.layers.3",
    "created": "2026-11-23T22:15:00+00:00",
    "source": {"run_id": "run-captured", "layer": "model.layers.3", "model": "smollm2-135m", "d": 576},
    "config": {"kind": "neuron", "run_id": "run-captured", "layer": "model.layers.3"},
    "key_numbers": {"rows": 296, "dimensions": 576, "max_kurtosis": 41.5},
    "plots": ["moments", "kurtosis"],
    "files": ["results.json", "report.md", "plots/moments.png", "plots/kurtosis.png"],
    "seconds": 0.52,
}


def publish(store: LocalStore, kind: str, manifest: dict) -> None:
    with store.writer(kind, manifest["id"]) as writer:
        writer.commit(manifest)


def on_disk(store: LocalStore, kind: str, artifact_id: str) -> dict:
    return json.loads((store.artifact_dir(kind, artifact_id) / "manifest.json").read_text())


@pytest.fixture
def store(tmp_path) -> LocalStore:
    store = LocalStore(tmp_path / "store")
    for run in (CAPTURED_RUN, TRAINING_RUN, IMPORTED_RUN):
        publish(store, "activations", run)
    for sae in (TRAINED_SAE, IMPORTED_SAE):
        publish(store, "saes", sae)
    publish(store, "analyses", ANALYSIS)
    return store


@pytest.mark.parametrize("stored", [CAPTURED_RUN, TRAINING_RUN, IMPORTED_RUN], ids=lambda m: m["id"])
def test_every_kind_of_run_on_disk_loads_and_writes_back_unchanged(store, stored) -> None:
    manifest = get_manifest(store, stored["id"])
    assert isinstance(manifest, RunManifest)
    assert manifest.to_json() == stored, "the same keys and values as the file"
    assert json.loads(json.dumps(manifest.to_json())) == on_disk(store, "activations", stored["id"])


def test_a_captured_run_reads_typed(store) -> None:
    run = get_manifest(store, "run-captured")
    assert run.model.name == "smollm2-135m" and run.model.loadable and run.model.n_blocks == 30
    assert run.layer_width("model.layers.3") == 576 and run.layers["model.layers.3"].norm_median == 12.5
    assert run.layers["model.layers.3.mlp"].norm_median is None
    assert [(s.name, s.n_tokens, s.step) for s in run.shards] == [("00000", 256, None), ("00001", 44, None)]
    assert run.options.max_length == 512 and run.options.every_n_steps is None
    assert run.source is None and run.steps is None and run.import_ is None
    assert run.unloadable_model_reason() is None
    with pytest.raises(NotFoundError, match=r"model\.layers\.3"):
        run.layer_width("model.layers.33")


def test_training_and_imported_runs_read_typed_and_say_why_their_model_is_not_loadable(store) -> None:
    training = get_manifest(store, "run-training")
    assert training.source is not None and training.source.status == "interrupted"
    assert training.source.framework == "lightning" and training.steps == [0, 50]
    assert [s.step for s in training.shards] == [0, 50] and training.options.every_n_steps == 50
    assert "captured during training from the model 'tiny-net'" in training.unloadable_model_reason()
    imported = get_manifest(store, "run-imported")
    assert imported.import_ is not None and imported.import_.tensors == {"x": "resid.3"}
    assert imported.options.shard_mb == 64.0 and imported.options.max_length is None
    assert "imported from a file of the model 'unknown'" in imported.unloadable_model_reason()
    assert [run.id for run in list_runs(store)] == ["run-captured", "run-imported", "run-training"]
    assert all(isinstance(run, RunManifest) for run in list_runs(store))


def test_unknown_fields_pass_through_a_read_and_a_rewrite(store) -> None:
    future = copy.deepcopy(CAPTURED_RUN)
    future.update(id="run-future", format_version=2, lineage={"parent": "run-captured"})
    future["layers"]["model.layers.3"]["p99_norm"] = 40.0
    future["shards"][0]["sha256"] = "ab" * 32
    future["model"]["revision"] = "main"
    publish(store, "activations", future)
    run = get_manifest(store, "run-future")
    assert run.model_extra == {"lineage": {"parent": "run-captured"}}
    assert run.layers["model.layers.3"].model_extra == {"p99_norm": 40.0}
    assert run.to_json() == future

    sae = get_sae(store, "sae-trained")
    sae_dict = sae.to_json()
    sae_dict["reviewed_by"] = "someone"
    store.put_json("saes", "sae-trained", "manifest.json", sae_dict)
    reread = get_sae(store, "sae-trained")
    reread.metrics = {**reread.metrics, "model_in_the_loop": {"ce_loss_recovered": 0.9}}
    store.put_json("saes", "sae-trained", "manifest.json", reread.to_json())
    assert on_disk(store, "saes", "sae-trained") == {
        **TRAINED_SAE,
        "reviewed_by": "someone",
        "metrics": {**TRAINED_SAE["metrics"], "model_in_the_loop": {"ce_loss_recovered": 0.9}},
    }


def test_saes_read_typed(store) -> None:
    trained = get_sae(store, "sae-trained")
    assert isinstance(trained, SAEManifest) and trained.to_json() == TRAINED_SAE
    assert trained.n_latents == 4608 and trained.steps == 500 and trained.metrics["fvu"] == 0.21
    assert trained.model_and_layer() == ("smollm2-135m", "model.layers.3")
    imported = get_sae(store, "sae-imported")
    assert imported.status == "imported" and imported.train_config is None and imported.warnings == []
    assert imported.model_name == "gpt2", "the config's model when the summary has none"
    with pytest.raises(InvalidInputError, match="does not record the layer") as raised:
        imported.model_and_layer()
    assert raised.value.details == {"sae_id": "sae-imported", "missing": ["layer"]}
    assert [sae.id for sae in list_saes(store)] == ["sae-imported", "sae-trained"]


def test_an_sae_of_an_unloadable_run_is_refused_before_a_model_is_loaded(store) -> None:
    require_loadable_model(store, get_sae(store, "sae-trained"))
    on_training_run = SAEManifest.model_validate({**TRAINED_SAE, "id": "sae-x", "run_id": "run-training"})
    with pytest.raises(InvalidInputError, match="cannot load") as raised:
        require_loadable_model(store, on_training_run)
    assert raised.value.details == {"sae_id": "sae-x", "run_id": "run-training"}


def test_analyses_read_typed(store) -> None:
    analysis = get_analysis(store, "analysis-1")
    assert isinstance(analysis, AnalysisManifest) and analysis.to_json() == ANALYSIS
    assert analysis.kind == "neuron" and analysis.plots == ["moments", "kurtosis"]
    assert analysis.key_numbers["max_kurtosis"] == 41.5 and analysis.seconds == 0.52
    older = {k: v for k, v in ANALYSIS.items() if k not in ("format_version", "files", "seconds")}
    publish(store, "analyses", {**older, "id": "analysis-0", "created": "2026-11-22T00:00:00+00:00"})
    assert [a.id for a in list_analyses(store)] == ["analysis-1", "analysis-0"], "newest first"
    assert get_analysis(store, "analysis-0").files == []


def test_training_configs_check_the_run_layer_and_width(store) -> None:
    sae, train, run = training_configs(
        store, "run-captured", "model.layers.3", {"n_latents": 64, "k": 4}, {"batch_size": 32}
    )
    assert (sae.d_in, sae.model, sae.layer, sae.run_id) == (
        576,
        "smollm2-135m",
        "model.layers.3",
        "run-captured",
    )
    assert train.batch_size == 32 and run.id == "run-captured" and sae.data == {}
    with pytest.raises(NotFoundError, match="layer"):
        training_configs(store, "run-captured", "model.layers.4", {"n_latents": 64, "k": 4}, {})
    with pytest.raises(NotFoundError):
        training_configs(store, "run-missing", "model.layers.3", {"n_latents": 64, "k": 4}, {})
    with pytest.raises(InvalidInputError, match="has width 576") as raised:
        training_configs(store, "run-captured", "model.layers.3", {"n_latents": 64, "k": 4, "d_in": 32}, {})
    assert raised.value.details == {"d_in": 32, "run_width": 576}
    with pytest.raises(InvalidInputError, match="n_latents"):
        training_configs(store, "run-captured", "model.layers.3", {"n_latents": 0, "k": 4}, {})
    with pytest.raises(InvalidInputError, match="invalid run id"):
        training_configs(store, "../etc", "model.layers.3", {"n_latents": 64, "k": 4}, {})


def test_a_manifest_that_does_not_parse_is_left_out_of_lists_and_named_when_read(store, caplog) -> None:
    from pydantic import ValidationError

    from kestrel.core.sae.records import training_history

    publish(store, "saes", {"id": "sae-broken", "kind": "sae"})  # no config: not an SAE this version reads
    with caplog.at_level("WARNING"):
        assert [sae.id for sae in list_saes(store)] == ["sae-imported", "sae-trained"]
    assert "'sae-broken' left out of the list" in caplog.text
    with pytest.raises(ValidationError, match="config"):
        get_sae(store, "sae-broken")
    assert training_history(store, "sae-broken") == [], "its history needs only that it exists"
    with pytest.raises(NotFoundError):
        training_history(store, "sae-missing")
