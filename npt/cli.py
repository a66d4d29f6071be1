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
        from .distributed import end_process_group

        end_process_group()
    return 0


def script_main() -> None:
    """`python pretrain_npt_improved.py`: exit with main()'s code; see `exit_worker` for the
    processes of a multi-process run."""
    import os

    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .distributed import exit_worker

        exit_worker(code)
    raise SystemExit(code)
