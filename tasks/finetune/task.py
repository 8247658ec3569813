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

# Measured on one H200, nine trials of the `mini` table at a time (0.111 GPU each; the GPU 85% busy on average, 99 GB
# of its memory at most): a whole trial (617 steps of one micro-batch of 16, five evaluations, start-up) took 504 s
# with LoRA and 283 s fully fine-tuned (medians of nine each; 34.7 and 54.5 training examples/s), the eighteen 811 s
# (results/mini/README.md, fine-tuning section). Per method: (preset, seconds of a trial, GPU share it held).
MEASURED: dict[str, tuple[str, float, float]] = {"lora": ("mini", 504.0, 0.111), "full": ("mini-full", 283.0, 0.111)}
# Through MPS (`bench.mps`), nine `mini` trials' own training steps and scoring on one H200 (python -m
# tasks.finetune.step_probe many; results/perf/h200_finetune_mps.json): training 510 examples/s against 303
# time-sliced (six processes; the stored trials' nine reached 312), scoring 3276 rows/s against 2035: 1.63 and 1.61
# times. A trial's set-up (about 45 s of loading, on the CPU) does not gain, so a whole LoRA trial of the 504 s above
# would take 45 + 459 / 1.62 = 328 s (1.54 times faster), a full one 45 + 238 / 1.62 = 192 s (1.47 times): 1.5 is used
# for both. Checked over whole trials: the nine LoRA trials of the lr sweep took 334 s each through MPS against 504 s
# (results/mini/mps_check.json).
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
        """Wall-clock seconds of a GPU trial at its GPU share: the measured trial of its method, scaled by FLOPs and by
        the share (the measured GPU was saturated, so a trial's GPU-seconds do not depend on how trials are packed)."""
        assert isinstance(cfg, FinetuneConfig)
        preset, seconds, share = MEASURED[cfg.method]
        reference = self.estimate_flops(self.config(preset))
        gpus = self.resources(cfg).gpus
        if not (reference and gpus and cfg.device != "cpu"):
            return 0.0
        return seconds * share / gpus * self.estimate_flops(cfg) / reference

    def run(self, cfg: TaskConfig, optimizer: str, hparams: dict[str, Any], ctx: TrialContext) -> dict[str, float]:
        assert isinstance(cfg, FinetuneConfig)
        from tasks.finetune.training import train

        with torch_threads(cfg.threads):
            return train(cfg, optimizer, hparams, ctx)
