#!/usr/bin/env python
"""Step cost of NPT equivalence pre-training, measured side by side.

    python scripts/benchmark.py                                   # embedded and mid-size shapes, CPU
    python scripts/benchmark.py --shapes llama-1b --device cuda --dtype bfloat16 --batch_size 8 --seq_len 1024
    python scripts/benchmark.py --model_name meta-llama/Llama-3.2-1B --device cuda --dtype bfloat16
    python scripts/benchmark.py --scaling --shapes mid            # tokens/s and memory vs sequence length and batch size

For each shape: the teacher forward alone (the floor), the project's training step (forward,
loss, backward, optimizer step) and a faithful re-creation of the original design, alternated
on the same model and batch; tokens/s, the step / teacher-forward ratio and peak memory, as a
markdown table. Shapes use random weights (a speed benchmark needs no trained model).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from npt.bench import CONTENDERS, SHAPES, BenchSpec, measure_memory, report, step_flops, time_contenders  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="embedded,mid", help=f"comma-separated: {', '.join(SHAPES)}")
    p.add_argument("--model_name", default=None, help="benchmark this model (hub id or folder) instead of --shapes")
    p.add_argument("--batch_size", type=int, default=None, help="default: 8 (embedded), 4 (others)")
    p.add_argument("--seq_len", type=int, default=None, help="default: 128 (embedded), 512 (others)")
    p.add_argument("--adapter_rank", type=int, default=16)
    p.add_argument("--num_ranks", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--gradient_checkpointing", action="store_true", help="the project step with --gradient_checkpointing")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--no_memory", action="store_true", help="skip the per-contender memory processes")
    p.add_argument("--contenders", default="teacher,project,original,free",
                   help="comma-separated; 'free' is the default recipe's free-running step with the logit KL (teacher and project are always run)")
    p.add_argument("--scaling", action="store_true", help="also tokens/s and memory against sequence length and batch size")
    p.add_argument("--peak_tflops", type=float, default=None, help="the device's dense peak, for the fraction of ideal FLOP rate (H100 bf16: 989)")
    args = p.parse_args(argv)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    shapes = [args.model_name] if args.model_name else args.shapes.split(",")
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads\n")
    for shape in shapes:
        small = shape == "embedded"
        spec = BenchSpec(shape=shape, batch_size=args.batch_size or (8 if small else 4), seq_len=args.seq_len or (128 if small else 512),
                         rank=args.adapter_rank, num_ranks=args.num_ranks, device=args.device, dtype=dtype,
                         gradient_checkpointing=args.gradient_checkpointing)
        which = tuple(k for k in CONTENDERS if k in {"teacher", "project", *args.contenders.split(",")})
        times = time_contenders(spec, args.rounds, args.steps, which=which)
        memory = None if args.no_memory else {k: measure_memory(spec, k) for k in which}
        print(report(spec, times, memory))
        if args.peak_tflops:
            flops = step_flops(spec)
            achieved = flops["project"] / times["project"] / 1e12
            print(f"Project step: {achieved:.1f} TFLOP/s of matmul work, {achieved / args.peak_tflops:.1%} of the {args.peak_tflops:g} TFLOP/s peak.")
        print()
        if args.scaling:
            print(scaling(spec, args))
    return 0


def scaling(spec: BenchSpec, args) -> str:
    rows = ["| batch x seq | tokens/s (project step) | step / teacher forward | peak memory (MB) |", "|---|---|---|---|"]
    grid = [(1, s) for s in (256, 512, 1024, 2048)] + [(b, 256) for b in (2, 4, 8)]
    for b, s in grid:
        sp = dataclasses.replace(spec, batch_size=b, seq_len=s)
        t = time_contenders(sp, args.rounds, max(1, args.steps - 1), warmup=1, which=("teacher", "project"))
        mem = "-" if args.no_memory else f"{measure_memory(sp, 'project'):.0f}"
        rows.append(f"| {b} x {s} | {b * s / t['project']:.0f} | {t['project'] / t['teacher']:.2f} | {mem} |")
    return f"Scaling of the project step ({spec.shape}):\n\n" + "\n".join(rows) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
