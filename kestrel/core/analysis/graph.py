"""Attribution graphs over transcoder features (the circuit-tracer method, Ameisen et al. 2025).

For one prompt, the model's MLPs are replaced by transcoders plus an error term (so the forward
pass is unchanged), attention patterns and normalisation scales are frozen at their values on the
prompt, and feature activations are held as constants. What is left is linear in the residual
stream, so the *direct effect* of every source node on every target node is a product of a
gradient and a vector:

* sources: active transcoder features (layer, position, latent), error nodes (layer, position:
  what the transcoder misses of the MLP's output) and token embeddings (position);
* targets: active features (their encoder pre-activation) and the chosen logit (demeaned over the
  vocabulary, as circuit-tracer does);
* edge(s → t) = ∂t/∂(residual write of s) · (what s writes): ``a_s · W_dec[s]`` for a feature,
  the error vector for an error node, the embedding for a token.

Every target needs one backward pass; `BATCH` copies of the prompt run together, each copy
back-propagating from its own target (the copies do not interact), so a graph of N features costs
about N / BATCH forward + backward passes.

Freezing is done with hooks, none of which changes a forward value: query and key projections
are detached (attention patterns stay fixed, values still carry gradient), each RMSNorm divides
by its detached scale, and each MLP's output is rebuilt as transcoder reconstruction (constant) +
error (constant) + a zero "anchor" whose gradient is ∂t/∂(MLP output). A skip-transcoder's linear
skip term stays differentiable (it is part of the replacement's linear path). Llama-family models
only (``q_proj``/``k_proj``, RMSNorm with ``variance_epsilon``); others are refused by name.

Scores (circuit-tracer's definitions), over the row-normalised absolute adjacency A and the
influence of each node on the logit (logit weights · (A + A² + …)):
replacement = token influence / (token + error influence); completeness = influence-weighted mean
over nodes of the share of their input that does not come from error nodes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kestrel.core.errors import InvalidInputError
from kestrel.core.models import LoadedModel

#: Prompt copies per forward + backward (each back-propagates from its own target).
BATCH = 16


@dataclass
class Node:
    """One node of the graph; ``kind`` is feature, error, token or logit."""

    kind: str
    layer: int | None
    position: int
    latent: int | None = None
    activation: float | None = None
    token: str | None = None

    @property
    def id(self) -> str:
        if self.kind == "feature":
            return f"{self.layer}_{self.latent}_{self.position}"
        if self.kind == "error":
            return f"E{self.layer}_{self.position}"
        if self.kind == "token":
            return f"T_{self.position}"
        return f"L_{self.token}_{self.position}"


@dataclass
class AttributionGraph:
    """Nodes in order [features, errors, tokens, logit]; ``adjacency[t, s]`` is s's direct effect on t."""

    prompt: str
    tokens: list[str]
    nodes: list[Node]
    adjacency: Tensor
    target_logit: float
    scores: dict[str, float] = field(default_factory=dict)
    target_id: int | None = None  # the target token's id (its text may not re-tokenize to one token)

    def kinds(self, kind: str) -> Tensor:
        return torch.tensor([n.kind == kind for n in self.nodes])


# ---------------------------------------------------------------------------------------------
# The frozen replacement model


@dataclass
class _Layer:
    """One MLP's replacement on the prompt (batch row 0 holds the values; copies are identical)."""

    index: int
    module: nn.Module
    transcoder: Any | None  # None: the MLP has no transcoder; its whole output is the error
    x_in: Tensor | None = None  # the MLP's input, with grad (feature targets read it)
    acts: Tensor | None = None  # [T, K] active values
    indices: Tensor | None = None  # [T, K] their latents
    error: Tensor | None = None  # [T, D]
    anchor: Tensor | None = None  # [B, T, D] zeros whose grad is ∂target/∂(MLP output)


def _skip(transcoder: Any, x: Tensor) -> Tensor | None:
    """A skip-transcoder's linear term W_skip·x (None for a plain transcoder or none at all)."""
    if transcoder is None or not hasattr(transcoder, "skip_term"):
        return None
    return transcoder.skip_term(x)


def _check_supported(lm: LoadedModel, mlps: Mapping[int, nn.Module]) -> None:
    attention = [m for name, m in lm.model.named_modules() if name.endswith("self_attn")]
    if not attention or not all(hasattr(m, "q_proj") and hasattr(m, "k_proj") for m in attention):
        raise InvalidInputError(
            "attribution graphs need a Llama-family model (attention with q_proj and k_proj); "
            f"{lm.name!r} is not"
        )
    if not mlps:
        raise InvalidInputError("attribution graphs need at least one transcoder")


def _norms(model: nn.Module) -> list[nn.Module]:
    norms = [m for m in model.modules() if hasattr(m, "variance_epsilon") and hasattr(m, "weight")]
    if not norms:
        raise InvalidInputError("attribution graphs need RMSNorm layers (with variance_epsilon) to freeze")
    return norms


def _frozen_norm(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
    """The same RMSNorm output, with its 1/rms scale a constant."""
    x = args[0]
    scale = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + module.variance_epsilon).detach()
    frozen = module.weight * (x.float() * scale).to(x.dtype)
    if not torch.allclose(frozen.detach(), output.detach(), rtol=1e-4, atol=1e-5):
        raise InvalidInputError(f"{type(module).__name__} is not a plain RMSNorm; cannot freeze its scale")
    return frozen


@contextlib.contextmanager
def _replacement(lm: LoadedModel, layers: list[_Layer], batch: int) -> Iterator[dict[str, Tensor]]:
    """Hooks that freeze attention patterns, norm scales and feature activations (see module doc);
    yields a dict that receives the embedding anchor. Every hook is removed on exit."""
    model = lm.model
    handles: list[Any] = []
    seen: dict[str, Tensor] = {}

    def detach_output(module: nn.Module, args: Any, output: Tensor) -> Tensor:
        return output.detach()

    def embedding(module: nn.Module, args: Any, output: Tensor) -> Tensor:
        anchor = torch.zeros_like(output, requires_grad=True)
        seen["embedding"] = output.detach()
        seen["embedding_anchor"] = anchor
        return output.detach() + anchor

    def mlp_hook(layer: _Layer):
        def replace(module: nn.Module, args: Any, output: Tensor) -> Tensor:
            x_in, tc = args[0], layer.transcoder
            flat = x_in.detach().reshape(-1, x_in.shape[-1]).float()
            out_ND = output.detach().reshape(-1, output.shape[-1]).float()
            with torch.no_grad():
                if tc is None:  # no transcoder: the whole output is this layer's error node
                    acts = torch.zeros(len(flat), 0)
                    indices = torch.zeros(len(flat), 0, dtype=torch.long)
                    recon = skip = torch.zeros_like(out_ND)
                else:
                    encoded = tc.encode(flat)
                    acts, indices = encoded.acts, encoded.indices
                    recon = tc.decode(acts, indices)
                    skip = _skip(tc, flat)
                    skip = torch.zeros_like(recon) if skip is None else skip
                error = out_ND - recon - skip
            layer.x_in = x_in
            n_pos = x_in.shape[-2]
            layer.acts = acts.reshape(batch, n_pos, acts.shape[-1])[0]
            layer.indices = indices.reshape(batch, n_pos, indices.shape[-1])[0]
            layer.error = error.reshape(batch, n_pos, error.shape[-1])[0]
            layer.anchor = torch.zeros_like(output, requires_grad=True)
            constant = (recon + error).reshape(output.shape).to(output.dtype)
            live = _skip(tc, x_in.float())  # linear in the MLP input: part of the replacement's path
            return constant + (0.0 if live is None else live.to(output.dtype)) + layer.anchor

        return replace

    try:
        handles.append(model.get_input_embeddings().register_forward_hook(embedding))
        for name, module in model.named_modules():
            if name.endswith(("q_proj", "k_proj")):
                handles.append(module.register_forward_hook(detach_output))
        for norm in _norms(model):
            handles.append(norm.register_forward_hook(_frozen_norm))
        for layer in layers:
            handles.append(layer.module.register_forward_hook(mlp_hook(layer)))
        yield seen
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------
# The graph


def attribution_graph(
    lm: LoadedModel,
    prompt: str,
    transcoders: Mapping[int, Any],
    *,
    target: str | None = None,
    batch: int = BATCH,
    max_features: int | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> AttributionGraph:
    """The attribution graph of ``prompt``'s next-token logit ``target`` (default: the model's top
    token) over ``transcoders`` (block index → a transcoder of that block's MLP: ``encode``,
    ``decode``, ``pre_acts``, ``W_dec`` and, for a skip-transcoder, ``skip_term``). ``on_batch(done,
    total)`` follows the backward passes (and may raise to stop them)."""
    mlps = {i: _mlp_of(lm, i) for i in transcoders}
    _check_supported(lm, mlps)
    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"].to(lm.device)
    if ids.shape[1] == 0:
        raise InvalidInputError("the prompt has no tokens")
    # Every MLP is frozen; one without a transcoder is a whole error node (its output a constant).
    blocks = len(lm.model.get_submodule("model.layers"))
    layers = [_Layer(i, mlps.get(i) or _mlp_of(lm, i), transcoders.get(i)) for i in range(blocks)]
    with torch.no_grad():
        logits = lm.model(input_ids=ids, use_cache=False).logits[0, -1].float()
    target_id = int(logits.argmax()) if target is None else target_token_id(lm, target)
    features = _active_features(lm, ids, layers)
    n_feat, n_pos = len(features), ids.shape[1]
    if max_features is not None and n_feat > max_features:
        raise InvalidInputError(
            f"the prompt has {n_feat} active transcoder features (one backward pass each); the limit is "
            f"{max_features}: use a shorter prompt or fewer transcoders",
            details={"features": n_feat, "max_features": max_features},
        )
    sources = _source_count(n_feat, len(layers), n_pos)
    rows: list[Any] = [*range(n_feat), "logit"]
    adjacency = torch.zeros(n_feat + len(layers) * n_pos + n_pos + 1, sources)
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        edges = _edges_into(lm, ids, layers, features, chunk, target_id)
        for row, values in zip(chunk, edges, strict=True):
            adjacency[n_feat + len(layers) * n_pos + n_pos if row == "logit" else row] = values
        if on_batch is not None:
            on_batch(min(start + batch, len(rows)), len(rows))
    tokens = [lm.tokenizer.decode([t]) for t in ids[0].tolist()]
    nodes = _nodes(features, layers, tokens, lm.tokenizer.decode([target_id]), n_pos)
    adjacency = torch.cat([adjacency, torch.zeros(adjacency.shape[0], 1)], dim=1)  # the logit: no outputs
    demeaned = float(logits[target_id] - logits.mean())
    graph = AttributionGraph(prompt, tokens, nodes, adjacency, demeaned, target_id=target_id)
    graph.scores = graph_scores(graph)
    return graph


def _mlp_of(lm: LoadedModel, index: int) -> nn.Module:
    try:
        return lm.model.get_submodule(f"model.layers.{index}.mlp")
    except AttributeError:
        raise InvalidInputError(f"the model has no block {index} with an mlp") from None


def target_token_id(lm: LoadedModel, target: str) -> int:
    ids = lm.tokenizer(target, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise InvalidInputError(f"target {target!r} is {len(ids)} tokens; give one token (e.g. ' Paris')")
    return int(ids[0])


def _active_features(lm: LoadedModel, ids: Tensor, layers: list[_Layer]) -> list[tuple[int, int, int, float]]:
    """(layer slot, position, latent, activation) of every active feature on the prompt."""
    with _replacement(lm, layers, 1), torch.no_grad():
        lm.model(input_ids=ids, use_cache=False)
    found = []
    for slot, layer in enumerate(layers):
        assert layer.acts is not None and layer.indices is not None
        for pos in range(ids.shape[1]):
            for value, latent in zip(layer.acts[pos].tolist(), layer.indices[pos].tolist(), strict=True):
                if value > 0:
                    found.append((slot, pos, int(latent), float(value)))
    return found


def _source_count(n_feat: int, n_layers: int, n_pos: int) -> int:
    return n_feat + n_layers * n_pos + n_pos


def _edges_into(
    lm: LoadedModel,
    ids: Tensor,
    layers: list[_Layer],
    features: list[tuple[int, int, int, float]],
    rows: list[Any],
    target_id: int,
) -> list[Tensor]:
    """The direct effect of every source on each target in ``rows`` (feature indices or "logit"):
    one forward of len(rows) prompt copies, one backward from the sum of their targets."""
    batch = len(rows)
    ids_BT = ids.expand(batch, -1)
    with _replacement(lm, layers, batch) as seen, torch.enable_grad():
        logits_BTV = lm.model(input_ids=ids_BT, use_cache=False).logits
        total = logits_BTV.new_zeros(())
        for b, row in enumerate(rows):
            if row == "logit":
                last = logits_BTV[b, -1].float()
                total = total + last[target_id] - last.mean()
            else:
                slot, pos, latent, _ = features[row]
                layer = layers[slot]
                assert layer.x_in is not None
                total = total + layer.transcoder.pre_acts(layer.x_in[b, pos].float())[latent]
        anchors = [seen["embedding_anchor"]] + [layer.anchor for layer in layers]
        grads = torch.autograd.grad(total, anchors, allow_unused=True)
    embedding_grad = grads[0] if grads[0] is not None else torch.zeros_like(anchors[0])
    layer_grads = [
        (g if g is not None else torch.zeros_like(a)).float()
        for g, a in zip(grads[1:], anchors[1:], strict=True)
    ]
    feature_part = _feature_edges(layers, features, layer_grads, batch)
    error_part = torch.cat(
        [(layer.error[None] * layer_grads[slot]).sum(-1) for slot, layer in enumerate(layers)], dim=1
    )
    token_part = (seen["embedding"][0].float()[None] * embedding_grad.float()).sum(-1)
    return list(torch.cat([feature_part, error_part.cpu(), token_part.cpu()], dim=1))


def _feature_edges(
    layers: list[_Layer], features: list[tuple[int, int, int, float]], grads: list[Tensor], batch: int
) -> Tensor:
    """[batch, n_features]: activation × (decoder row · ∂target/∂(that layer's MLP output))."""
    out = torch.zeros(batch, len(features))
    if not features:
        return out
    slot_F, pos_F, latent_F = (torch.tensor([f[i] for f in features]) for i in range(3))
    value_F = torch.tensor([f[3] for f in features])
    for slot, layer in enumerate(layers):
        mask = slot_F == slot
        if not bool(mask.any()):
            continue
        rows_MD = layer.transcoder.W_dec[latent_F[mask]].detach().float()
        grads_BMD = grads[slot][:, pos_F[mask]]
        out[:, mask] = (value_F[mask][None, :, None] * rows_MD[None].cpu() * grads_BMD.cpu()).sum(-1)
    return out


def _nodes(
    features: list[tuple[int, int, int, float]],
    layers: list[_Layer],
    tokens: list[str],
    target: str,
    n_pos: int,
) -> list[Node]:
    nodes = [Node("feature", layers[slot].index, pos, latent, value) for slot, pos, latent, value in features]
    nodes += [Node("error", layer.index, pos) for layer in layers for pos in range(n_pos)]
    nodes += [Node("token", None, pos, token=tokens[pos]) for pos in range(n_pos)]
    nodes.append(Node("logit", None, n_pos - 1, token=target))
    return nodes


# ---------------------------------------------------------------------------------------------
# Influence, pruning and scores (circuit-tracer's definitions)


def normalized(adjacency: Tensor) -> Tensor:
    """|A| with each target's row summing to 1 (a row with no input stays 0)."""
    magnitude = adjacency.abs()
    return magnitude / magnitude.sum(dim=1, keepdim=True).clamp_min(1e-10)


def influence(adjacency: Tensor, logit_weights: Tensor, max_iter: int = 1000) -> Tensor:
    """logit_weights · (A + A² + …) over the normalised matrix: each node's total influence on
    the logit through every path (the graph is acyclic, so the series ends)."""
    a = normalized(adjacency)
    step = logit_weights @ a
    total = step.clone()
    for _ in range(max_iter):
        step = step @ a
        if not bool(step.any()):
            return total
        total += step
    raise RuntimeError("influence did not converge (the graph has a cycle?)")


def graph_scores(graph: AttributionGraph) -> dict[str, float]:
    """Replacement and completeness (see the module docstring)."""
    square = _square(graph.adjacency)
    weights = graph.kinds("logit").float()
    total = influence(square, weights)
    errors, tokens = graph.kinds("error"), graph.kinds("token")
    token_share, error_share = float(total[tokens].sum()), float(total[errors].sum())
    replacement = token_share / (token_share + error_share) if token_share + error_share > 0 else 0.0
    from_features = 1.0 - normalized(square)[:, errors].sum(dim=1)
    out_weight = total + weights
    completeness = (
        float((from_features * out_weight).sum() / out_weight.sum()) if out_weight.sum() > 0 else 0.0
    )
    return {"replacement": replacement, "completeness": completeness}


def _square(adjacency: Tensor) -> Tensor:
    """The [N, N] matrix over every node (rows: targets, columns: sources)."""
    n = adjacency.shape[0]
    if adjacency.shape[1] == n:
        return adjacency
    square = torch.zeros(n, n)
    square[:, : adjacency.shape[1]] = adjacency
    return square


def _threshold(scores: Tensor, keep: float) -> float:
    """The score above which the highest scores hold ``keep`` of the total."""
    ordered = scores.flatten().sort(descending=True).values
    total = float(ordered.sum())
    if total <= 0:
        return float("inf")
    cumulative = ordered.cumsum(0) / total
    index = min(int(torch.searchsorted(cumulative, torch.tensor(keep))), len(ordered) - 1)
    return float(ordered[index])


def prune(graph: AttributionGraph, node_keep: float = 0.8, edge_keep: float = 0.98) -> tuple[Tensor, Tensor]:
    """Node and edge masks keeping the nodes that carry ``node_keep`` of the influence on the logit
    and the edges that carry ``edge_keep`` of theirs (tokens and the logit always stay); a feature
    or error node left without an edge out, and a feature without an edge in, is dropped, as
    circuit-tracer does."""
    for name, value in (("node_keep", node_keep), ("edge_keep", edge_keep)):
        if not 0.0 <= value <= 1.0:
            raise InvalidInputError(f"{name} must be within [0, 1], got {value}")
    square = _square(graph.adjacency)
    weights = graph.kinds("logit").float()
    node_influence = influence(square, weights)
    always = graph.kinds("token") | graph.kinds("logit")
    nodes = (node_influence >= _threshold(node_influence, node_keep)) | always
    kept = square.clone()
    kept[~nodes] = 0
    kept[:, ~nodes] = 0
    edge_scores = normalized(kept) * (influence(kept, weights) + weights)[:, None]
    edges = (edge_scores >= _threshold(edge_scores, edge_keep)) & (edge_scores > 0)
    inner, features = ~always, graph.kinds("feature")
    while True:  # drop inner nodes with no edge out, features with no edge in, and their edges
        before = nodes.clone()
        nodes[inner] &= edges[:, inner].any(0)
        nodes[features] &= edges[features].any(1)
        edges[~nodes] = False
        edges[:, ~nodes] = False
        if torch.equal(before, nodes):
            return nodes, edges


def graph_json(
    graph: AttributionGraph, nodes: Tensor, edges: Tensor, sae_ids: Mapping[int, str] | None = None
) -> dict[str, Any]:
    """The pruned graph as JSON: nodes (with their influence on the logit), weighted links, scores.
    With ``sae_ids`` (block → the transcoder's SAE id), each feature node names its transcoder
    (``sae_id``) and ``transcoders`` maps each block (a string key) to its SAE id: what a client
    needs to open a feature's page or edit the feature (graph_intervention)."""
    square = _square(graph.adjacency)
    node_influence = influence(square, graph.kinds("logit").float())
    index = torch.nonzero(nodes).flatten().tolist()
    targets, sources = torch.nonzero(edges, as_tuple=True)
    sae_ids = dict(sae_ids or {})
    target = {"token": graph.nodes[-1].token, "demeaned_logit": graph.target_logit}
    if graph.target_id is not None:
        target["token_id"] = graph.target_id
    return {
        "prompt": graph.prompt,
        "tokens": graph.tokens,
        "target": target,
        "scores": graph.scores,
        "transcoders": {str(block): sae_id for block, sae_id in sorted(sae_ids.items())},
        "nodes": [_node_json(graph.nodes[i], float(node_influence[i]), sae_ids) for i in index],
        "links": [
            {"source": graph.nodes[s].id, "target": graph.nodes[t].id, "weight": float(square[t, s])}
            for t, s in zip(targets.tolist(), sources.tolist(), strict=True)
        ],
    }


def _node_json(node: Node, node_influence: float, sae_ids: Mapping[int, str]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": node.id,
        "kind": node.kind,
        "layer": node.layer,
        "position": node.position,
        "latent": node.latent,
        "activation": node.activation,
        "token": node.token,
        "influence": node_influence,
    }
    if node.kind == "feature" and node.layer in sae_ids:
        out["sae_id"] = sae_ids[node.layer]
    return out
