"""User optimizers through the registry: module:attr names, entry points, hyperparameters, components, errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import optimizers
from optimizers import OptimizerConfigError, plugins

torch.set_num_threads(1)
HERE = "tests.optimizers.test_opt_plugins"


class SignMomentum(torch.optim.Optimizer):
    """Sign of an EMA of the gradient (a small user optimizer with its own defaults and state layout)."""

    bench_defaults = {"lr": 3e-3}
    bench_lr_grid = [1e-3, 3e-3]
    bench_state = {"moments": ["buf"], "step": None}

    def __init__(self, params: Any, lr: float = 1e-2, beta: float = 0.9) -> None:
        super().__init__(params, {"lr": lr, "beta": beta})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:  # torch's contract, which Lightning relies on
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("buf", torch.zeros_like(p))
                buf.mul_(group["beta"]).add_(p.grad, alpha=1 - group["beta"])
                p.add_(buf.sign(), alpha=-group["lr"])
        return loss


class Plain(torch.optim.SGD):
    """No declarations: moret is not defined over it."""


def sgd_factory(params: Any, **hparams: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, **hparams)


def not_an_optimizer_factory(params: Any, lr: float = 0.1) -> list:
    return list(params)


class NotAnOptimizer:
    def __init__(self, params: Any, lr: float = 0.1) -> None:
        self.params = params


@pytest.fixture(autouse=True)
def fresh_plugins() -> Iterator[None]:
    """Entry points and loaded user optimizers are cached per process; each test starts without them."""
    plugins.installed.cache_clear()
    plugins._baseline.cache_clear()
    yield
    plugins.installed.cache_clear()
    plugins._baseline.cache_clear()


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def train(opt: torch.optim.Optimizer, m: nn.Module, steps: int = 30) -> list[float]:
    torch.manual_seed(1)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(m(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_import_path_class_builds_trains_and_reads_back() -> None:
    name = f"{HERE}:SignMomentum"
    s = optimizers.spec(name)
    assert s.name == name and s.accepts == {"lr", "beta"} and not s.accepts_any
    assert s.defaults == {"lr": 3e-3, "beta": 0.9}  # bench_defaults over the signature's
    m = model()
    opt = optimizers.build(name, m, beta=0.8)
    assert type(opt) is SignMomentum and opt.registry_info.name == name
    losses = train(opt, m)
    assert losses[-1] < losses[0]
    resolved = optimizers.resolved_hparams(opt)
    assert resolved["optimizer"] == name and resolved["lr"] == 3e-3 and resolved["beta"] == 0.8
    assert "test_opt_plugins.py" in resolved["source"]
    assert optimizers.verify(opt, name, {"beta": 0.8})["beta"] == 0.8


def test_unknown_hyperparameter_is_refused_naming_the_valid_ones() -> None:
    with pytest.raises(OptimizerConfigError, match=r"'betas'.*valid hyperparameters: beta, lr"):
        optimizers.build(f"{HERE}:SignMomentum", model(), betas=(0.9, 0.99))


def test_factory_with_kwargs_accepts_any_name_and_takes_lr() -> None:
    name = f"{HERE}:sgd_factory"
    s = optimizers.spec(name)
    assert s.accepts_any and "lr" in s.accepts
    opt = optimizers.build(name, model(), lr=0.05, momentum=0.5)
    assert isinstance(opt, torch.optim.SGD)
    assert optimizers.verify(opt, name, {"lr": 0.05, "momentum": 0.5})["momentum"] == 0.5


def test_components_compose_over_a_user_optimizer() -> None:
    name = f"{HERE}:SignMomentum+adagn+adaclip"
    s = optimizers.spec(name)
    assert {"lr", "beta", "gamma1", "gamma2", "gamma3"} <= s.accepts
    m = model()
    opt = optimizers.build(name, m, gamma1=0.8)
    assert isinstance(opt, optimizers.ComponentWrapper) and isinstance(opt.base, SignMomentum)
    train(opt, m, steps=5)
    resolved = optimizers.resolved_hparams(opt)
    assert resolved["components"] == "adaclip+adagn" and resolved["gamma1"] == 0.8 and resolved["beta"] == 0.9
    assert all("clip_threshold" in opt.state[p] for p in m.parameters())


def test_moret_resets_the_moments_a_user_optimizer_declares() -> None:
    m = model()
    opt = optimizers.build(f"{HERE}:SignMomentum+moret", m, reset_interval=3)
    train(opt, m, steps=2)
    assert all(opt.base.state[p]["buf"].abs().sum() > 0 for p in m.parameters())
    train(opt, m, steps=1)  # step 3: Stable-SPAM's mode zeroes the moments after the base's update
    assert all(opt.base.state[p]["buf"].abs().sum() == 0 for p in m.parameters())


def test_moret_without_a_state_layout_is_a_clear_error() -> None:
    with pytest.raises(OptimizerConfigError, match="bench_state"):
        optimizers.spec(f"{HERE}:Plain+moret")
    assert optimizers.spec(f"{HERE}:Plain+gradclip").components == ("gradclip",)


@pytest.mark.parametrize(("name", "message"), [
    ("no_such_module_xyz:Opt", "importing module 'no_such_module_xyz' failed: ModuleNotFoundError"),
    (f"{HERE}:Missing", "has no attribute 'Missing'"),
    (f"{HERE}:NotAnOptimizer", "not a torch.optim.Optimizer subclass"),
    (f"{HERE}:HERE", "is a str, not a torch.optim.Optimizer subclass or a factory"),
    (f"{HERE}:SignMomentum+warp", "among moret, gradclip"),
    (f"{HERE}:SignMomentum+adaclip+adaclip", "each at most once"),
    (":SignMomentum", "module:attribute"),
])
def test_bad_user_optimizers_are_config_errors(name: str, message: str) -> None:
    with pytest.raises(OptimizerConfigError, match=message):
        optimizers.spec(name)


def test_a_factory_that_returns_no_optimizer_fails_at_build() -> None:
    with pytest.raises(OptimizerConfigError, match="returned a list, not a torch.optim.Optimizer"):
        optimizers.build(f"{HERE}:not_an_optimizer_factory", model())


def test_module_failing_at_import_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_user_opt.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(OptimizerConfigError, match="RuntimeError: boom at import"):
        optimizers.spec("broken_user_opt:Opt")


def test_bad_declarations_are_config_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "declares_badly.py").write_text(
        "import torch\n"
        "class UnknownDefault(torch.optim.SGD):\n    bench_defaults = {'gamma': 1.0}\n"
        "class BadGrid(torch.optim.SGD):\n    bench_lr_grid = [1e-3, -1]\n"
        "class BadState(torch.optim.SGD):\n    bench_state = {'moments': 'momentum_buffer'}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for attr, message in (("UnknownDefault", "bench_defaults"), ("BadGrid", "bench_lr_grid"),
                          ("BadState", "bench_state")):
        with pytest.raises(OptimizerConfigError, match=message):
            optimizers.spec(f"declares_badly:{attr}")


def fake_distribution(root: Path, entry_points: dict[str, str]) -> None:
    """An installed distribution as importlib.metadata sees it: a dist-info folder with entry_points.txt."""
    info = root / "user_opts-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: user-opts\nVersion: 0.1\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{plugins.GROUP}]\n{lines}\n")


def test_entry_points_register_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_distribution(tmp_path, {"Sign-Momentum": f"{HERE}:SignMomentum", "adam": f"{HERE}:Plain",
                                 "broken": "no_such_module_xyz:Opt"})
    monkeypatch.syspath_prepend(str(tmp_path))
    assert set(plugins.installed()) == {"sign_momentum", "broken"}  # built-in names are not taken over
    s = optimizers.spec("sign_momentum+adaclip")
    assert s.name == "sign_momentum+adaclip" and "user-opts 0.1" in s.source
    assert optimizers.spec("Sign-Momentum").defaults["lr"] == 3e-3
    assert type(optimizers.build("adam", model())) is torch.optim.Adam
    assert plugins.lr_grid("sign_momentum") == [1e-3, 3e-3] and plugins.lr_grid("adam") == []
    assert plugins.own_defaults("sign_momentum") == {"lr": 3e-3} and plugins.own_defaults("spam") == {}
    with pytest.raises(OptimizerConfigError, match="entry point 'no_such_module_xyz:Opt'.*failed to load"):
        optimizers.spec("broken")
    with pytest.raises(OptimizerConfigError, match=r"valid names: .*sign_momentum.*module:Optimizer"):
        optimizers.spec("no_such_name")


def test_optimizer_class_serves_libraries_that_construct_it() -> None:
    cls = optimizers.optimizer_class(f"{HERE}:SignMomentum", beta=0.7)
    opt = cls(model().parameters(), lr=0.01)
    assert type(opt) is SignMomentum and opt.param_groups[0]["beta"] == 0.7 and opt.param_groups[0]["lr"] == 0.01
