"""Step-indexed schedules: curriculum factor, distillation temperature, learning rate, and the
stages of a progressive conversion.

All are pure functions of the optimizer step, so a resumed run recomputes them exactly from the
step it saved; nothing about them needs to be checkpointed.
"""

from __future__ import annotations

import math


def curriculum_factor(step: int, curriculum_steps: int, start: float = 0.5) -> float:
    """c = c0 + (1 - c0) * 0.5 * (1 + cos(pi * (1 - p))),  p = min(step / W, 1).

    The guide writes the bare cosine (which starts at 0) but says the curriculum "starts at 50%"
    and increases "from 0.5 to 1.0"; the text wins, so c0 = 0.5 by default. c = c0 at step 0,
    1 at and after step W, monotone in between.
    """
    if curriculum_steps <= 0:
        return 1.0
    p = min(step / curriculum_steps, 1.0)
    return start + (1.0 - start) * 0.5 * (1.0 + math.cos(math.pi * (1.0 - p)))


def distill_temperature(factor: float, initial: float, start: float = 0.5) -> float:
    """T = 1 + (T0 - 1) * (1 - c) / (1 - c0): T0 when the curriculum starts, 1.0 when it ends.

    (The original code ran it the wrong way, from 1 up to T0.)"""
    if start >= 1.0:
        return 1.0
    return 1.0 + (initial - 1.0) * (1.0 - factor) / (1.0 - start)


def lr_factor(step: int, warmup_steps: int, total_steps: int, kind: str = "cosine", min_ratio: float = 0.1,
              decay_steps: int = 0) -> float:
    """Linear warm-up to 1 over `warmup_steps`, then cosine/linear decay to `min_ratio` at
    `total_steps` (or constant); `wsd` (warm-up, stable, decay) holds 1 until the last
    `decay_steps` steps and decays linearly to `min_ratio` over them."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant" or total_steps <= warmup_steps:
        return 1.0
    if kind == "wsd":
        decay_from = wsd_decay_start(warmup_steps, total_steps, decay_steps)
        if step < decay_from:
            return 1.0
        return 1.0 - (1.0 - min_ratio) * min((step - decay_from) / max(total_steps - decay_from, 1), 1.0)
    p = min((step - warmup_steps) / (total_steps - warmup_steps), 1.0)
    if kind == "linear":
        return 1.0 - (1.0 - min_ratio) * p
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def wsd_decay_start(warmup_steps: int, total_steps: int, decay_steps: int) -> int:
    """The first step of the `wsd` schedule's decay (never inside the warm-up)."""
    return max(total_steps - decay_steps, warmup_steps)


def progressive_stage(step: int, start: int, total: int, stages: int) -> int:
    """The stage (1..stages) of free-running step `step`: the free-running steps [start, total)
    split into `stages` runs of (nearly) equal length."""
    span = max(total - start, 1)
    return min(stages, 1 + max(step - start, 0) * stages // span)


def converted_count(stage: int, stages: int, layers: int) -> int:
    """How many of the `layers` converted layers (the lowest) run as NPT layers in `stage` of
    `stages`: ceil(stage * layers / stages), so the last stage runs all of them."""
    return -(-stage * layers // stages)
