"""LLaMA pre-training task (SPAM / Stable-SPAM, bf16 and low-bit): the `Task` adapter and its training loop.

One optimizer step = `batch_size / micro_batch_size` micro-batches whose token-summed cross-entropy is divided by the
number of predicted (non-pad) tokens of the whole step, so the gradient does not depend on the micro-batch size.
The learning rate follows a torch `LambdaLR` on the optimizer: linear warmup from 0, then cosine to `min_lr_ratio`
of the peak. Metrics: `loss`, `lr`, `grad_norm`, `tokens`, `tokens_per_sec` every `log_every` steps (the only host
syncs of the loop), `val_loss` / `val_perplexity` every `eval_every` steps and at the end, with
`val_perplexity_paper_est`, the papers' estimator on the same batches (`evaluate`). `tokens` counts real
(non-pad) input tokens; `tokens_per_sec` is over real tokens, `positions_per_sec` over all token positions, and
`real_token_fraction` their ratio (1 with packing). The data actually used is stated on every trial: tags
`data_source`, `data_passes` and `data_epochs` (single pass / multi-epoch), params `data.corpus_tokens` and
`data.corpus_documents` (and how they were obtained), `data.train_tokens` (token positions of the run) and
`data.passes` (over the corpus tokens when packing, else over its documents); final `data_passes` and
`real_token_fraction`. For the papers' analyses
(`stats`): `loss_spikes` / `max_loss_ratio` every `log_every` steps; `optimizer_state_bytes` /
`optimizer_state_index_bytes` after the first step; with `spike_monitor`, gradient spikes per layer type as metrics
and per layer in the artifact `spikes_per_layer.csv`; final `loss_spikes_total`, the state bytes, and on CUDA
`peak_gpu_memory_bytes` (torch.cuda.max_memory_allocated over the run, or since the resume).

Data parallel: run inside an initialized `torch.distributed` process group (the harness starts one with Ray Train for
`workers` > 1), each rank reads the same data stream and takes its contiguous share of every step's micro-batches;
DDP sums the gradients, so the update is the one of a single process with the same global batch. Losses and
evaluation are reduced over the ranks, so every rank sees (and stops on) the same numbers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

import optimizers
from tasks.base import (
    Diverged,
    Resources,
    Task,
    TaskConfig,
    TrialContext,
    rng_state,
    seed_everything,
    set_rng_state,
    torch_threads,
    trial_optimizer,
)
from tasks.llm_pretrain.config import PRESETS, LLMPretrainConfig
from tasks.llm_pretrain.data import Batcher, CorpusSize, StepLoader, prepare_data, validation_batches
from tasks.llm_pretrain.model import PAPER_VOCAB, build_llama, llama_config, matmul_params
from tasks.llm_pretrain.quant import QuantSpec, quantize_model
from tasks.llm_pretrain.stats import (
    LAYER_CSV,
    LayerSpikeLog,
    LossSpikeCounter,
    optimizer_state_bytes,
    per_layer,
    without_per_param,
)

log = logging.getLogger(__name__)
# The papers' perplexity estimator (see `evaluate`): the metric their published numbers are compared with.
PAPER_ESTIMATE = "val_perplexity_paper_est"

Batch = tuple[torch.Tensor, torch.Tensor]

# Twenty mini trials share a GPU, half a CPU core each: a compiled mini trial uses under 2 GB of an H200, and ten at a
# time left it idle two thirds of the wall time while all ten started together (start-up, data and compile from the
# cache take ~40 s, training ~30 s), so twenty overlap one trial's start-up with another's training.
MINI_GPU_SHARE = 0.05
MINI_CPU_SHARE = 0.5


def passes(cfg: LLMPretrainConfig, packing: bool, size: CorpusSize, steps: int) -> float:
    """Passes over the corpus after `steps`: its tokens when packing, else its documents (one per sequence, the rest
    of a long document is dropped)."""
    if packing:
        return steps * cfg.batch_size * cfg.seq_len / max(size.tokens, 1)
    return steps * cfg.batch_size / max(size.documents, 1)


def data_budget(cfg: LLMPretrainConfig, packing: bool, size: CorpusSize) -> dict[str, Any]:
    """Params and tags stating a run's data: token positions it trains on, corpus tokens, passes over the corpus."""
    train_tokens = cfg.steps * cfg.batch_size * cfg.seq_len
    n = passes(cfg, packing, size, cfg.steps)
    return {
        "params": {"data.train_tokens": train_tokens, "data.corpus_tokens": size.tokens,
                   "data.corpus_documents": size.documents, "data.corpus_tokens_source": size.how,
                   "data.passes": round(n, 4)},
        "tags": {"data_passes": f"{n:.3g}", "data_epochs": "multi-epoch" if n > 1 else "single pass"},
    }


def warmup_cosine(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier of update `step` (0-based): linear from 0 over `warmup` steps, then cosine to `min_ratio`."""

    def fn(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets aligned with the logits: position t predicts label t+1; the last position predicts none."""
    return F.pad(labels[:, 1:], (0, 1), value=-100)


def token_loss_sum(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of the cross-entropy over the positions whose target is not -100 (pad tokens are excluded)."""
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")


class CausalLMLoss(nn.Module):
    """A causal LM and its token-summed loss as one module, so that torch.compile fuses the loss into the graph."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return token_loss_sum(self.model, ids, targets)


class GraphSteps(nn.Module):
    """A loss compiled with CUDA graphs, each call a new graph step: the caller has read the last call's outputs
    (a detached or converted copy), so the replay may reuse their buffers."""

    def __init__(self, compiled: Any) -> None:
        super().__init__()
        self.compiled = compiled
        cudagraph_state_in_this_thread()

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(ids, targets)


def cudagraph_state_in_this_thread() -> None:
    """Give the calling thread the per-thread state of torch's CUDA-graph trees, if it has none.

    torch without pytorch/pytorch#184357 (2.11, on the H200 here) creates that state only in the thread that imports
    `torch._inductor.cudagraph_trees` and asserts in any other (#123177); the fix creates it lazily, as below. A
    reused Ray worker runs each trial in a new thread, so every trial after a worker's first failed at its first
    step."""
    from torch._inductor import cudagraph_trees

    local = cudagraph_trees.local
    if hasattr(local, "tree_manager_containers") or torch._C._is_key_in_tls("tree_manager_containers"):
        return
    local.tree_manager_containers = {}
    local.tree_manager_locks = defaultdict(threading.Lock)
    torch._C._stash_obj_in_tls("tree_manager_containers", local.tree_manager_containers)
    torch._C._stash_obj_in_tls("tree_manager_locks", local.tree_manager_locks)


def world() -> tuple[int, int]:
    """(rank, world size) of the data-parallel process group, (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks of the process group (in place; no-op in a single process)."""
    if world()[1] > 1:
        dist.all_reduce(t)
    return t


def grad_norm(model: nn.Module) -> torch.Tensor:
    """Global L2 norm of all gradients, on the device (no host sync)."""
    norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float32) for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


@torch.no_grad()
def evaluate(loss_fn: nn.Module, batches: list[Batch], device: torch.device, autocast: Any) -> tuple[float, float]:
    """(exact loss, the papers' estimate) on the held-out batches (`loss_fn`: a CausalLMLoss, token-summed).

    The exact loss is the mean cross-entropy over all predicted (non-pad) tokens. The papers' estimate is what both
    authors' evaluation loops compute (SPAM torchrun_main.py:120-141, StableSPAM utils/eval.py:42-63): on each rank the
    sum of the per-batch mean losses of its n batches divided by n + 1 (their batch counter starts at 1), then the
    mean over the ranks; exp of it is biased low by the factor n / (n + 1) on the loss. In a process group each rank
    evaluates its share of the batches and the sums are reduced.

    Nothing waits for the device before the end: batches already there (`Trainer.validation` keeps them on it) are
    scored back to back, which matters where many trials share a GPU and every wait is a turn of its time slices."""
    rank, size = world()
    total = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, predicted tokens, sum of batch means
    n_batches = 0
    for ids, labels in batches[rank::size]:
        targets = shifted_targets(labels.to(device, non_blocking=True))
        count = (targets != -100).sum().double()
        with autocast():
            batch_loss = loss_fn(ids.to(device, non_blocking=True), targets).double()
        total[0] += batch_loss
        total[1] += count
        total[2] += batch_loss / count.clamp(min=1)
        n_batches += 1
    total[2] /= n_batches + 1
    loss_sum, count, paper_sum = all_sum(total).tolist()
    return loss_sum / max(count, 1.0), paper_sum / size


class LLMPretrainTask(Task):
    """LLaMA pre-training on C4 (or the offline English fallback), optionally with fake-quantized projections."""

    name = "llm_pretrain"
    Config = LLMPretrainConfig
    presets = PRESETS
    metric = "val_perplexity"
    paper_metric = PAPER_ESTIMATE
    statistics = {"layer_spikes": LAYER_CSV}
    benchmarks = {"train": "tasks.llm_pretrain.throughput:main"}  # tokens/s and MFU of training steps
    mode = "min"
    # Measured over whole trials on one H200 (results/mini/mps_llama_check.json): the 57 trials of the dry-run check,
    # twenty at a time, took 311 s through MPS from launch to end against 381 s time-sliced, that is 3.10 minutes after
    # the 125 s start (bench.estimate.COLD_START_S) for the 4.35 minutes of GPU time the estimate gives them
    # time-sliced: 1.40 times less. Bare training steps gain less (ten processes: 3.49M tokens/s through MPS against
    # 3.07M, results/perf/h200_mini_mps.json); whole trials also evaluate and compile, and wait on the device there.
    mps_speedup = 1.40

    def resources(self, cfg: TaskConfig) -> Resources:
        """Paper sizes take a GPU per worker; mini trials share one, MINI_GPU_SHARE each."""
        assert isinstance(cfg, LLMPretrainConfig)
        cpus, gpus = {"tiny": (1, 0.0), "mini": (MINI_CPU_SHARE, MINI_GPU_SHARE)}.get(cfg.model_size, (4, 1.0))
        return Resources(cpus=cpus, gpus=gpus, workers=cfg.workers)

    def estimate_flops(self, cfg: TaskConfig) -> float:
        """6 * N * tokens + 12 * layers * hidden * seq_len * tokens (attention scores and values, forward and
        backward, without causal halving, as in PaLM's MFU formula). N counts the parameters of matrix multiplies
        (the LM head included, the input embedding lookup not), at the papers' vocabulary of 32000."""
        assert isinstance(cfg, LLMPretrainConfig)
        mc = llama_config(cfg.model_size, PAPER_VOCAB)
        tokens = cfg.steps * cfg.batch_size * cfg.seq_len
        return float(6 * matmul_params(mc) * tokens + 12 * mc.num_hidden_layers * mc.hidden_size * cfg.seq_len * tokens)

    def run(self, cfg: TaskConfig, optimizer: str, hparams: dict[str, Any], ctx: TrialContext) -> dict[str, float]:
        if not isinstance(cfg, LLMPretrainConfig):
            cfg = LLMPretrainConfig.model_validate(cfg.model_dump() if isinstance(cfg, TaskConfig) else cfg)
        # On the CPU, use the CPUs the trial asked for (oversubscription is slow).
        cpu = torch.device(ctx.device).type == "cpu"
        with torch_threads(max(1, int(self.resources(cfg).cpus)) if cpu else None):
            return Trainer(cfg, optimizer, hparams, ctx).train()


class Trainer:
    """State and loop of one trial."""

    def __init__(self, cfg: LLMPretrainConfig, optimizer: str, hparams: dict[str, Any], ctx: TrialContext) -> None:
        started = time.perf_counter()
        self.cfg, self.ctx = cfg, ctx
        self.device = torch.device(ctx.device)
        self.rank, self.world_size = world()
        seed_everything(ctx.seed)
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")

        self.corpus, self.tokenizer = prepare_data(cfg.data_settings(), ctx.seed)
        self.corpus_size = self.corpus.size(self.tokenizer)
        self.budget = data_budget(cfg, self.corpus.packing, self.corpus_size)
        ctx.set_tags(data_source=self.corpus.source, tokenizer=self.tokenizer.name, precision=cfg.precision,
                     quant=cfg.quant, **self.budget["tags"])
        if self.budget["params"]["data.passes"] > 1:
            log.warning("multi-epoch run: %d training tokens make %.1f passes over the %d tokens of %s",
                        self.budget["params"]["data.train_tokens"], self.budget["params"]["data.passes"],
                        self.corpus_size.tokens, self.corpus.source)

        self.model_config = llama_config(cfg.model_size, self.tokenizer.vocab_size, cfg.seq_len, self.tokenizer.pad_id)
        torch.manual_seed(ctx.seed)
        self.model = build_llama(self.model_config, self.device)
        self.n_quantized = 0
        if cfg.quant != "none":
            self.n_quantized = quantize_model(self.model, QuantSpec(cfg.quant, cfg.quant_group_size,
                                                                         int_bits=cfg.quant_bits))
        if cfg.precision == "bf16":
            self.model.to(torch.bfloat16)
        loss_fn: nn.Module = CausalLMLoss(self.model)
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            loss_fn = DistributedDataParallel(loss_fn, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.no_sync = getattr(loss_fn, "no_sync", contextlib.nullcontext)
        if cfg.compile:
            torch.compiler.reset()  # a fresh trial: drop graphs of earlier trials in this process
        self.loss_fn: nn.Module = loss_fn
        if cfg.compile == "cudagraphs" and self.device.type == "cuda":
            # A small model's compiled step is host-bound: CUDA graphs replay its ~300 kernels in one launch
            # (results/perf/README.md, mini step probe). Elsewhere 'cudagraphs' compiles as True does.
            self.loss_fn = GraphSteps(torch.compile(loss_fn, mode="reduce-overhead"))
        elif cfg.compile:
            self.loss_fn = torch.compile(loss_fn)
        self.autocast = self._autocast()

        self.request = trial_optimizer(optimizer, hparams, cfg, ctx.seed, weight_decay=cfg.weight_decay,
                                       total_steps=cfg.steps)
        self.optimizer, self.resolved = self.request.build(self.model)
        ctx.set_tags(**self.request.tags())
        self.scheduler = LambdaLR(self.optimizer, warmup_cosine(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
        self.monitor = optimizers.SpikeMonitor(self.model, threshold=cfg.spike_threshold) if cfg.spike_monitor else None
        self.layer_log: LayerSpikeLog | None = None
        self.loss_spikes = LossSpikeCounter(cfg.loss_spike_ratio, cfg.loss_spike_window, self.device)
        self.state_bytes: dict[str, float] = {}
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self._val: tuple[list[Batch], int] | None = None
        # seconds per phase of the trial (metrics ``time.*``, reported at the end): where a short run's time goes
        self.seconds = {"setup": time.perf_counter() - started, "first_step": 0.0, "eval": 0.0, "checkpoint": 0.0}

    def _autocast(self) -> Any:
        if self.cfg.precision == "amp":
            if self.device.type == "cuda":
                return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
            log.warning("precision 'amp' autocasts on CUDA only; running in fp32 on %s", self.device)
        return contextlib.nullcontext

    # --- checkpoints ------------------------------------------------------------------------------------------------

    def _state(self, step: int, data_state: dict[str, Any], tokens: int, window: torch.Tensor, window_steps: int,
               train_loss: float) -> dict[str, Any]:
        return {
            "step": step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "data": data_state, "tokens": tokens,
            "window_loss": window.detach().cpu(), "window_steps": window_steps, "train_loss": train_loss,
            "rng": rng_state(self.device),
            "spike_monitor": self.monitor.state_dict() if self.monitor is not None else {},
            "loss_spikes": self.loss_spikes.state_dict(), "state_bytes": dict(self.state_bytes),
        }

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("loss_spikes"):
            self.loss_spikes.load_state_dict(state["loss_spikes"])
        self.state_bytes = dict(state.get("state_bytes", {}))
        if self.monitor is not None and state.get("spike_monitor"):
            self.monitor.load_state_dict(state["spike_monitor"])
        set_rng_state(state["rng"], self.device)

    # --- loop -----------------------------------------------------------------------------------------------------

    def validation(self) -> tuple[list[Batch], int]:
        if self._val is None:
            cfg = self.cfg
            batches, n_tokens = validation_batches(self.corpus, self.tokenizer, cfg.seq_len,
                                                   cfg.eval_batch_size or cfg.micro_batch_size, self.corpus.packing,
                                                   cfg.eval_tokens)
            # kept on the device: each evaluation then scores them without a copy from the host
            self._val = [(ids.to(self.device), labels.to(self.device)) for ids, labels in batches], n_tokens
        return self._val

    def evaluate(self, step: int) -> dict[str, float]:
        started = time.perf_counter()
        batches, n_tokens = self.validation()
        val_loss, paper_loss = evaluate(self.loss_fn, batches, self.device, self.autocast)
        self.seconds["eval"] += time.perf_counter() - started
        metrics = {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 700.0)), "val_tokens": n_tokens,
                   PAPER_ESTIMATE: math.exp(min(paper_loss, 700.0))}
        self.ctx.report(step, **metrics)
        if not math.isfinite(val_loss):
            raise Diverged(f"non-finite validation loss at step {step}")
        return metrics

    def train(self) -> dict[str, float]:
        cfg, ctx = self.cfg, self.ctx
        state = ctx.load_checkpoint()
        start, tokens, window_steps, train_loss = 0, 0, 0, float("nan")
        window = torch.zeros((), device=self.device)
        if state is not None:
            self._restore(state)
            start, tokens = int(state["step"]), int(state["tokens"])
            window, window_steps = state["window_loss"].to(self.device), int(state["window_steps"])
            train_loss = float(state["train_loss"])
            log.info("resuming from the checkpoint of step %d", start)
        else:
            ctx.log_params({f"opt.{k}": v for k, v in self.resolved.items()})
            ctx.log_params({"model.vocab_size": self.model_config.vocab_size, "model.n_params": self.n_params,
                            "model.quantized_linears": self.n_quantized, "data.source": self.corpus.source,
                            "data.tokenizer": self.tokenizer.name, "data.packing": self.corpus.packing,
                            **self.budget["params"]})
        if self.monitor is not None:
            self.layer_log = LayerSpikeLog(ctx.artifact_dir / LAYER_CSV, start if state is not None else None)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        batcher = Batcher(self.corpus.train_tokens(self.tokenizer), self.tokenizer.pad_id, cfg.seq_len,
                          cfg.micro_batch_size, self.corpus.packing, state["data"] if state else None)
        log.info("llm_pretrain: %s LLaMA, %.2fM params (vocab %d), %s, data %s, tokenizer %s, steps %d-%d",
                 cfg.model_size, self.n_params / 1e6, self.model_config.vocab_size, cfg.precision, self.corpus.source,
                 self.tokenizer.name, start + 1, cfg.steps)
        log.info("llm_pretrain data: %s, %d training token positions, corpus %d tokens / %d documents (%s): %s "
                 "passes (%s)", "packed" if self.corpus.packing else "truncated and padded",
                 self.budget["params"]["data.train_tokens"], self.corpus_size.tokens, self.corpus_size.documents,
                 self.corpus_size.how,
                 self.budget["tags"]["data_passes"], self.budget["tags"]["data_epochs"])

        loader = StepLoader(batcher, cfg.accumulation, cfg.steps - start, pin=self.device.type == "cuda")
        try:
            return self._loop(start, tokens, window, window_steps, train_loss, loader)
        finally:
            loader.close()

    def _loop(self, start: int, tokens: int, window: torch.Tensor, window_steps: int, train_loss: float,
              loader: StepLoader) -> dict[str, float]:
        cfg, ctx, model, opt = self.cfg, self.ctx, self.model, self.optimizer
        final: dict[str, float] = {}
        per_step = cfg.batch_size * cfg.seq_len  # token positions of a step (every micro-batch is full)
        t_log, tokens_log, step_log = time.perf_counter(), tokens, start
        for step in range(start + 1, cfg.steps + 1):
            t_step = time.perf_counter()
            micro, data_state = loader.next()
            step_loss, n_inputs = self._accumulate(step, micro)
            self.loss_spikes.update(step_loss)
            log_now = step % cfg.log_every == 0 or step == cfg.steps
            gnorm = grad_norm(model) if log_now else None
            if self.monitor is not None:
                self.monitor.update()
            lr = self.scheduler.get_last_lr()[0]
            opt.step()
            self.scheduler.step()
            opt.zero_grad(set_to_none=True)
            tokens += n_inputs
            window = window + step_loss
            window_steps += 1
            if step == start + 1:  # compiles the model (and the optimizer's kernels)
                self.seconds["first_step"] = time.perf_counter() - t_step
            if step == 1:
                self._tag_state_dtype()
                self.state_bytes = optimizer_state_bytes(opt)
                ctx.report(step, **self.state_bytes)

            if log_now:
                train_loss = (window / window_steps).item()
                now = time.perf_counter()
                elapsed, positions = max(now - t_log, 1e-9), (step - step_log) * per_step
                metrics = {"loss": train_loss, "lr": lr, "grad_norm": gnorm.item(), "tokens": tokens,
                           "tokens_per_sec": (tokens - tokens_log) / elapsed, "positions_per_sec": positions / elapsed,
                           "real_token_fraction": (tokens - tokens_log) / positions}
                metrics.update(self.loss_spikes.summary())
                self.loss_spikes.reset()
                if self.monitor is not None:
                    metrics.update(self._spike_summary(step))
                ctx.report(step, **metrics)
                if not math.isfinite(train_loss):
                    raise Diverged(f"non-finite training loss at step {step}")
                window, window_steps = torch.zeros((), device=self.device), 0
                t_log, tokens_log, step_log = now, tokens, step
            if step % cfg.eval_every == 0 or step == cfg.steps:
                final = self.evaluate(step)
                t_log, tokens_log, step_log = time.perf_counter(), tokens, step  # throughput leaves evaluation out
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                t_ckpt = time.perf_counter()
                ctx.save_checkpoint(self._state(step, data_state, tokens, window, window_steps, train_loss))
                t_log, tokens_log, step_log = time.perf_counter(), tokens, step
                self.seconds["checkpoint"] += t_log - t_ckpt

        if not final:  # resumed after the last evaluation point
            final = self.evaluate(cfg.steps)
        ctx.report(cfg.steps, **{f"time.{phase}_s": v for phase, v in self.seconds.items()})
        return {**final, "train_loss": train_loss, "steps": float(cfg.steps), "tokens": float(tokens),
                "real_token_fraction": tokens / (cfg.steps * per_step),
                "data_passes": passes(cfg, self.corpus.packing, self.corpus_size, cfg.steps),
                "n_params": float(self.n_params), **self._run_statistics()}

    def _spike_summary(self, step: int) -> dict[str, float]:
        """Gradient spikes of the log window per layer type (metrics); per layer into the CSV artifact."""
        assert self.monitor is not None
        summary = self.monitor.summary(per_param=self.layer_log is not None)
        self.monitor.reset()
        if self.layer_log is not None:
            self.layer_log.append(step, per_layer(summary))
        return without_per_param(summary)

    def _run_statistics(self) -> dict[str, float]:
        out = {"loss_spikes_total": float(self.loss_spikes.total.item()), **self.state_bytes}
        if self.device.type == "cuda":
            out["peak_gpu_memory_bytes"] = float(torch.cuda.max_memory_allocated(self.device))
        return out

    def _accumulate(self, step: int, batches: list[Batch]) -> tuple[torch.Tensor, int]:
        """Forward/backward over this rank's micro-batches of one step; returns the step's mean loss (over all ranks)
        and its input tokens."""
        targets = [shifted_targets(labels) for _, labels in batches]
        n_pred = max(1, sum(int((t != -100).sum()) for t in targets))
        n_inputs = sum(int((labels != -100).sum()) for _, labels in batches)
        share = len(batches) // self.world_size
        mine = slice(self.rank * share, (self.rank + 1) * share)
        step_loss = torch.zeros((), device=self.device)
        for i, ((ids, _), tgt) in enumerate(zip(batches[mine], targets[mine], strict=True)):
            with self.autocast():
                loss = self.loss_fn(ids.to(self.device, non_blocking=True),
                                    tgt.to(self.device, non_blocking=True)) / n_pred
            if step == self.cfg.inject_nan_at:
                loss = loss * float("nan")
            # DDP averages the gradients over the ranks (scale back up to a sum) and syncs at the last micro-batch
            with self.no_sync() if i < share - 1 else contextlib.nullcontext():
                (loss * self.world_size).backward()
            step_loss += loss.detach()
        return all_sum(step_loss), n_inputs

    def _tag_state_dtype(self) -> None:
        dtypes = {t.dtype for s in self.optimizer.state.values() for t in s.values()
                  if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() > 0}
        if dtypes:
            self.ctx.set_tags(optimizer_state_dtype=",".join(sorted(str(d).removeprefix("torch.") for d in dtypes)))

