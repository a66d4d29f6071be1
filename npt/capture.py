"""One no-grad teacher forward that records, for every converted layer, its input h, its
attention output a and its output t.

The records come from forward hooks on the decoder layers and on their `self_attn`, so masks and
rotary embeddings are HF's own. Targets are never taken from `output_hidden_states`: HF applies
the final norm to the last entry of that tuple, and a raw layer output compared against it is a
silent bug.
"""

from __future__ import annotations

import dataclasses

import torch

from .model import NPTModel

# Keyword arguments of a decoder layer that describe the cache, not the attention pattern.
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "use_cache")


@dataclasses.dataclass
class LayerRecord:
    inputs: torch.Tensor  # h_i   [B, L, d]
    attn: torch.Tensor  # a_i   [B, L, d]
    outputs: torch.Tensor  # t_i   [B, L, d], before any final norm
    attn_kwargs: dict  # what the layer received besides h (mask, rotary embeddings, positions)


class _StopForward(Exception):
    """Raised by the hook of the last converted layer: nothing after it is needed."""


@torch.no_grad()
def capture_teacher(
    npt_model: NPTModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    with_logits: bool = False,
    stop_early: bool = True,
    with_final_hidden: bool = False,
) -> tuple[dict[int, LayerRecord], torch.Tensor | None]:
    """Run the teacher once and return {layer index: LayerRecord} and, if asked, the logits or
    the final hidden state (after the final norm, before the LM head; see `_final_hidden`).

    Otherwise the forward stops right after the last converted layer: the layers above it, the
    final norm and the LM head are not computed. (`stop_early=False` under FSDP: an exception
    must not cut through a sharded module's forward.)
    """
    layers = npt_model.npt_layers
    last = max(layers)
    records: dict[int, LayerRecord] = {}
    attn_out: dict[int, torch.Tensor] = {}
    handles = []

    def attn_hook(idx):
        def hook(module, args, output):
            attn_out[idx] = output[0] if isinstance(output, tuple) else output

        return hook

    def layer_hook(idx):
        def hook(module, args, kwargs, output):
            h = args[0] if args else kwargs["hidden_states"]
            attn_kwargs = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS and k != "hidden_states"}
            out = output[0] if isinstance(output, tuple) else output
            records[idx] = LayerRecord(h, attn_out.pop(idx), out, attn_kwargs)
            if idx == last and stop_early and not (with_logits or with_final_hidden):
                raise _StopForward

        return hook

    try:
        for idx, layer in layers.items():
            handles.append(layer.self_attn.register_forward_hook(attn_hook(idx)))
            handles.append(layer.register_forward_hook(layer_hook(idx), with_kwargs=True))
        with npt_model.teacher_mode():
            if with_logits:
                logits = npt_model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
                return records, logits
            if with_final_hidden:
                return records, _final_hidden(npt_model, input_ids, attention_mask)
            try:
                # through the causal LM (its call gathers sharded embeddings), one logit position at most
                npt_model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
            except _StopForward:
                pass
            return records, None
    finally:
        for h in handles:
            h.remove()



def run_student(
    npt_model: NPTModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    with_logits: bool = False,
    stop_early: bool = True,
    with_final_hidden: bool = False,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], torch.Tensor | None]:
    """Run the NPT model freely (each NPT layer fed by the layer below), with autograd, and return
    every converted layer's output, its per-token regulariser, and, if asked, the logits or the
    final hidden state.

    Otherwise the forward stops after the last converted layer."""
    layers = npt_model.npt_layers
    last = max(layers)
    outputs: dict[int, torch.Tensor] = {}
    frob2: dict[int, torch.Tensor] = {}
    handles = []

    def layer_hook(idx):
        def hook(module, args, output):
            outputs[idx] = output[0] if isinstance(output, tuple) else output
            frob2[idx] = module.last_regularizer
            module.last_regularizer = None
            if idx == last and stop_early and not (with_logits or with_final_hidden):
                raise _StopForward

        return hook

    try:
        for idx, layer in layers.items():
            layer.keep_regularizer = True
            handles.append(layer.register_forward_hook(layer_hook(idx)))
        if with_logits:
            logits = npt_model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            return outputs, frob2, logits
        if with_final_hidden:
            return outputs, frob2, _final_hidden(npt_model, input_ids, attention_mask)
        try:
            npt_model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
        except _StopForward:
            pass
        return outputs, frob2, None
    finally:
        for h in handles:
            h.remove()
        for layer in layers.values():
            layer.keep_regularizer = False


def _final_hidden(npt_model: NPTModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The last hidden state after the final norm: the LM head's input. The base model's
    `last_hidden_state` is exactly what the causal LM feeds its head."""
    out = npt_model.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state
