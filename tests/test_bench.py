"""The benchmark runs, and its two designs compute the same per-layer losses."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
from helpers import ROOT, load_script, script_env

bench = load_script("benchmark")


@pytest.mark.parametrize("num_ranks", [1, 3])
def test_original_and_project_designs_compute_the_same_layer_losses(num_ranks):
    spec = bench.BenchSpec(shape="tiny", batch_size=3, seq_len=16, rank=4, num_ranks=num_ranks)
    model = bench.build_model(spec)
    x = bench.make_batch(model, spec)
    original = bench.OriginalStep(copy.deepcopy(model), spec)  # its own teacher and student copies
    project = bench.ProjectStep(model, spec)
    original.student.load_adapter_state_dict(project.npt.adapter_state_dict())
    ours, theirs = project.layer_losses(x), original.layer_losses(x)
    assert len(ours) == 3 and all(v > 0 for v in ours)
    assert ours == pytest.approx(theirs, rel=1e-5)


@pytest.mark.slow
def test_benchmark_script_prints_the_table():
    cmd = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--shapes", "tiny", "--rounds", "1", "--steps", "1", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=script_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for row in ("| teacher forward (floor) |", "| project step |", "| original design |", "| project step, free-running + logit KL |", "Project vs original:"):
        assert row in out, out
    mem = [float(line.split("|")[5]) for line in out.splitlines() if line.startswith(("| project step", "| original design"))]
    assert len(mem) == 3 and all(m > 0 for m in mem)
