"""Suite schema, grid expansion, trial identity and command-line overrides (no Ray, no MLflow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.spec import TrialSpec
from bench.suite import SuiteError, apply_sets, available, load, load_trials, parse_sets, unique_specs


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return str(path)


GOOD = """\
name: t
experiments:
  - task: llm_pretrain
    preset: smoke
    table: tab
    column: col
    overrides: {steps: 8}
    hparams: {lr: [1e-3, 3e-3]}
    optimizers:
      - adamw
      - {name: spam, label: SPAM, hparams: {reset_interval: 4, warmup_steps: 2}}
    seeds: 2
"""


def test_shipped_suites_validate():
    assert {"smoke", "paper"} <= set(available())
    for name in available():
        suite, trials = load_trials(name)
        assert trials, name
        assert len({t.key for t in trials}) == len(unique_specs(trials))


def test_grid_expands_lists_and_seed_counts(tmp_path):
    _, trials = load_trials(write(tmp_path, GOOD))
    assert len(trials) == 2 * 2 * 2  # lrs x optimizers x seeds
    assert {t.row for t in trials} == {"adamw", "SPAM"}
    assert {t.point["lr"] for t in trials} == {1e-3, 3e-3}  # "1e-3" (no dot) is read as a float
    assert all(t.spec.config["steps"] == 8 for t in trials)
    assert len({t.key for t in trials}) == 8


def test_key_is_content_hash_of_resolved_trial():
    a = TrialSpec(task="x", preset="p1", config={"a": 1, "b": 2}, optimizer="adamw", hparams={"lr": 1e-3}, seed=0)
    b = TrialSpec(task="x", preset="p2", config={"b": 2, "a": 1}, optimizer="adamw", hparams={"lr": 1e-3}, seed=0)
    assert a.key() == b.key()  # preset name and key order do not matter; the resolved content does
    assert a.key() != a.model_copy(update={"seed": 1}).key()
    assert a.key() != a.model_copy(update={"hparams": {"lr": 2e-3}}).key()


def test_runtime_fields_do_not_change_a_trials_identity():
    """torch.compile is a runtime field: the mini suite's trials keep the keys they had when it ran eager (the
    store in results/mini/gpu_store.tar.gz was made eager), while what a trial trains still changes its key."""
    _, trials = load_trials("mini", only={"llm_pretrain_bf16"})
    adam0 = next(t for t in trials if t.row == "adam" and t.spec.seed == 0)
    assert adam0.spec.config["compile"] == "cudagraphs"
    assert adam0.key == "73477b7e6fbdf3e9"  # the key of this trial in the eager store
    for compile_ in (False, True):
        other = adam0.spec.model_copy(update={"config": {**adam0.spec.config, "compile": compile_}})
        assert other.key() == adam0.key
    longer = adam0.spec.model_copy(update={"config": {**adam0.spec.config, "steps": 2000}})
    assert longer.key() != adam0.key


def test_a_learning_rate_equal_to_the_presets_is_the_trial_that_leaves_it_to_the_preset():
    """sensitivity_lr sweeps lr through the preset's 1e-3: those trials are the BF16 and 4-bit tables' own."""
    _, trials = load_trials("mini", only={"llm_pretrain_bf16", "sensitivity_lr"})
    bf16 = {(t.row, t.spec.seed): t for t in trials if t.table == "llm_pretrain_bf16"}
    swept = [t for t in trials if t.table == "sensitivity_lr" and t.column == "bf16" and t.row == "adam"]
    at_preset = [t for t in swept if t.point["lr"] == 1e-3]
    assert len(at_preset) == 3 and all(t.spec.hparams["lr"] == 1e-3 for t in at_preset)  # the run still names it
    assert {t.key for t in at_preset} == {bf16["adam", seed].key for seed in (0, 1, 2)}
    assert not {t.key for t in swept if t.point["lr"] != 1e-3} & {t.key for t in bf16.values()}


def test_an_int_formats_own_width_is_the_trial_that_leaves_it_unset():
    """sensitivity_int_bits' 4-bit INT4 Adam names quant_bits 4, INT4's own width: those trials are the 4-bit
    table's INT4 Adam, while 2 and 3 bits stay trials of their own."""
    _, trials = load_trials("mini", only={"llm_pretrain_4bit", "sensitivity_int_bits"})
    int4 = {t.spec.seed: t.key for t in trials if t.table == "llm_pretrain_4bit" and t.column == "int4_mini"
            and t.row == "adam"}
    swept = [t for t in trials if t.table == "sensitivity_int_bits" and t.row == "adam"]
    assert {t.key for t in swept if t.point["quant_bits"] == 4} == set(int4.values()) and len(int4) == 3
    assert not {t.key for t in swept if t.point["quant_bits"] != 4} & set(int4.values())
    assert all(t.spec.config["quant_bits"] is None for t in swept if t.point["quant_bits"] == 4)


@pytest.mark.parametrize("suite", ["mini", "paper"])
def test_no_two_keys_train_the_same_trial(suite):
    """Every distinct key trains something different: the resolved config, optimizer, seed and hyperparameters with
    the task's learning rate filled in, as `tasks.base.trial_optimizer` gives them."""
    _, trials = load_trials(suite)
    seen: dict[str, str] = {}
    for spec in unique_specs(trials):
        hp = {**spec.unset, **spec.hparams}
        what = json.dumps([spec.task, spec.optimizer, spec.seed, hp, {**spec.config, **spec.runtime}],
                          sort_keys=True, default=str)
        assert seen.setdefault(what, spec.key()) == spec.key(), spec.label()


@pytest.mark.parametrize("table", ["finetune_commonsense", "forecasting_weather_anomaly"])
def test_packing_a_table_differently_keeps_its_keys(table):
    """A trial's GPU share and CPUs (`--set task.gpu_fraction=...`) say where it runs: finished trials stay done."""
    _, trials = load_trials("mini", only={table})
    _, packed = load_trials("mini", parse_sets(["task.gpu_fraction=0.125", "task.cpus=2"]), only={table})
    assert [t.key for t in packed] == [t.key for t in trials]
    assert all(t.spec.config["gpu_fraction"] == 0.125 for t in packed)


def test_same_trial_in_two_tables_runs_once(tmp_path):
    text = GOOD + GOOD.split("experiments:\n", 1)[1].replace("table: tab", "table: other")
    _, trials = load_trials(write(tmp_path, text))
    assert len(trials) == 16 and len(unique_specs(trials)) == 8


def test_sets_override_every_trial(tmp_path):
    sets = parse_sets(["task.steps=5", "hparams.lr=2e-3", "seeds=[7]"])
    _, trials = load_trials(write(tmp_path, GOOD), sets)
    assert len(trials) == 2
    assert all(t.spec.config["steps"] == 5 and t.spec.hparams["lr"] == 2e-3 and t.spec.seed == 7 for t in trials)


def test_task_sets_reach_the_tasks_that_have_the_field():
    _, trials = load_trials("paper", parse_sets(["task.workers=1"]))
    llm = [t for t in trials if t.spec.task == "llm_pretrain"]
    assert llm and all(t.spec.config["workers"] == 1 for t in llm)
    assert all("workers" not in t.spec.config for t in trials if t.spec.task != "llm_pretrain")


def test_task_set_that_fits_no_task_names_the_fields(tmp_path):
    with pytest.raises(SuiteError, match=r"bad --set task.workerz: no task of this suite has a field 'workerz'; "
                                         r"valid: .*workers"):
        load_trials(write(tmp_path, GOOD), parse_sets(["task.workerz=1"]))


@pytest.mark.parametrize("bad", ["steps=5", "task=1", "foo.bar=1", "task.steps"])
def test_bad_set_is_rejected(bad):
    with pytest.raises(SuiteError, match="bad --set"):
        parse_sets([bad])


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("name: t\nexperiments: [\n", ":3: malformed YAML"),
        ("- a\n- b\n", "a suite must be a mapping"),
        (GOOD.replace("    seeds: 2", "    seed: 2"), ":12: experiments.0.seed: Extra inputs are not permitted"),
        (GOOD.replace("seeds: 2", "seeds: many"), ":12: experiments.0.seeds"),
        (GOOD.replace("task: llm_pretrain", "task: nope"), ":3: experiments.0.task: unknown task 'nope'; valid tasks:"),
        (GOOD.replace("preset: smoke", "preset: huge"), ":4: experiments.0.preset: unknown preset 'huge'"),
        (GOOD.replace("      - adamw", "      - adamz"), ":10: experiments.0.optimizers.0: unknown optimizer 'adamz'"),
        (GOOD.replace("reset_interval: 4", "reset_intervl: 4"), "has no hyperparameter 'reset_intervl'; valid:"),
        (GOOD.replace("[1e-3, 3e-3]", "-1.0"), "rejects"),
        (GOOD.replace("steps: 8", "steps: eight"), ":7: experiments.0.overrides.steps"),
        (GOOD.replace("steps: 8", "stepz: 8"), ":7: experiments.0.overrides.stepz: Extra inputs are not permitted"),
        (GOOD.replace("name: t\n", ""), "name: Field required"),
    ],
)
def test_bad_suites_name_file_line_and_field(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(SuiteError) as info:
        load_trials(path)
    assert needle in str(info.value)
    assert path in str(info.value) or "--set" in str(info.value)


def test_unknown_suite_lists_valid_ones():
    with pytest.raises(SuiteError, match="unknown suite 'nope'; valid suites: .*smoke"):
        load("nope")


def test_set_with_wrong_type_is_rejected(tmp_path):
    suite, _, _ = load(write(tmp_path, GOOD))
    with pytest.raises(SuiteError, match="invalid --set"):
        apply_sets(suite, {"seeds": "x"})


def test_mini_has_a_scaled_down_version_of_every_paper_table():
    tables = {name: {t.table for t in load_trials(name)[1]} for name in ("mini", "paper")}
    assert tables["mini"] == tables["paper"]
