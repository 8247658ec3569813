"""LLaMA pre-training on C4 (60M-1B, bf16 and fake-quantized low-bit), as in the SPAM and Stable-SPAM papers."""

from tasks.llm_pretrain.config import PRESETS, LLMPretrainConfig
from tasks.llm_pretrain.task import LLMPretrainTask

__all__ = ["PRESETS", "LLMPretrainConfig", "LLMPretrainTask"]
