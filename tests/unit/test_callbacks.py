"""Capture during training: the Lightning callback and the manual-loop hooks write the run format at
the configured steps, with rows equal to what the layer produced, and the SAE pipeline trains on
such a run without a model to load."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kestrel.core.callbacks import KestrelCaptureCallback, TrainingCapture
from kestrel.core.errors import InvalidInputError, NotFoundError
from kestrel.core.run_reader import iter_row_batches
from kestrel.core.runs import RunManifest, get_manifest
from kestrel.core.sae import artifacts

VOCAB, WIDTH, SEQ, BATCH = 64, 16, 12, 8
LAYERS = ["blocks.0", "blocks.1.mlp"]
EVERY, MAX_STEPS, MAX_ROWS, SHARD_ROWS = 50, 300, 40, 32
CAPTURE_STEPS = list(range(0, MAX_STEPS, EVERY))
REFERENCE_STEPS = {100, 250}


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, h_BTD: torch.Tensor) -> torch.Tensor:
        return h_BTD + self.mlp(h_BTD)


class TinyNet(nn.Module):
    """A plain torch token model: embedding, two residual MLP blocks, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList([Block(WIDTH) for _ in range(2)])
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        h_BTD = self.embed(input_ids_BT)
        for block in self.blocks:
            h_BTD = block(h_BTD)
        return self.head(h_BTD)


def next_token_loss(logits_BTV: torch.Tensor, ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    losses_BT = nn.functional.cross_entropy(
        logits_BTV[:, :-1].reshape(-1, VOCAB), ids_BT[:, 1:].reshape(-1), reduction="none"
    ).view(ids_BT.shape[0], -1)
    keep_BT = mask_BT[:, 1:].float()
    return (losses_BT * keep_BT).sum() / keep_BT.sum()


class TinyLightning(pl.LightningModule):
    """TinyNet trained on random tokens; records its batches and block-0 output at some steps."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = TinyNet()
        self.fail_at = fail_at
        self.batches: dict[int, dict[str, torch.Tensor]] = {}
        self.reference: dict[int, torch.Tensor] = {}
        self.net.blocks[0].register_forward_hook(self._remember)

    def _remember(self, _module: nn.Module, _args: tuple, out_BTD: torch.Tensor) -> None:
        if self.training and self.global_step in REFERENCE_STEPS:
            self.reference.setdefault(self.global_step, out_BTD.detach().clone())

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.global_step == self.fail_at:
            raise RuntimeError("the user's training failed")
        if self.global_step in REFERENCE_STEPS:
            self.batches.setdefault(self.global_step, {k: v.clone() for k, v in batch.items()})
        return next_token_loss(self.net(batch["input_ids"]), batch["input_ids"], batch["attention_mask"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class RandomTokens(Dataset):
    """Random sequences with right padding of varying length, so the mask matters."""

    def __init__(self, n: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids_NT = torch.randint(1, VOCAB, (n, SEQ), generator=generator)
        lengths_N = torch.randint(SEQ // 2, SEQ + 1, (n,), generator=generator)
        self.mask_NT = (torch.arange(SEQ)[None, :] < lengths_N[:, None]).long()
        self.ids_NT[self.mask_NT == 0] = 0

    def __len__(self) -> int:
        return len(self.ids_NT)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids_NT[i], "attention_mask": self.mask_NT[i]}


def fit(module: pl.LightningModule, callback: pl.Callback, max_steps: int = MAX_STEPS) -> pl.Trainer:
    trainer = pl.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        callbacks=[callback],
    )
    loader = DataLoader(RandomTokens(BATCH * max_steps), batch_size=BATCH)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|bottleneck).*")
        trainer.fit(module, loader)
    return trainer


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory: pytest.TempPathFactory):
    """300 steps of TinyLightning with the callback on two layers: (store, manifest, module)."""
    from kestrel.core.store import LocalStore

    store = LocalStore(tmp_path_factory.mktemp("training") / "store")
    module = TinyLightning()
    callback = KestrelCaptureCallback(
        LAYERS,
        store,
        submodule="net",
        every_n_steps=EVERY,
        rows_per_shard=SHARD_ROWS,
        max_rows_per_step=MAX_ROWS,
        dtype="fp32",
        model_name="tiny-net",
        run_id="tiny-training",
    )
    fit(module, callback)
    return store, callback.manifest, module


def docs_of(store, run_id: str) -> list[dict]:
    path = store.local_path("activations", run_id, "docs.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def step_rows(store, manifest: RunManifest, layer: str, step: int) -> dict[str, torch.Tensor]:
    """Acts and metadata of every shard of one step, concatenated."""
    names = [s.name for s in manifest.shards if s.step == step]
    parts = [
        {
            "acts": load_file(store.local_path("activations", manifest.id, f"{layer}/{n}.safetensors"))[
                "acts"
            ],
            **load_file(store.local_path("activations", manifest.id, f"tokens/{n}.safetensors")),
        }
        for n in names
    ]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def test_lightning_callback_writes_the_configured_steps(lightning_run) -> None:
    store, manifest, _ = lightning_run
    assert manifest is not None and store.list("activations") == ["tiny-training"]
    assert manifest.to_json() == store.read_json("activations", "tiny-training")
    assert manifest.steps == CAPTURE_STEPS
    assert sorted({s.step for s in manifest.shards}) == CAPTURE_STEPS
    per_step = {step: [s for s in manifest.shards if s.step == step] for step in CAPTURE_STEPS}
    # 40 sampled rows a step in shards of at most 32: two shards per step, never mixing steps
    assert all(
        [s.n_tokens for s in shards] == [SHARD_ROWS, MAX_ROWS - SHARD_ROWS] for shards in per_step.values()
    )
    assert [s.name for s in manifest.shards] == [f"{i:05d}" for i in range(2 * len(CAPTURE_STEPS))]
    assert manifest.n_tokens == MAX_ROWS * len(CAPTURE_STEPS)
    assert manifest.n_docs == BATCH * len(CAPTURE_STEPS)
    for layer in LAYERS:
        for shard in manifest.shards:
            assert store.local_path("activations", manifest.id, f"{layer}/{shard.name}.safetensors")
    assert {name: info.d for name, info in manifest.layers.items()} == {
        "blocks.0": WIDTH,
        "blocks.1.mlp": WIDTH,
    }
    assert all(info.norm_median > 0 for info in manifest.layers.values())
    assert manifest.source.kind == "training" and manifest.source.status == "complete"
    assert manifest.source.framework == "lightning"
    model = manifest.model
    assert (model.name, model.architecture, model.d_model, model.loadable) == (
        "tiny-net",
        "TinyNet",
        WIDTH,
        False,
    )
    assert manifest.dtype == "fp32" and manifest.options.every_n_steps == EVERY


def test_rows_equal_what_the_layer_produced(lightning_run) -> None:
    store, manifest, module = lightning_run
    docs = docs_of(store, manifest.id)
    assert [d["doc_index"] for d in docs] == list(range(manifest.n_docs))
    assert set(module.reference) == REFERENCE_STEPS
    for step in REFERENCE_STEPS:
        rows = step_rows(store, manifest, "blocks.0", step)
        batch = module.batches[step]
        assert len(rows["acts"]) == MAX_ROWS
        assert {docs[doc]["step"] for doc in rows["doc_index"].tolist()} == {step}
        batch_row = torch.tensor([docs[d]["batch_row"] for d in rows["doc_index"].tolist()])
        position = rows["position"].long()
        expected = module.reference[step][batch_row, position]
        assert torch.equal(rows["acts"], expected)
        assert torch.equal(rows["token_id"].long(), batch["input_ids"][batch_row, position])
        assert batch["attention_mask"][batch_row, position].all(), "padding rows are never stored"


def test_the_reader_and_the_sae_pipeline_use_a_training_run(lightning_run) -> None:
    store, manifest, _ = lightning_run
    rows = list(iter_row_batches(store, manifest.id, "blocks.0", batch_size=10_000))
    assert sum(len(b) for b in rows) == manifest.n_tokens
    summary = artifacts.train_from_run(
        store,
        manifest.id,
        "blocks.0",
        {"architecture": "topk", "n_latents": 32, "k": 4},
        {"batch_size": 32, "token_budget": 2000, "device": "cpu"},
        sae_id="tiny-sae",
    )
    metrics = summary.metrics
    assert summary.status == "complete" and summary.model == "tiny-net"
    assert 0 <= metrics["fvu"] < 2 and metrics["l0"] <= 4
    assert metrics["model_in_the_loop"]["skipped"] is True
    assert "cannot load" in metrics["model_in_the_loop"]["reason"]
    with pytest.raises(InvalidInputError, match="cannot load"):
        artifacts.require_loadable_model(store, summary)


def test_a_failed_training_keeps_its_completed_steps(tmp_path) -> None:
    from kestrel.core.store import LocalStore

    store = LocalStore(tmp_path / "store")
    callback = KestrelCaptureCallback(
        ["blocks.0"], store, submodule="net", every_n_steps=10, run_id="crashed"
    )
    with pytest.raises(RuntimeError, match="training failed"):
        fit(TinyLightning(fail_at=25), callback, max_steps=40)
    manifest = get_manifest(store, "crashed")
    assert manifest.steps == [0, 10, 20]
    assert manifest.source.status == "interrupted"
    assert "RuntimeError: the user's training failed" in manifest.source.error
    assert not list((store.root / "activations").glob(".staging-*"))


def hooks_on(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_manual_loop_hooks(tmp_path) -> None:
    torch.manual_seed(0)
    net = TinyNet()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    data = RandomTokens(BATCH * 30)
    hooked_steps = []
    with TrainingCapture(
        net,
        ["blocks.1", "embed"],
        tmp_path / "store",
        every_n_steps=7,
        max_rows_per_step=None,
        model_name="manual",
    ) as capture:
        for step in range(30):
            ids_BT = data.ids_NT[step * BATCH : (step + 1) * BATCH]
            mask_BT = data.mask_NT[step * BATCH : (step + 1) * BATCH]
            with capture.step(step, input_ids=ids_BT, attention_mask=mask_BT) as captured:
                if hooks_on(net):
                    hooked_steps.append(step)
                loss = next_token_loss(net(ids_BT), ids_BT, mask_BT)
            assert captured == (step % 7 == 0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert hooked_steps == [0, 7, 14, 21, 28] and hooks_on(net) == 0, "hooks only on capture steps"
    manifest = capture.manifest
    assert manifest.steps == [0, 7, 14, 21, 28] and manifest.source.framework == "manual"
    real = [int(data.mask_NT[s * BATCH : (s + 1) * BATCH].sum()) for s in manifest.steps]
    assert [s.n_tokens for s in manifest.shards] == real  # every real token, padding left out
    assert list(manifest.layers) == ["blocks.1", "embed"]
    assert manifest.layers["embed"].kind == "embedding"
    with pytest.raises(InvalidInputError, match="closed"):
        capture.begin_step(35)


def test_outputs_without_a_sequence_axis(tmp_path) -> None:
    """A plain [B, D] model: the batch is one document, rows are positions, token ids are -1."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    capture = TrainingCapture(net, ["1"], tmp_path / "store", every_n_steps=2, run_id="mlp", rows_per_shard=5)
    for step in range(4):
        with capture.step(step):
            net(torch.randn(7, 6))
    manifest = capture.close()
    assert manifest.steps == [0, 2] and manifest.n_docs == 2 and manifest.d_model == 10
    assert [(s.step, s.n_tokens) for s in manifest.shards] == [(0, 5), (0, 2), (2, 5), (2, 2)]
    meta = load_file(capture.store.local_path("activations", "mlp", "tokens/00002.safetensors"))
    assert meta["token_id"].tolist() == [-1] * 5 and meta["doc_index"].tolist() == [1] * 5
    assert meta["position"].tolist() == [0, 1, 2, 3, 4]


def test_errors_a_user_can_cause(tmp_path) -> None:
    net = TinyNet()
    store = tmp_path / "store"
    with pytest.raises(NotFoundError, match=r"blocks\.0"):
        TrainingCapture(net, ["blocks.O"], store)
    with pytest.raises(InvalidInputError, match="every_n_steps"):
        TrainingCapture(net, ["blocks.0"], store, every_n_steps=0)
    with pytest.raises(InvalidInputError, match="repeated"):
        TrainingCapture(net, ["embed", "embed"], store)
    holder = nn.Module()
    holder.tokens = nn.Embedding(10, 4)  # a module path that is also the name of the run's tokens/
    with pytest.raises(InvalidInputError, match="run's own files"):
        TrainingCapture(holder, ["tokens"], store)
    capture = TrainingCapture(net, ["blocks.0"], store)
    capture.begin_step(0)
    with pytest.raises(InvalidInputError, match="never ended"):
        capture.begin_step(1)
    with pytest.raises(InvalidInputError, match="produced nothing"):
        capture.end_step()
    with pytest.warns(UserWarning, match="no step was captured"):
        assert capture.close() is None
    assert hooks_on(net) == 0 and not list((store / "activations").glob("*"))


def test_importing_the_module_needs_no_lightning(monkeypatch: pytest.MonkeyPatch) -> None:
    code = (
        "import sys, kestrel.core.callbacks; assert not {'lightning', 'pytorch_lightning'} & set(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    from kestrel.core import callbacks, lightning_capture

    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)
    lightning_capture._callback_class.cache_clear()
    try:
        with pytest.raises(InvalidInputError, match="needs Lightning"):
            callbacks.KestrelCaptureCallback  # noqa: B018 - the attribute access is the test
    finally:
        lightning_capture._callback_class.cache_clear()


# ---------------------------------------------------------------------------------------------
# S3, and both


def manual_run(store, tmp_path, **options) -> dict:
    torch.manual_seed(0)
    net = TinyNet()
    data = RandomTokens(BATCH * 6)
    with TrainingCapture(
        net, ["blocks.0"], store, every_n_steps=3, local_root=tmp_path / "local", **options
    ) as capture:
        for step in range(6):
            ids_BT, mask_BT = (
                data.ids_NT[step * BATCH : (step + 1) * BATCH],
                data.mask_NT[step * BATCH : (step + 1) * BATCH],
            )
            with capture.step(step, input_ids=ids_BT, attention_mask=mask_BT):
                net(ids_BT)
    return capture.manifest


def test_runs_go_to_s3_and_to_both(s3_endpoint: str, tmp_path) -> None:
    from kestrel.core.store import LocalStore, open_store
    from kestrel.core.store.s3 import S3Store

    bucket = "training-capture"
    S3Store(bucket, endpoint_url=s3_endpoint, local_root=tmp_path / "boot").client.create_bucket(
        Bucket=bucket
    )
    url = f"s3://{bucket}/team"

    remote = manual_run(url, tmp_path, run_id="on-s3", endpoint_url=s3_endpoint)
    reader = open_store(url, endpoint_url=s3_endpoint, local_root=tmp_path / "reader")
    assert reader.read_json("activations", "on-s3") == remote.to_json() and remote.steps == [0, 3]
    rows = list(iter_row_batches(reader, "on-s3", "blocks.0", batch_size=10_000))
    assert sum(len(b) for b in rows) == remote.n_tokens > 0

    both = manual_run((tmp_path / "mirror", url), tmp_path, run_id="on-both", endpoint_url=s3_endpoint)
    assert LocalStore(tmp_path / "mirror").read_json("activations", "on-both") == both.to_json()
    assert reader.exists("activations", "on-both")


def test_a_hugging_face_model_is_addressed_by_kestrels_layer_names(tmp_path) -> None:
    from tiny_models import build

    llama = build("llama").train()
    ids_BT = torch.randint(0, 128, (2, 5))
    capture = TrainingCapture(
        llama, ["model.layers.1", "model.layers.0.mlp"], tmp_path / "store", every_n_steps=1
    )
    with capture.step(0, input_ids=ids_BT):
        llama(input_ids=ids_BT).logits.sum().backward()
    manifest = capture.close()
    kinds = {name: info.kind for name, info in manifest.layers.items()}
    assert kinds == {"model.layers.1": "block", "model.layers.0.mlp": "mlp"}
    model = manifest.model
    assert (model.model_type, model.d_model, model.n_blocks, model.loadable) == (
        "llama",
        32,
        3,
        False,
    )
    rows = next(iter_row_batches(capture.store, manifest.id, "model.layers.1", batch_size=100))
    assert torch.equal(rows.token_id_N.long(), ids_BT.flatten()) and rows.acts_ND.dtype == torch.float32
