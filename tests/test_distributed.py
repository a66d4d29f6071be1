"""Several processes on CPU (gloo): DDP and FSDP under torchrun and accelerate launch match a
single process with the same global batch, agree across ranks, and resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT

from npt.cli import main
from npt.serialization import load_adapter_weights

pytestmark = pytest.mark.slow

# float32: process counts agree to its rounding, and bf16 autocast (the default where a CPU has
# native bf16) would turn another reduction order into differences of bf16's size
COMMON = ["--max_length", "32", "--eval_blocks", "4", "--num_samples", "1", "--no-progress", "--max_steps", "8",
          "--eval_steps", "0", "--device", "cpu", "--use_adaptive_weights", "--save_steps", "4", "--mixed_precision", "no"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: str, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    # A session of its own so that a hang (a collective some process never entered) kills the
    # workers too, not only the launcher.
    proc = subprocess.Popen([*cmd, str(ROOT / "pretrain_npt_improved.py"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the launch hung for {timeout} s:\n{out[-2000:]}{err[-4000:]}")
    assert proc.returncode == 0, out[-2000:] + err[-4000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def single_runs(trained_teacher_dir, tmp_path_factory):
    """Single-process references with the global batch of 4 blocks, with and without the penalty."""
    out = {}
    for name, extra in (("penalty", ["--use_gradient_penalty", "--batch_size", "4"]), ("plain", ["--batch_size", "4"]),
                        ("accumulated", ["--batch_size", "2", "--gradient_accumulation_steps", "2"])):
        path = tmp_path_factory.mktemp("single") / name
        assert main(["--model_name", str(trained_teacher_dir), *COMMON, *extra, "--output_dir", str(path)]) == 0
        out[name] = path
    return out


def _compare(run: Path, reference: Path, atol: float) -> None:
    summary = json.loads((run / "summary.json").read_text())
    digests = summary["adapter_sha256_per_process"]
    assert summary["processes"] == 2 and len(digests) == 2 and digests[0] == digests[1]  # identical on both ranks
    a, b = load_adapter_weights(reference / "adapter"), load_adapter_weights(run / "adapter")
    for k in a:
        # all-reduced gradients sum in another order than one process's batch, and Adam divides
        # each gradient element by its own scale: a last-bit difference on a near-zero gradient
        # moves that one element by up to ~lr (seen: 1 of 131072 off by 1.1e-4 after 8 steps). A
        # wrong reduction moves all of them.
        diff = (b[k] - a[k]).abs()
        assert diff.max() < 10 * atol, (k, diff.max())
        assert (diff > atol + 1e-3 * a[k].abs()).float().mean() < 0.01, k
        assert diff.norm() <= 1e-3 * a[k].norm() + atol, (k, diff.norm(), a[k].norm())
    ref_eval = json.loads((reference / "summary.json").read_text())["eval"]
    assert summary["eval"]["tokens"] == ref_eval["tokens"]  # the held-out blocks are split, not repeated
    assert summary["eval"]["kl"] == pytest.approx(ref_eval["kl"], rel=1e-3)


# The two-process runs under torchrun, each launched once per module: compared with one process
# below, and the full runs the resume test continues from a copy of their step-4 checkpoint.
TWO_PROCESS_ARGS = {"ddp": ["--use_gradient_penalty", "--batch_size", "2"], "fsdp": ["--batch_size", "2", "--fsdp"]}


@pytest.fixture(scope="module")
def ddp_run(trained_teacher_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ddp") / "run"
    launch("torchrun", ["--model_name", str(trained_teacher_dir), *COMMON, *TWO_PROCESS_ARGS["ddp"], "--output_dir", str(run)])
    return run


@pytest.fixture(scope="module")
def fsdp_run(trained_teacher_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("fsdp") / "run"
    launch("torchrun", ["--model_name", str(trained_teacher_dir), *COMMON, *TWO_PROCESS_ARGS["fsdp"], "--output_dir", str(run)])
    return run


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_ddp_on_two_processes_matches_one_process(tmp_path, trained_teacher_dir, single_runs, launcher, request):
    if launcher == "torchrun":
        run = request.getfixturevalue("ddp_run")
    else:
        run = tmp_path / "ddp"
        launch(launcher, ["--model_name", str(trained_teacher_dir), *COMMON, *TWO_PROCESS_ARGS["ddp"], "--output_dir", str(run)])
    _compare(run, single_runs["penalty"], atol=1e-4)


def test_ddp_accumulation_syncs_once_per_window_and_matches_one_process(tmp_path, trained_teacher_dir, single_runs):
    # 2 processes x 1 block x 2 micro-batches: the same global micro-batches as 1 process x 2 blocks x 2
    run = tmp_path / "ddp-accumulated"
    launch("torchrun", ["--model_name", str(trained_teacher_dir), *COMMON, "--batch_size", "1", "--gradient_accumulation_steps", "2",
                        "--output_dir", str(run)])
    _compare(run, single_runs["accumulated"], atol=1e-4)


def test_fsdp_on_two_processes_matches_one_process(fsdp_run, single_runs):
    run = fsdp_run
    # FSDP reduce-scatters gradients in another order than one process sums them; Adam turns the
    # last-bit differences on near-zero gradients into ~1e-3 on the weights after 8 steps.
    _compare(run, single_runs["plain"], atol=2e-3)


@pytest.fixture(scope="module")
def triple_single(trained_teacher_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "triple"
    assert main(["--model_name", str(trained_teacher_dir), *COMMON, "--batch_size", "4", "--modulate", "gate,up,down", "--output_dir", str(path)]) == 0
    return path


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_triple_modulation_on_two_processes_matches_one_process(tmp_path, trained_teacher_dir, triple_single, mode):
    """gate, up and down modulated: the down modulation runs through the adapter's module call, so
    a sharded adapter gathers its weights for it too."""
    run = tmp_path / mode
    launch("torchrun", ["--model_name", str(trained_teacher_dir), *COMMON, "--batch_size", "2", "--modulate", "gate,up,down",
                        "--output_dir", str(run), *(["--fsdp"] if mode == "fsdp" else [])])
    assert any(".down.B_f.weight" in k for k in load_adapter_weights(run / "adapter"))
    _compare(run, triple_single, atol=2e-3 if mode == "fsdp" else 1e-4)


def test_fsdp_evaluates_held_out_blocks_that_do_not_split_evenly(tmp_path, trained_teacher_dir):
    """3 held-out blocks, eval batch 1, 2 processes: rank 0 has two batches, rank 1 one. Every
    sharded forward is a collective, so rank 1 must run a spare batch (whose sums are dropped) or
    both hang; the evaluation still counts the 3 real blocks once each."""
    run = tmp_path / "fsdp-uneven"
    args = ["--model_name", str(trained_teacher_dir), *COMMON, "--batch_size", "2", "--output_dir", str(run), "--fsdp",
            "--eval_blocks", "3", "--eval_batch_size", "1", "--max_steps", "2", "--eval_steps", "1"]
    launch("torchrun", args, timeout=300)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval"]["tokens"] == 3 * (32 - 1)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_resume_on_two_processes_continues_exactly(tmp_path, trained_teacher_dir, mode, request):
    args = ["--model_name", str(trained_teacher_dir), *COMMON, *TWO_PROCESS_ARGS[mode]]
    full = request.getfixturevalue(f"{mode}_run")
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-00000004", part / "checkpoints" / "step-00000004")
    proc = launch("torchrun", [*args, "--output_dir", str(part), "--resume_from_checkpoint", "latest"])
    assert "resumed from" in proc.stdout and "at step 4" in proc.stdout
    a, b = load_adapter_weights(full / "adapter"), load_adapter_weights(part / "adapter")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)


def _worker_pids(agent_pid: int) -> dict[int, int]:
    """{rank: pid} of the processes torchrun started."""
    out = {}
    for child in subprocess.run(["pgrep", "-P", str(agent_pid)], capture_output=True, text=True).stdout.split():
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        for entry in env:
            if entry.startswith(b"RANK="):
                out[int(entry[5:])] = int(child)
    return out


def test_a_signal_to_one_process_stops_all_at_the_same_step_with_a_checkpoint(tmp_path, trained_teacher_dir):
    """SIGTERM to rank 1 alone (a preempted node): the flag travels with the step's all-reduce, every
    process saves the same checkpoint and stops; the run resumes from it on 2 processes."""
    import time

    from npt.checkpoint import list_checkpoints, verify

    out = tmp_path / "run"
    args = ["--model_name", str(trained_teacher_dir), *COMMON, "--batch_size", "2", "--output_dir", str(out)]
    args += ["--max_steps", "100000", "--save_steps", "100000", "--logging_steps", "5"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "pretrain_npt_improved.py"), *args]
    agent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 300
        while not ((out / "tensorboard").is_dir() and any(p.stat().st_size > 200 for p in (out / "tensorboard").iterdir())):
            assert agent.poll() is None and time.monotonic() < deadline, "the run ended or stalled before training"
            time.sleep(0.05)
        workers = _worker_pids(agent.pid)
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[1], signal.SIGTERM)
        stdout, stderr = agent.communicate(timeout=120)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert "signal 15 received" in stdout + stderr
    (step, ckpt), = list_checkpoints(out)
    verify(ckpt)
    assert 0 < step < 100000
    assert not (out / "adapter").exists()  # stopped, not finished
    proc = launch("torchrun", [*args[:-6], "--max_steps", str(step + 2), "--save_steps", "100000", "--resume_from_checkpoint", "latest"])
    assert f"at step {step}" in proc.stdout
    assert json.loads((out / "summary.json").read_text())["steps"] == step + 2


def test_fsdp_refuses_the_gradient_penalty_and_a_single_process(tmp_path, trained_teacher_dir, capsys):
    base = ["--model_name", str(trained_teacher_dir), *COMMON, "--output_dir", str(tmp_path / "x"), "--fsdp"]
    assert main([*base, "--use_gradient_penalty"]) == 2
    assert "does not work with --fsdp" in capsys.readouterr().err
    assert main(base) == 2
    assert "--fsdp needs several processes" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
