"""Your own optimizer through the papers' tests: suites, --add-optimizer, every task, and an installed package run
end to end through Ray Tune and MLflow."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

import optimizers
from bench.suite import Suite, SuiteError, add_optimizers, expand, load, load_trials, parse_added
from tasks.base import LocalContext
from tests.conftest import Bench
from tests.optimizers.test_opt_plugins import HERE, SignMomentum

SIGN = f"{HERE}:SignMomentum"


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


# --- suites and --add-optimizer ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "name", "hparams"), [
    ("myopt", "myopt", {}),
    ("myopt:lr=1e-3", "myopt", {"lr": 1e-3}),
    ("mypkg.opt:MyOpt", "mypkg.opt:MyOpt", {}),
    ("mypkg.opt:MyOpt:lr=[1e-4,3e-4], betas=[[0.9,0.95]]", "mypkg.opt:MyOpt",
     {"lr": [1e-4, 3e-4], "betas": [[0.9, 0.95]]}),
    ("adam+gradclip:max_norm=0.5", "adam+gradclip", {"max_norm": 0.5}),
])
def test_add_optimizer_syntax(text: str, name: str, hparams: dict) -> None:
    entry = parse_added(text)
    assert (entry.name, entry.hparams, entry.label) == (name, hparams, text)


def test_add_optimizer_bad_syntax() -> None:
    with pytest.raises(SuiteError, match="expected NAME"):
        parse_added(":lr=1")


def test_added_row_joins_every_table_with_the_papers_seeds(caplog: pytest.LogCaptureFixture) -> None:
    suite, _, _ = load("mini")
    with caplog.at_level(logging.WARNING, logger="bench.suite"):
        _, trials = load_trials("mini", added=[SIGN])
    ours = [t for t in trials if t.row == SIGN]
    assert ours and all(t.spec.optimizer == SIGN for t in ours)
    # every table but the studies of SPAM's and Stable-SPAM's own hyperparameters, which set names SignMomentum does
    # not take
    own = {"sensitivity_stable_spam", "sensitivity_spam"}
    tables = {e.table for e in suite.experiments}
    assert {t.table for t in ours} == tables - own
    assert "sensitivity_stable_spam" in caplog.text and "gamma1" in caplog.text
    for exp in suite.experiments:
        if exp.table in own:
            continue
        mine = {t.spec.seed for t in ours if t.table == exp.table}
        assert set(exp.seeds) <= mine  # the papers' rows' seeds
    # its own default lr where the experiment sets none; the experiment's lr grid where it sets one
    llm = [t for t in ours if t.table == "llm_pretrain_bf16"]
    assert {t.spec.hparams["lr"] for t in llm} == {3e-3}
    finetune = {t.spec.hparams["lr"] for t in ours if t.table == "finetune_commonsense"}
    assert finetune == {1e-4, 2e-4, 5e-4, 1e-5, 2e-5, 5e-5}
    assert {t.task for t in (t.spec for t in ours)} == {"llm_pretrain", "rl", "forecasting", "finetune"}


def test_added_row_takes_its_hyperparameters_and_grid() -> None:
    _, trials = load_trials("smoke", added=[f"{SIGN}:lr=[1e-3,3e-3],beta=0.8"])
    ours = [t for t in trials if t.spec.optimizer == SIGN and t.table == "llm_pretrain_bf16"]
    assert sorted(t.spec.hparams["lr"] for t in ours) == [1e-3, 3e-3]
    assert {t.spec.hparams["beta"] for t in ours} == {0.8}
    assert sorted(t.point["lr"] for t in ours) == [1e-3, 3e-3]  # its grid shows as its own columns


@pytest.mark.parametrize(("added", "message"), [
    (f"{SIGN}:betas=[[0.9,0.99]]", r"has no hyperparameter 'betas'; valid: beta, lr"),
    ("no_such_module_xyz:Opt", "importing module 'no_such_module_xyz' failed"),
    (f"{HERE}:NotAnOptimizer", "not a torch.optim.Optimizer subclass"),
    (f"{HERE}:Plain+moret", "bench_state"),
    ("spam", "already has a row 'spam'"),
])
def test_add_optimizer_errors_before_any_trial(added: str, message: str) -> None:
    suite, _, _ = load("smoke")
    with pytest.raises(SuiteError, match=message):
        add_optimizers(suite, [added])


def test_user_optimizers_in_suite_yaml(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: mine
        experiments:
          - task: llm_pretrain
            optimizers:
              - adamw
              - "{SIGN}"
              - {{name: "{SIGN}+adagn+adaclip", label: sign+adagn+adaclip, hparams: {{gamma1: 0.8}}}}
          - task: llm_pretrain
            hparams: {{lr: 1e-2}}
            optimizers: ["{HERE}:sgd_factory"]
          - task: llm_pretrain
            optimizers: [{{name: "{SIGN}", hparams: {{nope: 1}}}}]
        """))
    with pytest.raises(SuiteError, match=r"mine.yaml:12: experiments.2.optimizers.0: .*has no hyperparameter 'nope'"):
        load_trials(str(path))
    suite, _, _ = load(str(path))
    trials = expand(Suite(name="mine", experiments=suite.experiments[:2]))
    by_row = {t.row: t.spec for t in trials}
    assert by_row[SIGN].hparams == {"lr": 3e-3}
    assert by_row["sign+adagn+adaclip"].hparams == {"lr": 3e-3, "gamma1": 0.8}
    assert by_row[f"{HERE}:sgd_factory"].hparams == {"lr": 1e-2}


def test_sweep_takes_each_optimizers_own_lr_grid_unless_given() -> None:
    from bench.cli import DEFAULT_LRS, sweep_lrs

    default = [float(v) for v in DEFAULT_LRS.split(",")]
    assert sweep_lrs(["adamw", SIGN], None) == {"adamw": default, SIGN: [1e-3, 3e-3]}
    assert sweep_lrs(["adamw", SIGN], "0.1") == {"adamw": [0.1], SIGN: [0.1]}


@pytest.mark.slow
def test_cli_errors_exit_2_without_traceback_or_files(bench: Bench) -> None:
    for args in (["run", "--suite", "smoke", "--add-optimizer", "no_such_module_xyz:Opt"],
                 ["run", "--suite", "smoke", "--add-optimizer", f"{SIGN}:betas=1"],
                 ["sweep", "--task", "rl", "--optimizer", f"adam,{HERE}:NotAnOptimizer"]):
        result = bench(*args)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Traceback" not in result.stderr and "error:" in result.stderr
    assert not bench.home.exists() and not (bench.root / "results").exists()


# --- every task takes a user optimizer the way it takes a built-in name -----------------------------------------


def test_llm_pretrain_with_a_user_optimizer() -> None:
    from tasks.llm_pretrain.task import LLMPretrainTask

    task = LLMPretrainTask()
    ctx = LocalContext(seed=0, device="cpu")
    cfg = task.config("smoke", {"steps": 6, "warmup_steps": 2, "eval_every": 6, "checkpoint_every": 6, "log_every": 2})
    result = task.run(cfg, f"{SIGN}+adaclip", {"beta": 0.8}, ctx)
    assert result["val_perplexity"] > 1
    assert ctx.params["opt.optimizer"] == f"{SIGN}+adaclip" and ctx.params["opt.beta"] == 0.8
    assert ctx.params["opt.lr"] == cfg.lr  # the task's lr, as for built-in names


def test_rl_with_a_user_optimizer() -> None:
    pytest.importorskip("mujoco")
    from tasks.rl.task import RLTask
    from tasks.rl.trainer import RLTrial

    cfg = RLTask().config("smoke", {"epochs": 1, "steps_per_epoch": 256, "n_steps": 256, "n_epochs": 1,
                                    "eval_episodes": 1})
    trial = RLTrial.create(cfg, SIGN, {"lr": 1e-3, "beta": 0.7}, seed=0, device="cpu")
    try:
        opt = trial.model.policy.optimizer
        assert type(opt) is SignMomentum and opt.param_groups[0]["beta"] == 0.7
        trial.train_epoch()
        assert len(opt.state) > 0
    finally:
        trial.close()


@pytest.mark.slow
def test_forecasting_with_a_user_optimizer() -> None:
    from tasks.forecasting import ForecastingTask

    task = ForecastingTask()
    ctx = LocalContext(seed=0, device="cpu")
    result = task.run(task.config("smoke", {"epochs": 1}), SIGN, {"lr": 1e-3, "beta": 0.7}, ctx)
    assert result["test_mse"] >= 0
    assert any(v == SIGN for v in ctx.params.values())
    assert any(k.endswith("beta") and v == 0.7 for k, v in ctx.params.items())


def test_finetune_with_a_user_optimizer() -> None:
    from tasks.finetune import FinetuneTask
    from tasks.finetune.training import FinetuneTrial

    cfg = FinetuneTask().config("smoke-lora", {"steps": 2, "warmup_steps": 1, "max_eval_examples": 4})
    trial = FinetuneTrial.create(cfg, f"{SIGN}+gradclip", {"lr": 5e-3}, seed=0)
    assert isinstance(trial.optimizer, optimizers.ComponentWrapper)
    assert trial.resolved["lr"] == 5e-3 and trial.resolved["max_norm"] == 1.0
    before = {n: p.detach().clone() for n, p in trial.trainable().items()}
    trial.train_step()
    trial.train_step()  # the first step is at lr 0, the start of the warmup
    assert any(not torch.equal(p.detach(), before[n]) for n, p in trial.trainable().items())


# --- an installed package, end to end ---------------------------------------------------------------------------

PACKAGE = {
    "pyproject.toml": """\
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "bench-tiny-sign"
        version = "0.1.0"

        [tool.setuptools]
        py-modules = ["tiny_sign"]

        [project.entry-points."bench.optimizers"]
        tiny_sign = "tiny_sign:TinySign"
        """,
    "tiny_sign.py": '''\
        """Signed momentum: a user optimizer in its own package."""
        import torch


        class TinySign(torch.optim.Optimizer):
            bench_defaults = {"lr": 2e-3}
            bench_state = {"moments": ["buf"], "step": None}

            def __init__(self, params, lr=1e-2, beta=0.9):
                super().__init__(params, {"lr": lr, "beta": beta})

            @torch.no_grad()
            def step(self, closure=None):
                loss = None
                if closure is not None:
                    with torch.enable_grad():
                        loss = closure()
                for group in self.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            buf = self.state[p].setdefault("buf", torch.zeros_like(p))
                            buf.mul_(group["beta"]).add_(p.grad, alpha=1 - group["beta"])
                            p.add_(buf.sign(), alpha=-group["lr"])
                return loss
        ''',
}


@pytest.mark.slow
def test_installed_package_runs_a_smoke_table_through_tune_and_mlflow(tmp_path: Path) -> None:
    source, site = tmp_path / "src", tmp_path / "site"
    source.mkdir()
    for name, text in PACKAGE.items():
        (source / name).write_text(textwrap.dedent(text))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(source)], check=True, capture_output=True, timeout=300)
    assert (site / "tiny_sign.py").exists()
    suite = tmp_path / "table.yaml"
    suite.write_text(textwrap.dedent("""\
        name: byo
        experiments:
          - {task: llm_pretrain, preset: smoke, table: llm_pretrain_bf16, column: tiny,
             overrides: {steps: 20, eval_every: 10, checkpoint_every: 10},
             optimizers: [{name: adamw, label: adam}, tiny_sign+adagn+adaclip]}
        """))
    b = Bench(tmp_path / "run")
    b.root.mkdir()
    b.env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [b.env.get("PYTHONPATH")])])
    listed = b("list", "optimizers")
    assert "tiny_sign [entry point tiny_sign:TinySign of bench-tiny-sign]" in listed.stdout
    result = b("run", "--suite", str(suite), "--add-optimizer", "tiny_sign:beta=0.8", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(b.uri)
    runs = client.search_runs([client.get_experiment_by_name("bench-byo").experiment_id],
                              filter_string="tags.`bench.role` = 'trial'")
    mine = [r for r in runs if r.data.tags["bench.optimizer"] == "tiny_sign"]
    assert len(runs) == 3 and len(mine) == 1 and {r.data.tags["bench.status"] for r in runs} == {"finished"}
    for r in mine:  # the resolved hyperparameters, read back from the optimizer at step 0
        assert r.data.params["opt.optimizer"] == "tiny_sign" and r.data.params["opt.beta"] == "0.8"
        assert r.data.params["opt.lr"] == "0.002" and "bench-tiny-sign 0.1.0" in r.data.params["opt.source"]
        assert r.data.metrics["final.val_perplexity"] > 1
    board = (b.root / "results" / "byo" / "llm_pretrain_bf16.md").read_text()
    assert "tiny_sign:beta=0.8" in board and "tiny_sign+adagn+adaclip" in board and "| adam |" in board
