"""Injection: the weight change that a context makes in an NPT model, made permanent in the base model.

Running freely on a context, NPT layer i turns the attention output a_t at position t into the
gate-weight delta

    dW_i(t) = gamma(a_t) W_g + s * sum_j v_f[j](a_t) v_m[j](a_t)^T          [d_ffn, d_model]

(per token, never materialised while training). Injection takes that delta at chosen positions
(their mean), scales it by alpha and adds it to W_g of layer i of the *base* model, which is then
saved as a plain Hugging Face model folder: what the context taught the layer stays in the weights
without the context in the prompt. How much that helps, and how much it damages, is measured:
the loss of a continuation given a prompt (the context's own second half by default) and the
held-out perplexity, before and after.
"""

from __future__ import annotations

import torch

from .architecture import decoder_layers, gate_weight
from .capture import record_layers
from .errors import NPTError
from .model import NPTModel


def parse_positions(spec: str, length: int) -> list[int]:
    """'last', 'all', or indices such as '0,5,-1' (negative: from the end)."""
    if spec == "last":
        return [length - 1]
    if spec == "all":
        return list(range(length))
    try:
        indices = [int(p) for p in spec.split(",") if p.strip()]
    except ValueError:
        indices = []
    if not indices or not all(-length <= i < length for i in indices):
        raise NPTError(f"--positions {spec!r} is not 'last', 'all' or indices within the context's {length} tokens.",
                       "Pass e.g. --positions last, --positions all or --positions 0,3,-1.")
    return sorted({i % length for i in indices})


@torch.no_grad()
def context_deltas(npt_model: NPTModel, input_ids: torch.Tensor, layers: list[int], positions: list[int]) -> dict[int, torch.Tensor]:
    """{layer: mean over `positions` of dW_i(t)} for one context [1, L], the NPT model running freely."""
    wanted = {i: npt_model.npt_layers[i] for i in layers}
    with record_layers(wanted, attention=True) as records:
        npt_model.model(input_ids=input_ids, use_cache=False)
    deltas = {}
    for i, layer in wanted.items():
        adapter = layer.adapter
        attn = records[i].attn[0, positions]
        v_m, v_f = adapter.vectors(attn)  # [P, k, d_model], [P, k, d_ffn]
        gain = adapter.gamma(attn).mean() * layer.wiring.gate_weight(layer.layer).float()
        deltas[i] = gain + adapter.scale * torch.einsum("pkf,pkd->fd", v_f, v_m) / len(positions)
    return deltas


@torch.no_grad()
def continuation_loss(model, prompt_ids: torch.Tensor, continuation_ids: torch.Tensor) -> float:
    """Mean negative log-likelihood (nats/token) of the continuation given the prompt."""
    ids = torch.cat([prompt_ids, continuation_ids], dim=1)
    logits = model(input_ids=ids, use_cache=False).logits[0, prompt_ids.shape[1] - 1 : -1].float()
    return torch.nn.functional.cross_entropy(logits, continuation_ids[0]).item()


def add_to_gates(model, deltas: dict[int, torch.Tensor], alpha: float) -> None:
    """W_g of layer i += alpha * delta_i, in the weights' own dtype."""
    layers = decoder_layers(model)
    for i, delta in deltas.items():
        weight = gate_weight(layers[i], i)  # in place: a fused projection's gate rows are a view
        weight.add_((alpha * delta).to(weight.dtype))
