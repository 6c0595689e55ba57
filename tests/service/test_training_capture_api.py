"""A run written during a user's own training (the Lightning callback, straight into the running
service's store) is listed by the API, and the service trains an SAE on it over HTTP: FVU, L0 and
dead latents on held-out rows, the model-in-the-loop evaluation skipped with its reason."""

from __future__ import annotations

import warnings

import httpx
import pytorch_lightning as pl
import torch
from service_stack import Stack, assert_error, wait_for_job
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kestrel.core.callbacks import KestrelCaptureCallback
from kestrel.core.runs import RunManifest

VOCAB, WIDTH, SEQ, BATCH, STEPS, EVERY = 64, 16, 12, 8, 120, 20
LAYER = "blocks.1"


class TinyLM(pl.LightningModule):
    """Embedding, two residual MLP blocks and a head, trained on random tokens."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Linear(2 * WIDTH, WIDTH))
            for _ in range(2)
        )
        self.head = nn.Linear(WIDTH, VOCAB)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (ids_BT,) = batch
        h_BTD = self.embed(ids_BT)
        for block in self.blocks:
            h_BTD = h_BTD + block(h_BTD)
        logits_BTV = self.head(h_BTD)
        return nn.functional.cross_entropy(logits_BTV[:, :-1].reshape(-1, VOCAB), ids_BT[:, 1:].reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def train_with_capture(store_root) -> RunManifest:
    """The user's side: fit with the callback writing into the service's store; the manifest."""
    ids_NT = torch.randint(0, VOCAB, (BATCH * STEPS, SEQ), generator=torch.Generator().manual_seed(0))
    callback = KestrelCaptureCallback(
        [LAYER, "embed"], store_root, every_n_steps=EVERY, max_rows_per_step=64, model_name="tiny-lm"
    )
    trainer = pl.Trainer(
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[callback],
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|bottleneck).*")
        trainer.fit(TinyLM(), DataLoader(TensorDataset(ids_NT), batch_size=BATCH))
    assert callback.manifest is not None
    return callback.manifest


def test_the_service_trains_an_sae_on_a_run_captured_during_training(
    client: httpx.Client, service: Stack
) -> None:
    run_id = train_with_capture(service.store_root).id

    run = client.get(f"/v1/activations/{run_id}")
    assert run.status_code == 200, run.text
    manifest = run.json()
    assert manifest["source"]["kind"] == "training" and manifest["steps"] == list(range(0, STEPS, EVERY))
    assert manifest["model"]["loadable"] is False and manifest["layers"][LAYER]["d"] == WIDTH
    assert run_id in [r["id"] for r in client.get("/v1/activations").json()["items"]]

    request = {
        "run_id": run_id,
        "layer": LAYER,
        "sae": {"n_latents": 32, "k": 4},
        "train": {"batch_size": 32, "token_budget": 3000, "log_every": 5},
    }
    submitted = client.post("/v1/saes", json=request)
    assert submitted.status_code == 202, submitted.text
    job = wait_for_job(client, submitted.json()["id"])
    sae_id = job["artifacts"]["sae_id"]
    assert any("model-in-the-loop evaluation skipped" in line for line in job["log"]), job["log"]

    sae = client.get(f"/v1/saes/{sae_id}")
    assert sae.status_code == 200, sae.text
    config, metrics = sae.json()["config"], sae.json()["metrics"]
    assert (config["model"], config["layer"], config["run_id"], config["d_in"]) == (
        "tiny-lm",
        LAYER,
        run_id,
        WIDTH,
    )
    assert 0 <= metrics["fvu"] < 1.5 and 0 < metrics["l0"] <= 4 and "dead_fraction" in metrics
    assert metrics["model_in_the_loop"]["skipped"] is True
    assert "cannot load" in metrics["model_in_the_loop"]["reason"]

    # asking for the model-in-the-loop evaluation says why there is none, without loading a model
    evaluation = client.post(f"/v1/saes/{sae_id}/evaluate")
    assert evaluation.status_code == 202, evaluation.text
    failed = wait_for_job(client, evaluation.json()["id"], states=("failed",))
    assert failed["error"]["code"] == "invalid_input" and "cannot load" in failed["error"]["message"]
    # so does an encode (an interactive call: the error comes back directly)
    encoded = client.post(f"/v1/saes/{sae_id}/encode", json={"text": "hello"})
    assert encoded.status_code == 422 and "cannot load" in encoded.json()["error"]["message"], encoded.text
    # so does a discovery (it needs the model's tokenizer and unembedding)
    discovery = client.post(f"/v1/saes/{sae_id}/features/discover", json={})
    assert discovery.status_code == 202, discovery.text
    failed = wait_for_job(client, discovery.json()["id"], states=("failed",))
    assert failed["error"]["code"] == "invalid_input" and "cannot load" in failed["error"]["message"]
    # a causal analysis of its latents is refused before it is queued, with the reason
    texts = {"kind": "texts", "texts": ["a b"]}
    causal = {"kind": "causal", "sae_id": sae_id, "latents": [0], "dataset": texts}
    refused = assert_error(client.post("/v1/analyses", json=causal), 422, "invalid_input")
    assert "cannot load" in refused["message"]

    assert client.delete(f"/v1/saes/{sae_id}").status_code == 200
    assert client.delete(f"/v1/activations/{run_id}").status_code == 200
    assert_error(client.get(f"/v1/activations/{run_id}"), 404, "not_found")
