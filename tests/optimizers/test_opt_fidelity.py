"""The baselines of the papers' tables are the optimizers the authors ran, built the way a task builds them.

Float64, on a tiny LLaMA, step for step against the package optimizer configured as in the authors' launchers
(SPAM-Optimizer torchrun_main.py, StableSPAM utils/setup.py). Also: only the names that own Stable-SPAM's schedule
take `total_steps`, and Adam-mini + AdaGN + AdaClip touches the blocks the authors' variant touches.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import optimizers
from optimizers.registry import OptimizerConfigError
from tasks.base import fill_hparams, trial_optimizer
from tasks.llm_pretrain import LLMPretrainTask
from tasks.llm_pretrain.model import build_llama, llama_config

torch.set_num_threads(1)
STEPS = 12
VOCAB = 97


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    return build_llama(llama_config("tiny", VOCAB)).double()


def task_config(**overrides: Any) -> Any:
    """The smoke preset, 40 steps: a task passes total_steps=40 to every optimizer that accepts it."""
    return LLMPretrainTask().config("smoke", {"steps": 40, "lr": 3e-3, **overrides})


def train(model: nn.Module, opt: torch.optim.Optimizer, clip: float | None = None) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(1, VOCAB, (2, 16), generator=gen)
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip)
        opt.step()
        out.append([p.detach().clone() for p in model.parameters()])
    return out


def _adafactor(beta1: float | None) -> Callable[[nn.Module, float], torch.optim.Optimizer]:
    def make(model: nn.Module, lr: float) -> torch.optim.Optimizer:
        from transformers.optimization import Adafactor

        # SPAM-Optimizer torchrun_main.py:364-375 / StableSPAM utils/setup.py:182-193
        return Adafactor(model.parameters(), lr=lr, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8,
                         beta1=beta1, weight_decay=0.0, relative_step=False, scale_parameter=False,
                         warmup_init=False)

    return make


def _lion(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    from lion_pytorch import Lion

    return Lion(model.parameters(), lr=lr, weight_decay=0.0)  # StableSPAM utils/setup.py:165-166


def _adam_mini(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    import contextlib
    import io

    from adam_mini import Adam_mini

    with contextlib.redirect_stdout(io.StringIO()):  # StableSPAM utils/setup.py:143-151
        opt = Adam_mini(named_parameters=model.named_parameters(), lr=lr, weight_decay=0.0, model_sharding=True,
                        dim=model.config.hidden_size, n_heads=model.config.num_attention_heads, verbose=False)
    opt.world_size = 1
    return opt


# (registry name, row hparams, package optimizer as the authors built it, clip_grad_norm_ max norm, module needed)
BASELINES: list[tuple[str, dict[str, Any], Callable[[nn.Module, float], torch.optim.Optimizer], float | None,
                      str | None]] = [
    # SPAM torchrun_main.py:354 + :447 (--grad_clipping 1.0); StableSPAM utils/setup.py:141 + main_pretrain.py:280
    ("adam+gradclip", {}, lambda m, lr: torch.optim.Adam(m.parameters(), lr=lr, weight_decay=0.0), 1.0, None),
    ("adam_gradclip", {}, lambda m, lr: torch.optim.Adam(m.parameters(), lr=lr, weight_decay=0.0), 1.0, None),
    ("adam", {}, lambda m, lr: torch.optim.Adam(m.parameters(), lr=lr, weight_decay=0.0), None, None),
    ("adamw", {}, lambda m, lr: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0), None, None),
    ("adafactor", {"beta1": None}, _adafactor(None), None, "transformers"),  # SPAM's rows
    ("adafactor", {}, _adafactor(0.9), None, "transformers"),  # Stable-SPAM's rows
    ("lion", {"lr": 1e-4}, _lion, None, "lion_pytorch"),
    ("adam_mini", {}, _adam_mini, None, "adam_mini"),
]


@pytest.mark.parametrize(("name", "hparams", "reference", "clip", "module"), BASELINES,
                         ids=[f"{b[0]}{'-' + str(b[1]) if b[1] else ''}" for b in BASELINES])
def test_task_built_baseline_is_the_package_optimizer(name, hparams, reference, clip, module):
    if module:
        pytest.importorskip(module)
    cfg = task_config()
    ours_model, ref_model = tiny_llama(), tiny_llama()
    request = trial_optimizer(name, dict(hparams), cfg, 0, weight_decay=cfg.weight_decay, total_steps=cfg.steps)
    ours, _ = request.build(ours_model)
    lr = optimizers.resolved_hparams(ours)["lr"]
    ref = reference(ref_model, lr)
    for step, (a, b) in enumerate(zip(train(ours_model, ours), train(ref_model, ref, clip), strict=True), 1):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-15, msg=f"{name} differs at step {step}")


SCHEDULE_OWNERS = ["stable_spam", "adam+moret", "adam+moret+adagn+adaclip", "adamw+moret+adaclip"]
NOT_OWNERS = ["adam", "adam+gradclip", "adam_gradclip", "adamw", "spam", "lion", "lion+adagn+adaclip",
              "adam_mini+adagn+adaclip", "adafactor", "adam+adagn+adaclip", "adam+gradclip+adaclip", "sgd+adagn"]


@pytest.mark.parametrize("name", SCHEDULE_OWNERS)
def test_schedule_owners_take_the_task_total_steps(name):
    merged, filled = fill_hparams(name, {}, total_steps=40, lr=1e-3)
    assert filled["total_steps"] == 40 and merged["total_steps"] == 40


@pytest.mark.parametrize("name", NOT_OWNERS)
def test_other_names_reject_total_steps_so_a_task_cannot_change_their_rule(name):
    spec = optimizers.spec(name)
    assert "total_steps" not in spec.accepts and "eta_min" not in spec.accepts
    merged, filled = fill_hparams(name, {}, total_steps=40)
    assert "total_steps" not in merged and not filled
    if spec.needs_model or not spec.available:
        return
    with pytest.raises(OptimizerConfigError, match="total_steps"):
        optimizers.build(name, [nn.Parameter(torch.zeros(3, 3))], total_steps=40)


def _fixed_grads(model: nn.Module, steps: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    out = []
    for k in range(steps):
        grads = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in model.named_parameters()}
        if k == 4:
            for g in grads.values():
                g.view(-1)[0] *= 1000.0  # a spike in every block
        out.append(grads)
    return out


def test_adam_mini_adagn_adaclip_acts_on_the_authors_blocks_only():
    """StableSPAM galore_torch/adam_mini_ours.py: AdaClip/AdaGN on q_proj/k_proj and the norm blocks; embeddings,
    LM head, v_proj, o_proj and the MLP are updated by plain Adam-mini."""
    pytest.importorskip("adam_mini")
    plain_model, comp_model = tiny_llama(), copy.deepcopy(tiny_llama())
    plain = optimizers.build("adam_mini", plain_model, lr=1e-3)
    comp = optimizers.build("adam_mini+adagn+adaclip", comp_model, lr=1e-3)
    assert optimizers.resolved_hparams(comp)["adaptive_off_groups"] > 0
    for grads in _fixed_grads(plain_model, 8):
        for model, opt in ((plain_model, plain), (comp_model, comp)):
            for n, p in model.named_parameters():
                p.grad = grads[n].clone()
            opt.step()
    same = {n for (n, a), b in zip(plain_model.named_parameters(), comp_model.parameters(), strict=True)
            if torch.equal(a, b)}
    names = [n for n, _ in plain_model.named_parameters()]
    adaptive = {n for n in names if any(k in n for k in ("q_proj", "k_proj", "norm"))}
    assert adaptive and not (adaptive & same), f"AdaGN/AdaClip did not reach {sorted(adaptive & same)}"
    assert set(names) - adaptive == same


def test_lion_adagn_adaclip_acts_on_every_block():
    """StableSPAM utils/lions.py:103-118 transforms every parameter's gradient (no scope)."""
    pytest.importorskip("lion_pytorch")
    model = tiny_llama()
    opt = optimizers.build("lion+adagn+adaclip", model, lr=1e-4)
    assert "adaptive_off_groups" not in optimizers.resolved_hparams(opt)
