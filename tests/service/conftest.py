"""Service fixtures: a real redis-server, real `kestrel worker` processes and the API under uvicorn.

Nothing is mocked. A *stack* (service_stack.py) is one Redis database, one store and the
processes serving them; the session shares one full stack (an interactive, a generate and a batch
worker, the API) and tests that kill or restart something build their own. The store's ``models/`` links to
the shared converted-weights cache (``tests/conftest.py``), so no process converts the bundled
model again.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from service_stack import FIRST_FREE_DB, FULL_WORKERS, SHARED_DB, Stack, full_stack, make_store

from kestrel.workers.supervisor import EmbeddedRedis, free_port

_databases = itertools.count(FIRST_FREE_DB)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """One redis-server (append-only) for the session; stacks use separate databases of it."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), free_port(), ("databases 256",)).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def warm_model_cache(model_cache_root: Path) -> Path:
    """Convert the bundled model once (a no-op when the cache is warm) before workers start."""
    from kestrel.core.models import BUNDLED, DEFAULT_MODEL, ensure_bundled_cache

    ensure_bundled_cache(BUNDLED[DEFAULT_MODEL], model_cache_root)
    return model_cache_root


@pytest.fixture
def make_stack(
    redis_server: EmbeddedRedis, warm_model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Stack]]:
    """Build stacks on fresh Redis databases and stores; all their processes stop at teardown."""
    stacks: list[Stack] = []

    def build(redis_url: str | None = None, **extra_env: str) -> Stack:
        base = tmp_path_factory.mktemp("stack")
        url = redis_url or f"redis://127.0.0.1:{redis_server.port}/{next(_databases)}"
        stack = Stack(url, make_store(base / "store", warm_model_cache), base, dict(extra_env))
        stacks.append(stack)
        return stack

    yield build
    for stack in stacks:
        stack.stop_all()


@pytest.fixture(scope="session")
def local_models(warm_model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory the operator would list in KESTREL_MODEL_DIRS, holding a tiny random Llama
    (SmolLM2's tokenizer): the fast model of the service tests, and a local model by name; and
    ``other-vocab``, the same shape with a 300-token vocabulary of its own (a label scorer)."""
    import shutil

    import torch
    import transformers as tf
    from tiny_models import tiny_llama_config

    from kestrel.core.models import DEFAULT_MODEL

    root = tmp_path_factory.mktemp("local-models")
    target = root / "tiny-llama"
    torch.manual_seed(0)
    tf.LlamaForCausalLM(tiny_llama_config(vocab_size=49152)).save_pretrained(target)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(warm_model_cache / "models" / DEFAULT_MODEL / name, target / name)
    from tiny_models import other_vocab_llama  # a scorer of another vocabulary than the SAEs' models

    model, tokenizer = other_vocab_llama(
        [f"Text {i}: pasta, goals and stars are about food." for i in range(9)]
    )
    model.save_pretrained(root / "other-vocab")
    tokenizer.save_pretrained(root / "other-vocab")
    return root


@pytest.fixture(scope="session")
def service(
    redis_server: EmbeddedRedis,
    warm_model_cache: Path,
    local_models: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """The shared stack: Redis db 0, an interactive, a generate and a batch worker, the API."""
    url = f"redis://127.0.0.1:{redis_server.port}/{SHARED_DB}"
    stack = full_stack(url, tmp_path_factory.mktemp("service"), warm_model_cache, local_models)
    stack.start_api()
    stack.wait_ready(FULL_WORKERS)
    yield stack
    stack.stop_all()


@pytest.fixture
def client(service: Stack) -> Iterator[httpx.Client]:
    with service.client() as http:
        yield http


@pytest.fixture
def make_client(
    redis_server: EmbeddedRedis, warm_model_cache: Path, tmp_path: Path
) -> Iterator[Callable[..., TestClient]]:
    """In-process apps (no workers) on fresh Redis databases and stores, for request-level tests."""
    from kestrel.server.app import create_app
    from kestrel.settings import Settings

    clients: list[TestClient] = []

    def build(**overrides: object) -> TestClient:
        store = make_store(tmp_path / f"store-{len(clients)}", warm_model_cache)
        url = f"redis://127.0.0.1:{redis_server.port}/{next(_databases)}"
        settings = Settings(store_root=store, redis_url=url, **overrides)
        client = TestClient(create_app(settings), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.__exit__(None, None, None)
