"""The run around the training: its arguments, its output folder, and how it stops on a signal.

    <output_dir>/config.json       the resolved configuration (usable as --config)
                 tensorboard/       curves (and the other --report_to trackers' files)
                 checkpoints/       resumable states (see checkpoint.py)
                 adapter/           the final adapters: the best held-out ones seen
                 summary.json       the final evaluation, the best step, rollbacks, warnings
                 train.log          what the console showed, with times (see logs.py)
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import signal
import time
from pathlib import Path
from typing import Literal

import torch
from transformers.hf_argparser import HfArg

from .checkpoint import find_latest, verify
from .distributed import broadcast_object
from .errors import NPTError

logger = logging.getLogger(__name__)
RUN_FILES = ("config.json", "checkpoints", "adapter", "tensorboard", "summary.json", "train.log")


@dataclasses.dataclass
class RunArguments:
    output_dir: str | None = HfArg(default=None, help="Where logs, checkpoints and the final adapters go. Default: runs/npt-<date>-<time>.")
    overwrite_output_dir: bool = HfArg(default=False, help="Allow writing into an output dir that holds another run.")
    resume_from_checkpoint: str | None = HfArg(default=None, help="A checkpoint folder, or 'latest' for the newest in output_dir.")
    logging_steps: int = HfArg(default=10, help="Log every N optimizer steps.")
    save_steps: int = HfArg(default=500, help="Checkpoint every N optimizer steps (and at the end).")
    save_total_limit: int = HfArg(default=3, help="Keep the newest N checkpoints.")
    eval_steps: int = HfArg(default=500, help="Evaluate on the held-out blocks every N optimizer steps, where teacher forcing ends, and at the end; 0: only those two.")
    eval_batch_size: int = HfArg(default=8, aliases=["--per_device_eval_batch_size"], help="Blocks per evaluation batch.")
    num_samples: int = HfArg(default=2, help="Greedy continuations (teacher and student) shown in TensorBoard at each evaluation.")
    greedy_prompts: int = HfArg(default=16, help="Held-out prompts (32 tokens) whose greedy continuations are compared at each evaluation (eval/greedy_match); 0: none.")
    greedy_tokens: int = HfArg(default=32, help="Tokens generated per prompt for eval/greedy_match.")
    max_bad_steps: int = HfArg(default=10, help="Stop after this many consecutive non-finite steps (rollbacks are tried first).")
    max_rollbacks: int = HfArg(default=3, help="Roll back to the last good state at most this many times when training diverges (0: never).")
    rollback_lr_factor: float = HfArg(default=0.3, help="Each rollback multiplies the learning rate by this factor.")
    divergence_patience: int = HfArg(default=2, help="Evaluations in a row worse than the last good one (by its phase's measure) before a rollback; one far worse or non-finite rolls back at once.")
    seed: int = HfArg(default=0, help="Random seed (adapter init, data order, gradient-penalty draws).")
    device: Literal["auto", "cpu", "cuda"] = HfArg(default="auto", help="auto (CUDA when present), cpu or cuda.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = HfArg(
        default="auto", help="Autocast: auto (accelerate's own setting if launched with one, else bf16 where the device multiplies it natively: CUDA with bf16, CPUs with AVX512-BF16 or AMX; else fp16 on CUDA, none on CPU), no, bf16, fp16.")
    fsdp: bool = HfArg(default=False, help="Shard the teacher's weights across processes (FSDP2) instead of replicating them (DDP); for teachers that do not fit one device. Needs several processes.")
    gradient_checkpointing: bool = HfArg(default=False, help="Recompute each NPT layer's student computation in backward instead of storing its activations (less memory, more compute).")
    compile: bool = HfArg(default=False, aliases=["--torch_compile"], help="torch.compile each NPT layer's student computation (meant for CUDA; no gain measured on CPU).")
    log_level: Literal["debug", "info", "warning", "error"] = HfArg(default="info", help="Console and train.log level of the main process (the others log warnings and errors only).")
    progress: bool = HfArg(default=True, help="Show the progress bar (without it, or when stdout is not a terminal, one text line per logging step).")
    report_to: list[str] = HfArg(default_factory=lambda: ["tensorboard"], help="Trackers for the curves and the run config, through accelerate: tensorboard, wandb, mlflow, ... (installed ones), or none.")

    def __post_init__(self):
        for name in ("logging_steps", "save_steps", "save_total_limit", "eval_batch_size", "max_bad_steps", "divergence_patience"):
            if getattr(self, name) < 1:
                raise NPTError(f"--{name} {getattr(self, name)} must be at least 1.", f"Pass --{name} >= 1.")
        if self.greedy_tokens < 1:
            raise NPTError(f"--greedy_tokens {self.greedy_tokens} must be at least 1.", "Pass e.g. 32.")
        for name in ("eval_steps", "num_samples", "max_rollbacks", "greedy_prompts"):
            if getattr(self, name) < 0:
                raise NPTError(f"--{name} {getattr(self, name)} is negative.", f"Pass --{name} >= 0.")
        if not 0 < self.rollback_lr_factor < 1:
            raise NPTError(f"--rollback_lr_factor {self.rollback_lr_factor} is outside (0, 1).", "Pass e.g. 0.3.")
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]


def resolve_device(device: str) -> str:
    """`cpu` or `cuda` for --device auto/cpu/cuda; CUDA asked for and absent is refused."""
    if device == "cuda" and not torch.cuda.is_available():
        raise NPTError("--device cuda was asked for, but no CUDA device is available.", "Use --device cpu (or auto), or run on a machine with a GPU.")
    return "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"


# ---- the output folder ------------------------------------------------------------------------------


def resolve_output_dir(args: RunArguments) -> Path:
    """The output dir; without one, a timestamped folder chosen by the main process for all."""
    return Path(args.output_dir or broadcast_object(time.strftime("runs/npt-%Y%m%d-%H%M%S")))


def checkpoint_to_resume(args: RunArguments, out: Path) -> Path | None:
    """Refuse to mix runs; return the checkpoint to resume from, if any. Writes nothing."""
    if args.resume_from_checkpoint:
        if args.resume_from_checkpoint == "latest":
            ckpt = find_latest(out)
            if ckpt is None:
                raise NPTError(f"--resume_from_checkpoint latest: no complete checkpoint in {out / 'checkpoints'}.",
                               "Check --output_dir, or start without --resume_from_checkpoint.")
            return ckpt
        ckpt = Path(args.resume_from_checkpoint)
        if not ckpt.is_dir():
            raise NPTError(f"Checkpoint {ckpt} does not exist.", "Pass a checkpoint folder (output_dir/checkpoints/step-...) or 'latest'.")
        verify(ckpt)
        return ckpt
    if out.exists() and any((out / f).exists() for f in RUN_FILES) and not args.overwrite_output_dir:
        raise NPTError(
            f"Output dir {out} already holds a run.",
            "Pass --resume_from_checkpoint latest to continue it, --overwrite_output_dir to replace it, or another --output_dir.",
        )
    return None


def clear_previous_run(out: Path) -> None:
    """--overwrite_output_dir: remove what an earlier run wrote (and nothing else)."""
    for name in RUN_FILES:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)


# ---- signals ----------------------------------------------------------------------------------------


class Interrupted(Exception):
    def __init__(self, signum: int, checkpoint: Path | None):
        self.signum, self.checkpoint = signum, checkpoint
        super().__init__(f"stopped by signal {signum}")


class GracefulStop:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next optimizer step and exits.
    A second SIGINT interrupts at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning(f"signal {signum} received: saving a checkpoint at the end of this step, then exiting.")

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
