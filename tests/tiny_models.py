"""Tiny random-weight models of each supported family, built from configs (no downloads).

One place for the tiny shapes every test file uses: ``tiny_llama_config`` is the 3-block Llama
(hidden 32, 4 heads, 2 key-value heads) that unit tests, service tests and the local model of
the service stack build, each with its own vocabulary or depth as an override.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers as tf

SMALL = {"vocab_size": 128}
#: The block shape the families share: 3 blocks of width 32 with a 64-wide MLP and 4 heads.
BLOCKS = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4}


def tiny_llama_config(**overrides: Any) -> tf.LlamaConfig:
    """The tiny Llama's config (128 tokens unless ``vocab_size`` says otherwise)."""
    return tf.LlamaConfig(**{**BLOCKS, "num_key_value_heads": 2, **SMALL, **overrides})


def _llama() -> torch.nn.Module:
    return tf.LlamaForCausalLM(tiny_llama_config())


def _gpt2() -> torch.nn.Module:
    cfg = tf.GPT2Config(
        n_embd=32, n_layer=3, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0, **SMALL
    )
    return tf.GPT2LMHeadModel(cfg)


def _neox() -> torch.nn.Module:
    return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**BLOCKS, max_position_embeddings=64, **SMALL))


def _qwen2() -> torch.nn.Module:
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(**BLOCKS, num_key_value_heads=2, **SMALL))


def _gemma() -> torch.nn.Module:
    return tf.GemmaForCausalLM(tf.GemmaConfig(**BLOCKS, num_key_value_heads=2, head_dim=8, **SMALL))


def _bert() -> torch.nn.Module:
    return tf.BertForMaskedLM(tf.BertConfig(**BLOCKS, max_position_embeddings=64, **SMALL))


FAMILIES = {
    "llama": _llama,
    "gpt2": _gpt2,
    "gpt_neox": _neox,
    "qwen2": _qwen2,
    "gemma": _gemma,
    "bert": _bert,
}


def build(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return FAMILIES[family]().eval()


def other_vocab_llama(texts: list[str], vocab_size: int = 300) -> tuple[torch.nn.Module, Any]:
    """The tiny Llama with a byte-level BPE vocabulary of its own, trained here on ``texts``: a
    model whose token ids mean nothing to SmolLM2's tokenizer (a label scorer of another family)."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=["<pad>"])
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<pad>")
    torch.manual_seed(5)
    return tf.LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer))).eval(), tokenizer
