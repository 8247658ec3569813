"""Log-likelihood of answer continuations: the multiple-choice scores and the fine-tuning loss share one code path.

A (context, continuation) pair is tokenized as lm-evaluation-harness does: the whole text and the context are
encoded, and the continuation's tokens are those of the whole past the context's length. Sequences longer than
`max_len` lose their first tokens (the start of the prompt; an answer longer than `max_len - 1` tokens keeps its
end). Batches are left-padded so that every continuation ends at the last position. The LM head runs only on the
hidden states that predict a continuation token, `HEAD_CHUNK` of them at a time, not on whole prompts nor on the
padding of short answers beside long ones: the float32 logits over the vocabulary of a whole batch's last positions
are what bounded the rows a scoring forward could take (9.75 GiB at 256 rows of the `mini` sets).

Accuracy of an example: the chosen answer is the argmax over its choices of
- `acc` (the headline): the summed log-likelihood of the continuation divided by its length in characters (the
  lm-evaluation-harness `acc_norm` and LLaMA's convention);
- `acc_sum`: the summed log-likelihood, unnormalised.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tasks.finetune.formats import Example


@dataclass(frozen=True)
class Encoded:
    """Token ids of context + continuation and how many of the last ids are the continuation."""

    ids: list[int]
    n_cont: int


def encode_pairs(tokenizer: object, pairs: Sequence[tuple[str, str]], max_len: int) -> list[Encoded]:
    """Tokenize (context, continuation) pairs; see the module docstring for the rules."""
    if not pairs:
        return []
    contexts = [c for c, _ in pairs]
    wholes = [c + k for c, k in pairs]
    ctx_ids = tokenizer(contexts).input_ids  # type: ignore[operator]
    whole_ids = tokenizer(wholes).input_ids  # type: ignore[operator]
    out: list[Encoded] = []
    for (_, cont), ctx, whole in zip(pairs, ctx_ids, whole_ids, strict=True):
        n_cont = len(whole) - len(ctx)
        if n_cont <= 0 or whole[: len(ctx) - 1] != ctx[: len(ctx) - 1]:
            cont_ids = tokenizer(cont, add_special_tokens=False).input_ids  # type: ignore[operator]
            whole, n_cont = list(ctx) + list(cont_ids), len(cont_ids)
        if n_cont <= 0:
            raise ValueError(f"empty continuation after tokenization: {cont!r}")
        if len(whole) > max_len:
            whole = whole[-max_len:]
            n_cont = min(n_cont, max_len - 1)
        out.append(Encoded(list(whole), n_cont))
    return out


def collate(rows: Sequence[Encoded], pad_id: int | None, device: torch.device | str) -> dict[str, torch.Tensor]:
    """Left-padded ids, attention mask, position ids, the continuation mask over the last K positions and, made on the
    host, its (row, position) indices."""
    pad_id = 0 if pad_id is None else pad_id  # padded positions are masked out: any id does
    width = max(len(r.ids) for r in rows)
    k = max(r.n_cont for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    cont_mask = torch.zeros((len(rows), k), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r.ids) :] = torch.tensor(r.ids, dtype=torch.long)
        mask[i, width - len(r.ids) :] = 1
        cont_mask[i, k - r.n_cont :] = True
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cont_rows, cont_cols = cont_mask.nonzero(as_tuple=True)
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "cont_mask": cont_mask,
             "cont_rows": cont_rows, "cont_cols": cont_cols}
    return {name: t.to(device) for name, t in batch.items()}


# Hidden states that go through the LM head at once: 2048 x 49152 float32 logits of SmolLM2 are 0.4 GB.
HEAD_CHUNK = 2048


def continuation_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its continuation tokens (float32) and their count."""
    cont_mask = batch["cont_mask"]
    rows, cols = batch["cont_rows"], batch["cont_cols"]
    k = cont_mask.shape[1]
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 position_ids=batch["position_ids"], use_cache=False).last_hidden_state
    # the hidden state of the position before each continuation token predicts it
    predicting = hidden[:, -(k + 1) : -1][rows, cols]
    targets = batch["input_ids"][:, -k:][rows, cols]
    head = model.get_output_embeddings()
    lp = torch.cat([
        -F.cross_entropy(head(h).float(), t, reduction="none")
        for h, t in zip(predicting.split(HEAD_CHUNK), targets.split(HEAD_CHUNK), strict=True)
    ])
    token_lp = torch.zeros(cont_mask.shape, dtype=lp.dtype, device=lp.device).index_put((rows, cols), lp)
    return token_lp.sum(-1), cont_mask.sum(-1)


def _batches(order: list[int], rows: list[Encoded], batch_size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


@torch.no_grad()
def score_rows(model: nn.Module, rows: list[Encoded], pad_id: int | None, batch_size: int,
               device: torch.device | str) -> np.ndarray:
    """Summed continuation log-likelihood of every row (longest rows first, so batches pad little)."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].ids))
    scores = np.zeros(len(rows), dtype=np.float64)
    for idx in _batches(order, rows, batch_size):
        lp, _ = continuation_logprobs(model, collate([rows[i] for i in idx], pad_id, device))
        scores[idx] = lp.double().cpu().numpy()
    return scores


@dataclass(frozen=True)
class SetScores:
    """Accuracy of one set and the predictions behind it."""

    acc: float
    acc_sum: float
    n: int
    predictions: list[int]


def accuracy(examples: Sequence[Example], loglik: np.ndarray) -> SetScores:
    """Accuracies from the flat log-likelihoods of every (example, choice), in `choice_pairs` order."""
    norm_hits = sum_hits = 0
    predictions: list[int] = []
    pos = 0
    for ex in examples:
        ll = loglik[pos : pos + ex.n_choices]
        pos += ex.n_choices
        chars = np.array([max(len(c), 1) for c in ex.continuations], dtype=np.float64)
        pred = int(np.argmax(ll / chars))
        predictions.append(pred)
        norm_hits += pred == ex.label
        sum_hits += int(np.argmax(ll)) == ex.label
    n = max(len(examples), 1)
    return SetScores(norm_hits / n, sum_hits / n, len(examples), predictions)


def choice_pairs(examples: Sequence[Example]) -> list[tuple[str, str]]:
    """(context, continuation) of every choice of every example, flat."""
    return [pair for ex in examples for pair in zip(ex.contexts, ex.continuations, strict=True)]


def score_examples(model: nn.Module, tokenizer: object, examples: Sequence[Example], max_len: int,
                   batch_size: int, device: torch.device | str) -> SetScores:
    """Accuracy of `model` on `examples` (the model is put in eval mode and left there)."""
    rows = encode_pairs(tokenizer, choice_pairs(examples), max_len)
    model.eval()
    return accuracy(examples, score_rows(model, rows, tokenizer.pad_token_id, batch_size, device))  # type: ignore[attr-defined]
