"""How a decoder layer is wired, read from its parts before any weight is read; layer selection.

Every dense family the suite converts computes, per layer, with m its residual multiplier (1 but
for Granite):

    u   = h + m Post_a(SelfAttn(Norm_a(h)))                   the attention residual
    out = u + m Post_f(W_d(act(W_g x) * W_u x)),  x = Norm_f(u)   the gated MLP residual

and differs only in which norms exist (`PLACEMENTS`) and in how W_g, W_u are stored (two
matrices, or one fused [2 d_ffn, d_model] `gate_up_proj`, gate half first). `layer_wiring` reads
that from the layer's attributes (in a second, on the meta device, before a 20 GB download) and
refuses, in one line, a layer that fits no placement. Parts present but wired differently (a norm
inside the MLP, parallel attention and MLP, a transform of the logits) pass it; the numerical
proof in `verify.py` refuses those when the weights are loaded.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from .errors import NPTError, UnsupportedArchitectureError

# The norms of a layer, in the order they are looked up, and the placements they make:
# present norms -> (name, Norm_a, Post_a, Norm_f, Post_f). HF names the norm on the attention
# output of sandwich and post-norm layers "post_attention_layernorm", the same name as Llama's
# norm before the MLP: the placement, not the name, says what a norm does.
NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
         "post_self_attn_layernorm", "post_mlp_layernorm")
PLACEMENTS = {
    frozenset({"input_layernorm", "post_attention_layernorm"}):
        ("pre-norm", "input_layernorm", None, "post_attention_layernorm", None),  # Llama, Mistral, Qwen, Gemma 1, Phi-3, GLM, Granite
    frozenset({"input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"}):
        ("sandwich", "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),  # Gemma 2/3
    frozenset({"input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm"}):
        ("sandwich", "input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm"),  # GLM-4
    frozenset({"post_attention_layernorm", "post_feedforward_layernorm"}):
        ("post-norm", None, "post_attention_layernorm", None, "post_feedforward_layernorm"),  # OLMo 2/3
}
SUPPORTED = ("Use a dense decoder of the Llama family or of a known placement: Llama, Mistral, Qwen2/3, Gemma 1/2/3, "
             "OLMo 2/3, Phi-3/4, GLM/GLM-4, Granite (see docs/architectures.md).")


@dataclasses.dataclass(frozen=True)
class Wiring:
    """Where a layer's norms sit (None: no norm there), its residual multiplier m, and how its MLP
    stores the gate and up projections. Methods take the HF decoder layer itself."""

    placement: str
    attn_norm: str | None  # Norm_a
    attn_out_norm: str | None  # Post_a
    mlp_norm: str | None  # Norm_f
    mlp_out_norm: str | None  # Post_f
    fused_gate_up: bool
    act: str  # the MLP's activation attribute
    residual_multiplier: float = 1.0

    @staticmethod
    def apply(layer: nn.Module, norm: str | None, x: torch.Tensor) -> torch.Tensor:
        return x if norm is None else getattr(layer, norm)(x)

    def attention_output_module(self, layer: nn.Module) -> nn.Module:
        """The module whose output is the attention branch Post_a(SelfAttn(Norm_a(h))), called
        exactly once per forward in either mode: what hooks record as the attention output."""
        return getattr(layer, self.attn_out_norm) if self.attn_out_norm else layer.self_attn

    def d_ffn(self, layer: nn.Module) -> int:
        mlp = layer.mlp
        return mlp.gate_up_proj.out_features // 2 if self.fused_gate_up else mlp.gate_proj.out_features

    def gate_weight(self, layer: nn.Module) -> torch.Tensor:
        """W_g: for a fused projection, a view of its gate rows (no copy; an in-place change
        changes the fused weight)."""
        return self.projection(layer, "gate")[0]

    def projection(self, layer: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W, b) of the MLP's `gate`, `up` or `down` projection (b None where it has no bias); a
        fused gate-up projection's halves are views of its weight and bias (no copy)."""
        mlp = layer.mlp
        if name == "down":
            return mlp.down_proj.weight, mlp.down_proj.bias
        if self.fused_gate_up:
            f = self.d_ffn(layer)
            rows = slice(None, f) if name == "gate" else slice(f, None)
            bias = mlp.gate_up_proj.bias
            return mlp.gate_up_proj.weight[rows], None if bias is None else bias[rows]
        proj = mlp.gate_proj if name == "gate" else mlp.up_proj
        return proj.weight, proj.bias

    def gate_up(self, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """W_g x and W_u x; a fused projection runs as its one GEMM and is split as views."""
        mlp = layer.mlp
        if self.fused_gate_up:
            both = mlp.gate_up_proj(x)
            f = both.shape[-1] // 2
            return both[..., :f], both[..., f:]
        return mlp.gate_proj(x), mlp.up_proj(x)

    def activation(self, layer: nn.Module):
        return getattr(layer.mlp, self.act)

    def attention_formula(self) -> str:
        """The attention branch a in this placement, for messages."""
        return _wrap(self.attn_out_norm, f"self_attn({_wrap(self.attn_norm, 'h')})")

    def formula(self) -> str:
        """The teacher layer's output in terms of its input h and attention branch a, for messages."""
        m = "" if self.residual_multiplier == 1.0 else f"{self.residual_multiplier:g} "
        u = f"h + {m}a"
        return f"{u} + {m}{_wrap(self.mlp_out_norm, 'mlp(' + _wrap(self.mlp_norm, u) + ')')}"


def _wrap(norm: str | None, inner: str) -> str:
    return inner if norm is None else f"{norm}({inner})"


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


def layer_wiring(layer: nn.Module, idx: int = 0, model_name: str = "model") -> Wiring:
    """The wiring of an HF decoder layer, or a one-line refusal naming what does not fit."""
    if hasattr(layer, "adapter") and hasattr(layer, "npt_enabled"):
        raise NPTError(f"Layer {idx} is already an NPT layer.", "Convert the base model, not an NPT model.")
    where = f"{model_name}: decoder layer {idx} ({type(layer).__name__})"

    def refuse(why: str) -> UnsupportedArchitectureError:
        return UnsupportedArchitectureError(f"{where} {why}.", SUPPORTED)

    mlp = getattr(layer, "mlp", None)
    if mlp is not None and _has(mlp, "experts"):
        raise refuse("has a mixture-of-experts MLP (mlp.experts): an NPT layer modulates the gate of one dense MLP, "
                     "and an NPT over experts is not built (docs/architectures.md says what it would need)")
    missing = [p for p in ("self_attn", "mlp", "mlp.down_proj") if not _has(layer, p)]
    fused = _has(layer, "mlp.gate_up_proj") and not _has(layer, "mlp.gate_proj")
    if not fused:
        missing += [p for p in ("mlp.gate_proj", "mlp.up_proj") if not _has(layer, p)]
    act = next((a for a in ("act_fn", "activation_fn") if _has(layer, f"mlp.{a}")), None)
    if act is None:
        missing.append("mlp.act_fn")
    if missing:
        raise refuse(f"lacks {', '.join(missing)}; the NPT layer needs self attention and a gated MLP "
                     "(mlp.gate_proj/up_proj or a fused mlp.gate_up_proj, mlp.down_proj, an activation)")
    present = frozenset(n for n in NORMS if _has(layer, n))
    unknown = [n for n, child in layer.named_children() if "norm" in n.lower() and n not in NORMS and child is not None]
    if unknown:
        raise refuse(f"has the norm(s) {', '.join(unknown)}, which no known placement uses")
    if present not in PLACEMENTS:
        pre_norm = {"input_layernorm", "post_attention_layernorm"}
        if present < pre_norm:  # one norm feeding attention and MLP side by side (parallel residual)
            detail = f"lacks {', '.join(sorted(pre_norm - present))}"
        else:
            detail = f"has the norms {', '.join(n for n in NORMS if n in present) or '(none)'}"
        raise refuse(f"{detail}, which is no known placement (pre-norm: input_layernorm, post_attention_layernorm; "
                     "sandwich: the four of Gemma 2/3 or of GLM-4; post-norm: post_attention_layernorm, post_feedforward_layernorm)")
    name, attn_norm, attn_out_norm, mlp_norm, mlp_out_norm = PLACEMENTS[present]
    multiplier = getattr(layer, "residual_multiplier", 1.0)
    if not isinstance(multiplier, (int, float)):
        raise refuse(f"has a residual multiplier of type {type(multiplier).__name__}, not a number")
    return Wiring(name, attn_norm, attn_out_norm, mlp_norm, mlp_out_norm, fused, act, float(multiplier))


def gate_weight(layer: nn.Module, idx: int = 0) -> torch.Tensor:
    """W_g of an HF decoder layer (a view of the gate rows of a fused projection)."""
    return layer_wiring(layer, idx).gate_weight(layer)


def attention_output_module(layer: nn.Module) -> nn.Module:
    """The module whose output is the attention branch, for an HF decoder layer or an NPT layer."""
    wiring = getattr(layer, "wiring", None)
    if wiring is not None:  # an NPT layer: the wrapped layer's module
        return wiring.attention_output_module(layer.layer)
    return layer_wiring(layer).attention_output_module(layer)


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
