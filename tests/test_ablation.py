"""The built-in ablation runs end to end on a tiny model and writes its table, JSON and plot."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _jobs import run_all
from helpers import ROOT, script_env

from npt.model import AdapterArguments

pytestmark = pytest.mark.slow


def test_ablation_runs_end_to_end_and_writes_table_and_plot(tmp_path, trained_teacher_dir):
    out = tmp_path / "ablation"
    variants = "mse (baseline loss);improved_npt + adaptive weights;standard recipe (adaptive + penalty);guide's setting: k=1, teacher forcing only"
    cmd = [sys.executable, str(ROOT / "scripts" / "compare_losses.py"), "--output_dir", str(out), "--variants", variants, "--",
           "--model_name", str(trained_teacher_dir), "--max_steps", "10", "--eval_steps", "5", "--max_length", "32",
           "--batch_size", "4", "--eval_blocks", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=script_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (out / "results.md").read_text()
    for name in variants.split(";"):
        assert f"| {name} |" in table
    assert "| before training (attention dropped) |" in table
    results = json.loads((out / "results.json").read_text())
    assert results["kind"] == "ablation" and "compare_losses.py --output_dir" in results["provenance"]["command"]
    assert results["provenance"]["machine"]["cores"] >= 1 and results["provenance"]["date"].startswith("20")
    rows = results["rows"]
    assert [r["variant"] for r in rows] == variants.split(";")
    # every 5 steps, and where teacher forcing ends (step 2) in the variants that run freely
    assert {r["variant"]: [h["step"] for h in r["summary"]["eval_history"]] for r in rows} == {
        name: [0, 5, 10] if name.startswith("guide's setting") else [0, 2, 5, 10] for name in variants.split(";")}
    # the variants really ran with their own settings, on the same model and budget
    cfgs = {r["variant"]: r["config"] for r in rows}
    assert cfgs["mse (baseline loss)"]["loss_type"] == "mse" and cfgs["standard recipe (adaptive + penalty)"]["use_gradient_penalty"]
    guide = cfgs["guide's setting: k=1, teacher forcing only"]
    assert (guide["num_ranks"], guide["free_running_steps"], guide["logit_kl_weight"]) == (1, "0", 0.0)
    assert cfgs["mse (baseline loss)"]["num_ranks"] == AdapterArguments.num_ranks and cfgs["mse (baseline loss)"]["logit_kl_weight"] == 1.0
    assert {c["max_steps"] for c in cfgs.values()} == {10} and len({c["model_name"] for c in cfgs.values()}) == 1
    png = (out / "heldout_error.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_unknown_variant_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_losses.py"), "--output_dir", str(tmp_path / "x"), "--variants", "nope"],
                          capture_output=True, text=True, timeout=120, env=script_env())
    assert proc.returncode == 2 and "Unknown ablation variant" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_runs_in_parallel_come_back_in_order_each_on_its_share_of_the_cores():
    """`--jobs N` of compare_losses and zoo_bench: N spawned processes on cores / N threads each,
    results in the order given (whichever finishes first)."""
    import operator
    import os

    import torch

    calls = [(5, 1), (1, 5), (7, 7)]
    assert list(run_all(operator.sub, calls, jobs=1)) == [4, -4, 0]
    assert list(run_all(operator.sub, calls, jobs=2)) == [4, -4, 0]
    threads = list(run_all(torch.get_num_threads, [(), ()], jobs=2))
    assert threads == [max(1, (os.cpu_count() or 1) // 2)] * 2
    with pytest.raises(ValueError, match="at least 1"):
        list(run_all(operator.sub, calls, jobs=0))
