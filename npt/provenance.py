"""Where a measurement comes from: the command, the commit, the date and the machine.

Every measuring tool (the main job's summary.json, scripts/zoo_bench.py, scripts/compare_losses.py,
scripts/benchmark.py) writes `provenance()` next to its figures, so that a results file under
docs/results/ says how to reproduce each figure the docs quote from it.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch
import transformers

SOURCE_ROOT = Path(__file__).resolve().parents[1]


def provenance(device: str | None = None, dtype: str | None = None, command: list[str] | None = None) -> dict:
    """The command line (this process's own unless given), the source's git commit (None outside a
    git checkout; `dirty` when tracked files differ from it), the UTC date and the machine."""
    argv = list(sys.argv if command is None else command)
    if argv:
        argv[0] = Path(argv[0]).name
    commit, dirty = _git_commit()
    return {
        "command": shlex.join(argv),
        "commit": commit,
        "dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(device, dtype),
    }


def machine(device: str | None = None, dtype: str | None = None) -> dict:
    """Cores, torch threads, device (a GPU's name), dtype, and the versions that decide the kernels."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else platform.processor() or platform.machine()
    return {
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": device,
        "device_name": name,
        "dtype": dtype,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _git_commit() -> tuple[str | None, bool | None]:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=SOURCE_ROOT, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None, None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=SOURCE_ROOT, capture_output=True, text=True, timeout=10)
        return head.stdout.strip(), bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):  # no git on this machine: the record says so (None)
        return None, None


def describe(prov: dict) -> str:
    """One line for a generated table's caption."""
    m = prov["machine"]
    where = m["device_name"] if m["device"].startswith("cuda") else f"{m['cores']} CPU cores, {m['threads']} thread(s)"
    commit = (prov["commit"] or "unknown")[:7] + ("+" if prov.get("dirty") else "")
    return f"`{prov['command']}`, commit {commit}, {prov['date'][:10]}, {where}{', ' + m['dtype'] if m.get('dtype') else ''}"
