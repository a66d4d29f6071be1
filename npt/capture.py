"""Forward hooks on decoder layers: what each layer received and returned in one forward.

The teacher capture (one no-grad forward recording, per converted layer, its input h, its
attention output a and its output t), the free-running student run and the conversion proof all
use `record_layers`. Masks and rotary embeddings are HF's own.

Below the lowest converted layer the student computes exactly what the teacher's forward has just
computed, so the free-running student and the evaluation start from the teacher's hidden state at
that layer (`Prefix`): the layers below it are skipped (HF's loop still builds the embeddings,
masks and rotary embeddings, which cost nothing next to a layer). With the upper layers of a deep
model converted, the common case, that is most of the student's forward. Targets are never taken from
`output_hidden_states`: HF applies the final norm to the last entry of that tuple, and a raw layer
output compared against it is a silent bug.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from .architecture import attention_output_module, decoder_layers

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


@dataclasses.dataclass
class Prefix:
    """The teacher's input `hidden` [B, L, d] of decoder layer `layer`: where a student forward
    may start instead of at the embeddings (every layer below `layer` must be a teacher layer)."""

    layer: int
    hidden: torch.Tensor

    @classmethod
    def of(cls, npt_model, records: dict[int, LayerRecord]) -> "Prefix | None":
        """The prefix below the lowest converted layer, from a teacher capture's records."""
        lowest = min(npt_model.npt_layers)
        return cls(lowest, records[lowest].inputs) if lowest > 0 and lowest in records else None


def _passthrough(hidden_states, *args, **kwargs):
    return hidden_states


@contextlib.contextmanager
def starting_at(model: nn.Module, prefix: Prefix | None):
    """Inside this block a forward of `model` skips the decoder layers below `prefix.layer` and
    feeds that layer `prefix.hidden`. The skipped layers still go through their module call (an
    FSDP-sharded one gathers and frees its weights on every process alike)."""
    if prefix is None:
        yield
        return
    layers = decoder_layers(model)
    start = layers[prefix.layer]
    seen = []

    def feed(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        if not isinstance(h, torch.Tensor) or h.shape != prefix.hidden.shape:
            raise RuntimeError(f"Starting the forward at layer {prefix.layer}: it received {type(h).__name__} "
                               f"{getattr(h, 'shape', '')}, not the hidden state [B, L, d] the skipped layers pass on.")
        seen.append(True)
        if args:
            return (prefix.hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": prefix.hidden}

    saved = {i: layers[i].__dict__.get("forward") for i in range(prefix.layer)}
    for i in range(prefix.layer):
        layers[i].forward = _passthrough
    handle = start.register_forward_pre_hook(feed, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for i, previous in saved.items():
            if previous is None:
                layers[i].__dict__.pop("forward", None)
            else:
                layers[i].forward = previous
    if not seen and prefix.layer < len(layers):
        raise RuntimeError(f"The forward never reached layer {prefix.layer}, where it was to start.")


def final_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, prefix: Prefix | None = None) -> torch.Tensor:
    """The last hidden state after the final norm: the LM head's input. The base model's
    `last_hidden_state` is exactly what the causal LM feeds its head (the conversion proof checks
    that head(final_hidden) equals the model's own logits). With `prefix`, the forward starts
    from the teacher's hidden state there."""
    with starting_at(model, prefix):
        return model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def _forward(model: nn.Module, input_ids, attention_mask, with_logits: bool, with_final_hidden: bool,
             prefix: Prefix | None = None) -> torch.Tensor | None:
    if with_final_hidden and not with_logits:
        return final_hidden(model, input_ids, attention_mask, prefix)
    with starting_at(model, prefix):
        return _full_forward(model, input_ids, attention_mask, with_logits)


def _full_forward(model: nn.Module, input_ids, attention_mask, with_logits: bool) -> torch.Tensor | None:
    if with_logits:
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    # through the causal LM (its call gathers sharded embeddings), one logit position at most
    model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
    return None


def _record_forward(npt_model, input_ids, attention_mask, with_logits: bool, stop_early: bool, with_final_hidden: bool,
                    attention: bool, prefix: Prefix | None = None) -> tuple[dict[int, LayerRecord], torch.Tensor | None]:
    """One forward of `npt_model.model` in its current mode with every converted layer recorded;
    without logits or final hidden state asked for, it stops after the last converted layer."""
    layers = npt_model.npt_layers
    stop = max(layers) if stop_early and not (with_logits or with_final_hidden) else None
    out = None
    with record_layers(layers, attention=attention, stop_after=stop) as records:
        out = _forward(npt_model.model, input_ids, attention_mask, with_logits, with_final_hidden, prefix)
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
    prefix: Prefix | None = None,
) -> tuple[dict[int, LayerRecord], torch.Tensor | None]:
    """Run the NPT model freely (each NPT layer fed by the layer below), with autograd, and return
    every converted layer's record (input, the student's own attention output, output) and, if
    asked, the logits or the final hidden state. Otherwise the forward stops after the last
    converted layer. `prefix` (`Prefix.of` a teacher capture): start from the teacher's hidden
    state below the lowest converted layer, the same result without recomputing the layers below."""
    return _record_forward(npt_model, input_ids, attention_mask, with_logits, stop_early, with_final_hidden, attention=True, prefix=prefix)
