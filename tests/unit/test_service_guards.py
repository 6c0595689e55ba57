"""Guards against bad input and unsafe configuration that need no running service: the API key
settings, `kestrel serve` on an open address, operator caps (also in the worker), device strings,
job errors that keep server details to the worker's log, and CSV cells that would be formulas."""

from __future__ import annotations

import logging

import pytest
from typer.testing import CliRunner

from kestrel.cli import app, is_loopback
from kestrel.core.errors import InvalidInputError, NotFoundError
from kestrel.core.limits import Caps, LimitExceededError, check_capture_options, check_train
from kestrel.core.models import DEFAULT_MODEL
from kestrel.settings import Settings

runner = CliRunner()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """No API key or override from the environment; a store of the test's own."""
    for name in ("KESTREL_API_KEY", "KESTREL_ALLOW_NO_AUTH", "KESTREL_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KESTREL_STORE_ROOT", str(tmp_path / "store"))
    return monkeypatch


# ---------------------------------------------------------------------------------------------
# API key and exposure


@pytest.mark.parametrize("value", ["", "   ", "\t"])
def test_an_empty_api_key_is_unset_with_a_warning(clean_env, caplog, value: str) -> None:
    clean_env.setenv("KESTREL_API_KEY", value)
    with caplog.at_level(logging.WARNING, logger="kestrel.settings"):
        settings = Settings()
    assert settings.api_key is None
    assert "KESTREL_API_KEY is set but empty" in caplog.text
    assert Settings(api_key="k").api_key.get_secret_value() == "k"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        *[("127.0.0.1", True), ("::1", True), ("[::1]", True), ("localhost", True), ("127.0.0.2", True)],
        *[("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("api.example.com", False)],
    ],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.fixture
def uvicorn_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """``uvicorn.run`` recorded instead of listening."""
    import uvicorn

    calls: list[dict] = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: calls.append(kwargs))
    return calls


def test_serve_refuses_an_open_address_without_a_key(clean_env, uvicorn_calls) -> None:
    result = runner.invoke(app, ["serve", "--host", "0.0.0.0"])
    assert result.exit_code == 2 and uvicorn_calls == []
    assert "refusing to listen on 0.0.0.0 without an API key" in result.output
    assert "--insecure-no-auth" in result.output and "KESTREL_ALLOW_NO_AUTH=1" in result.output
    clean_env.setenv("KESTREL_API_KEY", "")  # an empty key is no key
    assert runner.invoke(app, ["serve", "--host", "0.0.0.0"]).exit_code == 2 and uvicorn_calls == []


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--host", "127.0.0.1"], {}),
        (["--host", "0.0.0.0", "--insecure-no-auth"], {}),
        (["--host", "0.0.0.0"], {"KESTREL_ALLOW_NO_AUTH": "1"}),
        (["--host", "0.0.0.0"], {"KESTREL_API_KEY": "s3cret"}),
    ],
)
def test_serve_starts_on_loopback_with_a_key_or_when_overridden(clean_env, uvicorn_calls, args, env) -> None:
    for name, value in env.items():
        clean_env.setenv(name, value)
    result = runner.invoke(app, ["serve", *args, "--port", "8123"])
    assert result.exit_code == 0, result.output
    assert [(c["host"], c["port"]) for c in uvicorn_calls] == [(args[1], 8123)]


def test_up_refuses_an_open_address_without_a_key(clean_env) -> None:
    result = runner.invoke(app, ["up", "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "refusing to listen on 0.0.0.0" in result.output


# ---------------------------------------------------------------------------------------------
# Caps


def test_caps_come_from_settings_and_name_the_setting() -> None:
    caps = Caps.of(Settings(max_epochs=3, min_shard_mb=0.5))
    assert caps.max_epochs == 3 and caps.min_shard_mb == 0.5 and caps.max_n_latents == Caps().max_n_latents
    with pytest.raises(
        LimitExceededError, match=r"train\.epochs too large: 4 exceeds the limit max_epochs=3"
    ):
        check_train({"epochs": 4}, caps)
    with pytest.raises(LimitExceededError, match="a 5000-digit number exceeds the limit max_batch_size"):
        check_train({"batch_size": 10**4999}, caps)
    check_train({"epochs": 3, "batch_size": 4096, "token_budget": None}, caps)


def test_capture_options_within_the_caps() -> None:
    from kestrel.core.runs import CaptureOptions

    with pytest.raises(LimitExceededError, match="min_shard_mb") as caught:
        check_capture_options(CaptureOptions(shard_mb=1e-9), Caps())
    assert caught.value.code == "limit_exceeded" and caught.value.details["limit"] == "min_shard_mb"
    with pytest.raises(LimitExceededError, match="max_shard_mb"):
        check_capture_options(CaptureOptions(shard_mb=4096), Caps())
    with pytest.raises(LimitExceededError, match=r"options\.token_budget too large"):
        check_capture_options(CaptureOptions(token_budget=10**12), Caps())
    with pytest.raises(LimitExceededError, match=r"options\.max_batch_size too large"):
        check_capture_options(CaptureOptions(max_batch_size=10**9), Caps())
    check_capture_options(CaptureOptions(), Caps())


@pytest.fixture
def worker_env(clean_env, tmp_path):
    """A job function run outside RQ, with settings read from this environment."""
    from kestrel.settings import get_settings

    get_settings.cache_clear()
    yield tmp_path / "store"
    get_settings.cache_clear()


def test_the_worker_checks_the_caps_of_a_job_from_elsewhere(worker_env) -> None:
    from kestrel.workers import jobs

    request = {
        "model": DEFAULT_MODEL,
        "layers": ["model.layers.3"],
        "dataset": {"kind": "texts", "texts": ["one"]},
        "options": {"shard_mb": 1e-9},
    }
    with pytest.raises(LimitExceededError, match=r"options\.shard_mb too small"):
        jobs.capture_job(request=request, run_id="run-from-elsewhere")
    assert not (worker_env / "activations").exists() or not any((worker_env / "activations").iterdir())


# ---------------------------------------------------------------------------------------------
# Devices


@pytest.mark.parametrize("device", ["cuda:x", "gpu", "cuda:", "cuda:1\n", "cpu "])
def test_malformed_devices_are_invalid_input(device: str) -> None:
    from kestrel.core.models import resolve_device

    with pytest.raises(InvalidInputError, match="unknown device"):
        resolve_device(device)


def test_a_cuda_device_the_worker_lacks_is_invalid_input() -> None:
    import torch

    from kestrel.core.models import resolve_device

    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last (cuda:0 on a CPU host)
    with pytest.raises(InvalidInputError, match=f"device '{missing}' was asked for"):
        resolve_device(missing)
    assert str(resolve_device("cpu")) == "cpu"


def test_train_device_format_is_checked_by_the_schema() -> None:
    from kestrel.core.sae.config import TrainConfig

    with pytest.raises(InvalidInputError, match="device"):
        TrainConfig(device="cuda:1\n")
    assert TrainConfig(device="cuda:7").device == "cuda:7"  # the worker decides whether it has it


# ---------------------------------------------------------------------------------------------
# Job errors: no tracebacks or server paths in what clients read


def job_context(tmp_path, **settings):
    from kestrel.workers.context import JobContext

    return JobContext("test", None, Settings(store_root=tmp_path / "store", **settings))


def test_an_unexpected_error_is_generic_with_an_id_in_the_worker_log(tmp_path, caplog) -> None:
    ctx = job_context(tmp_path)
    secret = f"{tmp_path}/store/uploads/upload-1/data.txt"
    with caplog.at_level(logging.ERROR, logger="kestrel.jobs"):
        try:
            raise TypeError(f"bad operand near {secret}")
        except TypeError as exc:
            ctx.fail(exc)
    error = ctx._meta["error"]
    error_id = error["details"]["error_id"]
    assert error["code"] == "internal"
    assert error["message"] == f"internal error (see the worker log, error id {error_id})"
    public = " ".join([error["message"], ctx._meta["message"], *ctx._meta["log"]])
    assert "Traceback" not in public and "TypeError" not in public and str(tmp_path) not in public
    assert error_id in caplog.text and "Traceback" in caplog.text and secret in caplog.text


def test_engine_errors_keep_their_message_without_server_paths(tmp_path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    ctx = job_context(tmp_path, model_dirs=[models])
    store = (tmp_path / "store").resolve()
    ctx.fail(
        NotFoundError(
            f"file not found: '{store}/uploads/upload-1/data.txt' (from {models}/mine)",
            details={"path": f"{store}/uploads/upload-1/data.txt"},
        )
    )
    error = ctx._meta["error"]
    assert error["code"] == "not_found"
    assert error["message"] == "file not found: '<store>/uploads/upload-1/data.txt' (from <model-dir>/mine)"
    assert error["details"] == {"path": "<store>/uploads/upload-1/data.txt"}
    assert str(tmp_path) not in " ".join(ctx._meta["log"])


def test_rq_failures_without_our_error_show_only_the_exception_name() -> None:
    from kestrel.workers.lifecycle import _public_failure

    text = "Traceback (most recent call last):\n  File \"/srv/kestrel/x.py\", line 3\nKeyError: '/srv/secret'"
    assert _public_failure(text) == "the job failed (KeyError); see the worker log"
    timeout = "Traceback ...\nrq.timeouts.JobTimeoutException: Task exceeded maximum timeout value (600 s)"
    assert _public_failure(timeout).endswith("Task exceeded maximum timeout value (600 s)")


# ---------------------------------------------------------------------------------------------
# CSV cells that a spreadsheet would run


@pytest.mark.parametrize(
    ("cell", "written"),
    [
        ('=HYPERLINK("http://evil.example","x")', '\'=HYPERLINK("http://evil.example","x")'),
        ("+1", "'+1"),
        ("-ing words", "'-ing words"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tx", "'\tx"),
        ("\rx", "'\rx"),
        ("'=x", "''=x"),
        ("'plain", "'plain"),
        ("plain = fine", "plain = fine"),
        ("", ""),
    ],
)
def test_csv_cells_are_escaped_and_unescaped_symmetrically(cell: str, written: str) -> None:
    from kestrel.core.concepts.dictionary import csv_escape, csv_unescape

    assert csv_escape(cell) == written
    assert csv_unescape(written) == cell
