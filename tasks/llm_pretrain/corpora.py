"""The large offline English corpus: manuals, references and dictionaries from Debian's documentation packages.

`SOURCES` is the one table of what it holds (source name, Debian packages, licence, approximate tokens); the README
and the run's output read it. `bash setup.sh --corpus large` runs `main(["build"])`, which
fetches the packages with `apt-get download` and unpacks them with `dpkg -x` (no root, nothing installed on the
system), turns HTML, roff man pages, GNU info and dictd files into plain paragraphs, drops markup, navigation, code
listings, non-English pages and short fragments, removes duplicate paragraphs across all sources (exact hash of the
case-folded, digit-masked paragraph, so copies that differ only in case, spacing or version numbers go too), and
writes one `<source>.jsonl.gz` of documents per source plus `manifest.json` under `corpus_dir()`. The unpacked
packages are deleted afterwards. Nothing is synthetic: every paragraph is text a person wrote for the package.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from html import unescape
from pathlib import Path


@dataclass(frozen=True)
class Source:
    name: str
    packages: tuple[str, ...]  # Debian bookworm packages (apt-get download)
    licence: str  # from the packages' debian/copyright
    approx_tokens: int  # measured after cleaning and deduplication: characters / 4 (LLaMA-2 32k vocabulary: within 3%)
    content: str
    include: tuple[str, ...]  # globs under the unpacked tree


_MAN = ("usr/share/man/man*/*",)
SOURCES: tuple[Source, ...] = (
    Source("debian-manuals",
           ("debian-handbook", "debian-reference-en", "debian-policy", "developers-reference", "maint-guide"),
           "GPL-2+ (handbook also CC-BY-SA-3.0; maint-guide also MIT)", 500_000,
           "The Debian Administrator's Handbook, Debian Reference, Policy, Developer's Reference, "
           "New Maintainers' Guide",
           ("usr/share/doc/debian-handbook/html/en-US/*.html", "usr/share/debian-reference/*.en.html",
            "usr/share/doc/debian-policy/**/*.html", "usr/share/developers-reference/*.html",
            "usr/share/doc/maint-guide/html/*.en.html")),
    Source("python-docs", ("python3.11-doc",), "PSF-2.0", 1_700_000,
           "the Python 3.11 documentation (tutorial, library and language reference, HOWTOs)",
           ("usr/share/doc/python3.11/html/**/*.html",)),
    Source("linux-docs", ("linux-doc-6.1",), "GPL-2", 5_000_000, "the Linux 6.1 kernel documentation",
           ("usr/share/doc/linux-doc-6.1/html/**/*.html",)),
    Source("postgres-docs", ("postgresql-doc-15",), "PostgreSQL", 1_300_000, "the PostgreSQL 15 manual",
           ("usr/share/doc/postgresql-doc-15/html/*.html",)),
    Source("scientific-python-docs",
           ("python-scipy-doc", "python-sklearn-doc", "python-statsmodels-doc", "python-pandas-doc",
            "python-sympy-doc", "python-django-doc", "sphinx-doc"),
           "BSD-3-Clause (sphinx-doc BSD-2-Clause)", 4_100_000,
           "user guides and references of SciPy, scikit-learn, statsmodels, pandas, SymPy, Django, Sphinx",
           tuple(f"usr/share/doc/{p}/html/**/*.html" for p in ("python-scipy-doc", "python-sklearn-doc",
                 "python-statsmodels-doc", "python-pandas-doc", "python-sympy-doc", "python-django-doc",
                 "sphinx-doc"))),
    Source("sage-docs", ("sagemath-doc",), "GPL-2+", 3_100_000,
           "the SageMath tutorial, thematic tutorials, constructions and reference manual (English)",
           ("usr/share/doc/sagemath/html/en/**/*.html",)),
    Source("rust-docs", ("rust-doc",), "MIT OR Apache-2.0", 1_000_000,
           "The Rust Programming Language, the Reference, Rust by Example, the standard library docs",
           ("usr/share/doc/rust-doc/html/**/*.html",)),
    Source("tool-manuals",
           ("erlang-doc", "racket-doc", "cmake-doc", "git-doc", "lilypond-doc-html", "maxima-doc", "octave-doc",
            "gnuplot-doc", "bash-doc"),
           "Apache-2.0 (Erlang), MIT (Racket), BSD-3-Clause (CMake), GPL-2 (Git), GPL-3+/GFDL (LilyPond, Octave, "
           "Bash), GPL-2 (Maxima), gnuplot licence", 6_300_000,
           "manuals of Erlang/OTP, Racket, CMake, Git, LilyPond, Maxima, Octave, gnuplot, Bash",
           ("usr/share/doc/erlang-doc/**/*.html", "usr/share/doc/racket/**/*.html",
            "usr/share/doc/cmake-data/html/**/*.html", "usr/share/doc/git-doc/*.html",
            "usr/share/doc/lilypond/html/**/*.html", "usr/share/doc/maxima-doc/html/*.html",
            "usr/share/doc/octave/**/*.html", "usr/share/doc/gnuplot/htmldocs/*.html", "usr/share/doc/bash/*.html")),
    Source("library-docs",
           ("openjdk-17-doc", "qtbase5-doc-html", "qtdeclarative5-doc-html", "python-astropy-doc", "python-dask-doc",
            "python-sqlalchemy-doc", "python-xarray-doc", "python-pytest-doc", "python-flask-doc", "nodejs-doc",
            "libboost1.74-doc", "tcl8.6-doc"),
           "GPL-2 with Classpath exception (OpenJDK), GFDL-1.3 (Qt), BSD-3-Clause (Astropy, Dask, Flask), MIT "
           "(SQLAlchemy, pytest, Node.js), Apache-2.0 (xarray), BSL-1.0 (Boost), Tcl licence", 8_600_000,
           "the Java 17 API documentation, Qt 5, Astropy, Dask, SQLAlchemy, xarray, pytest, Flask, Node.js, Boost and "
           "Tcl manuals",
           ("usr/share/doc/openjdk-17-jre-headless/api/**/*.html", "usr/share/qt5/doc/**/*.html",
            *(f"usr/share/doc/{p}/html/**/*.html" for p in ("python-astropy-doc", "python-dask-doc",
              "python-sqlalchemy-doc", "python-xarray-doc", "python-pytest-doc", "python-flask-doc")),
            "usr/share/doc/nodejs/api/*.html", "usr/share/doc/libboost1.74-doc/**/*.html", "usr/share/man/man*/*")),
    Source("man-pages", ("manpages", "manpages-dev", "freebsd-manpages", "perl-doc"),
           "Linux man-pages copyleft / GPL-2+, BSD-2-Clause (FreeBSD), GPL-1+ or Artistic (Perl)", 4_100_000,
           "Linux and FreeBSD manual pages (commands, system calls, C library, devices) and the Perl manual",
           _MAN),
    Source("dictionaries", ("dict-gcide", "dict-wn", "dict-foldoc", "dict-jargon", "dict-devil"),
           "GPL-3+ (GCIDE), WordNet 3.0 licence, GFDL-1.1+ (FOLDOC), public domain (Jargon File, Devil's "
           "Dictionary)", 15_400_000,
           "GNU Collaborative International Dictionary of English (Webster 1913 and more), WordNet, FOLDOC, the "
           "Jargon File, Bierce's The Devil's Dictionary",
           ("usr/share/dictd/*.dict.dz",)),
)
SOURCE_NAMES: tuple[str, ...] = tuple(s.name for s in SOURCES)
INSTALL = "bash setup.sh --corpus large"
_BY_NAME = {s.name: s for s in SOURCES}


def corpus_dir() -> Path:
    """Where the built corpus lives (`$BENCH_CORPUS_DIR`, default `$BENCH_CACHE/corpora`)."""
    from tasks.base import cache_dir

    return Path(os.environ.get("BENCH_CORPUS_DIR") or cache_dir() / "corpora")


def installed_root(name: str) -> Path | None:
    """The folder holding source `name`'s built documents, or None when it is not built."""
    root = corpus_dir()
    return root if (root / f"{name}.jsonl.gz").exists() else None


def installed() -> list[str]:
    """The built sources, in table order."""
    return [n for n in SOURCE_NAMES if installed_root(n)]


def describe(train_chars: int, used: str) -> str:
    """One line for the run's output: the set's size and, when the large set is not used, how to get it."""
    size = f"about {train_chars / 4e6:.0f}M tokens (characters / 4), far smaller than C4"
    if any(n in used for n in SOURCE_NAMES):
        return f"{size}; includes the large Debian documentation set"
    total = sum(s.approx_tokens for s in SOURCES) / 1e6
    return f"{size}; a larger real set (about {total:.0f}M tokens) installs with `{INSTALL}`"


def documents(root: Path, name: str) -> Iterator[str]:
    """The cleaned documents of one built source: paragraphs separated by blank lines."""
    with gzip.open(root / f"{name}.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def reader(name: str) -> Callable[[Path, int], Iterator[str]]:
    """A document iterator for `name` in the shape of the other offline sources: pieces of at most `max_chars`."""

    def read(root: Path, max_chars: int) -> Iterator[str]:
        from tasks.llm_pretrain.data import _chunks

        for doc in documents(root, name):
            yield from _chunks(doc.split("\n\n"), max_chars, "\n\n")

    return read


# ----------------------------------------------------------------------------------------------------------------
# Markup to paragraphs

_BLOCK = frozenset({"p", "div", "li", "dd", "dt", "h1", "h2", "h3", "h4", "h5", "h6", "td", "th", "tr", "br",
                    "blockquote", "section", "article", "table", "caption", "figcaption", "ul", "ol", "dl", "main",
                    "body", "hr"})
_SKIP_TAGS = ("script", "style", "head", "nav", "header", "footer", "pre", "svg", "form", "button", "select",
              "textarea", "noscript", "iframe", "math")
_SKIP_MARK = re.compile(  # a whole class / id / role token of navigation, page chrome or code
    r"(?<!\S)(?:nav(bar|igation)?\S*|wy-nav-side|wy-side\S*|wy-breadcrumbs\S*|rst-versions|rst-footer\S*|\S*sidebar\S*|"
    r"related|footer\S*|header|headerlink|highlight\S*|breadcrumbs?|search\S*|toctree-wrapper|toc|copyright|menu\S*|"
    r"line-numbers?|mw-\S+)(?!\S)", re.I)


def html_blocks(raw: bytes) -> list[str]:
    """Visible text of the content blocks of an HTML page, one block per item (navigation and code dropped)."""
    import lxml.html
    from lxml import etree

    try:  # UTF-8 when the bytes are valid UTF-8 (pages often do not declare it), else what the page declares
        raw.decode("utf-8")
        parser = lxml.html.HTMLParser(encoding="utf-8")
    except UnicodeDecodeError:
        parser = None
    try:
        root = lxml.html.document_fromstring(raw, parser=parser)
    except (etree.ParserError, ValueError):
        return []
    etree.strip_elements(root, *_SKIP_TAGS, etree.Comment, etree.ProcessingInstruction, with_tail=False)
    marked = [el for el in root.xpath("//*[@class or @id or @role]")
              if _SKIP_MARK.search(f"{el.get('class')} {el.get('id')} {el.get('role')}")]
    for el in marked:
        if el.getparent() is not None:
            el.drop_tree()  # keeps the text that follows it
    for el in root.iter(*_BLOCK):
        el.tail = "\ue000" + (el.tail or "")
        el.text = "\ue000" + (el.text or "")
    return root.text_content().split("\ue000")


_ROFF_FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)")
_ROFF_ESC = re.compile(r"\\(\(..|\[[^\]]*\]|\*\(..|\*\[[^\]]*\]|\*.|s[-+]?\d+|[&|^%:,/0 ~]|n\[[^\]]*\]|n.)")
_ROFF_CHARS = {"\\(em": "—", "\\(en": "–", "\\[em]": "—", "\\[en]": "–", "\\(aq": "'", "\\[aq]": "'",
               "\\(dq": '"', "\\(lq": '"', "\\(rq": '"', "\\(oq": "'", "\\(cq": "'", "\\(bu": "•", "\\(co": "©",
               "\\(mu": "×", "\\(<=": "≤", "\\(>=": "≥", "\\(ti": "~", "\\(ha": "^", "\\(rs": "\\"}
_ROFF_TEXT_MACROS = {"B", "I", "BI", "BR", "IB", "IR", "RB", "RI", "SM", "SB", "SH", "SS", "Nm", "Nd", "Sh", "Ss",
                     "Fn", "Fa", "Ar", "Em", "Sy", "Pa", "Dv", "Ev", "Er", "Cm", "Va", "Xr", "Ql", "Dq", "Sq", "Li",
                     "Ic", "Fl", "Ft", "Vt", "Tn", "Ux", "Bx", "At", "St"}


def _roff_inline(s: str) -> str:
    for k, v in _ROFF_CHARS.items():
        s = s.replace(k, v)
    s = _ROFF_FONT.sub("", s).replace("\\-", "-").replace("\\e", "\\").replace("\\(", "")
    return _ROFF_ESC.sub(lambda m: " " if m.group(1) in ("0", " ", "~") else "", s)


def roff_blocks(text: str) -> list[str]:
    """Man page source (man or mdoc macros) to text blocks: requests dropped, text macros kept, code (.nf/.EX) out."""
    out: list[str] = []
    literal = False
    for line in text.splitlines():
        if line.startswith(("'\\\"", ".\\\"", "\\\"")):
            continue
        if line.startswith((".", "'")):
            parts = line[1:].split(None, 1)
            req = parts[0] if parts else ""
            if req in ("nf", "EX", "Bd", "Vb"):  # no-fill, example, display and pod2man verbatim blocks
                literal = True
            elif req in ("fi", "EE", "Ed", "Ve"):
                literal = False
            if req in _ROFF_TEXT_MACROS and len(parts) > 1 and not literal:
                words = re.findall(r'"[^"]*"|\S+', parts[1])
                text_part = " ".join(w.strip('"') for w in words)
                if req in ("SH", "SS", "Sh", "Ss"):
                    out += ["\n", text_part.title(), "\n"]
                elif req == "Xr" and len(words) > 1:
                    out.append(f"{words[0]}({words[1]})")
                else:
                    out.append(text_part)
            elif req not in ("", "fi"):
                out.append("\n")
            continue
        if literal:
            continue
        out.append(line if line.strip() else "\n")
    return _roff_inline(" ".join(out)).split("\n")


def info_blocks(text: str) -> list[str]:
    """A GNU info file to blocks: node headers, menus and the tag table dropped."""
    out: list[str] = []
    for node in text.split("\x1f"):
        lines = node.strip("\n").split("\n")
        if not lines or not lines[0].startswith("File:"):
            continue
        in_menu = False
        for line in lines[1:]:
            if line.startswith("* Menu:"):
                in_menu = True
            elif not line.strip():
                in_menu = False
            if in_menu or re.match(r"\s*[*=\-]{3,}\s*$", line):
                out.append("")
                continue
            out.append(line)
    return "\n".join(out).split("\n\n")


_DICT_NOISE = re.compile(r"\[(?:1913 Webster|PJC|WordNet 1\.5|Century Dict\.|Webster 1828)[^\]]*\]|<[^>]{1,40}>|"
                         r"\{([^{}]*)\}|\\([^\\]*)\\")


DICT_DOC_CHARS = 2000  # consecutive dictionary entries make one document of about this size


def dictd_documents(dict_path: Path) -> Iterator[list[str]]:
    """Entries of a dictd database (`.dict.dz` with its `.index`) in index order, each a paragraph, grouped into
    documents of about `DICT_DOC_CHARS`."""
    data = gzip.open(dict_path, "rb").read()
    index = dict_path.with_name(dict_path.name.removesuffix(".dict.dz") + ".index")
    b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def num(s: str) -> int:
        n = 0
        for ch in s:
            n = n * 64 + b64.index(ch)
        return n

    seen: set[int] = set()
    group: list[str] = []
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00database"):
            continue
        off = num(parts[1])
        if off in seen:
            continue
        seen.add(off)
        entry = data[off: off + num(parts[2])].decode("utf-8", errors="replace")
        entry = _DICT_NOISE.sub(lambda m: m.group(1) or m.group(2) or "", entry)
        group += [re.sub(r"\s+", " ", block) for block in entry.split("\n\n")]
        if sum(map(len, group)) >= DICT_DOC_CHARS:
            yield group
            group = []
    if group:
        yield group


# ----------------------------------------------------------------------------------------------------------------
# Paragraph filters and the English check

_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")
_NOT_LETTER = re.compile(r"[^\w\s]|[\d_]")
_FUNCTION_WORDS = frozenset("the of and to a in is that for it as with be on by this are or not an from at which "
                            "can if you its was has have will when all these any may more one such each other".split())
MIN_WORDS = 6
MIN_DOC_CHARS = 300


def clean_paragraph(text: str) -> str | None:
    """A paragraph worth keeping, whitespace collapsed, or None (too short, mostly symbols or code)."""
    text = re.sub(r"\s+", " ", unescape(text)).strip().replace("\u00b6", "")
    words = _WORD.findall(text)
    if len(words) < MIN_WORDS:
        return None
    if len(_NOT_LETTER.findall(text)) > 0.25 * len(text) or text.count("{") + text.count(";") > len(words) / 4:
        return None
    return text


def is_english(paragraphs: list[str]) -> bool:
    words = [w.lower() for p in paragraphs for w in _WORD.findall(p)]
    return bool(words) and sum(w in _FUNCTION_WORDS for w in words) >= 0.12 * len(words)


def _norm_key(paragraph: str) -> bytes:
    norm = re.sub(r"\d+", "0", re.sub(r"[\W_]+", " ", paragraph.casefold())).strip()
    return hashlib.blake2b(norm.encode("utf-8"), digest_size=12).digest()


def file_documents(path: Path) -> list[list[str]]:
    """The raw blocks of one unpacked file, as a list of documents (one for a page; one per entry for dictionaries)."""
    name = path.name
    if name.endswith(".dict.dz"):
        return list(dictd_documents(path))
    raw = gzip.open(path, "rb").read() if name.endswith(".gz") else path.read_bytes()
    if re.search(r"\.html?(\.gz)?$", name):
        return [html_blocks(raw)]
    text = raw.decode("utf-8", errors="replace")
    if ".info" in name:
        return [info_blocks(text)]
    if re.search(r"\.\d\w*(\.gz)?$", name):
        return [roff_blocks(text)]
    return [text.split("\n\n")]


def _clean_file(path: Path) -> list[list[str]]:
    docs = []
    for blocks in file_documents(path):
        paragraphs = [p for p in map(clean_paragraph, blocks) if p]
        if paragraphs and is_english(paragraphs):
            docs.append(paragraphs)
    return docs


# ----------------------------------------------------------------------------------------------------------------
# Building


def _fetch(packages: Iterable[str], debs: Path) -> None:
    debs.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if not list(debs.glob(f"{p}_*.deb"))]
    if missing:
        done = subprocess.run(["apt-get", "download", "-q", *missing], cwd=debs, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"apt-get download {' '.join(missing)} failed:\n{done.stderr}")


def write_source(files: Iterable[Path], out_path: Path, seen: set[bytes],
                 imap: Callable[..., Iterable[list[list[str]]]] = map) -> dict[str, int]:
    """Clean `files` (in order) into gzipped JSON lines of documents at `out_path`, skipping every paragraph whose
    key is already in `seen` (which grows) and documents left shorter than `MIN_DOC_CHARS`; returns counts."""
    counts = {"documents": 0, "chars": 0, "duplicate_paragraphs_dropped": 0}
    part = out_path.with_name(out_path.name + ".tmp")
    with gzip.open(part, "wt", encoding="utf-8", compresslevel=6) as out:
        for docs in imap(_clean_file, files):
            for paragraphs in docs:
                kept = []
                for p in paragraphs:
                    key = _norm_key(p)
                    if key in seen:
                        counts["duplicate_paragraphs_dropped"] += 1
                    else:
                        seen.add(key)
                        kept.append(p)
                text = "\n\n".join(kept)
                if len(text) >= MIN_DOC_CHARS:
                    out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                    counts["documents"] += 1
                    counts["chars"] += len(text)
    part.replace(out_path)
    return counts


def build(dest: Path, names: Iterable[str] = SOURCE_NAMES, jobs: int | None = None) -> dict:
    """Fetch, clean and deduplicate the sources `names` (in table order, so earlier sources keep shared paragraphs)
    into `dest`; returns the manifest it writes."""
    dest.mkdir(parents=True, exist_ok=True)
    manifest_path = dest / "manifest.json"
    manifest: dict = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"sources": {}}
    seen: set[bytes] = set()
    t0 = time.time()
    with tempfile.TemporaryDirectory(dir=dest) as tmp, multiprocessing.Pool(jobs) as pool:
        debs = Path(tmp) / "debs"
        for name in names:
            src = _BY_NAME[name]
            t = time.time()
            _fetch(src.packages, debs)
            tree = Path(tmp) / name
            deb_bytes = 0
            for pkg in src.packages:
                deb = next(debs.glob(f"{pkg}_*.deb"))
                deb_bytes += deb.stat().st_size
                subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
            files = sorted({p for g in src.include for p in tree.glob(g) if p.is_file()})
            counts = write_source(files, dest / f"{name}.jsonl.gz", seen,
                                  lambda f, xs: pool.imap(f, xs, chunksize=8))
            shutil.rmtree(tree)
            manifest["sources"][name] = {"packages": list(src.packages), "licence": src.licence, "files": len(files),
                                         **counts, "approx_tokens": counts["chars"] // 4, "download_bytes": deb_bytes,
                                         "seconds": round(time.time() - t, 1)}
            print(f"{name}: {len(files)} files -> {counts['documents']} documents, {counts['chars'] / 1e6:.1f}M chars "
                  f"(~{counts['chars'] / 4e6:.1f}M tokens), {counts['duplicate_paragraphs_dropped']} duplicate "
                  f"paragraphs dropped, {deb_bytes / 1e6:.1f} MB downloaded, {time.time() - t:.0f} s", flush=True)
    manifest["seconds"] = round(time.time() - t0, 1)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.llm_pretrain.corpora", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="fetch and clean the Debian documentation corpus")
    b.add_argument("--dest", type=Path, default=None, help="output folder (default: corpus_dir())")
    b.add_argument("--sources", default=",".join(SOURCE_NAMES), help=f"comma-separated, from {SOURCE_NAMES}")
    b.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.sources.split(",") if n.strip()]
    bad = [n for n in names if n not in _BY_NAME]
    if bad:
        print(f"unknown source(s) {bad}; valid: {', '.join(SOURCE_NAMES)}", file=sys.stderr)
        return 2
    manifest = build(args.dest or corpus_dir(), names, args.jobs)
    total = sum(s["chars"] for s in manifest["sources"].values())
    print(f"built {len(names)} sources: {total / 1e6:.0f}M chars, ~{total / 4e6:.0f}M tokens, "
          f"{manifest['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
