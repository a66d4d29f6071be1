"""The docs stay true: their links resolve, the architecture page names only code that exists, and
no figure of an earlier default is left outside CHANGELOG.md."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import npt
import render_results as render
from helpers import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path) -> set[str]:
    return {_slug(m) for m in re.findall(r"(?m)^#+ (.*)$", path.read_text())}


def test_every_relative_link_and_anchor_resolves():
    for doc in [*DOCS, ROOT / "CHANGELOG.md"]:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            assert path.exists(), f"{doc.name}: link to {target}: no such file"
            if anchor and path.suffix == ".md":
                assert anchor in _anchors(path), f"{doc.name}: link to {target}: no such heading"


def _npt_namespace() -> dict[str, object]:
    """Every module of the package and every public name defined in one."""
    names: dict[str, object] = {}
    for info in pkgutil.iter_modules(npt.__path__):
        module = importlib.import_module(f"npt.{info.name}")
        names[info.name] = module
        for name, obj in vars(module).items():
            if getattr(obj, "__module__", None) == module.__name__:
                names.setdefault(name, obj)
    return names


def _exists(expr: str, names: dict[str, object]) -> bool:
    head, *rest = expr.split(".")
    if head not in names:
        return False
    obj = names[head]
    for part in rest:
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def test_the_architecture_page_names_only_code_that_exists():
    text = (ROOT / "docs" / "architecture.md").read_text()
    names = _npt_namespace()
    quoted = re.findall(r"`([^`]+)`", text)
    checked = 0
    for span in quoted:
        for file in re.findall(r"\b([\w/]+\.py)\b", span):  # files: the package's, the tools', the tests'
            assert any((ROOT / d / file).exists() for d in ("npt", "scripts", "tests", ".")), f"{file} (in `{span}`) does not exist"
            checked += 1
        code = re.sub(r"\b[\w/]+\.(py|json|md|sh|log|yaml|safetensors)\b", "", span)
        # Name.attr or module.name, and calls name(...): each must resolve in the package
        for expr in re.findall(r"\b([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)\s*(?=\(|$|\W)", code):
            if expr.split(".")[0] in names or expr.split(".")[0][0].isupper():
                assert _exists(expr, names), f"docs/architecture.md names `{expr}`, which does not exist"
                checked += 1
        for call in re.findall(r"(?<![.\w])([A-Za-z_]\w*)\(", code):  # bare calls (not x.f, whose x may be anyone's)
            if call not in ("print", "len", "range", "dict", "list"):
                assert call in names or any(inspect.isclass(o) and hasattr(o, call) for o in names.values()), \
                    f"docs/architecture.md names `{call}(...)`, which does not exist"
                checked += 1
        if re.fullmatch(r"[A-Z][A-Za-z]+", span):  # a class or dataclass by name
            assert span in names, f"docs/architecture.md names `{span}`, which does not exist"
            checked += 1
    assert checked > 40  # the page does quote the code


# how the docs labelled a figure of another default before the changelog took the history
EARLIER = re.compile(r"previous default|earlier default|default before|defaults ago|the default of an earlier|"
                     r"under earlier defaults|an earlier version|k = 16 \(the", re.I)


def test_no_figure_of_an_earlier_default_outside_the_changelog():
    files = [*DOCS, *sorted((ROOT / "npt").glob("*.py"))]
    # a generated table quotes its run's command and labels as recorded (render_results.py)
    prose = {f: render.BLOCK.sub("", f.read_text()) for f in files}
    hits = [f"{f.relative_to(ROOT)}:{n}: {line.strip()}" for f in files for n, line in enumerate(prose[f].splitlines(), 1)
            if EARLIER.search(line)]
    assert hits == []
