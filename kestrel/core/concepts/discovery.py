"""Discovery: for every latent of an SAE, what makes it fire and what it does.

Over a dataset (a forward to the SAE's layer, stopped there, as capture does) or over a stored
run (rows read from the store: no forward), each batch of rows is encoded by the SAE and folded
into a `FeatureAccumulator` (top-N rows, per-bin samples, counts, histogram), vectorised over
latents and rows. Contexts are rebuilt from the documents at the end, logit effects come from the
decoder and the unembedding, and the result is published under ``saes/<sae_id>/features/``.

A transcoder is discovered the same way: its latents are a function of the layer it reads
(``layer``, e.g. ``model.layers.10.mlp:input``, hooked as capture hooks it), and nothing here
decodes back into that layer. Its decoder rows write ``target_layer`` (the MLP's output, added to
the residual stream), so its logit effects are those rows through the unembedding, as an SAE's
at a residual layer (a skip-transcoder's linear term W_skip·x belongs to no latent: not shown).
A decoder that writes a space of another width than the unembedding reads, or a layer that is not
added to the residual stream (what an SAE of ``model.layers.3.mlp:input`` reconstructs, what a
transcoder writing a norm's output writes: `_off_residual_stream`), has no direct path to the
logits: its logit effects are left empty (the manifest's ``logit_effects`` says why).

Attention-sink rows are left out by default (``RowFilter.recommended()``: position 0, special
tokens, rows with a norm over 10x the layer's median), or every latent's top context would be the
first token. Memory is bounded by the SAE's size (n_latents × (top_n + log bins × samples)) and
one batch, whatever the dataset's length; documents are kept on disk (the run's ``docs.jsonl``,
or a temporary one written while a dataset streams).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

from kestrel.core.activations import _as_spec as as_dataset_spec
from kestrel.core.activations import record_spec
from kestrel.core.concepts import contexts
from kestrel.core.concepts import store as features_store
from kestrel.core.concepts.accumulate import FeatureAccumulator, FeatureTables, pack_rows

# Re-exported: defined in the torch-free module, still importable from here.
from kestrel.core.concepts.config import MAX_HIST_BINS as MAX_HIST_BINS
from kestrel.core.concepts.config import MAX_STATE_ENTRIES as MAX_STATE_ENTRIES
from kestrel.core.concepts.config import DiscoveryConfig
from kestrel.core.datasets import DatasetSpec, iter_texts, token_batches
from kestrel.core.devices import layer_device
from kestrel.core.errors import CancelledError, InvalidInputError, NotFoundError
from kestrel.core.hooks import HookManager, run_until_stopped
from kestrel.core.models import LoadedModel
from kestrel.core.run_reader import iter_row_batches
from kestrel.core.runs import RowFilter, RunManifest, get_manifest, parse_layer_spec
from kestrel.core.sae.artifacts import load_sae
from kestrel.core.sae.base import SAE
from kestrel.core.sae.records import SAEManifest
from kestrel.core.store import Store

ENCODE_CHUNK_ROWS = 4096
TOP_TOKENS = 3
STREAMING_SHARE = 0.9  # of a discovery's time: the rest is contexts and logit effects
LOGITS_DIRECT = "direct: decoder rows · final norm gain · unembedding"


@dataclass
class DiscoveryProgress:
    rows: int
    """Rows folded into the statistics (after filters)."""
    tokens: int
    """Tokens read (before filters): what capture throughput counts."""
    batches: int
    elapsed_s: float
    stage: str = "streaming"
    done: int = 0
    """How far the streaming pass is, in `unit`: rows read from a run (after filters), documents
    of a dataset through the model."""
    total: int | None = None
    """`done` at the end of the pass, when known up front: a run's rows less the filtered
    position-0 rows (an estimate: special tokens and outliers are not counted), the inline texts,
    or a dataset's ``limit``; None for a file or hub dataset without a limit."""
    unit: str = "rows"

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def fraction(self) -> float | None:
        """0..1, monotonic over one discovery: the streaming pass is `STREAMING_SHARE` of it,
        measured by `done` of `total`; None while streaming a source of unknown length."""
        if self.stage == "done":
            return 1.0
        if self.stage != "streaming":
            return STREAMING_SHARE
        if not self.total:
            return None
        return STREAMING_SHARE * min(1.0, self.done / self.total)


@dataclass
class _Batch:
    acts_ND: Tensor
    rows_N: Tensor
    n_tokens: int
    done: int
    """Progress of the pass after this batch: rows read so far (a run), documents forwarded (a dataset)."""


ProgressFn = Callable[[DiscoveryProgress], None]


def discover(
    store: Store,
    sae_id: str,
    lm: LoadedModel,
    *,
    run_id: str | None = None,
    dataset: DatasetSpec | Sequence[str] | None = None,
    config: DiscoveryConfig | dict[str, Any] | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Discover the features of ``sae_id`` over a dataset or a stored run; return the new manifest.

    Without either, the SAE's own training run is used. ``lm`` supplies the tokenizer (contexts),
    the unembedding (logit effects) and, for a dataset, the forward.
    """
    config = _as_config(config)
    log_bins = config.log_bins()
    sae, summary = load_sae(store, sae_id, device=lm.device)
    config.check_size(sae.n_latents)
    layer = summary.layer or sae.config.layer
    if not layer:
        raise InvalidInputError(f"sae {sae_id!r} does not record the layer it reads")
    sae = sae.to(layer_device(lm, parse_layer_spec(layer)[0]))  # a split model: where the layer runs
    if dataset is not None and run_id is not None:
        raise InvalidInputError("give a dataset or a run, not both")
    source = _source(store, summary, lm, layer, sae, run_id, dataset, config.filters)
    started = time.perf_counter()
    staging = features_store.staging_dir(store, sae_id)
    try:
        docs_path = source["docs_path"] or staging / "docs.jsonl"
        accumulator = FeatureAccumulator(
            sae.n_latents,
            top_n=config.top_n,
            n_bins=config.n_bins,
            samples_per_bin=config.samples_per_bin,
            log_bins=log_bins,
            seed=config.seed,
        )
        batches = _stream(source, lm, layer, config, docs_path)
        n_tokens, done = _accumulate(
            accumulator, sae, batches, started, on_progress, should_stop, source["total"], source["unit"]
        )
        n_tokens = source.get("n_tokens", n_tokens)  # a run's reader yields rows after its filters
        streaming_s = time.perf_counter() - started
        if on_progress is not None:
            on_progress(
                DiscoveryProgress(
                    accumulator.n_rows, n_tokens, 0, streaming_s, "contexts", done, done, source["unit"]
                )
            )
        tables = accumulator.finish()
        del accumulator  # the kept sets are in the tables now; free them before the contexts
        tensors = _tables_with_contexts(
            tables, docs_path, lm, source["max_length"] or config.max_length, config.window
        )
        logits, logit_note = _logit_effects(store, sae_id, sae, lm, config.logit_k)
        tensors.update(logits)
        if source["docs_path"] is None:
            docs_path.unlink(missing_ok=True)
        total_s = time.perf_counter() - started
        timings = {"streaming_seconds": round(streaming_s, 3), "seconds": round(total_s, 3)}
        summary_out = _summary(store, sae_id, sae, lm, layer, source, config, tables, n_tokens, timings)
        summary_out.update(kind=summary.kind, target_layer=summary.target_layer, logit_effects=logit_note)
        manifest = features_store.publish(store, sae_id, staging, tensors, _vocab(lm, tensors), summary_out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if on_progress is not None:
        on_progress(
            DiscoveryProgress(tables.n_rows, n_tokens, 0, total_s, "done", done, done, source["unit"])
        )
    return manifest


def _summary(
    store: Store,
    sae_id: str,
    sae: SAE,
    lm: LoadedModel,
    layer: str,
    source: dict[str, Any],
    config: DiscoveryConfig,
    tables: FeatureTables,
    n_tokens: int,
    timings: dict[str, float],
) -> dict[str, Any]:
    """What the features manifest says about the run that made them."""
    return {
        "sae_id": sae_id,
        "model": lm.name,
        "layer": layer,
        "n_latents": sae.n_latents,
        "source": source["describe"],
        "n_tokens": n_tokens,
        "n_rows": tables.n_rows,
        "alive_latents": int((tables.fire_count_L > 0).sum()),
        "config": config.model_dump(mode="json"),
        "window_center": config.window,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **timings,
        "tokens_per_s": round(n_tokens / timings["seconds"], 1) if timings["seconds"] > 0 else None,
        "logit_effects_key": _logit_key(store, sae_id, lm),
    }


def _as_config(config: DiscoveryConfig | dict[str, Any] | None) -> DiscoveryConfig:
    if config is None:
        return DiscoveryConfig()
    if isinstance(config, DiscoveryConfig):
        return config
    return DiscoveryConfig.from_dict(config)


# ---------------------------------------------------------------------------------------------
# Sources: a stored run, or a dataset through the model


def _source(
    store: Store,
    summary: SAEManifest,
    lm: LoadedModel,
    layer: str,
    sae: SAE,
    run_id: str | None,
    dataset: DatasetSpec | Sequence[str] | None,
    config_filters: RowFilter,
) -> dict[str, Any]:
    """Check the source against the SAE and the model before any work; describe it."""
    if dataset is not None:
        module, hook = parse_layer_spec(layer)
        info = lm.layer(module)  # NotFoundError naming close matches
        # a module's output width is known up front; its input's is checked by the encoder
        if hook == "output" and info.width not in (-1, sae.d_in):
            raise InvalidInputError(
                f"layer {layer!r} of {lm.name!r} has width {info.width}, the SAE reads {sae.d_in}"
            )
        spec = as_dataset_spec(dataset)
        return {
            "kind": "dataset",
            "spec": spec,
            "docs_path": None,
            "max_length": None,
            "norm_median": _training_norm_median(store, summary, layer, lm.name),
            "describe": {"kind": "dataset", "dataset": _describe(spec)},
            "total": _expected_docs(spec),
            "unit": "documents",
        }
    run_id = run_id or summary.run_id
    if not run_id:
        raise InvalidInputError(
            f"sae {summary.id!r} has no capture run of its own; give a run id or a dataset"
        )
    manifest = get_manifest(store, run_id)
    if layer not in manifest.layers:
        raise InvalidInputError(
            f"run {run_id!r} has no layer {layer!r} (it has {', '.join(manifest.layers)})"
        )
    if manifest.layers[layer].d != sae.d_in:
        raise InvalidInputError(
            f"layer {layer!r} of run {run_id!r} has width {manifest.layers[layer].d}, "
            f"the SAE reads {sae.d_in}"
        )
    if manifest.model.name != lm.name:
        raise InvalidInputError(
            f"run {run_id!r} was captured with {manifest.model.name!r} but the model given is "
            f"{lm.name!r}: contexts need the same tokenizer"
        )
    return {
        "kind": "run",
        "store": store,
        "run_id": run_id,
        "docs_path": store.local_path("activations", run_id, "docs.jsonl"),
        "max_length": manifest.options.max_length,
        "n_tokens": manifest.n_tokens,
        "total": _expected_rows(manifest, config_filters),
        "unit": "rows",
        "describe": {"kind": "run", "run_id": run_id},
    }


def _expected_rows(manifest: RunManifest, filters: RowFilter) -> int:
    """Rows a filtered read of the run yields, near enough for progress: every token, less one
    position-0 row per document when those are skipped."""
    return manifest.n_tokens - manifest.n_docs if filters.skip_position_0 else manifest.n_tokens


def _expected_docs(spec: Any) -> int | None:
    """Documents a dataset will yield, when known before reading it: inline texts, or a limit
    (an upper bound: a shorter file ends early, and progress then jumps at the end)."""
    limit = getattr(spec, "limit", None)
    texts = getattr(spec, "texts", None)
    if texts is not None:
        return min(len(texts), limit) if limit is not None else len(texts)
    return limit


def _describe(spec: Any) -> dict[str, Any]:
    described = spec.model_dump()
    if "texts" in described:
        described["texts"] = f"<{len(described['texts'])} inline texts>"
    return described


def _training_norm_median(store: Store, summary: SAEManifest, layer: str, model: str) -> float | None:
    """The layer's median row norm from the SAE's training run, if it is the same model and layer."""
    run_id = summary.run_id
    if not run_id or not store.exists("activations", run_id):
        return None
    manifest = get_manifest(store, run_id)
    if manifest.model.name != model or layer not in manifest.layers:
        return None
    return manifest.layers[layer].norm_median


def _stream(
    source: dict[str, Any], lm: LoadedModel, layer: str, config: DiscoveryConfig, docs_path: Path
) -> Iterator[_Batch]:
    if source["kind"] == "run":
        return _run_batches(source, layer, config)
    return _dataset_batches(source, lm, layer, config, docs_path)


def _run_batches(source: dict[str, Any], layer: str, config: DiscoveryConfig) -> Iterator[_Batch]:
    """Rows read from the store; the filters see the run's recorded norm median."""
    rows = 0
    for batch in iter_row_batches(
        source["store"],
        source["run_id"],
        layer,
        batch_size=config.batch_rows,
        filters=config.filters,
    ):
        rows += len(batch)
        yield _Batch(batch.acts_ND, pack_rows(batch.doc_index_N, batch.position_N), len(batch), rows)


def _dataset_batches(
    source: dict[str, Any], lm: LoadedModel, layer: str, config: DiscoveryConfig, docs_path: Path
) -> Iterator[_Batch]:
    """Forward each token batch to ``layer`` (stopped there) and keep the rows the filters allow.

    The documents are written to ``docs_path`` as they are read, so contexts can be rebuilt at
    the end without holding the dataset in memory.
    """
    seen: dict[str, Tensor] = {}
    special_ids = torch.tensor(sorted(lm.tokenizer.all_special_ids), dtype=torch.long, device=lm.device)
    norm_median = source["norm_median"]
    docs_done = 0
    with docs_path.open("w", encoding="utf-8") as docs_file:
        batches = token_batches(
            _tee_docs(iter_texts(source["spec"]), docs_file),
            lm.tokenizer,
            max_length=config.max_length,
            token_budget=config.token_budget,
        )
        with HookManager(lm.model, record_spec(layer, seen, "acts_BTD")), torch.inference_mode():
            for batch in batches:
                ids_BT = batch.input_ids_BT.to(lm.device)
                attn_BT = batch.attention_mask_BT.to(lm.device)
                run_until_stopped(
                    partial(lm.model, input_ids=ids_BT, attention_mask=attn_BT, use_cache=False)
                )
                positions_BT = torch.arange(ids_BT.shape[1], device=lm.device).expand_as(ids_BT)
                keep_BT = attn_BT.bool()
                if config.filters.skip_position_0:
                    keep_BT &= positions_BT > 0
                if config.filters.skip_special:
                    keep_BT &= ~torch.isin(ids_BT, special_ids)
                acts_BTD = seen.pop("acts_BTD")  # on the layer's device (a split model's may differ)
                acts_ND = acts_BTD[keep_BT.to(acts_BTD.device)].float()
                if config.filters.max_norm_multiple is not None and len(acts_ND):
                    norms_N = acts_ND.norm(dim=-1)
                    if norm_median is None:  # no training run to ask: the first batch's median
                        norm_median = float(norms_N.median())
                    small_N = norms_N <= config.filters.max_norm_multiple * norm_median
                    keep_BT[keep_BT.clone()] = small_N.to(keep_BT.device)
                    acts_ND = acts_ND[small_N]
                doc_BT = batch.doc_index_B.to(lm.device)[:, None].expand_as(ids_BT)
                rows_N = pack_rows(doc_BT[keep_BT], positions_BT[keep_BT])
                docs_file.flush()
                docs_done += len(batch.doc_index_B)  # a document is one row of one batch
                yield _Batch(acts_ND, rows_N, batch.n_tokens, docs_done)


def _tee_docs(texts: Iterator[str], docs_file: IO[str]) -> Iterator[str]:
    for i, text in enumerate(texts):
        docs_file.write(json.dumps({"doc_index": i, "text": text}, ensure_ascii=False) + "\n")
        yield text


def _accumulate(
    accumulator: FeatureAccumulator,
    sae: SAE,
    batches: Iterator[_Batch],
    started: float,
    on_progress: ProgressFn | None,
    should_stop: Callable[[], bool] | None,
    total: int | None,
    unit: str,
) -> tuple[int, int]:
    """Encode each batch (in chunks, so a dense-code SAE never makes a huge matrix) and fold it in;
    return the tokens read and how far the pass went (`DiscoveryProgress.done`)."""
    n_tokens = n_batches = done = 0
    with torch.inference_mode():
        for batch in batches:
            if should_stop is not None and should_stop():
                raise CancelledError("discovery cancelled; the previous features (if any) are kept")
            for start in range(0, len(batch.acts_ND), ENCODE_CHUNK_ROWS):
                chunk = slice(start, start + ENCODE_CHUNK_ROWS)
                encoded = sae.encode(batch.acts_ND[chunk].to(sae.W_enc.device))
                accumulator.add(encoded.acts, encoded.indices, batch.rows_N[chunk])
            n_tokens += batch.n_tokens
            n_batches += 1
            done = batch.done
            if on_progress is not None:
                elapsed = time.perf_counter() - started
                on_progress(
                    DiscoveryProgress(
                        accumulator.n_rows, n_tokens, n_batches, elapsed, "streaming", done, total, unit
                    )
                )
    if accumulator.n_rows == 0:
        raise InvalidInputError("no rows to discover on: the source is empty or every row was filtered out")
    return n_tokens, done


# ---------------------------------------------------------------------------------------------
# Finishing: contexts, logit effects, token strings


def _tables_with_contexts(
    tables: FeatureTables, docs_path: Path, lm: LoadedModel, max_length: int, window: int
) -> dict[str, Tensor]:
    """The tables as named tensors, with token windows for every top row and bin sample."""
    refs = torch.cat([tables.top_rows_LN.reshape(-1), tables.bin_rows_LBM.reshape(-1)])
    unique_R = torch.unique(refs[refs >= 0])  # sorted
    windows_RW = contexts.token_windows(
        unique_R, contexts.iter_docs_jsonl(docs_path), lm.tokenizer, max_length=max_length, window=window
    )
    top_windows = _windows_for(tables.top_rows_LN, unique_R, windows_RW)
    bin_windows = _windows_for(tables.bin_rows_LBM, unique_R, windows_RW)
    top_token_ids, top_token_counts = contexts.most_common_per_row(top_windows[..., window], TOP_TOKENS)
    density = tables.fire_count_L.double() / max(tables.n_rows, 1)
    return {
        "top_values": tables.top_values_LN,
        "top_rows": tables.top_rows_LN,
        "top_windows": top_windows,
        "bin_values": tables.bin_values_LBM,
        "bin_rows": tables.bin_rows_LBM,
        "bin_windows": bin_windows,
        "fire_count": tables.fire_count_L,
        "density": density.to(torch.float32),
        "max_activation": tables.max_activation_L,
        "mean_activation": tables.mean_activation_L,
        "hist_counts": tables.hist_counts_LF,
        "hist_edges": tables.hist_edges_F1,
        "top_token_ids": top_token_ids,
        "top_token_counts": top_token_counts,
    }


def _windows_for(rows: Tensor, unique_R: Tensor, windows_RW: Tensor) -> Tensor:
    """Windows laid out like ``rows`` (any shape); unused slots are all -1."""
    flat = rows.reshape(-1)
    width = windows_RW.shape[1]
    out = torch.full((len(flat), width), contexts.PAD_TOKEN, dtype=torch.int32)
    used = flat >= 0
    if len(unique_R):
        out[used] = windows_RW[torch.searchsorted(unique_R, flat[used])]
    return out.reshape(*rows.shape, width)


def _logit_key(store: Store, sae_id: str, lm: LoadedModel) -> str:
    """Logit effects depend only on the SAE's weights and the model: this names that pair."""
    weights = store.stat("saes", sae_id, "weights.safetensors")
    return f"{lm.name}:{weights.size}:{weights.version}"


def _logit_effects(
    store: Store, sae_id: str, sae: SAE, lm: LoadedModel, k: int
) -> tuple[dict[str, Tensor], str]:
    """The decoder rows' direct effects on the logits, and a note of what they are.

    Reused from the current version when it was made for the same SAE, model and k. Empty
    (``[L, 0]``) when the decoder writes a space of another width than the unembedding reads (an
    SAE of an MLP's hidden layer, say): such a row has no direct path to the logits.
    """
    with torch.inference_mode():
        unembed_VD, norm_scale_D = contexts.unembedding(lm)
    # whether there is a direct path is decided first, so a result of an older rule is not reused
    if sae.d_out != unembed_VD.shape[1]:
        return _no_logit_effects(sae.n_latents), (
            f"none: the decoder writes width {sae.d_out}, the unembedding reads "
            f"{unembed_VD.shape[1]}; no direct path to the logits"
        )
    off_stream = _off_residual_stream(lm, sae)
    if off_stream is not None:
        return _no_logit_effects(sae.n_latents), off_stream
    key = _logit_key(store, sae_id, lm)
    try:
        reader = features_store.FeatureReader(store, sae_id)
        if reader.manifest.get("logit_effects_key") == key and reader.manifest["config"]["logit_k"] == k:
            names = ("logit_pos_ids", "logit_pos_values", "logit_neg_ids", "logit_neg_values")
            return reader.full(*names), reader.manifest.get("logit_effects", LOGITS_DIRECT)
    except (KeyError, OSError, NotFoundError):
        pass
    with torch.inference_mode():
        return contexts.logit_effects(sae.W_dec.detach(), unembed_VD, norm_scale_D, k), LOGITS_DIRECT


#: Layer kinds whose output is added to the residual stream (or is it): a decoder writing one of
#: them has a direct path to the logits.
RESIDUAL_WRITERS = frozenset({"mlp", "attention", "block"})


def _off_residual_stream(lm: LoadedModel, sae: SAE) -> str | None:
    """Why the decoder rows have no direct path to the logits, or None: the decoder writes a layer
    that is not added to the residual stream, even when that layer is d_model wide, so the
    unembedding would read its rows as if it were.

    A transcoder writes its target layer: only a block's, an MLP's or attention's output (or a
    block's input) is on the stream. An SAE reconstructs the layer it reads, and only the clear
    case is taken off: the input of an MLP or attention (the block's normed residual). A norm's
    input is the residual stream itself, and a norm's output is either off it (a pre-norm), added
    to it (Gemma's post-norms) or what the head reads (the final norm), so an SAE there, or at a
    module the layer table does not know, keeps the direct reading."""
    target = getattr(sae.config, "target_layer", None)
    written = target or getattr(sae.config, "layer", None)
    if written is None:
        return None
    try:
        module, side = parse_layer_spec(written)
        kind = lm.layer(module).kind
    except (InvalidInputError, NotFoundError):
        return None  # an imported name this model does not have: nothing to say about its stream
    if target is None:
        off = side == "input" and kind in {"mlp", "attention"}
    else:
        off = not ((side == "output" and kind in RESIDUAL_WRITERS) or (side == "input" and kind == "block"))
    if not off:
        return None
    what = "decoder writes" if target is not None else "SAE reconstructs"
    return f"none: the {what} {written} ({kind}), which is not added to the residual stream"


def _no_logit_effects(n_latents: int) -> dict[str, Tensor]:
    """Logit effect tensors with no entries (each its own: safetensors refuses shared memory)."""
    return {
        f"logit_{sign}_{part}": torch.zeros(
            (n_latents, 0), dtype=torch.int64 if part == "ids" else torch.float32
        )
        for sign in ("pos", "neg")
        for part in ("ids", "values")
    }


def _vocab(lm: LoadedModel, tensors: dict[str, Tensor]) -> dict[str, str]:
    """Token strings for every id stored; unique ids per tensor first, so no big concatenation."""
    names = ("top_windows", "bin_windows", "top_token_ids", "logit_pos_ids", "logit_neg_ids")
    ids = torch.unique(torch.cat([torch.unique(tensors[name]).to(torch.int64) for name in names]))
    return contexts.token_strings(lm.tokenizer, ids)
