"""Steering: ``kestrel steer`` and ``kestrel steering ...`` (saved configs)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from kestrel.cli.common import (
    DeviceOpt,
    JsonOpt,
    SaeModelOpt,
    StoreOpt,
    console,
    err_console,
    friendly_errors,
    open_store,
    print_json,
    print_table,
    sae_model,
)
from kestrel.core.catalog import DEFAULT_MODEL

cli = typer.Typer()
steering_app = typer.Typer(help="Saved steering configs.", no_args_is_help=True)
cli.add_typer(steering_app, name="steering")
# `kestrel steer -p ...` generates side by side; `kestrel steer sweep ...` sweeps strengths.
steer_app = typer.Typer(invoke_without_command=True)
cli.add_typer(steer_app, name="steer")


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


@steer_app.callback()
@friendly_errors
def steer(
    ctx: typer.Context,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", "-p", help="a prompt (repeatable)")] = None,
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
    model: SaeModelOpt = None,
    device: DeviceOpt = "auto",
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Generate default and steered continuations side by side (``steer sweep``: over strengths)."""
    from kestrel.core import steering
    from kestrel.core.concepts import read_dictionary
    from kestrel.core.errors import InvalidInputError
    from kestrel.core.models import load_model

    if ctx.invoked_subcommand is not None:
        return
    if not prompt:
        raise InvalidInputError("give at least one --prompt")
    the_store = open_store(store)
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
        lm = sae_model(the_store, config.sae_id, model, device)
    else:
        lm = load_model(model or DEFAULT_MODEL, device=device, store_root=the_store.local_root)
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
        return print_json(result)
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


@steer_app.command("sweep")
@friendly_errors
def steer_sweep(
    sae: Annotated[str, typer.Option("--sae", help="the SAE of the latent")],
    latent: Annotated[int, typer.Option("--latent", "-l", help="the latent to steer with")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="a prompt (repeatable)")],
    strength: Annotated[
        list[float] | None,
        typer.Option("--strength", "-s", help="a strength (repeatable) [default: 0 0.5 1 2 4 8]"),
    ] = None,
    keyword: Annotated[
        list[str] | None,
        typer.Option("--keyword", "-k", help="a topic word to report on (repeatable)"),
    ] = None,
    op: Annotated[str, typer.Option(help="add (to the latent) or clamp (it at the strength)")] = "add",
    absolute: Annotated[bool, typer.Option(help="strengths in activation units, not × max")] = False,
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate per strength")] = 24,
    fluency_ratio: Annotated[float, typer.Option(help="fluent: perplexity ≤ this × unsteered")] = 2.0,
    seed: Annotated[int, typer.Option(help="generation seed")] = 0,
    model: SaeModelOpt = None,
    device: DeviceOpt = "auto",
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Continuations at several strengths of one latent, with perplexity under the unsteered model,
    the keywords' effect, the fluent window and whether the latent steers within it."""
    from pydantic import ValidationError

    from kestrel.core import steering
    from kestrel.core.config import invalid_config
    from kestrel.core.steering_sweep import sweep_latent
    from kestrel.schemas import SteeringSweepRequest
    from kestrel.schemas.steering import DEFAULT_STRENGTHS

    try:
        request = SteeringSweepRequest(
            sae_id=sae,
            latent=latent,
            op=op,  # type: ignore[arg-type]
            unit="absolute" if absolute else "max_activation",
            strengths=strength or list(DEFAULT_STRENGTHS),
            prompts=prompt,
            keywords=keyword or [],
            max_new_tokens=max_new_tokens,
            seed=seed,
            fluency_ratio=fluency_ratio,
        ).check_size()
    except ValidationError as error:
        raise invalid_config(error, "sweep") from None
    the_store = open_store(store)
    steering.check_config(
        the_store, steering.SteeringConfig(sae_id=sae, edits=[{"latent": latent, "op": op, "value": 1.0}])
    )
    lm = sae_model(the_store, sae, model, device)
    result = sweep_latent(
        the_store, lm, request, lambda config: steering.plan_from_store(the_store, lm, config)
    )
    if as_json:
        return print_json(result)
    print_sweep(result)


def print_sweep(result: dict[str, Any]) -> None:
    """The sweep as a table (first prompt's text per strength) and its verdict."""
    from rich.markup import escape

    def num(value: float | None, fmt: str = ".2f") -> str:
        return "-" if value is None else format(value, fmt)

    base = result["baseline"]
    hits = "-" if base["keyword_hits"] is None else str(base["keyword_hits"])
    rows = [
        ["unsteered", "-", num(base["perplexity"]), "1.00", "yes", hits, "-", "-", base["items"][0]["text"]]
    ]
    for p in result["points"]:
        rows.append(
            [
                f"{p['strength']:g}",
                num(p["absolute_value"], ".3g"),
                num(p["steered_perplexity"]),
                num(p["perplexity_ratio"]),
                "yes" if p["fluent"] else "no",
                "-" if p["steered_keyword_hits"] is None else str(p["steered_keyword_hits"]),
                num(p["keyword_logprob_delta"], "+.2f"),
                f"{p['changed_fraction']:.0%}",
                p["items"][0]["text"],
            ]
        )
    print_table(
        ["strength", "value", "ppl", "ratio", "fluent", "hits", "Δlogp", "changed", "text (first prompt)"],
        rows,
        keep=("strength",),
    )
    console.print(escape(result["verdict"]))


@steering_app.command("list")
@friendly_errors
def steering_list(store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """List saved steering configs."""
    from kestrel.core import steering

    records = steering.list_configs(open_store(store))
    if as_json:
        return print_json(records)
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
    print_table(
        ["id", "name", "sae", "layer", "edits", "directions", "positions", "created"],
        rows,
        keep=("id", "sae"),
    )


@steering_app.command("show")
@friendly_errors
def steering_show(config_id: str, store: StoreOpt = None) -> None:
    """Preview a saved config: what it touches, with the latents' names."""
    from kestrel.core import steering

    the_store = open_store(store)
    print_json(steering.preview(the_store, steering.load_config(the_store, config_id)))


@steering_app.command("delete")
@friendly_errors
def steering_delete(config_id: str, store: StoreOpt = None) -> None:
    """Delete a saved steering config."""
    from kestrel.core import steering

    steering.delete_config(open_store(store), config_id)
    console.print(f"deleted steering config {config_id}")
