"""Suites: YAML files that declare experiments; validated, then expanded into a grid of trials.

A suite file looks like::

    name: smoke
    description: tiny CPU versions of every task
    experiments:
      - task: llm_pretrain          # a name from `bench list tasks`
        preset: smoke               # one of the task's presets
        table: llm_pretrain_bf16    # leaderboard table (a key of paper_results.yaml compares with the papers)
        column: llama_60m           # column of that table
        overrides: {steps: 40}      # task config fields
        hparams: {lr: [1e-3, 3e-3]} # shared optimizer hyperparameters
        optimizers:
          - adamw
          - {name: spam, label: spam, hparams: {warmup_steps: 5, reset_interval: 20}}
        seeds: [0, 1]               # or a count: 3 -> [0, 1, 2]

A list value in `overrides` or `hparams` is a grid axis (write a list-valued setting such as betas as a list of
lists: `betas: [[0.9, 0.95]]`). Top-level keys starting with `x-` are ignored: use them for YAML anchors.
Every error names the file, the line and the field.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bench.spec import TrialSpec

SUITES_DIR = Path(__file__).parent / "suites"


class _Loader(yaml.SafeLoader):
    """YAML 1.1 safe loader that also reads `1e-3` (no dot) as a float, as people write learning rates."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)$|^[-+]?(?:\d[\d_]*)?\.\d+(?:[eE][-+]?\d+)?$"
               r"|^[-+]?\d[\d_]*\.\d*(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class SuiteError(ValueError):
    """A suite (or a command-line override) is invalid; the message says where and why."""


class OptimizerEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    label: str | None = Field(None, description="row name in leaderboard tables (defaults to `name`)")
    hparams: dict[str, Any] = Field(default_factory=dict)


class Experiment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str
    preset: str = "smoke"
    table: str | None = None
    column: str | list[str] | None = Field(None, description="column(s) of `table`; a list shows the same trials "
                                           "in several columns (e.g. one baseline beside INT4 and FP4)")
    overrides: dict[str, Any] = Field(default_factory=dict)
    hparams: dict[str, Any] = Field(default_factory=dict)
    optimizers: list[str | OptimizerEntry] = Field(min_length=1)
    seeds: list[int] | int = Field(default_factory=lambda: [0])

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int] | int) -> list[int]:
        if isinstance(v, int):
            if v < 1:
                raise ValueError("a seed count must be at least 1")
            return list(range(v))
        if not v:
            raise ValueError("at least one seed is needed")
        return v


class Suite(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    experiments: list[Experiment] = Field(min_length=1)


@dataclass(frozen=True)
class Trial:
    """One expanded trial: its spec plus where it shows up in the leaderboard."""

    spec: TrialSpec
    table: str
    column: str
    row: str
    point: dict[str, Any] = field(default_factory=dict)  # the grid values that vary within its experiment

    @property
    def key(self) -> str:
        return self.spec.key()


def available() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def suite_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = SUITES_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    raise SuiteError(f"unknown suite {name_or_path!r}; valid suites: {', '.join(available())} (or a path to a .yaml)")


# --- locating errors in the YAML source -------------------------------------------------------------------------


def _line_of(node: yaml.Node | None, loc: Iterable[Any]) -> int | None:
    """The 1-based line of the YAML node at a pydantic error location (the closest existing ancestor)."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = [v for k, v in node.value if k.value == part]
            if not match:
                break
            node = match[0]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
        line = node.start_mark.line + 1
    return line


def _where(path: Path, root: yaml.Node | None, loc: Iterable[Any]) -> str:
    loc = list(loc)
    line = _line_of(root, loc)
    field_name = ".".join(str(p) for p in loc) or "(top level)"
    if root is None:  # not from a file: no line to name
        return f"{path}: {field_name}"
    return f"{path}:{line or '?'}: {field_name}"


def load(name_or_path: str) -> tuple[Suite, Path, yaml.Node | None]:
    """Parse and schema-check a suite file (SuiteError with file, line and field on any problem)."""
    path = suite_path(name_or_path)
    text = path.read_text()
    try:
        root = yaml.compose(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
        raw = yaml_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else "?"
        raise SuiteError(f"{path}:{line}: malformed YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise SuiteError(f"{path}:1: a suite must be a mapping with `name` and `experiments`")
    raw = {k: v for k, v in raw.items() if not str(k).startswith("x-")}  # `x-...` keys hold YAML anchors
    try:
        suite = Suite(**raw)
    except ValidationError as exc:
        raise SuiteError(_format_validation(exc, path, root)) from None
    return suite, path, root


def _format_validation(exc: ValidationError, path: Path, root: yaml.Node | None, prefix: tuple = ()) -> str:
    lines = [f"{_where(path, root, prefix + tuple(e['loc']))}: {e['msg']}" for e in exc.errors()]
    return "invalid suite:\n  " + "\n  ".join(lines)


# --- command-line overrides -------------------------------------------------------------------------------------


def parse_sets(items: list[str]) -> dict[str, Any]:
    """`--set task.steps=100 hparams.lr=1e-3 seeds=3 preset=mini` -> {dotted key: YAML-parsed value}."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        root = key.split(".", 1)[0]
        if not sep or not key or root not in ("task", "hparams", "seeds", "preset"):
            raise SuiteError(
                f"bad --set {item!r}: expected KEY=VALUE with KEY one of task.<field>, hparams.<name>, seeds, preset"
            )
        if root in ("task", "hparams") and "." not in key:
            raise SuiteError(f"bad --set {item!r}: name the field, e.g. {root}.steps=100")
        try:
            out[key] = yaml_load(value)
        except yaml.YAMLError as exc:
            raise SuiteError(f"bad --set {item!r}: value is not valid YAML ({exc})") from None
    return out


def _task_fields(task: str) -> set[str]:
    import tasks

    try:
        return set(tasks.get_task(task).Config.model_fields)
    except KeyError:
        return set()  # an unknown task is reported with the other suite errors


def apply_sets(suite: Suite, sets: dict[str, Any]) -> Suite:
    """Apply `--set` overrides; `task.X` goes to the experiments whose task has a field X (and must fit one)."""
    if not sets:
        return suite
    fields = {e.task: _task_fields(e.task) for e in suite.experiments}
    for key in sets:
        root, _, name = key.partition(".")
        if root == "task" and not any(name in f for f in fields.values()):
            valid = sorted(set().union(*fields.values()))
            raise SuiteError(f"bad --set {key}: no task of this suite has a field {name!r}; valid: {', '.join(valid)}")
    exps = []
    for exp in suite.experiments:
        data = exp.model_dump()
        for key, value in sets.items():
            root, _, name = key.partition(".")
            if root == "task":
                if name in fields[exp.task]:
                    data["overrides"][name] = value
            elif root == "hparams":
                data["hparams"][name] = value
                for opt in data["optimizers"]:
                    if isinstance(opt, dict):
                        opt["hparams"].pop(name, None)
            else:
                data[root] = value
        try:
            exps.append(Experiment(**data))
        except ValidationError as exc:
            raise SuiteError("invalid --set: " + "; ".join(f"{e['loc']}: {e['msg']}" for e in exc.errors())) from None
    return suite.model_copy(update={"experiments": exps})


# --- expansion and validation against the task and optimizer registries ------------------------------------------


def _check_hparams(name: str, spec: Any, hparams: dict[str, Any]) -> str | None:
    """Build the optimizer on a throwaway layer so bad values (negative lr, wrong types) fail before any trial."""
    import torch

    import optimizers

    if spec.needs_model:
        return None
    try:
        optimizers.build(name, torch.nn.Linear(4, 4), **hparams)
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:
        return f"optimizer {name!r} rejects {hparams}: {exc}"
    return None


def _grid(values: dict[str, Any]) -> list[dict[str, Any]]:
    axes = {k: v if isinstance(v, list) else [v] for k, v in values.items()}
    return [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]


def expand(suite: Suite, path: Path | None = None, root: yaml.Node | None = None) -> list[Trial]:
    """All trials of a suite, checked against the task and optimizer registries (SuiteError on the first problems)."""
    import optimizers
    import tasks

    path = path or Path(f"<suite {suite.name}>")
    trials: list[Trial] = []
    errors: list[str] = []
    for i, exp in enumerate(suite.experiments):
        where = ("experiments", i)
        try:
            task = tasks.get_task(exp.task)
        except KeyError as exc:
            errors.append(f"{_where(path, root, where + ('task',))}: {exc.args[0]}")
            continue
        if exp.preset not in task.presets:
            errors.append(
                f"{_where(path, root, where + ('preset',))}: unknown preset {exp.preset!r} for task {exp.task!r}; "
                f"valid: {', '.join(task.presets)}"
            )
            continue
        entries = [OptimizerEntry(name=o) if isinstance(o, str) else o for o in exp.optimizers]
        varying = {k for k, v in {**exp.overrides, **exp.hparams}.items() if isinstance(v, list)}
        for overrides in _grid(exp.overrides):
            try:
                cfg = task.config(exp.preset, overrides)
            except ValidationError as exc:
                errors.extend(
                    f"{_where(path, root, where + ('overrides', *e['loc']))}: {e['msg']}"
                    f" (task {exp.task!r}, preset {exp.preset!r})"
                    for e in exc.errors()
                )
                continue
            for j, entry in enumerate(entries):
                opt_where = where + ("optimizers", j)
                try:
                    spec = optimizers.spec(entry.name)
                except (KeyError, ValueError) as exc:
                    errors.append(f"{_where(path, root, opt_where)}: {exc.args[0]}")
                    continue
                merged = {**exp.hparams, **entry.hparams}
                unknown = sorted(set(merged) - set(spec.accepts))
                if unknown:
                    errors.append(
                        f"{_where(path, root, opt_where)}: optimizer {entry.name!r} has no hyperparameter "
                        f"{', '.join(map(repr, unknown))}; valid: {', '.join(sorted(spec.accepts))}"
                    )
                    continue
                for hp in _grid(merged):
                    problem = _check_hparams(entry.name, spec, hp)
                    if problem:
                        errors.append(f"{_where(path, root, opt_where)}: {problem}")
                        continue
                    point = {k: v for k, v in {**overrides, **hp}.items() if k in varying}
                    columns = exp.column if isinstance(exp.column, list) else [exp.column or exp.preset]
                    for seed in exp.seeds:
                        spec_ = TrialSpec(
                            task=exp.task, preset=exp.preset, config=cfg.model_dump(mode="json"),
                            optimizer=entry.name, hparams=hp, seed=seed,
                        )
                        trials.extend(
                            Trial(spec=spec_, table=exp.table or exp.task, column=column,
                                  row=entry.label or entry.name, point=point)
                            for column in columns
                        )
    if errors:
        unique = list(dict.fromkeys(errors))
        more = f"\n  ... and {len(unique) - 20} more" if len(unique) > 20 else ""
        raise SuiteError("invalid suite:\n  " + "\n  ".join(unique[:20]) + more)
    return trials


def load_trials(name_or_path: str, sets: dict[str, Any] | None = None) -> tuple[Suite, list[Trial]]:
    """The suite's trials with `--set` overrides applied; an error the overrides cause names them, not the file."""
    suite, path, root = load(name_or_path)
    if not sets:
        return suite, expand(suite, path, root)
    changed = apply_sets(suite, sets)
    try:
        return changed, expand(changed, path, root)
    except SuiteError:
        expand(suite, path, root)  # the file's own problems are reported at its lines
        flags = " ".join(f"--set {k}={v}" for k, v in sets.items())
        try:
            expand(changed, Path(flags), None)
        except SuiteError as exc:
            raise SuiteError(f"{exc.args[0]}\n  ({path.name} is valid without {flags})") from None
        raise


def unique_specs(trials: list[Trial]) -> list[TrialSpec]:
    """Each distinct trial once (the same trial may appear in several tables)."""
    seen: dict[str, TrialSpec] = {}
    for t in trials:
        seen.setdefault(t.key, t.spec)
    return list(seen.values())
