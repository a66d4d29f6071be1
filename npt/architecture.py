"""What a decoder layer must have to be converted, checked by attribute before any weight is read.

These checks are structural: they refuse a model whose layers lack the parts the NPT formula uses
(in a second, on the meta device, before a 20 GB download). Parts present but wired differently
(a residual multiplier, a norm inside the MLP, parallel attention and MLP) pass them; the
numerical proof in `verify.py` refuses those when the weights are loaded.
"""

from __future__ import annotations

import re

from torch import nn

from .errors import NPTError, UnsupportedArchitectureError

REQUIRED_PARTS = (
    "self_attn",
    "input_layernorm",
    "post_attention_layernorm",
    "mlp",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
    "mlp.act_fn",
)
# Layers that have these do not feed Norm2(h + a) to the MLP (Gemma-2/3, OLMo-2 style).
FORBIDDEN_PARTS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")
SUPPORTED = "Use a Llama-family model (Llama, Mistral, Qwen2, Gemma, ...)."


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of an HF causal LM (`model.model.layers`)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no decoder layer list at `model.model.layers`.",
            "Use a Llama-family causal LM (Llama, Mistral, Qwen2, ...) loaded with AutoModelForCausalLM.",
        )
    return layers


def _has(module: nn.Module, path: str) -> bool:
    obj = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:  # StableLM with parallel residual sets post_attention_layernorm = None
            return False
    return True


def check_layer_supported(layer: nn.Module, idx: int, model_name: str = "model") -> None:
    if hasattr(layer, "adapter") and hasattr(layer, "npt_enabled"):
        raise NPTError(f"Layer {idx} is already an NPT layer.", "Convert the base model, not an NPT model.")
    missing = [p for p in REQUIRED_PARTS if not _has(layer, p)]
    if missing:
        raise UnsupportedArchitectureError(
            f"{model_name}: decoder layer {idx} ({type(layer).__name__}) lacks {', '.join(missing)}; "
            "the NPT layer needs self_attn, input_layernorm, post_attention_layernorm and a gated MLP "
            "(mlp.gate_proj/up_proj/down_proj/act_fn).",
            SUPPORTED,
        )
    extra = [p for p in FORBIDDEN_PARTS if _has(layer, p)]
    if extra:
        raise UnsupportedArchitectureError(
            f"{model_name}: decoder layer {idx} ({type(layer).__name__}) has {', '.join(extra)}, so its MLP "
            "input is not post_attention_layernorm(h + a) and the NPT formula would not apply.",
            SUPPORTED,
        )


def resolve_layers(spec: str | list[int] | None, num_layers: int) -> list[int]:
    """'all', 'upper_half', 'lower_half', or indices and ranges such as '0,2,5-7' (negative
    indices count from the end)."""
    if spec is None or spec == "all":
        return list(range(num_layers))
    if spec == "upper_half":
        return list(range(num_layers // 2, num_layers))
    if spec == "lower_half":
        return list(range(num_layers // 2))
    items: list[int] = []
    parts = spec if isinstance(spec, list) else [p.strip() for p in str(spec).split(",") if p.strip()]
    for part in parts:
        m = re.fullmatch(r"(-?\d+)|(\d+)-(\d+)", str(part))
        if m is None:
            raise NPTError(
                f"--npt_layers {spec!r} is not a layer list.",
                "Use 'all', 'upper_half', 'lower_half', or indices/ranges such as '0,2,5-7'.",
            )
        items.extend([int(m[1])] if m[1] is not None else range(int(m[2]), int(m[3]) + 1))
    resolved = sorted({i + num_layers if i < 0 else i for i in items})
    bad = [i for i in resolved if not 0 <= i < num_layers]
    if bad or not resolved:
        raise NPTError(
            f"--npt_layers {spec!r} names layer(s) {bad or '(none)'} but the model has layers 0..{num_layers - 1}.",
            f"Choose layers between 0 and {num_layers - 1}.",
        )
    return resolved
