"""Test an attribution graph's feature nodes on the real model (issue #15): scale or set
transcoder features at their positions and see what the next token, and optionally a greedy
continuation, become.

The graph's edges are direct effects in a frozen, linearised replacement model; whether a feature
matters is a claim about the real one. So the real model runs (attention and norms live, every
MLP its own), and at each edited block a forward hook on the MLP encodes the MLP's input with that
block's transcoder, changes the named latents at their positions, and adds the change of the
transcoder's output, Σ_e (z'_e − z_e)·W_dec[e], to the MLP's actual output. The transcoder's error
term is kept, as steering keeps an SAE's (`kestrel.core.steering`, same ``scale`` / ``clamp``
semantics through `apply_ops`): an edit that changes nothing leaves the logits exactly as they
were, and every later layer, including later edited blocks, responds to the edit for real (a scale
multiplies the activation the feature has *in the edited run*).

An edit acts at its node's prompt position only: in a generated continuation the prompt pass is
edited and the new tokens read its (edited) keys and values, but are themselves left alone.
Hooks go through `kestrel.core.hooks`, so they are removed when each pass ends, also on error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kestrel.core.analysis.graph import target_token_id
from kestrel.core.analysis.graph_edits import FeatureEdit
from kestrel.core.devices import layer_device
from kestrel.core.errors import InvalidInputError
from kestrel.core.hooks import Controller, Detector, HookContext, HookManager
from kestrel.core.models import LoadedModel
from kestrel.core.steering import OP_CODES, apply_ops


@dataclass
class BlockEdits:
    """The edits of one block's MLP, as a pair of hooks: the MLP's input is kept (pre hook), then
    its output gets the edited latents' decoder change at their positions (forward hook).

    ``apply=False`` only records what the latents are (the unedited run's activations)."""

    block: int
    transcoder: Any
    edits: list[FeatureEdit]
    n_prompt: int
    apply: bool = True
    before_E: Tensor | None = None  # each latent's activation at its position in the last prompt pass
    after_E: Tensor | None = None  # what the edit set it to
    _input: Tensor | None = field(default=None, repr=False)  # the MLP's input in the current pass
    # per edit, built from the edits: positions (CPU), latents, op codes, amounts, decoder rows
    positions_E: Tensor = field(init=False, repr=False)
    latents_E: Tensor = field(init=False, repr=False)
    ops_E: Tensor = field(init=False, repr=False)
    amounts_E: Tensor = field(init=False, repr=False)
    directions_ED: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        W_dec = self.transcoder.W_dec
        device = W_dec.device
        self.positions_E = torch.tensor([e.position for e in self.edits], dtype=torch.long)
        self.latents_E = torch.tensor([e.latent for e in self.edits], dtype=torch.long, device=device)
        ops = [OP_CODES["scale" if e.scale is not None else "clamp"] for e in self.edits]
        amounts = [e.scale if e.scale is not None else e.value for e in self.edits]
        self.ops_E = torch.tensor(ops, dtype=torch.long, device=device)
        self.amounts_E = torch.tensor(amounts, dtype=W_dec.dtype, device=device)
        self.directions_ED = W_dec.detach()[self.latents_E]

    @property
    def layer(self) -> str:
        return f"model.layers.{self.block}.mlp"

    def hooks(self) -> list[Detector | Controller]:
        return [Detector(self.layer, self._keep_input, when="pre"), Controller(self.layer, self._edit)]

    def _keep_input(self, x: Tensor, ctx: HookContext) -> None:
        self._input = x

    def _edit(self, out: Tensor, ctx: HookContext) -> Tensor | None:
        x, self._input = self._input, None
        # The prompt pass is call 0; later passes of a generation with a KV cache see one new token
        # each (left alone), without a cache the whole sequence again (the prompt edited again).
        if x is None or not (ctx.call == 0 or x.shape[-2] > self.n_prompt):
            return None
        W_dec = self.transcoder.W_dec
        x_BED = x[:, self.positions_E.to(x.device)].to(device=W_dec.device, dtype=W_dec.dtype)
        encoded = self.transcoder.encode(x_BED)
        hits_BEK = encoded.indices == self.latents_E[:, None]
        current_BE = (encoded.acts * hits_BEK).sum(-1)
        new_BE = apply_ops(current_BE, self.ops_E, self.amounts_E)
        self.before_E, self.after_E = current_BE[0].detach().cpu(), new_BE[0].detach().cpu()
        if not self.apply:
            return None
        delta_BED = (new_BE - current_BE)[..., None] * self.directions_ED
        positions = self.positions_E.to(out.device)
        # in the MLP's own dtype: a float32 output would promote a half-precision residual stream
        return out.index_add(1, positions, delta_BED.to(device=out.device, dtype=out.dtype))


def block_edits(
    transcoders: Mapping[int, Any], edits: Sequence[FeatureEdit], n_prompt: int, *, apply: bool = True
) -> list[BlockEdits]:
    """One `BlockEdits` per edited block (in block order), each edit checked against its transcoder."""
    by_block: dict[int, list[FeatureEdit]] = {}
    for edit in edits:
        if edit.layer not in transcoders:
            raise InvalidInputError(f"node {edit.node!r}: no transcoder of block {edit.layer} was loaded")
        n_latents = transcoders[edit.layer].W_dec.shape[0]
        if not 0 <= edit.latent < n_latents or not 0 <= edit.position < n_prompt:
            raise InvalidInputError(
                f"node {edit.node!r} (latent {edit.latent}, position {edit.position}) is outside transcoder "
                f"{edit.sae_id!r} ({n_latents} latents) or the prompt ({n_prompt} tokens): the graph does "
                "not match its transcoder (was it replaced?)",
                details={"node": edit.node, "sae_id": edit.sae_id},
            )
        by_block.setdefault(edit.layer, []).append(edit)
    return [
        BlockEdits(block, transcoders[block], by_block[block], n_prompt, apply=apply)
        for block in sorted(by_block)
    ]


def edited_logits(lm: LoadedModel, ids_BT: Tensor, blocks: Sequence[BlockEdits]) -> Tensor:
    """[T, vocab] float32 logits of the prompt with the blocks' hooks active (edits, or records)."""
    with HookManager(lm.model, [hook for block in blocks for hook in block.hooks()]), torch.no_grad():
        return lm.model(input_ids=ids_BT, use_cache=False).logits[0].float()


def prompt_ids(lm: LoadedModel, graph: Mapping[str, Any]) -> Tensor:
    """The graph's prompt tokenized as the graph tokenized it; InvalidInputError when the model's
    tokenizer now splits it differently (the nodes' positions would point at other tokens)."""
    ids_BT = lm.tokenizer(graph["prompt"], return_tensors="pt")["input_ids"].to(lm.device)
    tokens = [lm.tokenizer.decode([t]) for t in ids_BT[0].tolist()]
    if tokens != list(graph["tokens"]):
        raise InvalidInputError(
            f"{lm.name!r} tokenizes the graph's prompt into {len(tokens)} tokens, not the graph's "
            f"{len(graph['tokens'])}: the node positions would not match; run the graph again",
            details={"tokens": tokens, "graph_tokens": list(graph["tokens"])},
        )
    return ids_BT


def intervene(
    lm: LoadedModel,
    graph: Mapping[str, Any],
    transcoders: Mapping[int, Any],
    edits: Sequence[FeatureEdit],
    *,
    top_k: int = 10,
    max_new_tokens: int = 0,
) -> dict[str, Any]:
    """The graph's target token and the top ``top_k`` next tokens before and after ``edits``
    (raw logits and probabilities at the last position), greedy continuations of ``max_new_tokens``
    both ways (None for 0), and each edited feature's activation before (the unedited run) and
    after (what the edit set). ``graph`` is the analysis's results.json; ``transcoders`` maps each
    edited block to its transcoder (moved here to the device of its block's MLP)."""
    for block, transcoder in transcoders.items():
        transcoder.to(layer_device(lm, f"model.layers.{block}.mlp")).eval()
    ids_BT = prompt_ids(lm, graph)
    n_prompt = ids_BT.shape[1]
    target = graph["target"]
    known = target.get("token_id")  # graphs made before it was recorded name the token only
    target_id = int(known) if known is not None else target_token_id(lm, target["token"])
    observed = block_edits(transcoders, edits, n_prompt, apply=False)
    edited = block_edits(transcoders, edits, n_prompt)
    before_V = edited_logits(lm, ids_BT, observed)[-1]
    after_V = edited_logits(lm, ids_BT, edited)[-1]
    activations = _activations(edits, observed, edited)  # of these passes, before generation reruns them
    continuations = (
        (_greedy(lm, ids_BT, [], max_new_tokens), _greedy(lm, ids_BT, edited, max_new_tokens))
        if max_new_tokens > 0
        else (None, None)
    )
    return {
        "target": _target(lm, target_id, before_V, after_V),
        "top_before": _top(lm, before_V, top_k),
        "top_after": _top(lm, after_V, top_k),
        "continuation_before": continuations[0],
        "continuation_after": continuations[1],
        "edits": activations,
    }


def _target(lm: LoadedModel, target_id: int, before_V: Tensor, after_V: Tensor) -> dict[str, Any]:
    return {
        "token": lm.tokenizer.decode([target_id]),
        "logit_before": float(before_V[target_id]),
        "logit_after": float(after_V[target_id]),
        "prob_before": float(before_V.softmax(-1)[target_id]),
        "prob_after": float(after_V.softmax(-1)[target_id]),
    }


def _top(lm: LoadedModel, logits_V: Tensor, k: int) -> list[dict[str, Any]]:
    probs_V = logits_V.softmax(-1)
    values, ids = logits_V.topk(min(k, logits_V.shape[-1]))
    return [
        {"token": lm.tokenizer.decode([i]), "logit": float(v), "prob": float(probs_V[i])}
        for v, i in zip(values.tolist(), ids.tolist(), strict=True)
    ]


def _greedy(lm: LoadedModel, ids_BT: Tensor, blocks: Sequence[BlockEdits], max_new_tokens: int) -> str:
    """Greedy continuation of exactly the graph's tokens (no re-tokenization, no padding)."""
    tokenizer = lm.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with HookManager(lm.model, [hook for block in blocks for hook in block.hooks()]), torch.no_grad():
        out_BT = lm.model.generate(
            input_ids=ids_BT,
            attention_mask=torch.ones_like(ids_BT),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    return tokenizer.decode(out_BT[0, ids_BT.shape[1] :], skip_special_tokens=True)


def _activations(
    edits: Sequence[FeatureEdit], observed: Sequence[BlockEdits], edited: Sequence[BlockEdits]
) -> list[dict[str, Any]]:
    """Each edit's activation in the unedited run and the value the edit gave it, in request order."""
    values: dict[str, tuple[float, float]] = {}
    for seen, done in zip(observed, edited, strict=True):
        assert seen.before_E is not None and done.after_E is not None  # both passes ran the hooks
        for i, edit in enumerate(seen.edits):
            values[edit.node] = (float(seen.before_E[i]), float(done.after_E[i]))
    return [
        {
            "node": e.node,
            "sae_id": e.sae_id,
            "layer": e.layer,
            "position": e.position,
            "latent": e.latent,
            "activation_before": values[e.node][0],
            "activation_after": values[e.node][1],
        }
        for e in edits
    ]
