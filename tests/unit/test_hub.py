"""Hub ids: the allowlist (globs, the local cache), offline and unreachable hubs failing fast.

The hub is never reached: "unreachable" is a local socket that never answers (or a closed port),
and the HF cache is a temporary directory.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from kestrel.core import hub
from kestrel.core.errors import HubUnavailableError, InvalidInputError
from kestrel.core.models import DEFAULT_MODEL
from kestrel.settings import Settings
from kestrel.workers.model_cache import validate_model_name


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF home (hub cache and datasets cache) for the test."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    return tmp_path


def cache_snapshot(hf_cache: Path, folder: str) -> None:
    (hf_cache / "hub" / folder / "snapshots" / "0123abcd").mkdir(parents=True)


@pytest.mark.parametrize(
    ("name", "patterns", "expected"),
    [
        ("gpt2", ["*"], True),
        ("EleutherAI/pythia-70m", ["EleutherAI/*"], True),
        ("eleutherai/Pythia-70M", ["EleutherAI/pythia-*"], True),  # the hub's ids are case-insensitive
        ("EleutherAI/pythia-70m", [" openai-community/* ", "EleutherAI/pythia-70m"], True),
        ("gpt2", [], False),
        ("gpt2", ["gpt2-*"], False),  # a glob matches the whole id, not a prefix
        ("org/gpt2", ["gpt2"], False),
        ("0", ["", "  "], False),  # blank patterns allow nothing
    ],
)
def test_allowlist_globs(name: str, patterns: list[str], expected: bool) -> None:
    assert hub.matches(name, patterns) is expected


@pytest.mark.parametrize("name", ["gpt2", "0", "00", "nobody/nothing-at-all"])
def test_fuzzed_ids_are_refused_by_default_naming_the_setting(name: str, hf_cache: Path) -> None:
    with pytest.raises(InvalidInputError) as refused:
        validate_model_name(name, {}, allowed=())
    assert "KESTREL_ALLOWED_MODELS" in refused.value.message and repr(name) in refused.value.message
    assert refused.value.details["setting"] == "KESTREL_ALLOWED_MODELS"


def test_bundled_local_and_cached_models_need_no_allowlist(hf_cache: Path, tmp_path: Path) -> None:
    assert validate_model_name(DEFAULT_MODEL, {}) == DEFAULT_MODEL
    assert validate_model_name("tiny", {"tiny": tmp_path}) == "tiny"
    cache_snapshot(hf_cache, "models--openai-community--gpt2")
    assert validate_model_name("openai-community/gpt2", {}) == "openai-community/gpt2"
    assert (
        validate_model_name("EleutherAI/pythia-70m", {}, allowed=["EleutherAI/*"]) == "EleutherAI/pythia-70m"
    )
    with pytest.raises(InvalidInputError):  # a path is refused whatever the allowlist says
        validate_model_name("../models/x", {}, allowed=["*"])


def test_an_empty_cache_folder_is_not_a_cached_model(hf_cache: Path) -> None:
    (hf_cache / "hub" / "models--gpt2" / "snapshots").mkdir(parents=True)  # an interrupted download
    assert not hub.is_cached("gpt2", "model")
    with pytest.raises(InvalidInputError):
        hub.check_allowed("gpt2", "model", ())


def test_datasets_cached_in_either_cache_are_allowed(hf_cache: Path) -> None:
    with pytest.raises(InvalidInputError) as refused:
        hub.check_allowed("stanfordnlp/imdb", "dataset", ())
    assert "KESTREL_ALLOWED_DATASETS" in refused.value.message
    cache_snapshot(hf_cache, "datasets--stanfordnlp--imdb")
    assert hub.check_allowed("stanfordnlp/imdb", "dataset", ()) == "stanfordnlp/imdb"
    (hf_cache / "datasets" / "wikitext___x").mkdir(parents=True)
    (hf_cache / "datasets" / "wikitext___x" / "default").mkdir()
    assert hub.check_allowed("wikitext/x", "dataset", ()) == "wikitext/x"
    assert hub.check_allowed("anyone/anything", "dataset", ["*"]) == "anyone/anything"


def test_settings_read_comma_separated_globs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KESTREL_ALLOWED_MODELS", "gpt2, EleutherAI/* ,")
    monkeypatch.setenv("KESTREL_ALLOWED_DATASETS", "*")
    settings = Settings()
    assert settings.allowed_models == ["gpt2", "EleutherAI/*"]
    assert settings.allowed_datasets == ["*"]
    monkeypatch.delenv("KESTREL_ALLOWED_MODELS")
    assert Settings().allowed_models == []


# ---------------------------------------------------------------------------------------------
# A hub that cannot serve an allowed id


@pytest.fixture
def silent_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """HF_ENDPOINT at a socket that accepts connections and never answers; online mode."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", endpoint)
        yield endpoint


def test_offline_an_uncached_id_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailableError) as failed:
        hub.require_reachable("nobody/nothing", "model")
    assert failed.value.code == "hub_unavailable" and "HF_HUB_OFFLINE" in failed.value.message
    assert failed.value.details == {"model": "nobody/nothing", "offline": True}


def test_a_silent_hub_fails_within_the_probe_timeout(silent_hub: str) -> None:
    with pytest.raises(HubUnavailableError) as failed:
        hub.require_reachable("nobody/nothing", "dataset", timeout_s=0.5)
    assert "did not answer" in failed.value.message and failed.value.details["offline"] is False


def test_a_closed_port_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(HubUnavailableError):
        hub.require_reachable("nobody/nothing", "model", timeout_s=5)


def test_loading_an_uncached_hub_model_offline_is_a_424_not_a_404(monkeypatch: pytest.MonkeyPatch) -> None:
    from kestrel.core.models import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailableError):
        load_model("nobody/nothing-at-all", device="cpu")
