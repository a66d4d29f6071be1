"""Loading the teacher (any Llama-family causal LM: hub id, local folder, or the embedded default).

The same code path serves hub ids and local folders (`from_pretrained`), so tests on local
folders exercise what a hub id uses. The architecture is checked on the meta device before any
weight is read, so an unsupported model is refused in a second, not after a 20 GB download.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.hf_argparser import HfArg

from .architecture import decoder_layers, layer_wiring
from .corpus import PREFIX as CORPUS_PREFIX
from .errors import NPTError
from .gguf import PACKAGED, ensure_folder, is_gguf, packaged_file
from .teachers import EMBEDDED_NAME, ZOO_PREFIX, ensure_named_teacher, zoo_recipe

logger = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class ModelArguments:
    model_name: str | None = HfArg(default=None, aliases=["--model_name_or_path"],
                                   help="Teacher: hub id or local folder of a Llama-family causal LM, a .gguf file (or a folder holding one), or zoo:<name> (a built-in teacher, or zoo:smollm2-135m). Default: the embedded teacher (built offline on first use).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = HfArg(default="auto", aliases=["--torch_dtype"], help="Dtype of the frozen base weights (auto: bfloat16 on CUDA when supported, float32 on CPU).")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = HfArg(default="auto", help="HF attention implementation of the teacher (auto: sdpa where the model has it, else eager, e.g. Gemma 2).")

    def __post_init__(self):
        if self.model_name and self.model_name.startswith(ZOO_PREFIX):
            if key := packaged_key(self.model_name):
                packaged_file(key)  # a missing package is refused here, before anything loads
            else:
                zoo_recipe(self.model_name)  # and so is an unknown zoo name

    @property
    def default_corpus(self) -> str:
        """The built-in corpus a built-in teacher was trained on (docstrings for any other model)."""
        if self.model_name and self.model_name.startswith(ZOO_PREFIX):
            key = packaged_key(self.model_name)
            return PACKAGED[key].corpus if key else zoo_recipe(self.model_name).corpus
        return "docstrings"

    @property
    def default_dataset(self) -> str:
        """`--dataset_name` of that corpus, what a run reads when it is given no dataset."""
        return CORPUS_PREFIX + self.default_corpus


def packaged_key(name: str | None) -> str | None:
    """The PACKAGED key of `zoo:<key>` when it names a packaged real checkpoint, else None."""
    key = name.removeprefix(ZOO_PREFIX) if name and name.startswith(ZOO_PREFIX) else None
    return key if key in PACKAGED else None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise NPTError(f"Unknown dtype {name!r}.", f"Use one of auto, {', '.join(DTYPES)}.")
    return DTYPES[name]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"


def resolve_model_path(name_or_path: str | None, dtype: torch.dtype = torch.float32) -> str:
    """A local folder or a hub id; None means the embedded default and `zoo:<name>` a teacher of
    the zoo (both built on first use); a GGUF file (or a folder holding one) and a packaged real
    checkpoint (zoo:smollm2-135m) become a folder dequantized to `dtype` (cached after the first use)."""
    if key := packaged_key(name_or_path):
        return str(ensure_folder(packaged_file(key), dtype, source=name_or_path))
    if not name_or_path or name_or_path == EMBEDDED_NAME or name_or_path.startswith(ZOO_PREFIX):
        return str(ensure_named_teacher(name_or_path or EMBEDDED_NAME))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if is_gguf(path):
            return str(ensure_folder(path, dtype))
        if not (path / "config.json").is_file():
            raise NPTError(f"{name_or_path} has no config.json: it is not a saved HF model folder.", "Pass a folder written by save_pretrained, a .gguf file, or a hub id.")
        return str(path)
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_like_path:
        raise NPTError(f"Model path {name_or_path} does not exist.", "Check --model_name (a local folder or a hub id such as meta-llama/Llama-3.2-1B).")
    return name_or_path


def load_config(name_or_path: str):
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        if _offline():
            fix = (
                f"{name_or_path} is not in the local HF cache and the hub is offline (HF_HUB_OFFLINE=1): "
                "download it on a connected machine (huggingface-cli download), or pass a local folder."
            )
        else:
            fix = "Check the hub id (and your access token for gated models), or pass a local folder."
        raise NPTError(f"Cannot load model {name_or_path!r}: {str(e).splitlines()[0][:300]}", fix) from None


def resolve_attn_implementation(config, requested: str, name: str) -> str:
    """`auto`: sdpa where the model class has it, else eager (Gemma 2: its attention softcapping has
    no SDPA kernel), said in the log. sdpa asked of a model without it is refused with the fix."""
    try:
        cls = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        return "sdpa" if requested == "auto" else requested
    has_sdpa = bool(getattr(cls, "_supports_sdpa", False))
    if requested == "auto":
        if not has_sdpa:
            logger.info(f"{cls.__name__} has no SDPA attention in transformers; the teacher runs eager attention.")
        return "sdpa" if has_sdpa else "eager"
    if requested == "sdpa" and not has_sdpa:
        raise NPTError(f"{name}: {cls.__name__} has no SDPA attention in transformers.", "Pass --attn_implementation eager (or auto).")
    return requested


def check_architecture(config, name: str) -> None:
    """Instantiate the model on the meta device (no memory, no weights) and check its layers."""
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except ValueError as e:  # transformers: "Unrecognized configuration class ..."
        raise NPTError(
            f"{name} ({getattr(config, 'model_type', '?')}) is not a causal LM transformers can build: {str(e).splitlines()[0][:200]}",
            "Use a Llama-family causal LM (Llama, Mistral, Qwen2, ...).",
        ) from None
    layers = decoder_layers(skeleton)
    for i, layer in enumerate(layers):
        layer_wiring(layer, i, f"{name} ({config.model_type})")


def load_model(
    name_or_path: str | None,
    dtype: str | torch.dtype = "auto",
    device: str = "cpu",
    attn_implementation: str = "auto",
):
    """Load a supported teacher and its tokenizer, frozen and in eval mode."""
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, device)
    path = resolve_model_path(name_or_path, torch_dtype)
    config = load_config(path)
    check_architecture(config, path)
    attn_implementation = resolve_attn_implementation(config, attn_implementation, path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation=attn_implementation)
    except OSError as e:
        raise NPTError(f"Cannot load model {path!r}: {str(e).splitlines()[0][:300]}", "Check the folder or hub id.") from None
    model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # batching prompts needs a pad id; it is always masked
    return model, tokenizer
