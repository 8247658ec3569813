"""The scores before fine-tuning (step 0), computed once and shared by every trial that would compute the same ones.

With a pretrained model they depend on the model, the data and the evaluation settings only, not on the optimizer,
its hyperparameters or the seed (LoRA's B matrices start at zero and the model is scored in eval mode). They are
stored as JSON under `$BENCH_CACHE/finetune/start_scores/<key>.json`, the key a hash of everything that decides
them (`identity`). Concurrent trials (Ray runs several, each in its own process) take an exclusive `flock` on
`<key>.lock` beside it, so one computes while the others wait and read. A randomly initialised model (weights drawn
from the seed) is scored every time.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers

from tasks.finetune.model import cache_dir

if TYPE_CHECKING:
    from tasks.finetune.training import FinetuneTrial

log = logging.getLogger(__name__)

VERSION = 1  # of the scores: raise it when scoring changes, so that stored scores are not reused
# the config fields that decide the model as loaded and scored, and the evaluation examples
KEY_FIELDS = frozenset({
    "model", "revision", "gguf_file", "tokenizer", "method", "lora_r", "lora_alpha", "lora_dropout",
    "lora_target_modules", "precision", "max_len", "eval_batch_size", "compile",
    "datasets", "data_source", "data_paths", "hub_ids", "allow_fallback", "packaged_train_fraction",
    "max_eval_examples",
})


def _files(path: Path) -> list[tuple[str, int, int]]:
    """Name, size and modification time of a file or of every file in a folder."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def identity(trial: FinetuneTrial) -> dict[str, Any] | None:
    """What decides `trial`'s scores before fine-tuning; None when the seed does too (a model not pretrained)."""
    if not trial.loaded.pretrained:
        return None
    cfg = trial.cfg
    local = [p for p in (cfg.model, cfg.tokenizer, *cfg.data_paths.values()) if p and Path(p).expanduser().exists()]
    return {
        "version": VERSION,
        "config": cfg.model_dump(mode="json", include=set(KEY_FIELDS)),
        "device": trial.device.type,
        "device_name": torch.cuda.get_device_name(trial.device) if trial.device.type == "cuda" else None,
        "model_source": trial.loaded.source,
        "model_commit": getattr(getattr(trial.model, "config", None), "_commit_hash", None),  # a hub model's
        "set_sources": [s.source for s in trial.sets],  # where `data_source: auto` found each set
        "local_files": {p: _files(Path(p).expanduser()) for p in local},  # a rewritten folder or file: a new key
        "libraries": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def key_of(inputs: dict[str, Any]) -> str:
    """The first 16 hex digits of the sha256 of `inputs` as canonical JSON."""
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _read(file: Path) -> dict[str, float] | None:
    if not file.exists():
        return None
    try:
        return {str(k): float(v) for k, v in json.loads(file.read_text())["scores"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("scores before fine-tuning: %s is unreadable (%s: %s); computing them again",
                    file, type(exc).__name__, exc)
        return None


def _write(file: Path, record: dict[str, Any]) -> None:
    """Write `record` as JSON into `file` atomically (a temporary file beside it, renamed into place)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{file.stem}-", suffix=".tmp", dir=file.parent)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(record, out, indent=1)
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def start_scores(inputs: dict[str, Any] | None,
                 compute: Callable[[], dict[str, float]]) -> tuple[dict[str, float], str]:
    """The scores of `compute` for `inputs` (None: not cached) and where they came from: "computed" or
    "cached <key>". The first caller of a key computes and stores them; concurrent callers wait on its lock."""
    if inputs is None:
        return compute(), "computed"
    key = key_of(inputs)
    folder = cache_dir() / "start_scores"
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / f"{key}.json"
    with open(folder / f"{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        scores = _read(file)
        if scores is not None:
            return scores, f"cached {key}"
        scores = compute()
        _write(file, {"key": key, "inputs": inputs, "scores": scores})
    return scores, "computed"
