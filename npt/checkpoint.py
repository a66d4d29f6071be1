"""The training state: one dict, collected and applied here, kept in memory (for rollbacks) or
written to a checkpoint folder and read back into the same structure.

    state = {"adapters": ..., "optimizer": ..., "loss": ..., "generator": ..., "torch_rng": ...,
             "monitor": ..., "progress": ..., "eval_history": ..., "policy": ..., "best": ...,
             "data": ..., "config": ...}

    <output_dir>/checkpoints/step-00000100/
        adapter_model.safetensors, adapter_config.json   state["adapters"] (loadable with NPTModel.from_pretrained)
        data_state.pt                                    state["data"]: the data position (the same on every process)
        training_state.pt                                everything else
        manifest.json                                    size and sha256 of every file above

A checkpoint is assembled in a hidden temporary folder and renamed into place, and the manifest
is written last, so a crash during a save leaves the previous checkpoints untouched and a folder
without a valid manifest is never taken for a checkpoint. States are read with
`torch.load(weights_only=True)`: tensors and plain containers only, no code from a file runs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch

from .distributed import full_state_dict, load_full_state_dict, load_optimizer_state, optimizer_state
from .errors import NPTError
from .serialization import ADAPTER_CONFIG, ADAPTER_WEIGHTS, NPTConfig, load_adapter_weights, save_adapters, sha256_file, write_json_atomic

logger = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
TRAINING_STATE = "training_state.pt"
DATA_STATE = "data_state.pt"
_STEP_DIR = re.compile(r"step-(\d+)")


class Trainee(Protocol):
    """What a state covers (train.Run has these)."""

    npt: Any
    optimizer: Any
    objective: Any  # as prepared (DDP-wrapped or sharded)
    objective_module: Any  # the objective itself
    loss: Any
    monitor: Any
    progress: Any
    stream: Any
    eval_history: list
    policy: Any  # the divergence policy (its references)
    best: dict | None
    sharded: bool


# ---- the state --------------------------------------------------------------------------------------


def collect_state(run: Trainee, with_data: bool = True) -> dict:
    """The whole training state, on the CPU. Collective under FSDP: every process calls it."""
    state = {
        "adapters": {k: v.detach().to("cpu", copy=True) for k, v in run.npt.adapter_state_dict().items()},
        "optimizer": optimizer_state(run.optimizer.optimizer, run.objective, run.sharded),
        "loss": full_state_dict(run.loss),
        "generator": run.objective_module.generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "monitor": run.monitor.state_dict(),
        "progress": dataclasses.asdict(run.progress),
        "eval_history": json.loads(json.dumps(run.eval_history)),
        "policy": run.policy.state_dict(),
        "best": run.best,
    }
    if with_data:
        state["data"] = run.stream.state_dict()
    return state


def apply_state(run: Trainee, state: dict, with_data: bool = True) -> None:
    """Put `state` back into the run (everything `collect_state` took; the data position only
    with `with_data`). Collective under FSDP."""
    restore_training(run, state)
    run.monitor.load_state_dict(state["monitor"])
    run.progress = type(run.progress)(**state["progress"])
    run.eval_history = list(state["eval_history"])
    # checkpoints of version 0.2 kept only the evaluation before training
    run.policy.load_state_dict(state.get("policy") or {"start": state.get("start_eval"), "reference": {}, "last_good": None, "strikes": 0})
    run.best = state["best"]
    if with_data:
        run.stream.load_state_dict(state["data"])


def restore_training(run: Trainee, state: dict) -> None:
    """A rollback: what the optimisation depends on (adapters, the optimizer's moments, the
    loss's own weights, the random streams) back to `state`. The step count, the records and the
    data position go on. Collective under FSDP."""
    run.npt.load_adapter_state_dict(state["adapters"])
    # the moments come back, the hyperparameters stay this run's: loading an optimizer state also
    # loads its groups' peak rate, weight decay, betas and eps, which would silently override the
    # flags a resumed run was given
    hyper = [{k: v for k, v in group.items() if k != "params"} for group in run.optimizer.optimizer.param_groups]
    load_optimizer_state(run.optimizer.optimizer, run.objective, state["optimizer"], run.sharded)
    for group, kept in zip(run.optimizer.optimizer.param_groups, hyper):
        group.update(kept)
    load_full_state_dict(run.loss, state["loss"])
    run.objective_module.generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])


# ---- on disk ----------------------------------------------------------------------------------------


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step:08d}"


def _torch_save(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(output_dir: Path, step: int, state: dict, npt_config: NPTConfig, keep: int) -> Path:
    """Write `state` as the checkpoint of `step` (main process only) and keep the newest `keep`."""
    tmp = Path(output_dir) / CHECKPOINTS / f".tmp-step-{step:08d}"
    final = checkpoint_dir(output_dir, step)
    if final.is_dir():  # this step is already saved (an interrupt right after a periodic save): same state
        try:
            verify(final)
            return final
        except NPTError:
            shutil.rmtree(final)  # damaged: replace it
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rest = {k: v for k, v in state.items() if k not in ("adapters", "data")}
    save_adapters(tmp, npt_config, state["adapters"])
    _torch_save(state["data"], tmp / DATA_STATE)
    _torch_save(rest, tmp / TRAINING_STATE)
    files = sorted(p.name for p in tmp.iterdir() if p.is_file() and not p.name.endswith(".tmp"))
    manifest = {"step": step, "files": {name: {"size": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)} for name in files}}
    write_json_atomic(tmp / MANIFEST, manifest)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    for _, path in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> dict:
    """The state saved in checkpoint `path` (verified first)."""
    verify(path)
    state = _load(Path(path) / TRAINING_STATE, "training state")
    state["adapters"] = load_adapter_weights(path)
    state["data"] = _load(Path(path) / DATA_STATE, "data state")
    return state


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


def verify(path: Path) -> dict:
    """Check the manifest: every file present with the recorded size and checksum."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise NPTError(f"Checkpoint {path} has no {MANIFEST}: it is incomplete (a save was interrupted) or not a checkpoint.",
                       "Resume from an earlier checkpoint (see the checkpoints/ folder).")
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
            raise NPTError(f"Checkpoint {path}: {name} has {size} bytes, the manifest says {meta['size']} (truncated or damaged).",
                           "Resume from an earlier checkpoint.")
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
            logger.warning(f"skipping checkpoint {path.name}: {e.cause}")
    return None


def _load(path: Path, what: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused or a corrupt file: both are the user's to fix
        raise NPTError(f"Cannot read {what} {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", "Resume from an earlier checkpoint.") from None
