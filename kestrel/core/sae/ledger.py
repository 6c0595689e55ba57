"""An SAE's evaluation ledger: every quality figure Kestrel measures, each beside its chance
baseline, computed on the CPU and stored with the SAE as ``saes/<id>/ledger.json``.

Entries (``entries[name]``: value, baseline and what kind of baseline, which way is better, the
settings used, when computed):

* ``fvu`` (chance 1: predicting the mean), ``l0`` (reference: d_in, the dense basis),
  ``dead_fraction`` (ideal 0): on the held-out rows of the SAE's run, else on the tokens of
  the probing texts (`kestrel.core.sae.metrics`);
* ``ce_loss_recovered`` (chance 0: the layer zero-ablated; 1 is the clean model) and
  ``kl_divergence`` (baseline: the KL of zero ablation) on held-out texts
  (`kestrel.core.sae.model_eval`);
* ``sparse_probing_top_<k>`` and ``dense_probe`` (chance: majority class) on a labelled dataset
  the user gives (`kestrel.core.sae.probing`);
* ``absorption_fraction`` and ``full_absorption_rate`` on the first-letter task (ideal 0;
  baseline: the same with random main latents) (`kestrel.core.sae.absorption`);
* ``synthetic_recovery`` (chance: a random decoder) (`kestrel.core.sae.synthetic`).

Faults: nothing is written until every part is done; the file is then replaced in one rename
(`Store.put_json`), so a job killed midway leaves the previous ledger (or none) and its rerun
computes all of it again. A stop request ends the computation and writes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kestrel.core.errors import InvalidInputError
from kestrel.core.models import LoadedModel
from kestrel.core.run_reader import iter_batches
from kestrel.core.runs import RowFilter, get_manifest
from kestrel.core.sae import absorption, probing, synthetic
from kestrel.core.sae.artifacts import EVAL_MAX_ROWS, HELDOUT_FRACTION, heldout_texts, load_sae
from kestrel.core.sae.ledger_records import LEDGER_FILE, LEDGER_VERSION, LedgerOptions
from kestrel.core.sae.metrics import evaluate
from kestrel.core.sae.model_eval import ce_loss_metrics
from kestrel.core.sae.records import KIND, require_loadable_model
from kestrel.core.store import Store

#: Share of the progress bar each stage takes (the synthetic training is the slow part).
STAGES = {"core": 0.1, "model_in_the_loop": 0.15, "probing": 0.15, "absorption": 0.2, "synthetic": 0.4}
LEDGER_EVAL_ROWS = min(EVAL_MAX_ROWS, 50_000)


class LedgerStoppedError(Exception):
    """A stop request arrived mid-way; nothing was written."""


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def entry(
    value: float | None,
    baseline: float | None,
    baseline_kind: str,
    better: str,
    settings: dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """One ledger line: the figure, its baseline, and how it was made."""
    return {
        "value": value,
        "baseline": baseline,
        "baseline_kind": baseline_kind,
        "better": better,
        "settings": settings,
        "computed_at": now(),
        **extra,
    }


class _Progress:
    """Maps each stage's own 0..1 onto the job's bar; checks for a stop between steps."""

    def __init__(self, report: Callable[[float, str], None] | None, should_stop: Callable[[], bool] | None):
        self.report, self.should_stop, self.done = report, should_stop, 0.0
        self.seconds: dict[str, float] = {}

    def durations(self, end: float) -> dict[str, float]:
        """Seconds each stage took (a stage runs until the next one starts)."""
        starts = sorted(self.seconds.items(), key=lambda item: item[1])
        ends = [t for _, t in starts[1:]] + [end]
        return {name: round(stop - begin, 2) for (name, begin), stop in zip(starts, ends, strict=True)}

    def stage(self, name: str) -> Callable[[float], None]:
        self.check()
        self.seconds[name] = time.perf_counter()  # its start; `finish` turns it into a duration
        start, width = self.done, STAGES[name]
        self.done += width

        def on(fraction: float) -> None:
            if self.report is not None:
                self.report(min(1.0, start + width * fraction), name)

        on(0.0)
        return on

    def check(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise LedgerStoppedError


def compute_ledger(
    store: Store,
    sae_id: str,
    lm: LoadedModel,
    options: LedgerOptions,
    *,
    texts: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    on_progress: Callable[[float, str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any] | None:
    """Compute the ledger and store it (atomically); None when stopped (nothing stored)."""
    sae, summary = load_sae(store, sae_id, device="cpu")
    summary.require_sae("the evaluation ledger")  # reconstruction metrics splice it in at `layer`
    sae.eval()
    require_loadable_model(store, summary)
    _, layer = summary.model_and_layer()
    lm.layer(layer)  # NotFoundError naming the layers, before any work
    run = (
        get_manifest(store, summary.run_id)
        if summary.run_id and store.exists("activations", summary.run_id)
        else None
    )
    if run is None and not texts:
        raise InvalidInputError(
            f"sae {sae_id!r} has no capture run to evaluate on: give a labelled dataset",
            details={"sae_id": sae_id},
        )
    filters = RowFilter(**summary.config.get("data", {}).get("filters", RowFilter.recommended().model_dump()))
    norm_median = run.layers[layer].norm_median if run is not None and layer in run.layers else None
    progress = _Progress(on_progress, should_stop)
    entries: dict[str, Any] = {}
    details: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        pooled = None
        if texts:
            pooled = probing.pool_texts(
                lm,
                sae,
                layer,
                texts,
                filters=filters,
                norm_median=norm_median,
                max_length=options.max_length,
                on_progress=progress.stage("probing"),
            )
            details["probing"] = probing.sparse_probing(
                pooled.acts_ND,
                pooled.latents_NF,
                list(labels or []),
                options.ks,
                test_fraction=options.test_fraction,
                seed=options.seed,
            )
            entries.update(_probing_entries(details["probing"], options))
        else:
            progress.stage("probing")
        core = _core_metrics(store, sae, run, layer, filters, pooled, progress.stage("core"))
        entries.update(_core_entries(core, sae.d_in))
        details["core"] = core
        if options.model_in_the_loop:
            eval_texts = heldout_texts(store, run.id, options.eval_texts) if run is not None else []
            eval_texts = eval_texts or list(texts or [])[: options.eval_texts]
            mitl = ce_loss_metrics(
                lm,
                sae,
                layer,
                eval_texts,
                filters=filters,
                norm_median=norm_median,
                on_progress=progress.stage("model_in_the_loop"),
            )
            sae.to("cpu")
            details["model_in_the_loop"] = mitl
            entries.update(
                _model_entries(mitl, "run held-out texts" if run is not None else "the probing texts")
            )
        else:
            progress.stage("model_in_the_loop")
        if options.absorption:
            details["absorption"] = _absorption(lm, sae, layer, options, progress.stage("absorption"))
            entries.update(_absorption_entries(details["absorption"], options))
        else:
            progress.stage("absorption")
        if options.synthetic:
            details["synthetic"] = _synthetic(summary.config, summary.train_config, options, progress)
            entries.update(_synthetic_entries(details["synthetic"]))
        progress.check()
    except LedgerStoppedError:
        return None
    details["stage_seconds"] = progress.durations(time.perf_counter())
    ledger = {
        "version": LEDGER_VERSION,
        "sae_id": sae_id,
        "model": summary.model_name,
        "layer": layer,
        "computed_at": now(),
        "seconds": round(time.perf_counter() - started, 2),
        "options": options.model_dump(mode="json"),
        "entries": entries,
        "details": details,
    }
    store.put_json(KIND, sae_id, LEDGER_FILE, ledger)  # one rename: the old ledger or this one
    return ledger


# ---------------------------------------------------------------------------------------------
# Stages


def _core_metrics(store, sae, run, layer, filters, pooled, on_progress) -> dict[str, Any]:
    """FVU, L0 and dead latents on the run's held-out rows, else on the probing texts' tokens."""
    if run is not None and layer in run.layers:
        rows = iter_batches(
            store,
            run.id,
            layer,
            batch_size=8192,
            filters=filters,
            split="heldout",
            heldout_fraction=HELDOUT_FRACTION,
            norm_median=None,
        )
        core = evaluate(sae, rows, max_rows=LEDGER_EVAL_ROWS)
        core["source"] = f"held-out rows of run {run.id}"
    else:
        assert pooled is not None and pooled.fire_counts_F is not None
        if pooled.n_tokens == 0:
            raise InvalidInputError("the probing texts have no tokens the SAE reads (all filtered out)")
        rows = pooled.n_tokens
        dead = int((pooled.fire_counts_F == 0).sum())
        core = {
            "n_rows": rows,
            "fvu": pooled.fvu.fvu,
            "l0": pooled.active_total / rows,
            "dead_fraction": dead / sae.n_latents,
            "dead_latents": dead,
            "dead_definition": f"never fired on the {rows} tokens of the probing texts",
            "source": "tokens of the probing texts (the SAE has no capture run)",
        }
    on_progress(1.0)
    core.pop("density_histogram", None)
    return core


def _absorption(lm, sae, layer, options: LedgerOptions, on_progress) -> dict[str, Any]:
    word_ids, words = absorption.first_letter_words(lm.tokenizer, options.absorption_words, options.seed)
    acts_ND = absorption.word_activations(lm, layer, word_ids, on_progress=on_progress)
    with torch.inference_mode():
        latents_NF = probing.dense_latents(sae, acts_ND).cpu()
    settings = absorption.AbsorptionSettings(max_k=options.absorption_max_k)
    result = absorption.absorption_metrics(
        acts_ND.double().numpy(),
        [w[1].lower() for w in words],
        latents_NF.double().numpy(),
        sae.W_dec.detach().double().cpu().numpy(),
        settings,
        seed=options.seed,
    )
    result["n_words"] = len(words)
    return result


def _synthetic(config, train_config, options: LedgerOptions, progress: _Progress) -> dict[str, Any]:
    on = progress.stage("synthetic")
    result = synthetic.ground_truth_recovery(
        config,
        train_config,
        n_rows=options.synthetic_rows,
        l0=options.synthetic_l0,
        seed=options.seed,
        on_progress=lambda p: on(p.fraction or 0.0),
        should_stop=progress.should_stop,
    )
    if result is None:
        raise LedgerStoppedError
    return result


# ---------------------------------------------------------------------------------------------
# Entries


def _core_entries(core: dict[str, Any], d_in: int) -> dict[str, Any]:
    settings = {"rows": core["n_rows"], "source": core["source"]}
    return {
        "fvu": entry(core["fvu"], 1.0, "chance", "lower", settings, note="1 = predicting the mean"),
        "l0": entry(
            core["l0"], float(d_in), "reference", "lower", settings, note="d_in: every neuron active"
        ),
        "dead_fraction": entry(
            core["dead_fraction"], 0.0, "ideal", "lower", {**settings, "definition": core["dead_definition"]}
        ),
    }


def _model_entries(m: dict[str, Any], source: str) -> dict[str, Any]:
    settings = {"texts": m["n_texts"], "predicted_tokens": m["n_predicted_tokens"], "source": source}
    return {
        "ce_loss_recovered": entry(
            m["ce_loss_recovered"],
            0.0,
            "chance",
            "higher",
            settings,
            ceiling=1.0,
            note="0 = layer zero-ablated, 1 = clean model",
        ),
        "kl_divergence": entry(
            m["kl_sae"],
            m["kl_zero_ablated"],
            "chance",
            "lower",
            settings,
            ceiling=0.0,
            note="KL(clean ‖ spliced) in nats; baseline: KL with the layer zero-ablated",
        ),
    }


def _probing_entries(p: dict[str, Any], options: LedgerOptions) -> dict[str, Any]:
    settings = {
        "texts": p["n_texts"],
        "classes": p["n_classes"],
        "test_fraction": options.test_fraction,
        "seed": options.seed,
        "pooling": "mean over kept tokens",
        "probe": "logistic regression, L2, C=1",
    }
    out = {
        f"sparse_probing_top_{k}": entry(
            p["accuracy"][str(k)],
            p["chance"],
            "chance",
            "higher",
            {**settings, "k": k},
            ceiling=p["dense_accuracy"],
            note="mean held-out accuracy over one-vs-rest tasks",
        )
        for k in options.ks
    }
    out["dense_probe"] = entry(
        p["dense_accuracy"], p["chance"], "chance", "higher", settings, note="all of the layer's activations"
    )
    return out


def _absorption_entries(a: dict[str, Any], options: LedgerOptions) -> dict[str, Any]:
    settings = {
        **a["settings"],
        "words": a.get("n_words"),
        "letters_evaluated": len(a["letters_evaluated"]),
        "seed": options.seed,
    }
    extra = {"reason": a["reason"]} if "reason" in a else {}
    return {
        "absorption_fraction": entry(
            a["absorption_fraction"],
            a["control_absorption_fraction"],
            "control",
            "lower",
            settings,
            ceiling=0.0,
            note="baseline: the same with random main latents",
            **extra,
        ),
        "full_absorption_rate": entry(
            a["full_absorption_rate"],
            a["control_full_absorption_rate"],
            "control",
            "lower",
            settings,
            ceiling=0.0,
            note="baseline: the same with random main latents",
            **extra,
        ),
    }


def _synthetic_entries(s: dict[str, Any]) -> dict[str, Any]:
    return {
        "synthetic_recovery": entry(
            s["recovery"],
            s["chance"]["recovery"],
            "chance",
            "higher",
            {k: v for k, v in s["settings"].items() if k != "train_config"},
            ceiling=1.0,
            note="mean over true features of the best |cos| with a learned decoder row",
        ),
    }
