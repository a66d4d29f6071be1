#!/usr/bin/env python
"""Ablation of the loss types and the guide's mechanisms on one model, data, seed and budget.

    python scripts/compare_losses.py --output_dir runs/ablation                  # the quick set, embedded default
    python scripts/compare_losses.py --variants all --output_dir runs/ablation-all -- --max_steps 1000
    python scripts/compare_losses.py --variants "mse (baseline loss);k=8" -- --model_name meta-llama/Llama-3.2-1B ...

Everything after `--` is passed to every run (any pretrain_npt_improved.py flag). Writes
results.md (table), results.json and heldout_error.png into --output_dir, one run folder per variant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from npt.ablation import QUICK, VARIANTS, run_ablation, table  # noqa: E402
from npt.errors import NPTError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    common = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/ablation")
    parser.add_argument("--variants", default="quick", help=f"quick ({'; '.join(QUICK)}), all, or a semicolon-separated list of: {'; '.join(VARIANTS)}")
    parser.add_argument("--list", action="store_true", help="list the variants and their flags")
    args = parser.parse_args(own)
    if args.list:
        for name, flags in VARIANTS.items():
            print(f"{name:45s} {' '.join(flags)}")
        return 0
    names = QUICK if args.variants == "quick" else list(VARIANTS) if args.variants == "all" else [n.strip() for n in args.variants.split(";")]
    try:
        rows = run_ablation(names, ["--no-progress", "--num_samples", "0", *common], Path(args.output_dir), ROOT)
    except NPTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n" + table(rows))
    print(f"\nWritten: {args.output_dir}/results.md, results.json, heldout_error.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
