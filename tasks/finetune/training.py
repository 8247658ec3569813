"""One fine-tuning trial: data, model (full or LoRA), the registry optimizer, the loop, evaluation, checkpoints.

Training examples are the correct answers of the selected sets' training parts, mixed (commonsense-170k style):
the loss is the cross-entropy of the answer tokens given the prompt, summed over the answer tokens of all
micro-batches of a step and divided by their number. The order is a fixed function of the trial seed and the
position in the stream (a fresh permutation per epoch), so a resumed trial sees the data an uninterrupted one would.

The optimizer is `optimizers.build(name, ...)`: over the whole model for full fine-tuning (the registry forms its
parameter groups), over the trainable parameters only for LoRA (the registry's groups of the trainable adapters,
or the model itself for optimizers built from the model). The task fills `lr`, `weight_decay`, `total_steps` and
`seed` where the trial's hyperparameters are silent and the optimizer accepts them (tag `task_filled_hparams`),
checks that every requested value reached the optimizer, and logs the resolved hyperparameters as `optimizer.*`.
The learning rate follows a `LambdaLR` on that optimizer: linear warmup from 0 (the Hugging Face convention), then
linear or cosine decay to `min_lr_ratio` of the peak, or constant.

A step whose gradient or loss is not finite is not taken. Up to `max_nonfinite_steps` such steps are skipped (each
named in a `skipped_step.<step>` tag, their number in `skipped_steps`); the next one stops the trial as diverged.
The message names the tensors and, replayed one at a time, the micro-batches and rows that give a non-finite
gradient again (a replay draws new dropout masks).

Checkpoints hold the trainable weights (LoRA: the adapters only; full: every parameter), the optimizer and
scheduler states, the step, the scores before fine-tuning and the torch RNG states; a resumed trial continues
exactly where the interrupted one stopped (tested bit for bit on CPU).

The scores before fine-tuning (step 0) of a pretrained model are computed once per model, data and evaluation
settings and shared by the trials through a cache (`tasks.finetune.start_scores`; tag `start_scores`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.optim.lr_scheduler import LambdaLR

import optimizers
from tasks.base import (
    Diverged,
    TrialContext,
    TrialOptimizer,
    rng_state,
    set_rng_state,
    trial_device,
    trial_optimizer,
)
from tasks.finetune.config import FinetuneConfig
from tasks.finetune.data import SetData, load_sets
from tasks.finetune.model import LoadedModel, apply_lora, compile_layers, load_base
from tasks.finetune.scoring import Encoded, collate, continuation_logprobs, encode_pairs, score_examples
from tasks.finetune.start_scores import identity, start_scores

log = logging.getLogger(__name__)
T = TypeVar("T")

# Training's forward and backward leave out cuDNN attention, the default SDPA backend on H100/H200 for masked
# attention: in torch 2.11 its backward returns NaN query gradients when the padded length is 64 mod 128 and a query
# row's logsumexp is below ln(FLT_MAX), as a left-padding row's always is (pytorch/pytorch#196678). Every trial of
# the H200 `mini` table met it at one micro-batch 192 tokens wide (results/mini/README.md); the other backends do not.
TRAIN_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def loss_backward(model: nn.Module, batch: dict[str, torch.Tensor], n_tokens: int,
                  attention: list[SDPBackend] | None = TRAIN_ATTENTION) -> torch.Tensor:
    """Fine-tuning's loss of one micro-batch (its answer tokens' negative log-likelihood over the step's `n_tokens`),
    backpropagated with the `attention` backends (None: torch's defaults); returns the loss, detached."""
    with sdpa_kernel(attention) if attention is not None else contextlib.nullcontext():
        logprob, _ = continuation_logprobs(model, batch)
        loss = -logprob.sum() / n_tokens
        loss.backward()
    return loss.detach()

SCORING_TAG = ("acc: argmax over choices of answer log-likelihood / answer characters (headline); "
               "acc_sum: argmax of the summed log-likelihood")


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr for update `step` (0-based)."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


@dataclass
class FinetuneTrial:
    """The live objects of one trial. `create` builds them; `train` drives them."""

    cfg: FinetuneConfig
    optimizer_name: str
    seed: int
    device: torch.device
    loaded: LoadedModel
    sets: list[SetData]
    train_rows: list[Encoded]
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    total_steps: int
    resolved: dict[str, Any]
    request: TrialOptimizer
    step: int = 0
    _perms: dict[int, list[int]] = field(default_factory=dict)
    nonfinite: list[str] = field(default_factory=list)  # the trainable tensors whose last gradient was not finite
    nonfinite_where: str = ""  # which micro-batches and rows of that step give it, found by replaying them
    skipped: int = 0  # steps not taken for a non-finite gradient or loss (`max_nonfinite_steps`)

    @classmethod
    def create(cls, cfg: FinetuneConfig, optimizer: str, hparams: dict[str, Any], seed: int,
               device: torch.device | str = "cpu") -> FinetuneTrial:
        device = torch.device(device)
        # float32 matmuls (a bf16 LoRA trial's adapters) in full float32, torch's default. The setting is the
        # process's, and a reused worker may have run a LLaMA trial, which sets TF32. TF32 here was measured and not
        # taken: the mini table took no less time on a fresh H200 (results/mini/finetune_tf32.json).
        torch.set_float32_matmul_precision("highest")
        sets = load_sets(list(cfg.datasets), cfg.data_source, cfg.data_paths, cfg.hub_ids, cfg.allow_fallback,
                         cfg.packaged_train_fraction, cfg.max_train_examples, cfg.max_eval_examples)
        loaded = load_base(cfg, seed)
        if cfg.method == "lora":
            loaded = apply_lora(loaded, cfg)
        loaded.model.to(device)
        if cfg.compile:
            compile_layers(loaded.model)
        pairs = [(ex.contexts[ex.label], ex.continuations[ex.label]) for s in sets for ex in s.train]
        if not pairs:
            raise ValueError(f"no training examples in {[s.name for s in sets]}")
        train_rows = encode_pairs(loaded.tokenizer, pairs, cfg.max_len)
        vocab = loaded.model.get_input_embeddings().num_embeddings
        top = max(max(r.ids) for r in train_rows)
        if top >= vocab:
            raise ValueError(f"the tokenizer produces id {top} but {loaded.source} has {vocab} embeddings: "
                             "set `tokenizer` to the model's own tokenizer")
        total = cfg.steps or max(1, math.ceil(cfg.epochs * len(train_rows) / cfg.examples_per_step))
        if cfg.warmup_steps >= total:
            raise ValueError(f"warmup_steps ({cfg.warmup_steps}) must be smaller than the trial's {total} steps")

        request = trial_optimizer(optimizer, hparams, cfg, seed, weight_decay=cfg.weight_decay, total_steps=total)
        model = loaded.model
        whole = cfg.method == "full" or optimizers.spec(optimizer).needs_model
        opt, resolved = request.build(model if whole else optimizers.param_groups(model))
        sched = LambdaLR(opt, lambda s: lr_factor(s, cfg.warmup_steps, total, cfg.schedule, cfg.min_lr_ratio))
        return cls(cfg, optimizer, seed, device, loaded, sets, train_rows, opt, sched, total, resolved, request)

    # --- data order ---------------------------------------------------------------------------------------------

    def _permutation(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            order = list(range(len(self.train_rows)))
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
            self._perms = {epoch: order}
        return self._perms[epoch]

    def step_examples(self, step: int) -> list[int]:
        """Indices of the training rows of update `step` (0-based)."""
        n, per_step = len(self.train_rows), self.cfg.examples_per_step
        out = []
        for pos in range(step * per_step, (step + 1) * per_step):
            out.append(self._permutation(pos // n)[pos % n])
        return out

    # --- training -----------------------------------------------------------------------------------------------

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    def trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def train_step(self) -> dict[str, float]:
        """One optimizer step (gradient accumulation over micro-batches); returns loss, lr, grad_norm, tokens."""
        self.model.train()
        idx = self.step_examples(self.step)
        micro = [idx[i : i + self.cfg.batch_size] for i in range(0, len(idx), self.cfg.batch_size)]
        batches = [collate([self.train_rows[i] for i in m], self.loaded.tokenizer.pad_token_id, self.device)
                   for m in micro]
        n_tokens = sum(self.train_rows[i].n_cont for i in idx)  # from the host: no wait for the device
        lr = float(self.optimizer.param_groups[0]["lr"])
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for batch in batches:
            total += loss_backward(self.model, batch, n_tokens)
        grads = {n: p.grad for n, p in self.trainable().items() if p.grad is not None}
        # one multi-tensor kernel for every gradient's norm (float32 whatever the gradients' dtype), one wait
        norms = torch.stack(torch._foreach_norm(list(grads.values()), 2, dtype=torch.float32))
        norm, loss_value = torch.stack([torch.linalg.vector_norm(norms), total]).tolist()
        if self.cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(self.trainable().values()), self.cfg.max_grad_norm)
        # A step with a non-finite gradient or loss is not taken (`train` skips or stops); the tensors are named.
        self.nonfinite = [] if math.isfinite(norm) else [n for n, g in grads.items() if not torch.isfinite(g).all()]
        self.nonfinite_where = ""
        if math.isfinite(loss_value) and math.isfinite(norm):
            self.optimizer.step()
        elif self.nonfinite:
            self.nonfinite_where = self._replay(micro, n_tokens)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return {"loss": loss_value, "lr": lr, "grad_norm": norm, "answer_tokens": float(n_tokens)}

    def _gradient_is_finite(self, rows: list[int], n_tokens: int) -> bool:
        self.optimizer.zero_grad(set_to_none=True)
        loss_backward(self.model, collate([self.train_rows[i] for i in rows], self.loaded.tokenizer.pad_token_id,
                                          self.device), n_tokens)
        return all(bool(torch.isfinite(p.grad).all()) for p in self.trainable().values() if p.grad is not None)

    def _replay(self, micro: list[list[int]], n_tokens: int) -> str:
        """Which micro-batches of a step with a non-finite gradient give it again alone, and whether each of their
        rows does alone (a batch whose rows are all finite alone points at padding, not at an example)."""
        found = []
        for k, rows in enumerate(micro):
            if self._gradient_is_finite(rows, n_tokens):
                continue
            alone = [i for i in rows if not self._gradient_is_finite([i], n_tokens)]
            shapes = ", ".join(f"{i} ({len(self.train_rows[i].ids)} tokens, {self.train_rows[i].n_cont} answer)"
                               for i in rows)
            found.append(f"micro-batch {k} of rows {shapes}: non-finite alone: {alone or 'none'}")
        return "; ".join(found) or "no micro-batch gives it again alone"

    # --- evaluation ---------------------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """`acc/<set>`, `acc_sum/<set>` and their means over the sets, `acc` and `acc_sum`."""
        metrics: dict[str, float] = {}
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            for s in self.sets:
                scores = score_examples(self.model, self.loaded.tokenizer, s.eval, self.cfg.max_len,
                                        self.cfg.eval_batch_size, self.device)
                metrics[f"acc/{s.name}"] = scores.acc
                metrics[f"acc_sum/{s.name}"] = scores.acc_sum
        metrics["acc"] = sum(metrics[f"acc/{s.name}"] for s in self.sets) / len(self.sets)
        metrics["acc_sum"] = sum(metrics[f"acc_sum/{s.name}"] for s in self.sets) / len(self.sets)
        self.model.train()
        return metrics

    # --- checkpoints --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "skipped": self.skipped,
            "trainable": {n: p.detach().cpu() for n, p in self.trainable().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(self.device),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = self.trainable()
        saved = state["trainable"]
        if set(saved) != set(params):
            raise RuntimeError(f"checkpoint does not match the model: {sorted(set(saved) ^ set(params))[:5]}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.skipped = int(state.get("skipped", 0))
        set_rng_state(state["rng"], self.device)

    # --- what to log --------------------------------------------------------------------------------------------

    def params(self) -> dict[str, Any]:
        opt = self.optimizer
        out: dict[str, Any] = {f"optimizer.{k}": v for k, v in self.resolved.items()}
        out.update({
            "optimizer.class": f"{type(opt).__module__}.{type(opt).__qualname__}",
            "optimizer.lr_source": self.request.lr_source,
            "train.total_steps": self.total_steps,
            "train.examples": len(self.train_rows),
            "train.examples_per_step": self.cfg.examples_per_step,
            "model.params": self.loaded.n_params,
            "model.trainable_params": self.loaded.n_trainable,
        })
        for s in self.sets:
            out[f"data.{s.name}.train"] = len(s.train)
            out[f"data.{s.name}.eval"] = len(s.eval)
        return out

    def tags(self) -> dict[str, str]:
        cfg = self.cfg
        tags = {
            "model_source": self.loaded.source,
            "model_pretrained": str(self.loaded.pretrained).lower(),
            "method": cfg.method if cfg.method == "full" else
            f"lora r={cfg.lora_r} alpha={cfg.lora_alpha:g} dropout={cfg.lora_dropout:g} "
            f"targets={','.join(cfg.lora_target_modules)}",
            "optimizer_params": "all parameters" if cfg.method == "full" else "LoRA adapters only (base frozen)",
            "precision": cfg.precision if cfg.method == "full" or cfg.precision == "fp32"
            else "bf16 base weights, fp32 LoRA adapters",
            "scoring": SCORING_TAG,
            "data_fallback": str(any(s.kind == "packaged" for s in self.sets)).lower(),
            "device": str(self.device),
            **self.request.tags(),
        }
        for s in self.sets:
            tags[f"data_source.{s.name}"] = s.source + (f" ({'; '.join(s.notes)})" if s.notes else "")
        if not self.loaded.pretrained:
            tags["model_note"] = "randomly initialised, NOT pretrained: accuracies are for code-path checks only"
        return tags


def train(cfg: FinetuneConfig, optimizer: str, hparams: dict[str, Any], ctx: TrialContext) -> dict[str, float]:
    """Fine-tune and evaluate (resuming from the context's checkpoint); returns the final metrics."""
    started = time.perf_counter()
    device = torch.device(trial_device(cfg.device, ctx))
    trial = FinetuneTrial.create(cfg, optimizer, hparams, seed=int(ctx.seed), device=device)
    # seconds per phase (metrics ``time.*_s``, reported at the end): where a trial's wall time goes
    seconds = {"setup": time.perf_counter() - started, "train": 0.0, "eval": 0.0}

    def timed_eval(score: Callable[[], T]) -> T:
        t_eval = time.perf_counter()
        out = score()
        seconds["eval"] += time.perf_counter() - t_eval
        return out

    ctx.log_params(trial.params())
    ctx.set_tags(**trial.tags())
    state = ctx.load_checkpoint()
    before: dict[str, float] = {}  # acc_start / acc_sum_start: the scores before fine-tuning
    if state is not None:
        trial.load_state_dict(state["trial"])
        before = {k: float(v) for k, v in state.get("before", {}).items()}
        ctx.set_tags(resumed_from_step=str(trial.step))
        log.info("resumed fine-tuning at step %d of %d", trial.step, trial.total_steps)
    elif cfg.eval_at_start:
        # from the cache when another trial computed them; the time of waiting for one that is computing them (the
        # cache's lock) counts as evaluation time
        scores, origin = timed_eval(lambda: start_scores(identity(trial), trial.evaluate))
        ctx.set_tags(start_scores=origin)
        ctx.report(step=0, **scores)
        before = {f"{k}_start": v for k, v in scores.items() if k in ("acc", "acc_sum")}
        log.info("before fine-tuning: acc %.4f", scores["acc"])
    every_ckpt = cfg.eval_every if cfg.checkpoint_every is None else cfg.checkpoint_every
    log.info("fine-tuning %s (%s, %s) with %s: %d steps x %d examples, %d trainable of %d parameters",
             trial.loaded.source, cfg.method, ",".join(cfg.datasets), optimizer, trial.total_steps,
             cfg.examples_per_step, trial.loaded.n_trainable, trial.loaded.n_params)
    final: dict[str, float] = {}
    last: dict[str, float] = {}
    window_steps, window_seconds = 0, 0.0
    while trial.step < trial.total_steps:
        t0 = time.perf_counter()
        metrics = trial.train_step()
        took = time.perf_counter() - t0
        window_seconds += took
        seconds["train"] += took
        window_steps += 1
        step = trial.step
        finite = math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
        if not finite:  # the step was not taken
            where = f" (non-finite gradients in {len(trial.nonfinite)} tensors: {', '.join(trial.nonfinite[:3])}; " \
                f"{trial.nonfinite_where})" if trial.nonfinite else ""
            message = f"step {step}: loss {metrics['loss']}, gradient norm {metrics['grad_norm']}{where}"
            if trial.skipped >= cfg.max_nonfinite_steps:
                raise Diverged(message)
            trial.skipped += 1
            log.warning("skipped (%d of at most %d): %s", trial.skipped, cfg.max_nonfinite_steps, message)
            ctx.set_tags(**{f"skipped_step.{step}": message[:5000]})
        else:
            last = metrics
        if finite and (step % cfg.log_every == 0 or step == trial.total_steps):
            speed = cfg.examples_per_step * window_steps / max(window_seconds, 1e-9)
            ctx.report(step=step, **metrics, examples_per_sec=speed)
            window_steps, window_seconds = 0, 0.0
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == trial.total_steps:
            final = timed_eval(trial.evaluate)
            ctx.report(step=step, **final)
            log.info("step %d/%d: loss %.4f, acc %.4f (%s)", step, trial.total_steps, metrics["loss"], final["acc"],
                     ", ".join(f"{s.name} {final[f'acc/{s.name}']:.3f}" for s in trial.sets))
        if (every_ckpt and step % every_ckpt == 0) or step == trial.total_steps:
            ctx.save_checkpoint({"step": step, "trial": trial.state_dict(), "before": before})
    if not final:  # resumed from the last step's checkpoint
        final = timed_eval(trial.evaluate)
    ctx.report(step=trial.total_steps, **{f"time.{phase}_s": v for phase, v in seconds.items()})
    if cfg.save_model:
        out = ctx.artifact_dir / "model"
        trial.model.save_pretrained(out)
        trial.loaded.tokenizer.save_pretrained(out)
    result = {**final, **before, "steps": float(trial.total_steps), "skipped_steps": float(trial.skipped)}
    if last:
        result["loss"] = last["loss"]
    return result
