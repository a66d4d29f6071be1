#!/usr/bin/env python
"""One recipe on every teacher of the zoo, with one budget: does it hold beyond the embedded default?

    python scripts/zoo_bench.py --output_dir runs/zoo                       # the default recipe
    python scripts/zoo_bench.py --output_dir runs/zoo-k8 -- --num_ranks 8    # any npt-pretrain flags after --
    python scripts/zoo_bench.py --models "zoo:mistral-deep,zoo:qwen2-gqa" --output_dir runs/zoo-two
    python scripts/zoo_bench.py --jobs 2 --output_dir runs/zoo                # two teachers at a time

Each teacher (the embedded default and the zoo:<name> teachers, built offline on first use and
cached) is trained on its own corpus with the same flags and step budget. Written to --output_dir:
results.md (per model: the teacher's shape and held-out perplexity, the student's perplexity
ratio and KL before and after, per-layer relative error, training time, warnings, rollbacks),
results.json, and ratio.png (the free-running perplexity ratio against steps, per model).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from _jobs import run_all

from npt.config import parse_args
from npt.errors import NPTError
from npt.evaluate import greedy_cell
from npt.provenance import provenance
from npt.loading import resolve_model_path
from npt.teachers import EMBEDDED_NAME, ZOO, ZOO_PREFIX, zoo_recipe
from npt.train import train

MODELS = [EMBEDDED_NAME, *(ZOO_PREFIX + name for name in ZOO)]


def describe(name: str) -> dict:
    """The teacher's shape and quality, from its recipe and build record (building it if needed)."""
    recipe = zoo_recipe(name)
    info = json.loads((Path(resolve_model_path(name)) / "build_info.json").read_text())
    return {
        "architecture": recipe.architecture,
        "layers": recipe.num_layers,
        "hidden": recipe.hidden_size,
        "gqa": f"{recipe.num_heads}:{recipe.num_kv_heads or recipe.num_heads}",
        "vocab": recipe.vocab_size,
        "corpus": recipe.corpus,
        "teacher_ppl": info["heldout_perplexity"],
        "build_seconds": info["build_seconds"],
    }


def run_zoo(models: list[str], flags: list[str], output_dir: Path, jobs: int = 1) -> list[dict]:
    started = provenance()  # the source as this process loaded it, before any run
    output_dir.mkdir(parents=True, exist_ok=True)
    configs = {m: parse_args(["--model_name", m, "--output_dir", str(output_dir / m.replace(":", "-")), "--no-progress", "--num_samples", "0", *flags])
               for m in models}  # every config is validated before the first run
    # each teacher is built once, `jobs` at a time (distinct names never share a cache folder),
    # before any training run starts
    unique = list(dict.fromkeys(models))
    teachers = dict(zip(unique, run_all(describe, [(name,) for name in unique], jobs)))
    for name in models:
        print(f"[zoo] {name}: {teachers[name]}", flush=True)
    rows = []
    for row in run_all(_train_one, [(name, configs[name], teachers[name]) for name in models], jobs):
        rows.append(row)
        write_report(rows, flags, output_dir, started)
    return rows


def _train_one(name: str, cfg, teacher: dict) -> dict:
    start = time.perf_counter()
    summary = train(cfg)
    return {"model": name, "teacher": teacher, "seconds": time.perf_counter() - start, "summary": summary,
            "threads": torch.get_num_threads()}


def table(rows: list[dict], flags: list[str]) -> str:
    lines = [
        "| teacher | arch | layers x hidden | heads:kv | vocab | corpus | teacher ppl | ratio before | ratio after | KL before -> after "
        "| top-1 agreement | greedy match | per-layer rel error | training (s) | warnings | rollbacks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        t, s = row["teacher"], row["summary"]
        b, e = s["eval_before"], s["eval"]
        warnings = ", ".join(s["warnings"]) or "none"
        lines.append(
            f"| {row['model']} | {t['architecture']} | {t['layers']} x {t['hidden']} | {t['gqa']} | {t['vocab']} | {t['corpus']} "
            f"| {e['teacher_ppl']:.2f} | {b['ppl_ratio']:.3f} | **{e['ppl_ratio']:.3f}** | {b['kl']:.3f} -> {e['kl']:.3f} "
            f"| {e['top1_agreement']:.1%} | {greedy_cell(e)} | {' / '.join(f'{r:.2f}' for r in e['rel_error'])} | {s['train_seconds']:.0f} | {warnings} | {len(s['rollbacks'])} |"
        )
    steps = rows[0]["summary"]["steps"]
    threads = rows[0].get("threads", torch.get_num_threads())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {threads} thread(s) per run"
    lines += ["", f"Recipe: the defaults{' plus `' + ' '.join(flags) + '`' if flags else ''}, {steps} steps per teacher, on {device}."]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib  # optional: only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # left: the whole run (before training the ratio can be 1e7); right: from the first evaluation on
    fig, (full, zoom) = plt.subplots(1, 2, figsize=(13, 5))
    for row in rows:
        hist = row["summary"]["eval_history"]
        steps, ratios = [h["step"] for h in hist], [h["ppl_ratio"] for h in hist]
        full.plot(steps, ratios, marker="o", ms=3, label=row["model"])
        zoom.plot(steps[1:], ratios[1:], marker="o", ms=3, label=row["model"])
    for ax in (full, zoom):
        ax.axhline(1.10, color="grey", ls=":", lw=1)
        ax.axhline(1.25, color="grey", ls="--", lw=1)
        ax.set(xlabel="optimizer step")
        ax.grid(alpha=0.3)
    full.set(ylabel="student / teacher perplexity (free-running, held-out)", yscale="log", title="The default recipe on the teacher zoo")
    zoom.set(title="After the first evaluation (dotted 1.10, dashed 1.25)")
    zoom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(rows: list[dict], flags: list[str], output_dir: Path, started: dict) -> None:
    (output_dir / "results.md").write_text(table(rows, flags) + "\n")
    (output_dir / "results.json").write_text(json.dumps({"kind": "zoo", "flags": flags, "provenance": started, "rows": rows}, indent=2, default=str) + "\n")
    plot(rows, output_dir / "ratio.png")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--output_dir", default="runs/zoo")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated teachers (default: the embedded default and every zoo teacher)")
    parser.add_argument("--jobs", type=int, default=1, help="teachers trained at the same time, each in its own process on cores/jobs threads")
    args = parser.parse_args(own)
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs} must be at least 1")
    try:
        rows = run_zoo(args.models.split(","), flags, Path(args.output_dir), args.jobs)
    except NPTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n" + table(rows, flags))
    print(f"\nWritten: {args.output_dir}/results.md, results.json, ratio.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
