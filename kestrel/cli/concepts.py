"""What latents mean: ``kestrel discover|features|label`` and ``kestrel concepts ...``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from kestrel.cli.common import (
    DatasetFileOpt,
    DeviceOpt,
    JsonOpt,
    LimitOpt,
    SaeModelOpt,
    StoreOpt,
    TextFieldOpt,
    TextsOpt,
    TxtModeOpt,
    check_choice,
    console,
    dataset_spec,
    friendly_errors,
    open_store,
    print_json,
    print_table,
    sae_model,
)
from kestrel.cli.config_options import ConfigGroup, config_options
from kestrel.core.concepts import DiscoveryConfig
from kestrel.core.concepts.config import ScoringConfig
from kestrel.core.errors import InvalidInputError

#: --top-n, --window, --n-bins...: one per field; its row filters come from --keep-sinks or --config
DISCOVERY_OPTIONS = ConfigGroup(
    DiscoveryConfig, help={"seed": "seed of the binned samples"}, panel="Discovery"
)

#: --example-ctx-len, --n-test, --n-calibration...: how --score draws and scores examples
SCORING_OPTIONS = ConfigGroup(ScoringConfig, help={"seed": "seed of the example draws"}, panel="Scoring")

cli = typer.Typer()
concepts_app = typer.Typer(help="The concept dictionary of an SAE: names per latent.", no_args_is_help=True)
cli.add_typer(concepts_app, name="concepts")


@cli.command()
@friendly_errors
@config_options(config=DISCOVERY_OPTIONS)
def discover(
    sae_id: Annotated[str, typer.Argument(help="the SAE whose latents to explain")],
    run: Annotated[str | None, typer.Option(help="a stored run [default: the SAE's training run]")] = None,
    text: TextsOpt = None,
    file: DatasetFileOpt = None,
    text_field: TextFieldOpt = "text",
    txt_mode: TxtModeOpt = "line",
    limit: LimitOpt = None,
    *,
    config: dict[str, Any],
    keep_sinks: Annotated[bool, typer.Option(help="include attention-sink rows (position 0, ...)")] = False,
    model: SaeModelOpt = None,
    device: DeviceOpt = "auto",
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Find each latent's top contexts, binned samples, density, histogram and logit effects."""
    from tqdm.auto import tqdm

    from kestrel.core.concepts import discover as run_discovery
    from kestrel.core.runs import RowFilter

    the_store = open_store(store)
    dataset = dataset_spec(text, file, text_field, txt_mode, limit)
    config = DiscoveryConfig(**config, **({"filters": RowFilter()} if keep_sinks else {}))
    lm = sae_model(the_store, sae_id, model, device)
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
        return print_json(manifest)
    console.print(
        f"[green]features of {sae_id}[/] ({manifest['version']}): {manifest['alive_latents']:,} of "
        f"{manifest['n_latents']:,} latents fired on {manifest['n_rows']:,} rows "
        f"({manifest['n_tokens']:,} tokens, {manifest['tokens_per_s']:,.0f} tokens/s)"
    )


@cli.command()
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

    the_store = open_store(store)
    if latent is not None:
        page = feature_page(the_store, sae_id, latent)
        if as_json:
            return print_json(page)
        return _print_feature_page(page)
    listing = list_features(the_store, sae_id, search=search, sort=sort, offset=offset, limit=limit)  # type: ignore[arg-type]
    if as_json:
        return print_json(listing)
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
    print_table(
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
    note = page["logits"].get("note") or ""
    if note.startswith("none"):  # no direct path: say why rather than print two empty lists
        console.print(f"logit effects: {escape(note)}")
        return
    promoted = ", ".join(repr(x["token"]) for x in page["logits"]["positive"])
    suppressed = ", ".join(repr(x["token"]) for x in page["logits"]["negative"])
    console.print(f"promotes: {escape(promoted)}\nsuppresses: {escape(suppressed)}")


def _require_score_for_scoring_options(
    score: bool, scorer: str | None, run: str | None, scoring: ScoringConfig
) -> None:
    """A scoring flag without --score would be silently ignored: refuse it instead."""
    if score:
        return
    given = [name for name, value in (("--scorer", scorer), ("--run", run)) if value is not None]
    given += [f"--{name.replace('_', '-')}" for name in sorted(scoring.model_fields_set)]
    if given:
        raise InvalidInputError(
            f"{', '.join(given)} only apply to scoring: add --score (or leave them out)",
            details={"options": given},
        )


@cli.command()
@friendly_errors
@config_options(scoring=SCORING_OPTIONS)
def label(
    sae_id: Annotated[str, typer.Argument(help="an SAE with discovered features")],
    method: Annotated[
        str, typer.Option(help="heuristic (tokens) or model (the LM names them)")
    ] = "heuristic",
    latent: Annotated[
        list[int] | None, typer.Option("--latent", help="only these latents (repeatable)")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace manual names too")] = False,
    score: Annotated[
        bool, typer.Option(help="then score each name: detection, fuzzing, embedding (on held-out examples)")
    ] = False,
    scorer: Annotated[
        str | None,
        typer.Option(help="scoring model: bundled name, local path or cached hub id [default: --model]"),
    ] = None,
    run: Annotated[str | None, typer.Option(help="run the examples come from [default: the SAE's]")] = None,
    model: SaeModelOpt = None,
    device: DeviceOpt = "auto",
    store: StoreOpt = None,
    as_json: JsonOpt = False,
    *,
    scoring: dict[str, Any],
) -> None:
    """Name latents automatically; each name records its source (heuristic or model).

    With --score, each name is then scored (detection, fuzzing, embedding) on held-out examples.
    """
    from kestrel.core.concepts import label_features
    from kestrel.core.concepts.dictionary import LabelMethod
    from kestrel.core.models import load_model

    check_choice(method, "--method", LabelMethod)
    _require_score_for_scoring_options(score, scorer, run, ScoringConfig(**scoring))
    the_store = open_store(store)
    lm = sae_model(the_store, sae_id, model, device) if method == "model" or (score and not scorer) else None
    scorer_lm = (
        (load_model(scorer, device=device, store_root=the_store.local_root) if scorer else lm)
        if score
        else None
    )
    result = label_features(
        the_store,
        sae_id,
        method,  # type: ignore[arg-type]
        lm=lm,
        latents=latent,
        overwrite=overwrite,
        score=score,
        scorer=scorer_lm,
        scoring=ScoringConfig(**scoring),
        run_id=run,
    )
    if as_json:
        return print_json(result)
    console.print(f"labelled {result['labelled']} latent(s) of {sae_id} ({method})")
    if "scoring" in result:
        scored = result["scoring"]
        console.print(
            f"scored {scored['scored']} name(s) with {scored['scorer']} "
            f"({scored['already_scored']} already scored): `kestrel concepts list {sae_id} --sort detection`"
        )


@concepts_app.command("list")
@friendly_errors
def concepts_list(
    sae_id: Annotated[str, typer.Argument(help="the SAE")],
    sort: Annotated[str, typer.Option(help="latent, detection, fuzz or embedding (best first)")] = "latent",
    min_detection: Annotated[float | None, typer.Option(help="detection score at least")] = None,
    limit: Annotated[int, typer.Option(help="rows to show")] = 50,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The named latents with their labels' scores (balanced accuracy / AUROC; chance 0.5)."""
    from kestrel.core.concepts import read_dictionary
    from kestrel.core.concepts.dictionary import score_key, score_of, scores_at_least
    from kestrel.core.concepts.features import SCORE_SORTS

    check_choice(sort, "--sort", Literal["latent", "detection", "fuzz", "embedding"])
    concepts = read_dictionary(open_store(store), sae_id)
    rows = [c for _, c in sorted(concepts.items())]
    if min_detection is not None:
        rows = [c for c in rows if scores_at_least(c, {"detection": min_detection})]
    if sort != "latent":
        rows.sort(key=lambda c: score_key(c, sort), reverse=True)
    rows = rows[:limit]
    if as_json:
        return print_json([c.model_dump(mode="json") for c in rows])

    def cell(c: Any, name: str) -> str:
        value = score_of(c, name)
        return "" if value is None else f"{value:.2f}"

    print_table(
        ["latent", "name", "source", "detection", "fuzz", "embedding", "scorer"],
        [
            [
                str(c.latent),
                c.name,
                c.source,
                *(cell(c, n) for n in SCORE_SORTS),
                c.scores.scorer if c.scores else "",
            ]
            for c in rows
        ],
        keep=("latent",),
    )


def _dictionary_format(value: str | None, path: Path | None):
    from kestrel.core.concepts.dictionary import DictionaryFormat

    fmt = value or (path.suffix.lstrip(".").lower() if path is not None else "json")
    return check_choice(fmt, "--format", DictionaryFormat)


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
        open_store(store), sae_id, path.read_bytes(), _dictionary_format(fmt, path), replace=replace
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

    text = export_dictionary(open_store(store), sae_id, _dictionary_format(fmt, output))
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
        open_store(store),
        sae_id,
        [Concept(latent=latent, name=name, description=description, tags=tag or [])],
    )
    console.print(f"latent {latent} of {sae_id}: {name}")
