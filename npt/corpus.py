"""Built-in text corpora, made offline from the Python standard library (present wherever Python is).

    docstrings   module, class and function docstrings: English technical prose (~1.5 MB)
    code         functions and methods of the stdlib's source (half of them, ~2.5 MB)
    prose        paragraphs of the language reference shipped in `pydoc_data` (~0.4 MB)
    mixed        all three

Sources are parsed, never imported or run, and read in a fixed order, so a corpus depends only on
the Python version's files. Each is cached as JSON lines under the cache root, keyed by that
version. `--dataset_name embedded:<name>` trains on one of them; the embedded teacher was
trained on `docstrings`. The cache's helpers live here too (its root, a file lock, content hashes
of a corpus and of a file), for everything else this package caches or checks.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import hashlib
import json
import os
import re
import sys
import sysconfig
from pathlib import Path

from .errors import NPTError

PREFIX = "embedded:"
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo", "lib2to3", "__pycache__"}


def cache_root() -> Path:
    return Path(os.environ.get("NPT_CACHE_DIR") or Path.home() / ".cache" / "npt").expanduser()


@contextlib.contextmanager
def file_lock(path: Path):
    """Serialise builders (several processes of one distributed run, or two runs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _stdlib_trees():
    """(path, source, syntax tree) of every stdlib module outside tests and tools, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    for path in sorted(files):
        try:
            source = path.read_text(encoding="utf-8")
            yield path, source, ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are deliberately invalid (e.g. bad-syntax test data)


def stdlib_docstrings(min_chars: int = 40) -> list[str]:
    """Module, class and function docstrings of the standard library, in a fixed order."""
    docs: list[str] = []
    for _, _, tree in _stdlib_trees():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    docs.append(doc)
    return docs


def stdlib_code(keep_one_in: int = 2, min_chars: int = 80, max_chars: int = 4000) -> list[str]:
    """Source of the functions and methods defined at module or class level; a fixed,
    hash-chosen `1/keep_one_in` of them (the whole stdlib is ~11 MB, more than a small teacher uses)."""
    docs: list[str] = []
    for _, source, tree in _stdlib_trees():
        lines = _LINE.findall(source)
        nodes = [n for top in tree.body for n in ([top] if not isinstance(top, ast.ClassDef) else top.body)]
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                text = _segment(lines, node)
                if text and min_chars <= len(text) <= max_chars:
                    if int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=4).digest(), "little") % keep_one_in == 0:
                        docs.append(text)
    return docs


# Lines with their endings, split as `ast.get_source_segment` splits them (on \r\n, \r and \n only).
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")


def _segment(lines: list[str], node: ast.AST) -> str:
    """`ast.get_source_segment(source, node)` on lines split once per file: that function splits
    the whole file again on every call, which made the code corpus take a minute to build.
    Column offsets are UTF-8 byte offsets."""
    first, last = node.lineno - 1, node.end_lineno - 1
    if first == last:
        return lines[first].encode()[node.col_offset : node.end_col_offset].decode()
    head = lines[first].encode()[node.col_offset :].decode()
    tail = lines[last].encode()[: node.end_col_offset].decode()
    return "".join([head, *lines[first + 1 : last], tail])


def reference_prose(min_chars: int = 80) -> list[str]:
    """Paragraphs of the language reference that `pydoc` ships (pydoc_data/topics.py), read as
    a literal, not imported."""
    path = Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"
    if not path.is_file():
        raise NPTError(f"{path} is missing: this Python installation lacks pydoc_data.", "Use another corpus (embedded:docstrings or embedded:code).")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    topics = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "topics")
    return [p.strip() for _, text in sorted(topics.items()) for p in text.split("\n\n") if len(p.strip()) >= min_chars]


BUILDERS = {
    "docstrings": stdlib_docstrings,
    "code": stdlib_code,
    "prose": reference_prose,
    "mixed": lambda: stdlib_docstrings() + stdlib_code() + reference_prose(),
}


def load_corpus(name: str = "docstrings", cache_dir: str | os.PathLike | None = None) -> list[str]:
    """The named corpus, built on first use and cached as JSON lines."""
    if name not in BUILDERS:
        raise NPTError(f"Unknown embedded corpus {name!r}.", f"Use one of: {', '.join(PREFIX + n for n in BUILDERS)}.")
    root = Path(cache_dir) if cache_dir else cache_root()
    # the docstrings file keeps its old name, so caches made by earlier versions stay valid
    stem = "corpus" if name == "docstrings" else f"corpus-{name}"
    path = root / f"{stem}-py{sys.version_info.major}{sys.version_info.minor}.jsonl"
    if not path.is_file():
        with file_lock(root / f".{stem}.lock"):
            if not path.is_file():
                docs = BUILDERS[name]()
                tmp = path.with_suffix(f".tmp-{os.getpid()}")
                with open(tmp, "w", encoding="utf-8") as f:
                    for d in docs:
                        f.write(json.dumps({"text": d}) + "\n")
                os.replace(tmp, path)
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(docs: list[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()
