"""Conversion of a Llama-family model into an NPT model.

The student is the teacher plus adapters: converted decoder layers are wrapped in place, so the
base weights exist once and the same object runs as teacher (`with model.teacher_mode(): ...`)
or as NPT model (the default). A conversion proves itself on a few tokens before it changes the
model (see verify.py). Adapter files: serialization.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers.hf_argparser import HfArg

from .architecture import decoder_layers, layer_wiring, resolve_layers
from .distributed import copy_full_into, full_tensor
from .errors import NPTError
from .gguf import recorded_source
from .layer import NPTAdapter, NPTDecoderLayer, parse_modulate
from .loading import dtype_name, load_model
from .serialization import NPTConfig, load_adapter_weights, read_adapter_config, resolve_adapter_dir, save_adapters
from .verify import prove_conversion, record_teacher


@dataclasses.dataclass
class AdapterArguments:
    npt_layers: str = HfArg(default="all", help="Layers to convert: all, upper_half, lower_half, or indices/ranges such as '0,2,5-7'.")
    adapter_rank: int = HfArg(default=32, help="Adapter bottleneck rank r (A: d_model -> r; 32 by default, chosen by measurement with --num_ranks 6: CHANGELOG.md).")
    num_ranks: int = HfArg(default=6, help="Number k of rank-1 modulations per token of each modulated projection (the guide: 1, of the gate alone; the default recipe: 6 of gate, up and down from a bottleneck of r = 32, chosen by measurement over the zoo and SmolLM2: CHANGELOG.md).")
    modulation_scale: float = HfArg(default=1.0, help="Modulation scale s of the gate delta.")
    gate_gain: bool = HfArg(default=True, help="Let the attention output also scale the whole gate weight matrix per token, (1 + gamma(a)) W_g, next to the rank-k delta (r + 1 weights per layer). --no-gate_gain: the rank-k delta alone.")
    modulate: str = HfArg(default="gate,up,down", help="The MLP projections the attention output modulates: gate (the original NPT), gate,up (dual modulation) or gate,up,down (triple, the default recipe: CHANGELOG.md); each gets k rank-1 terms from the shared bottleneck, gate and up a gain (with --gate_gain).")
    bottleneck_bias: bool = HfArg(default=True, help="A trained offset e in the bottleneck, z = c_a A a + e (r weights per layer, zero at the start). Without it every rank-1 term is quadratic in the attention output a, so the modulation is the same for a and -a; with it the terms also hold parts linear in a, as the teacher's response to its attention is to first order. --no-bottleneck_bias: without it (adapters saved before it existed load without it).")
    adapter_input: Literal["attention", "relative"] = HfArg(default="attention", help="What the adapter's bottleneck reads: attention, the attention output a (the original NPT); relative, a / rms(h), the attention output in units of the residual stream it would have been added to, the scale at which the teacher's MLP norm sees it (the same weights; the scale is recalibrated).")
    adapter_init: Literal["calibrated", "default"] = HfArg(default="calibrated", help="calibrated: scale A and B_m so z and v_m.x have unit RMS on 16 training blocks; default: PyTorch's init.")

    def __post_init__(self):
        if self.adapter_rank < 1:
            raise NPTError(f"--adapter_rank {self.adapter_rank} must be at least 1.", "Pass --adapter_rank >= 1.")
        check_num_ranks(self.num_ranks)  # here too, so that the command line refuses it before a model loads
        parse_modulate(self.modulate)


def check_num_ranks(num_ranks: int) -> None:
    if num_ranks < 1:
        raise NPTError(f"--num_ranks {num_ranks} must be at least 1.", "Pass --num_ranks 1 (the guide's) or more.")


class NPTModel(nn.Module):
    """An HF causal LM whose selected decoder layers are NPT layers. Only adapters train."""

    def __init__(self, model: nn.Module, config: NPTConfig):
        super().__init__()
        self.model = model
        self.npt_config = config

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def convert(
        cls,
        model: nn.Module,
        layers: str | list[int] | None = AdapterArguments.npt_layers,
        rank: int = AdapterArguments.adapter_rank,
        num_ranks: int = AdapterArguments.num_ranks,
        modulation_scale: float = AdapterArguments.modulation_scale,
        base_model_name_or_path: str | None = None,
        gate_gain: bool = AdapterArguments.gate_gain,
        modulate: str | list[str] | tuple[str, ...] = AdapterArguments.modulate,
        bottleneck_bias: bool = AdapterArguments.bottleneck_bias,
        adapter_input: str = AdapterArguments.adapter_input,
    ) -> "NPTModel":
        """Wrap the selected layers of `model` (in place) and freeze every base weight."""
        hf_config = model.config
        layer_list = decoder_layers(model)
        num_layers = len(layer_list)
        indices = resolve_layers(layers, num_layers)
        wirings = {i: layer_wiring(layer_list[i], i, getattr(hf_config, "model_type", "model")) for i in indices}
        d_model = hf_config.hidden_size
        d_ffn = wirings[indices[0]].d_ffn(layer_list[indices[0]])
        if not 1 <= rank <= d_model:
            raise NPTError(
                f"Adapter rank {rank} is outside 1..hidden_size ({d_model}).", f"Pass --adapter_rank between 1 and {d_model}."
            )
        check_num_ranks(num_ranks)
        modulated = parse_modulate(modulate)
        base_param = next(model.parameters())
        model_name = getattr(hf_config, "model_type", "model")
        recorded = record_teacher(model, {i: layer_list[i] for i in indices})
        wrapped = {
            i: NPTDecoderLayer(layer_list[i], NPTAdapter(d_model, d_ffn, rank, num_ranks, modulation_scale, gate_gain, modulated, bottleneck_bias, adapter_input).to(device=base_param.device, dtype=torch.float32),
                               i, wirings[i])
            for i in indices
        }
        try:
            prove_conversion(model, wrapped, recorded, model_name)
        except NPTError:
            for layer in wrapped.values():
                layer.unwrap()
            raise
        for p in model.parameters():
            p.requires_grad_(False)
        for i, layer in wrapped.items():
            layer_list[i] = layer
        loaded_from = getattr(hf_config, "_name_or_path", "") or ""
        name = base_model_name_or_path or loaded_from
        source = (recorded_source(loaded_from) if loaded_from else None) or {}
        config = NPTConfig(
            base_model_name_or_path=str(name),
            layers=indices,
            rank=rank,
            num_ranks=num_ranks,
            modulation_scale=float(modulation_scale),
            gate_gain=bool(gate_gain),
            modulate=list(modulated),
            bottleneck_bias=bool(bottleneck_bias),
            adapter_input=str(adapter_input),
            dtype=dtype_name(base_param.dtype),
            model_type=getattr(hf_config, "model_type", ""),
            hidden_size=d_model,
            intermediate_size=d_ffn,
            num_hidden_layers=num_layers,
            base_model_source=source.get("file", ""),
            base_model_sha256=source.get("sha256", ""),
        )
        return cls(model, config)

    @classmethod
    def from_pretrained(
        cls,
        adapter_dir: str | os.PathLike,
        base_model: nn.Module | None = None,
        dtype: str | torch.dtype | None = None,
        device: str = "cpu",
        attn_implementation: str = "auto",
    ) -> "NPTModel":
        """Rebuild an NPT model from saved adapters: a folder, or a hub repository id (fetched like
        any model, or read from the local HF cache when offline). Without `base_model`, the base
        model named in adapter_config.json is loaded (a hub id, a local folder, the embedded
        default or a zoo teacher)."""
        adapter_dir = resolve_adapter_dir(adapter_dir)
        config = read_adapter_config(adapter_dir)
        if base_model is None:
            base_model, _ = load_model(config.base_model_name_or_path or None, dtype or config.dtype, device, attn_implementation)
        hc = base_model.config
        found = {
            "model_type": getattr(hc, "model_type", ""),
            "hidden_size": hc.hidden_size,
            "num_hidden_layers": len(decoder_layers(base_model)),
        }
        expected = {k: config.shape_signature()[k] for k in found}
        if found != expected:
            raise NPTError(
                f"The adapters in {adapter_dir} were trained on a base model with {expected}, "
                f"but the given base model has {found}.",
                f"Load them onto {config.base_model_name_or_path or 'the base model they were trained on'}.",
            )
        npt = cls.convert(
            base_model,
            layers=config.layers,
            rank=config.rank,
            num_ranks=config.num_ranks,
            modulation_scale=config.modulation_scale,
            base_model_name_or_path=config.base_model_name_or_path,
            gate_gain=config.gate_gain,
            modulate=config.modulate,
            bottleneck_bias=config.bottleneck_bias,
            adapter_input=config.adapter_input,
        )
        npt.load_adapter_state_dict(load_adapter_weights(adapter_dir))
        return npt

    # ---- adapters -----------------------------------------------------------------------------

    @property
    def npt_layers(self) -> dict[int, NPTDecoderLayer]:
        layers = decoder_layers(self.model)
        return {i: layers[i] for i in self.npt_config.layers}

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        for layer in self.npt_layers.values():
            yield from layer.adapter.parameters()

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapters' weights; sharded (FSDP) weights are gathered, so under FSDP every
        process must call this."""
        return {
            f"layers.{i}.{name}": full_tensor(t).detach()
            for i, layer in self.npt_layers.items()
            for name, t in layer.adapter.state_dict().items()
        }

    def adapter_digest(self) -> str:
        """sha256 of the adapter weights (to check that processes hold the same adapters)."""
        h = hashlib.sha256()
        for key, tensor in sorted(self.adapter_state_dict().items()):
            h.update(key.encode())
            h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.adapter_state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or wrong:
            raise NPTError(
                f"Adapter weights do not fit this NPT model (missing {missing[:4]}, unexpected {unexpected[:4]}, "
                f"wrong shape {wrong[:4]}).",
                "Load adapters saved for the same base model, layers, rank, number of rank-1 terms, --gate_gain, --modulate and --bottleneck_bias.",
            )
        for i, layer in self.npt_layers.items():
            for name, param in layer.adapter.state_dict().items():
                copy_full_into(param, state[f"layers.{i}.{name}"])

    def save_pretrained(self, save_dir: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write adapter_model.safetensors and adapter_config.json (adapters only, no pickle).
        `state_dict`: adapters already gathered (under FSDP, gathering is collective)."""
        return save_adapters(save_dir, self.npt_config, state_dict or self.adapter_state_dict())

    def unload(self) -> nn.Module:
        """The plain HF model: every original layer back in place, the adapters dropped (the base
        weights stay frozen). This NPT model is unusable afterwards."""
        layers = decoder_layers(self.model)
        for i, layer in self.npt_layers.items():
            layers[i] = layer.unwrap()
        return self.model

    # ---- running ------------------------------------------------------------------------------

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        for layer in self.npt_layers.values():
            layer.gradient_checkpointing = enabled

    def set_npt_enabled(self, enabled: bool) -> None:
        for layer in self.npt_layers.values():
            layer.npt_enabled = enabled

    @contextlib.contextmanager
    def converted_only(self, indices):
        """Inside this block only the converted layers in `indices` (layer indices) run as NPT
        layers, the rest as teacher layers; a layer already in teacher mode stays so."""
        previous = {i: layer.npt_enabled for i, layer in self.npt_layers.items()}
        for i, layer in self.npt_layers.items():
            layer.npt_enabled = previous[i] and i in indices
        try:
            yield self
        finally:
            for i, layer in self.npt_layers.items():
                layer.npt_enabled = previous[i]

    def lowest_converted(self, count: int):
        """Only the lowest `count` converted layers run as NPT layers (a progressive conversion's stage)."""
        return self.converted_only(set(sorted(self.npt_layers)[:count]))

    def teacher_mode(self):
        """Run the original (teacher) layers inside this block."""
        return self.converted_only(set())

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device
