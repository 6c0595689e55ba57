"""The ``kestrel`` command line: the engine from a shell, with progress bars.

Each command parses its options, calls one engine function and prints the result (tables with
rich, or JSON with ``--json`` for scripts). Engine errors print their message and exit 2, never a
traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from kestrel.core.errors import KestrelError

app = typer.Typer(
    name="kestrel",
    help="Kestrel: capture activations, train SAEs, find concepts and steer language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
runs_app = typer.Typer(help="Stored activation runs.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")

console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

StoreOpt = Annotated[
    Path | None,
    typer.Option("--store", envvar="KESTREL_STORE_ROOT", help="store root directory [default: ./.kestrel]"),
]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda or auto")]
DtypeOpt = Annotated[str, typer.Option(help="model dtype: fp32, bf16 or fp16")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]


def friendly_errors(fn: F) -> F:
    """Print engine errors as one line and exit 2: a user's mistake is not a crash."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KestrelError as exc:
            err_console.print(f"[bold red]error:[/] {exc.message}")
            raise typer.Exit(2) from exc

    return wrapper  # type: ignore[return-value]


@app.callback()
def _quiet_transformers() -> None:
    """Our own progress bars only: transformers' per-load bars are noise on a warm cache."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _store(root: Path | None):
    from kestrel.core.models import default_store_root
    from kestrel.core.store import LocalStore

    return LocalStore(root or default_store_root())


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


@app.command()
@friendly_errors
def models(store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """List the bundled models (any Hugging Face causal LM id or local directory works too)."""
    from kestrel.core.models import available_models

    rows = available_models(_store(store).root)
    if as_json:
        return _print_json(rows)
    table = Table("name", "source", "installed", "cached", "description")
    for row in rows:
        table.add_row(
            row["name"], row["source"], str(row["installed"]), str(row["cached"]), row["description"]
        )
    console.print(table)
    console.print("Any Hugging Face hub id (in the local HF cache) or local checkpoint directory also works.")


@app.command()
@friendly_errors
def layers(
    model: Annotated[str, typer.Argument(help="bundled name, local directory or hub id")] = "smollm2-135m",
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

    lm = load_model(model, device=device, store_root=_store(store).root)
    rows = [info for info in lm.layers if kind is None or info.kind == kind]
    if as_json:
        return _print_json([asdict(info) for info in rows])
    table = Table("name", "kind", "block", "width", "module")
    for info in rows:
        table.add_row(
            info.name,
            info.kind,
            "" if info.index is None else str(info.index),
            str(info.width),
            info.module_type,
        )
    console.print(table)


@app.command()
@friendly_errors
def capture(
    layer: Annotated[list[str], typer.Option("--layer", "-l", help="layer to capture (repeatable)")],
    model: Annotated[str, typer.Option(help="bundled name, local directory or hub id")] = "smollm2-135m",
    text: Annotated[
        list[str] | None, typer.Option("--text", "-t", help="an inline text (repeatable)")
    ] = None,
    file: Annotated[
        Path | None, typer.Option(help="a .txt, .jsonl, .csv or .parquet file (or a directory of .txt)")
    ] = None,
    text_field: Annotated[
        str, typer.Option(help="text column/field of jsonl, csv, parquet, HF datasets")
    ] = "text",
    txt_mode: Annotated[str, typer.Option(help="txt files: a document per 'line' or per 'file'")] = "line",
    hf: Annotated[str | None, typer.Option(help="a Hugging Face dataset name (needs network)")] = None,
    hf_config: Annotated[str | None, typer.Option(help="the HF dataset's config")] = None,
    split: Annotated[str, typer.Option(help="the HF dataset's split")] = "train",
    limit: Annotated[int | None, typer.Option(help="documents at most")] = None,
    run_id: Annotated[str | None, typer.Option(help="id of the new run [default: generated]")] = None,
    max_length: Annotated[int, typer.Option(help="tokens per document")] = 512,
    token_budget: Annotated[int, typer.Option(help="padded tokens per forward batch")] = 8192,
    dtype: Annotated[str, typer.Option(help="storage dtype: fp16, bf16 or fp32")] = "fp16",
    drop_special: Annotated[bool, typer.Option(help="leave out special tokens")] = False,
    model_dtype: DtypeOpt = "fp32",
    device: DeviceOpt = "auto",
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Capture layers over a dataset into a new activation run."""
    from kestrel.core.activations import CaptureOptions
    from kestrel.core.activations import capture as run_capture
    from kestrel.core.datasets import FileSource, HFSource, TextsSource
    from kestrel.core.errors import InvalidInputError
    from kestrel.core.models import load_model

    sources = [s for s in (text, file, hf) if s]
    if len(sources) != 1:
        raise InvalidInputError("give exactly one dataset: --text (repeatable), --file or --hf")
    if text:
        spec: Any = TextsSource(texts=text, limit=limit)
    elif file is not None:
        spec = FileSource(path=str(file), text_field=text_field, txt_mode=_txt_mode(txt_mode), limit=limit)
    else:
        spec = HFSource(name=hf, config=hf_config, split=split, text_field=text_field, limit=limit)
    options = CaptureOptions(
        max_length=max_length,
        token_budget=token_budget,
        dtype=_storage_dtype(dtype),
        drop_special=drop_special,
    )
    the_store = _store(store)
    lm = load_model(model, device=device, dtype=model_dtype, store_root=the_store.root)
    manifest = run_capture(lm, spec, layer, the_store, run_id=run_id, options=options, progress_bar=True)
    if as_json:
        return _print_json(manifest)
    m = manifest
    console.print(
        f"[green]run {m['id']}[/]: {m['n_tokens']:,} tokens from {m['n_docs']:,} documents, "
        f"{len(m['layers'])} layer(s), {len(m['shards'])} shard(s) in {m['capture_seconds']:.1f} s"
    )


def _txt_mode(value: str) -> Literal["line", "file"]:
    from kestrel.core.errors import InvalidInputError

    if value not in ("line", "file"):
        raise InvalidInputError(f"--txt-mode must be 'line' or 'file', got {value!r}")
    return value  # type: ignore[return-value]


def _storage_dtype(value: str) -> Literal["fp16", "bf16", "fp32"]:
    from kestrel.core.errors import InvalidInputError

    if value not in ("fp16", "bf16", "fp32"):
        raise InvalidInputError(f"--dtype must be fp16, bf16 or fp32, got {value!r}")
    return value  # type: ignore[return-value]


@runs_app.command("list")
@friendly_errors
def runs_list(store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """List complete activation runs."""
    from kestrel.core.activations import list_runs

    manifests = list_runs(_store(store))
    if as_json:
        return _print_json(manifests)
    table = Table("id", "model", "layers", "tokens", "docs", "dtype", "created")
    for m in manifests:
        table.add_row(
            m["id"],
            m["model"]["name"],
            ", ".join(m["layers"]),
            f"{m['n_tokens']:,}",
            f"{m['n_docs']:,}",
            m["dtype"],
            m["created"],
        )
    console.print(table)


@runs_app.command("show")
@friendly_errors
def runs_show(run_id: str, store: StoreOpt = None) -> None:
    """Print a run's manifest."""
    from kestrel.core.activations import get_manifest

    _print_json(get_manifest(_store(store), run_id))


@runs_app.command("delete")
@friendly_errors
def runs_delete(run_id: str, store: StoreOpt = None) -> None:
    """Delete a run."""
    from kestrel.core.activations import delete_run

    delete_run(_store(store), run_id)
    console.print(f"deleted run {run_id}")


DEMO_TEXTS = [
    "The chef simmered the tomato sauce with garlic and fresh basil for an hour.",
    "In the second half the striker scored twice and the home crowd roared.",
    "Jupiter's moons were first observed by Galileo through a small telescope.",
    "Central banks raised interest rates to slow inflation and cool the bond market.",
    "Knead the dough until it is smooth, then let it rise in a warm place.",
    "The goalkeeper saved a penalty in the final minute of extra time.",
    "A supernova can briefly outshine an entire galaxy of billions of stars.",
    "Investors moved money from equities into government bonds as yields fell.",
]


@app.command()
@friendly_errors
def demo(
    model: Annotated[str, typer.Option(help="bundled name, local directory or hub id")] = "smollm2-135m",
    layer: Annotated[str, typer.Option(help="layer to capture")] = "model.layers.15",
    store: StoreOpt = None,
) -> None:
    """Load the default model, capture one layer over a few sample texts, and show what was stored."""
    from kestrel.core.activations import CaptureOptions, RowBatch, iter_row_batches
    from kestrel.core.activations import capture as run_capture
    from kestrel.core.models import load_model

    the_store = _store(store)
    console.print(f"store: {the_store.root}")
    lm = load_model(model, device="auto", store_root=the_store.root)
    console.print(
        f"loaded {lm.name} ({lm.source}) in {lm.load_seconds:.1f} s: "
        f"{lm.n_blocks} blocks, d_model {lm.d_model}"
    )
    manifest = run_capture(lm, DEMO_TEXTS, [layer], the_store, options=CaptureOptions(), progress_bar=True)
    rows = RowBatch.cat(list(iter_row_batches(the_store, manifest["id"], layer)))
    norms = rows.acts_ND.float().norm(dim=-1)
    sink = float(norms[rows.position_N == 0].mean() / norms[rows.position_N > 0].mean())
    console.print(
        f"[green]run {manifest['id']}[/]: {manifest['n_tokens']} tokens of {layer} "
        f"({manifest['dtype']}, d={manifest['layers'][layer]['d']}); "
        f"first-token norm is {sink:.0f}x the others' "
        "(an attention sink: readers can skip it with RowFilter.recommended())"
    )
    console.print("next: kestrel layers | kestrel capture --help | kestrel runs list")


# ---------------------------------------------------------------------------------------------
# The service


@app.command()
@friendly_errors
def worker(
    queue: Annotated[
        list[str] | None,
        typer.Option("--queue", "-q", help="interactive or batch (repeatable) [default: batch]"),
    ] = None,
    name: Annotated[str | None, typer.Option(help="worker name [default: random]")] = None,
    burst: Annotated[bool, typer.Option(help="exit once the queues are empty")] = False,
) -> None:
    """Run a worker: takes jobs from the queues and keeps loaded models between them."""
    from kestrel.core.errors import InvalidInputError
    from kestrel.workers.queues import QUEUES
    from kestrel.workers.worker import run_worker

    queues = queue or ["batch"]
    unknown = [q for q in queues if q not in QUEUES]
    if unknown:
        raise InvalidInputError(f"unknown queue(s) {unknown}; use {' or '.join(QUEUES)}")
    run_worker(queues, name=name, burst=burst)


@app.command()
def serve(
    host: Annotated[str, typer.Option(envvar="KESTREL_HOST", help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="KESTREL_PORT", help="port to listen on")] = 8000,
) -> None:
    """Run the HTTP API alone (Redis and workers must be running; see `kestrel up`)."""
    import uvicorn

    uvicorn.run("kestrel.server.app:create_app", factory=True, host=host, port=port, log_level="info")


@app.command()
@friendly_errors
def up(
    host: Annotated[
        str, typer.Option(envvar="KESTREL_HOST", help="address the API listens on")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="KESTREL_PORT", help="port the API listens on")] = 8000,
    store: StoreOpt = None,
    redis_port: Annotated[
        int,
        typer.Option(envvar="KESTREL_REDIS_PORT", help="port of the embedded Redis (if REDIS_URL is unset)"),
    ] = 6379,
) -> None:
    """Start the service: Redis (the one at REDIS_URL, else an embedded one), an interactive and a
    batch worker, and the API; Ctrl-C stops everything."""
    import os
    from functools import partial

    from kestrel.settings import Settings
    from kestrel.workers.runner import up as run_up

    settings = Settings(host=host, port=port, **({"store_root": store} if store else {}))
    redis_url = os.environ.get("REDIS_URL") or os.environ.get("KESTREL_REDIS_URL")
    echo = partial(console.print, soft_wrap=True, highlight=False)  # URLs and paths stay on one line
    raise typer.Exit(run_up(settings, redis_url=redis_url, redis_port=redis_port, echo=echo))


@app.command()
def openapi(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="where to write [default: openapi/openapi.json]")
    ] = None,
) -> None:
    """Export the API's OpenAPI document (sorted keys, stable), what SDKs are generated from."""
    from kestrel.server import openapi as spec

    console.print(f"wrote {spec.write(output or spec.SPEC_PATH)}")


if __name__ == "__main__":
    app()
