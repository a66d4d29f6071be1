"""The benchmark runs, and its two designs compute the same per-layer losses."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import benchmark as bench
import plot_runs as plot
from helpers import ROOT, script_env



@pytest.mark.parametrize("num_ranks", [1, 3])
def test_original_and_project_designs_compute_the_same_layer_losses(num_ranks):
    spec = bench.BenchSpec(shape="tiny", batch_size=3, seq_len=16, rank=4, num_ranks=num_ranks, modulate="gate")
    model = bench.build_model(spec)
    x = bench.make_batch(model, spec)
    original = bench.OriginalStep(copy.deepcopy(model), spec)  # its own teacher and student copies
    project = bench.ProjectStep(model, spec)
    original.student.load_adapter_state_dict(project.npt.adapter_state_dict())
    ours, theirs = project.layer_losses(x), original.layer_losses(x)
    assert len(ours) == 3 and all(v > 0 for v in ours)
    assert ours == pytest.approx(theirs, rel=1e-5)


@pytest.mark.slow
def test_benchmark_script_prints_the_table(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--shapes", "tiny", "--rounds", "1", "--steps", "1", "--device", "cpu",
           "--contenders", "original,free,free_bf16", "--modulate", "gate", "--seq_len", "32", "--batch_size", "2", "--output_json", str(tmp_path / "bench.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=script_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for row in ("| teacher forward (floor) |", "| project step |", "| original design |", "| project step, free-running + logit KL |", "Project vs original:",
                "| project step, free-running + logit KL, bf16 autocast |", "Dense matmul rate measured here (float32",
                "Dense matmul rate measured here (bfloat16"):
        assert row in out, out
    rows = [line.split("|") for line in out.splitlines() if line.startswith(("| teacher", "| project step", "| original design"))]
    assert len(rows) == 5
    assert all(float(r[5]) > 0 and r[6].strip().endswith("%") for r in rows)  # GFLOP/s and the fraction of the measured matmul rate
    mem = [float(r[7]) for r in rows[1:]]
    assert all(m > 0 for m in mem)
    # the same figures, machine-readable, with where they come from
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["kind"] == "benchmark" and "benchmark.py --shapes tiny" in result["provenance"]["command"]
    assert result["provenance"]["machine"]["dtype"] == "float32" and result["provenance"]["machine"]["threads"] >= 1
    (shape,) = result["shapes"]
    assert shape["report"] in out and shape["spec"]["shape"] == "tiny"
    t = shape["seconds_per_step"]
    assert f"| {t['project'] * 1e3:.1f} | " in out and f"{t['project'] / t['teacher']:.2f}" in out


def test_matmul_counts_of_the_real_teacher_shape():
    """SmolLM2-135M's shape, by hand: 30 layers of d 576, f 1536, 9 heads / 3 KV heads of 64, vocabulary 49152."""
    spec = bench.BenchSpec(shape="smollm2-135m", batch_size=4, seq_len=64, rank=16, num_ranks=16)
    n, d, f, L, V = 256, 576, 1536, 30, 49152
    layer = 2 * n * d * (2 * 576 + 2 * 192) + 2 * 2 * 4 * 9 * 64 * 64 * 65 / 2 + 2 * n * 3 * d * f
    flops = bench.step_flops(spec)
    assert flops["teacher"] == pytest.approx(L * layer)
    assert flops["free"] - flops["project"] > 3 * 2 * n * d * V  # the LM head of the logit KL alone


def test_plot_runs_draws_the_held_out_curves_of_finished_runs(tmp_path):
    for name, kls in (("a", [2.0, 1.0]), ("b", [2.0, 0.5])):
        (tmp_path / name).mkdir()
        history = [{"step": s, "kl": k, "top1_agreement": 0.5, "ppl_ratio": 1 + k} for s, k in zip((0, 10), kls)]
        (tmp_path / name / "summary.json").write_text(json.dumps({"eval_history": history}))
    out = tmp_path / "curves.png"
    assert plot.main([str(tmp_path / "a"), str(tmp_path / "b"), "--labels", "A", "B", "--output", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_adapter_sizes_compared_side_by_side():
    """--compare_ranks: one row per size, adapter parameters by hand (tiny: 3 layers, d 32, f 64:
    A d r + B_m k r d + B_f k r f), ratios against the first size."""
    spec = bench.BenchSpec(shape="tiny", batch_size=2, seq_len=16)
    table = bench.rank_costs(spec, bench.parse_sizes("4x4,8x2,4x4-nogain,4x4+up+down,4x4-nogain-bias"), rounds=1, steps=1, warmup=1)
    rows = [line.split("|") for line in table.splitlines() if line.startswith(("| 4x4", "| 8x2"))]
    assert [r[1].strip() for r in rows] == ["4x4", "8x2", "4x4-nogain", "4x4+up+down", "4x4-nogain-bias"]
    low_rank = [3 * (32 * 4 + 16 * 32 + 16 * 64), 3 * (32 * 8 + 16 * 32 + 16 * 64)]
    # the gain: r + 1 weights per layer; up: another 16 x (32 + 64) and a gain, down 16 x (64 + 32)
    triple = low_rank[0] + 3 * 5 + 3 * (16 * 96 + 5) + 3 * 16 * 96
    assert [int(r[2].replace(",", "")) for r in rows] == [low_rank[0] + 3 * 5, low_rank[1] + 3 * 9, low_rank[0], triple, low_rank[0] + 3 * 4]
    assert float(rows[0][6]) == 1.0 and float(rows[1][6]) > 0
    for bad in ("16,32", "16x16-gain", "16x16+left"):
        with pytest.raises(SystemExit, match="r x k"):
            bench.parse_sizes(bad)


def test_every_adapter_flag_reaches_the_benchmark_or_is_refused():
    args, adapter = bench.parse(["--shapes", "tiny", "--no-gate_gain", "--modulation_scale", "0.5", "--npt_layers", "1-2",
                                 "--adapter_rank", "4", "--num_ranks", "2", "--modulate", "gate,up,down", "--bottleneck_bias"])
    spec = bench.spec_for("tiny", args, adapter)
    assert (spec.gate_gain, spec.modulation_scale, spec.npt_layers, spec.rank, spec.num_ranks) == (False, 0.5, "1-2", 4, 2)
    step = bench.FreeRunningStep(bench.build_model(spec), spec)
    assert step.npt.npt_config.layers == [1, 2] and not step.npt.npt_config.gate_gain
    assert step.npt.npt_config.modulate == ["gate", "up", "down"] and step.npt.npt_config.bottleneck_bias
    assert step.npt.npt_config.modulation_scale == 0.5
    with pytest.raises(SystemExit, match="--adapter_init default: the benchmark times random adapters"):
        bench.parse(["--adapter_init", "default"])
    with pytest.raises(SystemExit, match="converted every layer and modulated the gate only"):
        bench.OriginalStep(bench.build_model(spec), spec)


def test_the_free_running_step_from_the_embeddings_counts_the_layers_below_again():
    spec = bench.BenchSpec(shape="gemma3-270m", batch_size=4, seq_len=64, npt_layers="16-17")
    flops = bench.step_flops(spec)
    n, d, f, hd = 256, 640, 2048, 256
    layer = 2 * n * d * (2 * 4 * hd + 2 * 1 * hd) + 2 * 2 * 4 * 4 * hd * 64 * 65 / 2 + 2 * n * 3 * d * f
    assert flops["teacher"] == pytest.approx(18 * layer)
    assert flops["free_full"] - flops["free"] == pytest.approx(16 * layer)  # the 16 teacher layers below, run again


def test_residual_stats_match_hand_computed_figures():
    """scripts/residual_stats.py: layer 0's input is the embedding; its rms over tokens (the first
    position left out), that rms's coefficient of variation, and rms(a) / rms(h) with a the
    attention branch computed by hand from the layer's parts."""
    import residual_stats
    import torch
    from helpers import tiny_model

    model = tiny_model()
    blocks = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(0))
    rows = residual_stats.layer_stats(model, blocks)
    assert [r["layer"] for r in rows] == [0, 1, 2]
    with torch.no_grad():
        h = model.model.embed_tokens(blocks)
        pos = torch.arange(9)[None]
        layer = model.model.layers[0]
        a = layer.self_attn(hidden_states=layer.input_layernorm(h), position_embeddings=model.model.rotary_emb(h, pos),
                            attention_mask=torch.full((9, 9), float("-inf")).triu(1)[None, None])[0]
    rms_h, rms_a = h[:, 1:].pow(2).mean(-1).sqrt(), a[:, 1:].pow(2).mean(-1).sqrt()
    assert rows[0]["rms_h"] == pytest.approx(rms_h.mean().item(), rel=1e-5)
    assert rows[0]["rms_h_cv"] == pytest.approx((rms_h.std() / rms_h.mean()).item(), rel=1e-4)
    assert rows[0]["ratio"] == pytest.approx((rms_a / rms_h).mean().item(), rel=1e-4)
