"""Corpora, tokenizer fallback, batching (padding masked from the loss, packing), token caches, corpus sizes and
deterministic data order."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import tasks.base
from tasks.llm_pretrain import LLMPretrainTask, data
from tasks.llm_pretrain.data import Batcher, CorpusSize, bpe_tokenizer, c4_corpus, offline_corpus
from tasks.llm_pretrain.model import build_llama, llama_config
from tasks.llm_pretrain.task import data_budget, shifted_targets, token_loss_sum

SOURCES = ["wikipedia", "shakespeare", "kjv"]


@pytest.fixture(scope="module")
def corpus() -> data.Corpus:
    return offline_corpus(SOURCES, val_fraction=0.05, seed=0, max_doc_chars=1200, packing=False)


@pytest.fixture(scope="module")
def packed() -> data.Corpus:
    """The fallback as a run gets it by default: whole documents, packed."""
    cfg = LLMPretrainTask().config("smoke", {"data_source": "offline"})
    return offline_corpus(SOURCES, cfg.val_fraction, seed=0, max_doc_chars=None)


@pytest.fixture(scope="module")
def tokenizer(corpus: data.Corpus) -> data.TextTokenizer:
    return bpe_tokenizer(corpus.tokenizer_text, 2048, corpus.source)


def test_offline_corpus_is_real_text_with_a_disjoint_validation_split(corpus: data.Corpus) -> None:
    assert corpus.source == "offline:wikipedia+shakespeare+kjv"
    train = set(corpus.tokenizer_text())
    val = list(corpus.validation())
    assert len(train) > 10_000 and len(val) > 500
    assert not train & set(val)
    text = " ".join(itertools.islice(corpus.train(0), 200))
    assert " the " in text and len(text) > 50_000


def test_offline_order_is_seeded_and_resumable(corpus: data.Corpus) -> None:
    n = corpus.info["train_docs"]
    first = list(itertools.islice(corpus.train(0), n + 20))
    assert list(itertools.islice(corpus.train(n - 5), 25)) == first[n - 5 :]
    assert first[:50] == list(itertools.islice(corpus.train(0), 50))
    other = offline_corpus(SOURCES, val_fraction=0.05, seed=1, max_doc_chars=1200)
    assert list(itertools.islice(other.train(0), 50)) != first[:50]
    assert first[n : n + 20] != first[:20]  # a new permutation each epoch


def test_hub_probe_respects_offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks.base, "_HUB_REACHABLE", None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert tasks.base.hub_offline_reason() is not None


@pytest.mark.slow
def test_padding_is_masked_and_excluded_from_the_loss(corpus: data.Corpus, tokenizer: data.TextTokenizer) -> None:
    b = Batcher(corpus.train_tokens(tokenizer), tokenizer.pad_id, seq_len=256, batch_size=8, packing=False)
    ids, labels = b.next()
    pad = labels == -100
    assert pad.any() and (ids[pad] == tokenizer.pad_id).all()
    lengths = (~pad).sum(1)
    assert all(ids[r, lengths[r] - 1] == tokenizer.eos_id for r in range(8))  # each document ends with EOS
    assert (lengths <= 256).all() and (lengths == 256).any()  # truncation keeps the final EOS
    torch.manual_seed(0)
    model = build_llama(llama_config("tiny", tokenizer.vocab_size))
    targets = shifted_targets(labels)
    assert int((targets != -100).sum()) == int((lengths - 1).sum())
    with torch.no_grad():
        loss = token_loss_sum(model, ids, targets)
        garbage = torch.where(pad, torch.randint_like(ids, 0, tokenizer.vocab_size), ids)
        assert torch.equal(token_loss_sum(model, garbage, targets), loss)


@pytest.mark.slow
def test_packing_fills_every_position(packed: data.Corpus, tokenizer: data.TextTokenizer) -> None:
    """>= 97% of the positions of every training batch are real tokens: here all of them, over a whole epoch."""
    assert packed.packing and packed.info["train_docs"] < 13_000  # whole documents, not 1200-character pieces
    b = Batcher(packed.train_tokens(tokenizer), tokenizer.pad_id, seq_len=256, batch_size=64, packing=True)
    eos = 0
    while b.docs < packed.info["train_docs"]:
        ids, labels = b.next()
        assert ids.shape == (64, 256) and torch.equal(ids, labels)
        assert (labels != -100).float().mean() >= 0.97 and not (ids == tokenizer.pad_id).any()
        eos += int((ids == tokenizer.eos_id).sum())
    assert eos >= packed.info["train_docs"] - 2  # documents are EOS-separated
    text = "".join(itertools.islice(packed.train(0), 1))
    first = next(packed.train_tokens(tokenizer)(0))
    assert list(first) == tokenizer.encode([text])[0]  # the cached tokens are the tokenizer's


def test_tokenized_corpus_is_cached_once(packed: data.Corpus, tokenizer: data.TextTokenizer) -> None:
    size = packed.size(tokenizer)
    files = list((tasks.base.cache_dir() / "tokens").glob("*offsets.npy"))
    assert files and size.how == "counted" and 10_000_000 > size.tokens > 1_000_000
    before = {f: f.stat().st_mtime_ns for f in files}
    again = offline_corpus(SOURCES, 0.05, seed=1, max_doc_chars=None)  # another trial: same content, other seed
    assert again.size(tokenizer) == size
    assert {f: f.stat().st_mtime_ns for f in files} == before
    assert list(itertools.islice(again.train_tokens(tokenizer)(0), 1))[0].tolist() != \
        list(itertools.islice(packed.train_tokens(tokenizer)(0), 1))[0].tolist()  # seeded order


@pytest.mark.parametrize("prefix", [
    "+".join(["offline_wikipedia", "scientific-python-docs", "tool-manuals", "dictionaries"] * 6),  # past 255 bytes
    "c4_local_shards.v2",  # a dot: the part after it is part of the name
])
def test_token_cache_keys_that_differ_late_get_files_of_their_own(
        prefix: str, tokenizer: data.TextTokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The large corpus names its fourteen sources in its key: the cache files' names stay under the file system's
    255 bytes, and keys that differ only past the cut, or only after a dot, get files of their own."""
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path))
    docs = ["The quick brown fox jumps over the lazy dog.", "A second document, with other words in it."]
    first = data.TokenizedDocs.cached(docs, tokenizer, f"{prefix}-whole-1234")
    second = data.TokenizedDocs.cached(docs[:1], tokenizer, f"{prefix}-whole-5678")
    files = sorted(p.name for p in (tmp_path / "tokens").glob("*.npy"))
    assert len(files) == 4 and all(len(f) < 160 for f in files), files
    assert len(first) == 2 and len(second) == 1
    assert list(first.ids[first.offsets[0] : first.offsets[1]]) == list(second.ids)


def test_data_budget_states_passes_and_flags_multi_epoch() -> None:
    cfg = LLMPretrainTask().config("mini")
    tokens = cfg.steps * cfg.batch_size * cfg.seq_len
    one = data_budget(cfg, True, CorpusSize(tokens * 2, 10**9, "counted"))
    assert one["params"]["data.passes"] == 0.5 and one["tags"]["data_epochs"] == "single pass"
    many = data_budget(cfg, True, CorpusSize(tokens // 3, 10**9, "counted"))
    assert many["params"]["data.passes"] == pytest.approx(3.0, rel=1e-3)
    assert many["tags"]["data_epochs"] == "multi-epoch"
    padded = data_budget(cfg, False, CorpusSize(tokens * 2, cfg.steps * cfg.batch_size // 2, "counted"))
    assert padded["params"]["data.passes"] == 2.0  # truncate-and-pad: one document per sequence


@pytest.mark.parametrize("packing", [False, True])
def test_batcher_resumes_at_the_same_batch(corpus: data.Corpus, packed: data.Corpus, tokenizer: data.TextTokenizer,
                                           packing: bool) -> None:
    docs = (packed if packing else corpus).train_tokens(tokenizer)
    a = Batcher(docs, tokenizer.pad_id, seq_len=32, batch_size=4, packing=packing)
    for _ in range(3):
        a.next()
    state = a.state_dict()
    assert not packing or len(state["carry"]) > 0  # a packed position is mid-document
    expected = [a.next() for _ in range(3)]
    b = Batcher(docs, tokenizer.pad_id, seq_len=32, batch_size=4, packing=packing, state=state)
    for (ids, labels), (ids2, labels2) in zip(expected, (b.next() for _ in range(3)), strict=True):
        assert torch.equal(ids, ids2) and torch.equal(labels, labels2)


def test_local_c4_shards(tmp_path: Path, corpus: data.Corpus, tokenizer: data.TextTokenizer,
                         write_c4_shards: Callable) -> None:
    docs = write_c4_shards(tmp_path)
    c4 = c4_corpus(str(tmp_path), "allenai/c4", "en", seed=0, shuffle_buffer=50, tokenizer_docs=100)
    assert c4.source.startswith("c4:local:") and not c4.packing  # the papers' truncate-and-pad
    exact = sum(map(len, tokenizer.encode(docs[:300])))
    assert c4.size(tokenizer) == CorpusSize(exact, 300, "counted")
    sampled = c4_corpus(str(tmp_path), "allenai/c4", "en", 0, 50, 100, size_sample_docs=100).size(tokenizer)
    assert sampled.how == "estimated" and sampled.tokens == pytest.approx(exact, rel=0.5)
    assert sampled.documents == pytest.approx(300, rel=0.5)
    first = list(itertools.islice(c4.train(0), 400))  # more than one pass
    assert list(itertools.islice(c4.train(123), 50)) == first[123:173]
    assert len(list(c4.validation())) == 60
    assert len(list(c4.tokenizer_text())) == 100
    with pytest.raises(FileNotFoundError):
        c4_corpus(str(tmp_path / "missing"), "allenai/c4", "en", 0, 10, 10)


def test_transformers_tokenizer_path_leaves_t5_sentinels_out(tmp_path: Path, tokenizer: data.TextTokenizer) -> None:
    """A T5-style tokenizer (sentinels <extra_id_N> at the end of the vocabulary) gives the model its base vocab."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    path = next((tasks.base.cache_dir() / "tokenizers").glob("bpe2048-*.json"))
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(path)), pad_token="<pad>",
                                   eos_token="</s>", unk_token="</s>")
    fast.add_special_tokens({"additional_special_tokens": [f"<extra_id_{i}>" for i in range(100)]})
    fast.save_pretrained(tmp_path)
    t5_like = data.hf_tokenizer(str(tmp_path), local_only=True)
    assert t5_like.vocab_size == tokenizer.vocab_size == 2048
    assert (t5_like.pad_id, t5_like.eos_id) == (0, 1)
    ids = t5_like.encode(["The King <extra_id_3> said"])[0]
    assert ids[-1] == 1 and max(ids) < 2048
    assert 1 in ids[:-1]  # the sentinel, beyond the model vocabulary, became <unk> (here the EOS token)


def test_forced_c4_without_a_source_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks.base, "_HUB_REACHABLE", False)
    cfg = LLMPretrainTask().config("smoke", {"data_source": "c4"})
    with pytest.raises(RuntimeError, match="not reachable"):
        data.prepare_data(cfg.data_settings(), seed=0)


@pytest.mark.slow
def test_smoke_run_on_local_c4_shards(tmp_path: Path, run_task: Callable, write_c4_shards: Callable) -> None:
    write_c4_shards(tmp_path)
    run = run_task({"c4_path": str(tmp_path), "tokenizer": "bpe", "bpe_train_docs": 300, "steps": 10,
                    "eval_every": 10, "checkpoint_every": 0})
    assert run.ctx.tags["data_source"] == f"c4:local:{tmp_path.name}"
    assert run.ctx.tags["tokenizer"].startswith("bpe-")
    assert not [r for r in run.logs if r.levelname == "WARNING" and "fallback" in r.getMessage()]
    assert math.isfinite(run.result["val_perplexity"])
    assert run.ctx.params["data.packing"] is False and run.result["real_token_fraction"] < 1.0  # padded documents
    assert run.ctx.params["data.corpus_tokens_source"] == "counted"
