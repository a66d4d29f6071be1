"""Fixtures: offline environment, a private cache, a small trained teacher (helpers live in helpers.py)."""

from __future__ import annotations

import json
import os
import tempfile

# Before anything imports transformers/datasets: no hub access (each failed call retries ~25 s),
# and a private cache so tests never read or write the user's ~/.cache/npt.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["NPT_CACHE_DIR"] = os.environ.get("NPT_TEST_CACHE_DIR") or tempfile.mkdtemp(prefix="npt-test-cache-")

from pathlib import Path

import pytest
from helpers import TINY_RECIPE

from npt.teachers import TeacherRecipe, build_teacher, ensure_teacher


@pytest.fixture(scope="session")
def trained_teacher_dir(tmp_path_factory) -> Path:
    """A small Llama teacher with its own tokenizer, trained on the embedded corpus, saved to disk
    (so the CLI loads it through the same from_pretrained path a hub id uses). Built through the
    teacher cache (the tests' private one), so that a test which makes it the embedded default's
    recipe finds it built."""
    path = ensure_teacher(TINY_RECIPE, progress=False)
    info = json.loads((path / "build_info.json").read_text())
    assert info["heldout_perplexity"] < 200, info
    return path


@pytest.fixture
def trained_teacher(trained_teacher_dir):
    """A fresh (model, tokenizer) for each test: conversion wraps layers in place."""
    from npt.loading import load_model

    return load_model(str(trained_teacher_dir), "float32", "cpu")


WORDS = "the a list file number value returns object name string error path module function class data".split()


@pytest.fixture(scope="session")
def micro_teacher(tmp_path_factory) -> tuple[Path, Path]:
    """(teacher folder, text file): a 2-layer teacher trained for 30 steps on synthetic sentences, in
    a second; for tests that need a saved model and data but not a good teacher."""
    root = tmp_path_factory.mktemp("micro")
    docs = [" ".join(WORDS[(i * 7 + j * 3 + (i * j) % 5) % len(WORDS)] for j in range(12 + i % 9)) + "." for i in range(400)]
    recipe = TeacherRecipe(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                           seq_len=32, batch_size=8, steps=30, warmup_steps=3)
    build_teacher(root / "teacher", docs, recipe, progress=False)
    text = root / "text.txt"
    text.write_text("\n".join(docs) + "\n")
    return root / "teacher", text
