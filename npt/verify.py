"""A conversion proves itself: on a few tokens, the NPT formula must reproduce the model it wraps.

Attribute checks (`architecture.py`) cannot see how a layer wires its parts: Granite scales both
residual branches (`residual_multiplier`) and divides its logits (`logits_scaling`), BitNet
normalises inside the MLP (`ffn_sub_norm`), StableLM can run attention and MLP in parallel. Such
layers have every part the NPT layer uses and would train, silently, towards something else. So
every conversion runs the teacher once on a fixed random sequence and checks, per converted layer
with input h, attention output a and output t (all recorded by hooks):

    attention      SelfAttn(Norm1(h)), as the NPT layer calls it           == a
    teacher form   h + a + MLP(Norm2(h + a)), from the layer's parts        == t
    NPT form       the fresh NPT layer (B_f = 0) on input h + a             == t
                   (its delta is zero, so it computes h + a + W_d(act(W_g x) * W_u x), x = Norm2(h + a))

and, for the whole model, that the LM head applied to the final hidden state (the path of the
chunked logit KL and the evaluation) gives the model's own logits. Differences are relative to the
size of what is compared (the layer's update t - h, the logits) and must stay within the dtype's
rounding; otherwise the conversion is refused with the layer and the difference named.
"""

from __future__ import annotations

import torch
from torch import nn

from .capture import final_hidden, record_layers
from .errors import UnsupportedArchitectureError

# Relative difference allowed per base-weight dtype: the compared paths run the same operations,
# so they agree to rounding (measured: 0 to 1e-7 in float32); a wrongly wired layer is off by
# 0.1-1 and more.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 2e-2, torch.float16: 5e-3}
PROOF_TOKENS = 16


def _rel(x: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / scale.float().norm().clamp_min(1e-30)).item()


def proof_inputs(model: nn.Module) -> torch.Tensor:
    """Two fixed pseudo-random sequences of `PROOF_TOKENS` tokens (fewer if the model's context
    is shorter)."""
    config = model.config
    length = min(PROOF_TOKENS, getattr(config, "max_position_embeddings", None) or PROOF_TOKENS)
    g = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    return torch.randint(0, config.vocab_size, (2, length), generator=g).to(device)


@torch.no_grad()
def record_teacher(model: nn.Module, layers: dict[int, nn.Module]):
    """The unconverted model's records for the proof: layer records, logits, head(final hidden)."""
    ids = proof_inputs(model)
    with record_layers(layers, attention=True) as records:
        logits = model(input_ids=ids, use_cache=False).logits
    head_logits = model.get_output_embeddings()(final_hidden(model, ids, None))
    return records, logits, head_logits


@torch.no_grad()
def prove_conversion(model: nn.Module, npt_layers: dict, recorded, model_name: str) -> None:
    """Refuse (UnsupportedArchitectureError) where a fresh NPT layer, the teacher's own parts or
    the head path do not reproduce the recorded model."""
    records, logits, head_logits = recorded
    dtype = next(model.parameters()).dtype
    tol = TOLERANCE.get(dtype, 2e-2)
    fix = (
        "This architecture wires its layers differently from a Llama layer (e.g. a residual multiplier, a norm inside "
        "the MLP, parallel attention and MLP, scaled or capped logits), so an NPT layer would learn something else. "
        "Use a Llama-family model (Llama, Mistral, Qwen2, Gemma, ...)."
    )

    allowed = f"(allowed for {str(dtype).removeprefix('torch.')}: {tol:g})"

    def refuse(what: str) -> None:
        raise UnsupportedArchitectureError(f"{model_name}: {what}.", fix)

    for idx, npt_layer in npt_layers.items():
        rec = records[idx]
        h, a, t = rec.inputs, rec.attn, rec.outputs
        layer = npt_layer.layer
        checks = (
            ("its attention recomputed as SelfAttn(input_layernorm(h))", lambda: npt_layer.attention(h, **rec.attn_kwargs), a, a),
            ("its output rebuilt as h + a + mlp(post_attention_layernorm(h + a))",
             lambda: h + a + layer.mlp(layer.post_attention_layernorm(h + a)), t, t - h),
            ("a fresh NPT layer on input h + a", lambda: npt_layer.npt_output(h + a, a)[0], t, t - h),
        )
        for what, compute, ref, scale in checks:
            try:
                value = compute()
            except (TypeError, AttributeError, RuntimeError, ValueError) as e:
                refuse(f"decoder layer {idx}: {what} fails ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            diff = _rel(value, ref, scale)
            if not diff <= tol:
                refuse(f"decoder layer {idx}: {what} differs from the layer's own result by {diff:.3g} relative {allowed}")
    diff = _rel(head_logits, logits, logits)
    if not diff <= tol:
        refuse(f"the LM head on the final hidden state differs from the model's own logits by {diff:.3g} relative {allowed}")
