"""Attribution graphs on a tiny Llama: every edge is checked against a finite difference of the
replacement model, built independently of the graph code (attention inputs, norm scales and MLP
outputs *replayed* from the clean run, where the graph code detaches them), in which the system is
linear: adding a source's whole write to the residual stream changes a target by exactly the
edge, up to float32 rounding."""

from __future__ import annotations

import pytest
import torch

from kestrel.core.analysis.graph import _Layer, _replacement, attribution_graph, influence
from kestrel.core.errors import InvalidInputError
from kestrel.core.sae import SAEConfig, create

PROMPT = "the cat sat on the mat and the dog"
BLOCKS = 3  # tests/tiny_models.py; block 2 has no transcoder, so its MLP is a whole error node


def transcoder(d_in: int, block: int, seed: int, skip: bool = False):
    """A random TopK transcoder of block ``block``'s MLP (input and output widths are equal in a
    Llama); its misses become the error nodes. A skip-transcoder gets a random W_skip (it starts
    at zero), so the skip path carries gradient in the test."""
    torch.manual_seed(seed)
    layer, target = f"model.layers.{block}.mlp:input", f"model.layers.{block}.mlp"
    sae = create(SAEConfig(d_in=d_in, n_latents=48, k=4, layer=layer, target_layer=target, skip=skip))
    if skip:
        with torch.no_grad():
            sae.W_skip.normal_(0, 0.1)
    return sae.eval()


@pytest.fixture
def transcoders(tiny_lm) -> dict:
    width = tiny_lm.model.config.hidden_size
    return {0: transcoder(width, 0, 1), 1: transcoder(width, 1, 2, skip=True)}


def _skip(tc, x):
    term = tc.skip_term(x) if tc is not None else None
    return 0.0 if term is None else term


def _replay_run(lm, ids, transcoders, clean, perturb) -> tuple[torch.Tensor, dict]:
    """A forward of the frozen replacement model by replay: q/k projections and norm scales at
    their clean values, each MLP's output at its clean value; ``perturb(name, out)`` adds a source's
    write. Returns the logits and the MLP inputs (feature targets read them)."""
    model = lm.model
    handles, inputs = [], {}

    def replay(name):
        def hook(module, args, output):
            return clean[name]

        return hook

    def norm(name):
        def hook(module, args, output):
            x = args[0]
            return module.weight * (x.float() * clean[name]).to(x.dtype)

        return hook

    def mlp(index):
        def hook(module, args, output):
            inputs[index] = args[0]
            # frozen: the clean output; a skip-transcoder's linear term follows the live input
            tc = transcoders.get(index)
            live = clean[f"mlp{index}"] - _skip(tc, clean[f"x{index}"]) + _skip(tc, args[0])
            return perturb(f"mlp{index}", live.clone())

        return hook

    def embedding(module, args, output):
        return perturb("embedding", output.clone())

    try:
        handles.append(model.get_input_embeddings().register_forward_hook(embedding))
        for name, module in model.named_modules():
            if name.endswith(("q_proj", "k_proj")):
                handles.append(module.register_forward_hook(replay(name)))
            if hasattr(module, "variance_epsilon"):
                handles.append(module.register_forward_hook(norm(name)))
        for index in range(BLOCKS):  # every MLP frozen, with or without a transcoder
            handles.append(model.get_submodule(f"model.layers.{index}.mlp").register_forward_hook(mlp(index)))
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits[0, -1].float()
    finally:
        for handle in handles:
            handle.remove()
    return logits, inputs


def _clean_values(lm, ids, transcoders) -> dict:
    model, clean, handles = lm.model, {}, []

    def keep(name):
        def hook(module, args, output):
            clean[name] = output.detach()
            if name.startswith("mlp"):
                clean[name.replace("mlp", "x")] = args[0].detach()  # a skip term's clean input

        return hook

    def scale(name):
        def hook(module, args, output):
            x = args[0]
            clean[name] = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + module.variance_epsilon)

        return hook

    try:
        for name, module in model.named_modules():
            if name.endswith(("q_proj", "k_proj")):
                handles.append(module.register_forward_hook(keep(name)))
            if hasattr(module, "variance_epsilon"):
                handles.append(module.register_forward_hook(scale(name)))
        for index in range(BLOCKS):
            handles.append(
                model.get_submodule(f"model.layers.{index}.mlp").register_forward_hook(keep(f"mlp{index}"))
            )
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return clean


def test_edges_equal_finite_differences_of_the_replacement_model(tiny_lm, transcoders) -> None:
    graph = attribution_graph(tiny_lm, PROMPT, transcoders, batch=5)
    ids = tiny_lm.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    clean = _clean_values(tiny_lm, ids, transcoders)
    nodes, adjacency = graph.nodes, graph.adjacency
    index_of = {node.id: i for i, node in enumerate(nodes)}
    features = [i for i, n in enumerate(nodes) if n.kind == "feature"]
    assert len(features) >= 20  # k=4 per position on two layers

    def target_value(logits, inputs, node) -> float:
        if node.kind == "logit":
            token = _token(tiny_lm, node.token)
            return float(logits[token] - logits.mean())
        with torch.no_grad():
            x = inputs[node.layer][0, node.position].float()
            return float(transcoders[node.layer].pre_acts(x)[node.latent])

    def write_of(node):
        """What the source adds to the residual stream, where."""
        if node.kind == "feature":
            vector = transcoders[node.layer].W_dec[node.latent].detach() * node.activation
            return f"mlp{node.layer}", node.position, vector
        if node.kind == "error":
            mlp_out = clean[f"mlp{node.layer}"][0, node.position].float()
            if node.layer not in transcoders:
                return f"mlp{node.layer}", node.position, mlp_out
            x = _mlp_input(tiny_lm, ids, node.layer)[0, node.position].float()
            tc = transcoders[node.layer]
            encoded = tc.encode(x[None])
            recon = tc.decode(encoded.acts, encoded.indices)[0]
            return f"mlp{node.layer}", node.position, (mlp_out - recon - _skip(tc, x)).detach()
        embedding = tiny_lm.model.get_input_embeddings()(ids)[0, node.position].detach()
        return "embedding", node.position, embedding

    base_logits, base_inputs = _replay_run(tiny_lm, ids, transcoders, clean, lambda name, out: out)
    targets = [len(nodes) - 1, *[i for i in features if nodes[i].layer == 1][:4]]
    errors = [index_of[name] for name in ("E0_3", "E1_5", "E2_4")]
    sources = [*features[:6], *errors, index_of["T_2"], index_of["T_0"]]
    checked = 0
    for t in targets:
        before = target_value(base_logits, base_inputs, nodes[t])
        for s in sources:
            where, position, vector = write_of(nodes[s])

            def perturb(name, out, where=where, position=position, vector=vector):
                if name == where:
                    out[0, position] += vector.to(out.dtype)
                return out

            logits, inputs = _replay_run(tiny_lm, ids, transcoders, clean, perturb)
            effect = target_value(logits, inputs, nodes[t]) - before
            edge = float(adjacency[t, s])
            assert edge == pytest.approx(effect, rel=2e-3, abs=2e-4), (nodes[t].id, nodes[s].id)
            checked += abs(effect) > 1e-3
    assert checked >= 10  # most pairs have an effect to check (not zero against zero)


def _token(lm, text: str) -> int:
    [token] = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    return token


def _mlp_input(lm, ids, index):
    seen = {}
    module = lm.model.get_submodule(f"model.layers.{index}.mlp")
    handle = module.register_forward_hook(lambda m, args, out: seen.setdefault("x", args[0].detach()))
    try:
        with torch.no_grad():
            lm.model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return seen["x"]


def test_freezing_changes_no_value_and_later_sources_have_no_edges(tiny_lm, transcoders) -> None:
    ids = tiny_lm.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = tiny_lm.model(input_ids=ids, use_cache=False).logits
    layers = [
        _Layer(i, tiny_lm.model.get_submodule(f"model.layers.{i}.mlp"), tc) for i, tc in transcoders.items()
    ]
    with _replacement(tiny_lm, layers, 1), torch.no_grad():
        frozen = tiny_lm.model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(frozen, plain, rtol=1e-4, atol=1e-5)

    graph = attribution_graph(tiny_lm, PROMPT, transcoders)
    for t, target in enumerate(graph.nodes):
        if target.kind != "feature":
            continue
        for s, source in enumerate(graph.nodes[: graph.adjacency.shape[1] - 1]):
            later = source.position > target.position or (
                source.layer is not None and source.layer >= target.layer
            )
            if later and source.kind in ("feature", "error"):
                assert graph.adjacency[t, s] == 0, (target.id, source.id)
    assert 0 <= graph.scores["replacement"] <= 1 and 0 <= graph.scores["completeness"] <= 1
    weights = graph.kinds("logit").float()
    assert float(influence(graph.adjacency, weights)[graph.kinds("token")].sum()) > 0


def test_unsupported_requests_are_refused(tiny_lm, transcoders) -> None:
    with pytest.raises(InvalidInputError, match="one token"):
        attribution_graph(tiny_lm, PROMPT, transcoders, target=" several tokens here")
    with pytest.raises(InvalidInputError, match="at least one transcoder"):
        attribution_graph(tiny_lm, PROMPT, {})
    with pytest.raises(InvalidInputError, match="no block 9"):
        attribution_graph(tiny_lm, PROMPT, {9: transcoders[0]})


def test_pruning_keeps_the_influential_nodes_and_the_json_names_them(tiny_lm, transcoders) -> None:
    from kestrel.core.analysis.graph import graph_json, prune

    graph = attribution_graph(tiny_lm, PROMPT, transcoders)
    everything = prune(graph, 1.0, 1.0)[0]
    nodes, edges = prune(graph, node_keep=0.5, edge_keep=0.9)
    assert bool(nodes[graph.kinds("token")].all()) and bool(nodes[-1])
    assert int(nodes.sum()) < int(everything.sum())  # something was pruned
    assert not bool(edges[~nodes].any()) and not bool(edges[:, ~nodes].any())
    inner = nodes & (graph.kinds("feature") | graph.kinds("error"))
    assert bool(edges.any(0)[inner].all())  # every kept feature or error node has an edge out
    kept_features = nodes & graph.kinds("feature")
    assert bool(edges.any(1)[kept_features].all())  # and every kept feature an edge in
    exported = graph_json(graph, nodes, edges)
    ids = {node["id"] for node in exported["nodes"]}
    assert all(link["source"] in ids and link["target"] in ids for link in exported["links"])
    assert exported["target"]["token"] == graph.nodes[-1].token and exported["links"]
    with pytest.raises(InvalidInputError, match="node_keep"):
        prune(graph, node_keep=1.5)


def test_transcoders_are_checked_to_replace_one_mlp_each() -> None:
    from kestrel.core.sae.records import SAEManifest, transcoder_blocks

    def manifest(sae_id, layer, target, kind="transcoder", model="m"):
        return SAEManifest(id=sae_id, model=model, layer=layer, target_layer=target, kind=kind, config={})

    norm = "model.layers.4.post_attention_layernorm"  # what the MLP reads, as a module output
    good = [
        manifest("a", "model.layers.1.mlp:input", "model.layers.1.mlp"),
        manifest("b", norm, "model.layers.4.mlp", "skip_transcoder"),
    ]
    assert transcoder_blocks(good, "m") == {1: "a", 4: "b"}
    wrong = {
        "not a transcoder": manifest("c", "model.layers.2", None, kind="sae"),
        "reads 'model.layers.4'": manifest("d", "model.layers.4", "model.layers.5.mlp"),
        "both replace block 1": manifest("e", "model.layers.1.mlp:input", "model.layers.1.mlp"),
        "not 'm'": manifest("f", "model.layers.7.mlp:input", "model.layers.7.mlp", model="other"),
    }
    for message, bad in wrong.items():
        with pytest.raises(InvalidInputError, match=message):
            transcoder_blocks([*good, bad], "m")
