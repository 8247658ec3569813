"""Multiple-choice examples of the commonsense-reasoning sets, built from rows in each set's hub layout.

An `Example` is scored by the log-likelihood of each answer continuation given its context, and fine-tuned on the
context of the correct answer followed by that answer (loss on the answer tokens only). The prompts are the
lm-evaluation-harness "ranked classification" formulations: the answer text is the continuation (not a letter),
e.g. ARC `"Question: {question}\\nAnswer:"` + `" {choice}"`. WinoGrande uses the harness's partial scoring: each
option is substituted for the blank in the context and the rest of the sentence is the continuation, so the
contexts differ between choices and the continuation is shared.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Row = dict[str, Any]


@dataclass(frozen=True)
class Example:
    """One multiple-choice item: a (context, continuation) pair per choice and the index of the correct one."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    label: int
    uid: str

    def __post_init__(self) -> None:
        if len(self.contexts) != len(self.continuations) or len(self.contexts) < 2:
            raise ValueError(f"{self.uid}: need one context per continuation and at least 2 choices")
        if not 0 <= self.label < len(self.contexts):
            raise ValueError(f"{self.uid}: label {self.label} out of range for {len(self.contexts)} choices")

    @classmethod
    def shared(cls, context: str, continuations: list[str], label: int, uid: str) -> Example:
        """An example whose choices all share one context."""
        return cls((context,) * len(continuations), tuple(continuations), label, uid)

    @property
    def n_choices(self) -> int:
        return len(self.continuations)


def _int_label(value: Any, offset: int = 0) -> int | None:
    """An integer label (minus `offset`), or None for an unlabelled row ('' / None / -1)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    label = int(value) - offset
    return None if label < 0 else label


def _choices(row: Row) -> tuple[list[str], list[str]]:
    choices = row["choices"]
    return [str(t) for t in choices["text"]], [str(lbl) for lbl in choices["label"]]


def _key_label(key: Any, labels: list[str]) -> int | None:
    key = str(key or "").strip()
    return labels.index(key) if key in labels else None


def _qa(question: str) -> str:
    return f"Question: {question.strip()}\nAnswer:"


def arc(row: Row, uid: str) -> Example | None:
    texts, labels = _choices(row)
    label = _key_label(row["answerKey"], labels)
    return None if label is None else Example.shared(_qa(row["question"]), [f" {t}" for t in texts], label, uid)


def obqa(row: Row, uid: str) -> Example | None:
    texts, labels = _choices(row)
    label = _key_label(row["answerKey"], labels)
    return None if label is None else Example.shared(_qa(row["question_stem"]), [f" {t}" for t in texts], label, uid)


def csqa(row: Row, uid: str) -> Example | None:
    return arc(row, uid)


def boolq(row: Row, uid: str) -> Example | None:
    answer = row.get("answer", row.get("label"))
    if answer is None or answer == "":
        return None
    truth = answer if isinstance(answer, bool) else str(answer).strip().lower() in ("true", "1", "yes")
    context = f"{row['passage'].strip()}\nQuestion: {row['question'].strip()}?\nAnswer:"
    return Example.shared(context, [" no", " yes"], int(truth), uid)


def piqa(row: Row, uid: str) -> Example | None:
    label = _int_label(row.get("label"))
    if label is None:
        return None
    return Example.shared(_qa(row["goal"]), [f" {row['sol1'].strip()}", f" {row['sol2'].strip()}"], label, uid)


def siqa(row: Row, uid: str) -> Example | None:
    label = _int_label(row.get("label"), offset=1)
    if label is None:
        return None
    answers = [f" {row[k].strip()}" for k in ("answerA", "answerB", "answerC")]
    return Example.shared(_qa(f"{row['context'].strip()} {row['question'].strip()}"), answers, label, uid)


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ").strip()


def hellaswag(row: Row, uid: str) -> Example | None:
    label = _int_label(row.get("label"))
    if label is None:
        return None
    context = _hellaswag_clean(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
    return Example.shared(context, [f" {_hellaswag_clean(e)}" for e in row["endings"]], label, uid)


def winogrande(row: Row, uid: str) -> Example | None:
    label = _int_label(row.get("answer"), offset=1)
    if label is None:
        return None
    sentence = row["sentence"]
    blank = sentence.index("_")
    rest = " " + sentence[blank + 1 :].strip()
    contexts = tuple(sentence[:blank] + row[k] for k in ("option1", "option2"))
    return Example(contexts, (rest, rest), label, uid)


def sciq(row: Row, uid: str) -> Example | None:
    answers = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    support = row.get("support", "").strip()
    context = f"{support}\nQuestion: {row['question'].strip()}\nAnswer:".lstrip()
    return Example.shared(context, [f" {a.strip()}" for a in answers], 3, uid)


def _copa_choice(text: str) -> str:
    return " " + text[0].lower() + text[1:]


def copa(row: Row, uid: str) -> Example | None:
    label = _int_label(row.get("label"))
    if label is None:
        return None
    connector = {"cause": " because", "effect": " therefore"}[row["question"]]
    context = row["premise"].strip()[:-1] + connector
    return Example.shared(context, [_copa_choice(row["choice1"]), _copa_choice(row["choice2"])], label, uid)


FORMATTERS: dict[str, Callable[[Row, str], Example | None]] = {
    "boolq": boolq,
    "piqa": piqa,
    "siqa": siqa,
    "hellaswag": hellaswag,
    "winogrande": winogrande,
    "arc_e": arc,
    "arc_c": arc,
    "obqa": obqa,
    "sciq": sciq,
    "copa": copa,
    "csqa": csqa,
}


def to_examples(name: str, rows: list[Row], split: str) -> tuple[list[Example], int]:
    """The examples of a set's rows and the number of unlabelled rows that were skipped."""
    fmt = FORMATTERS[name]
    out: list[Example] = []
    for i, row in enumerate(rows):
        ex = fmt(row, f"{name}/{split}/{i}")
        if ex is not None:
            out.append(ex)
    return out, len(rows) - len(out)
