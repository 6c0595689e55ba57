"""Fixtures shared by the concept and steering tests."""

from __future__ import annotations

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
