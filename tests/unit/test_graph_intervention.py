"""Testing attribution-graph nodes on the real model (kestrel.core.analysis.graph_intervention), on
the tiny Llama with random transcoders of blocks 0 and 1: an edit that changes nothing changes no
logit; ablating a feature equals an independent run in which that MLP's output loses the feature's
write (its graph activation × its decoder row) at its position; an edit at position p leaves every
earlier position alone; the greedy continuation holds the edit at its prompt position only; and
requests naming what a graph cannot edit are refused, each naming the problem."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from test_attribution_graph import transcoder

from kestrel.core.analysis.graph import attribution_graph, graph_json, prune
from kestrel.core.analysis.graph_edits import GraphInterventionRequest, NodeEdit, feature_edits
from kestrel.core.analysis.graph_intervention import block_edits, edited_logits, intervene, prompt_ids
from kestrel.core.errors import InvalidInputError

PROMPT = "the cat sat on the mat and the dog"
SAE_IDS = {0: "tc-block0", 1: "tc-block1"}
# float32: the edited and the reference runs add the same change to the same MLP output, computed
# through differently shaped (so differently summed) products; a few ulps of the logits apart.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}


@pytest.fixture(scope="module")
def transcoders(tiny_lm) -> dict:
    width = tiny_lm.model.config.hidden_size
    return {0: transcoder(width, 0, 1), 1: transcoder(width, 1, 2, skip=True)}


@pytest.fixture(scope="module")
def graph(tiny_lm, transcoders) -> dict:
    """The unpruned graph as results.json holds it (every active feature is a node)."""
    built = attribution_graph(tiny_lm, PROMPT, transcoders)
    nodes, edges = prune(built, 1.0, 1.0)
    return graph_json(built, nodes, edges, SAE_IDS)


def features(graph: dict) -> list[dict]:
    return [node for node in graph["nodes"] if node["kind"] == "feature"]


def strongest(graph: dict, layer: int, position: int | None = None) -> dict:
    """The feature with the largest activation in ``layer`` (at ``position``, if given)."""
    nodes = [n for n in features(graph) if n["layer"] == layer and position in (None, n["position"])]
    return max(nodes, key=lambda node: node["activation"])


def resolved(graph: dict, *edits: NodeEdit):
    return feature_edits(graph, edits, SAE_IDS)


def logits(tiny_lm, graph, transcoders, *edits: NodeEdit) -> torch.Tensor:
    ids = prompt_ids(tiny_lm, graph)
    return edited_logits(tiny_lm, ids, block_edits(transcoders, resolved(graph, *edits), ids.shape[1]))


def clean_logits(tiny_lm, graph) -> torch.Tensor:
    with torch.no_grad():
        return tiny_lm.model(input_ids=prompt_ids(tiny_lm, graph), use_cache=False).logits[0].float()


def reduced_mlp_logits(tiny_lm, graph, transcoders, node: dict) -> torch.Tensor:
    """The independent computation: a plain torch hook takes node's write, activation × W_dec row
    (the activation the graph recorded), off its block's MLP output at its position."""
    row = transcoders[node["layer"]].W_dec.detach()[node["latent"]]

    def reduce(module, args, output):
        output = output.clone()
        output[0, node["position"]] -= node["activation"] * row
        return output

    mlp = tiny_lm.model.get_submodule(f"model.layers.{node['layer']}.mlp")
    handle = mlp.register_forward_hook(reduce)
    try:
        return clean_logits(tiny_lm, graph)
    finally:
        handle.remove()


def test_the_graph_names_each_features_transcoder(graph: dict) -> None:
    assert graph["transcoders"] == {"0": "tc-block0", "1": "tc-block1"}
    assert {node["layer"] for node in features(graph)} == {0, 1}
    assert all(node["sae_id"] == SAE_IDS[node["layer"]] for node in features(graph))
    assert all("sae_id" not in node for node in graph["nodes"] if node["kind"] != "feature")
    assert isinstance(graph["target"]["token_id"], int)


def test_scale_one_changes_nothing(tiny_lm, graph, transcoders) -> None:
    edits = [NodeEdit(node=n["id"], scale=1.0) for n in (strongest(graph, 0), strongest(graph, 1))]
    torch.testing.assert_close(logits(tiny_lm, graph, transcoders, *edits), clean_logits(tiny_lm, graph))
    out = intervene(tiny_lm, graph, transcoders, resolved(graph, *edits), top_k=5, max_new_tokens=3)
    assert out["target"]["logit_after"] == pytest.approx(out["target"]["logit_before"], rel=1e-6, abs=1e-6)
    assert [t["token"] for t in out["top_after"]] == [t["token"] for t in out["top_before"]]
    assert out["continuation_after"] == out["continuation_before"] and out["continuation_before"]
    for edit, node in zip(out["edits"], (strongest(graph, 0), strongest(graph, 1)), strict=True):
        assert edit["node"] == node["id"] and edit["sae_id"] == node["sae_id"]
        # the real model's activation is the graph's (freezing changed no forward value)
        assert edit["activation_before"] == pytest.approx(node["activation"], rel=1e-5)
        assert edit["activation_after"] == pytest.approx(edit["activation_before"], rel=1e-6)


@pytest.mark.parametrize("layer", [0, 1])
def test_ablation_equals_the_mlp_output_without_the_features_write(
    tiny_lm, graph, transcoders, layer
) -> None:
    node = strongest(graph, layer)
    ablated = logits(tiny_lm, graph, transcoders, NodeEdit(node=node["id"], scale=0.0))
    reference = reduced_mlp_logits(tiny_lm, graph, transcoders, node)
    clean = clean_logits(tiny_lm, graph)
    change = (reference - clean).abs().max()
    assert change > 1e3 * TOLERANCE["atol"]  # the ablation does something the comparison can see
    torch.testing.assert_close(ablated, reference, **TOLERANCE)
    # the response says the same, at the last position
    out = intervene(tiny_lm, graph, transcoders, resolved(graph, NodeEdit(node=node["id"], scale=0.0)))
    target_id = graph["target"]["token_id"]
    assert out["target"]["logit_after"] == pytest.approx(float(reference[-1, target_id]), rel=1e-4, abs=1e-6)
    assert out["edits"][0]["activation_after"] == 0.0


def test_an_edit_at_position_p_leaves_earlier_positions_alone(tiny_lm, graph, transcoders) -> None:
    n_pos = len(graph["tokens"])
    node = strongest(graph, 0, next(p for p in range(n_pos // 2, n_pos) if any(
        n["layer"] == 0 and n["position"] == p for n in features(graph)
    )))  # fmt: skip
    p = node["position"]
    edited = logits(tiny_lm, graph, transcoders, NodeEdit(node=node["id"], value=50.0 * node["activation"]))
    clean = clean_logits(tiny_lm, graph)
    torch.testing.assert_close(edited[:p], clean[:p], rtol=0, atol=0)  # untouched: the same arithmetic
    assert (edited[p:] - clean[p:]).abs().amax(-1).min() > 1e-4  # and every later position moved


def test_the_continuation_holds_the_edit_at_its_prompt_position(tiny_lm, graph, transcoders) -> None:
    """Against a cache-free greedy loop whose plain hook edits the prompt position on every pass."""
    node = strongest(graph, 1)
    edit = NodeEdit(node=node["id"], value=50.0 * node["activation"])
    out = intervene(tiny_lm, graph, transcoders, resolved(graph, edit), max_new_tokens=4)
    row = transcoders[1].W_dec.detach()[node["latent"]]

    def push(module, args, output):
        output = output.clone()
        output[0, node["position"]] += (50.0 - 1.0) * node["activation"] * row
        return output

    ids = prompt_ids(tiny_lm, graph)
    handle = tiny_lm.model.get_submodule("model.layers.1.mlp").register_forward_hook(push)
    try:
        with torch.no_grad():
            for _ in range(4):
                step = tiny_lm.model(input_ids=ids, use_cache=False).logits[0, -1].argmax()
                ids = torch.cat([ids, step.view(1, 1)], dim=1)
    finally:
        handle.remove()
    n_prompt = len(graph["tokens"])
    assert out["continuation_after"] == tiny_lm.tokenizer.decode(ids[0, n_prompt:], skip_special_tokens=True)


def test_requests_the_graph_cannot_serve_are_refused(graph: dict) -> None:
    feature = features(graph)[0]
    error = next(node for node in graph["nodes"] if node["kind"] == "error")
    with pytest.raises(InvalidInputError, match="is a error node; only feature nodes"):
        resolved(graph, NodeEdit(node=error["id"], scale=0.0))
    typo = f"{feature['layer']}_{feature['latent']}_{feature['position']}9"
    with pytest.raises(InvalidInputError, match=f"no node '{typo}'; did you mean") as missing:
        resolved(graph, NodeEdit(node=typo, scale=0.0))
    assert missing.value.details["suggestions"]
    for body, message in [
        ({"node": feature["id"], "scale": 0.0, "value": 1.0}, "exactly one of scale and value"),
        ({"node": feature["id"]}, "exactly one of scale and value"),
        ({"node": feature["id"], "scale": float("nan")}, "finite"),
        ({"node": feature["id"], "value": 1e5}, "less than or equal to 10000"),
    ]:
        with pytest.raises(ValidationError, match=message):
            NodeEdit.model_validate(body)
    twice = {"edits": [{"node": feature["id"], "scale": 0.0}, {"node": feature["id"], "value": 1.0}]}
    with pytest.raises(ValidationError, match="edited more than once"):
        GraphInterventionRequest.model_validate(twice)
    for body in ({"edits": []}, {"edits": [{"node": "x", "scale": 1}], "top_k": 0}):
        with pytest.raises(ValidationError):
            GraphInterventionRequest.model_validate(body)
    with pytest.raises(ValidationError):
        GraphInterventionRequest.model_validate({"edits": [{"node": "x", "scale": 1}], "max_new_tokens": 65})


def _publish(store, kind: str, artifact_id: str, manifest: dict, files: dict | None = None) -> None:
    import json

    with store.writer(kind, artifact_id) as writer:
        for name, obj in (files or {}).items():
            (writer.directory / name).write_text(json.dumps(obj), encoding="utf-8")
        writer.commit(manifest)


def test_a_request_is_checked_against_the_stored_graph(tmp_path, graph: dict) -> None:
    """The API's check before queueing: the analysis is a graph, its nodes are features, and the
    transcoders are stored; a graph written before the transcoder map gets it from the SAEs."""
    from kestrel.core.analysis.graph_edits import check_intervention
    from kestrel.core.errors import ConflictError, NotFoundError
    from kestrel.core.store import LocalStore

    store = LocalStore(tmp_path / "store")
    for block, sae_id in SAE_IDS.items():
        mlp = f"model.layers.{block}.mlp"
        summary = {"id": sae_id, "model": "tiny-llama", "layer": f"{mlp}:input", "target_layer": mlp}
        _publish(store, "saes", sae_id, {**summary, "kind": "transcoder", "config": {}})
    common = {"title": "t", "created": "2026-01-01T00:00:00Z", "key_numbers": {}, "plots": []}
    config = {"kind": "graph", "model": "tiny-llama", "prompt": PROMPT, "transcoders": list(SAE_IDS.values())}
    old = {key: value for key, value in graph.items() if key != "transcoders"}
    old["nodes"] = [{k: v for k, v in node.items() if k != "sae_id"} for node in graph["nodes"]]
    for analysis_id, results in (("old-graph", old), ("new-graph", graph)):
        manifest = {"id": analysis_id, "kind": "graph", "source": {}, "config": config, **common}
        _publish(store, "analyses", analysis_id, manifest, {"results.json": results})
    neuron = {"id": "neurons", "kind": "neuron", "source": {}, "config": {"kind": "neuron"}, **common}
    _publish(store, "analyses", "neurons", neuron, {"results.json": {}})

    node = strongest(graph, 1)
    request = GraphInterventionRequest(edits=[NodeEdit(node=node["id"], scale=0.0)])
    checked = check_intervention(store, "old-graph", request)
    assert checked.transcoders == {0: "tc-block0", 1: "tc-block1"} and checked.model == "tiny-llama"
    assert [(e.sae_id, e.layer, e.latent, e.position) for e in checked.edits] == [
        ("tc-block1", 1, node["latent"], node["position"])
    ]
    with pytest.raises(InvalidInputError, match="is a neuron analysis"):
        check_intervention(store, "neurons", request)
    with pytest.raises(NotFoundError):
        check_intervention(store, "no-such-graph", request)
    assert check_intervention(store, "new-graph", request).edits == checked.edits
    store.delete("saes", "tc-block1")
    with pytest.raises(ConflictError, match="predates the transcoder map"):
        check_intervention(store, "old-graph", request)
    with pytest.raises(ConflictError, match="transcoder 'tc-block1' \\(block 1\\) of graph 'new-graph'"):
        check_intervention(store, "new-graph", request)
    block0 = GraphInterventionRequest(edits=[NodeEdit(node=strongest(graph, 0)["id"], value=1.0)])
    assert check_intervention(store, "new-graph", block0).transcoders[1] == "tc-block1"  # only edited ones
