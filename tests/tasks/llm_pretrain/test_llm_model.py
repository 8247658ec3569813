"""LLaMA sizes (on the meta device), config schema, presets, resources and FLOP estimates."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tasks import get_task
from tasks.llm_pretrain import PRESETS, LLMPretrainConfig, LLMPretrainTask
from tasks.llm_pretrain.model import NOMINAL_PARAMS, SHAPES, build_llama, count_params, llama_config


@pytest.mark.parametrize("size", ["60m", "130m", "350m"])
def test_paper_sizes_match_their_names(size: str) -> None:
    n = count_params(llama_config(size))
    assert abs(n / NOMINAL_PARAMS[size] - 1) < 0.06, n


def test_1b_is_the_galore_1b_config_with_1_34b_parameters() -> None:
    assert count_params(llama_config("1b")) == pytest.approx(1.339e9, rel=1e-3)


def test_mini_is_about_20m() -> None:
    assert abs(count_params(llama_config("mini")) / 20e6 - 1) < 0.1


def test_architecture_follows_the_papers() -> None:
    c = llama_config("130m")
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_hidden_layers) == (
        32000, 768, 2048, 12, 12)
    assert c.hidden_act == "silu" and not c.tie_word_embeddings and c._attn_implementation == "sdpa"
    assert llama_config("tiny", vocab_size=2048).vocab_size == 2048
    assert set(SHAPES) == {"tiny", "mini", "60m", "130m", "350m", "1b"}


def test_registry_and_presets() -> None:
    task = get_task("llm_pretrain")
    assert isinstance(task, LLMPretrainTask) and task.metric == "val_perplexity" and task.mode == "min"
    for name in PRESETS:
        cfg = task.config(name)
        assert task.estimate_flops(cfg) > 0
    paper = task.config("paper-130m")
    assert (paper.batch_size, paper.seq_len, paper.steps, paper.warmup_steps, paper.min_lr_ratio) == (
        512, 256, 20_000, 1000, 0.1)
    assert task.config("paper-1b").steps == 90_000 and task.config("paper-int4-350m").quant == "int4"
    assert task.resources(task.config("smoke")).gpus == 0
    assert 0 < task.resources(task.config("mini")).gpus <= 0.125  # eight or more mini trials share a GPU
    assert task.resources(task.config("paper-60m")).gpus == 1


def test_flops_estimate_is_six_n_d_plus_attention() -> None:
    cfg = LLMPretrainTask().config("paper-60m")
    tokens = 10_000 * 512 * 256
    assert LLMPretrainTask().estimate_flops(cfg) == pytest.approx(6 * 41.7e6 * tokens + 12 * 8 * 512 * 256 * tokens,
                                                                   rel=0.01)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"warmup_steps": 40}, "warmup_steps"),
        ({"batch_size": 10, "micro_batch_size": 4}, "multiple of micro_batch_size"),
        ({"inject_nan_at": 41}, "inject_nan_at"),
        ({"model_size": "7b"}, "model_size"),
        ({"quant": "int3"}, "quant"),
        ({"precision": "fp16"}, "precision"),
        ({"no_such_field": 1}, "no_such_field"),
        ({"compile": "cudagraphs"}, "cudagraphs' needs one micro-batch per step"),  # smoke: 2 micro-batches a step
        ({"compile": "max-autotune"}, "compile"),
    ],
)
def test_config_validation(overrides: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        LLMPretrainTask().config("smoke", overrides)


def test_size_counts_use_the_meta_device() -> None:
    model = build_llama(llama_config("1b"), device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert LLMPretrainConfig().model_size == "tiny"


def test_cudagraphs_takes_a_single_micro_batch_step() -> None:
    cfg = LLMPretrainTask().config("mini")
    assert cfg.compile == "cudagraphs" and cfg.accumulation == 1 and cfg.workers == 1
    assert LLMPretrainTask().config("smoke", {"compile": "cudagraphs", "micro_batch_size": 8}).compile == "cudagraphs"


def test_a_new_thread_gets_cuda_graph_tree_state() -> None:
    """Ray runs a reused worker's next trial in a new thread: the CUDA-graph trees must find their state there."""
    import threading

    from torch._inductor import cudagraph_trees

    from tasks.llm_pretrain.task import cudagraph_state_in_this_thread

    found: list[object] = []

    def trial() -> None:
        cudagraph_state_in_this_thread()
        found.append(cudagraph_trees.get_obj(cudagraph_trees.local, "tree_manager_containers"))
        found.append(cudagraph_trees.get_obj(cudagraph_trees.local, "tree_manager_locks")[0])

    thread = threading.Thread(target=trial)
    thread.start()
    thread.join()
    assert len(found) == 2 and found[0] == {}
