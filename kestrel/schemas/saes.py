"""SAEs: training, evaluation, encoding, export, and the dashboard's reads of training history."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, create_model
from pydantic.fields import FieldInfo

from kestrel.core.catalog import DEFAULT_MODEL
from kestrel.core.catalog import DType as ModelDType

# Torch-free modules only: the API process imports this one (tests/unit/test_torch_free.py).
from kestrel.core.config import StrictModel
from kestrel.core.runs import CaptureOptions
from kestrel.core.sae.config import SAEConfig, TrainConfig
from kestrel.core.sae.ledger_records import LabelledDataset, LedgerOptions
from kestrel.core.sae.progress import TrainingPoint as TrainingPoint
from kestrel.core.sae.records import SAEManifest
from kestrel.schemas.common import Page
from kestrel.schemas.runs import CaptureDataset

# ---------------------------------------------------------------------------------------------
# SAEs


def _fields_of(model: type[BaseModel], names: tuple[str, ...], **tighter: Any) -> dict[str, Any]:
    """``names`` as ``model`` defines them (type, default, description), for ``create_model``;
    ``tighter`` adds constraints a request must meet besides (a ``Field`` per name)."""
    fields = {}
    for name in names:
        info = model.model_fields[name]
        annotation = Annotated[info.annotation, tighter[name]] if name in tighter else info.annotation
        fields[name] = (annotation, FieldInfo.merge_field_infos(info))
    return fields


#: What a client chooses of an SAE: `SAEConfig`'s own fields (`d_in`, `model`, `layer` and
#: `run_id` come from the run it trains on). A request's k, l1_coefficient and l0_coefficient must
#: also be positive up front (the config checks them per architecture, once it is known).
SAEHyperparameters: type[StrictModel] = create_model(
    "SAEHyperparameters",
    __base__=StrictModel,
    __doc__="What the SAE is; `d_in`, `model`, `layer` and `run_id` come from the run it trains on.",
    __module__=__name__,
    **{
        **_fields_of(
            SAEConfig,
            (
                "architecture",
                "n_latents",
                "k",
                "l1_coefficient",
                "l0_coefficient",
                "normalize_input",
                "dtype",
                "skip",
            ),
            k=Field(gt=0),
            l1_coefficient=Field(gt=0),
            l0_coefficient=Field(gt=0),
        ),
        # None is for imported SAEs whose files do not say; a training request chooses.
        "normalize_input": (bool, SAEConfig.model_fields["normalize_input"]),
    },
)


class StreamSAERequest(StrictModel):
    """One SAE of a stream training: the layer it reads, what it is and how it trains."""

    layer: str = Field(
        min_length=1, description="module path from the layer table (MODULE:input: what it reads)"
    )
    sae: SAEHyperparameters
    train: TrainConfig | None = Field(None, description="training hyperparameters; defaults if omitted")
    target_layer: str | None = Field(
        None,
        min_length=1,
        description="train a transcoder predicting this layer from `layer` (e.g. model.layers.10.mlp:input "
        "-> model.layers.10.mlp); both are captured in the same pass",
    )


class TrainRequest(StrictModel):
    """Train an SAE on one layer of a run, or resume a cancelled training with ``resume_from``.

    Or, with ``dataset`` and ``saes`` instead of ``run_id``/``layer``/``sae``: one pass of
    ``model`` over the dataset trains every SAE in ``saes`` (several layers, several configs per
    layer) in one job; ``spill`` also stores the pass as an activation run for later sweeps.
    When resuming, omitted fields are taken from the original request.
    """

    run_id: str | None = Field(None, description="the activation run to train on")
    layer: str | None = Field(None, description="a layer the run captured")
    target_layer: str | None = Field(
        None,
        min_length=1,
        description="train a transcoder: another layer of the run that the decoder predicts from `layer` "
        "(say `model.layers.10.mlp:input` -> `model.layers.10.mlp`); `sae.skip` adds a linear skip term",
    )
    sae: SAEHyperparameters | None = None
    train: TrainConfig | None = Field(None, description="training hyperparameters; defaults if omitted")
    resume_from: str | None = Field(None, description="id of a cancelled SAE whose checkpoint to continue")
    # -- stream training (instead of run_id, layer, sae)
    dataset: CaptureDataset | None = Field(
        None, description="stream training: the texts to run the model over"
    )
    saes: list[StreamSAERequest] | None = Field(
        None, min_length=1, max_length=64, description="stream training: the SAEs one pass trains"
    )
    model: str = Field(DEFAULT_MODEL, description="stream training: the model to run")
    model_dtype: ModelDType = "fp32"
    options: CaptureOptions | None = Field(None, description="stream training: how to batch and store rows")
    spill: bool = Field(False, description="stream training: also store the pass as an activation run")


#: An SAE as the store holds and lists it: the engine's manifest model, returned as it is.
SAESummary = SAEManifest


class SAEPage(Page[SAEManifest]):
    pass


class EvaluateRequest(StrictModel):
    texts: list[str] | None = Field(
        None, description="texts to evaluate on; default: held-out documents of the SAE's run"
    )


class EncodeRequest(StrictModel):
    text: str = Field(min_length=1)
    top_k: int = Field(8, gt=0, description="latents reported per token")


class LatentValue(BaseModel):
    index: int
    value: float


class TokenLatents(BaseModel):
    position: int
    token: str
    token_id: int
    latents: list[LatentValue]


class EncodeResponse(BaseModel):
    sae_id: str
    model: str
    layer: str
    tokens: list[TokenLatents]
    job_id: str


SAEFormat = Literal["kestrel", "saelens", "sparsify"]
#: The layouts an import reads from two uploaded files (a zip says its own by its file names).
SAEImportFormat = Literal["saelens", "sparsify", "kestrel"]


class DeletedResponse(BaseModel):
    id: str
    deleted: bool = True


# ---------------------------------------------------------------------------------------------
# Dashboard reads: a job's stream token, an SAE's training history


class StreamToken(BaseModel):
    """A URL for a job's event stream that needs no header (a browser's EventSource sends none)."""

    url: str = Field(description="GET this (with its token, if any) as text/event-stream")
    token: str | None = Field(None, description="bound to that path; null when no API key is set")
    expires_at: datetime | None = Field(None, description="connect before this; the stream then runs on")


class SAEHistory(BaseModel):
    sae_id: str
    points: list[TrainingPoint] = Field(description="in order; empty for an imported SAE")


# ---------------------------------------------------------------------------------------------
# Evaluation ledger and comparison (issue 14): `kestrel.core.sae.ledger_records`


class LedgerRequest(StrictModel):
    """Compute an SAE's evaluation ledger; ``dataset`` (texts + labels) enables k-sparse probing."""

    dataset: LabelledDataset | None = Field(
        None, description="labelled texts for k-sparse probing: inline, or an uploaded jsonl/csv"
    )
    options: LedgerOptions = Field(default_factory=LedgerOptions)


class LedgerEntry(BaseModel):
    """One figure of the ledger beside its baseline."""

    value: float | None = Field(description="null when it could not be measured (see reason)")
    baseline: float | None = Field(description="what chance (or the stated control) scores")
    baseline_kind: str = Field(description="chance, control, reference or ideal")
    better: Literal["higher", "lower"]
    ceiling: float | None = Field(None, description="the best attainable, where there is one")
    settings: dict[str, Any]
    computed_at: str
    note: str | None = None
    reason: str | None = None


class SAELedger(BaseModel):
    version: int
    sae_id: str
    model: str | None
    layer: str
    computed_at: str
    seconds: float
    options: dict[str, Any]
    entries: dict[str, LedgerEntry]
    details: dict[str, Any] = Field(description="per-class, per-letter and per-stage figures")


class SAEComparisonRow(BaseModel):
    id: str
    architecture: str | None
    n_latents: int
    k: int | None
    model: str | None
    layer: str | None
    fvu: float | None
    l0: float | None
    dead_fraction: float | None
    ce_loss_recovered: float | None
    kl_divergence: float | None
    absorption_fraction: float | None
    full_absorption_rate: float | None
    synthetic_recovery: float | None
    sparse_probing: dict[str, float | None] = Field(description="accuracy by k (and the dense probe)")
    has_ledger: bool
    ledger_computed_at: str | None
    pareto: bool = Field(description="no other SAE here has both lower L0 and lower FVU")


class SAEComparison(BaseModel):
    rows: list[SAEComparisonRow]
