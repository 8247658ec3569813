"""The scores before fine-tuning are computed once per model, data and evaluation settings (pretrained models only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tasks.base import LocalContext
from tasks.finetune.model import cache_dir, smollm2_tokenizer_dir, tiny_llama
from tasks.finetune.start_scores import identity, key_of, start_scores
from tasks.finetune.training import FinetuneTrial

ROOT = Path(__file__).resolve().parents[3]
STEP0 = ("acc", "acc_sum", "acc/arc_e", "acc_sum/arc_e", "acc/winogrande", "acc_sum/winogrande")

# A trial process in miniature: imports, says it is ready, waits for the others, then asks for the scores.
CHILD = """
import json, os, sys, time
from pathlib import Path
from tasks.finetune.start_scores import start_scores

work = Path(sys.argv[1])
(work / f"ready.{os.getpid()}").touch()
while not (work / "go").exists():
    time.sleep(0.01)

def compute():
    with open(work / "calls", "a") as out:
        out.write(f"{os.getpid()}\\n")
    time.sleep(1.0)
    return {"acc": 0.25, "acc_sum": 1 / 3}

print(json.dumps(start_scores({"model": "shared"}, compute)))
"""


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh `$BENCH_CACHE` per test: the user's cache is neither read nor written."""
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _stored() -> list[Path]:
    return sorted((cache_dir() / "start_scores").glob("*.json"))


def test_concurrent_processes_compute_once(tmp_path: Path) -> None:
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                                 text=True) for _ in range(2)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready.*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    (tmp_path / "go").touch()
    outputs = [json.loads(child.communicate(timeout=120)[0]) for child in children]
    assert all(child.returncode == 0 for child in children)
    assert len((tmp_path / "calls").read_text().split()) == 1  # one of them computed, the other waited and read
    key = key_of({"model": "shared"})
    assert sorted(origin for _, origin in outputs) == [f"cached {key}", "computed"]
    assert outputs[0][0] == outputs[1][0] == {"acc": 0.25, "acc_sum": 1 / 3}
    assert _stored() == [cache_dir() / "start_scores" / f"{key}.json"]


def test_corrupt_or_other_key_computes_again_and_none_is_never_stored(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def compute() -> dict[str, float]:
        calls.append(1)
        return {"acc": 0.5 + len(calls) / 100}

    inputs = {"model": "m", "max_eval_examples": 8}
    key = key_of(inputs)
    assert start_scores(inputs, compute) == ({"acc": 0.51}, "computed")
    assert start_scores(inputs, compute) == ({"acc": 0.51}, f"cached {key}") and len(calls) == 1
    file = cache_dir() / "start_scores" / f"{key}.json"
    for corrupt in ("{not json", '{"scores": {"acc": "high"}}', '{"scores": [1]}', "[]"):
        file.write_text(corrupt)
        with caplog.at_level("WARNING"):
            scores, origin = start_scores(inputs, compute)
        assert origin == "computed" and scores == {"acc": 0.5 + len(calls) / 100}
        assert "unreadable" in caplog.text and json.loads(file.read_text())["scores"] == scores
        caplog.clear()
    assert len(calls) == 5
    other = {**inputs, "max_eval_examples": 16}
    assert start_scores(other, compute)[1] == "computed" and key_of(other) != key and len(calls) == 6
    stored = _stored()
    assert len(stored) == 2
    assert [start_scores(None, compute)[1] for _ in range(2)] == ["computed", "computed"] and len(calls) == 8
    assert _stored() == stored
    assert not list(file.parent.glob("*.tmp"))  # the atomic writes left no temporary files


@pytest.mark.slow
def test_a_random_model_is_scored_every_time(tmp_path: Path, make_config: Callable, run_task: Callable) -> None:
    cfg = make_config("smoke", steps=2)
    for seed in (0, 1):
        _, ctx = run_task(cfg, ctx=LocalContext(seed=seed, device="cpu", workdir=tmp_path / str(seed)))
        assert ctx.tags["start_scores"] == "computed" and ctx.tags["model_pretrained"] == "false"
    assert _stored() == []


@pytest.mark.slow
def test_a_pretrained_model_is_scored_once_per_model_data_and_evaluation(tmp_path: Path, make_config: Callable,
                                                                         run_task: Callable) -> None:
    """A local `save_pretrained` folder counts as pretrained: the trials that differ only in optimizer, learning rate
    and seed share one evaluation; other evaluation settings or a rewritten model folder get their own."""
    folder = tmp_path / "model"
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir()))
    tiny_llama(tokenizer, seed=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cfg = make_config("smoke-lora", model=str(folder), steps=2)

    first, first_ctx = run_task(cfg, ctx=LocalContext(seed=0, device="cpu", workdir=tmp_path / "a"))
    assert first_ctx.tags["start_scores"] == "computed" and first_ctx.tags["model_pretrained"] == "true"
    [stored] = _stored()
    record = json.loads(stored.read_text())
    key = stored.stem
    assert record["key"] == key == key_of(record["inputs"])
    assert {"lr", "seed", "steps"}.isdisjoint(record["inputs"]["config"])
    assert record["scores"] == {name: first_ctx.series(name)[0][1] for name in STEP0}

    again, ctx = run_task(cfg.model_copy(update={"lr": 1e-3}), optimizer="spam", hparams={"lr": 5e-3},
                          ctx=LocalContext(seed=1, device="cpu", workdir=tmp_path / "b"))
    assert ctx.tags["start_scores"] == f"cached {key}"
    assert all(ctx.series(name)[0] == first_ctx.series(name)[0] for name in STEP0)
    assert again["acc_start"] == first["acc_start"] and again["acc_sum_start"] == first["acc_sum_start"]
    assert ctx.series("time.eval_s")[0][1] > 0

    _, ctx = run_task(cfg.model_copy(update={"max_eval_examples": 4}),
                      ctx=LocalContext(seed=0, device="cpu", workdir=tmp_path / "c"))
    assert ctx.tags["start_scores"] == "computed" and len(_stored()) == 2

    trial = FinetuneTrial.create(cfg, "adamw", {}, seed=5)
    inputs = identity(trial)
    assert inputs is not None and key_of(inputs) == key
    weights = next(folder.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # rewritten
    assert key_of(identity(trial) or {}) != key
