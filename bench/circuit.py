"""Attribution patching (AtP*) against full activation patching, on the README's circuit example.

SmolLM2-135M, the README's pair ("The capital of France is" / "The capital of Italy is", " Paris"
vs " Rome"), every block × every position. One ``method: "patching"`` analysis measures both in
the same run: the AtP* estimate of every cell (one clean forward, one corrupted forward and
backward, the QK fix) and real patching of every cell (one forward each), so the two timings see
the same machine load. Then the default analysis (``method: "atp"``, its top candidates confirmed)
runs end to end, as ``kestrel analyze circuit`` would.

- ``atp_s``: the estimate of all cells; ``patching_s``: real patching of all cells;
  ``speedup`` = patching_s / atp_s.
- ``spearman``: rank agreement of estimate and real patching over the ``n_cells`` layer × position
  cells; ``spearman_changed``: over the cells whose activations differ between the runs (the
  others are exactly 0 in both, which the first figure counts as agreement).
- ``spearman_without_qk_fix``: the same agreement for plain AtP (the fix turned off), from an
  estimate-only analysis (``confirm_top: 0``) in the same run.
- ``default_total_s``: the default analysis's wall time (estimate + ``confirm_top`` patches +
  report), ``default_confirmed_spearman`` its agreement over the confirmed cells.

    python bench/circuit.py        # prints JSON; the latest figures are in bench/README.md
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from kestrel.core.analysis import get_analysis, get_results, run_analysis
from kestrel.core.models import BUNDLED, ensure_bundled_cache, load_model
from kestrel.core.store import LocalStore

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
PAIR = {
    "clean": "The capital of France is",
    "corrupted": "The capital of Italy is",
    "correct": " Paris",
    "wrong": " Rome",
}


def main() -> None:
    cache = Path(os.environ.get("KESTREL_TEST_MODEL_CACHE", REPO / ".kestrel"))
    ensure_bundled_cache(BUNDLED[MODEL], cache)
    lm = load_model(MODEL, device="cpu", store_root=cache)
    loader = lambda *_: lm  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(Path(tmp) / "store")
        full = get_results(
            store,
            run_analysis(
                store, {"kind": "circuit", "pairs": [PAIR], "method": "patching"}, model_loader=loader
            ),
        )
        plain = get_results(
            store,
            run_analysis(
                store,
                {"kind": "circuit", "pairs": [PAIR], "qk_fix": False, "confirm_top": 0},
                model_loader=loader,
            ),
        )
        started = time.perf_counter()
        default_id = run_analysis(store, {"kind": "circuit", "pairs": [PAIR]}, model_loader=loader)
        default_s = time.perf_counter() - started
        default = get_analysis(store, default_id).key_numbers
    estimate = np.array(full["components"]["resid"]["estimate"])
    measured = np.array(full["components"]["resid"]["measured"], dtype=float)
    changed = np.abs(estimate) + np.abs(measured) > 0
    plain_estimate = np.array(plain["components"]["resid"]["estimate"])
    timings = full["timings"]
    print(
        json.dumps(
            {
                "model": MODEL,
                "cells": list(estimate.shape),
                "n_cells": int(estimate.size),
                "atp_s": round(timings["atp_s"], 3),
                "patching_s": round(timings["patching_s"], 3),
                "speedup": round(timings["patching_s"] / timings["atp_s"], 1),
                "spearman": round(float(spearmanr(estimate.ravel(), measured.ravel()).statistic), 4),
                "spearman_changed": round(
                    float(spearmanr(estimate[changed], measured[changed]).statistic), 4
                ),
                "n_changed": int(changed.sum()),
                "spearman_without_qk_fix": round(
                    float(spearmanr(plain_estimate.ravel(), measured.ravel()).statistic), 4
                ),
                "atp_s_without_qk_fix": round(plain["timings"]["atp_s"], 3),
                "qk_fix": full["qk_fix"]["applied"],
                "default_total_s": round(default_s, 2),
                "default_confirmed_spearman": default["spearman"],
                "default_best": f"{default['best_layer']} @ {default['best_position']}",
                "torch_threads": torch.get_num_threads(),
                "cpu": platform.processor() or platform.machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
