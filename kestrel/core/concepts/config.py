"""How discovery runs: one torch-free config for the CLI, the API request and the stored summary.

The API process validates a discovery request (and bounds the state it would keep) with this
module alone; running discovery is `kestrel.core.concepts.discovery`.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from kestrel.core.config import EngineConfig
from kestrel.core.errors import InvalidInputError
from kestrel.core.runs import RowFilter, RunManifest, get_manifest

if TYPE_CHECKING:
    from kestrel.core.concepts.accumulate import LogBins
    from kestrel.core.sae.records import SAEManifest
    from kestrel.core.store import Store

MAX_HIST_BINS = 240
MAX_STATE_ENTRIES = 200_000_000  # about 3 GiB at 16 bytes an entry


class DiscoveryConfig(EngineConfig):
    """How discovery runs; one object for the CLI, the API request and the stored summary."""

    top_n: int = Field(20, ge=1, le=256, description="top-activating contexts kept per latent")
    n_bins: int = Field(10, ge=1, le=64, description="equal-width activation bins below the top value")
    samples_per_bin: int = Field(5, ge=0, le=64, description="contexts sampled from each bin")
    window: int = Field(8, ge=0, le=64, description="tokens shown either side of a context's token")
    hist_per_decade: int = Field(10, ge=1, le=50, description="log-spaced histogram bins per decade")
    hist_min: float = Field(1e-3, gt=0, description="lower edge of the histogram (open below)")
    hist_max: float = Field(1e3, gt=0, description="upper edge of the histogram (open above)")
    logit_k: int = Field(10, ge=1, le=100, description="promoted and suppressed tokens per latent")
    filters: RowFilter = Field(
        default_factory=RowFilter.recommended, description="rows left out (attention sinks by default)"
    )
    max_length: int = Field(512, gt=0, description="dataset: tokens per document")
    token_budget: int = Field(8192, gt=0, description="dataset: padded tokens per forward batch")
    batch_rows: int = Field(8192, gt=0, description="run: rows read per batch")
    seed: int = 0

    def log_bins(self) -> LogBins:
        from kestrel.core.concepts.accumulate import LogBins  # torch: the worker's side only

        self.histogram_bins()  # checked
        return LogBins(self.hist_min, self.hist_max, self.hist_per_decade)

    def histogram_bins(self) -> int:
        """How many bins the histogram has (``LogBins.n_bins``), checked against `MAX_HIST_BINS`."""
        if self.hist_max <= self.hist_min:
            raise InvalidInputError(f"hist_max ({self.hist_max}) must exceed hist_min ({self.hist_min})")
        n_bins = log_bin_count(self.hist_min, self.hist_max, self.hist_per_decade)
        if n_bins > MAX_HIST_BINS:
            raise InvalidInputError(
                f"the histogram would have {n_bins} bins (hist_min..hist_max at hist_per_decade); "
                f"at most {MAX_HIST_BINS}"
            )
        return n_bins

    def check_size(self, n_latents: int) -> None:
        """The kept state is n_latents × (top_n + histogram bins × samples_per_bin) entries: bound it."""
        entries = n_latents * (self.top_n + self.histogram_bins() * max(self.samples_per_bin, 1))
        if entries > MAX_STATE_ENTRIES:
            raise InvalidInputError(
                f"discovery would keep {entries:,} entries for {n_latents:,} latents (at most "
                f"{MAX_STATE_ENTRIES:,}); lower top_n, samples_per_bin or the histogram's bins per decade"
            )


def log_bin_count(low: float, high: float, per_decade: int) -> int:
    """Bins of a log-spaced histogram from ``low`` to ``high`` (`LogBins.n_bins`, defined here once)."""
    # a difference of logs, not the log of a ratio: 1e3 / 5e-324 overflows to infinity
    return max(1, round((math.log10(high) - math.log10(low)) * per_decade))


# ---------------------------------------------------------------------------------------------
# Neuronpedia export (kestrel.core.concepts.neuronpedia)

SOURCE_SET_PATTERN = r"^[a-z0-9][a-z0-9-]{0,63}$"


#: Where an SAE's exports live: ``saes/<sae_id>/exports/<export_id>/`` holds the zip and its record.
EXPORTS_DIR = "exports"
EXPORT_FILE = "neuronpedia.zip"
EXPORT_RECORD = "export.json"


def export_rel(export_id: str, name: str = "") -> str:
    """The path of an export (or of ``name`` in it) inside its SAE's artifact."""
    return f"{EXPORTS_DIR}/{export_id}/{name}" if name else f"{EXPORTS_DIR}/{export_id}"


def neuronpedia_layer_number(layer: str) -> int:
    """The block number Neuronpedia names a source by (``model.layers.15`` → 15)."""
    numbers = re.findall(r"\.(\d+)(?:\.|:|$)", layer)
    if not numbers:
        raise InvalidInputError(
            f"layer {layer!r} has no block number; Neuronpedia names sources by layer number",
            details={"layer": layer},
        )
    return int(numbers[0])


class NeuronpediaExport(EngineConfig):
    """What to call an SAE's feature pages on Neuronpedia, and which latents and contexts go."""

    model_id: str | None = Field(
        None,
        max_length=100,
        description="Neuronpedia's model id (default: the model's name, e.g. smollm2-135m-instruct)",
    )
    source_set: str = Field(
        "kestrel", pattern=SOURCE_SET_PATTERN, description="source set, e.g. res-topk-4k (lowercase, dashes)"
    )
    creator: str = Field("kestrel", min_length=1, max_length=100, description="creator shown on Neuronpedia")
    description: str = Field("", max_length=500, description="the source set's description")
    latents: list[int] | None = Field(
        None, max_length=65_536, description="latents to export (default: every latent that fired)"
    )
    bins: bool = Field(True, description="also export the samples of each activation bin, not only the top")


ScoringForm = Literal["direct", "channel"]
ChannelReduce = Literal["sum", "mean", "max"]


class ScoringConfig(EngineConfig):
    """How labels are scored (`kestrel.core.concepts.scoring`), after EleutherAI's delphi.

    Examples are fixed blocks of ``example_ctx_len`` tokens of the run's documents (delphi's
    ``example_ctx_len``; 16 rather than delphi's 32 by default: a 135M scorer reads a short
    snippet better, and a CPU scores half the tokens). The labeller sees the ``n_train`` top blocks
    and ``n_contrast`` non-activating ones; the scorer sees others only: ``n_test`` activating
    blocks sampled evenly from ``n_quantiles`` activation quantiles, as many non-activating ones
    drawn at random, and a separate calibration split of ``n_calibration`` of each that sets the
    decision threshold (never fitted on the examples scored). ``form`` is how the scorer
    answers (`kestrel.core.concepts.scoring`): ``direct`` reads log p(label | example),
    ``channel`` log p(example | label) − log p(example), its per-token terms combined by
    ``reduce``.
    """

    example_ctx_len: int = Field(16, ge=4, le=64, description="tokens per example block")
    n_train: int = Field(8, ge=1, le=40, description="top examples shown to the labeller")
    n_contrast: int = Field(4, ge=0, le=20, description="non-activating examples shown to the labeller")
    n_test: int = Field(10, ge=2, le=100, description="activating examples scored (quantile-sampled)")
    n_non_activating: int = Field(10, ge=2, le=100, description="non-activating examples scored")
    n_calibration: int = Field(4, ge=1, le=50, description="examples of each class that set the threshold")
    n_quantiles: int = Field(10, ge=1, le=20, description="activation quantiles the test examples span")
    fuzz_threshold: float = Field(
        0.3, gt=0, le=1, description="fuzzing marks tokens at or above this fraction of the example's max"
    )
    form: ScoringForm = Field(
        "direct",
        description="direct: log p(label | example); channel: log p(example | label) - log p(example)",
    )
    reduce: ChannelReduce = Field(
        "sum", description="channel form: how an example's per-token log-ratios are combined"
    )
    max_tokens: int = Field(2_000_000, gt=0, description="run rows read to find examples")
    batch_size: int = Field(32, ge=1, le=512, description="sequences per scorer forward")
    seed: int = 22


def scoring_run(
    store: Store, summary: SAEManifest, run_id: str | None = None
) -> tuple[str, str, RunManifest]:
    """The run a label's examples come from (``run_id``, else the SAE's own), the SAE's layer and
    the run's manifest: checked from manifests alone, so the API refuses a request before a job
    loads any model, and the engine (`examples.read_blocks`) applies the very same rule."""
    layer = summary.layer_name
    chosen = run_id or summary.run_id
    if not chosen or not store.exists("activations", chosen):
        if run_id is not None:
            raise InvalidInputError(f"no run {run_id!r} to draw examples from", details={"run_id": run_id})
        raise InvalidInputError(
            f"sae {summary.id!r} has no stored run of its own to draw examples from; give a run_id "
            "(a run with the SAE's layer)",
            details={"sae_id": summary.id, "run_id": chosen},
        )
    manifest = get_manifest(store, chosen)
    d_in = int(summary.config["d_in"])
    if layer is None or layer not in manifest.layers or manifest.layers[layer].d != d_in:
        raise InvalidInputError(
            f"run {chosen!r} has no layer {layer!r} of width {d_in} (the SAE's input); "
            f"it captured {', '.join(f'{name} (width {rec.d})' for name, rec in manifest.layers.items())}",
            details={"run_id": chosen, "layer": layer, "d_in": d_in},
        )
    return chosen, layer, manifest
