"""A multi-domain text corpus built from files that every machine of this project has.

Domains (the paper's Code -> Chinese shift has its stand-in in a switch of language or script):

=========  ==========================================================================
python     the Python standard library's source (``sysconfig`` stdlib path)
c          C headers under ``/usr/include``
english    English man pages (sections 1, 5, 8; roff markup stripped) and Debian READMEs
shell      shell scripts (``#!`` sh/bash/dash) and ``*.sh`` files under /usr and /etc
de_fr      German and French man pages
ja_ru      Japanese and Russian man pages
=========  ==========================================================================

Files are put in a fixed pseudo-random order (SHA-1 of the path) and taken until a per-domain
byte cap; one file in ten (by the same hash) is held out for evaluation and workloads. Nothing
is downloaded. :func:`corpus_fingerprint` hashes the selection so a record can say exactly
which text a model saw.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import os
import re
import sysconfig
from dataclasses import dataclass, field
from typing import Dict, List

DOMAINS = ("python", "c", "english", "shell", "de_fr", "ja_ru")
MAX_FILE_BYTES = 400_000


@dataclass
class Document:
    path: str
    text: str


@dataclass
class DomainCorpus:
    name: str
    train: List[Document] = field(default_factory=list)
    heldout: List[Document] = field(default_factory=list)

    def nbytes(self, split: str) -> int:
        return sum(len(d.text.encode("utf-8")) for d in getattr(self, split))


def _hash(path: str) -> int:
    return int(hashlib.sha1(path.encode()).hexdigest()[:12], 16)


def is_heldout(path: str) -> bool:
    return _hash(path) % 10 == 0


def _files(patterns: List[str]) -> List[str]:
    out = set()
    for p in patterns:
        out.update(f for f in glob.glob(p, recursive=True) if os.path.isfile(f) and not os.path.islink(f))
    return sorted(out, key=_hash)


def _walk(root: str, max_files: int = 200_000) -> List[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for fn in sorted(filenames):
            out.append(os.path.join(dirpath, fn))
        if len(out) > max_files:
            break
    return out


def _shell_scripts() -> List[str]:
    cands = set(_files(["/usr/bin/*", "/usr/sbin/*"]))
    for root in ("/etc", "/usr/lib", "/usr/share", "/usr/libexec"):
        for f in _walk(root):
            if f.endswith(".sh") or root in ("/etc", "/usr/libexec"):
                cands.add(f)
    cands = sorted((f for f in cands if os.path.isfile(f) and not os.path.islink(f)), key=_hash)
    out = []
    for f in cands:
        try:
            if os.path.getsize(f) > MAX_FILE_BYTES:
                continue
            with open(f, "rb") as fh:
                head = fh.read(64)
        except OSError:
            continue
        first = head.split(b"\n", 1)[0]
        if f.endswith(".sh") or (first.startswith(b"#!") and re.search(rb"\b(ba|da)?sh\b", first)):
            out.append(f)
    return out


def domain_files(domain: str) -> List[str]:
    if domain == "python":
        std = sysconfig.get_paths()["stdlib"]
        return [f for f in _files([os.path.join(std, "**", "*.py")])
                if "site-packages" not in f and "/test" not in f]
    if domain == "c":
        return _files(["/usr/include/**/*.h"])
    if domain == "english":
        return _files(["/usr/share/man/man1/*", "/usr/share/man/man5/*", "/usr/share/man/man8/*",
                       "/usr/share/doc/*/README*"])
    if domain == "shell":
        return _shell_scripts()
    if domain == "de_fr":
        return _files(["/usr/share/man/de/**/*", "/usr/share/man/fr/**/*"])
    if domain == "ja_ru":
        return _files(["/usr/share/man/ja/**/*", "/usr/share/man/ru/**/*"])
    raise ValueError(f"unknown domain {domain!r}; valid: {DOMAINS}")


_ACCENTS = {"'": "\u0301", "`": "\u0300", "^": "\u0302", ":": "\u0308", ",": "\u0327", "~": "\u0303"}
_NAMED = {"ss": "\u00df", "Fo": "\u00ab", "Fc": "\u00bb", "Bq": "\u201e", "aq": "'", "lq": '"', "rq": '"',
          "dq": '"', "oq": "'", "cq": "'", "em": "-", "en": "-", "bu": "*", "co": "\u00a9", "de": "\u00b0"}


def _accent(m: "re.Match") -> str:
    """groff's two-character glyph names: accent + letter (``\\('e`` is e-acute, ``\\(:u`` u-umlaut)."""
    import unicodedata

    a, b = m.group(1)[0], m.group(1)[1]
    if a in _ACCENTS and b.isalpha():
        return unicodedata.normalize("NFC", b + _ACCENTS[a])
    return _NAMED.get(m.group(1), "")


def _unicode_escape(m: "re.Match") -> str:
    name = m.group(1)
    if name.startswith("u") and all(c in "0123456789ABCDEFabcdef_" for c in name[1:]):
        try:
            return "".join(chr(int(p, 16)) for p in name[1:].split("_"))
        except ValueError:
            return ""
    return _NAMED.get(name, "")


_ROFF_ESCAPES = [
    (re.compile(r"\\\(([^\s]{2})"), _accent),
    (re.compile(r"\\\[([^\]]*)\]"), _unicode_escape),
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes
    (re.compile(r"\\s[+-]?\d+"), ""),  # size changes
    (re.compile(r"\\\(.."), ""),
    (re.compile(r"\\\*(\(..|\[[^\]]*\]|.)"), ""),
    (re.compile(r"\\[&|^%:]"), ""),
    (re.compile(r"\\-"), "-"),
    (re.compile(r"\\e"), "\\\\"),
    (re.compile(r"\\ "), " "),
    (re.compile(r"\\c$"), ""),
]


def roff_to_text(src: str) -> str:
    """Markup-free text of a man page: comments and layout requests dropped, the text
    arguments of font macros (``.B``, ``.IR``, ``.SH`` ...) kept."""
    out = []
    for line in src.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\\\"')):
            continue
        if line.startswith((".", "'")):
            m = re.match(r"^[.'](\S+)\s*(.*)$", line)
            if not m:
                continue
            macro, rest = m.groups()
            if macro in ("B", "I", "R", "BR", "BI", "IB", "IR", "RB", "RI", "SH", "SS", "SM", "SB", "TP", "IP", "Nm", "Nd", "Op", "Ar", "Fl"):
                line = rest.replace('"', "")
            else:
                continue
        for pat, rep in _ROFF_ESCAPES:
            line = pat.sub(rep, line)
        out.append(line)
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def read_document(domain: str, path: str) -> str:
    with open(path, "rb") as f:
        raw = f.read(MAX_FILE_BYTES * 4)
    if path.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError):
            return ""
    text = raw[:MAX_FILE_BYTES].decode("utf-8", errors="replace")
    if "\ufffd" in text[:2000] and domain in ("python", "c", "shell"):
        return ""  # not text
    if domain in ("english", "de_fr", "ja_ru") and "/man/" in path:
        text = roff_to_text(text)
    return text


def build_corpus(max_bytes_per_domain: int = 3_000_000, domains=DOMAINS) -> Dict[str, DomainCorpus]:
    """Train and held-out documents per domain, capped at ``max_bytes_per_domain`` each (the
    held-out share is counted in the cap)."""
    corpus = {}
    for d in domains:
        dc = DomainCorpus(d)
        total = 0
        for path in domain_files(d):
            held = is_heldout(path)
            if total >= max_bytes_per_domain and (dc.heldout or not held):
                if dc.heldout:
                    break
                continue  # past the cap: only look for the first held-out file
            text = read_document(d, path)
            if len(text) < 200:
                continue
            (dc.heldout if held else dc.train).append(Document(path, text))
            total += len(text.encode("utf-8"))
        if not dc.train or not dc.heldout:
            raise RuntimeError(f"domain {d!r}: found no usable text on this machine ({len(dc.train)} train, "
                               f"{len(dc.heldout)} held-out files)")
        corpus[d] = dc
    return corpus


def corpus_fingerprint(corpus: Dict[str, DomainCorpus]) -> str:
    h = hashlib.sha256()
    for d in sorted(corpus):
        for split in ("train", "heldout"):
            for doc in getattr(corpus[d], split):
                h.update(doc.path.encode())
                h.update(hashlib.sha1(doc.text.encode()).digest())
    return h.hexdigest()[:16]
