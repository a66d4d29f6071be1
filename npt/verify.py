"""A conversion proves itself: on a few tokens, the NPT formula must reproduce the model it wraps.

Attribute checks (`architecture.py`) see which parts a layer has, not how its forward wires them:
BitNet normalises inside the MLP (`ffn_sub_norm`), a layer may run attention and MLP in parallel,
a model may transform its logits in a way the head path does not know. Such layers would train,
silently, towards something else. So every conversion runs the teacher once on a fixed random
sequence and checks, per converted layer with input h, attention branch a and output t (all
recorded by hooks), in the layer's placement (m its residual multiplier):

    attention      Post_a(SelfAttn(Norm_a(h))), as the NPT layer calls it          == a
    teacher form   u + m Post_f(MLP(Norm_f(u))), u = h + m a, from the layer's parts == t
    NPT form       the fresh NPT layer (B_f = 0) on input u                          == t
                   (its delta is zero and its MLP reads Norm_f(u) through the split gate and up)

and, for the whole model, that the LM head applied to the final hidden state (with the model's
logit divisor and softcap: the path of the chunked logit KL and the evaluation) gives the model's
own logits. Differences are relative to the
size of what is compared (the layer's update t - h, the logits) and must stay within the dtype's
rounding; otherwise the conversion is refused with the layer and the difference named.
"""

from __future__ import annotations

import torch
from torch import nn

from .capture import final_hidden, record_layers
from .kl import LogitHead
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
    head_logits = LogitHead.of(model)(final_hidden(model, ids, None))
    return records, logits, head_logits


@torch.no_grad()
def prove_conversion(model: nn.Module, npt_layers: dict, recorded, model_name: str) -> None:
    """Refuse (UnsupportedArchitectureError) where a fresh NPT layer, the teacher's own parts or
    the head path do not reproduce the recorded model."""
    records, logits, head_logits = recorded
    dtype = next(model.parameters()).dtype
    tol = TOLERANCE.get(dtype, 2e-2)
    fix = (
        "This architecture wires its layers in a way no known placement describes (e.g. a norm inside the MLP, "
        "parallel attention and MLP, an unknown transform of the logits), so an NPT layer would learn something else. "
        "Use a supported family (docs/architectures.md)."
    )

    allowed = f"(allowed for {str(dtype).removeprefix('torch.')}: {tol:g})"

    def refuse(what: str) -> None:
        raise UnsupportedArchitectureError(f"{model_name}: {what}.", fix)

    for idx, npt_layer in npt_layers.items():
        rec = records[idx]
        h, a, t = rec.inputs, rec.attn, rec.outputs
        w = npt_layer.wiring
        m = "" if w.residual_multiplier == 1.0 else f"{w.residual_multiplier:g} "
        u = h + w.residual_multiplier * a
        checks = (
            (f"its attention recomputed as {w.attention_formula()}", lambda: npt_layer.attention(h, **rec.attn_kwargs), a, a),
            (f"its output rebuilt as {w.formula()} ({w.placement})", lambda: npt_layer.teacher_output(h, a), t, t - h),
            (f"a fresh NPT layer on input h + {m}a", lambda: npt_layer.npt_output(u, a)[0], t, t - h),
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
