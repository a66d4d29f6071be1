"""Checkpoints: adapters (safetensors + JSON) and a separate, resumable training state.

    <output_dir>/checkpoints/step-00000100/
        adapter_model.safetensors, adapter_config.json   loadable with NPTModel.from_pretrained
        training_state.pt                                optimizer, loss-module weights, step, RNG
        data_state.pt                                    the data position (the same on every process)
        manifest.json                                    size and sha256 of every file above

A checkpoint is assembled in a hidden temporary folder and renamed into place, and the manifest
is written last, so a crash during a save leaves the previous checkpoints untouched and a folder
without a valid manifest is never taken for a checkpoint. Training states are read with
`torch.load(weights_only=True)`: tensors and plain containers only, no code from a file runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from .errors import NPTError
from .model import ADAPTER_CONFIG, ADAPTER_WEIGHTS, NPTModel, sha256_file, write_json_atomic

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
TRAINING_STATE = "training_state.pt"
_STEP_DIR = re.compile(r"step-(\d+)")


DATA_STATE = "data_state.pt"

def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step:08d}"


def _torch_save(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def staging_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f".tmp-step-{step:08d}"


def begin_checkpoint(output_dir: Path, step: int) -> Path:
    """An empty staging folder for the checkpoint of `step`."""
    tmp = staging_dir(output_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_data_state(tmp: Path, data_state: dict) -> None:
    _torch_save(data_state, tmp / DATA_STATE)


def finish_checkpoint(output_dir: Path, step: int, npt_model: NPTModel, adapters: dict, training_state: dict, keep: int) -> Path:
    """Adapters, training state and manifest into the staging folder, then rename it into place."""
    tmp = staging_dir(output_dir, step)
    final = checkpoint_dir(output_dir, step)
    if final.is_dir():  # this step is already saved (an interrupt right after a periodic save): same state
        try:
            verify(final)
            shutil.rmtree(tmp, ignore_errors=True)
            return final
        except NPTError:
            shutil.rmtree(final)  # damaged: replace it
    npt_model.save_pretrained(tmp, state_dict=adapters)
    _torch_save(training_state, tmp / TRAINING_STATE)
    files = sorted(p.name for p in tmp.iterdir() if p.is_file() and not p.name.endswith(".tmp"))
    manifest = {"step": step, "files": {name: {"size": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)} for name in files}}
    write_json_atomic(tmp / MANIFEST, manifest)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    rotate(output_dir, keep)
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.fullmatch(p.name)
        if m and p.is_dir():
            found.append((int(m[1]), p))
    return sorted(found)


def rotate(output_dir: Path, keep: int) -> None:
    for _, path in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def verify(path: Path) -> dict:
    """Check the manifest: every file present with the recorded size and checksum."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise NPTError(f"Checkpoint {path} has no {MANIFEST}: it is incomplete (a save was interrupted) or not a checkpoint.", "Resume from an earlier checkpoint (see the checkpoints/ folder).")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise NPTError(f"Checkpoint {path}: {MANIFEST} is damaged.", "Resume from an earlier checkpoint.") from None
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            raise NPTError(f"Checkpoint {path} lacks {name}.", "Resume from an earlier checkpoint.")
        size = f.stat().st_size
        if size != meta["size"]:
            raise NPTError(f"Checkpoint {path}: {name} has {size} bytes, the manifest says {meta['size']} (truncated or damaged).", "Resume from an earlier checkpoint.")
        if sha256_file(f) != meta["sha256"]:
            raise NPTError(f"Checkpoint {path}: {name} does not match its checksum (damaged).", "Resume from an earlier checkpoint.")
    for needed in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, TRAINING_STATE, DATA_STATE):
        if needed not in files:
            raise NPTError(f"Checkpoint {path} lacks {needed}.", "Resume from a checkpoint written by this tool.")
    return manifest


def find_latest(output_dir: Path) -> Path | None:
    """The newest checkpoint whose manifest verifies (a damaged newest one is skipped with a note)."""
    for _, path in reversed(list_checkpoints(output_dir)):
        try:
            verify(path)
            return path
        except NPTError as e:
            print(f"[npt] skipping checkpoint {path.name}: {e.cause}", flush=True)
    return None


def _load(path: Path, what: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused or a corrupt file: both are the user's to fix
        raise NPTError(f"Cannot read {what} {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", "Resume from an earlier checkpoint.") from None


def load_training_state(path: Path) -> dict:
    return _load(Path(path) / TRAINING_STATE, "training state")


def load_data_state(path: Path) -> dict:
    return _load(Path(path) / DATA_STATE, "data state")
