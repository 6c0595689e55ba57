"""Models, layers, and activation runs: ``kestrel models|layers|capture`` and ``kestrel runs ...``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from kestrel.cli.common import (
    DatasetFileOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    LimitOpt,
    ModelOpt,
    StoreOpt,
    TextsOpt,
    TxtModeOpt,
    capture_dataset,
    check_storage_dtype,
    console,
    friendly_errors,
    open_store,
    print_json,
    print_table,
)
from kestrel.cli.config_options import ConfigGroup, config_options
from kestrel.core.catalog import DEFAULT_MODEL
from kestrel.core.runs import CaptureOptions

#: capture's storage options (--max-length, --token-budget, --dtype, --drop-special...): one per field
CAPTURE_OPTIONS = ConfigGroup(CaptureOptions, panel="Capture")

cli = typer.Typer()
runs_app = typer.Typer(help="Stored activation runs.", no_args_is_help=True)
cli.add_typer(runs_app, name="runs")


@cli.command()
@friendly_errors
def models(store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """List the bundled models (any Hugging Face causal LM id or local directory works too)."""
    from kestrel.core.models import available_models

    rows = available_models(open_store(store).local_root)
    if as_json:
        return print_json(rows)
    print_table(
        ["name", "source", "installed", "cached", "description"],
        [[r["name"], r["source"], str(r["installed"]), str(r["cached"]), r["description"]] for r in rows],
        keep=("name",),
    )
    console.print("Any Hugging Face hub id (in the local HF cache) or local checkpoint directory also works.")


@cli.command()
@friendly_errors
def layers(
    model: Annotated[str, typer.Argument(help="bundled name, local directory or hub id")] = DEFAULT_MODEL,
    kind: Annotated[
        str | None, typer.Option(help="only this kind (block, attention, mlp, norm, ...)")
    ] = None,
    store: StoreOpt = None,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Print a model's layer table: the names that hooks, captures and SAEs take."""
    from dataclasses import asdict

    from kestrel.core.models import load_model

    lm = load_model(model, device=device, store_root=open_store(store).local_root)
    rows = [info for info in lm.layers if kind is None or info.kind == kind]
    if as_json:
        return print_json([asdict(info) for info in rows])
    print_table(
        ["name", "kind", "block", "width", "module"],
        [
            [
                info.name,
                info.kind,
                "" if info.index is None else str(info.index),
                str(info.width),
                info.module_type,
            ]
            for info in rows
        ],
        keep=("name",),
    )


@cli.command()
@friendly_errors
@config_options(options=CAPTURE_OPTIONS)
def capture(
    layer: Annotated[
        list[str],
        typer.Option(
            "--layer", "-l", help="layer to capture (repeatable); MODULE:input captures what MODULE reads"
        ),
    ],
    model: ModelOpt = DEFAULT_MODEL,
    text: TextsOpt = None,
    file: DatasetFileOpt = None,
    text_field: Annotated[
        str, typer.Option(help="text column/field of jsonl, csv, parquet, HF datasets")
    ] = "text",
    txt_mode: TxtModeOpt = "line",
    hf: Annotated[str | None, typer.Option(help="a Hugging Face dataset name (needs network)")] = None,
    hf_config: Annotated[str | None, typer.Option(help="the HF dataset's config")] = None,
    split: Annotated[str, typer.Option(help="the HF dataset's split")] = "train",
    limit: LimitOpt = None,
    run_id: Annotated[str | None, typer.Option(help="id of the new run [default: generated]")] = None,
    *,
    options: dict[str, Any],
    model_dtype: DtypeOpt = "fp32",
    device: DeviceOpt = "auto",
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Capture layers over a dataset into a new activation run."""
    from kestrel.core.activations import capture as run_capture
    from kestrel.core.models import load_model

    spec = capture_dataset(text, file, text_field, txt_mode, hf, hf_config, split, limit)
    the_store = open_store(store)
    lm = load_model(model, device=device, dtype=model_dtype, store_root=the_store.local_root)
    manifest = run_capture(
        lm, spec, layer, the_store, run_id=run_id, options=CaptureOptions(**options), progress_bar=True
    )
    if as_json:
        return print_json(manifest)
    m = manifest
    console.print(
        f"[green]run {m.id}[/]: {m.n_tokens:,} tokens from {m.n_docs:,} documents, "
        f"{len(m.layers)} layer(s), {len(m.shards)} shard(s) in {m.capture_seconds or 0:.1f} s"
    )


@runs_app.command("list")
@friendly_errors
def runs_list(store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """List complete activation runs."""
    from kestrel.core.runs import list_runs

    manifests = list_runs(open_store(store))
    if as_json:
        return print_json(manifests)
    rows = [
        [m.id, m.model.name, ", ".join(m.layers), f"{m.n_tokens:,}", f"{m.n_docs:,}", m.dtype, m.created]
        for m in manifests
    ]
    print_table(["id", "model", "layers", "tokens", "docs", "dtype", "created"], rows)


@runs_app.command("show")
@friendly_errors
def runs_show(run_id: str, store: StoreOpt = None) -> None:
    """Print a run's manifest."""
    from kestrel.core.runs import get_manifest

    print_json(get_manifest(open_store(store), run_id))


@runs_app.command("delete")
@friendly_errors
def runs_delete(run_id: str, store: StoreOpt = None) -> None:
    """Delete a run."""
    from kestrel.core.runs import delete_run

    delete_run(open_store(store), run_id)
    console.print(f"deleted run {run_id}")


@runs_app.command("import")
@friendly_errors
def runs_import(
    file: Annotated[Path, typer.Argument(help="a .safetensors file of [n_rows, d] activation tensors")],
    tensor: Annotated[
        list[str] | None,
        typer.Option(
            "--tensor",
            "-t",
            help="NAME=LAYER: import tensor NAME as LAYER (repeatable) "
            "[default: every 2-D float tensor, under its own name]",
        ),
    ] = None,
    row_field: Annotated[
        list[str] | None,
        typer.Option(
            "--row-field",
            help="FIELD=NAME: token_id, doc_index or position from tensor NAME "
            "(repeatable) [default: tensors with those names]",
        ),
    ] = None,
    model: Annotated[str | None, typer.Option(help="the model the activations came from")] = None,
    dtype: Annotated[
        str | None, typer.Option(help="storage dtype: fp16, bf16 or fp32 [default: the file's]")
    ] = None,
    shard_mb: Annotated[float, typer.Option(help="upper bound on one shard file (per layer)")] = 64.0,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Import activations computed elsewhere as a run, so SAEs can train and analyses run on it."""
    from kestrel.core.imports import import_activations

    manifest = import_activations(
        open_store(store),
        file,
        tensors=_pairs(tensor, "--tensor"),
        row_fields=_pairs(row_field, "--row-field"),
        dtype=check_storage_dtype(dtype) if dtype is not None else None,
        model=model,
        model_source=_model_source(model),
        shard_mb=shard_mb,
        source={"kind": "file", "filename": file.name},
    )
    if as_json:
        return print_json(manifest)
    layers = ", ".join(f"{name} (d={info.d})" for name, info in manifest.layers.items())
    console.print(f"imported run {manifest.id}: {manifest.n_tokens:,} rows of {layers}")


def _model_source(model: str | None) -> str | None:
    """How a worker would load ``model`` (bundled or a configured local model); None: record only."""
    from kestrel.core.models import BUNDLED
    from kestrel.settings import get_settings

    if model in BUNDLED:
        return "bundled"
    return "local" if model is not None and model in get_settings().local_models() else None


def _pairs(values: list[str] | None, option: str) -> dict[str, str] | None:
    """``["a=b", ...]`` → ``{"a": "b"}``; None when the option was not given."""
    from kestrel.core.errors import InvalidInputError

    if not values:
        return None
    pairs = {}
    for value in values:
        key, sep, target = value.partition("=")
        if not sep or not key or not target:
            raise InvalidInputError(f"{option} takes KEY=VALUE, got {value!r}")
        pairs[key] = target
    return pairs
