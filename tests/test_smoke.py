"""Every stage in seconds, for `pytest -m "not slow"`: a micro teacher built from synthetic text,
a few training steps with evaluation and checkpoints, a resume, and the three commands that use the
adapters. The slow tests check each stage's behaviour in depth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import read_scalars

from npt.cli import eval_main, generate_main, inject_main, main

def test_train_resume_evaluate_generate_inject_in_seconds(micro_teacher, tmp_path, capsys):
    teacher, text = micro_teacher
    out = tmp_path / "run"
    flags = ["--model_name", str(teacher), "--data_files", str(text), "--max_length", "16", "--batch_size", "4", "--eval_blocks", "4",
             "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "1", "--num_samples", "1", "--no-progress", "--output_dir", str(out)]
    assert main([*flags, "--max_steps", "4"]) == 0
    assert main([*flags, "--max_steps", "6", "--resume_from_checkpoint", "latest"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and [h["step"] for h in summary["eval_history"]] == [0, 1, 2, 4, 6]  # 1: where teacher forcing ends
    times = [h["train_seconds"] for h in summary["eval_history"]]
    assert times[0] == 0 and all(a < b for a, b in zip(times, times[1:])) and times[-1] == pytest.approx(summary["train_seconds"], abs=0.1)
    assert summary["adapter"] == {"modulate": "gate,up,down", "num_ranks": 6, "rank": 32}  # the default's shape, for the docs' cost figures
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "checkpoints" / "step-00000006").is_dir()
    assert "another training recipe" not in (out / "train.log").read_text()  # a longer run is the same recipe
    # resumed with another learning rate: it continues with it, and says so before any step
    lr = json.loads((out / "config.json").read_text())["learning_rate"]
    assert main([*flags, "--max_steps", "7", "--resume_from_checkpoint", "latest", "--learning_rate", "0.00123"]) == 0
    log = (out / "train.log").read_text()
    assert f"another training recipe than the checkpoint's: --learning_rate {lr} -> 0.00123." in log
    # and it trains with it: step 7 of 7 is in the decay, between a tenth of the new peak and the peak
    # (the checkpoint's peak, 0.02, would give at least 0.002)
    step7 = read_scalars(out)["training/learning_rate"][7]
    assert 0.000123 <= step7 <= 0.00123 * (1 + 1e-7), step7  # TensorBoard stores float32
    summary = json.loads((out / "summary.json").read_text())
    capsys.readouterr()

    assert eval_main([str(out / "adapter")]) == 0
    report = json.loads((out / "adapter" / "eval.json").read_text())
    assert report["kl"] == pytest.approx(summary["eval"]["kl"], rel=1e-6)
    assert generate_main([str(out / "adapter"), "--prompt", "the list", "--max_new_tokens", "4"]) == 0
    assert "| student" in capsys.readouterr().out
    assert inject_main([str(out / "adapter"), "--context", "the list returns a number value", "--output_dir", str(tmp_path / "inj"),
                        "--heldout_blocks", "2"]) == 0
    assert (tmp_path / "inj" / "config.json").is_file() and json.loads((tmp_path / "inj" / "injection.json").read_text())["after"]


def test_the_commands_refuse_bad_input_in_one_line(tmp_path, capsys):
    assert eval_main([str(tmp_path / "no-adapter")]) == 2
    assert "No adapter_config.json" in capsys.readouterr().err
    assert generate_main([str(tmp_path / "no-adapter"), "--promt", "x"]) == 2
    assert "did you mean --prompt?" in capsys.readouterr().err


def test_a_built_in_corpus_is_built_once_and_read_from_its_cache(tmp_path):
    from npt.corpus import load_corpus

    docs = load_corpus("prose", tmp_path)  # the smallest (the language reference's paragraphs)
    assert len(docs) > 1000 and sum(" the " in d for d in docs) > len(docs) / 2
    assert len(list(tmp_path.glob("corpus-prose-*.jsonl"))) == 1 and load_corpus("prose", tmp_path) == docs


def test_free_running_steps_train_at_their_own_learning_rate(micro_teacher, tmp_path):
    """--free_running_lr_scale 0.25: the teacher-forced steps' rates are unchanged, each free-running
    step's is a quarter of what it would have been; with --free_running_warmup 4 the first four
    free-running steps ramp it up, the i-th at i/4 of it."""
    teacher, text = micro_teacher
    rates = {}
    for name, extra in (("1", []), ("0.25", []), ("ramped", ["--free_running_warmup", "4"])):
        out = tmp_path / name
        scale = "1" if name == "1" else "0.25"
        assert main(["--model_name", str(teacher), "--data_files", str(text), "--max_length", "16", "--batch_size", "2", "--eval_blocks", "2",
                     "--eval_steps", "0", "--logging_steps", "1", "--num_samples", "0", "--no-progress", "--max_steps", "10",
                     "--free_running_lr_scale", scale, *extra, "--output_dir", str(out)]) == 0
        scalars = read_scalars(out)
        rates[name] = [(scalars["training/learning_rate"][s], scalars["training/free_running"][s] == 1) for s in sorted(scalars["training/learning_rate"])]
    assert len(rates["1"]) == 10 and [free for _, free in rates["1"]] == [free for _, free in rates["0.25"]] == [free for _, free in rates["ramped"]]
    assert sum(f for _, f in rates["1"]) >= 5 and not rates["1"][0][1]
    for (full, free), (scaled, _) in zip(rates["1"], rates["0.25"]):
        assert scaled == pytest.approx(full * (0.25 if free else 1.0), rel=1e-5)
    nth = 0
    for (full, free), (ramped, _) in zip(rates["1"], rates["ramped"]):
        nth += free
        assert ramped == pytest.approx(full * (0.25 * min(1, nth / 4) if free else 1.0), rel=1e-5)


def test_moments_cleared_where_free_running_starts(micro_teacher, tmp_path):
    """--reset_moments_at_free_running: the first free-running update is Adam's first, each adapter
    entry moving by the learning rate (m/sqrt(v) = g/|g|); without it the moments carry on. A run
    resumed from the checkpoint at the switch clears them alike."""
    import shutil

    import torch

    from npt.serialization import load_adapter_weights

    teacher, text = micro_teacher
    flags = ["--model_name", str(teacher), "--data_files", str(text), "--max_length", "16", "--batch_size", "2", "--eval_blocks", "2",
             "--eval_steps", "0", "--logging_steps", "1", "--num_samples", "0", "--no-progress", "--max_steps", "10", "--free_running_steps", "3",
             "--save_steps", "1", "--save_total_limit", "20", "--mixed_precision", "no", "--learning_rate", "1e-2", "--warmup_steps", "0"]
    steps = {}
    for name in ("carried", "cleared"):
        out = tmp_path / name
        assert main([*flags, "--output_dir", str(out), *(["--reset_moments_at_free_running"] if name == "cleared" else [])]) == 0
        state = lambda s: torch.load(out / "checkpoints" / f"step-{s:08d}" / "training_state.pt", weights_only=True)["optimizer"]["state"]
        steps[name] = {s: {float(v["step"]) for v in state(s).values()} for s in (7, 8, 10)}
    assert steps["carried"] == {7: {7.0}, 8: {8.0}, 10: {10.0}}
    assert steps["cleared"] == {7: {7.0}, 8: {1.0}, 10: {3.0}}  # step 7: where free-running starts

    out = tmp_path / "cleared"
    lr = read_scalars(out)["training/learning_rate"][8]
    before = load_adapter_weights(out / "checkpoints" / "step-00000007")
    after = load_adapter_weights(out / "checkpoints" / "step-00000008")
    moved = torch.cat([(after[k] - before[k]).abs().flatten() for k in before])
    moved = moved[moved > 0]
    assert moved.numel() > 1000 and moved.max() <= lr * (1 + 1e-5) and moved.median() == pytest.approx(lr, rel=1e-3)

    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "step-00000007", part / "checkpoints" / "step-00000007")
    assert main([*flags, "--output_dir", str(part), "--reset_moments_at_free_running", "--resume_from_checkpoint", "latest"]) == 0
    wa, wb = load_adapter_weights(out / "adapter"), load_adapter_weights(part / "adapter")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # bit-identical on CPU
