"""Every measured figure the docs quote comes from a results file: the generated tables agree with
their files, and each file says where its figures come from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import benchmark as bench
import render_results as render

ROOT = Path(__file__).resolve().parents[1]


def test_every_generated_table_agrees_with_its_results_files():
    assert render.stale() == []


def test_the_docs_generate_tables_from_files_that_exist_and_say_where_they_come_from():
    files = set()
    for doc in render.documents():
        for m in render.BLOCK.finditer(doc.read_text()):
            assert m.group(2) in render.KINDS, (doc, m.group(1))
            files |= set(m.group(3).split())
    assert files, "no generated table in README.md or docs/"
    for path in sorted(files):
        prov = json.loads((ROOT / path).read_text())["provenance"]
        assert prov["command"] and prov["date"][:2] == "20" and len(prov["commit"] or "") == 40, path
        assert {"cores", "threads", "device", "dtype"} <= prov["machine"].keys(), path
    # and every committed results file is quoted somewhere
    committed = {str(p.relative_to(ROOT)) for p in (ROOT / "docs" / "results").glob("*.json")}
    assert committed <= files, committed - files


def _summary(kl: float, steps: int, command: str) -> dict:
    ev = {"step": steps, "kl": kl, "kl_stderr": 0.01, "top1_agreement": 0.875, "top1_stderr": 0.01, "ppl_ratio": 1.0421, "rel_error_mean": 0.25,
          "greedy_match": 3.25, "greedy_tokens": 32}
    before = ev | {"step": 0, "kl": 0.5}
    return {"steps": steps, "tokens_seen": steps * 256, "train_seconds": 123.4, "rollbacks": [], "eval": ev, "eval_before": before,
            "eval_history": [before, ev],
            "provenance": {"command": command, "commit": "a" * 40, "dirty": False, "date": "2026-12-02T10:00:00+00:00",
                           "machine": {"cores": 2, "threads": 1, "device": "cpu", "device_name": "x86_64", "dtype": "float32 weights, bf16 autocast"}}}


def test_a_table_is_rendered_from_the_numbers_and_a_hand_edit_is_caught(tmp_path, monkeypatch):
    monkeypatch.setattr(render, "ROOT", tmp_path)
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "docs" / "results" / "a.json").write_text(json.dumps(_summary(0.1234, 100, "npt-pretrain --max_steps 100")))
    b = _summary(0.0567, 100, "npt-pretrain --max_steps 100 --num_ranks 8 --output_dir runs/b --no-progress --save_steps 50 --resume_from_checkpoint latest")
    b["eval"]["step"] = 50  # kept from an earlier evaluation than the last
    (tmp_path / "docs" / "results" / "b.json").write_text(json.dumps(b))
    doc = tmp_path / "README.md"
    doc.write_text("intro\n<!-- results runs: docs/results/a.json docs/results/b.json -->\nold\n<!-- /results -->\nend\n")
    assert render.stale() == ["README.md: <!-- results runs: docs/results/a.json docs/results/b.json -->"]
    assert render.main([]) == 0 and render.stale() == []
    text = doc.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    # the flags that tell the runs apart; KL +- 1.96 standard errors; the figures as measured
    assert rows[0].startswith("| `defaults of aaaaaaa` | 100 | 25,600 | 0.500 -> **0.1234 +- 0.0196** | 87.5% | 3.2 / 32 | 1.042 | 123 | 0 |")
    assert rows[1].startswith("| `--num_ranks 8` | 100 | 25,600 | 0.500 -> **0.0567 +- 0.0196** (step 50) |")  # bookkeeping flags left out
    # the flags every run had are named once, so the row labelled with the defaults does not hide them
    assert "Every run above also had `--max_steps 100`; a label names the flags it had besides." in text
    assert "`npt-pretrain --max_steps 100 --num_ranks 8`, commit aaaaaaa, 2026-12-02, 2 CPU cores, 1 thread(s), float32 weights, bf16 autocast" in text
    assert text.startswith("intro\n") and text.endswith("<!-- /results -->\nend\n")
    doc.write_text(text.replace("0.0567", "0.0500"))
    assert len(render.stale()) == 1 and render.main(["--check"]) == 1


def test_a_runs_label_keeps_each_flag_with_its_value():
    """A value shared by another flag of every command ('64' of --max_length 64) stays with its
    own flag: --adapter_rank 64 is not shown as a bare --adapter_rank."""
    common = "npt-pretrain --model_name m --max_length 64 --max_steps 1000 --output_dir out"
    labels = render._labels([{"command": common, "commit": "a" * 40},
                             {"command": common + " --adapter_rank 64 --num_ranks 3", "commit": "a" * 40},
                             {"command": common + " --text_column 'my text'", "commit": "a" * 40}])
    assert labels == ["defaults of aaaaaaa", "--adapter_rank 64 --num_ranks 3", "--text_column 'my text'"]


def test_a_curve_shows_the_training_time_of_each_evaluation_where_recorded(tmp_path):
    s = _summary(0.1, 100, "npt-pretrain --max_steps 100")
    (tmp_path / "old.json").write_text(json.dumps(s))
    assert render.curve([str(tmp_path / "old.json")]).splitlines()[2] == "| 0 | 0 | 0.5000 | 87.5% | 3.2 / 32 | 1.042 | 0.250 |"
    s["eval_history"] = [h | {"train_seconds": t} for h, t in zip(s["eval_history"], (0.0, 123.4))]
    (tmp_path / "new.json").write_text(json.dumps(s))
    rows = render.curve([str(tmp_path / "new.json")]).splitlines()
    assert rows[0].endswith("| mean rel error | training (min) |") and rows[3] == "| 100 | 25,600 | 0.1000 | 87.5% | 3.2 / 32 | 1.042 | 0.250 | 2.1 |"


def test_an_ablation_row_shows_the_training_time_and_the_rollbacks_of_its_run(tmp_path):
    rows = []
    for name, flags, kl, rollbacks in (("improved_npt (default)", "--loss_type improved_npt", 0.1234, []),
                                       ("moments reset", "--reset_moments_at_free_running", 0.0567, [{"step": 410, "to_step": 400}])):
        s = _summary(kl, 100, "compare_losses.py --output_dir runs/ablation")
        s["rollbacks"] = rollbacks
        rows.append({"variant": name, "flags": flags, "seconds": 999.0, "summary": s})
    process = rows[0]["summary"]["provenance"] | {"machine": {"cores": 2, "threads": 2, "device": "cpu", "device_name": "x86_64", "dtype": None}}
    (tmp_path / "ablation.json").write_text(json.dumps({"kind": "ablation", "rows": rows, "provenance": process}))
    lines = render.ablation([str(tmp_path / "ablation.json")]).splitlines()
    assert lines[0].endswith("| mean rel error | training (s) | rollbacks |")
    # the run's own training seconds (123.4), not the row's wall time with its evaluations (999)
    assert lines[2] == "| improved_npt (default) | `--loss_type improved_npt` | 0.1234 +- 0.0196 | 87.5% | 3.2 / 32 | 1.042 | 0.2500 | 123 | 0 |"
    assert lines[3].endswith("| 0.0567 +- 0.0196 | 87.5% | 3.2 / 32 | 1.042 | 0.2500 | 123 | 1 |")
    # each run's threads and dtype, not those of the process that ran two at a time
    assert lines[-1].endswith(", 2 CPU cores, 1 thread(s), float32 weights, bf16 autocast"), lines[-1]


def test_the_extrapolation_fits_the_second_half_of_the_curve_by_hand(tmp_path, monkeypatch):
    """KL = 2 T^-1/2 exactly on the second half (the first half, off the law, is left out): KL 0.5
    at (2 / 0.5)^2 = 16 tokens, 0.2 at 100; GPU hours = tokens x FLOPs per token / (0.4 x 989e12)."""
    monkeypatch.setattr(render, "ROOT", tmp_path)
    s = _summary(0.1, 8, "npt-pretrain")
    s["tokens_seen"], s["steps"] = 8, 8  # one token per step
    s["eval_history"] = [{"step": t, "kl": 9.0 if t < 4 else 2.0 * t**-0.5} for t in range(1, 9)]
    (tmp_path / "curve.json").write_text(json.dumps(s))
    text = render.extrapolation(["curve.json"])
    assert "`KL = 2 T^-0.500`" in text and "5 evaluations, steps 4-8" in text
    # a summary without its adapter predates the triple default: the gate alone, k 32, priced as such
    spec = bench.BenchSpec(shape="llama-1b", batch_size=8, seq_len=2048, npt_layers="all", modulate="gate", num_ranks=32, rank=16)
    per_token = bench.step_flops(spec)["free"] / (8 * 2048)
    assert f"KL 0.5 after 16 tokens, {16 * per_token / (0.4 * 989e12) / 3600:.2g} GPU hours" in text
    assert f"KL 0.2 after 1e+02 tokens, {100 * per_token / (0.4 * 989e12) / 3600:.2g} GPU hours" in text
    assert f"this run's adapter: gate k 32 r 16; its free-running step {per_token / 1e9:.1f} GFLOP" in text
    # the adapter a run records, or its flags, set the step's cost: a rank-64 triple costs more than the gate
    for record in ({"adapter": {"modulate": "gate,up,down", "num_ranks": 11, "rank": 64}},
                   {"provenance": s["provenance"] | {"command": "npt-pretrain --modulate=gate,up,down --num_ranks 11 --adapter_rank 64"}}):
        assert render.run_adapter(s | record) == {"modulate": "gate,up,down", "num_ranks": 11, "rank": 64}
        (tmp_path / "curve.json").write_text(json.dumps(s | record))
        big = bench.step_flops(bench.BenchSpec(shape="llama-1b", batch_size=8, seq_len=2048, npt_layers="all", modulate="gate,up,down",
                                               num_ranks=11, rank=64))["free"] / (8 * 2048)
        assert big > 1.01 * per_token and f"gate+up+down k 11 r 64; its free-running step {big / 1e9:.1f} GFLOP" in render.extrapolation(["curve.json"])
    s["eval_history"] = [{"step": t, "kl": 0.1 * t} for t in range(1, 9)]  # rising: nothing to extrapolate
    (tmp_path / "curve.json").write_text(json.dumps(s))
    assert "does not fall" in render.extrapolation(["curve.json"])


def test_an_unknown_table_kind_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(render, "ROOT", tmp_path)
    (tmp_path / "README.md").write_text("<!-- results pie: x.json -->\n<!-- /results -->\n")
    with pytest.raises(SystemExit, match="unknown table kind 'pie'"):
        render.stale()
