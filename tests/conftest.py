"""Shared fixtures: the bundled SmolLM2 (converted once into a cache shared by every run) and
tiny random-weight models (``tiny_models.py``). Nothing here touches the network."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The converted-weights cache is shared with `make run` (the default store), so a fresh clone pays
# the ~25 s GGUF conversion once, not once per test session.
MODEL_CACHE_ROOT = Path(os.environ.get("KESTREL_TEST_MODEL_CACHE", REPO / ".kestrel"))


@pytest.fixture(scope="session")
def model_cache_root() -> Path:
    return MODEL_CACHE_ROOT


@pytest.fixture(scope="session")
def smollm(model_cache_root: Path):
    """The bundled SmolLM2-135M in fp32 on CPU, loaded once per session."""
    from kestrel.core.models import DEFAULT_MODEL, load_model

    torch.manual_seed(0)
    return load_model(DEFAULT_MODEL, device="cpu", dtype="fp32", store_root=model_cache_root)


@pytest.fixture(scope="module")
def tiny_lm(smollm):
    """A 3-block random Llama sharing SmolLM2's tokenizer: fast captures for the mechanics.

    Built once per module (as each module built its own before), so a test that changes the
    model or the torch seed reaches no other module."""
    from tiny_models import build

    from kestrel.core.models import LoadedModel

    model = build("llama")
    model.resize_token_embeddings(len(smollm.tokenizer))
    return LoadedModel(
        "tiny-llama", model.eval(), smollm.tokenizer, torch.device("cpu"), torch.float32, "local"
    )


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server on loopback (a subprocess) for the session, with dummy credentials in the
    environment (``s3_server.py``). Every test makes buckets of its own, so none sees another's."""
    pytest.importorskip("moto.server", reason="the S3 tests need moto[server] (the dev extra)")
    from s3_server import moto_endpoint

    with moto_endpoint(tmp_path_factory.mktemp("moto") / "server.log") as url:
        yield url


@pytest.fixture
def store(tmp_path: Path):
    from kestrel.core.store import LocalStore

    return LocalStore(tmp_path / "store")
