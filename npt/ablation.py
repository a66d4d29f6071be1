"""Built-in ablation: does each loss and mechanism help, on *your* model and data?

Every variant trains from the same model, data, seed and step budget; only its flags differ. The
held-out evaluation of each run (mean relative error per layer, free-running KL and perplexity)
goes into a markdown table, a JSON file and a PNG plot of held-out error against steps.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from .config import TrainConfig, build_parser, load_config_file
from .errors import NPTError

# name -> flags on top of the common ones (and the defaults: improved_npt, k=4, the last 60% of
# steps free-running with the logit KL). Plain MSE is the baseline loss; the guide's own setting
# (k=1, teacher forcing only) is the baseline recipe.
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
    "guide's setting: k=1, teacher forcing only": ["--num_ranks", "1", "--free_running_steps", "0", "--logit_kl_weight", "0"],
    "k=4, teacher forcing only": ["--free_running_steps", "0", "--logit_kl_weight", "0"],
    "k=4, free-running without logit KL": ["--logit_kl_weight", "0"],
    "k=1, free-running + logit KL": ["--num_ranks", "1"],
    "k=8": ["--num_ranks", "8"],
}
QUICK = ["mse (baseline loss)", "improved_npt (default)", "improved_npt + adaptive weights", "focal_mse", "smooth_l1_mse",
         "guide's setting: k=1, teacher forcing only"]


def variant_config(flags: list[str], common: list[str], output_dir: Path, root: Path) -> TrainConfig:
    """Defaults < the variant's --config < common flags < the variant's other flags."""
    parser = build_parser()
    flags = list(flags)
    if "--config" in flags:
        i = flags.index("--config")
        path = Path(flags[i + 1])
        parser.set_defaults(**load_config_file(str(path if path.is_absolute() else root / path)))
        del flags[i : i + 2]
    args = vars(parser.parse_args([*common, *flags, "--output_dir", str(output_dir)]))
    args.pop("config")
    return TrainConfig(**args).validate()


def run_ablation(names: list[str], common: list[str], output_dir: Path, root: Path | None = None) -> list[dict]:
    from .train import train

    root = root or Path(__file__).resolve().parents[1]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise NPTError(f"Unknown ablation variant(s) {unknown}.", f"Choose among: {', '.join(VARIANTS)}.")
    output_dir.mkdir(parents=True, exist_ok=True)
    configs = {n: variant_config(VARIANTS[n], common, output_dir / _slug(n), root) for n in names}  # all validated first
    rows = []
    for name, cfg in configs.items():
        print(f"[ablation] {name}: {' '.join(VARIANTS[name])}", flush=True)
        start = time.perf_counter()
        summary = train(cfg)
        rows.append({"variant": name, "flags": " ".join(VARIANTS[name]), "seconds": time.perf_counter() - start, "summary": summary,
                     "config": dataclasses.asdict(cfg)})
        write_report(rows, output_dir)
    return rows


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def table(rows: list[dict]) -> str:
    first = rows[0]["summary"]
    lines = [
        "| variant | flags | mean rel error | per-layer rel error | KL (nats/token) | student ppl | ppl ratio | time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    before = first.get("eval_before")
    if before:
        lines.append(f"| before training (attention dropped) | | {before['rel_error_mean']:.4f} | {' / '.join(f'{r:.3f}' for r in before['rel_error'])} "
                     f"| {before['kl']:.4f} | {before['student_ppl']:.2f} | {before['ppl_ratio']:.3f} | |")
    for row in rows:
        e = row["summary"]["eval"]
        lines.append(f"| {row['variant']} | `{row['flags']}` | {e['rel_error_mean']:.4f} | {' / '.join(f'{r:.3f}' for r in e['rel_error'])} "
                     f"| {e['kl']:.4f} | {e['student_ppl']:.2f} | {e['ppl_ratio']:.3f} | {row['seconds']:.0f} |")
    e = first["eval"]
    lines.append("")
    lines.append(f"Teacher perplexity {e['teacher_ppl']:.2f} on {e['tokens']} held-out tokens; {first['steps']} steps per variant.")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

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


def write_report(rows: list[dict], output_dir: Path) -> None:
    (output_dir / "results.md").write_text(table(rows) + "\n")
    (output_dir / "results.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    plot(rows, output_dir / "heldout_error.png")
