"""The embedded default builds offline, from nothing, deterministically, and is cached."""

from __future__ import annotations

import dataclasses
import json

from npt.embedded import TeacherRecipe, corpus_fingerprint, default_corpus, ensure_default_teacher, stdlib_docstrings
from npt.loading import load_model

MICRO = TeacherRecipe(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, seq_len=32, batch_size=4, steps=3, warmup_steps=1)


def test_corpus_is_english_text_of_the_expected_size_and_deterministic(tmp_path):
    docs = default_corpus(tmp_path)
    total = sum(map(len, docs))
    assert 1_000_000 < total < 5_000_000 and len(docs) > 3000
    assert corpus_fingerprint(docs) == corpus_fingerprint(stdlib_docstrings())
    assert sum(" the " in d for d in docs) > len(docs) / 3


def test_default_teacher_builds_from_nothing_offline_and_is_cached(tmp_path, capsys):
    path = ensure_default_teacher(tmp_path, MICRO, progress=True)
    out = capsys.readouterr().out
    assert "held-out perplexity" in out
    info = json.loads((path / "build_info.json").read_text())
    assert info["heldout_perplexity"] > 1 and info["recipe"] == dataclasses.asdict(MICRO)
    model, tok = load_model(str(path), "float32", "cpu")
    assert model.config.model_type == "llama" and model.config.hidden_size == 32
    assert tok("hello")["input_ids"][0] == tok.bos_token_id
    stamp = (path / "build_info.json").stat().st_mtime_ns
    assert ensure_default_teacher(tmp_path, MICRO, progress=False) == path  # cached: not rebuilt
    assert (path / "build_info.json").stat().st_mtime_ns == stamp
    assert not list(tmp_path.glob("*.tmp-*"))  # the build was written atomically
