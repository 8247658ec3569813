"""The `paper` suite runs what the authors ran: every trial of the papers' LLM tables, expanded by the suite loader and
filled in as the task fills it, against one table of the authors' settings with their sources.

Sources: SPAM = TianjinYellow/SPAM-Optimizer at 67a96a0 (the release the paper's runs used), SS =
TianjinYellow/StableSPAM at 6a66da1, "Table N" = the Stable-SPAM paper. A value swept by an experiment (a grid axis)
is not compared. A new row, column or table of these tables fails until it is added here with its source.
"""

from __future__ import annotations

from typing import Any

import pytest

import optimizers
from bench.suite import Trial, load_trials
from tasks.base import fill_hparams

# Task settings of every LLM pre-training trial of the suite.
LLM_COMMON: dict[str, Any] = {
    "seq_len": 256,  # SPAM torchrun_main.py:50 (--max_length)
    "batch_size": 512,  # SPAM scripts/130m.sh:48, SS scripts_BF16/stablespam.sh:15 (--total_batch_size)
    "min_lr_ratio": 0.1,  # SPAM torchrun_main.py:54, SS utils/argparse.py:42
    "weight_decay": 0.0,  # SPAM scripts/130m.sh:51, SS scripts_BF16/stablespam.sh:20
    "eval_every": 1000,  # SPAM scripts/130m.sh:53, SS scripts_BF16/stablespam.sh:11
    "eval_tokens": 10_000_000,  # SPAM torchrun_main.py:117, SS utils/eval.py:39
    "quant_group_size": 256,  # SS FP4_scripts/350-stablespam-fp4.sh:21, utils/act_weight_quantization.py:160
}

ADAM = {"betas": (0.9, 0.999), "eps": 1e-8}  # torch.optim.Adam defaults: SPAM torchrun_main.py:354, SS setup.py:141
ADAFACTOR = {"eps": (1e-30, 1e-3), "clip_threshold": 1.0, "decay_rate": -0.8, "relative_step": False,
             "scale_parameter": False, "warmup_init": False}  # SPAM torchrun_main.py:364-375, SS setup.py:182-193
SPAM_OF_SPAM = {"reset_interval": 500, "warmup_steps": 150, "threshold": 5000.0,  # SPAM torchrun_main.py:84-88, :357
                "eps": 1e-6}  # SPAM galore_torch/SPAM.py:95
SPAM_OF_SS = {"reset_interval": 500, "warmup_steps": 150, "threshold": 2000.0,  # SS galore_torch/SPAM.py:99-100,
              "eps": 1e-6}  # utils/setup.py:176, main_pretrain.py:176, utils/argparse.py:61
STABLE_BF16 = {"gamma1": 0.85, "gamma2": 0.99999, "gamma3": 0.999,  # SS scripts_BF16/stablespam.sh:25-28
               "reset_interval": 1000, "eta_min": 0.5, "eps": 1e-8}  # SS utils/argparse.py:88
STABLE_4BIT = {"gamma1": 0.7, "gamma2": 0.9, "gamma3": 0.999,  # SS FP4_scripts/350-stablespam-fp4.sh:29-32,
               "reset_interval": 500, "eta_min": 0.5, "eps": 1e-8}  # INT4_scripts/350-stablespam-int4.sh:32-35
COMPONENT_GAMMAS = {"gamma1": 0.85, "gamma2": 0.999, "gamma3": 0.999}  # SS utils/argparse.py:84-86, setup.py:160-168
WARMUP_SPAM = {"warmup_steps": 1000}  # SPAM scripts/130m.sh:50; SS utils/argparse.py:32 (runs that do not set it)
WARMUP_SS = {"warmup_steps": 2000}  # SS scripts_BF16/stablespam.sh:17, FP4_scripts/350-stablespam-fp4.sh:16
SCHEDULED = "total_steps"  # marker: total_steps must equal the run's steps (SS ReadMe.MD:48); absent otherwise

# Columns: task settings (steps: SPAM scripts/130m.sh:49, scripts/350m.sh:49, SS scripts_BF16/stablespam.sh:18,
# FP4_scripts/350-stablespam-fp4.sh:17; 60M 10K and 1B 90K: Table 2's tokens) and the per-size lr of Table 7.
SIZES = {"60m": (10_000, 1e-3), "130m": (20_000, 8e-4), "350m": (60_000, 4e-4), "1b": (90_000, 2e-4)}
LOWBIT_LR = {"60m": 1e-3, "130m": 1e-3, "350m": 5e-4, "1b": 5e-4}  # the baselines' lrs of Table 1 (4-bit presets)


def _bf16_column(size: str) -> dict[str, Any]:
    return {"model_size": size, "quant": "none", "steps": SIZES[size][0]}


def _lowbit_column(fmt: str, size: str, steps: int = 20_000) -> dict[str, Any]:
    return {"model_size": size, "quant": fmt, "steps": steps}


# (table, row) -> (registry name, optimizer settings, task settings, source); a (table, row, column) key overrides.
Expect = tuple[str, dict[str, Any], dict[str, Any], str]
ROWS: dict[tuple[str, ...], Expect] = {}
COLUMNS: dict[tuple[str, str], dict[str, Any]] = {}

# Stable-SPAM Table 2: SPAM's runs (repeating SPAM Table 1) and Stable-SPAM's BF16 runs.
for size, (_, lr) in SIZES.items():
    col = f"llama_{size}"
    COLUMNS["llm_pretrain_bf16", col] = _bf16_column(size)
    T = "llm_pretrain_bf16"
    ROWS[T, "adam", col] = ("adam", {**ADAM, "lr": lr}, WARMUP_SPAM, "SPAM torchrun_main.py:354")
    ROWS[T, "adam_gradclip", col] = ("adam+gradclip", {**ADAM, "lr": lr, "max_norm": 1.0}, WARMUP_SPAM,
                                      "SPAM torchrun_main.py:354, :447")
    ROWS[T, "adafactor", col] = ("adafactor", {**ADAFACTOR, "beta1": None, "lr": lr}, WARMUP_SPAM,
                                  "SPAM torchrun_main.py:75, :363-375")
    ROWS[T, "adam_mini", col] = ("adam_mini", {**ADAM, "lr": lr}, WARMUP_SPAM, "SS utils/setup.py:142-151")
    ROWS[T, "spam", col] = ("spam", {**SPAM_OF_SPAM, "lr": lr}, WARMUP_SPAM, "SPAM torchrun_main.py:357")
    ROWS[T, "stable_spam", col] = ("stable_spam", {**STABLE_BF16, "lr": lr, SCHEDULED: SCHEDULED}, WARMUP_SS,
                                    "SS scripts_BF16/stablespam.sh")

# Stable-SPAM Table 1: 4-bit, 20K steps, Stable-SPAM's runs.
for fmt in ("int4", "fp4"):
    for size in ("130m", "350m", "1b"):
        col, T = f"{fmt}_{size}", "llm_pretrain_4bit"
        COLUMNS[T, col] = _lowbit_column(fmt, size)
        lr = LOWBIT_LR[size]
        ROWS[T, "adam", col] = ("adam", {**ADAM, "lr": lr}, WARMUP_SPAM, "SS utils/setup.py:141")
        ROWS[T, "adam_gradclip", col] = ("adam+gradclip", {**ADAM, "lr": lr, "max_norm": 1.0}, WARMUP_SPAM,
                                          "SS utils/setup.py:141, main_pretrain.py:278-280")
        ROWS[T, "adafactor", col] = ("adafactor", {**ADAFACTOR, "beta1": 0.9, "lr": 2e-4 if size == "1b" else lr},
                                      WARMUP_SPAM, "SS utils/argparse.py:57, utils/setup.py:180-193")
        ROWS[T, "spam", col] = ("spam", {**SPAM_OF_SS, "lr": lr}, WARMUP_SPAM, "SS utils/setup.py:176")
        ROWS[T, "stable_spam", col] = ("stable_spam", {**STABLE_4BIT, "lr": SIZES[size][1], SCHEDULED: SCHEDULED},
                                        WARMUP_SS, "SS FP4_scripts/, INT4_scripts/, Table 7")
        ROWS[T, "adam_bf16", col] = ("adam", {**ADAM, "lr": LOWBIT_LR[size]},
                                      {**WARMUP_SPAM, "quant": "none", "model_size": size, "steps": 20_000},
                                      "Table 1 (BF16 Adam, 20K steps)")

# Stable-SPAM Table 3: Lion / Adam-mini with AdaGN + AdaClip, 4-bit, 10K steps.
for fmt in ("int4", "fp4"):
    for size in ("60m", "130m"):
        col, T = f"{fmt}_{size}", "llm_pretrain_4bit_components"
        COLUMNS[T, col] = _lowbit_column(fmt, size, 10_000)
        ROWS[T, "lion", col] = ("lion", {"lr": 1e-4, "betas": (0.9, 0.99)}, WARMUP_SPAM, "SS utils/setup.py:166")
        ROWS[T, "lion+adagn+adaclip", col] = ("lion+adagn+adaclip", {"lr": 1e-4, **COMPONENT_GAMMAS}, WARMUP_SPAM,
                                               "SS utils/setup.py:168, utils/lions.py")
        ROWS[T, "adam_mini", col] = ("adam_mini", {**ADAM, "lr": LOWBIT_LR[size]}, WARMUP_SPAM,
                                      "SS utils/setup.py:142-151")
        ROWS[T, "adam_mini+adagn+adaclip", col] = ("adam_mini+adagn+adaclip", {**COMPONENT_GAMMAS}, WARMUP_SPAM,
                                                    "SS utils/setup.py:152-163, galore_torch/adam_mini_ours.py")

# Stable-SPAM Table 4: ablation on LLaMA-60M, 10K steps; each column with Stable-SPAM's settings of its precision.
COLUMNS["llm_pretrain_ablation", "fp4"] = _lowbit_column("fp4", "60m", 10_000)
COLUMNS["llm_pretrain_ablation", "bf16"] = _bf16_column("60m")
for col, st, adam_warmup in (("fp4", STABLE_4BIT, WARMUP_SS), ("bf16", STABLE_BF16, WARMUP_SPAM)):
    T, lr = "llm_pretrain_ablation", {"lr": 1e-3}
    moret = {"reset_interval": st["reset_interval"], SCHEDULED: SCHEDULED, **lr}
    gn = {"gamma1": st["gamma1"], "gamma2": st["gamma2"]}
    ROWS[T, "adam", col] = ("adam", {**ADAM, **lr}, adam_warmup, "Table 4 (= Table 2's 60M Adam in BF16)")
    ROWS[T, "adam+moret", col] = ("adam+moret", moret, WARMUP_SS, "Table 4")
    ROWS[T, "adam+moret+adaclip", col] = ("adam+moret+adaclip", {**moret, "gamma3": 0.999}, WARMUP_SS, "Table 4")
    ROWS[T, "adam+moret+adagn", col] = ("adam+moret+adagn", {**moret, **gn}, WARMUP_SS, "Table 4")
    ROWS[T, "adam+moret+adagn+adaclip", col] = ("adam+moret+adagn+adaclip", {**moret, **gn, "gamma3": 0.999},
                                                 WARMUP_SS, "Table 4 (= Stable-SPAM)")
    ROWS[T, "adam+moret+adagn+spikeclip", col] = ("adam+moret+adagn+spikeclip", {**moret, **gn, "threshold": 2000.0},
                                                   WARMUP_SS, "Table 4; SS galore_torch/SPAM.py:100")
    ROWS[T, "adam+moret+gradclip+adaclip", col] = ("adam+moret+gradclip+adaclip",
                                                    {**moret, "gamma3": 0.999, "max_norm": 1.0}, WARMUP_SS, "Table 4")

# SPAM's own experiments: QAT, sparse momentum, the DeltaT / N / theta sweep; Stable-SPAM's sensitivity figures.
for T in ("qat_spam",):
    ROWS[T, "spam_w4a4"] = ROWS[T, "spam_w8a8"] = ("spam", SPAM_OF_SPAM, {}, "SPAM torchrun_main.py:357")
    ROWS[T, "adam_w4a4"] = ROWS[T, "adam_w8a8"] = ("adam", ADAM, {}, "SPAM torchrun_main.py:354")
ROWS["sensitivity_spam", "spam"] = ("spam", {**SPAM_OF_SPAM, "lr": 1e-3}, {**WARMUP_SPAM, **_bf16_column("60m")},
                                    "SPAM torchrun_main.py:357 (center)")
ROWS["sensitivity_lr", "spam"] = ("spam", SPAM_OF_SS, WARMUP_SS, "SS utils/setup.py:176")
ROWS["sensitivity_lr", "adafactor"] = ("adafactor", {**ADAFACTOR, "beta1": 0.9}, WARMUP_SS, "SS utils/argparse.py:57")
ROWS["sensitivity_lr", "stable_spam", "llama_130m_bf16"] = ("stable_spam", {**STABLE_BF16, SCHEDULED: SCHEDULED},
                                                            WARMUP_SS, "SS scripts_BF16/stablespam.sh")
ROWS["sensitivity_lr", "stable_spam", "llama_130m_fp4"] = ("stable_spam", {**STABLE_4BIT, SCHEDULED: SCHEDULED},
                                                           WARMUP_SS, "SS FP4_scripts/350-stablespam-fp4.sh")
ROWS["sensitivity_int_bits", "spam"] = ("spam", SPAM_OF_SS, WARMUP_SS, "SS utils/setup.py:176")
ROWS["sensitivity_int_bits", "stable_spam"] = ("stable_spam", {**STABLE_4BIT, "lr": 4e-4, SCHEDULED: SCHEDULED},
                                               WARMUP_SS, "SS INT4_scripts/350-stablespam-int4.sh")
ROWS["memory_sparse_momentum", "spam_d0.25"] = ("spam", {**SPAM_OF_SPAM, "density": 0.25}, WARMUP_SPAM,
                                                "SPAM torchrun_main.py:341, :357")
ROWS["memory_sparse_momentum", "spam_d0.5"] = ("spam", {**SPAM_OF_SPAM, "density": 0.5}, WARMUP_SPAM,
                                               "SPAM torchrun_main.py:341, :357")
ROWS["finetune_commonsense", "spam"] = ("spam", SPAM_OF_SPAM, {}, "SPAM torchrun_main.py:357")
ROWS["finetune_commonsense", "adam_gradclip"] = ("adam+gradclip", {**ADAM, "max_norm": 1.0}, {},
                                                 "SPAM torchrun_main.py:354, :447")

# Tables whose every trial must be described above (row and column).
COMPLETE = {"llm_pretrain_bf16", "llm_pretrain_4bit", "llm_pretrain_4bit_components", "llm_pretrain_ablation"}


def expected(trial: Trial) -> Expect | None:
    return ROWS.get((trial.table, trial.row, trial.column)) or ROWS.get((trial.table, trial.row))


def resolved(trial: Trial) -> dict[str, Any]:
    """The optimizer settings a task builds: the spec's defaults, the row's hparams, then what the task fills."""
    cfg = trial.spec.config
    hp, _ = fill_hparams(trial.spec.optimizer, dict(trial.spec.hparams), seed=trial.spec.seed, lr=cfg.get("lr"),
                         weight_decay=cfg.get("weight_decay"), total_steps=cfg.get("steps"))
    return {**optimizers.spec(trial.spec.optimizer).defaults, **hp}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


@pytest.fixture(scope="module")
def paper_trials() -> list[Trial]:
    return load_trials("paper")[1]


def test_every_trial_of_the_papers_tables_runs_the_authors_settings(paper_trials):
    problems: list[str] = []
    checked = set()
    for t in paper_trials:
        exp = expected(t)
        if t.table in COMPLETE and (exp is None or (t.table, t.column) not in COLUMNS):
            problems.append(f"{t.table}/{t.column}/{t.row}: not in the table of the authors' settings")
            continue
        if exp is None:
            continue
        name, opt, task, source = exp
        checked.add((t.table, t.row))
        where = f"{t.table}/{t.column}/{t.row} ({source})"
        if optimizers.spec(t.spec.optimizer).name != optimizers.spec(name).name:
            problems.append(f"{where}: optimizer {t.spec.optimizer!r}, the authors ran {name!r}")
        cfg, hp = t.spec.config, resolved(t)
        for key, want in opt.items():
            if key in t.point:
                continue
            if key == SCHEDULED:
                want = cfg["steps"]
            if key not in hp or not _same(hp[key], want):
                problems.append(f"{where}: {key}={hp.get(key, '<missing>')!r}, the authors used {want!r}")
        if SCHEDULED not in opt and "total_steps" in hp:
            problems.append(f"{where}: takes total_steps, the authors' optimizer has no schedule")
        wanted_task = {**(LLM_COMMON if t.spec.task == "llm_pretrain" else {}),
                       **COLUMNS.get((t.table, t.column), {}), **task}
        for key, want in wanted_task.items():
            if key not in t.point and not _same(cfg.get(key), want):
                problems.append(f"{where}: task {key}={cfg.get(key)!r}, the authors used {want!r}")
    assert not problems, "\n".join(dict.fromkeys(problems))
    described = {(k[0], k[1]) for k in ROWS}
    assert described == checked, f"described but not in the suite: {sorted(described - checked)}"


def test_the_paper_tables_cover_every_column_described(paper_trials):
    present = {(t.table, t.column) for t in paper_trials}
    assert set(COLUMNS) <= present, sorted(set(COLUMNS) - present)
