"""The house keeps its shape: one-way imports in the order of docs/architecture.md, no imports
inside functions, every module importable on its own."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from helpers import ROOT, script_env

# The flow of docs/architecture.md: a module may import only modules before it.
ORDER = ["errors", "logs", "corpus", "gguf", "data", "teachers", "architecture", "kl", "capture", "verify", "layer", "serialization", "distributed",
         "loading", "model", "schedules", "weighting", "losses", "objective", "evaluate", "monitor", "metrics", "divergence", "optim",
         "checkpoint", "run", "config", "provenance", "train", "inject", "commands", "cli"]
PACKAGE = ROOT / "npt"


def modules() -> list[str]:
    return sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def test_every_module_is_placed_in_the_flow_and_imports_only_what_comes_before_it():
    assert modules() == sorted(ORDER)
    for name in ORDER:
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                # `from .x import y`, or `from . import x`
                for imported in [node.module.split(".")[0]] if node.module else [a.name for a in node.names]:
                    assert ORDER.index(imported) < ORDER.index(name), f"npt.{name} imports npt.{imported}, which comes after it"


def test_no_module_imports_inside_a_function():
    for name in ORDER:
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
                assert not inner, f"npt.{name}.{fn.name} imports inside the function (line {inner[0].lineno})"


IMPORT_EACH = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for key in [k for k in sys.modules if k == "npt" or k.startswith("npt.")]:
        del sys.modules[key]  # a fresh package each time; torch and transformers stay loaded
    try:
        importlib.import_module("npt." + name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc(limit=-3))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_each_module_imports_on_its_own():
    """One interpreter (imports of torch and transformers take seconds), a fresh `npt` package per
    module: a cycle or a missing import in any module fails here, whatever was imported before."""
    proc = subprocess.run([sys.executable, "-c", IMPORT_EACH, *ORDER], capture_output=True, text=True, timeout=300, env=script_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
