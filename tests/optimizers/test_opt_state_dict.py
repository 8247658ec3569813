"""Resuming from a state dict mid-cycle continues on the identical trajectory, bit for bit."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import optimizers

torch.set_num_threads(1)


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 24, d: int = 8) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.up_proj = nn.Linear(d, 2 * d)
        self.down_proj = nn.Linear(2 * d, d)
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        att = torch.softmax(self.q_proj(x) @ self.k_proj(x).transpose(-1, -2), -1) @ self.v_proj(x)
        x = x + self.o_proj(att)
        x = x + self.down_proj(F.silu(self.up_proj(x)))
        return self.lm_head(self.norm(x))


CASES = [
    ("spam", {"reset_interval": 10, "warmup_steps": 8, "density": 0.5}, torch.float32),
    ("spam", {"reset_interval": 10, "warmup_steps": 8, "density": 0.5, "state_dtype": "float32"}, torch.bfloat16),
    ("stable_spam", {"reset_interval": 10, "total_steps": 30, "weight_decay": 0.1}, torch.float32),
    ("stable_spam", {"reset_interval": 10, "variant": "clean"}, torch.bfloat16),
    ("stable_spam", {"reset_interval": 10, "state_dtype": "float32"}, torch.bfloat16),
    ("adam+moret+gradclip+adaclip", {"reset_interval": 10}, torch.float32),
    ("lion+moret+adagn+adaclip+spikeclip", {"reset_interval": 10, "lr": 3e-4}, torch.float32),
    ("adam_mini+adagn+adaclip", {"dim": 8, "n_heads": 2}, torch.float32),
    ("adafactor+moret+gradclip", {"reset_interval": 10, "moret_mode": "clean"}, torch.float32),
    ("sgd+moret+spikeclip", {"reset_interval": 10, "lr": 0.05, "warmup_steps": 4, "moret_mode": "spam"},
     torch.float32),
]


def make(name: str, hp: dict, dtype: torch.dtype):
    torch.manual_seed(0)
    model = TinyLM().to(dtype)
    opt = optimizers.build(name, model, **hp)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + 0.05 * step))
    return model, opt, sched


def train(model, opt, sched, batches) -> None:
    for ids in batches:
        opt.zero_grad()
        F.cross_entropy(model(ids[:, :-1]).float().flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        sched.step()


@pytest.mark.parametrize("name,hp,dtype", CASES, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(CASES)])
def test_resume_mid_cycle_is_bitwise_identical(name, hp, dtype):
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 24, (3, 7), generator=gen) for _ in range(37)]
    batches[22][0, :] = 5  # an unusual batch after the resume point

    model, opt, sched = make(name, hp, dtype)
    train(model, opt, sched, batches)

    model_a, opt_a, sched_a = make(name, hp, dtype)
    train(model_a, opt_a, sched_a, batches[:16])  # mid-cycle: resets at 10, 20, 30
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict(), "sched": sched_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)

    model_b, opt_b, sched_b = make(name, hp, dtype)
    model_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    sched_b.load_state_dict(ckpt["sched"])
    train(model_b, opt_b, sched_b, batches[16:])

    for (n, p), q in zip(model.named_parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q), f"{n} differs after resuming"
    assert opt_b.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_state_dtypes_survive_loading():
    """torch's loader casts float state to the parameter dtype; float32 state of bf16 parameters must stay float32."""
    model, opt, sched = make("stable_spam", {"state_dtype": "float32"}, torch.bfloat16)
    train(model, opt, sched, [torch.randint(0, 24, (2, 5)) for _ in range(3)])
    model_b, opt_b, _ = make("stable_spam", {"state_dtype": "float32"}, torch.bfloat16)
    opt_b.load_state_dict(opt.state_dict())
    for p in model_b.parameters():
        state = opt_b.state[p]
        assert p.dtype == torch.bfloat16
        assert state["exp_avg"].dtype == torch.float32
        assert state["clip_threshold"].dtype == torch.float32
        assert state["gn_mean"].dtype == torch.float32


def test_wrapper_shares_param_groups_after_loading():
    model, opt, sched = make("lion+adagn+adaclip", {}, torch.float32)
    train(model, opt, sched, [torch.randint(0, 24, (2, 5)) for _ in range(2)])
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups is opt.base.param_groups
    opt.param_groups[0]["lr"] = 0.123
    assert opt.base.param_groups[0]["lr"] == 0.123
