"""Fixtures shared by the concept, steering and split-model tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from topic_corpus import topic_corpus

TOPIC_LAYER = "model.layers.9"


@pytest.fixture(scope="session")
def topic_sae(smollm, tmp_path_factory):
    """SmolLM2's layer 9 over the four-topic corpus, a 512-latent TopK SAE trained on it, and its
    discovered features: ``(store, topic label of each document)``. About 30 s, made once."""
    from kestrel.core import concepts
    from kestrel.core.activations import capture
    from kestrel.core.runs import CaptureOptions
    from kestrel.core.sae import artifacts
    from kestrel.core.store import LocalStore

    store = LocalStore(tmp_path_factory.mktemp("topics") / "store")
    texts, labels = topic_corpus(per_topic=100, seed=0)
    run = capture(smollm, texts, [TOPIC_LAYER], store, options=CaptureOptions(dtype="fp32"))
    sae_config = {"architecture": "topk", "n_latents": 512, "k": 16}
    train = {"batch_size": 512, "epochs": 8, "seed": 0}
    artifacts.train_from_run(store, run.id, TOPIC_LAYER, sae_config, train, sae_id="topics")
    concepts.discover(store, "topics", smollm)
    return store, labels


@pytest.fixture(scope="session")
def tiny_llama_dir(model_cache_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama checkpoint with SmolLM2's tokenizer, as an operator's local model: what
    ``load_model`` reads from a directory, split or not (test_split_model.py, test_gpu.py)."""
    import shutil

    import torch
    import transformers as tf
    from tiny_models import tiny_llama_config

    from kestrel.core.models import BUNDLED, DEFAULT_MODEL, ensure_bundled_cache

    bundled = ensure_bundled_cache(BUNDLED[DEFAULT_MODEL], model_cache_root)
    target = tmp_path_factory.mktemp("tiny-checkpoint") / "tiny-llama"
    torch.manual_seed(0)
    tf.LlamaForCausalLM(tiny_llama_config(vocab_size=49152)).save_pretrained(target)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bundled / name, target / name)
    return target
