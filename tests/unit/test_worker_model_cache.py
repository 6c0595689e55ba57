"""The worker's model cache: a long load must never block the heartbeat thread's reads of it.

The loader is replaced by one that waits on an event, so the load's length is under the test's
control: the question is only whether ``describe`` (what the heartbeat publishes) waits on it.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from kestrel.core.models import DEFAULT_MODEL
from kestrel.workers import model_cache as model_cache_module
from kestrel.workers.model_cache import ModelCache


def test_a_long_load_does_not_block_describe_and_loads_once(monkeypatch, tmp_path) -> None:
    release = threading.Event()
    calls: list[str] = []

    def slow_load(target, **_):
        calls.append(target)
        assert release.wait(120), "the test never released the load"
        return SimpleNamespace(name=target)

    monkeypatch.setattr(model_cache_module, "load_model", slow_load)
    cache = ModelCache(tmp_path, default_device="cpu")
    results: list[object] = []
    loaders = [
        threading.Thread(target=lambda: results.append(cache.get(DEFAULT_MODEL, device="cpu", dtype="fp32")))
        for _ in range(2)
    ]
    for loader in loaders:
        loader.start()
    deadline = time.monotonic() + 60
    while not calls:  # the first load is under way
        assert time.monotonic() < deadline, "no load started"
        threading.Event().wait(0.01)

    described: list[list] = []
    reader = threading.Thread(target=lambda: described.append(cache.describe()))
    reader.start()
    reader.join(timeout=60)  # returns in milliseconds unless describe() waits for the load
    assert not reader.is_alive(), "describe() waited on the model load (the heartbeat would stall)"
    assert described == [[]] and loaders[0].is_alive()

    release.set()
    for loader in loaders:
        loader.join(timeout=60)
    assert len(calls) == 1 and len(results) == 2 and results[0] is results[1]
    assert [m["name"] for m in cache.describe()] == [DEFAULT_MODEL]


def test_tokenizer_is_a_loaded_copys_else_loaded_alone(
    monkeypatch, tmp_path, smollm, model_cache_root
) -> None:
    """A scorer of another model needs the SAE model's tokenizer: the worker reads it from a copy
    it holds, else loads the tokenizer alone (never the weights)."""
    monkeypatch.setattr(model_cache_module, "load_model", lambda *a, **k: smollm)
    alone = ModelCache(model_cache_root, default_device="cpu")
    monkeypatch.setattr(
        model_cache_module, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError)
    )
    tokenizer = alone.tokenizer(DEFAULT_MODEL)
    assert tokenizer is not smollm.tokenizer and tokenizer.get_vocab() == smollm.tokenizer.get_vocab()
    assert alone.describe() == []  # no model was loaded for it
    monkeypatch.setattr(model_cache_module, "load_model", lambda *a, **k: smollm)
    held = ModelCache(tmp_path, default_device="cpu")
    held.get(DEFAULT_MODEL, device="cpu", dtype="fp32")
    assert held.tokenizer(DEFAULT_MODEL) is smollm.tokenizer
