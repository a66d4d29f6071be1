"""The README's quickstart runs as written, with the package installed like any other and used from
outside the checkout: train, evaluate, generate, inject, and load the injected model with plain
transformers. Each command of the quickstart block runs in order in a fresh folder; only a smaller
budget (and the test's small teacher) is appended, and `tensorboard`, a server, is not started."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """`pip install` of the checkout into a folder of its own (no dependencies: they are here)."""
    site = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site), str(ROOT)],
                   check=True, capture_output=True, text=True, timeout=600, cwd=tmp_path_factory.mktemp("build-cwd"))
    return site


def run(cmd: list[str], site: Path, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """A console command of the installed package, with the checkout nowhere on the path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site), "PATH": f"{site / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


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


def test_the_readme_quickstart_runs_as_written_with_the_installed_package(installed, trained_teacher_dir, tmp_path):
    commands = quickstart_commands()
    assert [c.split()[0] for c in commands] == ["npt-pretrain", "tensorboard", "npt-eval", "npt-eval", "npt-generate", "npt-inject", "python"]
    train, _, evaluate, evaluate_other, generate, inject, load = (shlex.split(c) for c in commands)
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "notes.txt").write_text("".join(f"Note {i}: the widgets are sorted by weight and returned as a list, a text the run never saw.\n" for i in range(80)))
    # the package that runs is the installed one
    proc = run([sys.executable, "-c", "import npt; print(npt.__file__)"], installed, work)
    assert proc.stdout.strip().startswith(str(installed))

    # train, with a smaller budget and a bundled recipe (found as package data)
    run([*train, "--config", "fast", "--model_name", str(trained_teacher_dir), "--max_steps", "8", "--max_length", "32", "--batch_size", "4",
         "--eval_blocks", "6", "--eval_steps", "4", "--num_samples", "0", "--no-progress"], installed, work)
    out = work / "runs" / "quickstart"
    summary = json.loads((out / "summary.json").read_text())
    # where the figures come from: the command as typed, this machine (an installed copy has no git commit)
    prov = summary["provenance"]
    assert prov["command"].startswith("npt-pretrain --output_dir runs/quickstart --config fast --model_name") and prov["commit"] is None
    assert prov["machine"]["device"] == "cpu" and prov["machine"]["dtype"].startswith("float32 weights")
    assert json.loads((out / "config.json").read_text())["distill_temperature"] == 2.0  # the fast recipe

    # evaluate: on the run's own held-out split, the numbers of the run's final summary
    proc = run(evaluate, installed, work)
    assert "free-running: KL(teacher||student)" in proc.stdout
    report = json.loads((out / "adapter" / "eval.json").read_text())
    for key in ("kl", "teacher_ppl", "student_ppl", "rel_error_mean"):
        assert report[key] == pytest.approx(summary["eval"][key], rel=1e-6), key
    assert report["rel_error"] == pytest.approx(summary["eval"]["rel_error"], rel=1e-6) and report["documents"] == "held-out"

    # ... and on other text: every document of a file, with each layer's share (one row per converted layer, printed and saved)
    proc = run([*evaluate_other, "--max_length", "32", "--eval_blocks", "4", "--output_json", "other.json"], installed, work)
    other_report = json.loads((work / "other.json").read_text())
    assert other_report["documents"] == "all" and other_report["blocks"] == 4 and other_report["kl"] > 0
    rows = other_report["layer_attribution"]
    assert [r["layer"] for r in rows] == list(range(len(rows))) and len(rows) == 3 and all(r["kl_alone"] >= 0 for r in rows)
    assert "| layer | KL, this layer reverted (the others NPT) |" in proc.stdout

    # generate: teacher and student side by side, the tokenizer found with the adapters
    proc = run([*generate, "--max_new_tokens", "8"], installed, work)
    assert "prompt: Return the number of" in proc.stdout and "teacher" in proc.stdout and "| student" in proc.stdout

    # inject a context, then load the result with transformers alone
    proc = run([*inject, "--heldout_blocks", "4"], installed, work)
    assert "continuation loss" in proc.stdout and "held-out perplexity" in proc.stdout
    injected = work / "runs" / "injected"
    injection = json.loads((injected / "injection.json").read_text())
    assert injection["alpha"] == 0.5 and injection["layers"] == [0] and injection["delta_frobenius"]["0"]["gate"] > 0
    env_without_npt = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable if load[0] == "python" else load[0], *load[1:]], cwd=work, env=env_without_npt, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "LlamaForCausalLM" in proc.stdout, proc.stderr[-2000:]
    check = (
        "import json, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"base = AutoModelForCausalLM.from_pretrained({str(trained_teacher_dir)!r})\n"
        "injected = AutoModelForCausalLM.from_pretrained('runs/injected')\n"
        "report = json.load(open('runs/injected/injection.json'))\n"
        "weight = lambda m, i, p: getattr(m.model.layers[i].mlp, p + '_proj').weight\n"
        "assert sorted(report['delta_frobenius']['0']) == ['down', 'gate', 'up']\n"  # the default modulates all three
        "for i in report['layers']:\n"
        "    for p, norm in report['delta_frobenius'][str(i)].items():\n"
        "        diff = weight(injected, i, p) - weight(base, i, p)\n"
        "        assert abs(diff.norm().item() - 0.5 * norm) < 1e-4 * diff.norm().item() + 1e-6, (i, p)\n"
        "for i in range(1, len(base.model.layers)):\n"
        "    for p in ('gate', 'up', 'down'):\n"
        "        assert torch.equal(weight(injected, i, p), weight(base, i, p)), (i, p)\n"
        "print('plain transformers loaded it')\n"
    )
    proc = subprocess.run([sys.executable, "-c", check], cwd=work, env=env_without_npt, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "plain transformers loaded it" in proc.stdout, proc.stderr[-2000:]

