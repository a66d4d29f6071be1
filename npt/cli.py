"""Command-line entry points: parse, run, and turn user-fixable errors into one-line messages.

    npt-pretrain (= python pretrain_npt_improved.py)   equivalence pre-training
    npt-eval ADAPTER                                    the held-out evaluation, on any text
    npt-generate ADAPTER --prompt ...                   teacher and student continuations side by side
    npt-inject ADAPTER --context ... --output_dir OUT  a context's weight change, in a plain model

Exit codes: 0 done, 2 a bad input (one line: the cause and the fix), 3 training diverged beyond
recovery, 128 + N stopped by signal N (a resumable checkpoint was written).
"""

from __future__ import annotations

import logging
import sys

from . import logs
from .commands import (
    EvalArguments,
    GenerateArguments,
    InjectArguments,
    LoadArguments,
    run_data_defaults,
    run_eval,
    run_generate,
    run_inject,
)
from .config import Parser, parse_args
from .data import DataArguments
from .distributed import end_process_group, exit_without_finalization
from .errors import NPTError
from .run import Interrupted
from .train import TooManyBadSteps, train

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    """`npt-pretrain` (also `python pretrain_npt_improved.py`): equivalence pre-training."""
    return _pretrain(argv)[0]


def _pretrain(argv: list[str] | None) -> tuple[int, bool]:
    """(exit code, whether the run was sharded with FSDP)."""
    sharded = False
    logs.configure()
    try:
        cfg = parse_args(argv)
        sharded = cfg.run.fsdp
        train(cfg)
    except Interrupted as e:
        where = f"; resumable checkpoint: {e.checkpoint}" if e.checkpoint else ""
        logger.warning(f"interrupted by signal {e.signum}{where}. Resume with --resume_from_checkpoint latest.")
        return 128 + e.signum, sharded
    except TooManyBadSteps as e:
        logger.error(str(e))
        return 3, sharded
    except NPTError as e:
        logger.error(str(e))
        return 2, sharded
    finally:
        end_process_group()
    return 0, sharded


def script_main() -> None:
    """Exit with the run's code. A process of an FSDP run ends without the interpreter's
    finalisation (see `exit_without_finalization`)."""
    code, sharded = _pretrain(None)
    if sharded:
        exit_without_finalization(code)
    raise SystemExit(code)


# ---- the commands that use a trained adapter ------------------------------------------------------


def _adapter_command(prog: str, description: str, groups: list[type], argv: list[str] | None, with_run_data: bool):
    """Parse `ADAPTER [flags]` into {group: args}, the data flags defaulting to the run's own data."""
    parser = Parser(groups, prog=prog, description=description)
    parser.add_argument("adapter", help="A run's adapter/ folder, a checkpoint folder, or a hub repository id of NPT adapters.")
    argv = list(sys.argv[1:] if argv is None else argv)
    known, _ = parser.parse_known_args(argv)
    defaults = run_data_defaults(known.adapter) if with_run_data else {}
    parser.set_defaults(**defaults)
    return parser.parse_into(argv), known.adapter, defaults


def _report_errors(command) -> int:
    logs.configure()
    try:
        command()
    except NPTError as e:
        logger.error(str(e))
        return 2
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    """`npt-eval ADAPTER [--data_files ... | --dataset_name ...]`: the end-of-training evaluation
    (per-layer error and update cosine, free-running KL, both perplexities) as a table and JSON."""

    def command():
        args, adapter, run_data = _adapter_command("npt-eval", eval_main.__doc__, [EvalArguments, DataArguments, LoadArguments], argv, True)
        data = args[DataArguments]
        own = all(getattr(data, k) == run_data.get(k, getattr(DataArguments, k, None)) for k in ("dataset_name", "dataset_config", "data_files", "dataset_split"))
        run_eval(adapter, args[EvalArguments], data, own, args[LoadArguments])

    return _report_errors(command)


def generate_main(argv: list[str] | None = None) -> int:
    """`npt-generate ADAPTER --prompt "..."`: teacher and student continuations side by side."""

    def command():
        args, adapter, _ = _adapter_command("npt-generate", generate_main.__doc__, [GenerateArguments, LoadArguments], argv, False)
        run_generate(adapter, args[GenerateArguments], args[LoadArguments])

    return _report_errors(command)


def inject_main(argv: list[str] | None = None) -> int:
    """`npt-inject ADAPTER --context "..." --output_dir OUT`: the weight change a context makes,
    added to W_g of a plain model folder; its effect and damage measured before and after."""

    def command():
        args, adapter, _ = _adapter_command("npt-inject", inject_main.__doc__, [InjectArguments, DataArguments, LoadArguments], argv, True)
        run_inject(adapter, args[InjectArguments], args[DataArguments], args[LoadArguments])

    return _report_errors(command)


def eval_script() -> None:
    raise SystemExit(eval_main())


def generate_script() -> None:
    raise SystemExit(generate_main())


def inject_script() -> None:
    raise SystemExit(inject_main())
