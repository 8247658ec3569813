"""The attention check counts non-finite gradient tensors of fine-tuning's loss on left-padded rows."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tasks.finetune.attention_check import nonfinite_grads

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "vocab_size": 128}


def test_counts_nonfinite_gradient_tensors_with_either_backend_set() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY, attn_implementation="sdpa")).train()
    rows = [(192, 4), (3, 2)]  # a 189-token left padding, 192 wide: the width that failed on the H200
    assert nonfinite_grads(model, rows, "cpu", training=False) == 0
    assert nonfinite_grads(model, rows, "cpu", training=True) == 0
    model.lm_head.weight.register_hook(lambda g: g * float("inf"))  # inf x 0 entries: NaN in that tensor
    assert nonfinite_grads(model, rows, "cpu", training=True) >= 1
