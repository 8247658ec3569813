"""The fine-tuning task: a causal LM fine-tuned (full or LoRA) on commonsense-reasoning multiple choice.

Headline metric: `acc`, the mean over the selected sets of each set's multiple-choice accuracy, the answer being
the choice with the highest log-likelihood per character (higher is better; `tasks.finetune.scoring`). Curves:
`loss`, `lr`, `grad_norm`, `answer_tokens`, `examples_per_sec` every `log_every` steps; `acc`, `acc_sum`,
`acc/<set>`, `acc_sum/<set>` at step 0 (before fine-tuning), every `eval_every` steps and at the end.
transformers and peft are imported only when a trial runs.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from tasks.base import Resources, Task, TaskConfig, TrialContext, torch_threads
from tasks.finetune.config import PRESETS, FinetuneConfig

SMALL_MODEL_PARAMS = 1e9  # below this a trial asks for a quarter of a GPU

# Measured on one H200 through MPS (`bench.mps`), the 30 trials of the `mini` table fourteen at a time (0.0714 GPU
# each), decoder layers compiled, evaluated at step 310 and the end, with nine LLaMA trials of sensitivity_lr beside
# them (`bench run --suite mini --only finetune_commonsense,sensitivity_lr` on a fresh machine, on the carried store:
# every trial but one finished 655 s after the launch, the dry-run said 660; results/mini/finetune_fourteen.json): a
# whole trial (time.task_s plus its Ray worker's start, mean over the method's finished trials, the first wave's
# cold set-up, shared start scores and compilation included) took 344 s with LoRA and 111 s fully fine-tuned. Per
# method: (preset, seconds, GPU share held).
MEASURED: dict[str, tuple[str, float, float]] = {"lora": ("mini", 344.0, 0.0714), "full": ("mini-full", 111.0, 0.0714)}
# MPS against time-sliced, measured on eager trials: nine `mini` trials' training steps 1.63 times and scoring 1.61
# times faster through MPS (python -m tasks.finetune.step_probe many; results/perf/h200_finetune_mps.json), whole
# LoRA trials 334 s against 504 s (1.51; results/mini/mps_check.json). Compiled trials were measured through MPS
# only: their time-sliced seconds are taken as MEASURED x MPS_SPEEDUP.
MPS_SPEEDUP = 1.5


class FinetuneTask(Task):
    """LLM fine-tuning on BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-e/c, OBQA (and SciQ, COPA, CSQA)."""

    name: ClassVar[str] = "finetune"
    Config: ClassVar[type[TaskConfig]] = FinetuneConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    metric: ClassVar[str] = "acc"
    mode: ClassVar[Literal["min", "max"]] = "max"
    mps_speedup: ClassVar[float] = MPS_SPEEDUP

    def resources(self, cfg: TaskConfig) -> Resources:
        assert isinstance(cfg, FinetuneConfig)
        cpus = float(cfg.threads or cfg.cpus)
        if cfg.device == "cpu":
            return Resources(cpus=cpus, gpus=0.0)
        if cfg.gpu_fraction is not None:
            return Resources(cpus=cpus, gpus=cfg.gpu_fraction)
        from tasks.finetune.model import estimate_params

        counts = estimate_params(cfg)
        small = counts is not None and counts[0] < SMALL_MODEL_PARAMS
        return Resources(cpus=cpus, gpus=0.25 if small else 1.0)

    def estimate_flops(self, cfg: TaskConfig) -> float:
        """Training plus evaluation FLOPs, counting every sequence at `max_len` tokens (an upper bound).

        N = all model parameters, N_lora = adapter parameters, T = steps x examples per step x max_len:
        full fine-tuning 6 N T; LoRA 4 N T + 6 N_lora T (forward 2N, backward through the frozen weights 2N for
        the activation gradients only, adapters forward and backward 6 N_lora). Evaluation: 2 N per scored token,
        (prompt, answer) rows of every evaluation. 0 when the model's size is unknown here.
        """
        assert isinstance(cfg, FinetuneConfig)
        from tasks.finetune.data import SETS
        from tasks.finetune.model import estimate_params

        counts = estimate_params(cfg)
        if counts is None:
            return 0.0
        n, n_lora = counts
        packaged = cfg.data_source == "packaged"
        train_examples = eval_rows = 0
        for name in cfg.datasets:
            hub_train, hub_eval, package = SETS[name].sizes
            train = round(package * cfg.packaged_train_fraction) if packaged else hub_train
            evals = package - train if packaged else hub_eval
            train_examples += min(train, cfg.max_train_examples or train)
            eval_rows += min(evals, cfg.max_eval_examples or evals) * SETS[name].choices
        steps = cfg.steps or max(1, math.ceil(cfg.epochs * train_examples / cfg.examples_per_step))
        tokens = steps * cfg.examples_per_step * cfg.max_len
        train_flops = 6 * n * tokens if cfg.method == "full" else 4 * n * tokens + 6 * n_lora * tokens
        evaluations = int(cfg.eval_at_start) + 1 + (steps // cfg.eval_every if cfg.eval_every else 0)
        if cfg.eval_every and steps % cfg.eval_every == 0:
            evaluations -= 1
        return float(train_flops + evaluations * 2 * n * eval_rows * cfg.max_len)

    def estimate_seconds(self, cfg: TaskConfig) -> float:
        """Wall-clock seconds of a GPU trial at its GPU share, time-sliced: the measured trial of its method (through
        MPS, times MPS_SPEEDUP), scaled by FLOPs and by the share (the measured GPU was busy, so a trial's GPU-seconds
        do not depend on how trials are packed)."""
        assert isinstance(cfg, FinetuneConfig)
        preset, seconds, share = MEASURED[cfg.method]
        reference = self.estimate_flops(self.config(preset))
        gpus = self.resources(cfg).gpus
        if not (reference and gpus and cfg.device != "cpu"):
            return 0.0
        return seconds * MPS_SPEEDUP * share / gpus * self.estimate_flops(cfg) / reference

    def run(self, cfg: TaskConfig, optimizer: str, hparams: dict[str, Any], ctx: TrialContext) -> dict[str, float]:
        assert isinstance(cfg, FinetuneConfig)
        from tasks.finetune.training import train

        with torch_threads(cfg.threads):
            return train(cfg, optimizer, hparams, ctx)
