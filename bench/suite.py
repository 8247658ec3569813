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
        analysis: sensitivity       # optional: the table's analysis, a name of `bench.analyses.ANALYSES`
        reference: adam             # optional: the row the table's analyses compare with (default adam)

A list value in `overrides` or `hparams` is a grid axis (write a list-valued setting such as betas as a list of
lists: `betas: [[0.9, 0.95]]`). `analysis` and `reference` belong to the table: every experiment of a table states
the same ones (or none); they do not enter a trial's identity. Top-level keys starting with `x-` are ignored: use
them for YAML anchors.
Suite and table names become file names: letters, digits, `.`, `_`, `-`, at most 100 characters. A file whose
anchors expand past `MAX_YAML_NODES` values or that nests deeper than `MAX_YAML_DEPTH` is refused.
Every error names the file, the line and the field.

An optimizer may be a user optimizer (`mypkg.opt:MyOptimizer`, or a name of the `bench.optimizers` entry points; see
`optimizers.plugins`); its own defaults (`bench_defaults`) enter its trials where the experiment and the row leave a
name unset. `add_optimizers` (the command line's `--add-optimizer NAME[:k=v,...]`) adds one as a row to every
experiment of a suite.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bench.spec import TrialSpec
from bench.tracking import short

SUITES_DIR = Path(__file__).parent / "suites"
log = logging.getLogger(__name__)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 safe loader that also reads `1e-3` (no dot) as a float, as people write learning rates."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)$|^[-+]?(?:\d[\d_]*)?\.\d+(?:[eE][-+]?\d+)?$"
               r"|^[-+]?\d[\d_]*\.\d*(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


MAX_YAML_NODES = 100_000  # values after anchors are expanded (a "billion laughs" file is refused, not built)
MAX_YAML_DEPTH = 32
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # names that become file and folder names
DEFAULT_REFERENCE = "adam"  # the row a table's analyses compare with where its experiments name none


class SuiteError(ValueError):
    """A suite (or a command-line override) is invalid; the message says where and why."""


def yaml_load(text: str, where: str = "<yaml>") -> Any:
    """Parse YAML whose expanded size and nesting are bounded (SuiteError otherwise)."""
    _bounded(_compose(text, where), where)
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _compose(text: str, where: str) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise SuiteError(f"{where}: nested too deeply (at most {MAX_YAML_DEPTH} levels)") from None


def _bounded(root: yaml.Node | None, where: str) -> None:
    """Refuse a document that nests deeper than MAX_YAML_DEPTH or expands (through aliases) past MAX_YAML_NODES
    values, before anything builds it."""
    memo: dict[int, tuple[int, int]] = {}  # node -> (expanded size, height): aliases share nodes

    def walk(node: yaml.Node, depth: int) -> tuple[int, int]:
        if depth > MAX_YAML_DEPTH:
            raise SuiteError(f"{where}:{node.start_mark.line + 1}: nested deeper than {MAX_YAML_DEPTH} levels")
        if id(node) not in memo:
            children = [c for kv in node.value for c in kv] if isinstance(node, yaml.MappingNode) else (
                node.value if isinstance(node, yaml.SequenceNode) else [])
            size, height = 1, 0
            for child in children:
                s, h = walk(child, depth + 1)
                size, height = size + s, max(height, h + 1)
                if size > MAX_YAML_NODES:
                    break
            memo[id(node)] = (size, height)
        size, height = memo[id(node)]
        if depth + height > MAX_YAML_DEPTH:
            raise SuiteError(f"{where}:{node.start_mark.line + 1}: nested deeper than {MAX_YAML_DEPTH} levels")
        if size > MAX_YAML_NODES:
            raise SuiteError(f"{where}:{node.start_mark.line + 1}: expands to more than {MAX_YAML_NODES} values "
                             "(anchors and aliases repeated too often)")
        return size, height

    if root is not None:
        walk(root, 0)


def _safe_name(value: str | None) -> str | None:
    if value is not None and not NAME_RE.fullmatch(value):
        raise ValueError(f"{short(repr(value), 60)} cannot name files: use 1 to 100 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return value


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
    analysis: str | None = Field(None, description="the table's analysis beside its final metrics (a name of "
                                 "`bench.analyses.ANALYSES`)")
    reference: str | None = Field(None, description="the row (label) the table's analyses compare with "
                                  f"[default: {DEFAULT_REFERENCE}]")

    @field_validator("analysis")
    @classmethod
    def _analysis(cls, v: str | None) -> str | None:
        from bench.analyses import ANALYSES

        if v is not None and v not in ANALYSES:
            raise ValueError(f"unknown analysis {v!r}; valid: {', '.join(ANALYSES)}")
        return v

    @field_validator("table")
    @classmethod
    def _table(cls, v: str | None) -> str | None:
        return _safe_name(v)

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

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _safe_name(v)

    @model_validator(mode="after")
    def _one_setting_per_table(self) -> Suite:
        for what in ("analysis", "reference"):
            by_table: dict[str, set[str | None]] = {}
            for e in self.experiments:
                value = e.analysis if what == "analysis" else e.reference or DEFAULT_REFERENCE
                by_table.setdefault(e.table or e.task, set()).add(value)
            for table, values in by_table.items():
                if len(values) > 1:
                    names = ", ".join(sorted(str(v) if v else "none" for v in values))
                    raise ValueError(f"the experiments of table {table!r} give `{what}` different values ({names}); "
                                     "give each of them the same one")
        return self


@dataclass(frozen=True)
class Trial:
    """One expanded trial: its spec plus where it shows up in the leaderboard."""

    spec: TrialSpec
    table: str
    column: str
    row: str
    point: dict[str, Any] = field(default_factory=dict)  # the grid values that vary within its experiment
    analysis: str | None = None  # the table's analysis (`bench.analyses.ANALYSES`)
    reference: str = DEFAULT_REFERENCE  # the row the table's analyses compare with

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
        root = _compose(text, str(path))
        raw = yaml_load(text, str(path))
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
            out[key] = yaml_load(value, f"--set {key}")
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


# --- optimizers added from the command line -----------------------------------------------------------------------

_ADDED = re.compile(r"^(?P<name>[^=]*?)(?::(?P<hparams>[A-Za-z_]\w*\s*=.*))?$", re.S)
_NEXT_KEY = re.compile(r",\s*(?=[A-Za-z_]\w*\s*=)")


def parse_added(text: str) -> OptimizerEntry:
    """`NAME[:k=v,...]` -> a row entry labelled `text`. Values are YAML (a list is a grid axis, as in a suite); NAME
    may be an import path `module:attr`, whose colon is told from the hyperparameters' by the `=` after a name."""
    match = _ADDED.match(text.strip())
    name = match.group("name").strip() if match else ""
    if not name:
        raise SuiteError(f"bad --add-optimizer {text!r}: expected NAME or NAME:k=v,... (e.g. mypkg.opt:MyOpt:lr=1e-3)")
    hparams: dict[str, Any] = {}
    raw = match.group("hparams")
    for item in _NEXT_KEY.split(raw) if raw else []:
        key, _, value = item.partition("=")
        try:
            hparams[key.strip()] = yaml_load(value)
        except yaml.YAMLError as exc:
            raise SuiteError(f"bad --add-optimizer {text!r}: the value of {key.strip()!r} is not valid YAML "
                             f"({exc})") from None
    return OptimizerEntry(name=name, label=text.strip(), hparams=hparams)


def add_optimizers(suite: Suite, added: list[str]) -> Suite:
    """Add each `NAME[:k=v,...]` as a row (labelled as written) to every experiment, with the experiment's seeds,
    overrides and shared hyperparameters. An experiment whose shared hyperparameters the optimizer does not take
    (a study of another optimizer's own settings) is left as it is, with a warning naming its table."""
    import optimizers

    if not added:
        return suite
    exps = [e.model_copy(deep=True) for e in suite.experiments]
    for text in added:
        entry = parse_added(text)
        try:
            spec = optimizers.spec(entry.name)
        except (KeyError, ValueError) as exc:
            raise SuiteError(f"--add-optimizer {text!r}: {exc.args[0]}") from None
        unknown = sorted(set(entry.hparams) - spec.accepts) if not spec.accepts_any else []
        if unknown:
            raise SuiteError(f"--add-optimizer {text!r}: optimizer {entry.name!r} has no hyperparameter "
                             f"{', '.join(map(repr, unknown))}; valid: {', '.join(sorted(spec.accepts))}")
        for exp in exps:
            rows = [o if isinstance(o, str) else o.label or o.name for o in exp.optimizers]
            if entry.label in rows:
                raise SuiteError(f"--add-optimizer {text!r}: table {exp.table or exp.task!r} already has a row "
                                 f"{entry.label!r}; give other hyperparameters or another name")
            foreign = sorted(set(exp.hparams) - spec.accepts - set(entry.hparams))
            if foreign:
                log.warning("--add-optimizer %s: not added to table %s (%s), whose experiment sets %s",
                            text, exp.table or exp.task, exp.column or exp.preset, ", ".join(foreign))
                continue
            exp.optimizers.append(entry.model_copy())
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
        return f"optimizer {name!r} rejects {short(hparams)}: {short(str(exc), 300)}"
    return None


def _grid(values: dict[str, Any]) -> list[dict[str, Any]]:
    axes = {k: v if isinstance(v, list) else [v] for k, v in values.items()}
    return [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]


def _install_hint(reason: str) -> str:
    """How to install the optional packages an "unavailable because ..." reason names: the extra that has them."""
    from importlib import metadata

    try:
        requirements = metadata.metadata("bench").get_all("Requires-Dist") or []
    except metadata.PackageNotFoundError:
        return ""
    for req in requirements:
        m = re.match(r'([A-Za-z0-9_.-]+).*extra == "(\w+)"', req)
        if m and m.group(2) != "all" and re.search(rf"\b{re.escape(m.group(1)).replace('-', '[-_]')}\b", reason):
            return f"; install it with: pip install 'bench[{m.group(2)}]'"
    return ""


def _selected(suite: Suite, only: set[str] | None) -> set[int]:
    """Indices of the experiments whose table or task is named in `only` (all without it)."""
    if only is None:
        return set(range(len(suite.experiments)))
    valid = {e.table or e.task for e in suite.experiments} | {e.task for e in suite.experiments}
    unknown = sorted(only - valid)
    if unknown or not only:
        raise SuiteError(f"--only: no table or task {', '.join(map(repr, unknown))} in this suite; "
                         f"valid: {', '.join(sorted(valid))}")
    return {i for i, e in enumerate(suite.experiments) if e.task in only or (e.table or e.task) in only}


def expand(suite: Suite, path: Path | None = None, root: yaml.Node | None = None,
           only: set[str] | None = None) -> list[Trial]:
    """All trials of a suite (or of the tables and tasks named in `only`), checked against the task and optimizer
    registries (SuiteError on the first problems). Experiments left out by `only` are not checked."""
    import optimizers
    import tasks
    from optimizers.plugins import own_defaults

    path = path or Path(f"<suite {suite.name}>")
    trials: list[Trial] = []
    errors: list[str] = []
    selected = _selected(suite, only)
    for i, exp in enumerate(suite.experiments):
        if i not in selected:
            continue
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
                if not spec.available:
                    errors.append(f"{_where(path, root, opt_where)}: optimizer {entry.name!r} is {spec.unavailable}"
                                  + _install_hint(spec.unavailable))
                    continue
                merged = {**own_defaults(entry.name), **exp.hparams, **entry.hparams}
                unknown = sorted(set(merged) - set(spec.accepts))
                if unknown and not spec.accepts_any:
                    errors.append(
                        f"{_where(path, root, opt_where)}: optimizer {entry.name!r} has no hyperparameter "
                        f"{', '.join(map(repr, unknown))}; valid: {', '.join(sorted(spec.accepts))}"
                    )
                    continue
                varying = {k for k, v in {**exp.overrides, **merged}.items() if isinstance(v, list)}
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
                            optimizer=entry.name, hparams=hp, seed=seed, runtime=cfg.identity_defaults(),
                            unset=cfg.unset_hparams(),
                        )
                        trials.extend(
                            Trial(spec=spec_, table=exp.table or exp.task, column=column,
                                  row=entry.label or entry.name, point=point, analysis=exp.analysis,
                                  reference=exp.reference or DEFAULT_REFERENCE)
                            for column in columns
                        )
    for i, exp in enumerate(suite.experiments):
        rows = {t.row for t in trials if t.table == (exp.table or exp.task)}
        if exp.reference is not None and i in selected and rows and exp.reference not in rows:
            errors.append(f"{_where(path, root, ('experiments', i, 'reference'))}: reference {exp.reference!r} is "
                          f"not a row of table {exp.table or exp.task!r}; rows: {', '.join(sorted(rows))}")
    if errors:
        unique = list(dict.fromkeys(errors))
        more = f"\n  ... and {len(unique) - 20} more" if len(unique) > 20 else ""
        raise SuiteError("invalid suite:\n  " + "\n  ".join(unique[:20]) + more)
    return trials


def load_trials(name_or_path: str, sets: dict[str, Any] | None = None, added: list[str] | None = None,
                only: set[str] | None = None) -> tuple[Suite, list[Trial]]:
    """The suite's trials (of the tables and tasks in `only`) with `added` optimizers and `--set` overrides applied;
    an error the overrides cause names them, not the file."""
    suite, path, root = load(name_or_path)
    suite = add_optimizers(suite, added or [])
    if not sets:
        return suite, expand(suite, path, root, only)
    changed = apply_sets(suite, sets)
    try:
        return changed, expand(changed, path, root, only)
    except SuiteError:
        expand(suite, path, root, only)  # the file's own problems are reported at its lines
        flags = " ".join(f"--set {k}={v}" for k, v in sets.items())
        try:
            expand(changed, Path(flags), None, only)
        except SuiteError as exc:
            raise SuiteError(f"{exc.args[0]}\n  ({path.name} is valid without {flags})") from None
        raise


def unique_specs(trials: list[Trial]) -> list[TrialSpec]:
    """Each distinct trial once (the same trial may appear in several tables)."""
    seen: dict[str, TrialSpec] = {}
    for t in trials:
        seen.setdefault(t.key, t.spec)
    return list(seen.values())
