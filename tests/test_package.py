"""The package installed like any other, used from outside the checkout: train, evaluate, generate,
inject, and load the injected model with plain transformers."""

from __future__ import annotations

import json
import os
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


def test_installed_commands_train_evaluate_generate_and_inject_from_outside_the_checkout(installed, trained_teacher_dir, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    # the package that runs is the installed one
    proc = run([sys.executable, "-c", "import npt; print(npt.__file__)"], installed, work)
    assert proc.stdout.strip().startswith(str(installed))

    # train a tiny run with the console command (and a bundled recipe, found as package data)
    run(["npt-pretrain", "--config", "fast", "--model_name", str(trained_teacher_dir), "--output_dir", "run", "--max_steps", "8",
         "--max_length", "32", "--batch_size", "4", "--eval_blocks", "6", "--eval_steps", "4", "--num_samples", "0", "--no-progress"], installed, work)
    summary = json.loads((work / "run" / "summary.json").read_text())
    # where the figures come from: the command as typed, this machine (an installed copy has no git commit)
    prov = summary["provenance"]
    assert prov["command"].startswith("npt-pretrain --config fast --model_name") and prov["commit"] is None
    assert prov["machine"]["device"] == "cpu" and prov["machine"]["dtype"].startswith("float32 weights")
    assert json.loads((work / "run" / "config.json").read_text())["distill_temperature"] == 2.0  # the fast recipe

    # evaluate: on the run's own held-out split, the numbers of the run's final summary
    proc = run(["npt-eval", "run/adapter"], installed, work)
    assert "free-running: KL(teacher||student)" in proc.stdout
    report = json.loads((work / "run" / "adapter" / "eval.json").read_text())
    for key in ("kl", "teacher_ppl", "student_ppl", "rel_error_mean"):
        assert report[key] == pytest.approx(summary["eval"][key], rel=1e-6), key
    assert report["rel_error"] == pytest.approx(summary["eval"]["rel_error"], rel=1e-6) and report["documents"] == "held-out"

    # ... and on other text: every document of a file
    other = work / "other.txt"
    other.write_text("".join(f"Line {i} of a text the run never saw, about files and lists of numbers.\n" for i in range(60)))
    proc = run(["npt-eval", "run/adapter", "--data_files", str(other), "--max_length", "32", "--eval_blocks", "4", "--output_json", "other.json",
                "--layer_attribution"], installed, work)
    other_report = json.loads((work / "other.json").read_text())
    assert other_report["documents"] == "all" and other_report["blocks"] == 4 and other_report["kl"] > 0
    # ... with each layer's share: one row per converted layer, printed and saved
    rows = other_report["layer_attribution"]
    assert [r["layer"] for r in rows] == list(range(len(rows))) and len(rows) == 3 and all(r["kl_alone"] >= 0 for r in rows)
    assert "| layer | KL, this layer reverted |" in proc.stdout

    # generate: teacher and student side by side, the tokenizer found with the adapters
    proc = run(["npt-generate", "run/adapter", "--prompt", "Return the", "--max_new_tokens", "8"], installed, work)
    assert "prompt: Return the" in proc.stdout and "teacher" in proc.stdout and "| student" in proc.stdout

    # inject a context, then load the result with transformers alone
    proc = run(["npt-inject", "run/adapter", "--context", "Return the list of widgets sorted by weight.", "--output_dir", "injected",
                "--alpha", "0.5", "--heldout_blocks", "4"], installed, work)
    assert "continuation loss" in proc.stdout and "held-out perplexity" in proc.stdout
    injection = json.loads((work / "injected" / "injection.json").read_text())
    assert injection["alpha"] == 0.5 and all(v["gate"] > 0 for v in injection["delta_frobenius"].values())
    check = (
        "import json, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"base = AutoModelForCausalLM.from_pretrained({str(trained_teacher_dir)!r})\n"
        "injected = AutoModelForCausalLM.from_pretrained('injected')\n"
        "report = json.load(open('injected/injection.json'))\n"
        "for i in report['layers']:\n"
        "    diff = injected.model.layers[i].mlp.gate_proj.weight - base.model.layers[i].mlp.gate_proj.weight\n"
        "    assert abs(diff.norm().item() - 0.5 * report['delta_frobenius'][str(i)]['gate']) < 1e-4 * diff.norm().item() + 1e-6, i\n"
        "    assert torch.equal(injected.model.layers[i].mlp.up_proj.weight, base.model.layers[i].mlp.up_proj.weight)\n"
        "print('plain transformers loaded it')\n"
    )
    env_without_npt = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", check], cwd=work, env=env_without_npt, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "plain transformers loaded it" in proc.stdout, proc.stderr[-2000:]
