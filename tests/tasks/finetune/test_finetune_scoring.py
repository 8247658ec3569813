"""Log-likelihood scoring: batched (left-padded) scores equal one-row scores; accuracy rules; a forced answer."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from tasks.finetune.formats import Example
from tasks.finetune.model import smollm2_tokenizer_dir, tiny_llama
from tasks.finetune.scoring import accuracy, choice_pairs, collate, continuation_logprobs, encode_pairs, score_examples
from tasks.finetune.training import FinetuneTrial


@pytest.fixture(scope="module")
def tokenizer() -> object:
    return AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir()))


def test_batched_scores_equal_single_rows(tokenizer: object) -> None:
    model = tiny_llama(tokenizer, seed=0).eval()
    pairs = [("Question: What is 2+2?\nAnswer:", " four"), ("Hi", " there, a longer answer of several tokens"),
             ("A much longer context with many tokens in it, so that the other rows are padded.", " yes")]
    rows = encode_pairs(tokenizer, pairs, max_len=64)
    with torch.no_grad():
        batched, counts = continuation_logprobs(model, collate(rows, tokenizer.pad_token_id, "cpu"))
        for i, row in enumerate(rows):
            ids = torch.tensor([row.ids])
            logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
            want = logp[-row.n_cont - 1 : -1].gather(-1, ids[0, -row.n_cont :, None]).sum()
            assert batched[i].item() == pytest.approx(want.item(), rel=1e-5, abs=1e-4)
            assert counts[i].item() == row.n_cont


def test_the_lm_head_in_chunks_gives_the_same_scores(tokenizer: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scoring sends the predicting hidden states through the LM head a chunk at a time (memory); the chunk size does
    not change a score."""
    from tasks.finetune import scoring

    model = tiny_llama(tokenizer, seed=0).eval()
    pairs = [("Q: one?", " a fairly long answer of many tokens"), ("Q: two?", " b"), ("Q: three, longer?", " c d")]
    batch = collate(encode_pairs(tokenizer, pairs, max_len=64), tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        whole, _ = continuation_logprobs(model, batch)
        monkeypatch.setattr(scoring, "HEAD_CHUNK", 3)
        assert int(batch["cont_mask"].sum()) > 3 * 2
        chunked, _ = continuation_logprobs(model, batch)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)


def test_long_prompts_lose_their_start(tokenizer: object) -> None:
    (row,) = encode_pairs(tokenizer, [("word " * 200, " end")], max_len=16)
    assert len(row.ids) == 16 and row.n_cont >= 1


def test_accuracy_headline_is_length_normalised() -> None:
    ex = Example.shared("q", [" a", " much longer answer"], label=1, uid="x")
    # summed: the short answer wins; per character: the long one.
    scores = accuracy([ex], np.array([-2.0, -6.0]))
    assert scores.acc == 1.0 and scores.acc_sum == 0.0 and scores.predictions == [1]


@pytest.mark.slow
def test_memorised_answers_are_picked(make_config: Callable, tokenizer: object) -> None:
    """A tiny model fine-tuned on four items until it memorises them scores 100% on them, and chance before."""
    cfg = make_config("smoke", steps=40, datasets=["arc_e"], max_train_examples=4, batch_size=4, grad_accum=1,
                      lr=1e-2, warmup_steps=0, schedule="constant")
    trial = FinetuneTrial.create(cfg, "adamw", {}, seed=0)
    items = [Example.shared(ex.contexts[0], list(ex.continuations), ex.label, ex.uid) for ex in trial.sets[0].train]
    assert len(items) == 4 and len(choice_pairs(items)) >= 8
    before = score_examples(trial.model, trial.loaded.tokenizer, items, cfg.max_len, 8, "cpu")
    for _ in range(cfg.steps or 0):
        trial.train_step()
    after = score_examples(trial.model, trial.loaded.tokenizer, items, cfg.max_len, 8, "cpu")
    assert after.acc == 1.0 and after.acc_sum == 1.0
    assert after.predictions == [ex.label for ex in items]
    assert before.acc < 1.0
