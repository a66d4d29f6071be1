"""Adapter files: the adapters alone (safetensors) and the JSON that says how to rebuild them.

    adapter_model.safetensors   tensors `layers.<i>.A.weight` [r, d_model], `layers.<i>.B_m.weight`
                                [k d_model, r], `layers.<i>.B_f.weight` [k d_ffn, r], with `gate_gain`
                                `layers.<i>.gain.weight` [1, r] and `.gain.bias` [1], and the
                                scalar multipliers `layers.<i>.c_a`, `.c_m`, `.c_f` (all float32);
                                with `modulate` naming up and down, the same B_m, B_f, (gain,)
                                c_m, c_f under `layers.<i>.up.` and `layers.<i>.down.`; with
                                `bottleneck_bias` the offset `layers.<i>.z_bias` [r]
                                (`adapter_input` in the JSON says whether A reads a or a / rms(h))
    adapter_config.json         `"adapter_type": "npt"`, the base model, layers, r, k, s, shapes,
                                and the sha256 of the weights file

The names look like PEFT's, but the content is not a PEFT adapter: the `adapter_type` key says so,
and loading refuses anything else with a hint. Files are written to a temporary name, synced and
renamed, so a crash never leaves a half-written adapter under the final name.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from safetensors.torch import load_file, save_file

from .corpus import sha256_file  # noqa: F401 (re-exported: checkpoints use it from here)
from .errors import NPTError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_TYPE = "npt"
FORMAT_VERSION = 2  # 2: the multipliers c_a, c_m, c_f are stored; version-1 files meant them to be 1
MULTIPLIERS = ("c_a", "c_m", "c_f")


@dataclasses.dataclass
class NPTConfig:
    """Everything needed to rebuild the adapters on a base model (saved as adapter_config.json)."""

    base_model_name_or_path: str
    layers: list[int]
    rank: int
    num_ranks: int
    modulation_scale: float = 1.0
    gate_gain: bool = False  # files written before the gain existed have none
    modulate: list[str] = dataclasses.field(default_factory=lambda: ["gate"])  # files written before the variants modulated the gate only
    bottleneck_bias: bool = False  # files written before it existed have none
    adapter_input: str = "attention"  # files written before it existed read the attention output
    dtype: str = "float32"
    model_type: str = ""
    hidden_size: int = 0
    intermediate_size: int = 0
    num_hidden_layers: int = 0
    base_model_source: str = ""  # the file the base model was made from (a GGUF checkpoint), if any
    base_model_sha256: str = ""  # and that file's sha256
    format_version: int = FORMAT_VERSION
    adapter_type: str = ADAPTER_TYPE

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
            "gate_gain": self.gate_gain,
            "modulate": list(self.modulate),
            "bottleneck_bias": self.bottleneck_bias,
            "adapter_input": self.adapter_input,
        }


def fsync_file(path: Path) -> None:
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


def save_adapters(save_dir: str | os.PathLike, config: NPTConfig, weights: dict[str, torch.Tensor]) -> Path:
    """Write adapter_model.safetensors and adapter_config.json (adapters only, no pickle)."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    tmp = save_dir / (ADAPTER_WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "adapter_type": ADAPTER_TYPE, "npt_format_version": str(FORMAT_VERSION)})
    fsync_file(tmp)
    digest = sha256_file(tmp)
    os.replace(tmp, save_dir / ADAPTER_WEIGHTS)
    write_json_atomic(save_dir / ADAPTER_CONFIG, dataclasses.asdict(config) | {"adapter_sha256": digest})
    (save_dir / "README.md").write_text(FOLDER_README)
    return save_dir


ADAPTER_FILES = [ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md", "tokenizer*", "special_tokens_map.json", "*.model", "vocab*", "merges.txt"]


def resolve_adapter_dir(name_or_path: str | os.PathLike) -> Path:
    """A local adapter folder, or a hub repository id fetched into the HF cache (the same
    `snapshot_download` a model id goes through; offline, the cached copy)."""
    path = Path(name_or_path).expanduser()
    if path.exists() or str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") != 1:
        return path
    try:
        return Path(snapshot_download(repo_id=str(name_or_path), allow_patterns=ADAPTER_FILES))
    except LocalEntryNotFoundError:
        raise NPTError(f"Adapter {name_or_path!r} is not a local folder and not in the local HF cache, and the hub is offline.",
                       "Download it on a connected machine (huggingface-cli download), or pass a local folder.") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise NPTError(f"Cannot fetch adapter {name_or_path!r} from the hub: {str(e).splitlines()[0][:200]}",
                       "Check the repository id (and your access token), or pass a local folder.") from None


FOLDER_README = """# NPT adapters

This folder holds the adapters of a Neuro-Plastic Transformer (NPT): for each converted decoder
layer, the small matrices that turn its attention output into a low-rank, per-token change of the
MLP's gate weights. It is not a model (AutoModelForCausalLM cannot load it) and not a PEFT adapter
(`adapter_type` is `npt`).

- `adapter_config.json`: the base model (`base_model_name_or_path`), the converted layers, rank r,
  number of rank-1 terms k, modulation scale, shapes, format version, sha256 of the weights.
- `adapter_model.safetensors`: per layer i, `layers.<i>.A.weight` [r, d_model],
  `layers.<i>.B_m.weight` [k d_model, r], `layers.<i>.B_f.weight` [k d_ffn, r], the gain
  `layers.<i>.gain.weight` [1, r] and `gain.bias` [1] (when `gate_gain` is true) and the scalar
  multipliers `layers.<i>.c_a`, `c_m`, `c_f`; float32. With `modulate` naming `up` (dual
  modulation) or `down` (triple), the same tensors of those projections' modulations under
  `layers.<i>.up.` and `layers.<i>.down.` (down has no gain). With `bottleneck_bias` true, the
  bottleneck's offset `layers.<i>.z_bias` [r]. `adapter_input`: what the bottleneck reads,
  `attention` (the attention output a) or `relative` (a / rms(h), h the layer's input).
- the base model's tokenizer files.

Use it with the `npt` package: `NPTModel.from_pretrained("<this folder>")`, `npt-eval <this folder>`,
`npt-generate <this folder> --prompt ...`; `npt-inject` writes a plain model folder that
transformers loads without the package.
"""


def read_adapter_config(adapter_dir: str | os.PathLike) -> NPTConfig:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise NPTError(f"No {ADAPTER_CONFIG} in {adapter_dir}.", "Point to a folder written by NPTModel.save_pretrained (a run's adapter/ folder).")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise NPTError(f"{path} is not valid JSON ({e}); the file is damaged.", "Use another checkpoint.") from None
    if raw.get("adapter_type", ADAPTER_TYPE) != ADAPTER_TYPE or "peft_type" in raw:
        raise NPTError(f"{path} describes a {raw.get('peft_type') or raw.get('adapter_type')} adapter, not an NPT adapter.",
                       "Load it with the library that wrote it (e.g. PEFT); NPT adapters have \"adapter_type\": \"npt\".")
    raw.pop("adapter_sha256", None)
    raw.setdefault("num_ranks", 1)  # files written before k existed held one rank-1 term
    fields = {f.name for f in dataclasses.fields(NPTConfig)}
    unknown = sorted(set(raw) - fields)
    if unknown or raw.get("format_version", 0) > FORMAT_VERSION:
        raise NPTError(
            f"{path} has unknown keys {unknown} or a newer format version {raw.get('format_version')}.",
            "Upgrade this package to the version that wrote the adapters.",
        )
    return NPTConfig(**raw)


def load_adapter_weights(adapter_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise NPTError(f"No {ADAPTER_WEIGHTS} in {adapter_dir}.", "Point to a folder written by NPTModel.save_pretrained.")
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    expected = config.get("adapter_sha256")
    if expected and sha256_file(weights) != expected:
        raise NPTError(
            f"{weights} does not match the checksum recorded in {ADAPTER_CONFIG}: the file is damaged or truncated.",
            "Use another checkpoint (the previous one in checkpoints/ is kept).",
        )
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise NPTError(f"{weights} cannot be read ({e}).", "Use another checkpoint.") from None
    if config.get("format_version", 1) < 2:
        for layer in {k.rsplit(".", 2)[0] for k in tensors}:
            tensors.update({f"{layer}.{name}": torch.tensor(1.0) for name in MULTIPLIERS})
    return tensors
