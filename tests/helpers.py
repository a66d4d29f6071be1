"""Helpers shared by the tests: tiny model configs, adapter randomisation, the tiny teacher recipe."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from npt.teachers import TeacherRecipe

ROOT = Path(__file__).resolve().parents[1]

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


def script_env(**extra: str) -> dict:
    """The environment for a tool or the main job in a subprocess: the package importable from
    the checkout, whether or not it is installed."""
    return os.environ | {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")} | extra


def read_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the scalars a run wrote to TensorBoard."""
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


@torch.no_grad()
def randomize_adapters(npt_model, seed: int = 0, scale: float = 0.3) -> None:
    """Give every adapter weight a random value (a fresh adapter has B_f = 0: attention dropped),
    for tests that need a student that is not exact."""
    g = torch.Generator().manual_seed(seed)
    for p in npt_model.adapter_parameters():
        p.copy_(torch.randn(p.shape, generator=g).to(p) * scale)
