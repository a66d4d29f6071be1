#!/usr/bin/env python
"""Ablation of the loss types and the guide's mechanisms on one model, data, seed and budget.

    python scripts/compare_losses.py --output_dir runs/ablation                  # the quick set, embedded default
    python scripts/compare_losses.py --variants all --output_dir runs/ablation-all -- --max_steps 1000
    python scripts/compare_losses.py --variants "mse (baseline loss);k=8" -- --model_name meta-llama/Llama-3.2-1B ...
    python scripts/compare_losses.py --variants all --jobs 2 --output_dir runs/ablation   # two variants at a time

Every variant trains from the same model, data, seed and step budget; only its flags differ.
Everything after `--` is passed to every run (any npt-pretrain flag). The held-out evaluation of
each run (mean relative error per layer, free-running KL and perplexity) goes into results.md (a
table), results.json and heldout_error.png (held-out error against steps) in --output_dir, one run
folder per variant.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from _jobs import run_all

from npt.config import Config, parse_args
from npt.errors import NPTError
from npt.evaluate import greedy_cell
from npt.provenance import provenance
from npt.train import train

ROOT = Path(__file__).resolve().parents[1]

# name -> flags on top of the common ones (and the defaults: improved_npt, k=11 rank-1 terms of each of
# gate, up and down, the last 80% of steps free-running with the logit KL). Plain MSE is the baseline loss; the guide's own
# setting (k=1, teacher forcing only) is the baseline recipe.
VARIANTS: dict[str, list[str]] = {
    "mse (baseline loss)": ["--loss_type", "mse"],
    "mse, raw (no normalisation)": ["--loss_type", "mse", "--loss_normalization", "none"],
    "improved_npt (default)": ["--loss_type", "improved_npt"],
    "improved_npt, cosine on hidden states": ["--cosine_on", "hidden"],
    "improved_npt, no temperature": ["--distill_temperature", "1"],
    "improved_npt + adaptive weights": ["--use_adaptive_weights"],
    "improved_npt + gradient penalty": ["--use_gradient_penalty"],
    "standard recipe (adaptive + penalty)": ["--config", "configs/standard.yaml"],
    "focal_mse": ["--loss_type", "focal_mse"],
    "smooth_l1_mse": ["--loss_type", "smooth_l1_mse", "--mse_weight", "0.5"],
    "guide's setting: k=1, teacher forcing only": ["--modulate", "gate", "--num_ranks", "1", "--free_running_steps", "0", "--logit_kl_weight", "0"],
    "teacher forcing only": ["--free_running_steps", "0", "--logit_kl_weight", "0"],
    "free-running without logit KL": ["--logit_kl_weight", "0", "--free_running_layer_weight", "1"],
    "free-running with the per-layer terms too": ["--free_running_layer_weight", "1"],
    "free-running at a tenth of the learning rate": ["--free_running_lr_scale", "0.1"],
    "AdamW's moments cleared where free-running starts": ["--reset_moments_at_free_running"],
    "without the bottleneck bias (the default until 2026-12-07)": ["--no_bottleneck_bias"],
    "the adapter reads a / rms(h)": ["--adapter_input", "relative"],
    "teacher forcing for 40% of the steps (the default until 2026-12-01)": ["--free_running_steps", "0.6"],
    "free-running throughout": ["--free_running_steps", "1.0"],
    "cosine learning-rate schedule (the default until 2026-12-01)": ["--lr_scheduler", "cosine"],
    "reverse KL, half of the logit KL": ["--reverse_kl_share", "0.5"],
    # Capacity variants name their whole shape (r and k), so that a change of default cannot make
    # one of them the default under another name.
    "r 16, k 11 (the default until 2026-12-07)": ["--adapter_rank", "16", "--num_ranks", "11"],
    "r 32, k 11": ["--adapter_rank", "32", "--num_ranks", "11"],
    "r 64, k 3 (about the default's cost)": ["--adapter_rank", "64", "--num_ranks", "3"],
    "r 128, k 1": ["--adapter_rank", "128", "--num_ranks", "1"],
    "the gate alone at the default's adapter size (r 32, k 18)": ["--modulate", "gate", "--num_ranks", "18"],
    "the gate alone, r 16, k 32, lr 2e-2 (the default until c8b61be)": [
        "--modulate", "gate", "--adapter_rank", "16", "--num_ranks", "32", "--learning_rate", "2e-2"],
    "dual modulation at the default's adapter size (r 32, k 9)": ["--modulate", "gate,up", "--num_ranks", "9"],
    "r 32, k 4": ["--adapter_rank", "32", "--num_ranks", "4"],
    "r 32, k 8": ["--adapter_rank", "32", "--num_ranks", "8"],
}
QUICK = ["mse (baseline loss)", "improved_npt (default)", "improved_npt + adaptive weights", "focal_mse", "smooth_l1_mse",
         "guide's setting: k=1, teacher forcing only"]


def variant_config(flags: list[str], common: list[str], output_dir: Path) -> Config:
    """Defaults < the variant's --config < common flags < the variant's other flags: the same
    parser as the main job, the variant's flags after the common ones."""
    flags = list(flags)
    config = []
    if "--config" in flags:
        i = flags.index("--config")
        path = Path(flags[i + 1])
        config = ["--config", str(path if path.is_absolute() else ROOT / path)]
        del flags[i : i + 2]
    return parse_args([*config, *common, *flags, "--output_dir", str(output_dir)])


def run_ablation(names: list[str], common: list[str], output_dir: Path, jobs: int = 1) -> list[dict]:
    started = provenance()  # the source as this process loaded it, before any run
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise NPTError(f"Unknown ablation variant(s) {unknown}.", f"Choose among: {', '.join(VARIANTS)}.")
    output_dir.mkdir(parents=True, exist_ok=True)
    configs = {n: variant_config(VARIANTS[n], common, output_dir / _slug(n)) for n in names}  # all validated first
    rows = []
    for row in run_all(_train_one, [(name, cfg) for name, cfg in configs.items()], jobs):
        rows.append(row)
        write_report(rows, output_dir, started)
    return rows


def _train_one(name: str, cfg: Config) -> dict:
    print(f"[ablation] {name}: {' '.join(VARIANTS[name])}", flush=True)
    start = time.perf_counter()
    summary = train(cfg)
    return {"variant": name, "flags": " ".join(VARIANTS[name]), "seconds": time.perf_counter() - start, "summary": summary,
            "config": cfg.to_flat(), "threads": torch.get_num_threads()}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def table(rows: list[dict]) -> str:
    first = rows[0]["summary"]
    lines = [
        "| variant | flags | mean rel error | per-layer rel error | KL (nats/token) | top-1 agreement | greedy match | student ppl | ppl ratio | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    before = first.get("eval_before")
    if before:
        lines.append(f"| before training (attention dropped) | | {before['rel_error_mean']:.4f} | {' / '.join(f'{r:.3f}' for r in before['rel_error'])} "
                     f"| {before['kl']:.4f} | {before['top1_agreement']:.1%} | {greedy_cell(before)} | {before['student_ppl']:.2f} | {before['ppl_ratio']:.3f} | |")
    for row in rows:
        e = row["summary"]["eval"]
        lines.append(f"| {row['variant']} | `{row['flags']}` | {e['rel_error_mean']:.4f} | {' / '.join(f'{r:.3f}' for r in e['rel_error'])} "
                     f"| {e['kl']:.4f} | {e['top1_agreement']:.1%} | {greedy_cell(e)} | {e['student_ppl']:.2f} | {e['ppl_ratio']:.3f} | {row['seconds']:.0f} |")
    e = first["eval"]
    lines.append("")
    threads = rows[0].get("threads")
    lines.append(f"Teacher perplexity {e['teacher_ppl']:.2f} on {e['tokens']} held-out tokens; {first['steps']} steps per variant"
                 + (f"; {threads} thread(s) per run." if threads else "."))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib  # optional: only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
    colors = plt.cm.tab20.colors
    for n, row in enumerate(rows):
        hist = row["summary"]["eval_history"]
        steps = [h["step"] for h in hist]
        # 20 colours, and dashes after the first 10 so that neighbouring colours stay apart
        style = {"color": colors[n % len(colors)], "linestyle": "-" if n < 10 else "--", "marker": "osD^v<>"[n % 7], "ms": 3, "label": row["variant"]}
        ax1.plot(steps, [h["rel_error_mean"] for h in hist], **style)
        ax2.plot(steps, [h["ppl_ratio"] for h in hist], **style)
    ax1.set(xlabel="optimizer step", ylabel="held-out mean relative error ||S-T|| / ||T-h||", title="Teacher-forced layer error")
    ax2.set(xlabel="optimizer step", ylabel="student / teacher perplexity (free-running)", title="Free-running perplexity ratio", yscale="log")
    ax1.grid(alpha=0.3)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(rows: list[dict], output_dir: Path, started: dict) -> None:
    (output_dir / "results.md").write_text(table(rows) + "\n")
    (output_dir / "results.json").write_text(json.dumps({"kind": "ablation", "provenance": started, "rows": rows}, indent=2, default=str) + "\n")
    plot(rows, output_dir / "heldout_error.png")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    common = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/ablation")
    parser.add_argument("--variants", default="quick", help=f"quick ({'; '.join(QUICK)}), all, or a semicolon-separated list of: {'; '.join(VARIANTS)}".replace("%", "%%"))  # argparse %-formats help
    parser.add_argument("--list", action="store_true", help="list the variants and their flags")
    parser.add_argument("--jobs", type=int, default=1, help="variants trained at the same time, each in its own process on cores/jobs threads")
    args = parser.parse_args(own)
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs} must be at least 1")
    if args.list:
        for name, flags in VARIANTS.items():
            print(f"{name:45s} {' '.join(flags)}")
        return 0
    names = QUICK if args.variants == "quick" else list(VARIANTS) if args.variants == "all" else [n.strip() for n in args.variants.split(";")]
    try:
        rows = run_ablation(names, ["--no-progress", "--num_samples", "0", *common], Path(args.output_dir), args.jobs)
    except NPTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n" + table(rows))
    print(f"\nWritten: {args.output_dir}/results.md, results.json, heldout_error.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
