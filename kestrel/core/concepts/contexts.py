"""Token windows around chosen rows, rebuilt from the documents; token strings; logit effects.

Discovery keeps only packed row ids while it streams. The winners' contexts are made at the end
by reading the documents once more (``docs.jsonl``) and tokenising just the documents some
winner comes from, a chunk of documents at a time, with the tokenisation capture uses
(`kestrel.core.datasets.encode_texts`), so a row's ``position`` indexes the same token list.
Memory stays at one chunk of documents plus the output windows.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kestrel.core.concepts.accumulate import unpack_rows
from kestrel.core.datasets import encode_texts
from kestrel.core.devices import onloaded
from kestrel.core.errors import InvalidInputError
from kestrel.core.models import LoadedModel

PAD_TOKEN = -1
DOCS_PER_CHUNK = 256
LOGIT_CHUNK_LATENTS = 512


def iter_docs_jsonl(path: Path) -> Iterator[tuple[int, str]]:
    """(doc_index, text) of a ``docs.jsonl`` written by capture or discovery."""
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            record = json.loads(line)
            yield int(record["doc_index"]), record["text"]


def token_windows(
    rows_R: Tensor,
    docs: Iterable[tuple[int, str]],
    tokenizer: Any,
    *,
    max_length: int,
    window: int,
) -> Tensor:
    """``[R, 2·window + 1]`` int32 token ids centred on each packed row; -1 outside the document.

    ``rows_R`` must be sorted ascending and unique (so documents come in stream order).
    """
    width = 2 * window + 1
    windows_RW = torch.full((len(rows_R), width), PAD_TOKEN, dtype=torch.int32)
    if len(rows_R) == 0:
        return windows_RW
    doc_R, position_R = unpack_rows(rows_R)
    needed = set(torch.unique(doc_R).tolist())
    chunk_docs: list[int] = []
    chunk_texts: list[str] = []
    found = 0
    for doc_index, text in docs:
        if doc_index not in needed:
            continue
        chunk_docs.append(doc_index)
        chunk_texts.append(text)
        found += 1
        if len(chunk_docs) == DOCS_PER_CHUNK:
            _fill_chunk(windows_RW, doc_R, position_R, chunk_docs, chunk_texts, tokenizer, max_length, window)
            chunk_docs, chunk_texts = [], []
    if chunk_docs:
        _fill_chunk(windows_RW, doc_R, position_R, chunk_docs, chunk_texts, tokenizer, max_length, window)
    if found < len(needed):
        raise InvalidInputError(
            f"{len(needed) - found} document(s) named by activation rows are missing from the documents"
        )
    return windows_RW


def _fill_chunk(
    windows_RW: Tensor,
    doc_R: Tensor,
    position_R: Tensor,
    chunk_docs: list[int],
    chunk_texts: list[str],
    tokenizer: Any,
    max_length: int,
    window: int,
) -> None:
    """Windows for every row whose document is in this chunk, by index arithmetic on one flat tensor."""
    ids_per_doc = encode_texts(tokenizer, chunk_texts, max_length=max_length)
    lengths_D = torch.tensor([len(ids) for ids in ids_per_doc], dtype=torch.int64)
    flat_T = torch.tensor([token for ids in ids_per_doc for token in ids], dtype=torch.int32)
    offsets_D = torch.cumsum(lengths_D, 0) - lengths_D
    docs_D = torch.tensor(chunk_docs, dtype=torch.int64)
    lo = int(torch.searchsorted(doc_R, docs_D[0]))
    hi = int(torch.searchsorted(doc_R, docs_D[-1], right=True))
    if hi <= lo or len(flat_T) == 0:
        return
    slot_S = torch.searchsorted(docs_D, doc_R[lo:hi])
    shift_W = torch.arange(-window, window + 1)
    position_SW = position_R[lo:hi, None] + shift_W
    inside_SW = (position_SW >= 0) & (position_SW < lengths_D[slot_S, None])
    index_SW = (offsets_D[slot_S, None] + position_SW).clamp(0, len(flat_T) - 1)
    windows_RW[lo:hi] = torch.where(inside_SW, flat_T[index_SW], PAD_TOKEN)


def token_strings(tokenizer: Any, ids: Tensor) -> dict[str, str]:
    """Each distinct id (ignoring pads) as the text it decodes to, keyed by the id as a string."""
    unique = [int(i) for i in torch.unique(ids[ids >= 0]).tolist()]
    texts = tokenizer.batch_decode([[i] for i in unique], clean_up_tokenization_spaces=False)
    return {str(i): text for i, text in zip(unique, texts, strict=True)}


def final_norm_scale(model: torch.nn.Module, d_model: int) -> Tensor | None:
    """The final norm's elementwise gain, which the unembedding sees (Gemma stores gain − 1)."""
    for name in ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.final_layernorm"):
        module = dict(model.named_modules()).get(name)
        if module is None:
            continue
        with onloaded(module):  # a split model may have offloaded it (weights on meta)
            weight = getattr(module, "weight", None)
            if isinstance(weight, Tensor) and weight.shape == (d_model,):
                gain = weight.detach().float()
                return gain + 1 if "Gemma" in type(module).__name__ else gain
    return None


def unembedding(lm: LoadedModel) -> tuple[Tensor, Tensor | None]:
    """``(W_U [V, D] in float32 on the head's device, final norm gain [D] or None)``: what a
    direction's logit effect goes through (`direct_logits`)."""
    head = lm.model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise InvalidInputError(f"model {lm.name!r} has no output embedding to read logit effects through")
    with onloaded(head):  # a split model may have offloaded the head (weights on meta)
        unembed_VD = head.weight.detach().float()
    return unembed_VD, final_norm_scale(lm.model, unembed_VD.shape[1])


def direct_logits(directions_LD: Tensor, unembed_VD: Tensor, norm_scale_D: Tensor | None) -> Tensor:
    """``[L, V]`` = ``directions · diag(gain) · W_Uᵀ`` in float32 on the unembedding's device: the
    direct path from a residual direction to the logits, skipping the layers in between."""
    directions_LD = directions_LD.float().to(unembed_VD.device)
    if norm_scale_D is not None:
        directions_LD = directions_LD * norm_scale_D.to(directions_LD.device)
    return directions_LD @ unembed_VD.float().T


@torch.no_grad()
def logit_effects(
    decoder_LD: Tensor, unembed_VD: Tensor, norm_scale_D: Tensor | None, k: int
) -> dict[str, Tensor]:
    """Tokens each latent's decoder direction most promotes and suppresses through the unembedding.

    ``W_dec · diag(gain) · W_Uᵀ``, chunked over latents so the ``[latents, vocab]`` product never
    exists whole. The final norm's gain is included, its division by the norm is not (a direction
    has no norm of its own), the usual convention of logit-lens views of SAE latents.
    """
    unembed_VD = unembed_VD.float().to(decoder_LD.device)
    k = min(k, unembed_VD.shape[0])
    parts: dict[str, list[Tensor]] = {name: [] for name in ("pos_ids", "pos_values", "neg_ids", "neg_values")}
    for start in range(0, len(decoder_LD), LOGIT_CHUNK_LATENTS):
        logits_CV = direct_logits(decoder_LD[start : start + LOGIT_CHUNK_LATENTS], unembed_VD, norm_scale_D)
        top = logits_CV.topk(k, dim=1)
        bottom = logits_CV.topk(k, dim=1, largest=False)
        parts["pos_ids"].append(top.indices.cpu())
        parts["pos_values"].append(top.values.cpu())
        parts["neg_ids"].append(bottom.indices.cpu())
        parts["neg_values"].append(bottom.values.cpu())
    return {f"logit_{name}": torch.cat(chunks) for name, chunks in parts.items()}


def most_common_per_row(ids_LN: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k most frequent non-negative ids of each row and their counts (ties: smaller id first).

    Vectorised: sort each row, count run lengths with a scatter, then topk the counts.
    """
    n_rows, width = ids_LN.shape
    if width == 0:
        return torch.full((n_rows, k), PAD_TOKEN, dtype=torch.int64), torch.zeros(
            (n_rows, k), dtype=torch.int64
        )
    sorted_LN = ids_LN.to(torch.int64).sort(dim=1).values
    starts_LN = torch.ones_like(sorted_LN, dtype=torch.bool)
    starts_LN[:, 1:] = sorted_LN[:, 1:] != sorted_LN[:, :-1]
    run_LN = torch.cumsum(starts_LN.to(torch.int64), dim=1) - 1
    counts_LN = torch.zeros_like(sorted_LN).scatter_add_(1, run_LN, (sorted_LN >= 0).to(torch.int64))
    values_LN = torch.full_like(sorted_LN, PAD_TOKEN).scatter_(1, run_LN, sorted_LN)
    k_eff = min(k, width)
    # Break count ties towards the earlier run (smaller id) by a tiny position penalty.
    score_LN = counts_LN * (width + 1) - torch.arange(width)
    best_LK = score_LN.topk(k_eff, dim=1).indices
    top_counts = counts_LN.gather(1, best_LK)
    top_ids = torch.where(top_counts > 0, values_LN.gather(1, best_LK), PAD_TOKEN)
    if k_eff < k:
        pad = torch.full((n_rows, k - k_eff), PAD_TOKEN, dtype=torch.int64)
        top_ids, top_counts = torch.cat([top_ids, pad], 1), torch.cat([top_counts, torch.zeros_like(pad)], 1)
    return top_ids, top_counts
