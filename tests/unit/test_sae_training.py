"""SAE trainer: dictionary recovery, resume, stop, validation before work, AuxK, bookkeeping.

Data comes from known sparse dictionaries generated here with seeded generators, so every
assertion has a ground truth and nothing needs a model.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from kestrel.core.errors import InvalidInputError
from kestrel.core.sae import (
    SAEConfig,
    TrainConfig,
    TrainingPoint,
    create,
    export_saelens,
    import_saelens,
    latest_checkpoint,
    train_sae,
)
from kestrel.core.sae.trainer import geometric_median, rebatch, resolve_plan


def sparse_dictionary_data(
    n_rows: int,
    n_atoms: int,
    d: int,
    active: int,
    *,
    seed: int,
    noise: float = 0.01,
    zipf: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(atoms [n_atoms, d] unit rows, rows [n_rows, d]): each row sums `active` atoms with
    coefficients in [0.5, 1.5] plus Gaussian noise. `zipf` > 0 makes atom frequencies a power law.

    The generator is offset from the trainer's seeds so the SAE's random start cannot coincide
    with the atoms.
    """
    g = torch.Generator().manual_seed(10_000 + seed)
    atoms = torch.randn(n_atoms, d, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    weights = torch.arange(1, n_atoms + 1, dtype=torch.float64) ** -zipf
    chosen = torch.multinomial(weights, n_rows * active, replacement=True, generator=g).view(n_rows, active)
    coefficients = torch.rand(n_rows, active, generator=g) + 0.5
    rows = (coefficients.unsqueeze(-1) * atoms[chosen]).sum(dim=1)
    rows += noise * torch.randn(n_rows, d, generator=g)
    return atoms, rows


def recovered_fraction(decoder: torch.Tensor, atoms: torch.Tensor, threshold: float = 0.9) -> float:
    """Share of atoms whose best-matching decoder row has cosine similarity >= threshold."""
    directions = decoder / decoder.norm(dim=1, keepdim=True)
    return float(((atoms @ directions.T).max(dim=1).values >= threshold).float().mean())


def chunks_of(rows: torch.Tensor, size: int):
    """A data function over fixed chunks (deliberately not the batch size)."""
    parts = list(rows.split(size))
    return lambda epoch: iter(parts)


def never_called(epoch: int):
    pytest.fail(f"data({epoch}) was read although the run should have failed first")


# -- acceptance: dictionary recovery with default settings -------------------------------------------


@pytest.mark.parametrize(
    ("architecture", "epochs", "required"),
    [("topk", 10, 0.9), ("batchtopk", 12, 0.8), ("relu_l1", 8, 0.8)],
)
def test_default_training_recovers_a_known_dictionary(architecture: str, epochs: int, required: float):
    atoms, rows = sparse_dictionary_data(65_536, n_atoms=256, d=64, active=4, seed=1)
    sae_config = SAEConfig(architecture=architecture, d_in=64, n_latents=512, **_k(architecture, 4))
    result = train_sae(sae_config, TrainConfig(epochs=epochs), chunks_of(rows, 4096), rows_per_epoch=65_536)
    found = recovered_fraction(result.sae.W_dec.float(), atoms)
    assert found >= required, f"{architecture} found {found:.1%} of the atoms"
    assert not result.stopped and result.step == epochs * 16


def _k(architecture: str, k: int) -> dict:
    return {"k": k} if architecture in ("topk", "batchtopk") else {}


# -- initialisation and constraints ----------------------------------------------------------------


def test_b_dec_starts_at_the_data_mean_and_decoder_rows_stay_unit_norm():
    _, rows = sparse_dictionary_data(4096, n_atoms=32, d=16, active=3, seed=2)
    rows = rows + 5.0  # a large common offset, which b_dec must absorb
    config = SAEConfig(d_in=16, n_latents=64, k=3, normalize_input=False)
    data = chunks_of(rows, 1000)
    start = train_sae(config, TrainConfig(batch_size=4096, lr=1e-12), data, rows_per_epoch=4096)
    torch.testing.assert_close(start.sae.b_dec, rows.mean(dim=0), atol=1e-5, rtol=0)

    trained = train_sae(config, TrainConfig(batch_size=512, epochs=2), data, rows_per_epoch=4096)
    norms = trained.sae.W_dec.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)


def test_input_scale_is_folded_into_the_saved_weights():
    _, rows = sparse_dictionary_data(4096, n_atoms=32, d=16, active=3, seed=3)
    rows = rows * 40.0
    config = SAEConfig(d_in=16, n_latents=64, k=3)
    result = train_sae(config, TrainConfig(batch_size=512), chunks_of(rows, 512), rows_per_epoch=4096)
    scale = result.config.input_scale
    assert scale == pytest.approx(4.0 / float(rows.norm(dim=1).mean()), rel=0.05)
    norms = result.sae.W_dec.norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, 1 / scale), rtol=1e-4, atol=0)
    assert result.sae(rows[:8]).reconstruction.norm(dim=1).mean() > 0.5 * rows[:8].norm(dim=1).mean()


def test_geometric_median_init_is_robust_to_outliers():
    _, rows = sparse_dictionary_data(2048, n_atoms=16, d=8, active=2, seed=4)
    rows[:20] += 1e4  # a few huge rows drag the mean, not the median
    median = geometric_median(rows)
    assert (median - rows[20:].mean(dim=0)).norm() < 0.2
    config = SAEConfig(d_in=8, n_latents=32, k=2, normalize_input=False)
    result = train_sae(
        config,
        TrainConfig(batch_size=2048, lr=1e-12, b_dec_init="geometric_median"),
        chunks_of(rows, 2048),
        rows_per_epoch=2048,
    )
    torch.testing.assert_close(result.sae.b_dec, median, atol=1e-4, rtol=0)


# -- control: stop, checkpoints, resume ------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "relu_l1", "jumprelu"])
def test_resuming_from_a_stop_reaches_the_uninterrupted_weights(tmp_path: Path, architecture: str):
    _, rows = sparse_dictionary_data(2400, n_atoms=64, d=32, active=4, seed=5)
    sae_config = SAEConfig(architecture=architecture, d_in=32, n_latents=128, **_k(architecture, 8))
    # 9 batches per epoch (the 96-row remainder is dropped), dead latents counted after 2 batches
    # so AuxK and its counters take part.
    train_config = TrainConfig(batch_size=256, epochs=2, dead_tokens_threshold=512, checkpoint_every=4)
    data = chunks_of(rows, 100)  # chunk edges do not line up with batch edges

    full = train_sae(sae_config, train_config, data)

    calls = {"n": 0}

    def stop_at_step_11() -> bool:  # mid-way through the second epoch, between checkpoints
        calls["n"] += 1
        return calls["n"] == 12

    first = train_sae(sae_config, train_config, data, should_stop=stop_at_step_11, checkpoint_dir=tmp_path)
    assert first.stopped and first.step == 11
    assert first.checkpoint == latest_checkpoint(tmp_path) and first.checkpoint.name == "step-00000011"
    second = train_sae(sae_config, train_config, data, resume_from=tmp_path, checkpoint_dir=tmp_path)

    assert not second.stopped and second.step == full.step == 18 and second.tokens == full.tokens
    for name, tensor in full.sae.state_dict().items():
        torch.testing.assert_close(second.sae.state_dict()[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert [h["step"] for h in second.history][:2] == [10, 11]  # history continues across the stop


def test_should_stop_ends_the_run_within_one_step(tmp_path: Path):
    _, rows = sparse_dictionary_data(4096, n_atoms=32, d=16, active=3, seed=6)
    flag = {"stop": False}
    seen: list[TrainingPoint] = []

    def report(progress: TrainingPoint) -> None:
        seen.append(progress)
        if progress.step == 3:
            flag["stop"] = True  # e.g. a cancel request arriving while step 3 ran

    result = train_sae(
        SAEConfig(d_in=16, n_latents=64, k=3),
        TrainConfig(batch_size=256, log_every=1),
        chunks_of(rows, 256),
        rows_per_epoch=4096,
        on_progress=report,
        should_stop=lambda: flag["stop"],
        checkpoint_dir=tmp_path,
    )
    assert result.stopped and result.step == 3 and result.tokens == 3 * 256
    assert [p.step for p in seen] == [1, 2, 3]
    assert result.checkpoint is not None and result.checkpoint.name == "step-00000003"


def test_checkpoints_are_written_every_n_steps_and_pruned(tmp_path: Path):
    _, rows = sparse_dictionary_data(2048, n_atoms=32, d=16, active=3, seed=7)
    train_sae(
        SAEConfig(d_in=16, n_latents=32, k=3),
        TrainConfig(batch_size=256, checkpoint_every=3, keep_checkpoints=2),
        chunks_of(rows, 256),
        rows_per_epoch=2048,
        checkpoint_dir=tmp_path,
    )
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["step-00000003", "step-00000006"]
    files = sorted(p.name for p in (tmp_path / "step-00000006").iterdir())
    assert files == [
        "history.jsonl",
        "optimizer.safetensors",
        "sae.safetensors",
        "state.json",
        "tracker.safetensors",
    ]


def test_checkpoints_are_written_every_n_seconds_of_training(tmp_path: Path):
    """The default durability: a checkpoint once ``checkpoint_every_s`` has passed, step count aside."""
    _, rows = sparse_dictionary_data(2048, n_atoms=32, d=16, active=3, seed=7)

    def slow_chunks(epoch: int):
        for chunk in chunks_of(rows, 256)(epoch):
            time.sleep(0.02)  # each step takes longer than checkpoint_every_s
            yield chunk

    config = SAEConfig(d_in=16, n_latents=32, k=3)
    timed = TrainConfig(batch_size=256, checkpoint_every_s=0.01, keep_checkpoints=100)
    train_sae(config, timed, slow_chunks, rows_per_epoch=2048, checkpoint_dir=tmp_path / "timed")
    assert sorted(p.name for p in (tmp_path / "timed").iterdir()) == [f"step-{i:08d}" for i in range(1, 9)]
    assert TrainConfig().checkpoint_every_s == 60.0
    off = TrainConfig(batch_size=256, checkpoint_every_s=None)
    train_sae(config, off, slow_chunks, rows_per_epoch=2048, checkpoint_dir=tmp_path / "off")
    assert not (tmp_path / "off").exists()


def test_one_writer_at_a_time_per_checkpoint_dir(tmp_path: Path):
    """A requeued training waits for its first run to let go of the checkpoints (flock)."""
    from kestrel.core.sae.checkpoint import writer_lock

    target = tmp_path / "checkpoints" / "sae-x"
    asked = []

    def give_up() -> bool:
        asked.append(True)
        return True

    with writer_lock(target) as held:
        assert held
        target.mkdir()  # a checkpoint was written: the lock file stays with it
        with writer_lock(target, give_up, poll_s=0.01) as second:
            assert second is False and asked
    with writer_lock(target, give_up) as third:
        assert third is True
    assert (tmp_path / "checkpoints" / "sae-x.lock").exists()
    target.rmdir()  # published: moved into the SAE
    with writer_lock(target) as fourth:
        assert fourth
    assert not (tmp_path / "checkpoints" / "sae-x.lock").exists()


def test_resume_with_different_settings_is_refused(tmp_path: Path):
    _, rows = sparse_dictionary_data(1024, n_atoms=32, d=16, active=3, seed=8)
    config = SAEConfig(d_in=16, n_latents=32, k=3)
    settings = TrainConfig(batch_size=256, checkpoint_every=2)
    train_sae(config, settings, chunks_of(rows, 256), checkpoint_dir=tmp_path)
    with pytest.raises(InvalidInputError, match="different settings"):
        train_sae(config, TrainConfig(batch_size=128), never_called, resume_from=tmp_path)
    with pytest.raises(InvalidInputError, match="different SAE configuration"):
        other = SAEConfig(d_in=16, n_latents=32, k=4)
        train_sae(other, TrainConfig(batch_size=256), never_called, resume_from=tmp_path)


# -- validation before any work -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"k": 65}, "cannot exceed n_latents"),
        ({"k": 0}, "k must be a positive"),
        ({"k": -3}, "k must be a positive"),
        ({"architecture": "topkk"}, "unknown SAE architecture 'topkk'.*did you mean 'topk'"),
        ({"n_latents": 0}, "n_latents"),
    ],
)
def test_bad_sae_hyperparameters_fail_before_any_data_is_read(fields: dict, reason: str):
    with pytest.raises(InvalidInputError, match=reason):
        train_sae(SAEConfig(**{"d_in": 16, "n_latents": 64, **fields}), TrainConfig(), never_called)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"lr": 0.0}, "lr"),
        ({"lr": -1e-3}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"epochs": 0}, "epochs"),
        ({"token_budget": 0}, "token_budget"),
    ],
)
def test_bad_training_hyperparameters_fail_before_any_data_is_read(fields: dict, reason: str):
    with pytest.raises(InvalidInputError, match=reason):
        train_sae(SAEConfig(d_in=16, n_latents=64), TrainConfig(**fields), never_called)


def test_a_run_whose_width_differs_from_an_imported_sae_fails_before_any_data_is_read(tmp_path: Path):
    export_saelens(create(SAEConfig(d_in=24, n_latents=64, k=4)), tmp_path / "foreign")
    imported = import_saelens(tmp_path / "foreign")
    with pytest.raises(InvalidInputError, match=r"d_in mismatch.*24"):
        train_sae(SAEConfig(d_in=16, n_latents=64, k=4), TrainConfig(), never_called, init=imported)
    with pytest.raises(InvalidInputError, match="d_in mismatch"):
        import_saelens(tmp_path / "foreign", d_in=16)


def test_data_of_the_wrong_width_is_rejected_at_the_first_chunk():
    with pytest.raises(InvalidInputError, match=r"width 16 .* width 12"):
        train_sae(SAEConfig(d_in=16, n_latents=64), TrainConfig(), chunks_of(torch.randn(100, 12), 50))


def test_too_little_data_for_a_batch_is_reported():
    with pytest.raises(InvalidInputError, match="fewer than half a batch"):
        train_sae(SAEConfig(d_in=16, n_latents=64), TrainConfig(), chunks_of(torch.randn(100, 16), 50))


# -- dead latents ------------------------------------------------------------------------------------


def test_aux_k_revives_dead_latents():
    # A learning rate ten times the default kills latents; AuxK should bring many back.
    _, rows = sparse_dictionary_data(100 * 4096, n_atoms=1024, d=32, active=4, seed=3, zipf=1.0)
    sae_config = SAEConfig(d_in=32, n_latents=256, k=4)
    dead = {}
    for coefficient in (1 / 32, 0.0):
        result = train_sae(
            sae_config,
            TrainConfig(lr=0.03, aux_k_coefficient=coefficient),
            chunks_of(rows, 4096),
            rows_per_epoch=rows.shape[0],
        )
        dead[coefficient] = result.metrics["training"]["dead_fraction"]
        assert result.metrics["training"]["dead_tokens_threshold"] == 40_960  # a tenth of the run
    assert dead[0.0] >= 0.1, "the setup no longer produces dead latents"
    assert dead[1 / 32] <= 0.7 * dead[0.0], dead


# -- planning, data handling, reporting -------------------------------------------------------------


def test_plan_scales_with_the_run():
    config = SAEConfig(d_in=576, n_latents=4608, k=32)
    big = resolve_plan(config, TrainConfig(token_budget=200_000_000), None)
    assert big.lr == pytest.approx(2e-4 * (2**14 / 4608) ** 0.5 * (768 / 576) ** 0.5)
    assert big.warmup_steps == 1000 and big.dead_tokens_threshold == 10_000_000
    assert big.aux_k == 288 and big.decay_start_step == big.total_steps - round(0.2 * big.total_steps)
    small = resolve_plan(config, TrainConfig(epochs=2), rows_per_epoch=100_000)
    assert small.total_steps == 2 * 24 and small.total_tokens == 2 * 24 * 4096  # 1696-row remainder dropped
    assert small.dead_tokens_threshold == small.total_tokens // 10 and small.warmup_steps == 2
    assert small.lr_at(0) < small.lr_at(10) == small.lr and small.lr_at(47) == pytest.approx(0.1 * small.lr)


def test_rebatch_skips_exactly_the_consumed_rows():
    rows = torch.arange(1000, dtype=torch.float32).repeat(4, 1).T  # row i holds i
    chunks = list(rows.split(130))
    config = SAEConfig(d_in=4, n_latents=8, k=2)
    full = [(n, b[:, 0].tolist()) for n, b in rebatch(chunks, 256, config)]
    assert [n for n, _ in full] == [256, 512, 768, 1000]  # the 232-row remainder is over half a batch
    resumed = [(n, b[:, 0].tolist()) for n, b in rebatch(chunks, 256, config, skip_rows=512)]
    assert resumed == full[2:]


def test_token_budget_cycles_epochs_and_stops_on_budget():
    _, rows = sparse_dictionary_data(512, n_atoms=16, d=8, active=2, seed=9)
    epochs_seen: list[int] = []

    def data(epoch: int):
        epochs_seen.append(epoch)
        return iter(rows.split(128))

    config = SAEConfig(d_in=8, n_latents=16, k=2)
    result = train_sae(config, TrainConfig(batch_size=256, token_budget=1280), data)
    assert result.step == 5 and result.tokens == 1280 and epochs_seen == [0, 1, 2]


def test_progress_history_and_final_metrics(tmp_path: Path):
    _, rows = sparse_dictionary_data(8192, n_atoms=32, d=16, active=3, seed=10)
    reports: list[TrainingPoint] = []
    result = train_sae(
        SAEConfig(d_in=16, n_latents=64, k=3),
        TrainConfig(batch_size=512, log_every=5),
        chunks_of(rows[:6144], 1000),
        on_progress=reports.append,
        eval_data=lambda: iter(rows[6144:].split(500)),
    )
    assert [p.step for p in reports] == [5, 10, 12]
    assert [h["step"] for h in result.history] == [5, 10, 12]
    assert [TrainingPoint.model_validate(h) for h in result.history] == reports  # a line is a point
    last = reports[-1]
    assert last.tokens == 12 * 512 and last.l0 == pytest.approx(3.0) and last.tokens_per_s > 0
    assert 0 <= last.dead_fraction <= 1 and last.total_steps == 12 and 0 < last.fvu < 1.5
    metrics = result.metrics
    assert metrics["n_rows"] == 2048 and 0 < metrics["fvu"] < 1 and metrics["l0"] <= 3
    assert metrics["explained_variance"] == pytest.approx(1 - metrics["fvu"])
    assert metrics["training"]["steps"] == 12 and metrics["training"]["plan"]["total_steps"] == 12


def test_training_is_deterministic_under_a_seed():
    _, rows = sparse_dictionary_data(2048, n_atoms=32, d=16, active=3, seed=11)
    config = SAEConfig(architecture="batchtopk", d_in=16, n_latents=64, k=3)

    def run(seed: int):
        result = train_sae(config, TrainConfig(batch_size=256, seed=seed), chunks_of(rows, 300))
        return result.sae.state_dict()

    first, again, other = run(0), run(0), run(1)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["W_dec"], other["W_dec"])
