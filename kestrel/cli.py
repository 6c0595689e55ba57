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
saes_app = typer.Typer(help="Trained sparse autoencoders.", no_args_is_help=True)
app.add_typer(saes_app, name="saes")
concepts_app = typer.Typer(help="The concept dictionary of an SAE: names per latent.", no_args_is_help=True)
app.add_typer(concepts_app, name="concepts")
steering_app = typer.Typer(help="Saved steering configs.", no_args_is_help=True)
app.add_typer(steering_app, name="steering")

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
# The inline-texts-or-file dataset options of capture, discover and analyze causal (see _dataset_spec).
TextsOpt = Annotated[list[str] | None, typer.Option("--text", "-t", help="an inline text (repeatable)")]
TxtModeOpt = Annotated[str, typer.Option(help="txt files: a document per 'line' or per 'file'")]
DatasetFileOpt = Annotated[Path | None, typer.Option(help="a .txt, .jsonl, .csv or .parquet file")]
TextFieldOpt = Annotated[str, typer.Option(help="text column/field of jsonl, csv, parquet")]


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


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed = version("kestrel")
        except PackageNotFoundError:  # run from a source tree without installing it
            from kestrel import __version__ as installed
        console.print(f"kestrel {installed}", highlight=False)
        raise typer.Exit()


@app.callback()
def _quiet_transformers(
    _version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="print the version and exit"),
    ] = False,
) -> None:
    """Our own progress bars only: transformers' per-load bars are noise on a warm cache."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _store(root: Path | None):
    """``--store DIR`` names a local store; without it, the service's settings choose (local, s3, both)."""
    from kestrel.core.store import open_store
    from kestrel.settings import Settings

    return open_store(root) if root is not None else Settings().open_store()


SHORT_CELL = 20  # a column whose cells all fit this many characters never wraps (timestamps, counts)


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def _print_table(headers: list[str], rows: list[list[str]], *, keep: tuple[str, ...] = ("id",)) -> None:
    """Print rows under ``headers``, never cutting a cell short.

    The ``keep`` columns (ids, layer names: what a user copies into the next command) and short
    cells never wrap; long text (names, token lists) wraps within its column. When even that does
    not fit the terminal, the table is printed as wide as it needs and the terminal wraps its
    lines: an id is never cut to "run-202612…".
    """
    from rich import box

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    needed = 2 * (len(headers) - 1)  # the gaps between columns
    for i, header in enumerate(headers):
        widest = max([len(header), *(len(row[i]) for row in rows)])
        if header in keep or widest <= SHORT_CELL:
            table.add_column(header, no_wrap=True, min_width=widest)
            needed += widest
        else:
            table.add_column(header, overflow="fold", min_width=SHORT_CELL)
            needed += SHORT_CELL
    for row in rows:
        table.add_row(*row)
    # rich's print never goes wider than its console: a wider table gets a console of its own width
    out = console if needed <= console.width else Console(width=needed)
    out.print(table)


@app.command()
@friendly_errors
def gc(
    store: StoreOpt = None,
    older_than_hours: float = typer.Option(
        24.0, min=0.0, help="leave anything written more recently (a writer may still be at work)"
    ),
) -> None:
    """Remove what crashed writers left behind: staging directories, S3 keys without a manifest."""
    removed = _store(store).gc(older_than_s=older_than_hours * 3600)
    for item in removed:
        console.print(f"removed {item}")
    console.print(f"{len(removed)} leftover(s) removed")


@app.command()
@friendly_errors
def models(store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """List the bundled models (any Hugging Face causal LM id or local directory works too)."""
    from kestrel.core.models import available_models

    rows = available_models(_store(store).local_root)
    if as_json:
        return _print_json(rows)
    _print_table(
        ["name", "source", "installed", "cached", "description"],
        [[r["name"], r["source"], str(r["installed"]), str(r["cached"]), r["description"]] for r in rows],
        keep=("name",),
    )
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

    lm = load_model(model, device=device, store_root=_store(store).local_root)
    rows = [info for info in lm.layers if kind is None or info.kind == kind]
    if as_json:
        return _print_json([asdict(info) for info in rows])
    _print_table(
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


@app.command()
@friendly_errors
def capture(
    layer: Annotated[list[str], typer.Option("--layer", "-l", help="layer to capture (repeatable)")],
    model: Annotated[str, typer.Option(help="bundled name, local directory or hub id")] = "smollm2-135m",
    text: TextsOpt = None,
    file: Annotated[
        Path | None, typer.Option(help="a .txt, .jsonl, .csv or .parquet file (or a directory of .txt)")
    ] = None,
    text_field: Annotated[
        str, typer.Option(help="text column/field of jsonl, csv, parquet, HF datasets")
    ] = "text",
    txt_mode: TxtModeOpt = "line",
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
    lm = load_model(model, device=device, dtype=model_dtype, store_root=the_store.local_root)
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
    rows = [
        [
            m["id"],
            m["model"]["name"],
            ", ".join(m["layers"]),
            f"{m['n_tokens']:,}",
            f"{m['n_docs']:,}",
            m["dtype"],
            m["created"],
        ]
        for m in manifests
    ]
    _print_table(["id", "model", "layers", "tokens", "docs", "dtype", "created"], rows)


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
        _store(store),
        file,
        tensors=_pairs(tensor, "--tensor"),
        row_fields=_pairs(row_field, "--row-field"),
        dtype=_storage_dtype(dtype) if dtype is not None else None,
        model=model,
        model_source=_model_source(model),
        shard_mb=shard_mb,
        source={"kind": "file", "filename": file.name},
    )
    if as_json:
        return _print_json(manifest)
    layers = ", ".join(f"{name} (d={info['d']})" for name, info in manifest["layers"].items())
    console.print(f"imported run {manifest['id']}: {manifest['n_tokens']:,} rows of {layers}")


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


@app.command()
@friendly_errors
def train(
    run_id: Annotated[str, typer.Argument(help="the capture run to train on")],
    layer: Annotated[str, typer.Option("--layer", "-l", help="a layer of the run")],
    architecture: Annotated[str, typer.Option(help="topk, batchtopk or relu_l1")] = "topk",
    n_latents: Annotated[int, typer.Option(help="dictionary size")] = 4608,
    k: Annotated[int | None, typer.Option(help="active latents per token (topk, batchtopk)")] = None,
    l1_coefficient: Annotated[float | None, typer.Option(help="sparsity penalty (relu_l1)")] = None,
    epochs: Annotated[int, typer.Option(help="passes over the run")] = 1,
    token_budget: Annotated[
        int | None, typer.Option(help="train on this many tokens instead of epochs")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="rows per step [default: 4096, smaller on small runs]")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="learning rate [default: scaled with width]")] = None,
    seed: Annotated[int, typer.Option(help="seed of initialisation and data order")] = 0,
    checkpoint_every: Annotated[int | None, typer.Option(help="write a checkpoint every N steps")] = None,
    sae_id: Annotated[str | None, typer.Option(help="id of the new SAE [default: generated]")] = None,
    resume: Annotated[
        bool, typer.Option(help="continue a stopped run of --sae-id from its checkpoint")
    ] = False,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train an SAE on one layer of a capture run (attention-sink rows skipped)."""
    from tqdm.auto import tqdm

    from kestrel.core.sae import pipeline

    sae = {"architecture": architecture, "n_latents": n_latents}
    sae.update(
        {key: value for key, value in (("k", k), ("l1_coefficient", l1_coefficient)) if value is not None}
    )
    train_cfg = {
        "epochs": epochs,
        "token_budget": token_budget,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "checkpoint_every": checkpoint_every,
    }
    train_cfg = {key: value for key, value in train_cfg.items() if value is not None}
    bar = tqdm(desc="train", unit="step")

    def show(progress) -> None:
        bar.total = progress.total_steps
        bar.n = progress.step
        bar.set_postfix(
            fvu=f"{progress.fvu:.3f}", l0=f"{progress.l0:.1f}", dead=f"{progress.dead_fraction:.1%}"
        )
        bar.refresh()

    try:
        summary = pipeline.train_from_run(
            _store(store),
            run_id,
            layer,
            sae,
            train_cfg,
            sae_id=sae_id,
            on_progress=show,
            resume=resume,
            on_warning=lambda warning: err_console.print(f"[yellow]warning:[/] {warning}", highlight=False),
        )
    finally:
        bar.close()
    if as_json:
        return _print_json(summary)
    if summary["status"] != "complete":
        console.print(
            f"[yellow]sae {summary['id']} stopped[/] at step {summary['step']}; resume with --resume"
        )
        return None
    m = summary["metrics"]
    console.print(
        f"[green]sae {summary['id']}[/]: held-out FVU {m['fvu']:.3f}, L0 {m['l0']:.1f}, "
        f"dead {m['dead_fraction']:.1%}"
    )


@app.command("eval")
@friendly_errors
def evaluate(
    sae_id: Annotated[str, typer.Argument(help="the SAE to evaluate")],
    model: Annotated[str | None, typer.Option(help="model [default: the one the SAE was trained on]")] = None,
    device: DeviceOpt = "auto",
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """CE-loss recovered and KL with the model in the loop, on the run's held-out texts."""
    from kestrel.core.models import load_model
    from kestrel.core.sae import pipeline

    the_store = _store(store)
    summary = pipeline.get_sae(the_store, sae_id)
    lm = load_model(model or summary["model"], device=device, store_root=the_store.local_root)
    metrics = pipeline.evaluate_sae(the_store, sae_id, lm)
    if as_json:
        return _print_json(metrics)
    console.print(
        f"CE loss clean {metrics['ce_loss_clean']:.3f}, with SAE {metrics['ce_loss_sae']:.3f}, "
        f"zero-ablated {metrics['ce_loss_zero_ablated']:.3f}: "
        f"[green]recovered {metrics['ce_loss_recovered']:.3f}[/], "
        f"KL {metrics['kl_sae']:.4f} over {metrics['n_predicted_tokens']} tokens"
    )


@saes_app.command("list")
@friendly_errors
def saes_list(store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """List trained and imported SAEs."""
    from kestrel.core.sae import pipeline

    rows = pipeline.list_saes(_store(store))
    if as_json:
        return _print_json(rows)
    cells = []
    for r in rows:
        c, m = r["config"], r.get("metrics", {})
        cells.append(
            [
                r["id"],
                r["status"],
                str(r.get("layer")),
                str(c["n_latents"]),
                str(c.get("k")),
                f"{m['fvu']:.3f}" if "fvu" in m else "",
                f"{m['dead_fraction']:.1%}" if "dead_fraction" in m else "",
                r["created"],
            ]
        )
    _print_table(
        ["id", "status", "layer", "latents", "k", "fvu", "dead", "created"], cells, keep=("id", "layer")
    )


@saes_app.command("delete")
@friendly_errors
def saes_delete(sae_id: str, store: StoreOpt = None) -> None:
    """Delete an SAE and its checkpoints."""
    from kestrel.core.sae import pipeline

    pipeline.delete_sae(_store(store), sae_id)
    console.print(f"deleted sae {sae_id}")


# ---------------------------------------------------------------------------------------------
# Concepts and steering


def _dataset_spec(
    text: list[str] | None, file: Path | None, text_field: str, txt_mode: str, limit: int | None
):
    """An inline or file dataset from the shared options, or None when neither is given."""
    from kestrel.core.datasets import FileSource, TextsSource
    from kestrel.core.errors import InvalidInputError

    if text and file is not None:
        raise InvalidInputError("give --text or --file, not both")
    if text:
        return TextsSource(texts=text, limit=limit)
    if file is not None:
        return FileSource(path=str(file), text_field=text_field, txt_mode=_txt_mode(txt_mode), limit=limit)
    return None


def _sae_model(the_store, sae_id: str, model: str | None, device: str):
    from kestrel.core.models import load_model
    from kestrel.core.sae import pipeline

    summary = pipeline.get_sae(the_store, sae_id)
    name = model or summary.get("model") or summary["config"].get("model")
    return load_model(name, device=device, store_root=the_store.local_root)


@app.command()
@friendly_errors
def discover(
    sae_id: Annotated[str, typer.Argument(help="the SAE whose latents to explain")],
    run: Annotated[str | None, typer.Option(help="a stored run [default: the SAE's training run]")] = None,
    text: TextsOpt = None,
    file: DatasetFileOpt = None,
    text_field: TextFieldOpt = "text",
    txt_mode: TxtModeOpt = "line",
    limit: Annotated[int | None, typer.Option(help="documents at most")] = None,
    top_n: Annotated[int, typer.Option(help="top contexts kept per latent")] = 20,
    window: Annotated[int, typer.Option(help="tokens shown either side of a context's token")] = 8,
    keep_sinks: Annotated[bool, typer.Option(help="include attention-sink rows (position 0, ...)")] = False,
    model: Annotated[str | None, typer.Option(help="model [default: the SAE's]")] = None,
    device: DeviceOpt = "auto",
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Find each latent's top contexts, binned samples, density, histogram and logit effects."""
    from tqdm.auto import tqdm

    from kestrel.core.activations import RowFilter
    from kestrel.core.concepts import DiscoveryConfig
    from kestrel.core.concepts import discover as run_discovery

    the_store = _store(store)
    dataset = _dataset_spec(text, file, text_field, txt_mode, limit)
    config = DiscoveryConfig(top_n=top_n, window=window, **({"filters": RowFilter()} if keep_sinks else {}))
    lm = _sae_model(the_store, sae_id, model, device)
    bar = tqdm(desc="discover")

    def show(progress) -> None:
        bar.unit = progress.unit  # rows of a run, documents of a dataset
        bar.total = progress.total  # None (no total) for a file without --limit
        bar.n = progress.done
        bar.set_postfix(stage=progress.stage, tokens=progress.tokens, rows=progress.rows)
        bar.refresh()

    try:
        manifest = run_discovery(
            the_store, sae_id, lm, run_id=run, dataset=dataset, config=config, on_progress=show
        )
    finally:
        bar.close()
    if as_json:
        return _print_json(manifest)
    console.print(
        f"[green]features of {sae_id}[/] ({manifest['version']}): {manifest['alive_latents']:,} of "
        f"{manifest['n_latents']:,} latents fired on {manifest['n_rows']:,} rows "
        f"({manifest['n_tokens']:,} tokens, {manifest['tokens_per_s']:,.0f} tokens/s)"
    )


@app.command()
@friendly_errors
def features(
    sae_id: Annotated[str, typer.Argument(help="an SAE with discovered features")],
    search: Annotated[str | None, typer.Option(help="match names, tags, top and promoted tokens")] = None,
    latent: Annotated[int | None, typer.Option(help="show this latent's page instead of a list")] = None,
    sort: Annotated[str, typer.Option(help="latent, density or max_activation")] = "latent",
    limit: Annotated[int, typer.Option(help="rows to show")] = 30,
    offset: Annotated[int, typer.Option(help="rows to skip")] = 0,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List discovered features (searchable), or show one latent's contexts and logit effects."""
    from kestrel.core.concepts import feature_page, list_features

    the_store = _store(store)
    if latent is not None:
        page = feature_page(the_store, sae_id, latent)
        if as_json:
            return _print_json(page)
        return _print_feature_page(page)
    listing = list_features(the_store, sae_id, search=search, sort=sort, offset=offset, limit=limit)  # type: ignore[arg-type]
    if as_json:
        return _print_json(listing)
    rows = []
    for item in listing["items"]:
        concept = item["concept"] or {}
        rows.append(
            [
                str(item["latent"]),
                f"{item['density']:.2%}",
                f"{item['max_activation']:.2f}",
                " ".join(repr(t) for t in item["top_tokens"]),
                " ".join(repr(t) for t in item["promoted_tokens"][:3]),
                concept.get("name", ""),
                concept.get("source", ""),
            ]
        )
    _print_table(
        ["latent", "density", "max", "top tokens", "promotes", "name", "source"], rows, keep=("latent", "max")
    )
    console.print(f"{listing['total']:,} matching of {listing['n_latents']:,} latents")


def _print_feature_page(page: dict[str, Any]) -> None:
    from rich.markup import escape

    concept = page["concept"] or {}
    console.print(
        f"[bold]latent {page['latent']}[/] {escape(concept.get('name', ''))} "
        f"density {page['density']:.3%}, max {page['max_activation']:.3f}, mean {page['mean_activation']:.3f}"
    )
    for ctx in page["top_contexts"]:
        tokens = [escape(t) for t in ctx["tokens"]]
        tokens[ctx["target"]] = f"[bold reverse]{tokens[ctx['target']]}[/]"
        console.print(f"{ctx['activation']:8.3f}  {''.join(tokens)}".replace("\n", " "))
    promoted = ", ".join(repr(x["token"]) for x in page["logits"]["positive"])
    suppressed = ", ".join(repr(x["token"]) for x in page["logits"]["negative"])
    console.print(f"promotes: {escape(promoted)}\nsuppresses: {escape(suppressed)}")


@app.command()
@friendly_errors
def label(
    sae_id: Annotated[str, typer.Argument(help="an SAE with discovered features")],
    method: Annotated[
        str, typer.Option(help="heuristic (tokens) or model (the LM names them)")
    ] = "heuristic",
    latent: Annotated[
        list[int] | None, typer.Option("--latent", help="only these latents (repeatable)")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace manual names too")] = False,
    model: Annotated[str | None, typer.Option(help="model [default: the SAE's]")] = None,
    device: DeviceOpt = "auto",
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Name latents automatically; each name records its source (heuristic or model)."""
    from kestrel.core.concepts import label_features
    from kestrel.core.errors import InvalidInputError

    if method not in ("heuristic", "model"):
        raise InvalidInputError(f"--method must be heuristic or model, got {method!r}")
    the_store = _store(store)
    lm = _sae_model(the_store, sae_id, model, device) if method == "model" else None
    result = label_features(the_store, sae_id, method, lm=lm, latents=latent, overwrite=overwrite)  # type: ignore[arg-type]
    if as_json:
        return _print_json(result)
    console.print(f"labelled {result['labelled']} latent(s) of {sae_id} ({method})")


def _dictionary_format(value: str | None, path: Path | None) -> Literal["json", "csv"]:
    from kestrel.core.errors import InvalidInputError

    fmt = value or (path.suffix.lstrip(".").lower() if path is not None else "json")
    if fmt not in ("json", "csv"):
        raise InvalidInputError(f"dictionary format must be json or csv, got {fmt!r}")
    return fmt  # type: ignore[return-value]


@concepts_app.command("import")
@friendly_errors
def concepts_import(
    sae_id: Annotated[str, typer.Argument(help="the SAE the names are for")],
    path: Annotated[Path, typer.Argument(help="a .json or .csv dictionary file")],
    fmt: Annotated[
        str | None, typer.Option("--format", help="json or csv [default: from the suffix]")
    ] = None,
    replace: Annotated[bool, typer.Option(help="drop names not in the file")] = False,
    store: StoreOpt = None,
) -> None:
    """Import names from JSON or CSV, checked whole against the SAE before anything is written."""
    from kestrel.core.concepts import import_dictionary
    from kestrel.core.errors import NotFoundError

    if not path.is_file():
        raise NotFoundError(f"no file {str(path)!r}")
    result = import_dictionary(
        _store(store), sae_id, path.read_bytes(), _dictionary_format(fmt, path), replace=replace
    )
    console.print(f"imported {result['imported']} concept(s) into {sae_id}")


@concepts_app.command("export")
@friendly_errors
def concepts_export(
    sae_id: Annotated[str, typer.Argument(help="the SAE whose names to export")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="file [default: stdout]")] = None,
    fmt: Annotated[
        str | None, typer.Option("--format", help="json or csv [default: from the suffix]")
    ] = None,
    store: StoreOpt = None,
) -> None:
    """Export the dictionary as JSON or CSV."""
    from kestrel.core.concepts import export_dictionary

    text = export_dictionary(_store(store), sae_id, _dictionary_format(fmt, output))
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")
        console.print(f"wrote {output}")


@concepts_app.command("set")
@friendly_errors
def concepts_set(
    sae_id: Annotated[str, typer.Argument(help="the SAE")],
    latent: Annotated[int, typer.Argument(help="latent index")],
    name: Annotated[str, typer.Argument(help="its name")],
    description: Annotated[str, typer.Option(help="what it means")] = "",
    tag: Annotated[list[str] | None, typer.Option("--tag", help="a tag (repeatable)")] = None,
    store: StoreOpt = None,
) -> None:
    """Name one latent by hand (source: manual)."""
    from kestrel.core.concepts import Concept, update_concepts

    update_concepts(
        _store(store), sae_id, [Concept(latent=latent, name=name, description=description, tags=tag or [])]
    )
    console.print(f"latent {latent} of {sae_id}: {name}")


def _parse_edit(value: str, index: int) -> dict[str, Any]:
    """``LATENT:OP:VALUE`` (op scale, clamp or add), e.g. ``12:clamp:8``; a VALUE ending in ``x``
    counts multiples of the latent's max activation from discovery (``12:clamp:3x``)."""
    from kestrel.core.errors import InvalidInputError

    parts = value.split(":")
    if len(parts) != 3:
        raise InvalidInputError(f"--edit {index + 1} {value!r}: expected LATENT:OP:VALUE, e.g. 12:clamp:3x")
    amount, unit = parts[2], "absolute"
    if amount.lower().endswith("x"):
        amount, unit = amount[:-1], "max_activation"
    try:
        return {"latent": int(parts[0]), "op": parts[1], "value": float(amount), "unit": unit}
    except ValueError:
        raise InvalidInputError(
            f"--edit {index + 1} {value!r}: LATENT is an integer, VALUE a number (3x: 3 × the latent's max)"
        ) from None


def _parse_direction(value: str, index: int) -> dict[str, Any]:
    """``LAYER:ALPHA:LATENT``, e.g. ``model.layers.10:4:1234`` (the latent of ``--sae``)."""
    from kestrel.core.errors import InvalidInputError

    parts = value.rsplit(":", 2)
    if len(parts) != 3:
        raise InvalidInputError(f"--direction {index + 1} {value!r}: expected LAYER:ALPHA:LATENT")
    try:
        return {"layer": parts[0], "alpha": float(parts[1]), "latent": int(parts[2])}
    except ValueError:
        raise InvalidInputError(
            f"--direction {index + 1} {value!r}: ALPHA is a number, LATENT an integer"
        ) from None


@app.command()
@friendly_errors
def steer(
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="a prompt (repeatable)")],
    sae: Annotated[str | None, typer.Option("--sae", help="the SAE whose latents --edit names")] = None,
    edit: Annotated[
        list[str] | None,
        typer.Option(
            "--edit",
            "-e",
            help="LATENT:OP:VALUE, op scale|clamp|add; VALUEx = VALUE × the latent's max activation "
            "from discovery, e.g. 1234:clamp:3x (repeatable)",
        ),
    ] = None,
    direction: Annotated[
        list[str] | None,
        typer.Option(
            "--direction", "-d", help="LAYER:ALPHA:LATENT, add ALPHA × the --sae latent's decoder row"
        ),
    ] = None,
    config_id: Annotated[str | None, typer.Option("--config", help="a saved steering config")] = None,
    positions: Annotated[str, typer.Option(help="all, prompt or generated")] = "all",
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate")] = 20,
    sample: Annotated[bool, typer.Option(help="sample instead of greedy decoding")] = False,
    temperature: Annotated[float, typer.Option(help="sampling temperature")] = 1.0,
    seed: Annotated[int, typer.Option(help="seed of sampling (the same for both runs)")] = 0,
    top_latents: Annotated[int, typer.Option(help="show this many SAE latents per generated token")] = 0,
    save: Annotated[bool, typer.Option(help="save the config and print its id")] = False,
    model: Annotated[str | None, typer.Option(help="model [default: the SAE's]")] = None,
    device: DeviceOpt = "auto",
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Generate default and steered continuations side by side."""
    from kestrel.core import steering
    from kestrel.core.concepts import read_dictionary
    from kestrel.core.errors import InvalidInputError
    from kestrel.core.models import load_model

    the_store = _store(store)
    if config_id is not None:
        if sae or edit or direction:
            raise InvalidInputError("give --config, or --sae with --edit/--direction, not both")
        config = steering.load_config(the_store, config_id)
    else:
        edits = [_parse_edit(value, i) for i, value in enumerate(edit or [])]
        directions = [_parse_direction(value, i) for i, value in enumerate(direction or [])]
        config = steering.SteeringConfig(
            sae_id=sae,
            edits=edits,
            directions=directions,
            positions=positions,  # type: ignore[arg-type]
        )
    config = steering.check_config(the_store, config)
    if config.sae_id:
        lm = _sae_model(the_store, config.sae_id, model, device)
    else:
        lm = load_model(model or "smollm2-135m", device=device, store_root=the_store.local_root)
    plan = steering.plan_from_store(the_store, lm, config)
    names = {i: c.name for i, c in read_dictionary(the_store, config.sae_id).items()} if config.sae_id else {}
    result = steering.generate_side_by_side(
        lm,
        prompt,
        plan,
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature,
        seed=seed,
        top_latents=top_latents,
        names=names,
    )
    result["warnings"] = steering.edit_warnings(the_store, config)
    if save:
        result["config_id"] = steering.save_config(the_store, config)["id"]
    for warning in result["warnings"]:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    if as_json:
        return _print_json(result)
    from rich.markup import escape

    for item in result["items"]:
        console.print(f"[bold]{escape(item['prompt'])}[/]")
        console.print(f"  default: {escape(item['default']['text'])}")
        console.print(f"  [green]steered[/]: {escape(item['steered']['text'])}")
        for token in item["steered"].get("tokens", []):
            latents = ", ".join(
                f"{x['latent']}{'=' + x['name'] if x['name'] else ''} {x['value']:.2f}"
                for x in token["latents"]
            )
            console.print(f"    {escape(repr(token['token']))}: {escape(latents)}")
    if save:
        console.print(f"saved steering config {result['config_id']}")


@steering_app.command("list")
@friendly_errors
def steering_list(store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """List saved steering configs."""
    from kestrel.core import steering

    records = steering.list_configs(_store(store))
    if as_json:
        return _print_json(records)
    rows = [
        [
            r["id"],
            r["config"].get("name") or "",
            str(r["config"].get("sae_id")),
            str(r["config"].get("layer")),
            str(len(r["config"]["edits"])),
            str(len(r["config"]["directions"])),
            r["config"]["positions"],
            r["created"],
        ]
        for r in records
    ]
    _print_table(
        ["id", "name", "sae", "layer", "edits", "directions", "positions", "created"],
        rows,
        keep=("id", "sae"),
    )


@steering_app.command("show")
@friendly_errors
def steering_show(config_id: str, store: StoreOpt = None) -> None:
    """Preview a saved config: what it touches, with the latents' names."""
    from kestrel.core import steering

    the_store = _store(store)
    _print_json(steering.preview(the_store, steering.load_config(the_store, config_id)))


@steering_app.command("delete")
@friendly_errors
def steering_delete(config_id: str, store: StoreOpt = None) -> None:
    """Delete a saved steering config."""
    from kestrel.core import steering

    steering.delete_config(_store(store), config_id)
    console.print(f"deleted steering config {config_id}")


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
    console.print(f"store: {the_store.local_root}")
    lm = load_model(model, device="auto", store_root=the_store.local_root)
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


# ---------------------------------------------------------------------------------------------
# Analyses

analyze_app = typer.Typer(
    help="Analyses of a stored run or a model, written as a report with plots.", no_args_is_help=True
)
app.add_typer(analyze_app, name="analyze")
LayerOpt = Annotated[str, typer.Option("--layer", "-l", help="a layer the run captured")]
KeepSinksOpt = Annotated[
    bool, typer.Option(help="include attention-sink rows (position 0, specials, huge norms)")
]
NO_ROW_FILTERS = {"skip_position_0": False, "skip_special": False, "max_norm_multiple": None}


def _run_analysis_cli(store: Path | None, config: dict[str, Any], device: str, as_json: bool) -> None:
    """Run one analysis with a progress bar; print where its report is."""
    from tqdm.auto import tqdm

    from kestrel.core.analysis import get_analysis, report_path, run_analysis
    from kestrel.core.models import load_model

    the_store = _store(store)
    models: dict[tuple[str, str], Any] = {}

    def load(name: str, dtype: str | None = None) -> Any:
        key = (name, dtype or "fp32")
        if key not in models:
            models[key] = load_model(
                name, device=device, dtype=key[1], store_root=the_store.models_dir.parent
            )
        return models[key]

    bar = tqdm(desc=config["kind"], total=100, unit="%")

    def show(fraction: float | None, message: str) -> None:
        if fraction is not None:
            bar.n = round(100 * fraction)
        bar.set_postfix_str(message)
        bar.refresh()

    try:
        analysis_id = run_analysis(the_store, config, model_loader=load, progress=show)
    finally:
        bar.close()
    manifest = get_analysis(the_store, analysis_id)
    if as_json:
        return _print_json({**manifest, "report": str(report_path(the_store, analysis_id))})
    console.print(f"[green]analysis {analysis_id}[/] ({manifest['kind']}): {manifest['title']}")
    for key, value in manifest["key_numbers"].items():
        console.print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
    console.print(f"report: {report_path(the_store, analysis_id)}", soft_wrap=True, highlight=False)


@analyze_app.command("neuron")
@friendly_errors
def analyze_neuron(
    run_id: Annotated[str, typer.Argument(help="a stored activation run")],
    layer: LayerOpt,
    max_rows: Annotated[int | None, typer.Option(help="read at most this many rows")] = None,
    outlier_factor: Annotated[
        float, typer.Option(help="outlier: |mean| over this × median std, or max|x| × median max|x|")
    ] = 10.0,
    keep_sinks: KeepSinksOpt = False,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Per-dimension mean, std, max, fraction active, excess kurtosis; outlier dimensions named."""
    config: dict[str, Any] = {"kind": "neuron", "run_id": run_id, "layer": layer, "max_rows": max_rows}
    config["outlier_factor"] = outlier_factor
    if keep_sinks:
        config["filters"] = NO_ROW_FILTERS
    _run_analysis_cli(store, config, "cpu", as_json)


@analyze_app.command("feature")
@friendly_errors
def analyze_feature(
    run_id: Annotated[str, typer.Argument(help="a stored activation run")],
    layer: LayerOpt,
    clusters: Annotated[int, typer.Option(help="k-means clusters")] = 8,
    components: Annotated[int, typer.Option(help="principal components kept")] = 64,
    sample_rows: Annotated[int, typer.Option(help="uniform sample size for PCA and k-means")] = 20_000,
    keep_sinks: KeepSinksOpt = False,
    device: DeviceOpt = "cpu",
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """PCA (explained variance) and k-means clusters with the contexts nearest each centre."""
    config: dict[str, Any] = {"kind": "feature", "run_id": run_id, "layer": layer, "n_clusters": clusters}
    config.update(n_components=components, sample_rows=sample_rows)
    if keep_sinks:
        config["filters"] = NO_ROW_FILTERS
    _run_analysis_cli(store, config, device, as_json)


@analyze_app.command("causal")
@friendly_errors
def analyze_causal(
    layer: Annotated[
        list[str] | None, typer.Option("--layer", "-l", help="a module to ablate (repeatable)")
    ] = None,
    sae: Annotated[str | None, typer.Option(help="ablate latents of this SAE instead")] = None,
    latent: Annotated[list[int] | None, typer.Option(help="an SAE latent to ablate (repeatable)")] = None,
    model: Annotated[str, typer.Option(help="bundled name, local directory or hub id")] = "smollm2-135m",
    text: TextsOpt = None,
    file: DatasetFileOpt = None,
    text_field: TextFieldOpt = "text",
    txt_mode: TxtModeOpt = "line",
    method: Annotated[list[str] | None, typer.Option(help="zero and/or mean (repeatable)")] = None,
    max_texts: Annotated[int, typer.Option(help="texts read at most")] = 64,
    max_length: Annotated[int, typer.Option(help="tokens per text")] = 128,
    device: DeviceOpt = "auto",
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Zero / mean ablation of layers or SAE latents: Δ next-token loss and KL, ranked."""
    from kestrel.core.errors import InvalidInputError

    dataset = _dataset_spec(text, file, text_field, txt_mode, None)
    if dataset is None:
        raise InvalidInputError("give the texts to measure on: --text (repeatable) or --file")
    config: dict[str, Any] = {"kind": "causal", "dataset": dataset, "layers": layer or None}
    config.update(sae_id=sae, latents=latent or None, max_texts=max_texts, max_length=max_length)
    if sae is None or model != "smollm2-135m":
        config["model"] = model
    if method:
        config["methods"] = method
    _run_analysis_cli(store, config, device, as_json)


@analyze_app.command("circuit")
@friendly_errors
def analyze_circuit(
    pairs: Annotated[
        Path | None,
        typer.Option(help="a .json list or .jsonl of {clean, corrupted, correct, wrong} objects"),
    ] = None,
    clean: Annotated[str | None, typer.Option(help="one clean prompt")] = None,
    corrupted: Annotated[str | None, typer.Option(help="its corruption (same number of tokens)")] = None,
    correct: Annotated[str | None, typer.Option(help="the clean answer, one token (e.g. ' Paris')")] = None,
    wrong: Annotated[str | None, typer.Option(help="the corrupted answer, one token")] = None,
    layer: Annotated[
        list[str] | None,
        typer.Option("--layer", "-l", help="a module to patch (repeatable) [default: blocks]"),
    ] = None,
    model: Annotated[str, typer.Option(help="bundled name, local directory or hub id")] = "smollm2-135m",
    device: DeviceOpt = "auto",
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Activation patching per layer × position: the share of the logit difference each restores."""
    from kestrel.core.errors import InvalidInputError

    single = [clean, corrupted, correct, wrong]
    if (pairs is None) == all(value is None for value in single):
        raise InvalidInputError("give --pairs FILE, or --clean, --corrupted, --correct and --wrong")
    if pairs is not None:
        items = _read_pairs(pairs)
    elif any(value is None for value in single):
        raise InvalidInputError("a single pair needs all of --clean, --corrupted, --correct and --wrong")
    else:
        items = [{"clean": clean, "corrupted": corrupted, "correct": correct, "wrong": wrong}]
    config = {"kind": "circuit", "model": model, "pairs": items, "layers": layer or None}
    _run_analysis_cli(store, config, device, as_json)


def _read_pairs(path: Path) -> list[dict[str, Any]]:
    from kestrel.core.errors import InvalidInputError

    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{path}: malformed JSON at line {exc.lineno}: {exc.msg}") from None
    if not isinstance(items, list):
        raise InvalidInputError(f"{path}: expected a JSON list of pairs")
    return items


@app.command()
@friendly_errors
def worker(
    queue: Annotated[
        list[str] | None,
        typer.Option("--queue", "-q", help="interactive, generate or batch (repeatable) [default: batch]"),
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
        raise InvalidInputError(f"unknown queue(s) {unknown}; use {', '.join(QUEUES)}")
    run_worker(queues, name=name, burst=burst)


def is_loopback(host: str) -> bool:
    """The address only this machine can reach (``127.0.0.1``, ``::1``, ``localhost``)."""
    import ipaddress

    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name or an interface address: reachable from elsewhere


def refuse_open_without_key(host: str, insecure_no_auth: bool) -> None:
    """Exit 2 before listening on a non-loopback address with no API key, unless overridden."""
    from kestrel.settings import Settings

    settings = Settings()
    if is_loopback(host) or settings.api_key is not None or insecure_no_auth or settings.allow_no_auth:
        return
    err_console.print(
        f"[bold red]error:[/] refusing to listen on {host} without an API key: anyone who can reach it "
        "could run jobs and read every artifact. Set KESTREL_API_KEY, listen on 127.0.0.1, or, behind "
        "something else that authenticates, pass --insecure-no-auth (or set KESTREL_ALLOW_NO_AUTH=1)."
    )
    raise typer.Exit(2)


InsecureNoAuthOpt = Annotated[
    bool,
    typer.Option(
        "--insecure-no-auth",
        help="listen on a non-loopback address without an API key (same as KESTREL_ALLOW_NO_AUTH=1)",
    ),
]


@app.command()
def serve(
    host: Annotated[str, typer.Option(envvar="KESTREL_HOST", help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="KESTREL_PORT", help="port to listen on")] = 8000,
    insecure_no_auth: InsecureNoAuthOpt = False,
) -> None:
    """Run the HTTP API alone (Redis and workers must be running; see `kestrel up`).

    A non-loopback ``--host`` needs an API key (KESTREL_API_KEY) unless ``--insecure-no-auth``.
    """
    import uvicorn

    refuse_open_without_key(host, insecure_no_auth)
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
    insecure_no_auth: InsecureNoAuthOpt = False,
) -> None:
    """Start the service: Redis (the one at REDIS_URL, else an embedded one), an interactive and a
    batch worker, and the API; Ctrl-C stops everything."""
    import os

    refuse_open_without_key(host, insecure_no_auth)
    if insecure_no_auth:
        os.environ["KESTREL_ALLOW_NO_AUTH"] = "1"  # the API process `up` starts inherits it
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
