"""Command-line entry point: parse, train, and turn user-fixable errors into one-line messages."""

from __future__ import annotations

import sys

from .errors import NPTError


def main(argv: list[str] | None = None) -> int:
    from .config import parse_args

    try:
        cfg = parse_args(argv)
        from .train import Interrupted, TooManyBadSteps, train

        try:
            train(cfg)
        except Interrupted as e:
            where = f"; resumable checkpoint: {e.checkpoint}" if e.checkpoint else ""
            print(f"[npt] interrupted by signal {e.signum}{where}. Resume with --resume_from_checkpoint latest.", file=sys.stderr)
            return 128 + e.signum
        except TooManyBadSteps as e:
            print(f"error: {e}", file=sys.stderr)
            return 3
    except NPTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        _end_process_group()
    return 0


def _end_process_group() -> None:
    """Left to interpreter shutdown, a gloo process group's threads were sometimes destroyed while
    still running ("terminate called without an active exception", SIGABRT after a finished run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
