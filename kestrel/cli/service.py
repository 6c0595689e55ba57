"""The service and the store's upkeep: ``kestrel up|serve|worker|openapi|gc|demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kestrel.cli.common import (
    ModelOpt,
    StoreOpt,
    console,
    err_console,
    friendly_errors,
    open_store,
)
from kestrel.core.catalog import DEFAULT_MODEL

cli = typer.Typer()


@cli.command()
@friendly_errors
def gc(
    store: StoreOpt = None,
    older_than_hours: float = typer.Option(
        24.0, min=0.0, help="leave anything written more recently (a writer may still be at work)"
    ),
) -> None:
    """Remove what crashed writers left behind: staging directories, S3 keys without a manifest."""
    removed = open_store(store).gc(older_than_s=older_than_hours * 3600)
    for item in removed:
        console.print(f"removed {item}")
    console.print(f"{len(removed)} leftover(s) removed")


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


@cli.command()
@friendly_errors
def demo(
    model: ModelOpt = DEFAULT_MODEL,
    layer: Annotated[str, typer.Option(help="layer to capture")] = "model.layers.15",
    store: StoreOpt = None,
) -> None:
    """Load the default model, capture one layer over a few sample texts, and show what was stored."""
    from kestrel.core.activations import capture as run_capture
    from kestrel.core.models import load_model
    from kestrel.core.run_reader import RowBatch, iter_row_batches
    from kestrel.core.runs import CaptureOptions

    the_store = open_store(store)
    console.print(f"store: {the_store.local_root}")
    lm = load_model(model, device="auto", store_root=the_store.local_root)
    console.print(
        f"loaded {lm.name} ({lm.source}) in {lm.load_seconds:.1f} s: "
        f"{lm.n_blocks} blocks, d_model {lm.d_model}"
    )
    manifest = run_capture(lm, DEMO_TEXTS, [layer], the_store, options=CaptureOptions(), progress_bar=True)
    rows = RowBatch.cat(list(iter_row_batches(the_store, manifest.id, layer)))
    norms = rows.acts_ND.float().norm(dim=-1)
    sink = float(norms[rows.position_N == 0].mean() / norms[rows.position_N > 0].mean())
    console.print(
        f"[green]run {manifest.id}[/]: {manifest.n_tokens} tokens of {layer} "
        f"({manifest.dtype}, d={manifest.layer_width(layer)}); "
        f"first-token norm is {sink:.0f}x the others' "
        "(an attention sink: readers can skip it with RowFilter.recommended())"
    )
    console.print("next: kestrel layers | kestrel capture --help | kestrel runs list")


@cli.command()
@friendly_errors
def worker(
    queue: Annotated[
        list[str] | None,
        typer.Option("--queue", "-q", help="interactive, generate or batch (repeatable) [default: batch]"),
    ] = None,
    name: Annotated[str | None, typer.Option(help="worker name [default: random]")] = None,
    burst: Annotated[bool, typer.Option(help="exit once the queues are empty")] = False,
    gpus: Annotated[
        str | None,
        typer.Option(help="GPUs this worker owns: 0,1 or none [default: KESTREL_WORKER_GPUS, else all]"),
    ] = None,
) -> None:
    """Run a worker: takes jobs from the queues and keeps loaded models between them."""
    from kestrel.core.errors import InvalidInputError
    from kestrel.workers.lifecycle import QUEUES
    from kestrel.workers.worker import run_worker

    queues = queue or ["batch"]
    unknown = [q for q in queues if q not in QUEUES]
    if unknown:
        raise InvalidInputError(f"unknown queue(s) {unknown}; use {', '.join(QUEUES)}")
    run_worker(queues, name=name, burst=burst, gpus=gpus)


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


@cli.command()
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


@cli.command()
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
    from kestrel.workers.supervisor import up as run_up

    settings = Settings(host=host, port=port, **({"store_root": store} if store else {}))
    redis_url = os.environ.get("REDIS_URL") or os.environ.get("KESTREL_REDIS_URL")
    echo = partial(console.print, soft_wrap=True, highlight=False)  # URLs and paths stay on one line
    raise typer.Exit(run_up(settings, redis_url=redis_url, redis_port=redis_port, echo=echo))


@cli.command()
def openapi(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="where to write [default: openapi/openapi.json]")
    ] = None,
) -> None:
    """Export the API's OpenAPI document (sorted keys, stable), what SDKs are generated from."""
    from kestrel.server import openapi as spec

    console.print(f"wrote {spec.write(output or spec.SPEC_PATH)}")
