"""Tiny random-weight models of each supported family, built from configs (no downloads)."""

from __future__ import annotations

import torch
import transformers as tf

SMALL = {"vocab_size": 128}


def _llama() -> torch.nn.Module:
    cfg = tf.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        **SMALL,
    )
    return tf.LlamaForCausalLM(cfg)


def _gpt2() -> torch.nn.Module:
    cfg = tf.GPT2Config(
        n_embd=32, n_layer=3, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0, **SMALL
    )
    return tf.GPT2LMHeadModel(cfg)


def _neox() -> torch.nn.Module:
    cfg = tf.GPTNeoXConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=64,
        **SMALL,
    )
    return tf.GPTNeoXForCausalLM(cfg)


def _qwen2() -> torch.nn.Module:
    cfg = tf.Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        **SMALL,
    )
    return tf.Qwen2ForCausalLM(cfg)


def _gemma() -> torch.nn.Module:
    cfg = tf.GemmaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        **SMALL,
    )
    return tf.GemmaForCausalLM(cfg)


def _bert() -> torch.nn.Module:
    cfg = tf.BertConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=64,
        **SMALL,
    )
    return tf.BertForMaskedLM(cfg)


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
