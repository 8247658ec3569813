"""LLaMA models of the SPAM / Stable-SPAM pre-training experiments, built with transformers.

The paper sizes follow the GaLore/SPAM configs (vocab 32000, RMSNorm, SwiGLU, RoPE, untied LM head, no biases).
Their names are nominal: with the 32000 vocabulary "60m" has 58.1M parameters, "130m" 134.1M, "350m" 367.9M and
"1b" 1339.1M (the GaLore "1B" config is a 1.3B model). "tiny" is for smoke tests and "mini" (~21M at vocab 32000)
for short single-GPU runs. When the tokenizer's vocabulary differs from 32000 the model uses the tokenizer's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ModelSize = Literal["tiny", "mini", "60m", "130m", "350m", "1b"]

PAPER_VOCAB = 32000


@dataclass(frozen=True)
class LlamaShape:
    """Width and depth of one model size."""

    hidden: int
    intermediate: int
    heads: int
    layers: int


SHAPES: dict[str, LlamaShape] = {
    "tiny": LlamaShape(hidden=64, intermediate=176, heads=4, layers=2),
    "mini": LlamaShape(hidden=256, intermediate=688, heads=4, layers=6),
    "60m": LlamaShape(hidden=512, intermediate=1376, heads=8, layers=8),
    "130m": LlamaShape(hidden=768, intermediate=2048, heads=12, layers=12),
    "350m": LlamaShape(hidden=1024, intermediate=2736, heads=16, layers=24),
    "1b": LlamaShape(hidden=2048, intermediate=5461, heads=32, layers=24),
}

# Nominal size of each name, for reports (parameters at vocab 32000 are given in the module docstring).
NOMINAL_PARAMS: dict[str, float] = {"mini": 20e6, "60m": 60e6, "130m": 130e6, "350m": 350e6, "1b": 1e9}


def llama_config(
    size: str, vocab_size: int = PAPER_VOCAB, max_seq_len: int = 1024, pad_token_id: int = 0
) -> LlamaConfig:
    """The transformers config of one model size (SDPA attention, no KV cache)."""
    s = SHAPES[size]
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        max_position_embeddings=max(max_seq_len, 1024),
        hidden_act="silu",
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        eos_token_id=None,
        use_cache=False,
        attn_implementation="sdpa",
    )


def build_llama(config: LlamaConfig, device: torch.device | str = "cpu") -> LlamaForCausalLM:
    """A freshly initialised LLaMA (seed torch before calling for a reproducible init)."""
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model


def count_params(config: LlamaConfig) -> int:
    """Parameter count of a config, computed on the meta device (nothing is allocated)."""
    model = build_llama(config, device="meta")
    return sum(p.numel() for p in model.parameters())


def matmul_params(config: LlamaConfig) -> int:
    """Parameters that take part in matrix multiplies (all but the input embedding lookup and the norms)."""
    h, i, n, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    return n * (4 * h * h + 3 * h * i) + v * h
