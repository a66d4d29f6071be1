"""Several training runs at a time on one machine, for the benchmark scripts (`--jobs N`).

Each run gets its own process (spawned, so no run inherits another's threads or state) on
cores / N threads: a run's own threads scale poorly on few cores (the Gemma-3-style teacher: 663 s
on one thread, 420 s on two), so two one-thread runs finish sooner than the same two one after the
other on two threads. Results come back in the order the runs were given.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor

import torch


def run_all(fn: Callable, calls: list[tuple], jobs: int = 1) -> Iterator:
    """fn(*args) for each args of `calls`, `jobs` at a time; yields each result in the order of
    `calls` as soon as it and those before it are done. `fn` must be importable by a spawned
    process (defined at a module's top level)."""
    if jobs < 1:
        raise ValueError(f"jobs {jobs} must be at least 1")
    if jobs == 1:
        for args in calls:
            yield fn(*args)
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        futures = [pool.submit(fn, *args) for args in calls]
        for future in futures:
            yield future.result()
