"""The large offline corpus: markup becomes clean paragraphs, duplicates go, and every built source is English text.

The tests on built sources are skipped until `bash setup.sh --corpus large` has built them.
"""

from __future__ import annotations

import gzip
import itertools
import json
import re
import subprocess
from pathlib import Path
from typing import get_args

import pytest

from tasks.llm_pretrain import LLMPretrainTask, corpora, data
from tasks.llm_pretrain.config import PACKAGE_TEXT, LLMPretrainConfig

ROOT = Path(__file__).resolve().parents[3]
_MARKUP = re.compile(r"</?(?:html|body|div|span|p|a|li|ul|ol|td|tr|table|pre|code|em|strong|h[1-6])\b[^>]*>|"
                     r"&(?:amp|lt|gt|quot|nbsp);|\\f[BIRP]|^\.(?:SH|TH|TP|PP|IP|B|I)\b", re.M)


def test_html_keeps_the_content_and_drops_navigation_code_and_markup() -> None:
    page = b"""<html><head><title>os</title><script>var nav = 1;</script></head><body>
    <div class="sphinxsidebar"><p>Table of contents of this page, with links to all the other pages here.</p></div>
    <div class="body" role="main"><h1>os &mdash; Miscellaneous interfaces<a class="headerlink">&para;</a></h1>
    <p>This module provides a <em>portable</em> way of using operating
    system dependent functionality.</p>
    <div class="highlight"><pre>for name in os.listdir("."):\n    print(name)</pre></div>
    <ul><li>Functions accepting paths accept both bytes and string objects.</li></ul></div>
    <footer>Copyright 2001 Python Software Foundation, all rights reserved by the authors.</footer></body></html>"""
    blocks = [b for b in map(corpora.clean_paragraph, corpora.html_blocks(page)) if b]
    assert blocks == ["This module provides a portable way of using operating system dependent functionality.",
                      "Functions accepting paths accept both bytes and string objects."]


def test_man_page_source_becomes_text() -> None:
    page = r""".\" Copyright notice that is a comment
.TH LS 1 "2023" "GNU coreutils"
.SH NAME
ls \- list directory contents
.SH DESCRIPTION
List information about the FILEs (the current directory by default).
Sort entries alphabetically if none of
.B \-cftuvSUX
nor
.BR \-\-sort " is specified."
.PP
.nf
ls -l /tmp | sort
.fi
.Vb 1
\&    my $x = shift;
.Ve
Mandatory arguments to long options are mandatory for short options too.
"""
    text = " ".join(corpora.roff_blocks(page))
    assert "List information about the FILEs (the current directory by default)." in text
    assert "Sort entries alphabetically if none of -cftuvSUX nor --sort is specified." in re.sub(r"\s+", " ", text)
    assert "ls -l /tmp | sort" not in text and "shift" not in text and "Copyright" not in text
    assert not _MARKUP.search(text)


def _b64(n: int) -> str:
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = ""
    while True:
        n, r = divmod(n, 64)
        out = digits[r] + out
        if not n:
            return out


def test_dictd_entries_are_grouped_into_documents(tmp_path: Path) -> None:
    entries = ["Apple \\Ap\"ple\\, n. [1913 Webster]\n   The fleshy pome or fruit of a rosaceous tree.",
               "Pear \\Pear\\, n.\n   The fleshy pome, or fruit, of a rosaceous tree, Pyrus communis."]
    body = "".join(entries).encode()
    index, off = [], 0
    for word, e in zip(("apple", "pear"), entries, strict=True):
        index.append(f"{word}\t{_b64(off)}\t{_b64(len(e.encode()))}")
        off += len(e.encode())
    (tmp_path / "tiny.dict.dz").write_bytes(gzip.compress(body))
    (tmp_path / "tiny.index").write_text("\n".join(index) + "\n")
    docs = list(corpora.dictd_documents(tmp_path / "tiny.dict.dz"))
    assert docs == [["Apple Ap\"ple, n. The fleshy pome or fruit of a rosaceous tree.",
                     "Pear Pear, n. The fleshy pome, or fruit, of a rosaceous tree, Pyrus communis."]]


def _real_paragraphs(n: int) -> list[str]:
    """Real English paragraphs from the default set's Wikipedia extracts."""
    root = data._package_dir(data.OFFLINE_PACKAGES["wikipedia"])
    if root is None:
        pytest.skip("the default offline text is not installed (bash setup.sh)")
    docs = (d for d in data.wikipedia_documents(root, 10_000) if len(d) > 400)
    return [re.sub(r"\s+", " ", d) for d in itertools.islice(docs, n)]


def test_duplicate_paragraphs_are_dropped_across_files(tmp_path: Path) -> None:
    paras = _real_paragraphs(3)
    html = lambda ps: ("<html><body>" + "".join(f"<p>{p}</p>" for p in ps) + "</body></html>").encode()  # noqa: E731
    (tmp_path / "a.html").write_bytes(html(paras[:2]))
    # the same paragraph again with other case, spacing and digits counts as a duplicate
    (tmp_path / "b.html").write_bytes(html([paras[0].upper().replace(" ", "  "), paras[2]]))
    out = tmp_path / "x.jsonl.gz"
    counts = corpora.write_source([tmp_path / "a.html", tmp_path / "b.html"], out, set())
    docs = [json.loads(line)["text"] for line in gzip.open(out, "rt")]
    assert docs == ["\n\n".join(paras[:2]), paras[2]]
    assert counts["duplicate_paragraphs_dropped"] == 1 and counts["documents"] == 2


def test_a_built_source_is_used_by_default_with_a_disjoint_validation_split(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENCH_CORPUS_DIR", str(tmp_path))
    assert corpora.installed() == []
    assert LLMPretrainConfig().offline_sources == ["wikipedia", "shakespeare", "kjv"]
    assert corpora.INSTALL in corpora.describe(4_000_000, "offline:wikipedia+shakespeare+kjv")
    with gzip.open(tmp_path / "python-docs.jsonl.gz", "wt") as f:
        for p in _real_paragraphs(200):
            f.write(json.dumps({"text": p}) + "\n")
    assert corpora.installed() == ["python-docs"]
    assert LLMPretrainConfig().offline_sources[-1] == "python-docs"
    assert LLMPretrainTask().config("smoke", {}).offline_sources == PACKAGE_TEXT  # smoke stays small and fast
    corpus = data.offline_corpus(["python-docs"], val_fraction=0.1, seed=0, max_doc_chars=1200)
    train, val = list(itertools.islice(corpus.train(0), corpus.info["train_docs"])), list(corpus.validation())
    assert corpus.source == "offline:python-docs" and train and val and not set(train) & set(val)
    assert corpora.INSTALL not in corpora.describe(corpus.info["train_chars"], corpus.source)


def test_every_source_is_a_valid_offline_source() -> None:
    assert set(corpora.SOURCE_NAMES) <= set(get_args(data.OfflineSource))


def test_unknown_source_is_refused_before_any_download(capsys: pytest.CaptureFixture[str]) -> None:
    assert corpora.main(["build", "--sources", "python-docs,c4"]) == 2
    assert "unknown source(s) ['c4']" in capsys.readouterr().err


def test_setup_refuses_an_unknown_corpus_size() -> None:
    done = subprocess.run(["bash", "setup.sh", "--corpus", "huge"], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert done.returncode == 2 and "small or large" in done.stderr


@pytest.mark.parametrize("name", corpora.SOURCE_NAMES)
@pytest.mark.usefixtures("built_corpus")
def test_built_source_is_clean_english(name: str) -> None:
    root = corpora.installed_root(name)
    if root is None:
        pytest.skip(f"{name} is not built; build the large corpus with: {corpora.INSTALL}")
    sample = list(itertools.islice(corpora.reader(name)(root, 1200), 0, 20_000, 40))
    assert len(sample) >= 20
    with_markup = [d for d in sample if _MARKUP.search(d)]
    assert len(with_markup) <= 0.02 * len(sample), with_markup[:3]
    words = [w.lower() for d in sample for w in re.findall(r"[A-Za-z]+", d)]
    assert words.count("the") > 0.02 * len(words)  # English: "the" is about 5% of running words
    letters = [c for d in sample for c in d if c.isalpha()]
    assert sum(c.isascii() for c in letters) > 0.98 * len(letters)
