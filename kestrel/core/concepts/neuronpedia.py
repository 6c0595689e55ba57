"""Feature pages in Neuronpedia's bulk-import layout, so a Kestrel SAE's dashboards can be loaded
into a (self-hosted or public) Neuronpedia.

The layout is the one Neuronpedia's own exports use (``utils/neuronpedia-utils``: a directory per
model and source, JSON lines, the row lists gzipped in batches)::

    <model_id>/<layer>-<source_set>/release.jsonl, model.jsonl, sourceset.jsonl, source.jsonl
    <model_id>/<layer>-<source_set>/features/batch-<n>.jsonl.gz       one row per latent
    <model_id>/<layer>-<source_set>/activations/batch-<n>.jsonl.gz    one row per context
    <model_id>/<layer>-<source_set>/explanations/batch-<n>.jsonl.gz   one row per named latent

A feature row carries the decoder direction (the steering vector), the max activation, density,
the activation histogram and the logit effects discovery computed. An activation row needs the
latent's value at every token of its context, and discovery stores only the value at the target
token; so the export runs the model and the SAE again over each stored window and records what
the latent does at each of its tokens. The window is all the model sees then (its left half is
the context, after the tokenizer's BOS when it adds one), so these values can differ a little
from discovery's full-document value, which Kestrel's own feature page shows.

Top contexts carry ``binMin``/``binMax`` -1 (Neuronpedia's mark for "top activations"); samples
from discovery's activation bins carry their bin's bounds.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import torch

from kestrel.core.activations import record_spec
from kestrel.core.concepts.config import (
    EXPORT_FILE,
    EXPORT_RECORD,
    EXPORTS_DIR,
    NeuronpediaExport,
    export_rel,
    neuronpedia_layer_number,
)
from kestrel.core.concepts.contexts import PAD_TOKEN
from kestrel.core.concepts.dictionary import Concept, read_dictionary
from kestrel.core.concepts.features import PAGE_TENSORS
from kestrel.core.concepts.store import FeatureReader
from kestrel.core.errors import InvalidInputError
from kestrel.core.hooks import HookManager, run_until_stopped
from kestrel.core.models import LoadedModel, bos_prefix
from kestrel.core.runs import parse_layer_spec
from kestrel.core.sae.artifacts import load_sae
from kestrel.core.sae.base import SAE
from kestrel.core.store import Store, validate_id

#: Latents per batch file, as Neuronpedia's exporter writes them.
BATCH_LATENTS = 128
#: Windows per forward when recomputing per-token values.
FORWARD_WINDOWS = 64
#: Neuronpedia's hook point for a layer of each kind (TransformerLens names).
HOOK_POINTS = {"block": "hook_resid_post", "mlp": "hook_mlp_out", "attention": "hook_attn_out"}
#: ... and for the input of a module of each kind (``MODULE:input``: what a transcoder reads).
INPUT_HOOK_POINTS = {
    "block": "hook_resid_pre",
    "mlp": "ln2.hook_normalized",
    "attention": "ln1.hook_normalized",
}
#: ... and for a block's norm outputs (Llama-family names), the same points as their readers' inputs.
NORM_HOOK_POINTS = {
    ".post_attention_layernorm": "ln2.hook_normalized",
    ".input_layernorm": "ln1.hook_normalized",
}


def export_neuronpedia(
    store: Store,
    sae_id: str,
    lm: LoadedModel,
    options: NeuronpediaExport | None = None,
    *,
    on_progress: Callable[[float], None] | None = None,
) -> bytes:
    """A zip of the SAE's feature pages in Neuronpedia's layout (see the module docstring)."""
    options = options or NeuronpediaExport()
    reader = FeatureReader(store, sae_id)
    sae, summary = load_sae(store, sae_id)
    layer = summary.layer_name
    if layer is None:
        raise InvalidInputError(f"sae {sae_id!r} does not say which layer it reads")
    latents = _latents(reader, options.latents)
    model_id = options.model_id or _slug(lm.name)
    layer_num, hook = _hook_point(lm, layer)
    source_id = f"{layer_num}-{options.source_set}"
    rows = _Rows(model_id, source_id, options.creator)
    root = f"{model_id}/{source_id}"
    files: dict[str, bytes] = {
        f"{root}/release.jsonl": _line(rows.release(options, sae_id)),
        f"{root}/model.jsonl": _line(rows.model(lm)),
        f"{root}/sourceset.jsonl": _line(rows.source_set(options)),
        f"{root}/source.jsonl": _line(rows.source(options, summary.model_dump(mode="json"))),
    }
    values = _WindowValues(lm, sae, layer)
    concepts = read_dictionary(store, sae_id)
    batches = [latents[i : i + BATCH_LATENTS] for i in range(0, len(latents), BATCH_LATENTS)]
    for n, batch in enumerate(batches):
        features, activations = [], []
        for latent in batch:
            page = _latent_tensors(reader, latent)
            features.append(rows.feature(latent, page, sae, reader, f"blocks.{layer_num}.{hook}"))
            activations.extend(rows.activations(latent, _contexts(reader, page, options.bins), values))
        files[f"{root}/features/batch-{n}.jsonl.gz"] = _gz_lines(features)
        files[f"{root}/activations/batch-{n}.jsonl.gz"] = _gz_lines(activations)
        named = [rows.explanation(latent, concepts[latent]) for latent in batch if latent in concepts]
        if named:
            files[f"{root}/explanations/batch-{n}.jsonl.gz"] = _gz_lines(named)
        if on_progress is not None:
            on_progress((n + 1) / len(batches))
    return _zip(files)


def _latents(reader: FeatureReader, chosen: Sequence[int] | None) -> list[int]:
    if chosen is not None:
        if not chosen:
            raise InvalidInputError("latents is empty; omit it to export every latent that fired")
        outside = sorted({int(i) for i in chosen if not 0 <= int(i) < reader.n_latents})
        if outside:
            raise InvalidInputError(
                f"latents {outside} are out of range: sae {reader.sae_id!r} has {reader.n_latents} latents",
                details={"latents": outside, "n_latents": reader.n_latents},
            )
        return sorted({int(i) for i in chosen})
    fired = reader.full("fire_count")["fire_count"]
    latents = torch.nonzero(fired > 0).flatten().tolist()
    if not latents:
        raise InvalidInputError(
            f"no latent of sae {reader.sae_id!r} fired during discovery; nothing to export"
        )
    return latents


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9.-]+", "-", name.rsplit("/", 1)[-1].lower()).strip("-") or "model"


def _hook_point(lm: LoadedModel, layer: str) -> tuple[int, str]:
    """The layer's number and Neuronpedia's hook name for it (``model.layers.15`` → 15, resid_post;
    a transcoder's ``model.layers.15.mlp:input`` → 15, ln2.hook_normalized)."""
    module, hook = parse_layer_spec(layer)
    kind = lm.layer(module).kind
    if kind == "norm" and hook == "output":  # a block's norm output is what its MLP or attention reads
        for suffix, point in NORM_HOOK_POINTS.items():
            if module.endswith(suffix):
                return neuronpedia_layer_number(layer), point
    points = INPUT_HOOK_POINTS if hook == "input" else HOOK_POINTS
    return neuronpedia_layer_number(layer), points.get(kind, "hook_resid_post")


def _latent_tensors(reader: FeatureReader, latent: int) -> dict[str, torch.Tensor]:
    return reader.latent(latent, *PAGE_TENSORS) | {"hist_edges": reader.full("hist_edges")["hist_edges"]}


def _contexts(reader: FeatureReader, t: dict[str, torch.Tensor], with_bins: bool) -> list[dict[str, Any]]:
    """The windows to export: (token ids, target index, bin bounds or None for the top ones)."""
    center = int(reader.manifest["window_center"])
    out = [
        {"window": w, "center": center, "bin": None}
        for w, row in zip(t["top_windows"].tolist(), t["top_rows"].tolist(), strict=True)
        if row >= 0
    ]
    if with_bins:
        top = float(t["max_activation"])
        n_bins = t["bin_values"].shape[0]
        for b in range(n_bins):
            bounds = (top * b / n_bins, top * (b + 1) / n_bins)
            for w, row in zip(t["bin_windows"][b].tolist(), t["bin_rows"][b].tolist(), strict=True):
                if row >= 0:
                    out.append({"window": w, "center": center, "bin": bounds})
    return out


class _WindowValues:
    """One latent's value at every token of stored windows: the model and the SAE run again over
    each window (batched, right-padded), after BOS when the tokenizer adds one."""

    def __init__(self, lm: LoadedModel, sae: SAE, layer: str) -> None:
        self.lm, self.layer = lm, layer
        self.sae = sae.to(lm.device).eval()
        tok = lm.tokenizer
        self.bos = bos_prefix(tok)
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    def __call__(self, windows: list[list[int]], latent: int) -> list[list[float]]:
        out: list[list[float]] = []
        for start in range(0, len(windows), FORWARD_WINDOWS):
            out.extend(self._batch(windows[start : start + FORWARD_WINDOWS], latent))
        return out

    def _batch(self, windows: list[list[int]], latent: int) -> Iterator[list[float]]:
        # A window that reaches the start of its text holds the BOS capture saw; others get one.
        ids = [w if w[:1] == self.bos else self.bos + w for w in windows]
        width = max(len(x) for x in ids)
        ids_BT = torch.tensor([x + [self.pad] * (width - len(x)) for x in ids], device=self.lm.device)
        mask_BT = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=self.lm.device)
        seen: dict[str, torch.Tensor] = {}
        forward = partial(self.lm.model, input_ids=ids_BT, attention_mask=mask_BT, use_cache=False)
        with HookManager(self.lm.model, record_spec(self.layer, seen)), torch.inference_mode():
            run_until_stopped(forward)
            h_BTD = seen["h"].float()
            out = self.sae.to(h_BTD.device).encode(h_BTD.reshape(-1, h_BTD.shape[-1]))
            hit_NK = out.indices == latent
            value_N = (out.acts * hit_NK).sum(-1).reshape(h_BTD.shape[:2])
        for b, window in enumerate(windows):
            start = len(ids[b]) - len(window)
            yield [round(float(v), 4) for v in value_N[b, start : start + len(window)].tolist()]


class _Rows:
    """Neuronpedia's row shapes (its ``db_models``), with the fields Kestrel knows filled in."""

    def __init__(self, model_id: str, source_id: str, creator: str) -> None:
        self.model_id, self.source_id, self.creator = model_id, source_id, creator
        self.created = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())

    def release(self, options: NeuronpediaExport, sae_id: str) -> dict[str, Any]:
        text = options.description or f"Kestrel SAE {sae_id}"
        return {
            "name": options.source_set,
            "description": text,
            "descriptionShort": text,
            "creatorName": options.creator,
            "creatorNameShort": options.creator,
            "creatorId": self.creator,
            "visibility": "PUBLIC",
            "urls": [],
            "createdAt": self.created,
        }

    def model(self, lm: LoadedModel) -> dict[str, Any]:
        config = lm.model.config
        return {
            "id": self.model_id,
            "instruct": "instruct" in lm.name.lower() or self.model_id.endswith("-it"),
            "creatorId": self.creator,
            "displayNameShort": self.model_id,
            "displayName": lm.name,
            "dimension": getattr(config, "hidden_size", None),
            "layers": getattr(config, "num_hidden_layers", 0) or 0,
            "neuronsPerLayer": getattr(config, "intermediate_size", 0) or 0,
            "visibility": "PUBLIC",
            "createdAt": self.created,
            "updatedAt": self.created,
        }

    def source_set(self, options: NeuronpediaExport) -> dict[str, Any]:
        return {
            "modelId": self.model_id,
            "name": options.source_set,
            "creatorId": self.creator,
            "creatorName": options.creator,
            "releaseName": options.source_set,
            "description": options.description,
            "visibility": "PUBLIC",
            "hasDashboards": True,
            "createdAt": self.created,
        }

    def source(self, options: NeuronpediaExport, summary: dict[str, Any]) -> dict[str, Any]:
        dataset = summary.get("dataset") or {}
        return {
            "id": self.source_id,
            "modelId": self.model_id,
            "setName": options.source_set,
            "creatorId": self.creator,
            "hasDashboards": True,
            "visibility": "PUBLIC",
            "dataset": dataset.get("name") or dataset.get("kind") if isinstance(dataset, dict) else None,
            "notes": f"exported by Kestrel from SAE {summary.get('id')}",
            "createdAt": self.created,
        }

    def feature(
        self, latent: int, t: dict[str, torch.Tensor], sae: SAE, reader: FeatureReader, hook_name: str
    ) -> dict[str, Any]:
        edges = t["hist_edges"].clamp_min(1e-12)
        centers = (edges[:-1] * edges[1:]).sqrt()  # log-spaced bins: the geometric middle
        top = float(t["max_activation"])
        return {
            "modelId": self.model_id,
            "layer": self.source_id,
            "index": str(latent),
            "creatorId": self.creator,
            "createdAt": self.created,
            "maxActApprox": top,
            # a steering vector at hookName: a transcoder's decoder row writes another layer
            "hasVector": not sae.config.is_transcoder,
            "vector": [round(float(x), 6) for x in sae.W_dec[latent].tolist()],
            "vectorLabel": None,
            "vectorDefaultSteerStrength": top,
            "hookName": hook_name,
            "pos_str": [reader.token(i) for i in t["logit_pos_ids"].tolist()],
            "pos_values": [float(v) for v in t["logit_pos_values"].tolist()],
            "neg_str": [reader.token(i) for i in t["logit_neg_ids"].tolist()],
            "neg_values": [float(v) for v in t["logit_neg_values"].tolist()],
            "frac_nonzero": float(t["density"]),
            "freq_hist_data_bar_heights": [float(c) for c in t["hist_counts"].tolist()],
            "freq_hist_data_bar_values": [float(c) for c in centers.tolist()],
        }

    def activations(
        self, latent: int, contexts: list[dict[str, Any]], values: _WindowValues
    ) -> list[dict[str, Any]]:
        windows = [[tok for tok in c["window"] if tok != PAD_TOKEN] for c in contexts]
        per_token = values(windows, latent) if windows else []
        rows = []
        for context, window, vals in zip(contexts, windows, per_token, strict=True):
            leading = next((i for i, tok in enumerate(context["window"]) if tok != PAD_TOKEN), 0)
            top = max(vals)
            low, high = context["bin"] if context["bin"] is not None else (-1.0, -1.0)
            rows.append(
                {
                    "id": uuid.uuid4().hex,
                    "tokens": [values.lm.tokenizer.decode([tok]) for tok in window],
                    "modelId": self.model_id,
                    "layer": self.source_id,
                    "index": str(latent),
                    "maxValue": top,
                    "maxValueTokenIndex": vals.index(top),
                    "minValue": min(vals),
                    "values": vals,
                    "creatorId": self.creator,
                    "createdAt": self.created,
                    "binMin": low,
                    "binMax": high,
                    "qualifyingTokenIndex": context["center"] - leading,
                }
            )
        return rows

    def explanation(self, latent: int, concept: Concept) -> dict[str, Any]:
        text = concept.name + (f": {concept.description}" if concept.description else "")
        return {
            "id": uuid.uuid4().hex,
            "modelId": self.model_id,
            "layer": self.source_id,
            "index": str(latent),
            "description": text,
            "authorId": self.creator,
            "typeName": f"kestrel-{concept.source}",
            "explanationModelName": None,
            "createdAt": self.created,
        }


def _line(row: dict[str, Any]) -> bytes:
    return (json.dumps(row, ensure_ascii=False) + "\n").encode()


def _gz_lines(rows: list[dict[str, Any]]) -> bytes:
    return gzip.compress(b"".join(_line(r) for r in rows), compresslevel=5, mtime=0)


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:  # the members are gzipped
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def publish_export(store: Store, sae_id: str, export_id: str, data: bytes, record: dict[str, Any]) -> None:
    """Store an export under ``saes/<sae_id>/exports/<export_id>/``: staged out of sight, then one
    rename (an upload on S3), so a reader finds the whole zip or no export."""
    export_id = validate_id(export_id, "export id")
    staging = store.scratch_dir("saes", sae_id, f"{EXPORTS_DIR}/.staging-{export_id}")
    (staging / EXPORT_FILE).write_bytes(data)
    (staging / EXPORT_RECORD).write_text(json.dumps(record, ensure_ascii=False))
    store.put_tree("saes", sae_id, export_rel(export_id), staging)
