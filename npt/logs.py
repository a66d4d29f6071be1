"""Logging: one logger per module (`logging.getLogger(__name__)`), configured here, once per run.

    console   INFO and WARNING as "[npt] message" on stdout, written through tqdm so that a
              progress bar stays intact; ERROR as "error: message" on stderr
    file      <output_dir>/train.log, every record with its time, level and module (main process)

The level is set per process: `--log_level` (default info) on the main process, and at least
WARNING on every other one, so that N processes do not print N copies of each line. The process
rank comes from the launcher's environment (torchrun and accelerate set RANK), so the level is
right before the process group exists: building a teacher, for instance, logs before it.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from tqdm.auto import tqdm

ROOT = "npt"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
FILE_NAME = "train.log"


class _ConsoleHandler(logging.Handler):
    """Below ERROR: stdout through `tqdm.write` (resolved at each record, so a test capturing
    stdout sees the lines); ERROR and above: stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            if record.levelno >= logging.ERROR:
                sys.stderr.write(f"error: {message}\n")
                sys.stderr.flush()
            else:
                if not getattr(record, "plain", False):  # `extra={"plain": True}`: a table, as it is
                    message = "\n".join(f"[npt] {line}" if line else line for line in message.split("\n"))
                tqdm.write(message, file=sys.stdout)
                sys.stdout.flush()
        except Exception:  # a broken stream must not end a run
            self.handleError(record)


def process_rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def configure(level: str = "info", log_file: Path | None = None) -> logging.Logger:
    """Set the package logger's level for this process and its handlers (replacing those of an
    earlier run in the same interpreter). `log_file`: also write there (main process only)."""
    logger = logging.getLogger(ROOT)
    wanted = LEVELS[level]
    main = process_rank() == 0
    logger.setLevel(wanted if main else max(wanted, logging.WARNING))
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    console = _ConsoleHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    if log_file is not None and main:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(log_file, encoding="utf-8")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(file)
    return logger
