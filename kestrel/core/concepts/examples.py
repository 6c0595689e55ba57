"""Examples of latents for labelling and scoring, built the way EleutherAI's delphi builds them.

From a stored run (the SAE's own by default; no forward: its rows are read and encoded by the SAE):

* the token stream of each document is cut into fixed blocks of ``example_ctx_len`` tokens
  (delphi's ``example_ctx_len``; a document's last, shorter block is dropped, as delphi's fixed
  reshape has none);
* a latent's **activating examples** are the blocks where it fires, sorted by their largest
  activation (delphi's constructor with ``center_examples``: ``pool_max_activation_windows``);
* the labeller's examples (delphi's ``train``, type ``top``) are the top ``n_train`` blocks;
* the **test** examples are sampled from the rest with delphi's ``split_quantiles``: the sorted
  list cut into ``n_quantiles`` equal slices, ``n_test // n_quantiles`` drawn at random from
  each (so every activation level is scored, not just the top); a **calibration** split is drawn
  the same way from what is left, so no example is both shown, calibrated on and scored;
* **non-activating** examples are random blocks where the latent is zero at every token
  (delphi's ``random`` source; drawn without replacement here), split into the labeller's
  contrast set, calibration and test.

Attention-sink rows (position 0, special tokens, norm outliers: ``RowFilter.recommended()``)
count as zero, as in discovery. Memory: the token ids of the rows read (``max_tokens`` at most)
and the chosen latents' non-zero activations only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from kestrel.core.concepts.accumulate import POSITION_BITS, POSITION_MASK, pack_rows
from kestrel.core.concepts.config import ScoringConfig, scoring_run
from kestrel.core.errors import InvalidInputError
from kestrel.core.run_reader import iter_row_batches
from kestrel.core.runs import RowFilter
from kestrel.core.sae.artifacts import load_sae
from kestrel.core.store import Store

READ_BATCH_ROWS = 8192
ENCODE_CHUNK_ROWS = 4096


@dataclass
class Examples:
    """Blocks of one latent: token ids ``[n, C]`` and the latent's activation at each token."""

    tokens_NC: Tensor
    acts_NC: Tensor
    index_N: Tensor
    """Which blocks of the rows read they are (so splits can be shown disjoint)."""
    quantile: list[int] = field(default_factory=list)
    """Test/calibration examples: the quantile each came from (0: the top); else empty."""

    def __len__(self) -> int:
        return len(self.tokens_NC)


@dataclass
class LatentExamples:
    latent: int
    n_activating: int
    """Activating blocks found in the rows read."""
    train: Examples
    contrast: Examples
    test_activating: Examples
    test_non_activating: Examples
    calibration_activating: Examples
    calibration_non_activating: Examples

    @property
    def scorable(self) -> bool:
        """Enough of each split to score: two test examples of each class and calibration of each."""
        return (
            len(self.test_activating) >= 2
            and len(self.test_non_activating) >= 2
            and len(self.calibration_activating) >= 1
            and len(self.calibration_non_activating) >= 1
        )


@dataclass
class Blocks:
    """Every full block of the rows read, and the chosen latents' activations on them (sparse)."""

    tokens_BC: Tensor
    block_S: Tensor
    """Per stored activation: its block, offset, latent slot and value."""
    offset_S: Tensor
    slot_S: Tensor
    value_S: Tensor
    latents: list[int]
    run_id: str

    def acts_for(self, slot: int) -> Tensor:
        """``[n_blocks, C]`` activations of one chosen latent."""
        acts_BC = torch.zeros(self.tokens_BC.shape, dtype=torch.float32)
        mine = self.slot_S == slot
        acts_BC[self.block_S[mine], self.offset_S[mine]] = self.value_S[mine]
        return acts_BC


def read_blocks(
    store: Store, sae_id: str, latents: Sequence[int], config: ScoringConfig, *, run_id: str | None = None
) -> Blocks:
    """Read the run once: token blocks, and where each chosen latent fires in them."""
    sae, summary = load_sae(store, sae_id)
    run_id, layer, manifest = scoring_run(store, summary, run_id)
    sinks = RowFilter.recommended()
    special = torch.tensor(sorted(manifest.special_token_ids), dtype=torch.int32)
    median = manifest.layers[layer].norm_median
    slot_of = torch.full((sae.n_latents,), -1, dtype=torch.int64)
    slot_of[torch.tensor(list(latents), dtype=torch.int64)] = torch.arange(len(latents))
    parts: dict[str, list[Tensor]] = {k: [] for k in ("token", "key", "row", "slot", "value")}
    n_rows = 0
    with torch.inference_mode():
        for batch in iter_row_batches(store, run_id, layer, batch_size=READ_BATCH_ROWS, filters=RowFilter()):
            keep_N = batch.position_N > 0
            if len(special):
                keep_N &= ~torch.isin(batch.token_id_N.to(torch.int32), special)
            if median and sinks.max_norm_multiple is not None:
                keep_N &= batch.acts_ND.norm(dim=-1) <= sinks.max_norm_multiple * median
            for start in range(0, len(batch), ENCODE_CHUNK_ROWS):
                chunk = slice(start, start + ENCODE_CHUNK_ROWS)
                encoded = sae.encode(batch.acts_ND[chunk])
                slot_NK = slot_of[encoded.indices]
                hit_NK = (slot_NK >= 0) & (encoded.acts > 0) & keep_N[chunk, None]
                row_NK = torch.arange(start, start + hit_NK.shape[0])[:, None].expand_as(hit_NK)
                parts["row"].append(row_NK[hit_NK] + n_rows)
                parts["slot"].append(slot_NK[hit_NK])
                parts["value"].append(encoded.acts[hit_NK].float())
            parts["token"].append(batch.token_id_N.to(torch.int64))
            parts["key"].append(
                pack_rows(batch.doc_index_N.to(torch.int64), batch.position_N.to(torch.int64))
            )
            n_rows += len(batch)
            if n_rows >= config.max_tokens:
                break
    if n_rows == 0:
        raise InvalidInputError(f"run {run_id!r} has no rows to draw examples from")
    token_R, key_R = torch.cat(parts["token"]), torch.cat(parts["key"])
    row_S, slot_S, value_S = torch.cat(parts["row"]), torch.cat(parts["slot"]), torch.cat(parts["value"])
    return _blocks(token_R, key_R, row_S, slot_S, value_S, config.example_ctx_len, list(latents), run_id)


def _blocks(
    token_R: Tensor,
    key_R: Tensor,
    row_S: Tensor,
    slot_S: Tensor,
    value_S: Tensor,
    ctx_len: int,
    latents: list[int],
    run_id: str,
) -> Blocks:
    """Cut each document's rows (ordered by position) into full blocks of ``ctx_len`` tokens."""
    order_R = torch.argsort(key_R)
    key_R = key_R[order_R]
    block_key_R = (key_R >> POSITION_BITS << POSITION_BITS) | ((key_R & POSITION_MASK) // ctx_len)
    unique_K, inverse_R, counts_K = torch.unique_consecutive(
        block_key_R, return_inverse=True, return_counts=True
    )
    full_K = counts_K == ctx_len
    block_of_K = torch.full((len(unique_K),), -1, dtype=torch.int64)
    block_of_K[full_K] = torch.arange(int(full_K.sum()))
    block_R = block_of_K[inverse_R]  # in sorted order
    in_full_R = block_R >= 0
    tokens_BC = token_R[order_R][in_full_R].reshape(-1, ctx_len)
    rank_R = torch.empty_like(order_R)
    rank_R[order_R] = torch.arange(len(order_R))
    sorted_S = rank_R[row_S]
    block_S = block_R[sorted_S]
    offset_S = (key_R[sorted_S] & POSITION_MASK) % ctx_len
    used_S = block_S >= 0
    return Blocks(
        tokens_BC, block_S[used_S], offset_S[used_S], slot_S[used_S], value_S[used_S], latents, run_id
    )


def split_quantiles(
    n_examples: int, n_quantiles: int, n_samples: int, generator: torch.Generator
) -> tuple[list[int], list[int]]:
    """delphi's ``split_quantiles`` over indices ``0..n_examples-1`` (sorted, top first): equal
    slices, ``n_samples // n_quantiles`` drawn at random from each (all of a smaller slice).
    Returns the chosen indices and the quantile of each. Unlike delphi, fewer examples than
    quantiles make one quantile per example (delphi's slices would all be empty)."""
    n_quantiles = max(1, min(n_quantiles, n_examples))
    size = n_examples // n_quantiles
    per = n_samples // n_quantiles
    chosen: list[int] = []
    quantiles: list[int] = []
    for q in range(n_quantiles):
        slice_ = list(range(q * size, (q + 1) * size))
        if len(slice_) > per:
            picks = torch.randperm(len(slice_), generator=generator)[:per].sort().values.tolist()
            slice_ = [slice_[i] for i in picks]
        chosen += slice_
        quantiles += [q] * len(slice_)
    return chosen, quantiles


def latent_examples(blocks: Blocks, slot: int, config: ScoringConfig) -> LatentExamples:
    """One latent's splits (seeded by the config's seed and the latent, so a rerun draws the same)."""
    latent = blocks.latents[slot]
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + latent)
    acts_BC = blocks.acts_for(slot)
    max_B = acts_BC.max(dim=1).values
    activating = torch.nonzero(max_B > 0).flatten()
    activating = activating[torch.argsort(max_B[activating], descending=True, stable=True)]
    train_idx = activating[: config.n_train]
    rest = activating[config.n_train :]
    # at most one quantile per test example (delphi's split would draw none from each)
    n_quantiles = min(config.n_quantiles, config.n_test)
    test_pos, test_q = split_quantiles(len(rest), n_quantiles, config.n_test, generator)
    left = torch.ones(len(rest), dtype=torch.bool)
    left[test_pos] = False
    remaining = rest[left]
    calib_pos, calib_q = split_quantiles(
        len(remaining), min(n_quantiles, config.n_calibration), config.n_calibration, generator
    )
    silent = torch.nonzero(max_B == 0).flatten()
    silent = silent[torch.randperm(len(silent), generator=generator)]
    n_non, n_cal = config.n_non_activating, config.n_calibration
    contrast = silent[: config.n_contrast]
    test_non = silent[config.n_contrast : config.n_contrast + n_non]
    calib_non = silent[config.n_contrast + n_non : config.n_contrast + n_non + n_cal]

    def take(index: Tensor, quantile: list[int] | None = None) -> Examples:
        return Examples(blocks.tokens_BC[index], acts_BC[index], index, quantile or [])

    return LatentExamples(
        latent=latent,
        n_activating=len(activating),
        train=take(train_idx),
        contrast=take(contrast),
        test_activating=take(rest[test_pos], test_q),
        test_non_activating=take(test_non),
        calibration_activating=take(remaining[calib_pos], calib_q),
        calibration_non_activating=take(calib_non),
    )


def mean_active_tokens(examples: Examples) -> int:
    """delphi's ``n_incorrect``: the ceiling of the mean count of non-zero tokens per example."""
    if not len(examples):
        return 1
    return max(1, math.ceil(float((examples.acts_NC > 0).sum(dim=1).float().mean())))
