"""Neuronpedia's bulk-import layout: the files and rows its importer reads, the decoder rows as
steering vectors, and per-token values that agree with discovery where the model sees the same
tokens (a window that reaches back to the start of its text)."""

from __future__ import annotations

import gzip
import io
import json
import zipfile

import pytest
import torch
from topic_corpus import topic_corpus

from kestrel.core import concepts
from kestrel.core.activations import capture
from kestrel.core.concepts.config import NeuronpediaExport
from kestrel.core.concepts.dictionary import Concept, update_concepts
from kestrel.core.concepts.neuronpedia import export_neuronpedia
from kestrel.core.concepts.store import FeatureReader
from kestrel.core.errors import InvalidInputError
from kestrel.core.runs import CaptureOptions
from kestrel.core.sae import artifacts

WINDOW = 48  # wider than the texts: every window reaches back to its text's first token


@pytest.fixture
def discovered(tiny_lm, store) -> str:
    texts, _ = topic_corpus(per_topic=20, seed=2)
    run = capture(tiny_lm, texts, ["model.layers.1"], store, options=CaptureOptions(dtype="fp32"))
    sae = {"architecture": "topk", "n_latents": 64, "k": 4}
    artifacts.train_from_run(
        store, run.id, "model.layers.1", sae, {"batch_size": 256, "seed": 1}, sae_id="np"
    )
    concepts.discover(store, "np", tiny_lm, config={"top_n": 4, "window": WINDOW, "samples_per_bin": 2})
    return "np"


def _read(data: bytes) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for name in archive.namelist():
            raw = archive.read(name)
            text = gzip.decompress(raw).decode() if name.endswith(".gz") else raw.decode()
            out[name] = [json.loads(line) for line in text.splitlines()]
    return out


def test_export_has_neuronpedias_layout_and_values_agree_with_discovery(tiny_lm, store, discovered) -> None:
    reader = FeatureReader(store, "np")
    stats = reader.full("fire_count", "max_activation", "top_values", "top_rows")
    fired = torch.nonzero(stats["fire_count"] > 0).flatten().tolist()
    named = fired[-1]
    update_concepts(store, "np", [Concept(latent=named, name="cats", description="texts about cats")])
    options = NeuronpediaExport(model_id="tiny-llama", source_set="res-topk-64", creator="lab")
    files = _read(export_neuronpedia(store, "np", tiny_lm, options))
    root = "tiny-llama/1-res-topk-64"
    assert {f"{root}/{name}.jsonl" for name in ("release", "model", "sourceset", "source")} <= set(files)
    [source] = files[f"{root}/source.jsonl"]
    assert source["id"] == "1-res-topk-64" and source["setName"] == "res-topk-64"

    features = files[f"{root}/features/batch-0.jsonl.gz"]
    assert [int(f["index"]) for f in features] == fired
    sae, _ = artifacts.load_sae(store, "np")
    first = features[0]
    assert first["hookName"] == "blocks.1.hook_resid_post" and first["layer"] == "1-res-topk-64"
    torch.testing.assert_close(torch.tensor(first["vector"]), sae.W_dec[fired[0]].detach(), atol=1e-6, rtol=0)
    assert first["maxActApprox"] == pytest.approx(float(stats["max_activation"][fired[0]]))

    activations = files[f"{root}/activations/batch-0.jsonl.gz"]
    top = [a for a in activations if a["binMin"] == -1]
    assert len(top) == int((stats["top_rows"][fired] >= 0).sum())
    for row in top:  # the model saw the same tokens as in discovery: the same value at the target
        latent = int(row["index"])
        assert len(row["tokens"]) == len(row["values"]) and row["maxValue"] == max(row["values"])
        stored = stats["top_values"][latent]
        value = row["values"][row["qualifyingTokenIndex"]]
        assert any(abs(value - float(s)) <= 1e-3 * max(1.0, float(s)) for s in stored), (latent, value)
    assert any(a["binMin"] >= 0 for a in activations)  # samples from the bins come too

    [explanation] = [e for name, rows in files.items() if "/explanations/" in name for e in rows]
    assert explanation["index"] == str(named) and explanation["description"] == "cats: texts about cats"
    assert explanation["typeName"] == "kestrel-manual"


def test_export_of_chosen_latents_and_bad_options(tiny_lm, store, discovered) -> None:
    files = _read(export_neuronpedia(store, "np", tiny_lm, NeuronpediaExport(latents=[5, 2, 5], bins=False)))
    [features] = [rows for name, rows in files.items() if "/features/" in name]
    assert [f["index"] for f in features] == ["2", "5"]
    assert all(a["binMin"] == -1 for name, rows in files.items() if "/activations/" in name for a in rows)
    with pytest.raises(InvalidInputError, match="latents is empty"):
        export_neuronpedia(store, "np", tiny_lm, NeuronpediaExport(latents=[]))
    with pytest.raises(InvalidInputError, match="out of range"):
        export_neuronpedia(store, "np", tiny_lm, NeuronpediaExport(latents=[64]))
    with pytest.raises(InvalidInputError, match="source_set"):
        NeuronpediaExport(source_set="Has Spaces")
