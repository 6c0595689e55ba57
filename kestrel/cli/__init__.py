"""The ``kestrel`` command line: the engine from a shell, with progress bars.

Each command parses its options, calls one engine function and prints the result (tables with
rich, or JSON with ``--json`` for scripts). Engine errors print their message and exit 2, never a
traceback. One module per resource (runs, saes, concepts, steering, analyze, service).

Start-up stays fast: the modules whose options are generated from the engine's configs (which
import torch) are imported only when one of their commands runs or shows its help; ``kestrel
--help`` lists them from `LAZY_COMMANDS`.
"""

from __future__ import annotations

import importlib
import os
from difflib import get_close_matches
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from kestrel.cli import analyze, service, steering
from kestrel.cli.common import console
from kestrel.cli.service import is_loopback, refuse_open_without_key

__all__ = ["LAZY_COMMANDS", "app", "is_loopback", "refuse_open_without_key"]

#: Commands loaded on first use: name → (module, the short help ``kestrel --help`` shows). A test
#: checks each short help against the command's own.
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "models": (
        "kestrel.cli.runs",
        "List the bundled models (any Hugging Face causal LM id or local directory works too).",
    ),
    "layers": (
        "kestrel.cli.runs",
        "Print a model's layer table: the names that hooks, captures and SAEs take.",
    ),
    "capture": ("kestrel.cli.runs", "Capture layers over a dataset into a new activation run."),
    "runs": ("kestrel.cli.runs", "Stored activation runs."),
    "train": (
        "kestrel.cli.saes",
        "Train an SAE on one layer of a capture run (attention-sink rows skipped).",
    ),
    "train-stream": (
        "kestrel.cli.saes",
        "Train SAEs on several layers (a sweep of k / sizes per layer) and MLP transcoders in one pass.",
    ),
    "eval": (
        "kestrel.cli.saes",
        "CE-loss recovered and KL with the model in the loop, on the run's held-out texts.",
    ),
    "saes": ("kestrel.cli.saes", "Trained sparse autoencoders."),
    "discover": (
        "kestrel.cli.concepts",
        "Find each latent's top contexts, binned samples, density, histogram and logit effects.",
    ),
    "features": (
        "kestrel.cli.concepts",
        "List discovered features (searchable), or show one latent's contexts and logit effects.",
    ),
    "label": (
        "kestrel.cli.concepts",
        "Name latents automatically; each name records its source (heuristic or model).",
    ),
    "concepts": ("kestrel.cli.concepts", "The concept dictionary of an SAE: names per latent."),
}


def load_command(name: str) -> Any:
    """The real command ``name`` of `LAZY_COMMANDS`, built from its module's typer app."""
    module = importlib.import_module(LAZY_COMMANDS[name][0])
    built = typer.main.get_command(module.cli)
    return built.commands[name] if isinstance(built, TyperGroup) else built


class LazyGroup(TyperGroup):
    """The root group: eager commands as usual, `LAZY_COMMANDS` imported when first resolved."""

    listing = False  # true while the group's own help is rendered: lazy commands show a stub

    def list_commands(self, ctx: typer.Context) -> list[str]:
        return sorted({*self.commands, *LAZY_COMMANDS})

    def get_command(self, ctx: typer.Context, cmd_name: str) -> Any | None:
        if cmd_name in self.commands or cmd_name not in LAZY_COMMANDS:
            return self.commands.get(cmd_name)
        if self.listing:
            return TyperCommand(cmd_name, help=LAZY_COMMANDS[cmd_name][1])
        self.commands[cmd_name] = load_command(cmd_name)
        return self.commands[cmd_name]

    def resolve_command(self, ctx: typer.Context, args: list[str]) -> Any:
        try:
            return super().resolve_command(ctx, args)
        except Exception as exc:  # typer's UsageError: suggest among the lazy commands too
            if args and str(getattr(exc, "message", "")).startswith("No such command"):
                matches = get_close_matches(args[0], self.list_commands(ctx))
                suggestion = f" Did you mean {', '.join(repr(m) for m in matches)}?" if matches else ""
                exc.message = f"No such command {args[0]!r}.{suggestion}"  # type: ignore[attr-defined]
            raise

    def format_help(self, ctx: typer.Context, formatter: Any) -> None:
        self.listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self.listing = False


app = typer.Typer(
    name="kestrel",
    help="Kestrel: capture activations, train SAEs, find concepts and steer language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=LazyGroup,
)
for module in (steering, analyze, service):
    app.add_typer(module.cli)


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
    """Our own progress bars only: transformers' per-load bars are noise on a warm cache.

    Said through the environment, which transformers reads when a command first imports it,
    rather than by importing it here: ``kestrel serve`` (the API) never needs transformers, and
    the slim API image has none.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' tqdm follows it
