"""Injection: the weight change that a context makes in an NPT model, made permanent in the base model.

Running freely on a context, NPT layer i turns the attention output a_t at position t into a
delta of each matrix it modulates (the gate; up and down too with `--modulate`):

    dW_g(t) = gamma_g(a_t) W_g + s * sum_j v_f[j](a_t) v_m[j](a_t)^T          [d_ffn, d_model]
    dW_u(t) = gamma_u(a_t) W_u + s * sum_j u_f[j](a_t) u_m[j](a_t)^T          [d_ffn, d_model]
    dW_d(t) =                    s * sum_j w_f[j](a_t) w_m[j](a_t)^T          [d_model, d_ffn]

(per token, never materialised while training). Injection takes each delta at chosen positions
(their mean), scales it by alpha and adds it to that matrix of layer i of the *base* model (a
fused gate-up weight gets both halves in place), which is then
saved as a plain Hugging Face model folder: what the context taught the layer stays in the weights
without the context in the prompt. How much that helps, and how much it damages, is measured:
the loss of a continuation given a prompt (the context's own second half by default) and the
held-out perplexity, before and after.
"""

from __future__ import annotations

import torch

from .architecture import decoder_layers, layer_wiring
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
def context_deltas(npt_model: NPTModel, input_ids: torch.Tensor, layers: list[int], positions: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """{layer: {matrix: mean over `positions` of dW(t)}} for one context [1, L], the NPT model
    running freely; the matrices are the ones the layer modulates (gate, up, down)."""
    wanted = {i: npt_model.npt_layers[i] for i in layers}
    with record_layers(wanted, attention=True) as records:
        npt_model.model(input_ids=input_ids, use_cache=False)
    deltas = {}
    for i, layer in wanted.items():
        adapter = layer.adapter
        z = adapter.bottleneck(layer.adapter_input(records[i].inputs[0, positions], records[i].attn[0, positions]))
        deltas[i] = {}
        for name in adapter.modulated:
            modulation = adapter.modulation(name)
            v_m, v_f = modulation.terms(z)  # [P, k, d_in], [P, k, d_out]
            delta = modulation.scale * torch.einsum("pko,pki->oi", v_f, v_m) / len(positions)
            gamma = modulation.gain_of(z)
            if gamma is not None:
                delta = delta + gamma.mean() * layer.wiring.projection(layer.layer, name)[0].float()
            deltas[i][name] = delta
    return deltas


@torch.no_grad()
def continuation_loss(model, prompt_ids: torch.Tensor, continuation_ids: torch.Tensor) -> float:
    """Mean negative log-likelihood (nats/token) of the continuation given the prompt."""
    ids = torch.cat([prompt_ids, continuation_ids], dim=1)
    logits = model(input_ids=ids, use_cache=False).logits[0, prompt_ids.shape[1] - 1 : -1].float()
    return torch.nn.functional.cross_entropy(logits, continuation_ids[0]).item()


def add_to_weights(model, deltas: dict[int, dict[str, torch.Tensor]], alpha: float) -> None:
    """Each modulated matrix W of layer i += alpha * its delta, in the weights' own dtype."""
    layers = decoder_layers(model)
    for i, matrices in deltas.items():
        wiring = layer_wiring(layers[i], i)
        for name, delta in matrices.items():
            weight = wiring.projection(layers[i], name)[0]  # in place: a fused projection's halves are views
            weight.add_((alpha * delta).to(weight.dtype))
