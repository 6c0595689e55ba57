"""Sparse autoencoders: ``kestrel train|eval`` and ``kestrel saes ...``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from kestrel.cli.common import (
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    SaeModelOpt,
    StoreOpt,
    TextsOpt,
    TxtModeOpt,
    capture_dataset,
    console,
    err_console,
    friendly_errors,
    open_store,
    print_json,
    print_table,
    sae_model,
    warn,
)
from kestrel.cli.config_options import ConfigGroup, config_options
from kestrel.core.catalog import DEFAULT_MODEL
from kestrel.core.errors import InvalidInputError
from kestrel.core.runs import CaptureOptions
from kestrel.core.sae.config import SAEConfig, TrainConfig
from kestrel.core.sae.ledger_records import LedgerOptions

cli = typer.Typer()
saes_app = typer.Typer(help="Trained sparse autoencoders.", no_args_is_help=True)
cli.add_typer(saes_app, name="saes")


#: The dictionary size when none is given: the model requires one (it has no engine default).
DEFAULT_N_LATENTS = 4608

SAE_OPTIONS = ConfigGroup(
    SAEConfig,
    # filled from the run (d_in, model, layer, run_id, data, a transcoder's target_layer and
    # d_out) or by training (input_scale, output_scale); `train --target-layer` names the target
    exclude=frozenset(
        {"d_in", "input_scale", "model", "layer", "run_id", "data", "target_layer", "d_out", "output_scale"}
    ),
    defaults={"n_latents": DEFAULT_N_LATENTS},
    help={"architecture": "topk, batchtopk, relu_l1 or jumprelu", "dtype": "dtype of the SAE's weights"},
    panel="SAE",
    validate=False,  # SAEConfig needs d_in, known once the run is read: train_from_run checks it
)
TRAIN_OPTIONS = ConfigGroup(
    TrainConfig,
    help={
        "seed": "seed of initialisation and data order",
        "adam_betas": "Adam's beta1 and beta2",
        "adam_eps": "Adam's epsilon",
        "b_dec_init": "initial decoder bias: the data's mean or geometric median",
        "keep_checkpoints": "checkpoints kept on disk (the newest)",
    },
    panel="Training",
)


@cli.command("train")
@friendly_errors
@config_options(sae=SAE_OPTIONS, train=TRAIN_OPTIONS)
def train_command(
    run_id: Annotated[str, typer.Argument(help="the capture run to train on")],
    layer: Annotated[str, typer.Option("--layer", "-l", help="a layer of the run")],
    sae: dict[str, Any],
    train: dict[str, Any],
    target_layer: Annotated[
        str | None,
        typer.Option(
            "--target-layer",
            help="train a transcoder: the layer of the run it predicts from --layer "
            "(e.g. -l model.layers.10.mlp:input --target-layer model.layers.10.mlp); --skip adds W_skip·x",
        ),
    ] = None,
    sae_id: Annotated[str | None, typer.Option(help="id of the new SAE [default: generated]")] = None,
    resume: Annotated[
        bool, typer.Option(help="continue a stopped run of --sae-id from its checkpoint")
    ] = False,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train an SAE on one layer of a capture run (attention-sink rows skipped).

    With --target-layer, a transcoder from --layer to that layer (--skip: a skip-transcoder)."""
    from tqdm.auto import tqdm

    from kestrel.core.sae import artifacts

    sae = {"n_latents": DEFAULT_N_LATENTS, **sae}
    train_cfg = train
    bar = tqdm(desc="train", unit="step")

    def show(progress) -> None:
        bar.total = progress.total_steps
        bar.n = progress.step
        bar.set_postfix(
            fvu=f"{progress.fvu:.3f}", l0=f"{progress.l0:.1f}", dead=f"{progress.dead_fraction:.1%}"
        )
        bar.refresh()

    try:
        summary = artifacts.train_from_run(
            open_store(store),
            run_id,
            layer,
            sae,
            train_cfg,
            sae_id=sae_id,
            on_progress=show,
            resume=resume,
            on_warning=warn,
            target_layer=target_layer,
        )
    finally:
        bar.close()
    if as_json:
        return print_json(summary)
    if isinstance(summary, artifacts.TrainingStopped):
        console.print(f"[yellow]sae {summary.id} stopped[/] at step {summary.step}; resume with --resume")
        return None
    m = summary.metrics
    console.print(
        f"[green]sae {summary.id}[/]: held-out FVU {m['fvu']:.3f}, L0 {m['l0']:.1f}, "
        f"dead {m['dead_fraction']:.1%}"
    )


def _int_list(value: str | None, name: str) -> list[int | None]:
    """A comma-separated sweep ("16,32") as ints; no value: one entry, the config's own."""
    if not value:
        return [None]
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"{name} takes comma-separated integers, got {value!r}") from None


#: The forward's options, renamed where TrainConfig and SAEConfig use the same field names.
STREAM_CAPTURE_OPTIONS = ConfigGroup(
    CaptureOptions,
    names={"token_budget": ["--batch-tokens"], "dtype": ["--storage-dtype"]},
    panel="Forward",
)


@cli.command("train-stream")
@friendly_errors
@config_options(sae=SAE_OPTIONS, train=TRAIN_OPTIONS, options=STREAM_CAPTURE_OPTIONS)
def train_stream_command(
    sae: dict[str, Any],
    train: dict[str, Any],
    options: dict[str, Any],
    layer: Annotated[
        list[str] | None, typer.Option("--layer", "-l", help="layer to train an SAE on (repeatable)")
    ] = None,
    mlp_transcoders: Annotated[
        str | None,
        typer.Option(
            help="also train a transcoder of each listed block's MLP (its input -> its output), "
            "e.g. 0,5,10 or 0-29 or all"
        ),
    ] = None,
    sweep_k: Annotated[str | None, typer.Option(help="k values to sweep, e.g. 16,32")] = None,
    sweep_n_latents: Annotated[
        str | None, typer.Option(help="dictionary sizes to sweep, e.g. 2304,4608")
    ] = None,
    model: ModelOpt = DEFAULT_MODEL,
    text: TextsOpt = None,
    file: Annotated[Path | None, typer.Option(help="a .txt, .jsonl, .csv or .parquet file")] = None,
    text_field: Annotated[str, typer.Option(help="text column/field of jsonl, csv, parquet, HF")] = "text",
    txt_mode: TxtModeOpt = "line",
    hf: Annotated[str | None, typer.Option(help="a Hugging Face dataset name (needs network)")] = None,
    hf_config: Annotated[str | None, typer.Option(help="the HF dataset's config")] = None,
    split: Annotated[str, typer.Option(help="the HF dataset's split")] = "train",
    limit: Annotated[int | None, typer.Option(help="documents at most")] = None,
    spill_run_id: Annotated[
        str | None, typer.Option(help="also store the pass as this activation run (for later sweeps)")
    ] = None,
    model_dtype: DtypeOpt = "fp32",
    device: DeviceOpt = "auto",
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train SAEs on several layers (a sweep of k / sizes per layer) and MLP transcoders in one pass.

    ``--mlp-transcoders`` adds a transcoder per listed block's MLP (its input -> its output)."""
    from kestrel.core.models import load_model
    from kestrel.core.sae.stream import train_stream

    if not layer and not mlp_transcoders:
        raise InvalidInputError("give --layer (SAEs) or --mlp-transcoders (transcoders), or both")
    spec = capture_dataset(text, file, text_field, txt_mode, hf, hf_config, split, limit)
    the_store = open_store(store)
    lm = load_model(model, device=device, dtype=model_dtype, store_root=the_store.local_root)
    sources = [(name, None) for name in layer or []]
    sources += [(f"{mlp}:input", mlp) for mlp in _mlp_layers(lm, mlp_transcoders)] if mlp_transcoders else []
    base = {"n_latents": DEFAULT_N_LATENTS, **sae}
    saes = [
        {
            "layer": name,
            "target_layer": target,
            "sae": {**base, **({"k": k} if k else {}), **({"n_latents": n} if n else {})},
            "train": train,
        }
        for name, target in sources
        for k in _int_list(sweep_k, "--sweep-k")
        for n in _int_list(sweep_n_latents, "--sweep-n-latents")
    ]

    def show(sae_id: str, progress) -> None:  # on stderr: --json keeps stdout to the summaries
        # A diverging step reports null figures: the line says n/a rather than crash the training.
        def fig(value: float | None, spec: str) -> str:
            return "n/a" if value is None else format(value, spec)

        of = f"/{progress.total_steps}" if progress.total_steps else ""
        err_console.print(
            f"{sae_id} step {progress.step}{of}: fvu {fig(progress.fvu, '.3f')}, "
            f"l0 {fig(progress.l0, '.1f')}, dead {fig(progress.dead_fraction, '.1%')}"
        )

    summaries = train_stream(
        lm,
        spec,
        saes,
        the_store,
        options=CaptureOptions(**options),
        spill_run_id=spill_run_id,
        on_progress=show,
    )
    if as_json:
        return print_json(summaries)
    print_table(["id", "layer", "status", "held-out FVU"], [_stream_row(s) for s in summaries])


def _mlp_layers(lm: Any, blocks: str) -> list[str]:
    """The MLP modules of the blocks ``blocks`` names ("all", "0,5,10", "0-29"), in block order."""
    mlps = {info.index: info.name for info in lm.layers if info.kind == "mlp" and info.index is not None}
    if blocks.strip() == "all":
        return [mlps[i] for i in sorted(mlps)]
    wanted: list[int] = []
    for part in blocks.split(","):
        first, _, last = part.strip().partition("-")
        try:
            start, end = int(first), int(last or first)
            if end < start:
                raise ValueError
            wanted += list(range(start, end + 1))
        except ValueError:
            raise InvalidInputError(
                f"--mlp-transcoders: {part.strip()!r} is not a block or a range a-b"
            ) from None
    missing = sorted(set(wanted) - set(mlps))
    if missing:
        raise InvalidInputError(
            f"--mlp-transcoders: the model has no MLP in block(s) {missing}; its MLP blocks are "
            f"{min(mlps)}-{max(mlps)}"
            if mlps
            else "--mlp-transcoders: the model's layer table lists no MLP"
        )
    return [mlps[i] for i in dict.fromkeys(wanted)]


def _stream_row(summary: Any) -> list[str]:
    """A published SAE (its held-out FVU) or a stopped one (no metrics, a checkpoint)."""
    fvu = (getattr(summary, "metrics", None) or {}).get("fvu")
    layer = getattr(summary, "layer_name", None) or ""
    target = getattr(summary, "target_layer", None)
    return [
        summary.id,
        f"{layer} -> {target}" if target else layer,
        summary.status,
        "-" if fvu is None else f"{fvu:.3f}",
    ]


@cli.command("eval")
@friendly_errors
def evaluate(
    sae_id: Annotated[str, typer.Argument(help="the SAE to evaluate")],
    model: SaeModelOpt = None,
    device: DeviceOpt = "auto",
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """CE-loss recovered and KL with the model in the loop, on the run's held-out texts."""
    from kestrel.core.models import load_model
    from kestrel.core.sae import artifacts

    the_store = open_store(store)
    summary = artifacts.get_sae(the_store, sae_id)
    lm = load_model(model or summary.model_name, device=device, store_root=the_store.local_root)
    metrics = artifacts.evaluate_sae(the_store, sae_id, lm)
    if as_json:
        return print_json(metrics)
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
    from kestrel.core.sae import artifacts

    rows = artifacts.list_saes(open_store(store))
    if as_json:
        return print_json(rows)
    cells = []
    for r in rows:
        m = r.metrics
        cells.append(
            [
                r.id,
                r.status,
                str(r.layer),
                str(r.n_latents),
                str(r.config.get("k")),
                f"{m['fvu']:.3f}" if "fvu" in m else "",
                f"{m['dead_fraction']:.1%}" if "dead_fraction" in m else "",
                str(r.created),
            ]
        )
    print_table(
        ["id", "status", "layer", "latents", "k", "fvu", "dead", "created"], cells, keep=("id", "layer")
    )


@saes_app.command("delete")
@friendly_errors
def saes_delete(sae_id: str, store: StoreOpt = None) -> None:
    """Delete an SAE and its checkpoints."""
    from kestrel.core.sae import artifacts

    artifacts.delete_sae(open_store(store), sae_id)
    console.print(f"deleted sae {sae_id}")


ExportFormat = Literal["kestrel", "saelens", "sparsify"]


@saes_app.command("export")
@friendly_errors
def saes_export(
    sae_id: Annotated[str, typer.Argument(help="the SAE to export")],
    format: Annotated[
        ExportFormat, typer.Option("--format", "-f", help="file layout: kestrel, saelens or sparsify")
    ] = "saelens",
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="a directory to write the files into (what SAE.load_from_disk reads), or a .zip "
            "[default: ./<sae-id>-<format>]",
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="replace what is at --out")] = False,
    store: StoreOpt = None,
) -> None:
    """Write an SAE's files for another tool: SAELens (6.x cfg.json naming the model's Hugging Face
    id), sparsify (topk SAEs), or Kestrel's own layout."""
    import io
    import zipfile

    from kestrel.core.errors import ConflictError
    from kestrel.core.sae import artifacts
    from kestrel.core.sae.io import _write_files

    target = out if out is not None else Path(f"{sae_id}-{format}")
    if target.exists() and not force:
        raise ConflictError(
            f"{target} already exists; pass --force to replace it", details={"path": str(target)}
        )
    data = artifacts.export_sae_zip(open_store(store), sae_id, format)
    if target.suffix == ".zip":
        temporary = target.with_name(f".{target.name}.tmp")
        temporary.write_bytes(data)
        temporary.replace(target)  # a complete zip or none
    else:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            files = {name: archive.read(name) for name in archive.namelist()}
        manifest = next(name for name in ("config.json", "cfg.json") if name in files)
        _write_files(target, files, manifest=manifest)  # the config last: a reader sees all or none
    console.print(f"exported sae {sae_id} ({format}) to {target}")


@saes_app.command("import")
@friendly_errors
def saes_import(
    path: Annotated[
        Path,
        typer.Argument(
            help="a directory or .zip of SAELens, sparsify or Kestrel files (told by their names)"
        ),
    ],
    model: Annotated[str | None, typer.Option(help="model it reads, if its config does not say")] = None,
    layer: Annotated[str | None, typer.Option(help="layer (module path) it reads")] = None,
    norm_scaling_factor: Annotated[
        float | None,
        typer.Option(
            help="SAELens expected_average_only_in: the factor its inputs were scaled by "
            "[default: from activation_scaler.json]",
        ),
    ] = None,
    sae_id: Annotated[str | None, typer.Option(help="id of the new SAE [default: generated]")] = None,
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Import an SAE saved by SAELens, sparsify or another Kestrel (what its config means is folded
    into the weights, or the import is refused saying what cannot be reproduced)."""
    from kestrel.core.limits import Caps
    from kestrel.core.sae import artifacts
    from kestrel.core.sae.exchange import files_from_path
    from kestrel.settings import Settings

    settings = Settings()
    files = files_from_path(path, max_bytes=settings.max_upload_bytes)
    summary = artifacts.import_sae_files(
        open_store(store),
        files,
        sae_id=sae_id,
        model=model,
        layer=layer,
        caps=Caps.of(settings),
        norm_scaling_factor=norm_scaling_factor,
    )
    if as_json:
        return print_json(summary)
    config = summary.config
    shape = f"{config['architecture']}, {config['d_in']} → {config['n_latents']} latents"
    console.print(
        f"[green]imported sae {summary.id}[/] ({summary.imported_from}: {shape}, "
        f"model {summary.model_name}, layer {summary.layer_name})"
    )
    return None


@saes_app.command("neuronpedia")
@friendly_errors
def saes_neuronpedia(
    sae_id: Annotated[str, typer.Argument(help="an SAE with discovered features (kestrel discover)")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="[default: ./<sae-id>-neuronpedia.zip]")
    ] = None,
    source_set: Annotated[str, typer.Option(help="Neuronpedia source set, e.g. res-topk-4k")] = "kestrel",
    creator: Annotated[str, typer.Option(help="creator name shown on Neuronpedia")] = "kestrel",
    model_id: Annotated[
        str | None, typer.Option(help="Neuronpedia's model id [default: from the model]")
    ] = None,
    description: Annotated[str, typer.Option(help="the source set's description")] = "",
    latent: Annotated[
        list[int] | None, typer.Option("--latent", help="only these latents (repeatable)")
    ] = None,
    bins: Annotated[bool, typer.Option(help="also export each activation bin's samples")] = True,
    force: Annotated[bool, typer.Option(help="replace what is at --out")] = False,
    model: SaeModelOpt = None,
    device: DeviceOpt = "auto",
    store: StoreOpt = None,
) -> None:
    """Write an SAE's feature pages in Neuronpedia's bulk-import layout (a zip of JSON lines): the
    model reruns each stored context for its per-token values."""
    from kestrel.core.concepts.config import NeuronpediaExport
    from kestrel.core.concepts.neuronpedia import export_neuronpedia
    from kestrel.core.errors import ConflictError

    target = out if out is not None else Path(f"{sae_id}-neuronpedia.zip")
    if target.exists() and not force:
        raise ConflictError(
            f"{target} already exists; pass --force to replace it", details={"path": str(target)}
        )
    options = NeuronpediaExport(
        model_id=model_id,
        source_set=source_set,
        creator=creator,
        description=description,
        latents=latent,
        bins=bins,
    )
    the_store = open_store(store)
    lm = sae_model(the_store, sae_id, model, device)
    data = export_neuronpedia(the_store, sae_id, lm, options)
    temporary = target.with_name(f".{target.name}.tmp")
    temporary.write_bytes(data)
    temporary.replace(target)  # a complete zip or none
    console.print(f"exported the feature pages of {sae_id} for Neuronpedia to {target}")


# ---------------------------------------------------------------------------------------------
# Evaluation ledger and comparison (issue 14)

LEDGER_OPTIONS = ConfigGroup(LedgerOptions, panel="Ledger")


@saes_app.command("ledger")
@friendly_errors
@config_options(options=LEDGER_OPTIONS)
def saes_ledger(
    sae_id: Annotated[str, typer.Argument(help="the SAE to evaluate")],
    options: dict[str, Any],
    data: Annotated[
        Path | None, typer.Option(help="labelled texts for k-sparse probing: a .jsonl or .csv file")
    ] = None,
    text_field: Annotated[str, typer.Option(help="the text column/field of --data")] = "text",
    label_field: Annotated[str, typer.Option(help="the label column/field of --data")] = "label",
    limit: Annotated[int | None, typer.Option(help="rows of --data at most")] = None,
    ks: Annotated[str | None, typer.Option(help="k-sparse probing's k values, e.g. 1,2,5,20")] = None,
    show: Annotated[bool, typer.Option(help="print the stored ledger; compute nothing")] = False,
    model: SaeModelOpt = None,
    device: DeviceOpt = "auto",
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The SAE's evaluation ledger (each figure beside its chance baseline), computed here and
    stored with the SAE; ``--show`` prints the stored one."""
    from kestrel.core.sae import ledger_records

    the_store = open_store(store)
    if ks is not None:
        options = {**options, "ks": [int(k) for k in ks.split(",") if k.strip()]}
    if show:
        ledger = ledger_records.read_ledger(the_store, sae_id)
        if ledger is None:
            raise typer.BadParameter(f"sae {sae_id!r} has no ledger yet; run `kestrel saes ledger {sae_id}`")
    else:
        ledger = _compute_ledger(
            the_store, sae_id, options, data, text_field, label_field, limit, model, device
        )
    if as_json:
        return print_json(ledger)
    print_table(
        ["metric", "value", "baseline", "kind", "better"],
        [
            [name, _fmt(e["value"]), _fmt(e["baseline"]), e["baseline_kind"], e["better"]]
            for name, e in ledger["entries"].items()
        ],
        keep=("metric",),
    )


def _compute_ledger(the_store, sae_id, options, data, text_field, label_field, limit, model, device):
    from tqdm.auto import tqdm

    from kestrel.core.models import load_model
    from kestrel.core.sae import artifacts, ledger_records
    from kestrel.core.sae.ledger import compute_ledger

    texts = labels = None
    if data is not None:
        texts, labels = ledger_records.read_labelled_file(
            data, text_field=text_field, label_field=label_field, limit=limit
        )
        ledger_records.check_labelled(texts, labels, LedgerOptions.model_validate(options).test_fraction)
    summary = artifacts.get_sae(the_store, sae_id)
    lm = load_model(model or summary.model_name, device=device, store_root=the_store.local_root)
    bar = tqdm(desc="ledger", total=100, unit="%")

    def on_progress(fraction: float, stage: str) -> None:
        bar.n = round(fraction * 100)
        bar.set_postfix(stage=stage)
        bar.refresh()

    opts = LedgerOptions.model_validate(options)
    ledger = compute_ledger(the_store, sae_id, lm, opts, texts=texts, labels=labels, on_progress=on_progress)
    bar.close()
    assert ledger is not None  # nothing asks it to stop here
    return ledger


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}"


@saes_app.command("compare")
@friendly_errors
def saes_compare(
    sae_ids: Annotated[list[str], typer.Argument(help="the SAEs to lay side by side")],
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Several SAEs side by side (ledger figures, else stored held-out metrics); * marks the
    L0-vs-FVU Pareto front."""
    from kestrel.core.sae import ledger_records

    rows = ledger_records.compare_saes(open_store(store), sae_ids)
    if as_json:
        return print_json(rows)
    print_table(
        ["id", "arch", "latents", "l0", "fvu", "ce rec.", "probe k=1", "absorption", "synthetic", "pareto"],
        [
            [
                r["id"],
                str(r["architecture"]),
                str(r["n_latents"]),
                _fmt(r["l0"]),
                _fmt(r["fvu"]),
                _fmt(r["ce_loss_recovered"]),
                _fmt(r["sparse_probing"].get("top_1")),
                _fmt(r["absorption_fraction"]),
                _fmt(r["synthetic_recovery"]),
                "*" if r["pareto"] else "",
            ]
            for r in rows
        ],
        keep=("id",),
    )
