"""Reliability: bad input refused before anything is written, non-finite steps skipped, signals
checkpoint and exit, kill -9 loses only the steps since the last checkpoint, resume is exact,
checkpoints are atomic, verified and never unpickle code."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, read_scalars

from npt.checkpoint import TRAINING_STATE, find_latest, list_checkpoints, verify
from npt.cli import main
from npt.errors import NPTError
from npt.serialization import load_adapter_weights

pytestmark = pytest.mark.slow


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(args)
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err


def tiny_args(teacher: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_name", str(teacher), "--output_dir", str(out), "--max_length", "32", "--batch_size", "4",
            "--eval_blocks", "4", "--num_samples", "0", "--no-progress", "--max_steps", "6", "--eval_steps", "0", *extra]


def snapshot(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))} if path.exists() else {}


@pytest.fixture(scope="module")
def finished_run(trained_teacher_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(tiny_args(trained_teacher_dir, out, "--adapter_rank", "4", "--save_steps", "3")) == 0
    return out


def _bad_inputs(tmp: Path, teacher: Path) -> dict[str, tuple[list[str], str]]:
    from transformers import GPT2Config

    gpt2 = tmp / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(gpt2)
    nocol = tmp / "nocol.jsonl"
    nocol.write_text("".join(json.dumps({"body": f"document number {i} " * 20}) + "\n" for i in range(50)))
    tiny = tmp / "tiny.txt"
    tiny.write_text("".join(f"short line {i}\n" for i in range(3)))
    empty, blank = tmp / "empty.txt", tmp / "blank.jsonl"
    empty.write_text("")
    blank.write_text("\n\n\n")
    return {
        "unknown loss type": (["--loss_type", "nope"], "'nope' is not a registered loss"),
        "negative loss weight": (["--mse_weight", "-0.5"], "--mse_weight -0.5 is negative"),
        "all-zero loss weights": (["--mse_weight", "0", "--cosine_weight", "0"], "both 0"),
        "model path missing": (["--model_name", str(tmp / "no" / "model")], "does not exist"),
        "hub id while offline": (["--model_name", "no-such-org/no-such-model"], "HF_HUB_OFFLINE=1"),
        "unsupported architecture": (["--model_name", str(gpt2)], "model.model.layers"),
        "adapter rank 0": (["--adapter_rank", "0"], "--adapter_rank 0 must be at least 1"),
        "adapter rank > hidden": (["--adapter_rank", "65"], "outside 1..hidden_size (64)"),
        "missing layer": (["--npt_layers", "0,7"], "names layer(s) [7]"),
        "dataset path missing": (["--data_files", str(tmp / "nothing.jsonl")], "does not exist"),
        "no text column": (["--data_files", str(nocol)], "columns are ['body']"),
        "corpus below one block": (["--data_files", str(tiny), "--eval_fraction", "0.5"], "block"),
        "max_length beyond positions": (["--max_length", "1000"], "exceeds the model's 256 positions"),
        "batch size 0": (["--batch_size", "0"], "--batch_size 0 must be at least 1"),
        "bad warmup": (["--warmup_steps", "ten"], "neither a step count nor a fraction"),
        "bad free-running warm-up": (["--free_running_warmup", "-3"], "neither a step count nor a fraction"),
        "cuda without a gpu": (["--device", "cuda"], "no CUDA device"),
        "missing config file": (["--config", str(tmp / "nope.yaml")], "does not exist"),
        "logit KL without free-running": (["--free_running_steps", "0", "--logit_kl_weight", "1"], "acts only in free-running steps"),
        "reverse KL share above 1": (["--reverse_kl_share", "1.5"], "--reverse_kl_share 1.5 is not a share"),
        "progressive stages 0": (["--progressive_stages", "0"], "--progressive_stages 0 must be at least 1"),
        "stages without free-running": (["--progressive_stages", "2", "--free_running_steps", "0", "--logit_kl_weight", "0"],
                                        "the stages split the free-running phase, which has 0 steps"),
        "empty data file": (["--data_files", str(empty)], "are empty (0 bytes)"),
        "data file without rows": (["--data_files", str(blank)], "Check that the files hold rows of text"),
        "layers wired differently (bitnet)": (["--model_name", str(_bitnet(tmp, teacher))], "decoder layer 0: a fresh NPT layer on input h + a differs"),
    }


def _bitnet(tmp: Path, teacher: Path) -> Path:
    """A BitNet model (a norm inside the MLP: every part the NPT layer uses, wired otherwise) saved
    with the teacher's tokenizer."""
    import shutil

    from transformers import BitNetConfig, BitNetForCausalLM

    path = tmp / "bitnet"
    torch.manual_seed(0)
    BitNetForCausalLM(BitNetConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256)).save_pretrained(path)
    for f in teacher.glob("tokenizer*"):
        shutil.copy(f, path / f.name)
    return path


CASES = ["unknown loss type", "negative loss weight", "all-zero loss weights", "model path missing", "hub id while offline",
         "unsupported architecture", "adapter rank 0", "adapter rank > hidden", "missing layer", "dataset path missing",
         "no text column", "corpus below one block", "max_length beyond positions", "batch size 0", "bad warmup",
         "cuda without a gpu", "missing config file", "logit KL without free-running", "reverse KL share above 1", "progressive stages 0",
         "stages without free-running", "empty data file", "data file without rows",
         "layers wired differently (bitnet)"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_refused_with_one_line_and_nothing_written(case, tmp_path, trained_teacher_dir, capsys):
    if case == "cuda without a gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    flags, expected = _bad_inputs(tmp_path, trained_teacher_dir)[case]
    out = tmp_path / "out"
    code, err = run_cli(tiny_args(trained_teacher_dir, out, *flags), capsys)
    # the libraries' own progress bars (loading weights, preparing a dataset) may precede the
    # message; nothing else may
    lines = [line for line in err.splitlines() if line.strip() and not re.search(r"\[\d+:\d\d", line)]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert expected in lines[0] and ("Fix:" in lines[0]), lines[0]
    assert not out.exists()


def test_output_dir_with_another_run_is_refused_untouched(tmp_path, trained_teacher_dir, capsys, finished_run):
    before = snapshot(finished_run)
    code, err = run_cli(tiny_args(trained_teacher_dir, finished_run), capsys)
    assert code == 2 and "already holds a run" in err and "--resume_from_checkpoint latest" in err
    assert snapshot(finished_run) == before


def test_resume_with_another_adapter_shape_or_model_is_refused(tmp_path, trained_teacher_dir, capsys, finished_run):
    import shutil

    from npt.corpus import load_corpus
    from npt.teachers import TeacherRecipe, build_teacher

    before = snapshot(finished_run)
    code, err = run_cli(tiny_args(trained_teacher_dir, finished_run, "--adapter_rank", "8", "--resume_from_checkpoint", "latest"), capsys)
    assert code == 2 and "another model or adapter shape" in err and "rank: checkpoint 4 vs now 8" in err
    code, err = run_cli(tiny_args(trained_teacher_dir, finished_run, "--modulate", "gate,up", "--resume_from_checkpoint", "latest"), capsys)
    assert code == 2 and "modulate: checkpoint ['gate', 'up', 'down'] vs now ['gate', 'up']" in err
    code, err = run_cli(tiny_args(trained_teacher_dir, finished_run, "--adapter_input", "relative", "--resume_from_checkpoint", "latest"), capsys)
    assert code == 2 and "adapter_input: checkpoint attention vs now relative" in err
    other = tmp_path / "other-teacher"
    build_teacher(other, load_corpus()[:400], TeacherRecipe(vocab_size=300, hidden_size=64, intermediate_size=256, num_layers=3, num_heads=4,
                                                                 max_position_embeddings=256, seq_len=32, batch_size=4, steps=2, warmup_steps=1), progress=False)
    code, err = run_cli(tiny_args(other, finished_run, "--adapter_rank", "4", "--resume_from_checkpoint", "latest"), capsys)
    assert code == 2 and "base_model" in err
    assert snapshot(finished_run) == before
    shutil.rmtree(other)


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest"])
def test_damaged_checkpoint_is_detected_and_refused(tmp_path, trained_teacher_dir, capsys, finished_run, damage):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    newest = list_checkpoints(run)[-1][1]
    state = newest / TRAINING_STATE
    if damage == "truncate":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    elif damage == "flip":
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0x55
        state.write_bytes(bytes(data))
    else:
        (newest / "manifest.json").unlink()
    with pytest.raises(NPTError):
        verify(newest)
    before = snapshot(run)
    code, err = run_cli(tiny_args(trained_teacher_dir, run, "--adapter_rank", "4", "--resume_from_checkpoint", str(newest)), capsys)
    assert code == 2 and "Resume from an earlier checkpoint" in err
    assert snapshot(run) == before
    # 'latest' skips the damaged newest checkpoint and takes the previous, intact one
    assert find_latest(run) == list_checkpoints(run)[-2][1]


def test_training_state_never_unpickles_code(tmp_path, finished_run):
    import shutil

    from npt.checkpoint import MANIFEST, load_checkpoint
    from npt.serialization import sha256_file

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    ckpt = list_checkpoints(run)[-1][1]
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"run": Evil()}, ckpt / TRAINING_STATE)
    manifest = json.loads((ckpt / MANIFEST).read_text())  # a consistent manifest: only unpickling can stop it
    manifest["files"][TRAINING_STATE] = {"size": (ckpt / TRAINING_STATE).stat().st_size, "sha256": sha256_file(ckpt / TRAINING_STATE)}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    verify(ckpt)
    with pytest.raises(NPTError, match="Cannot read training state"):
        load_checkpoint(ckpt)
    assert not marker.exists()
    assert (ckpt / "adapter_model.safetensors").read_bytes()[:8]  # adapters are safetensors, not pickle


def _poison(monkeypatch, bad_calls):
    """Make the objective non-finite on the given forward calls (counted from 0)."""
    from npt.objective import EquivalenceObjective

    original = EquivalenceObjective.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if calls["n"] in bad_calls:
            out.objective = out.objective * float("nan")
        calls["n"] += 1
        return out

    monkeypatch.setattr(EquivalenceObjective, "forward", forward)


def test_isolated_nan_steps_are_skipped_counted_and_logged(tmp_path, trained_teacher_dir, capsys, monkeypatch):
    _poison(monkeypatch, {2, 5, 6})
    out = tmp_path / "run"
    code, err = run_cli(tiny_args(trained_teacher_dir, out, "--max_steps", "8", "--logging_steps", "1"), capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["skipped_steps"] == 3
    scalars = read_scalars(out)
    assert max(scalars["training/skipped_steps"].values()) == 3
    assert sorted(scalars["loss/total"]) == list(range(1, 9))  # skipped steps do not advance the step
    assert all(torch.isfinite(t).all() for t in load_adapter_weights(out / "adapter").values())


def test_persistent_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, trained_teacher_dir, capsys, monkeypatch):
    _poison(monkeypatch, set(range(4, 1000)))
    out = tmp_path / "run"
    code, err = run_cli(tiny_args(trained_teacher_dir, out, "--max_steps", "50", "--save_steps", "2", "--max_bad_steps", "3"), capsys)
    assert code == 3
    assert "3 consecutive steps had a non-finite loss" in err and "step-00000004" in err and "Fix:" in err
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]
    verify(list_checkpoints(out)[-1][1])
    assert all(torch.isfinite(t).all() for t in load_adapter_weights(list_checkpoints(out)[-1][1]).values())


def _launch(args: list[str]) -> subprocess.Popen:
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "pretrain_npt_improved.py"), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before the awaited moment: {proc.stderr.read()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.005)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_writes_a_resumable_checkpoint_and_exits_conventionally(tmp_path, trained_teacher_dir, sig):
    out = tmp_path / "run"
    proc = _launch(tiny_args(trained_teacher_dir, out, "--max_steps", "100000", "--save_steps", "100000", "--logging_steps", "5"))
    _wait_for(lambda: (out / "tensorboard").is_dir() and any(p.stat().st_size > 200 for p in (out / "tensorboard").iterdir()), proc)
    proc.send_signal(sig)
    out_text, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-2000:]
    # the run's last console line (logged, so on stdout with the others, and in train.log)
    assert "[npt] interrupted by signal" in out_text and "Resume with --resume_from_checkpoint latest" in out_text
    (step, ckpt), = list_checkpoints(out)
    verify(ckpt)
    assert step > 0
    assert main(tiny_args(trained_teacher_dir, out, "--max_steps", str(step + 2), "--resume_from_checkpoint", "latest")) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == step + 2


def test_kill_9_then_resume_gives_bit_identical_adapters(tmp_path, trained_teacher_dir):
    args = ("--max_steps", "60", "--save_steps", "10", "--use_adaptive_weights", "--use_gradient_penalty", "--batch_size", "8")
    full = tmp_path / "full"
    assert main(tiny_args(trained_teacher_dir, full, *args)) == 0
    killed = tmp_path / "killed"
    proc = _launch(tiny_args(trained_teacher_dir, killed, *args))
    _wait_for(lambda: (killed / "checkpoints" / "step-00000020").is_dir(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "adapter").exists()  # it really died mid-run
    last = list_checkpoints(killed)[-1][0]
    assert 20 <= last < 60
    assert main(tiny_args(trained_teacher_dir, killed, *args, "--resume_from_checkpoint", "latest")) == 0
    a, b = load_adapter_weights(full / "adapter"), load_adapter_weights(killed / "adapter")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_crash_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path, trained_teacher_dir, monkeypatch, capsys):
    import npt.checkpoint as ck

    out = tmp_path / "run"
    original = ck._torch_save
    calls = {"n": 0}

    def crashing_save(obj, path):
        calls["n"] += 1
        if path.name == TRAINING_STATE and "step-00000004" in str(path.parent):
            path.write_bytes(b"partial")
            raise OSError("disk full (simulated)")
        return original(obj, path)

    monkeypatch.setattr(ck, "_torch_save", crashing_save)
    with pytest.raises(OSError, match="simulated"):
        main(tiny_args(trained_teacher_dir, out, "--save_steps", "2"))
    assert [s for s, _ in list_checkpoints(out)] == [2]
    assert find_latest(out).name == "step-00000002"
    monkeypatch.setattr(ck, "_torch_save", original)
    assert main(tiny_args(trained_teacher_dir, out, "--save_steps", "2", "--resume_from_checkpoint", "latest")) == 0
    assert [s for s, _ in list_checkpoints(out)] == [2, 4, 6]
