"""What the browser tests share besides fixtures: the stack's contents and the browser's flags."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service_stack import REPO, TEXTS, Stack, wait_for_job

OUTPUT = REPO / "test-output" / "browser"
MODEL = "tiny-llama"
LAYER = "model.layers.1"
N_LATENTS = 4608  # the size for page-load timings
API_KEY = "browser-test-key"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str | None:
    """Debian's chromium (``make test`` installs it); None when this machine has none."""
    for candidate in (os.environ.get("KESTREL_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@dataclass
class Dashboard:
    """A live stack and what it holds: the base URL, a run, a trained SAE with discovered features."""

    stack: Stack
    run_id: str
    sae_id: str

    @property
    def url(self) -> str:
        return self.stack.base_url

    def client(self, **kwargs: Any):
        return self.stack.client(**kwargs)


def train_sae_with_features(http, n_latents: int = N_LATENTS) -> tuple[str, str]:
    """A capture on the tiny model, a short SAE training and a discovery, all through the API."""
    body = {"model": MODEL, "layers": [LAYER], "dataset": {"kind": "texts", "texts": TEXTS * 2}}
    run_id = wait_for_job(http, http.post("/v1/activations", json=body).json()["id"])["artifacts"]["run_id"]
    train = {
        "run_id": run_id,
        "layer": LAYER,
        "sae": {"n_latents": n_latents, "k": 8},
        "train": {"batch_size": 64, "token_budget": 6_000, "log_every": 2},
    }
    sae_id = wait_for_job(http, http.post("/v1/saes", json=train).json()["id"])["artifacts"]["sae_id"]
    discover = {"config": {"top_n": 12, "window": 6}}
    wait_for_job(http, http.post(f"/v1/saes/{sae_id}/features/discover", json=discover).json()["id"])
    return run_id, sae_id


def run_neuron_analysis(http, run_id: str, title: str | None = None) -> dict[str, Any]:
    """A neuron analysis of the run's layer through the API; the finished job (its artifacts name it)."""
    body = {"kind": "neuron", "run_id": run_id, "layer": LAYER, **({"title": title} if title else {})}
    started = http.post("/v1/analyses", json=body)
    assert started.status_code == 202, started.text
    return wait_for_job(http, started.json()["id"])
