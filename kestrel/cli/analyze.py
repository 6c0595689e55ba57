"""Analyses written as reports: ``kestrel analyze neuron|feature|causal|circuit|graph``; and
``kestrel analyze intervene``, which tests a graph's feature nodes on the real model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from kestrel.cli.common import (
    DatasetFileOpt,
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    StoreOpt,
    TextFieldOpt,
    TextsOpt,
    TxtModeOpt,
    console,
    dataset_spec,
    friendly_errors,
    open_store,
    print_json,
    print_table,
)
from kestrel.core.catalog import DEFAULT_MODEL

cli = typer.Typer()
analyze_app = typer.Typer(
    help="Analyses of a stored run or a model, written as a report with plots.", no_args_is_help=True
)
cli.add_typer(analyze_app, name="analyze")
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

    the_store = open_store(store)
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
        return print_json({**manifest.to_json(), "report": str(report_path(the_store, analysis_id))})
    console.print(f"[green]analysis {analysis_id}[/] ({manifest.kind}): {manifest.title}")
    for key, value in manifest.key_numbers.items():
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
    model: ModelOpt = DEFAULT_MODEL,
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

    dataset = dataset_spec(text, file, text_field, txt_mode, None)
    if dataset is None:
        raise InvalidInputError("give the texts to measure on: --text (repeatable) or --file")
    config: dict[str, Any] = {"kind": "causal", "dataset": dataset, "layers": layer or None}
    config.update(sae_id=sae, latents=latent or None, max_texts=max_texts, max_length=max_length)
    if sae is None or model != DEFAULT_MODEL:
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
    method: Annotated[
        str, typer.Option(help="atp: gradient estimates, top cells confirmed; patching: every cell patched")
    ] = "atp",
    component: Annotated[
        list[str] | None,
        typer.Option("--component", "-c", help="resid, heads or latents (repeatable) [default: resid]"),
    ] = None,
    confirm_top: Annotated[int, typer.Option(help="atp: cells per component confirmed by patching")] = 10,
    sae: Annotated[str | None, typer.Option(help="an SAE id: attribute its latents (adds 'latents')")] = None,
    grad_drop: Annotated[bool, typer.Option(help="AtP* GradDrop ranking (one backward per block)")] = False,
    qk_fix: Annotated[bool, typer.Option(help="AtP* QK fix (exact softmax in the next block)")] = True,
    model: ModelOpt = DEFAULT_MODEL,
    device: DeviceOpt = "auto",
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Which layer × position (head, SAE latent) restores the logit difference: AtP* or patching."""
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
    components = list(dict.fromkeys((component or ["resid"]) + (["latents"] if sae else [])))
    config = {
        "kind": "circuit",
        "model": model,
        "pairs": items,
        "layers": layer or None,
        "method": method,
        "components": components,
        "confirm_top": confirm_top,
        "sae_id": sae,
        "grad_drop": grad_drop,
        "qk_fix": qk_fix,
    }
    _run_analysis_cli(store, config, device, as_json)


@analyze_app.command("graph")
@friendly_errors
def analyze_graph(
    prompt: Annotated[str, typer.Argument(help="the prompt whose next token to explain")],
    transcoder: Annotated[
        list[str], typer.Option("--transcoder", "-t", help="SAE id of a block's MLP transcoder (repeatable)")
    ],
    target: Annotated[
        str | None, typer.Option(help="the next token to explain [default: the top one]")
    ] = None,
    node_keep: Annotated[float, typer.Option(help="influence on the logit the kept nodes carry")] = 0.8,
    edge_keep: Annotated[float, typer.Option(help="influence the kept edges carry")] = 0.98,
    max_features: Annotated[int, typer.Option(help="refuse more active features (a backward each)")] = 20_000,
    model: ModelOpt = DEFAULT_MODEL,
    device: DeviceOpt = "auto",
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Attribution graph of a prompt over transcoder features: direct effects, pruned, scored."""
    config = {
        "kind": "graph",
        "model": model,
        "prompt": prompt,
        "target": target,
        "transcoders": transcoder,
        "node_keep": node_keep,
        "edge_keep": edge_keep,
        "max_features": max_features,
    }
    _run_analysis_cli(store, config, device, as_json)


EditOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--edit", "-e", help="NODE=SCALE: multiply a feature node's activation (0 ablates; repeatable)"
    ),
]
ValueEditOpt = Annotated[
    list[str] | None,
    typer.Option("--value-edit", help="NODE=VALUE: set a feature node's activation (repeatable)"),
]


@analyze_app.command("intervene")
@friendly_errors
def analyze_intervene(
    analysis_id: Annotated[str, typer.Argument(help="a graph analysis")],
    edit: EditOpt = None,
    value_edit: ValueEditOpt = None,
    top_k: Annotated[int, typer.Option(help="next tokens listed before and after")] = 10,
    max_new_tokens: Annotated[int, typer.Option(help="greedy tokens generated both ways (0: none)")] = 0,
    device: DeviceOpt = "auto",
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Scale or set feature nodes of a graph at their positions and run the real model: the
    target's logit and the top next tokens before and after (the same as
    POST /v1/analyses/{id}/graph/interventions, run here)."""
    from pydantic import ValidationError

    from kestrel.core.analysis.graph_edits import GraphInterventionRequest, check_intervention
    from kestrel.core.analysis.graph_intervention import intervene
    from kestrel.core.config import invalid_config
    from kestrel.core.models import load_model
    from kestrel.core.sae.artifacts import load_sae

    edits = [_node_edit(text, "scale", "--edit") for text in edit or []]
    edits += [_node_edit(text, "value", "--value-edit") for text in value_edit or []]
    try:
        request = GraphInterventionRequest(edits=edits, top_k=top_k, max_new_tokens=max_new_tokens)
    except ValidationError as exc:
        raise invalid_config(exc, "intervention") from None
    the_store = open_store(store)
    checked = check_intervention(the_store, analysis_id, request)
    lm = load_model(
        checked.model,
        device=device,
        dtype=checked.model_dtype or "fp32",
        store_root=the_store.models_dir.parent,
    )
    blocks = sorted({e.layer for e in checked.edits})
    transcoders = {block: load_sae(the_store, checked.transcoders[block])[0] for block in blocks}
    result = intervene(
        lm, checked.results, transcoders, checked.edits, top_k=top_k, max_new_tokens=max_new_tokens
    )
    if as_json:
        return print_json({"analysis_id": analysis_id, **result})
    _print_intervention(result)


def _node_edit(text: str, field: str, option: str) -> dict[str, Any]:
    from kestrel.core.errors import InvalidInputError

    node, sep, amount = text.rpartition("=")
    try:
        number = float(amount)
    except ValueError:
        number = None
    if not sep or not node or number is None:
        raise InvalidInputError(f"{option} {text!r}: expected NODE={field.upper()}, e.g. {option} 10_123_5=0")
    return {"node": node, field: number}


def _print_intervention(result: dict[str, Any]) -> None:
    target = result["target"]
    console.print(
        f"target {target['token']!r}: logit {target['logit_before']:.4g} -> {target['logit_after']:.4g}, "
        f"prob {target['prob_before']:.4g} -> {target['prob_after']:.4g}",
        highlight=False,
    )
    rows = [
        [e["node"], f"{e['activation_before']:.4g}", f"{e['activation_after']:.4g}"] for e in result["edits"]
    ]
    print_table(["node", "before", "after"], rows, keep=("node",))
    pairs = zip(result["top_before"], result["top_after"], strict=True)
    tops = [[repr(b["token"]), f"{b['prob']:.3g}", repr(a["token"]), f"{a['prob']:.3g}"] for b, a in pairs]
    print_table(["top before", "p before", "top after", "p after"], tops)
    if result["continuation_before"] is not None:
        console.print(f"continuation before: {result['continuation_before']!r}", highlight=False)
        console.print(f"continuation after:  {result['continuation_after']!r}", highlight=False)


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
