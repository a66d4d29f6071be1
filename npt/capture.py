"""Forward hooks on decoder layers: what each layer received and returned in one forward.

The teacher capture (one no-grad forward recording, per converted layer, its input h, its
attention output a and its output t), the free-running student run and the conversion proof all
use `record_layers`. Masks and rotary embeddings are HF's own. Targets are never taken from
`output_hidden_states`: HF applies the final norm to the last entry of that tuple, and a raw layer
output compared against it is a silent bug.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .architecture import attention_output_module

# Keyword arguments of a decoder layer that describe the cache, not the attention pattern.
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "use_cache")


@dataclasses.dataclass
class LayerRecord:
    inputs: torch.Tensor  # h_i   [B, L, d]
    outputs: torch.Tensor  # t_i   [B, L, d], before any final norm
    attn_kwargs: dict  # what the layer received besides h (mask, rotary embeddings, positions)
    attn: torch.Tensor | None = None  # a_i   [B, L, d], when attention outputs are recorded


class _StopForward(Exception):
    """Raised by the hook of the last layer of interest: nothing after it is needed."""


class record_layers:
    """`with record_layers(layers) as records: model(...)` fills {index: LayerRecord}.

    `attention`: also record each layer's attention branch (architecture.py: the output of
    `self_attn`, or of the norm applied to it in sandwich and post-norm layers). `stop_after`: end the forward right
    after that layer (the block is left quietly; never under FSDP, where an exception must not
    cut through a sharded module's forward)."""

    def __init__(self, layers: dict[int, nn.Module], attention: bool = False, stop_after: int | None = None):
        self.layers, self.attention, self.stop_after = layers, attention, stop_after
        self.records: dict[int, LayerRecord] = {}
        self._attn: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def _attn_hook(self, idx: int):
        def hook(module, args, output):
            self._attn[idx] = output[0] if isinstance(output, tuple) else output

        return hook

    def _layer_hook(self, idx: int):
        def hook(module, args, kwargs, output):
            h = args[0] if args else kwargs["hidden_states"]
            attn_kwargs = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS and k != "hidden_states"}
            out = output[0] if isinstance(output, tuple) else output
            self.records[idx] = LayerRecord(h, out, attn_kwargs, self._attn.pop(idx, None))
            if idx == self.stop_after:
                raise _StopForward

        return hook

    def __enter__(self) -> dict[int, LayerRecord]:
        for idx, layer in self.layers.items():
            if self.attention:
                self._handles.append(attention_output_module(layer).register_forward_hook(self._attn_hook(idx)))
            self._handles.append(layer.register_forward_hook(self._layer_hook(idx), with_kwargs=True))
        return self.records

    def __exit__(self, exc_type, exc, tb) -> bool:
        for handle in self._handles:
            handle.remove()
        return exc_type is _StopForward


def final_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The last hidden state after the final norm: the LM head's input. The base model's
    `last_hidden_state` is exactly what the causal LM feeds its head (the conversion proof checks
    that head(final_hidden) equals the model's own logits)."""
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def _forward(model: nn.Module, input_ids, attention_mask, with_logits: bool, with_final_hidden: bool) -> torch.Tensor | None:
    if with_logits:
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    if with_final_hidden:
        return final_hidden(model, input_ids, attention_mask)
    # through the causal LM (its call gathers sharded embeddings), one logit position at most
    model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
    return None


def _record_forward(npt_model, input_ids, attention_mask, with_logits: bool, stop_early: bool, with_final_hidden: bool,
                    attention: bool) -> tuple[dict[int, LayerRecord], torch.Tensor | None]:
    """One forward of `npt_model.model` in its current mode with every converted layer recorded;
    without logits or final hidden state asked for, it stops after the last converted layer."""
    layers = npt_model.npt_layers
    stop = max(layers) if stop_early and not (with_logits or with_final_hidden) else None
    out = None
    with record_layers(layers, attention=attention, stop_after=stop) as records:
        out = _forward(npt_model.model, input_ids, attention_mask, with_logits, with_final_hidden)
    return records, out


@torch.no_grad()
def capture_teacher(
    npt_model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    with_logits: bool = False,
    stop_early: bool = True,
    with_final_hidden: bool = False,
) -> tuple[dict[int, LayerRecord], torch.Tensor | None]:
    """Run the teacher once and return {layer index: LayerRecord} (with attention outputs) and,
    if asked, the logits or the final hidden state. Otherwise the forward stops right after the
    last converted layer: the layers above it, the final norm and the LM head are not computed."""
    with npt_model.teacher_mode():
        return _record_forward(npt_model, input_ids, attention_mask, with_logits, stop_early, with_final_hidden, attention=True)


def run_student(
    npt_model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    with_logits: bool = False,
    stop_early: bool = True,
    with_final_hidden: bool = False,
) -> tuple[dict[int, LayerRecord], torch.Tensor | None]:
    """Run the NPT model freely (each NPT layer fed by the layer below), with autograd, and return
    every converted layer's record (input, the student's own attention output, output) and, if
    asked, the logits or the final hidden state. Otherwise the forward stops after the last
    converted layer."""
    return _record_forward(npt_model, input_ids, attention_mask, with_logits, stop_early, with_final_hidden, attention=True)
