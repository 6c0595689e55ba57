"""Models: loading (bundled, local, unknown), the layer table of each family, forward and generate."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import FAMILIES, build

from kestrel.core import models
from kestrel.core.errors import HubUnavailableError, InvalidInputError, NotFoundError
from kestrel.core.hooks import add_vector
from kestrel.core.models import DEFAULT_MODEL, LoadedModel, forward, generate, layer_table, load_model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layer_table_covers_every_family(family: str) -> None:
    model = build(family)
    table = layer_table(model)
    modules = dict(model.named_modules())
    kinds = [info.kind for info in table]
    n_layers = model.config.num_hidden_layers
    assert all(info.name in modules for info in table)
    for kind in ("block", "attention", "mlp"):
        rows = [info for info in table if info.kind == kind]
        assert [info.index for info in rows] == list(range(n_layers)), (kind, rows)
    assert kinds.count("head") == 1 and "embedding" in kinds and "norm" in kinds
    blocks = [info for info in table if info.kind == "block"]
    assert {info.width for info in blocks} == {model.config.hidden_size}
    head = next(info for info in table if info.kind == "head")
    assert head.width == model.config.vocab_size
    mlp_widths = {info.width for info in table if info.kind == "mlp"}
    # BERT's "intermediate" is the MLP's hidden layer; every other family's mlp returns to d_model.
    expected = model.config.intermediate_size if family == "bert" else model.config.hidden_size
    assert mlp_widths == {expected}


def test_unknown_layer_suggests_close_names(smollm: LoadedModel) -> None:
    with pytest.raises(NotFoundError) as info:
        smollm.layer("model.layer.15")
    assert "model.layers.15" in str(info.value)
    # any module path can be hooked even if the table does not list it
    assert smollm.layer("model.layers.15.mlp.down_proj").kind == "other"


def test_an_uncached_hub_model_offline_is_a_clear_hub_unavailable(tmp_path) -> None:
    """Tests run with HF_HUB_OFFLINE=1: the id is not looked up online, and the error says why."""
    with pytest.raises(HubUnavailableError, match="model 'no-such-org/no-such-model' is not in the local"):
        load_model("no-such-org/no-such-model", device="cpu", store_root=tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"device": "tpu"}, "unknown device"), ({"dtype": "int3"}, "unknown dtype"), ({"name": " "}, "empty")],
)
def test_bad_load_arguments(tmp_path, kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        load_model(**{"name": DEFAULT_MODEL, "store_root": tmp_path, **kwargs})


def test_bundled_model_is_cached_as_safetensors(smollm: LoadedModel, model_cache_root, monkeypatch) -> None:
    cache = model_cache_root / "models" / DEFAULT_MODEL
    marker = json.loads((cache / "kestrel-model.json").read_text())
    assert marker["gguf_file"].endswith(".gguf")
    assert (cache / "model.safetensors").is_file()
    assert not list(cache.parent.glob(f".{DEFAULT_MODEL}-*")), "no staging directory left behind"
    assert smollm.source == "bundled" and smollm.d_model == 576 and smollm.n_blocks == 30
    # Read from the cache, not converted again: a conversion would first look for the GGUF file.
    monkeypatch.setattr(models.BundledModel, "gguf_dir", lambda self: pytest.fail("converted again"))
    again = load_model(DEFAULT_MODEL, device="cpu", store_root=model_cache_root)
    assert json.loads((cache / "kestrel-model.json").read_text()) == marker, "the cache was rewritten"
    assert torch.equal(again.model.model.embed_tokens.weight, smollm.model.model.embed_tokens.weight)


def test_bundled_cache_survives_a_concurrent_conversion(tmp_path, monkeypatch) -> None:
    """Two workers converting the bundled model at once (a fresh store): the one finishing second
    keeps the first one's cache instead of failing on the rename or deleting it."""
    from types import SimpleNamespace

    import transformers

    bundled = models.BUNDLED[DEFAULT_MODEL]
    target = tmp_path / "models" / bundled.name

    class Converted:
        hf_quantizer = None
        config = SimpleNamespace()

        def save_pretrained(self, path, **kwargs) -> None:
            (tmp_path / "models" / path.name / "mine").write_text("this process's conversion")

    def converted_meanwhile_by_another(*args, **kwargs) -> Converted:
        target.mkdir(parents=True)
        marker = {"format_version": models.CACHE_FORMAT_VERSION}
        (target / "kestrel-model.json").write_text(json.dumps(marker))
        return Converted()

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Converted())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", converted_meanwhile_by_another)
    assert models.ensure_bundled_cache(bundled, tmp_path) == target
    assert not (target / "mine").exists()  # the first complete cache is kept
    assert [p.name for p in (tmp_path / "models").iterdir()] == [bundled.name]  # no staging dir left


def test_local_directory_checkpoint(tmp_path, smollm: LoadedModel) -> None:
    model = build("llama")
    model.resize_token_embeddings(len(smollm.tokenizer))
    model.save_pretrained(tmp_path / "tiny")
    smollm.tokenizer.save_pretrained(tmp_path / "tiny")
    lm = load_model(str(tmp_path / "tiny"), device="cpu", store_root=tmp_path)
    assert lm.source == "local" and lm.n_blocks == 3
    result = forward(lm, ["hello world", "a longer text than the first one"])
    assert result.logits_BTV.shape[:2] == result.input_ids_BT.shape
    assert result.tokens(lm.tokenizer)[0] == lm.tokenizer.tokenize("hello world")


def test_forward_pads_right_and_matches_single_text(smollm: LoadedModel) -> None:
    texts = ["The cat sat on the mat.", "Hi"]
    batched = forward(smollm, texts)
    single = forward(smollm, texts[1:])
    n = int(single.attention_mask_BT.sum())
    assert batched.attention_mask_BT[1, :n].all() and not batched.attention_mask_BT[1, n:].any()
    torch.testing.assert_close(batched.logits_BTV[1, :n], single.logits_BTV[0, :n], atol=1e-4, rtol=1e-4)


def test_generate_greedy_and_with_hooks(smollm: LoadedModel) -> None:
    prompt = ["The capital of France is"]
    plain = generate(smollm, prompt, max_new_tokens=4)
    assert "Paris" in plain[0].text
    push = torch.randn(576, generator=torch.Generator().manual_seed(0)) * 200
    steered = generate(smollm, prompt, max_new_tokens=4, hooks=[add_vector("model.layers.10", push)])
    assert steered[0].token_ids != plain[0].token_ids
    assert generate(smollm, prompt, max_new_tokens=4)[0].token_ids == plain[0].token_ids  # hooks gone
    sampled = [
        generate(smollm, prompt, max_new_tokens=6, do_sample=True, seed=7)[0].token_ids for _ in range(2)
    ]
    assert sampled[0] == sampled[1]
    with pytest.raises(InvalidInputError, match="max_new_tokens"):
        generate(smollm, prompt, max_new_tokens=0)
