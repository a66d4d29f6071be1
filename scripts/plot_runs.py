#!/usr/bin/env python
"""Held-out curves of finished runs, side by side: KL, top-1 agreement and perplexity ratio
against steps, from each run's summary.json.

    python scripts/plot_runs.py runs/a runs/b --labels "all free-running" "default" --output curves.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("runs", nargs="+", help="run output folders (each with summary.json)")
    parser.add_argument("--labels", nargs="*", default=None, help="one label per run (default: the folder names)")
    parser.add_argument("--title", default="")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    labels = args.labels or [Path(r).name for r in args.runs]
    if len(labels) != len(args.runs):
        parser.error("give one label per run")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for i, (run, label) in enumerate(zip(args.runs, labels)):
        history = json.loads((Path(run) / "summary.json").read_text())["eval_history"]
        steps = [h["step"] for h in history]
        style = dict(marker="o", ms=3, label=label, color=f"C{i}")  # one colour per run in every panel
        axes[0].plot(steps, [h["kl"] for h in history], **style)
        if all("top1_agreement" in h for h in history):  # runs of older versions lack it
            axes[1].plot(steps, [h["top1_agreement"] for h in history], **style)
        axes[2].plot(steps, [h["ppl_ratio"] for h in history], **style)
    axes[0].set(ylabel="held-out KL(teacher || student), nats/token", yscale="log")
    axes[1].set(ylabel="held-out top-1 agreement")
    axes[2].set(ylabel="student / teacher perplexity", yscale="log")
    for ax in axes:
        ax.set(xlabel="optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    print(f"Written: {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
