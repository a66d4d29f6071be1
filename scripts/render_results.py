#!/usr/bin/env python
"""The docs' result tables, generated from the results files under docs/results/.

    python scripts/render_results.py            # rewrite every generated table in README.md and docs/
    python scripts/render_results.py --check    # exit 1, naming each table that differs from its file

A generated table sits between two markers in the Markdown; the first names the kind of table and
its results files (paths from the repository root):

    <!-- results runs: docs/results/a.json docs/results/b.json -->
    ... generated: never edit by hand ...
    <!-- /results -->

Kinds: `runs` (one row per main-job summary.json: KL, top-1, greedy match, ratio, time), `curve`
(one summary's held-out evaluations against steps and tokens), `extrapolation` (a power law of
KL against tokens fitted to one summary's curve, and its cost for Llama-3.2-1B), `zoo` (scripts/zoo_bench.py's
results.json), `ablation` (scripts/compare_losses.py's), `attribution` (npt-eval --layer_attribution's eval.json), `benchmark` (scripts/benchmark.py
--output_json's reports). Each table ends with where its figures come from: the command, the
commit, the date and the machine, as the results file records them.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
from pathlib import Path

import benchmark  # the tool beside this one: the matmul count of a step
from npt.evaluate import attribution_table
from npt.provenance import describe

ROOT = Path(__file__).resolve().parents[1]

DOCS = ["README.md", "docs/*.md"]
BLOCK = re.compile(r"(<!-- results (\w+): ([^>]*?) -->\n)(.*?)(<!-- /results -->)", re.S)


def load(path: str) -> dict:
    return json.loads((ROOT / path).read_text())


def _greedy(e: dict) -> str:
    return f"{e['greedy_match']:.1f} / {e['greedy_tokens']}" if "greedy_match" in e else "-"


def _kl(e: dict) -> str:
    return f"{e['kl']:.4f} +- {1.96 * e['kl_stderr']:.4f}"


BOOKKEEPING = {"--output_dir": 1, "--output_json": 1, "--no-progress": 0, "--no_progress": 0, "--overwrite_output_dir": 0, "--save_steps": 1, "--resume_from_checkpoint": 1}  # flags that do not change a result (resuming is exact), and their values


def _flags(command: str) -> list[str]:
    out, skip = [], 0
    for tok in shlex.split(command)[1:]:
        if skip:
            skip -= 1
        elif tok in BOOKKEEPING:
            skip = BOOKKEEPING[tok]
        else:
            out.append(tok)
    return out


def _defaults(prov: dict) -> str:
    """A run without flags of its own: the defaults of its commit (they change with the code)."""
    return f"defaults of {(prov.get('commit') or 'unknown')[:7]}"


def _options(tokens: list[str]) -> list[str]:
    """The tokens grouped as options, each flag with its values ('--adapter_rank 64')."""
    out: list[str] = []
    for tok in tokens:
        if tok.startswith("--") or not out:
            out.append(tok)
        else:
            out[-1] += " " + shlex.quote(tok)
    return out


def _labels(provenances: list[dict]) -> list[str]:
    """Each command's own options, flag and value together: those not every command shares (the
    defaults when none)."""
    options = [_options(_flags(p["command"])) for p in provenances]
    common = set(_shared(options))
    return [" ".join(o for o in opts if o not in common) or _defaults(p) for opts, p in zip(options, provenances)]


def _shared(options: list[list[str]]) -> list[str]:
    """The options every command of a table has (`options`: each command's), in the first command's
    order: the labels leave them out, so the table must name them (a row labelled with the defaults
    ran with these too)."""
    if len(options) < 2:
        return []
    return [o for o in options[0] if all(o in opts for opts in options[1:])]


def _sources(results: list[dict]) -> list[str]:
    """Each file's provenance line, its command without the flags that change no figure."""
    lines = []
    for r in results:
        prov = dict(r["provenance"])
        prov["command"] = shlex.join([shlex.split(prov["command"])[0], *_flags(prov["command"])])
        lines.append(f"- {describe(prov)}")
    return lines


def _kept(s: dict) -> str:
    """The kept evaluation's KL, and its step when it is not the last one."""
    e = s["eval"]
    return f"**{_kl(e)}**" + (f" (step {e['step']})" if e["step"] != s["steps"] else "")


def runs(paths: list[str]) -> str:
    results = [load(p) for p in paths]
    lines = ["| run | steps | tokens | KL before -> kept (nats/token, 95%) | top-1 agreement | greedy match | perplexity ratio | training (s) | rollbacks |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, s in zip(_labels([r["provenance"] for r in results]), results):
        b, e = s["eval_before"], s["eval"]
        lines.append(f"| `{label}` | {s['steps']} | {s['tokens_seen']:,} | {b['kl']:.3f} -> {_kept(s)} | {e['top1_agreement']:.1%} | {_greedy(e)} "
                     f"| {e['ppl_ratio']:.3f} | {s['train_seconds']:.0f} | {len(s['rollbacks'])} |")
    shared = _shared([_options(_flags(r["provenance"]["command"])) for r in results])
    every = [f"Every run above also had `{' '.join(shared)}`; a label names the flags it had besides.", ""] if shared else []
    return "\n".join(lines + ["", *every, "Kept: the evaluation with the lowest held-out KL (the adapters a run saves). From:", *_sources(results)])


def curve(paths: list[str]) -> str:
    (path,) = paths
    s = load(path)
    per_step = s["tokens_seen"] / max(s["steps"], 1)
    timed = all("train_seconds" in h for h in s["eval_history"])  # older results files lack the time
    lines = ["| step | tokens | KL (nats/token) | top-1 agreement | greedy match | perplexity ratio | mean rel error |" + (" training (min) |" if timed else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if timed else "")]
    for h in s["eval_history"]:
        lines.append(f"| {h['step']} | {round(h['step'] * per_step):,} | {h['kl']:.4f} | {h['top1_agreement']:.1%} | {_greedy(h)} | {h['ppl_ratio']:.3f} "
                     f"| {h['rel_error_mean']:.3f} |" + (f" {h['train_seconds'] / 60:.1f} |" if timed else ""))
    return "\n".join(lines + ["", "From:", *_sources([s])])


def zoo(paths: list[str]) -> str:
    lines = ["| teacher | arch | layers x hidden | heads:kv | teacher ppl | KL before -> after | top-1 agreement | greedy match | ratio before -> after "
             "| training (s) | rollbacks |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    results = [load(p) for p in paths]
    for res in results:
        flags = " ".join(res["flags"]) or _defaults(res["provenance"])
        for row in res["rows"]:
            t, s = row["teacher"], row["summary"]
            b, e = s["eval_before"], s["eval"]
            lines.append(f"| {row['model']} (`{flags}`) | {t['architecture']} | {t['layers']} x {t['hidden']} | {t['gqa']} | {e['teacher_ppl']:.2f} "
                         f"| {b['kl']:.3f} -> **{e['kl']:.{4 if e['kl'] < 0.1 else 3}f}** | {e['top1_agreement']:.1%} | {_greedy(e)} | {b['ppl_ratio']:.3f} -> **{e['ppl_ratio']:.3f}** "
                         f"| {s['train_seconds']:.0f} | {len(s['rollbacks'])} |")
    return "\n".join(lines + ["", "From:", *_sources(results)])


def ablation(paths: list[str]) -> str:
    lines = ["| variant | flags | KL (nats/token, 95%) | top-1 agreement | greedy match | perplexity ratio | mean rel error | training (s) | rollbacks |",
             "|---|---|---|---|---|---|---|---|---|"]
    results = [load(p) for p in paths]
    for res in results:
        # the runs' own threads and dtype (the ablation process's are not theirs: --jobs splits the cores)
        per_run = {(m["threads"], m.get("dtype")) for m in (r["summary"]["provenance"]["machine"] for r in res["rows"])}
        if len(per_run) == 1:
            threads, dtype = per_run.pop()
            res["provenance"] = res["provenance"] | {"machine": res["provenance"]["machine"] | {"threads": threads, "dtype": dtype}}
        for row in res["rows"]:
            s = row["summary"]
            e = s["eval"]
            lines.append(f"| {row['variant']} | `{row['flags']}` | {_kl(e)} | {e['top1_agreement']:.1%} | {_greedy(e)} | {e['ppl_ratio']:.3f} "
                         f"| {e['rel_error_mean']:.4f} | {s['train_seconds']:.0f} | {len(s['rollbacks'])} |")
    return "\n".join(lines + ["", "From:", *_sources(results)])


def benchmark_reports(paths: list[str]) -> str:
    results = [load(p) for p in paths]
    parts = [shape["report"].strip() for res in results for shape in res["shapes"]]
    return "\n\n".join(parts + ["From:\n" + "\n".join(_sources(results))])


# the extrapolation's GPU: an H100's dense bf16 peak, at a utilisation a tuned training step reaches
GPU_PEAK_FLOPS, GPU_UTILISATION = 989e12, 0.4


def power_law(tokens: list[float], kls: list[float]) -> tuple[float, float]:
    """(a, b) of KL = a T^-b, least squares in log-log."""
    xs, ys = [math.log(t) for t in tokens], [math.log(k) for k in kls]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return math.exp(my - slope * mx), -slope


# Summaries record their adapter's shape ("adapter"); those written before they did all predate the
# triple default (c8b61be), so their shape is the gate alone at k 32, r 16 unless their flags say otherwise.
LEGACY_ADAPTER = {"modulate": "gate", "num_ranks": 32, "rank": 16}
ADAPTER_FLAGS = {"--modulate": ("modulate", str), "--num_ranks": ("num_ranks", int), "--adapter_rank": ("rank", int)}


def run_adapter(s: dict) -> dict:
    """The adapter shape a run trained: {"modulate", "num_ranks", "rank"}."""
    if "adapter" in s:
        return {k: s["adapter"][k] for k in LEGACY_ADAPTER}
    shape = dict(LEGACY_ADAPTER)
    toks = [t for tok in _flags(s["provenance"]["command"]) for t in tok.split("=", 1)]
    for flag, (key, cast) in ADAPTER_FLAGS.items():
        if flag in toks[:-1]:
            shape[key] = cast(toks[toks.index(flag) + 1])
    return shape


def extrapolation(paths: list[str]) -> str:
    """KL against tokens, fitted on the second half of a run's evaluations, and what reaching KL 0.5
    and 0.2 would cost for Llama-3.2-1B by the FLOPs of its free-running step."""
    (path,) = paths
    s = load(path)
    per_step = s["tokens_seen"] / max(s["steps"], 1)
    points = [(h["step"] * per_step, h["kl"]) for h in s["eval_history"] if h["step"] >= s["steps"] / 2 and h["kl"] > 0]
    if len(points) < 3:
        return f"Too few evaluations in the second half of the run ({len(points)}) to fit a curve."
    a, b = power_law(*zip(*points))
    head = (f"**Extrapolation**, not a measurement: `KL = {a:.3g} T^-{b:.3f}` (T tokens) fitted to the held-out KL of the run's second "
            f"half ({len(points)} evaluations, steps {points[0][0] / per_step:.0f}-{points[-1][0] / per_step:.0f}; its last 20% are the "
            "learning-rate decay, which makes the fit optimistic).")
    if b <= 0:
        return head + " The KL does not fall over that stretch: no number of tokens reaches a lower KL on this curve."
    adapter = run_adapter(s)
    spec = benchmark.BenchSpec(shape="llama-1b", batch_size=8, seq_len=2048, npt_layers="all", **adapter)
    per_token = benchmark.step_flops(spec)["free"] / (spec.batch_size * spec.seq_len)
    cells = []
    for target in (0.5, 0.2):
        tokens = (a / target) ** (1 / b)
        hours = tokens * per_token / (GPU_PEAK_FLOPS * GPU_UTILISATION) / 3600
        cells.append(f"KL {target} after {tokens:.2g} tokens, {hours:.2g} GPU hours")
    return "\n".join([head, "", f"{'; '.join(cells)}: for Llama-3.2-1B (all 16 layers converted, this run's adapter: {adapter['modulate'].replace(',', '+')} "
                      f"k {adapter['num_ranks']} r {adapter['rank']}; its free-running step "
                      f"{per_token / 1e9:.1f} GFLOP of matmul work per token) at {GPU_UTILISATION:.0%} of an H100's "
                      f"{GPU_PEAK_FLOPS / 1e12:.0f} TFLOP/s bf16 peak, if it needed as many tokens as this run's model.",
                      "", "From:", *_sources([s])])


def attribution(paths: list[str]) -> str:
    """npt-eval --layer_attribution's eval.json: the KL with each converted layer reverted to its
    teacher layer, and with it alone converted."""
    (path,) = paths
    r = load(path)
    lines = [attribution_table(r["layer_attribution"], r["kl"], r["ppl_ratio"])]
    return "\n".join(lines + ["", f"On {r['tokens']} tokens ({r['blocks']} blocks of {r['max_length']}). From:", *_sources([r])])


KINDS = {"attribution": attribution, "runs": runs, "curve": curve, "extrapolation": extrapolation, "zoo": zoo, "ablation": ablation, "benchmark": benchmark_reports}


def render(text: str) -> str:
    """`text` with every generated table made anew from its results files."""
    def fill(m: re.Match) -> str:
        kind, files = m.group(2), m.group(3).split()
        if kind not in KINDS:
            raise SystemExit(f"unknown table kind {kind!r} in {m.group(1).strip()}; known: {', '.join(KINDS)}")
        return f"{m.group(1)}{KINDS[kind](files)}\n{m.group(5)}"

    return BLOCK.sub(fill, text)


def documents() -> list[Path]:
    return sorted({p for pattern in DOCS for p in ROOT.glob(pattern)})


def stale() -> list[str]:
    """The generated tables that differ from their results files, as 'document: marker'."""
    out = []
    for doc in documents():
        text = doc.read_text()
        for m, fresh in zip(BLOCK.finditer(text), BLOCK.finditer(render(text))):
            if m.group(0) != fresh.group(0):
                out.append(f"{doc.relative_to(ROOT)}: {m.group(1).strip()}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when a table differs from its results files")
    args = parser.parse_args(argv)
    if args.check:
        bad = stale()
        for line in bad:
            print(f"stale: {line} (run python scripts/render_results.py)")
        return 1 if bad else 0
    for doc in documents():
        text = doc.read_text()
        fresh = render(text)
        if fresh != text:
            doc.write_text(fresh)
            print(f"rewrote the tables of {doc.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
