"""Conversion of a Llama-family model into an NPT model, and adapter files.

The student is the teacher plus adapters: converted decoder layers are wrapped in place, so the
base weights exist once and the same object runs as teacher (`with model.teacher_mode(): ...`)
or as NPT model (the default). Adapter files follow PEFT's layout: `adapter_model.safetensors`
holds the adapters alone, `adapter_config.json` says how to rebuild them on the base model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import NPTError, UnsupportedArchitectureError
from .layer import NPTAdapter, NPTDecoderLayer

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT_VERSION = 1

_REQUIRED_PARTS = (
    "self_attn",
    "input_layernorm",
    "post_attention_layernorm",
    "mlp",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
    "mlp.act_fn",
)
# Layers that have these do not feed Norm2(h + a) to the MLP (Gemma-2/3, OLMo-2 style): the NPT
# formula would silently compute something else, so they are refused.
_FORBIDDEN_PARTS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")


@dataclasses.dataclass
class NPTConfig:
    """Everything needed to rebuild the adapters on a base model (saved as adapter_config.json)."""

    base_model_name_or_path: str
    layers: list[int]
    rank: int
    num_ranks: int = 1
    modulation_scale: float = 1.0
    dtype: str = "float32"
    model_type: str = ""
    hidden_size: int = 0
    intermediate_size: int = 0
    num_hidden_layers: int = 0
    format_version: int = FORMAT_VERSION

    def shape_signature(self) -> dict:
        """What must match for adapters (or a training state) to fit a model."""
        return {
            "model_type": self.model_type,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "layers": list(self.layers),
            "rank": self.rank,
            "num_ranks": self.num_ranks,
        }


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


def check_layer_supported(layer: nn.Module, idx: int, model_name: str = "model") -> None:
    def has(path: str) -> bool:
        obj = layer
        for part in path.split("."):
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
        return True

    if isinstance(layer, NPTDecoderLayer):
        raise NPTError(f"Layer {idx} is already an NPT layer.", "Convert the base model, not an NPT model.")
    missing = [p for p in _REQUIRED_PARTS if not has(p)]
    if missing:
        raise UnsupportedArchitectureError(
            f"{model_name}: decoder layer {idx} ({type(layer).__name__}) lacks {', '.join(missing)}; "
            "the NPT layer needs self_attn, input_layernorm, post_attention_layernorm and a gated MLP "
            "(mlp.gate_proj/up_proj/down_proj/act_fn).",
            "Use a Llama-family model (Llama, Mistral, Qwen2, ...).",
        )
    extra = [p for p in _FORBIDDEN_PARTS if has(p)]
    if extra:
        raise UnsupportedArchitectureError(
            f"{model_name}: decoder layer {idx} ({type(layer).__name__}) has {', '.join(extra)}, so its MLP "
            "input is not post_attention_layernorm(h + a) and the NPT formula would not apply.",
            "Use a Llama-family model (Llama, Mistral, Qwen2, ...).",
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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
        layers: str | list[int] | None = "all",
        rank: int = 16,
        num_ranks: int = 1,
        modulation_scale: float = 1.0,
        base_model_name_or_path: str | None = None,
    ) -> "NPTModel":
        """Wrap the selected layers of `model` (in place) and freeze every base weight."""
        hf_config = model.config
        layer_list = decoder_layers(model)
        num_layers = len(layer_list)
        indices = resolve_layers(layers, num_layers)
        for i in indices:
            check_layer_supported(layer_list[i], i, getattr(hf_config, "model_type", "model"))
        d_model = hf_config.hidden_size
        d_ffn = layer_list[indices[0]].mlp.gate_proj.out_features
        if not 1 <= rank <= d_model:
            raise NPTError(
                f"Adapter rank {rank} is outside 1..hidden_size ({d_model}).", f"Pass --adapter_rank between 1 and {d_model}."
            )
        if num_ranks < 1:
            raise NPTError(f"--num_ranks {num_ranks} must be at least 1.", "Pass --num_ranks 1 (the guide's) or more.")
        for p in model.parameters():
            p.requires_grad_(False)
        base_param = next(model.parameters())
        for i in indices:
            adapter = NPTAdapter(d_model, d_ffn, rank, num_ranks, modulation_scale).to(
                device=base_param.device, dtype=torch.float32
            )
            layer_list[i] = NPTDecoderLayer(layer_list[i], adapter, i)
        name = base_model_name_or_path or getattr(hf_config, "_name_or_path", "") or ""
        config = NPTConfig(
            base_model_name_or_path=str(name),
            layers=indices,
            rank=rank,
            num_ranks=num_ranks,
            modulation_scale=float(modulation_scale),
            dtype=_dtype_name(base_param.dtype),
            model_type=getattr(hf_config, "model_type", ""),
            hidden_size=d_model,
            intermediate_size=d_ffn,
            num_hidden_layers=num_layers,
        )
        return cls(model, config)

    @classmethod
    def from_pretrained(
        cls,
        adapter_dir: str | os.PathLike,
        base_model: nn.Module | None = None,
        **load_kwargs,
    ) -> "NPTModel":
        """Rebuild an NPT model from saved adapters. Without `base_model`, the base model named in
        adapter_config.json is loaded (a hub id, a local folder, or the embedded default)."""
        adapter_dir = Path(adapter_dir)
        config = read_adapter_config(adapter_dir)
        if base_model is None:
            from .loading import load_model

            base_model, _ = load_model(config.base_model_name_or_path or None, dtype=config.dtype, **load_kwargs)
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
        from .distributed import full_tensor

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
                "Load adapters saved for the same base model, layers, rank and number of rank-1 terms.",
            )
        with torch.no_grad():
            for i, layer in self.npt_layers.items():
                for name, param in layer.adapter.state_dict().items():
                    param.copy_(state[f"layers.{i}.{name}"])

    def save_pretrained(self, save_dir: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write adapter_model.safetensors and adapter_config.json (adapters only, no pickle).
        `state_dict`: adapters already gathered (under FSDP, gathering is collective)."""
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        weights = {k: v.contiguous().cpu() for k, v in (state_dict or self.adapter_state_dict()).items()}
        tmp = save_dir / (ADAPTER_WEIGHTS + ".tmp")
        save_file(weights, str(tmp), metadata={"format": "pt", "npt_format_version": str(FORMAT_VERSION)})
        _fsync(tmp)
        digest = sha256_file(tmp)
        os.replace(tmp, save_dir / ADAPTER_WEIGHTS)
        cfg = dataclasses.asdict(self.npt_config) | {"adapter_sha256": digest}
        write_json_atomic(save_dir / ADAPTER_CONFIG, cfg)
        return save_dir

    # ---- running ------------------------------------------------------------------------------

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        for layer in self.npt_layers.values():
            layer.gradient_checkpointing = enabled

    def set_npt_enabled(self, enabled: bool) -> None:
        for layer in self.npt_layers.values():
            layer.npt_enabled = enabled

    @contextlib.contextmanager
    def teacher_mode(self):
        """Run the original (teacher) layers inside this block."""
        previous = {i: layer.npt_enabled for i, layer in self.npt_layers.items()}
        self.set_npt_enabled(False)
        try:
            yield self
        finally:
            for i, layer in self.npt_layers.items():
                layer.npt_enabled = previous[i]

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


# ---- files ------------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_adapter_config(adapter_dir: Path) -> NPTConfig:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise NPTError(f"No {ADAPTER_CONFIG} in {adapter_dir}.", "Point to a folder written by NPTModel.save_pretrained.")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise NPTError(f"{path} is not valid JSON ({e}); the file is damaged.", "Use another checkpoint.") from None
    raw.pop("adapter_sha256", None)
    fields = {f.name for f in dataclasses.fields(NPTConfig)}
    unknown = sorted(set(raw) - fields)
    if unknown or raw.get("format_version", 0) > FORMAT_VERSION:
        raise NPTError(
            f"{path} has unknown keys {unknown} or a newer format version {raw.get('format_version')}.",
            "Upgrade this package to the version that wrote the adapters.",
        )
    return NPTConfig(**raw)


def load_adapter_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise NPTError(f"No {ADAPTER_WEIGHTS} in {adapter_dir}.", "Point to a folder written by NPTModel.save_pretrained.")
    expected = json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("adapter_sha256")
    if expected and sha256_file(weights) != expected:
        raise NPTError(
            f"{weights} does not match the checksum recorded in {ADAPTER_CONFIG}: the file is damaged or truncated.",
            "Use another checkpoint (the previous one in checkpoints/ is kept).",
        )
    try:
        return load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise NPTError(f"{weights} cannot be read ({e}).", "Use another checkpoint.") from None
