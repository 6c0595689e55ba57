"""The HTTP API's request and response models: the one module the server and the workers share.

The server validates a request with these models before it enqueues anything; the worker parses
the same model again from the job's arguments, so a job never sees a shape the API did not accept.
The engine's own pydantic models are reused where they exist (`CaptureOptions`, `TextsSource`,
`HFSource`, `TrainConfig`) so a field is defined once for the CLI, the API and the stored config.

What a client may name is deliberately narrower than what the engine accepts: never a filesystem
path. Datasets are inline texts, an upload id (the worker turns it into a file under the store)
or a Hugging Face hub id; models are bundled names, hub ids or names of server-configured local
directories.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, create_model, field_validator
from pydantic.fields import FieldInfo
from pydantic.json_schema import SkipJsonSchema

# Torch-free modules only: the API process imports this one (tests/unit/test_torch_free.py).
from kestrel.core.analysis.config import CausalConfig, CircuitConfig, FeatureConfig, NeuronConfig
from kestrel.core.catalog import DEFAULT_MODEL, DEVICE_FIELD_PATTERN
from kestrel.core.catalog import DType as ModelDType
from kestrel.core.concepts.config import DiscoveryConfig
from kestrel.core.config import StrictModel

# Re-exported: defined in the torch-free module, still importable from here.
from kestrel.core.hub import HUB_ID as HUB_ID
from kestrel.core.hub import validate_hub_id
from kestrel.core.runs import CaptureOptions
from kestrel.core.sae.config import SAEConfig, TrainConfig
from kestrel.core.sources import FileReading, HFSource, TextsSource
from kestrel.core.steering_config import SteeringConfig

T = TypeVar("T")

JobState = Literal["queued", "started", "finished", "failed", "canceled"]
TERMINAL_STATES: frozenset[str] = frozenset({"finished", "failed", "canceled"})

# `datasets.load_dataset` builders that read local files: useless without data_files and unsafe with.
PACKAGED_BUILDERS = frozenset(
    {"json", "csv", "parquet", "text", "arrow", "pandas", "sql", "xml", "webdataset", "generator", "hdf5"}
    | {"imagefolder", "audiofolder", "videofolder", "pdffolder", "niftifolder", "folder_based_builder"}
)


# ---------------------------------------------------------------------------------------------
# Errors and pages


class ErrorBody(BaseModel):
    code: str = Field(description="machine-readable: not_found, invalid_input, limit_exceeded, ...")
    message: str = Field(description="what was wrong and, where known, what would be right")
    details: dict[str, Any] = Field(default_factory=dict)


class ErrorResponse(BaseModel):
    """The one shape of every 4xx and 5xx answer."""

    error: ErrorBody


class Page(BaseModel, Generic[T]):
    """One page of a list: ``items[offset : offset + limit]`` of ``total``."""

    items: list[T]
    total: int
    limit: int
    offset: int


# ---------------------------------------------------------------------------------------------
# Health


class HealthStatus(BaseModel):
    status: Literal["ok"] = "ok"
    version: str


class ReadyStatus(BaseModel):
    status: Literal["ready"] = "ready"
    redis: bool
    workers: dict[str, int] = Field(description="live workers per queue")


# ---------------------------------------------------------------------------------------------
# Jobs


class JobInfo(BaseModel):
    """A queued or finished unit of work, as a client sees it."""

    id: str
    kind: str
    queue: str
    status: JobState
    progress: float = Field(0.0, ge=0.0, le=1.0)
    message: str = ""
    metrics: dict[str, Any] = Field(default_factory=dict, description="latest metrics reported")
    log: list[str] = Field(default_factory=list, description="the last lines of the job's log")
    error: ErrorBody | None = None
    artifacts: dict[str, str] = Field(
        default_factory=dict, description="ids of what the job makes or made, e.g. run_id, sae_id"
    )
    result: dict[str, Any] | None = Field(None, description="the job's return value once finished")
    created_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    location: str = Field(description="where to poll this job")
    cancel_requested: bool = Field(
        False,
        description="a cancel was asked for and the job has not stopped yet: it reads started "
        "until its next step, then canceled",
    )


class JobPage(Page[JobInfo]):
    pass


# ---------------------------------------------------------------------------------------------
# Models


class ModelLoadedBy(BaseModel):
    worker: str
    queue: str
    device: str
    dtype: str


class ModelInfo(BaseModel):
    name: str
    source: Literal["bundled", "local", "hub"]
    description: str = ""
    installed: bool = Field(description="its weights are available without a download")
    cached: bool = Field(description="bundled: converted to safetensors already")
    loaded_by: list[ModelLoadedBy] = Field(default_factory=list, description="workers holding it in memory")


class ModelPage(Page[ModelInfo]):
    pass


class ModelLoadRequest(StrictModel):
    device: str | None = Field(
        None,
        pattern=DEVICE_FIELD_PATTERN,
        description="cpu, cuda, cuda:N or auto; default: the worker's setting",
    )
    dtype: ModelDType = "fp32"
    queue: Literal["generate", "interactive"] = Field(
        "generate",
        description="which workers to warm: generate (generation) or interactive (encode, layer "
        "tables, previews); each loads a model it lacks on first use anyway",
    )


class ModelLoadResult(BaseModel):
    name: str
    worker: str
    device: str
    dtype: str
    load_seconds: float
    d_model: int
    n_blocks: int


class ModelUnloadResult(BaseModel):
    name: str
    requested_at: float = Field(description="unix time; workers drop the model within a heartbeat")


class LayerRow(BaseModel):
    name: str = Field(description="module path: the name captures and SAEs take")
    kind: str
    index: int | None
    width: int
    module_type: str


class LayerTable(BaseModel):
    model: str
    layers: list[LayerRow]


# ---------------------------------------------------------------------------------------------
# Uploads


UploadKind = Literal["dataset", "activations"]
UploadFormat = Literal["txt", "jsonl", "csv", "parquet", "safetensors"]


class UploadInfo(BaseModel):
    id: str
    kind: UploadKind
    format: UploadFormat
    filename: str = Field(description="the client's name for the file, recorded only; never used as a path")
    size_bytes: int
    sha256: str
    created: str


class UploadPage(Page[UploadInfo]):
    pass


# ---------------------------------------------------------------------------------------------
# Activations


class UploadSource(FileReading):
    """A dataset file uploaded earlier with ``POST /v1/uploads``, named by its id."""

    kind: Literal["upload"] = "upload"
    upload_id: str = Field(min_length=1, max_length=64)


class HubDatasetSource(HFSource):
    """A Hugging Face hub dataset by id: ``HFSource`` without local builders or data files (paths)."""

    data_files: SkipJsonSchema[None] = Field(default=None, exclude=True)

    @field_validator("name")
    @classmethod
    def _hub_id_only(cls, name: str) -> str:
        validate_hub_id(name, "dataset")
        if name.lower() in PACKAGED_BUILDERS:
            raise ValueError(f"dataset {name!r} is a local-file builder; upload the file instead")
        return name


CaptureDataset = Annotated[TextsSource | UploadSource | HubDatasetSource, Field(discriminator="kind")]


class CaptureRequest(StrictModel):
    """Capture ``layers`` of ``model`` over a dataset into a new activation run.

    Sample limit: ``dataset.limit``; batch size: ``options.max_batch_size`` (and the token budget);
    storage dtype: ``options.dtype``.
    """

    model: str = Field(DEFAULT_MODEL, description="bundled name, hub id or configured local model name")
    layers: list[str] = Field(min_length=1, max_length=64, description="module paths from the layer table")
    dataset: CaptureDataset
    options: CaptureOptions = Field(default_factory=CaptureOptions)
    model_dtype: ModelDType = "fp32"


class RunSummary(BaseModel):
    id: str
    model: str
    layers: list[str]
    d_model: int
    dtype: str
    n_tokens: int
    n_docs: int
    created: str


class RunPage(Page[RunSummary]):
    pass


class RunManifest(BaseModel):
    """A run's manifest.json (docs/store-format.md); fields beyond these are passed through."""

    model_config = ConfigDict(extra="allow")

    id: str
    created: str
    model: dict[str, Any]
    layers: dict[str, dict[str, Any]]
    d_model: int
    dtype: str
    n_tokens: int
    n_docs: int
    shards: list[dict[str, Any]]
    dataset: dict[str, Any]
    options: dict[str, Any]


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
#: `run_id` come from the run it trains on). A request's k and l1_coefficient must also be
#: positive up front (the config checks them per architecture, once the architecture is known).
SAEHyperparameters: type[StrictModel] = create_model(
    "SAEHyperparameters",
    __base__=StrictModel,
    __doc__="What the SAE is; `d_in`, `model`, `layer` and `run_id` come from the run it trains on.",
    __module__=__name__,
    **_fields_of(
        SAEConfig,
        ("architecture", "n_latents", "k", "l1_coefficient", "normalize_input", "dtype"),
        k=Field(gt=0),
        l1_coefficient=Field(gt=0),
    ),
)


class TrainRequest(StrictModel):
    """Train an SAE on one layer of a run, or resume a cancelled training with ``resume_from``.

    When resuming, omitted fields are taken from the original request.
    """

    run_id: str | None = Field(None, description="the activation run to train on")
    layer: str | None = Field(None, description="a layer the run captured")
    sae: SAEHyperparameters | None = None
    train: TrainConfig | None = Field(None, description="training hyperparameters; defaults if omitted")
    resume_from: str | None = Field(None, description="id of a cancelled SAE whose checkpoint to continue")


class SAESummary(BaseModel):
    """An SAE as the store lists it; fields beyond these are passed through."""

    model_config = ConfigDict(extra="allow")

    id: str
    status: str = "complete"
    config: dict[str, Any]
    metrics: dict[str, Any] = Field(default_factory=dict)


class SAEPage(Page[SAESummary]):
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


SAEFormat = Literal["kestrel", "saelens"]


class DeletedResponse(BaseModel):
    id: str
    deleted: bool = True


# ---------------------------------------------------------------------------------------------
# Features, concepts and steering


class DiscoverRequest(StrictModel):
    """Discover what each latent of the SAE means, over a stored run or a dataset.

    With neither, the SAE's own training run is read (no forward needed). A dataset goes through
    the SAE's model up to its layer.
    """

    run_id: str | None = Field(None, description="a stored run with the SAE's layer")
    dataset: CaptureDataset | None = Field(None, description="inline texts, an upload or a hub dataset")
    config: DiscoveryConfig = Field(default_factory=DiscoveryConfig)


class FeatureConcept(BaseModel):
    latent: int
    name: str
    description: str = ""
    tags: list[str] = Field(default_factory=list)
    source: Literal["manual", "heuristic", "model"]
    updated: str | None = None


class FeatureSummary(BaseModel):
    latent: int
    fire_count: int
    density: float = Field(description="fraction of rows (attention sinks excluded) it fires on")
    max_activation: float
    mean_activation: float = Field(description="mean over the rows it fires on")
    top_tokens: list[str] = Field(description="most frequent tokens at its top contexts")
    promoted_tokens: list[str] = Field(description="tokens its decoder direction most promotes")
    concept: FeatureConcept | None = None


class FeaturePage(Page[FeatureSummary]):
    sae_id: str
    n_latents: int
    version: str = Field(description="the discovery result these come from")


class FeatureContext(BaseModel):
    doc_index: int
    position: int
    activation: float
    tokens: list[str] = Field(description="the window of tokens around the firing token")
    target: int = Field(description="index of the firing token in `tokens`")


class FeatureBin(BaseModel):
    lower: float
    upper: float
    contexts: list[FeatureContext]


class FeatureHistogram(BaseModel):
    edges: list[float] = Field(description="log-spaced; the first and last bins are open-ended")
    counts: list[int]


class TokenCount(BaseModel):
    token: str
    count: int


class LogitEffect(BaseModel):
    token: str
    token_id: int
    value: float


class LogitEffects(BaseModel):
    positive: list[LogitEffect]
    negative: list[LogitEffect]


class FeatureDetail(BaseModel):
    """Everything a feature's page shows."""

    sae_id: str
    latent: int
    version: str
    fire_count: int
    density: float
    max_activation: float
    mean_activation: float
    histogram: FeatureHistogram
    top_contexts: list[FeatureContext]
    bins: list[FeatureBin] = Field(description="samples from equal-width bins below the top value")
    top_tokens: list[TokenCount]
    logits: LogitEffects
    concept: FeatureConcept | None = None


class ConceptInput(StrictModel):
    """A person's name for a latent (recorded with source ``manual``)."""

    name: str = Field(min_length=1, max_length=200)
    description: str = Field("", max_length=4000)
    tags: list[str] = Field(default_factory=list, max_length=32)


class ConceptPage(Page[FeatureConcept]):
    sae_id: str
    n_latents: int


class ConceptImportResult(BaseModel):
    sae_id: str
    imported: int
    replaced: bool


class LabelRequest(StrictModel):
    """Automatic names: ``heuristic`` from tokens and logit effects, ``model`` by the SAE's model."""

    method: Literal["heuristic", "model"] = "heuristic"
    latents: list[int] | None = Field(None, max_length=4096, description="default: every latent that fired")
    overwrite: bool = Field(False, description="replace manual names too")


class SteeringRecord(BaseModel):
    id: str
    created: str
    config: SteeringConfig


class SteeringPage(Page[SteeringRecord]):
    pass


class SteeringPreviewRequest(StrictModel):
    """Preview a saved config (``config_id``) or an inline one (``config``)."""

    config_id: str | None = None
    config: SteeringConfig | None = None
    model: str | None = Field(None, description="check against this model [default: the SAE's]")


class SteeringTouch(BaseModel):
    edit: int
    latent: int
    op: str
    value: float
    unit: str = Field("absolute", description="what value counts: absolute or max_activation")
    absolute_value: float = Field(description="value in activation units (scale: the factor itself)")
    name: str | None = None
    source: str | None = None
    density: float | None = None
    max_activation: float | None = None


class SteeringDirection(BaseModel):
    direction: int
    layer: str
    alpha: float
    kind: Literal["vector", "latent"]
    latent: int | None = None
    sae_id: str | None = None
    name: str | None = None
    normalize: bool = False


class SteeringPreview(BaseModel):
    valid: bool
    model: str
    sae_id: str | None
    layer: str | None
    positions: str
    keep_error: bool
    touches: list[SteeringTouch]
    directions: list[SteeringDirection]
    warnings: list[str] = Field(
        default_factory=list, description="edits far beyond their latents' observed activations, and the like"
    )
    config: SteeringConfig
    job_id: str


class GenerateRequest(StrictModel):
    """Generate from ``prompts``; with a steering config (saved id or inline), default and steered."""

    prompts: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1, max_length=64)
    steering_id: str | None = Field(None, description="a saved steering config")
    steering: SteeringConfig | None = Field(None, description="or an inline one")
    max_new_tokens: int = Field(20, gt=0)
    do_sample: bool = False
    temperature: float = Field(1.0, ge=0.01, le=100)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(0, ge=0, le=2**32 - 1, description="the same seed for both runs")
    top_latents: int = Field(0, ge=0, description="SAE latents reported per generated token")
    compare: bool = Field(True, description="with steering: also generate without it, side by side")


class GeneratedToken(BaseModel):
    token: str
    token_id: int
    latents: list[dict[str, Any]] = Field(description="[{latent, value, name}] at the position that chose it")


class GeneratedText(BaseModel):
    text: str
    token_ids: list[int]
    tokens: list[GeneratedToken] | None = None


class GenerationPair(BaseModel):
    prompt: str
    default: GeneratedText | None = Field(None, description="without steering (unless compare is false)")
    steered: GeneratedText | None = Field(None, description="with the steering config, if one was given")


class GenerateResponse(BaseModel):
    model: str
    steering_id: str | None = None
    items: list[GenerationPair]
    seconds: dict[str, float] = Field(description="wall time of each run, default and steered")
    warnings: list[str] = Field(
        default_factory=list, description="the steering config's warnings (see steering preview)"
    )
    job_id: str


# ---------------------------------------------------------------------------------------------
# Dashboard reads: a job's stream token, an SAE's training history


class StreamToken(BaseModel):
    """A URL for a job's event stream that needs no header (a browser's EventSource sends none)."""

    url: str = Field(description="GET this (with its token, if any) as text/event-stream")
    token: str | None = Field(None, description="bound to that path; null when no API key is set")
    expires_at: datetime | None = Field(None, description="connect before this; the stream then runs on")


class TrainingPoint(BaseModel):
    """One log step of an SAE's training (the trainer's progress report)."""

    model_config = ConfigDict(extra="allow")

    step: int
    tokens: int = Field(description="rows trained on so far")
    # null where the value was not finite (a diverging step): JSON has no NaN
    loss: float | None
    fvu: float | None
    l0: float | None
    dead_fraction: float | None
    lr: float | None = None
    elapsed_s: float | None = None


class SAEHistory(BaseModel):
    sae_id: str
    points: list[TrainingPoint] = Field(description="in order; empty for an imported SAE")


# ---------------------------------------------------------------------------------------------
# Analyses


class CausalAnalysisRequest(CausalConfig):
    """``CausalConfig`` with the datasets a client may name (inline texts, an upload, a hub id)."""

    dataset: CaptureDataset = Field(description="the texts the losses are measured on")


AnalysisRequest = Annotated[
    NeuronConfig | FeatureConfig | CausalAnalysisRequest | CircuitConfig, Field(discriminator="kind")
]
_ANALYSIS_REQUEST: TypeAdapter = TypeAdapter(AnalysisRequest)


def parse_analysis_request(data: Any) -> NeuronConfig | FeatureConfig | CausalAnalysisRequest | CircuitConfig:
    """A stored job's request parsed again by the worker (the API validated it already)."""
    return _ANALYSIS_REQUEST.validate_python(data)


class AnalysisSummary(BaseModel):
    """An analysis's manifest.json (docs/store-format.md); fields beyond these are passed through."""

    model_config = ConfigDict(extra="allow")

    id: str
    kind: Literal["neuron", "feature", "causal", "circuit"]
    title: str
    created: str
    source: dict[str, Any] = Field(description="what was analysed: run, model, layer(s), SAE, dataset")
    config: dict[str, Any]
    key_numbers: dict[str, Any] = Field(description="the headline figures of the report")
    plots: list[str] = Field(description="names for GET /v1/analyses/{id}/plots/{name}")


class AnalysisPage(Page[AnalysisSummary]):
    pass


class AnalysisDetail(AnalysisSummary):
    results: dict[str, Any] = Field(description="everything measured: results.json")


# ---------------------------------------------------------------------------------------------
# Imported activation runs and embedded models


RowField = Literal["token_id", "doc_index", "position"]


class RunImportRequest(StrictModel):
    """Turn an uploaded safetensors file of activations into a run (``POST /v1/uploads`` first).

    Each imported tensor is ``[n_rows, d]``, floating point, finite, with the same rows as the
    others; row metadata tensors are 1-D integers with one value per row. Without metadata each row
    is its own document (token id -1, position 1), so the held-out split and the row filters still
    work; the manifest's ``import.synthetic_row_fields`` says what was made up.
    """

    upload_id: str = Field(min_length=1, max_length=64, description="a .safetensors upload")
    tensors: dict[str, str] | None = Field(
        None,
        max_length=256,
        description="tensor name in the file → layer name in the run; "
        "default: every 2-D floating-point tensor under its own name",
    )
    row_fields: dict[RowField, str] | None = Field(
        None,
        description="token_id / doc_index / position → tensor name in the file; "
        "default: tensors with exactly those names, where present",
    )
    model: str | None = Field(
        None,
        max_length=200,
        description="the model the activations came from; a model the service can load (bundled, "
        "configured local, or held by a worker) makes the run loadable (CE-loss evaluation); "
        "any other name is recorded only",
    )
    dtype: ModelDType | None = Field(
        None, description="storage dtype; default: the file's (F64 is stored as fp32)"
    )
    shard_mb: float = Field(64.0, gt=0, le=1024, description="upper bound on one shard file (per layer)")


class EmbeddedModelInfo(ModelInfo):
    """A model as an app embedding Kestrel lists it: Kestrel's own, or one of the host app's."""

    source: Literal["bundled", "local", "hub", "app"] = Field(  # type: ignore[assignment]
        description="app: a model the host application serves in its own process"
    )


class EmbeddedModelPage(Page[EmbeddedModelInfo]):
    pass
