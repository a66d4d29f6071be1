"""Shared fixtures: offline environment, tiny model configs, a small trained teacher."""

from __future__ import annotations

import os
import tempfile

# Before anything imports transformers/datasets: no hub access (each failed call retries ~25 s),
# and a private cache so tests never read or write the user's ~/.cache/npt.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["NPT_CACHE_DIR"] = os.environ.get("NPT_TEST_CACHE_DIR") or tempfile.mkdtemp(prefix="npt-test-cache-")

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from npt.embedded import TeacherRecipe, build_teacher, default_corpus  # noqa: E402

# A teacher small enough to train in ~15 s on 2 cores, trained enough that attention matters.
TINY_RECIPE = TeacherRecipe(
    vocab_size=512, hidden_size=64, intermediate_size=256, num_layers=3, num_heads=4,
    max_position_embeddings=256, seq_len=64, batch_size=32, steps=250, learning_rate=6e-3, warmup_steps=20,
)


def tiny_config(kind: str = "llama", **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    base = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[kind]
    return cls(**(base | overrides))


def tiny_model(kind: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, **overrides), attn_implementation="sdpa")
    return model.eval()


def randomize_adapters(npt, seed: int = 0, scale: float = 0.3) -> None:
    """Give every adapter weight a random value (a fresh adapter has B_f = 0: attention dropped)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in npt.adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="session")
def trained_teacher_dir(tmp_path_factory) -> Path:
    """A small Llama teacher with its own tokenizer, trained on the embedded corpus, saved to disk
    (so the CLI loads it through the same from_pretrained path a hub id uses)."""
    path = tmp_path_factory.mktemp("teacher") / "tiny-teacher"
    info = build_teacher(path, default_corpus(), TINY_RECIPE, progress=False)
    assert info["heldout_perplexity"] < 200, info
    return path


@pytest.fixture
def trained_teacher(trained_teacher_dir):
    """A fresh (model, tokenizer) for each test: conversion wraps layers in place."""
    from npt.loading import load_model

    return load_model(str(trained_teacher_dir), "float32", "cpu")
