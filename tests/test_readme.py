"""The README's quickstart runs as written: each command of its quickstart block, in order, in a
fresh folder. Only the training gets a smaller budget (and the test's small teacher) appended,
and `tensorboard`, a server, is not started."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest
from helpers import ROOT, script_env

pytestmark = pytest.mark.slow

# the console commands, run as the same entry points (whether or not the package is installed)
ENTRY = {"npt-pretrain": "script_main", "npt-eval": "eval_script", "npt-generate": "generate_script", "npt-inject": "inject_script"}


def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- quickstart[^>]*-->\s*```bash\n(.*?)```", text, re.S)
    assert block, "the README has no quickstart block"
    commands, current = [], ""
    for line in block[1].splitlines():
        line = line.split("  #")[0].rstrip() if not line.lstrip().startswith("python -c") else line.rstrip()
        current += line.rstrip("\\") + " " if line.endswith("\\") else line
        if not line.endswith("\\") and current.strip():
            commands.append(current.strip())
            current = ""
    return commands


def test_the_quickstart_runs_as_written(tmp_path, trained_teacher_dir):
    commands = quickstart_commands()
    assert [c.split()[0] for c in commands] == ["npt-pretrain", "tensorboard", "npt-eval", "npt-eval", "npt-generate", "npt-inject", "python"]
    (tmp_path / "notes.txt").write_text("".join(f"Note {i}: the widgets are sorted by weight and returned as a list.\n" for i in range(80)))
    budget = ["--model_name", str(trained_teacher_dir), "--max_steps", "8", "--max_length", "32", "--batch_size", "4",
              "--eval_blocks", "4", "--eval_steps", "4", "--num_samples", "0"]
    for command in commands:
        argv = shlex.split(command)
        if argv[0] == "tensorboard":
            continue
        if argv[0] == "python":
            argv[0] = sys.executable
        if argv[0] in ENTRY:
            extra = budget if argv[0] == "npt-pretrain" else (["--max_length", "32", "--eval_blocks", "4"] if "--data_files" in argv else [])
            argv = [sys.executable, "-c", f"from npt.cli import {ENTRY[argv[0]]}; {ENTRY[argv[0]]}()", *argv[1:], *extra]
        proc = subprocess.run(argv, cwd=tmp_path, env=script_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert (tmp_path / "runs" / "quickstart" / "adapter" / "eval.json").is_file()
    assert (tmp_path / "runs" / "injected" / "config.json").is_file()
