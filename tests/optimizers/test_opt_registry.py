"""The registry: one table of entries drives build/step/loss tests; strictness; provenance; optimizer_class."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import optimizers
from optimizers import OptimizerConfigError

torch.set_num_threads(1)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(d)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.up_proj = nn.Linear(d, 2 * d, bias=False)
        self.down_proj = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.input_layernorm(x)
        att = torch.softmax(self.q_proj(h) @ self.k_proj(h).transpose(-1, -2) / 4, -1) @ self.v_proj(h)
        x = x + self.o_proj(att)
        return x + self.down_proj(F.silu(self.up_proj(x)))


class TinyLM(nn.Module):
    """A LLaMA-shaped toy: embedding, one block with q/k/v/o and MLP projections, a norm, an untied head."""

    def __init__(self, vocab: int = 32, d: int = 16) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([Block(d)])
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def loss_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(ids[:, :-1]).float().flatten(0, 1), ids[:, 1:].flatten())


# One table: every name the registry lists, and compositions over every base with every component.
ENTRIES: list[tuple[str, dict]] = [
    ("adam", {}),
    ("adamw", {}),
    ("sgd", {"lr": 0.05}),
    ("lion", {"lr": 3e-4}),
    ("adafactor", {}),
    ("adam_mini", {"dim": 16, "n_heads": 2}),
    ("galore_adamw", {"rank": 4, "update_proj_gap": 10}),
    ("spam", {"reset_interval": 10, "warmup_steps": 3}),
    ("spam", {"density": 0.5, "state_dtype": "float32", "reset_interval": 10, "warmup_steps": 3}),
    ("stable_spam", {"reset_interval": 10, "total_steps": 25}),
    ("stable_spam", {"variant": "clean", "state_dtype": "float32", "reset_interval": 10}),
    ("adam_gradclip", {}),
    ("lion+adagn+adaclip", {"lr": 3e-4}),
    ("adam_mini+adagn+adaclip", {"dim": 16, "n_heads": 2}),
    ("adam+moret", {"reset_interval": 10}),
    ("adam+moret+adaclip", {"reset_interval": 10}),
    ("adam+moret+adagn", {"reset_interval": 10}),
    ("adam+moret+adagn+adaclip", {"reset_interval": 10}),
    ("adam+moret+adagn+spikeclip", {"reset_interval": 10}),
    ("adam+moret+gradclip+adaclip", {"reset_interval": 10}),
    ("adamw+moret+spikeclip", {"adam_form": "spam", "moret_mode": "spam", "reset_interval": 10, "warmup_steps": 3,
                               "density": 0.5}),
    ("adam+gradclip+spikeclip", {"state_dtype": "float32", "weight_decay": 0.01}),
    ("sgd+moret+spikeclip+gradclip", {"lr": 0.05, "reset_interval": 10, "moret_mode": "clean"}),
    ("lion+moret+spikeclip", {"lr": 3e-4, "reset_interval": 10, "warmup_steps": 3, "moret_mode": "spam"}),
    ("adafactor+moret+adaclip+adagn", {"reset_interval": 10, "state_dtype": "float32"}),
    ("adam_mini+moret+gradclip", {"dim": 16, "n_heads": 2, "reset_interval": 10}),
    ("galore_adamw+moret+adaclip", {"rank": 4, "reset_interval": 10}),
]


def test_table_covers_every_listed_name():
    assert {name for name, _ in ENTRIES} >= set(optimizers.available())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,hparams", ENTRIES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(ENTRIES)])
def test_entry_builds_steps_and_lowers_loss(name, hparams, dtype):
    torch.manual_seed(0)
    model = TinyLM().to(dtype)
    ids = torch.randint(0, 32, (4, 9))
    opt = optimizers.build(name, model, **hparams)
    assert isinstance(opt, torch.optim.Optimizer)
    first = None
    for _ in range(25):
        opt.zero_grad()
        loss = loss_of(model, ids)
        loss.backward()
        first = loss.item() if first is None else first
        grads = {p: (p.grad, p.grad.clone()) for p in model.parameters()}
        opt.step()
        for p, (obj, before) in grads.items():
            assert p.grad is obj, "step() must leave the caller's gradient tensor in place"
            assert torch.equal(p.grad, before), "step() must not modify p.grad"
    final = loss_of(model, ids).item()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(p.dtype == dtype for p in model.parameters())
    assert final < first - 0.05, f"{name}: loss {first:.3f} -> {final:.3f}"


@pytest.mark.parametrize("name,hparams", ENTRIES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(ENTRIES)])
def test_resolved_hparams_report_every_accepted_hparam(name, hparams):
    model = TinyLM()
    opt = optimizers.build(name, model, **hparams)
    resolved = optimizers.resolved_hparams(opt)
    s = optimizers.spec(name)
    assert resolved["optimizer"] == s.name
    assert resolved["source"] == s.source
    expected = {**s.defaults, **hparams}
    for key in s.accepts:
        if key in ("dim", "n_heads", "n_kv_heads") and expected[key] is None:
            assert resolved[key] is not None
            continue
        assert key in resolved, f"{key} missing from resolved_hparams"
        want = tuple(expected[key]) if isinstance(expected[key], list) else expected[key]
        assert resolved[key] == want, f"{key}: requested {want!r}, resolved {resolved[key]!r}"
    for value in resolved.values():
        assert value is None or isinstance(value, (bool, int, float, str, tuple))


def test_provenance_of_each_entry():
    catalog = optimizers.catalog()
    assert catalog["adam"].startswith("torch ")
    assert catalog["adafactor"].startswith("transformers ")
    assert catalog["adam_mini"].startswith("adam-mini ")
    assert catalog["lion"].startswith("lion-pytorch ")
    assert catalog["galore_adamw"].startswith("galore-torch ")
    assert catalog["spam"].startswith("in-house")
    assert catalog["stable_spam"].startswith("in-house")
    assert "lion-pytorch" in catalog["lion+adagn+adaclip"]


def test_spec_interface():
    s = optimizers.spec("stable_spam")
    assert s.defaults["gamma1"] == 0.7 and s.defaults["reset_interval"] == 1000 and s.defaults["eps"] == 1e-8
    assert {"lr", "gamma1", "gamma2", "gamma3", "total_steps", "variant", "state_dtype"} <= s.accepts
    assert s.needs_model is False
    assert optimizers.spec("adam_mini").needs_model is True
    spam = optimizers.spec("spam")
    assert spam.defaults == {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.0,
                             "reset_interval": 500, "warmup_steps": 150, "threshold": 5000.0, "density": 1.0,
                             "state_dtype": "param", "seed": 0}
    composite = optimizers.spec("Adam + MoRet + AdaGN + AdaClip")
    assert composite.name == "adam+moret+adagn+adaclip"
    assert composite.components == ("moret", "adagn", "adaclip")
    assert {"reset_interval", "moret_mode", "gamma1", "gamma3", "state_dtype"} <= composite.accepts
    assert "threshold" not in composite.accepts


PAPER_ROWS = {
    # Stable-SPAM Table 3 and Table 4, and the optimizers of Tables 1 and 2.
    "lion", "lion+adagn+adaclip", "adam_mini", "adam_mini+adagn+adaclip", "adam", "adam+moret",
    "adam+moret+adaclip", "adam+moret+adagn", "adam+moret+adagn+adaclip", "adam+moret+adagn+spikeclip",
    "adam+moret+gradclip+adaclip", "adam_gradclip", "adafactor", "spam", "stable_spam",
}


@pytest.mark.parametrize("name", sorted(PAPER_ROWS))
def test_every_paper_row_builds_by_name(name):
    hp = {"dim": 16, "n_heads": 2} if name.startswith("adam_mini") else {}
    opt = optimizers.build(name, TinyLM(), **hp)
    assert optimizers.resolved_hparams(opt)["optimizer"] == name


def test_unknown_name_lists_valid_choices():
    with pytest.raises(OptimizerConfigError) as err:
        optimizers.build("adamx", TinyLM())
    msg = str(err.value)
    assert "'adamx'" in msg and "stable_spam" in msg and "adafactor" in msg and "moret" in msg


def test_unknown_component_and_base():
    with pytest.raises(OptimizerConfigError, match="'gnclip'.*valid components: moret"):
        optimizers.spec("adam+moret+gnclip")
    with pytest.raises(OptimizerConfigError, match="unknown base optimizer 'spamm'.*valid bases"):
        optimizers.spec("spamm+moret")
    with pytest.raises(OptimizerConfigError, match="twice"):
        optimizers.spec("adam+moret+moret")
    with pytest.raises(OptimizerConfigError, match="no component"):
        optimizers.spec("adam+")


def test_unknown_hparam_is_named_with_the_valid_ones():
    with pytest.raises(OptimizerConfigError) as err:
        optimizers.build("spam", TinyLM(), gamma1=0.5)
    msg = str(err.value)
    assert "'gamma1'" in msg and "reset_interval" in msg and "warmup_steps" in msg
    with pytest.raises(OptimizerConfigError, match="'threshold'"):
        optimizers.build("adam+moret+adagn", TinyLM(), threshold=10.0)
    with pytest.raises(OptimizerConfigError, match="'lr_decay'"):
        optimizers.optimizer_class("lion", lr_decay=0.1)


def test_adam_mini_needs_the_model():
    with pytest.raises(OptimizerConfigError, match="nn.Module"):
        optimizers.build("adam_mini", list(TinyLM().parameters()))


def test_param_groups_roles():
    model = TinyLM()
    groups = optimizers.param_groups(model)
    roles = {g["role"]: {id(p) for p in g["params"]} for g in groups}
    block = model.layers[0]
    matrix = {id(m.weight) for m in (block.q_proj, block.k_proj, block.v_proj, block.o_proj, block.up_proj,
                                     block.down_proj)}
    assert roles["matrix"] == matrix
    assert id(model.embed_tokens.weight) in roles["other"]
    assert id(model.lm_head.weight) in roles["other"]
    assert id(block.down_proj.bias) in roles["other"]
    assert len(roles["matrix"]) + len(roles["other"]) == len(list(model.parameters()))


def test_density_applies_to_the_matrix_group_only():
    model = TinyLM()
    opt = optimizers.build("spam", model, density=0.25)
    loss_of(model, torch.randint(0, 32, (2, 5))).backward()
    opt.step()
    block = model.layers[0]
    assert opt.state[block.q_proj.weight]["subset"].numel() == int(0.25 * 16 * 16)
    assert "subset" not in opt.state[model.embed_tokens.weight]
    assert "subset" not in opt.state[model.lm_head.weight]
    assert optimizers.resolved_hparams(opt)["density"] == 0.25


def test_galore_projects_the_matrix_group_only():
    model = TinyLM()
    opt = optimizers.build("galore_adamw", model, rank=4)
    by_role = {g["role"]: g for g in opt.param_groups}
    assert by_role["matrix"]["rank"] == 4
    assert "rank" not in by_role["other"]


@pytest.mark.parametrize("style", ["positional", "keyword"])
def test_optimizer_class_for_libraries_that_build_it(style):
    cls = optimizers.optimizer_class("stable_spam", gamma1=0.6, reset_interval=50)
    assert issubclass(cls, torch.optim.Optimizer)
    model = nn.Linear(4, 2)
    if style == "positional":  # stable-baselines3: cls(params, lr=..., **kwargs)
        opt = cls(model.parameters(), lr=3e-4, eps=1e-6)
    else:  # neuralforecast: cls(params=..., lr=..., **kwargs)
        opt = cls(params=model.parameters(), lr=3e-4, eps=1e-6)
    assert isinstance(opt, optimizers.StableSPAM)
    resolved = optimizers.resolved_hparams(opt)
    assert (resolved["lr"], resolved["eps"], resolved["gamma1"], resolved["reset_interval"]) == (3e-4, 1e-6, 0.6, 50)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()


def test_optimizer_class_call_keywords_win_and_unknown_fail():
    cls = optimizers.optimizer_class("lion", lr=1e-4)
    opt = cls(nn.Linear(2, 2).parameters(), lr=5e-4)
    assert opt.param_groups[0]["lr"] == 5e-4
    with pytest.raises(OptimizerConfigError, match="'momentum'"):
        cls(nn.Linear(2, 2).parameters(), momentum=0.9)


def test_group_dicts_and_plain_tensors():
    a, b = torch.randn(3, 3, requires_grad=True), torch.randn(3, requires_grad=True)
    opt = optimizers.build("stable_spam", [{"params": [a], "lr": 1e-2}, {"params": [b]}], lr=1e-3)
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 1e-3]
    resolved = optimizers.resolved_hparams(opt)
    assert resolved["lr/group0"] == 1e-2 and resolved["lr/group1"] == 1e-3
    opt = optimizers.build("spam", [a, b], density=0.5)
    (a.sum() + b.sum()).backward()
    opt.step()
    assert "subset" in opt.state[a] and "subset" not in opt.state[b]


def test_adam_mini_reads_dims_from_a_transformers_config():
    from types import SimpleNamespace

    model = TinyLM()
    model.config = SimpleNamespace(hidden_size=16, num_attention_heads=4, num_key_value_heads=2)
    resolved = optimizers.resolved_hparams(optimizers.build("adam_mini", model))
    assert (resolved["dim"], resolved["n_heads"], resolved["n_kv_heads"]) == (16, 4, 2)
    resolved = optimizers.resolved_hparams(optimizers.build("adam_mini", model, n_heads=2, n_kv_heads=None))
    assert (resolved["dim"], resolved["n_heads"], resolved["n_kv_heads"]) == (16, 2, 2)


def test_every_default_is_read_from_the_specs() -> None:
    """Registry names, SPAM/StableSPAM signatures and the wrapper's group values all take `specs`' values."""
    import inspect

    from optimizers import SPAM, StableSPAM
    from optimizers import specs as S

    for name, component in S.COMPONENT_SPECS.items():
        wanted = {k: h.default for k, h in component.hparams.items()}
        for base in ("adamw", "lion"):
            defaults = optimizers.spec(f"{base}+{name}").defaults
            assert {k: defaults[k] for k in wanted} == wanted
        package = {k: h.default for k, h in component.package_hparams.items()}
        assert package.items() <= optimizers.spec(f"lion+{name}").defaults.items()
    for cls, table in ((SPAM, S.SPAM_DEFAULTS), (StableSPAM, S.STABLE_SPAM_DEFAULTS)):
        signature = inspect.signature(cls.__init__).parameters
        assert {k: signature[k].default for k in table} == table
        assert {k: v for k, v in optimizers.spec(cls.__name__.lower().replace("stablespam", "stable_spam")
                                                 ).defaults.items() if k in table} == table


def test_component_values_are_checked_by_their_spec() -> None:
    with pytest.raises(ValueError, match=r"gamma3 must lie in \[0, 1\), got 1.5"):
        optimizers.build("lion+adaclip", [torch.zeros(2, requires_grad=True)], gamma3=1.5)
    with pytest.raises(ValueError, match="reset_interval must be a positive integer, got 0"):
        optimizers.build("adam+moret", [torch.zeros(2, requires_grad=True)], reset_interval=0)
