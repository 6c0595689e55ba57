"""What every command module shares: consoles, option types, error handling and output helpers.

Torch-free on purpose: ``kestrel --help`` imports this, and the engine loads only inside commands.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_args

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kestrel.core.catalog import DType
from kestrel.core.errors import KestrelError
from kestrel.core.sources import TxtMode

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
ModelOpt = Annotated[str, typer.Option(help="bundled name, local directory or hub id")]
# The inline-texts-or-file dataset options of capture, discover and analyze causal (see dataset_spec).
TextsOpt = Annotated[list[str] | None, typer.Option("--text", "-t", help="an inline text (repeatable)")]
TxtModeOpt = Annotated[str, typer.Option(help="txt files: a document per 'line' or per 'file'")]
DatasetFileOpt = Annotated[
    Path | None, typer.Option(help="a .txt, .jsonl, .csv or .parquet file (or a directory of .txt)")
]
TextFieldOpt = Annotated[str, typer.Option(help="text column/field of jsonl, csv, parquet")]
LimitOpt = Annotated[int | None, typer.Option(help="documents at most")]
# The model of a command that runs an SAE: its own unless one is named.
SaeModelOpt = Annotated[str | None, typer.Option(help="model [default: the SAE's]")]


def friendly_errors(fn: F) -> F:
    """Print engine errors as one line and exit 2: a user's mistake is not a crash."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KestrelError as exc:
            # escaped: a message may hold brackets (a list, "kestrel[gpu]") that rich would eat
            err_console.print(f"[bold red]error:[/] {escape(exc.message)}")
            raise typer.Exit(2) from exc

    return wrapper  # type: ignore[return-value]


def warn(message: str) -> None:
    """A warning on stderr (stdout stays parseable with --json)."""
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False)


def open_store(root: Path | None):
    """``--store DIR`` names a local store; without it, the service's settings choose (local, s3, both)."""
    from kestrel.core.store import open_store as open_root
    from kestrel.settings import Settings

    return open_root(root) if root is not None else Settings().open_store()


SHORT_CELL = 20  # a column whose cells all fit this many characters never wraps (timestamps, counts)


def print_json(obj: Any) -> None:
    """``obj`` as JSON; a manifest prints as its manifest.json holds it."""
    sys.stdout.write(json.dumps(_plain(obj), indent=2, default=str) + "\n")


def _plain(obj: Any) -> Any:
    from pydantic import BaseModel

    from kestrel.core.store import StoredManifest

    if isinstance(obj, StoredManifest):
        return obj.to_json()
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json", by_alias=True)
    if isinstance(obj, list):
        return [_plain(item) for item in obj]
    return obj


def print_table(headers: list[str], rows: list[list[str]], *, keep: tuple[str, ...] = ("id",)) -> None:
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


def check_choice(value: str, option: str, choices: Any) -> Any:
    """``value`` when it is one of the ``Literal`` type ``choices``; else the error naming them."""
    from kestrel.core.errors import InvalidInputError

    allowed = get_args(choices)
    if value not in allowed:
        raise InvalidInputError(f"{option} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def check_txt_mode(value: str) -> TxtMode:
    return check_choice(value, "--txt-mode", TxtMode)


def check_storage_dtype(value: str) -> DType:
    return check_choice(value, "--dtype", DType)


def dataset_spec(text: list[str] | None, file: Path | None, text_field: str, mode: str, limit: int | None):
    """An inline or file dataset from the shared options, or None when neither is given."""
    from kestrel.core.datasets import FileSource, TextsSource
    from kestrel.core.errors import InvalidInputError

    if text and file is not None:
        raise InvalidInputError("give --text or --file, not both")
    if text:
        return TextsSource(texts=text, limit=limit)
    if file is not None:
        return FileSource(path=str(file), text_field=text_field, txt_mode=check_txt_mode(mode), limit=limit)
    return None


def capture_dataset(
    text: list[str] | None,
    file: Path | None,
    text_field: str,
    txt_mode: str,
    hf: str | None,
    hf_config: str | None,
    split: str,
    limit: int | None,
) -> Any:
    """Exactly one dataset from --text / --file / --hf (capture, train-stream)."""
    from kestrel.core.datasets import HFSource
    from kestrel.core.errors import InvalidInputError

    if len([s for s in (text, file, hf) if s]) != 1:
        raise InvalidInputError("give exactly one dataset: --text (repeatable), --file or --hf")
    return dataset_spec(text, file, text_field, txt_mode, limit) or HFSource(
        name=hf, config=hf_config, split=split, text_field=text_field, limit=limit
    )


def sae_model(the_store, sae_id: str, model: str | None, device: str):
    """The model an SAE reads (its own unless ``model`` names another), loaded on ``device``."""
    from kestrel.core.models import load_model
    from kestrel.core.sae import artifacts

    name = model or artifacts.get_sae(the_store, sae_id).model_name
    return load_model(name, device=device, store_root=the_store.local_root)
