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
(one summary's held-out evaluations against steps and tokens), `zoo` (scripts/zoo_bench.py's
results.json), `ablation` (scripts/compare_losses.py's), `benchmark` (scripts/benchmark.py
--output_json's reports). Each table ends with where its figures come from: the command, the
commit, the date and the machine, as the results file records them.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from npt.provenance import describe  # noqa: E402

DOCS = ["README.md", "docs/*.md"]
BLOCK = re.compile(r"(<!-- results (\w+): ([^>]*?) -->\n)(.*?)(<!-- /results -->)", re.S)


def load(path: str) -> dict:
    return json.loads((ROOT / path).read_text())


def _greedy(e: dict) -> str:
    return f"{e['greedy_match']:.1f} / {e['greedy_tokens']}" if "greedy_match" in e else "-"


def _kl(e: dict) -> str:
    return f"{e['kl']:.4f} +- {1.96 * e['kl_stderr']:.4f}"


def _labels(commands: list[str]) -> list[str]:
    """Each command's own flags: the tokens that not every command shares ("defaults" when none)."""
    tokens = [shlex.split(c)[1:] for c in commands]
    common = set.intersection(*(set(t) for t in tokens)) if len(tokens) > 1 else set()
    return [" ".join(t for t in toks if t not in common) or "defaults" for toks in tokens]


def _sources(results: list[dict]) -> list[str]:
    return [f"- {describe(r['provenance'])}" for r in results]


def runs(paths: list[str]) -> str:
    results = [load(p) for p in paths]
    lines = ["| run | steps | tokens | KL before -> after (nats/token, 95%) | top-1 agreement | greedy match | perplexity ratio | training (s) | rollbacks |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, s in zip(_labels([r["provenance"]["command"] for r in results]), results):
        b, e = s["eval_before"], s["eval"]
        lines.append(f"| `{label}` | {s['steps']} | {s['tokens_seen']:,} | {b['kl']:.3f} -> **{_kl(e)}** | {e['top1_agreement']:.1%} | {_greedy(e)} "
                     f"| {e['ppl_ratio']:.3f} | {s['train_seconds']:.0f} | {len(s['rollbacks'])} |")
    return "\n".join(lines + ["", "The adapters of the evaluation with the lowest held-out KL; from:", *_sources(results)])


def curve(paths: list[str]) -> str:
    (path,) = paths
    s = load(path)
    per_step = s["tokens_seen"] / max(s["steps"], 1)
    lines = ["| step | tokens | KL (nats/token) | top-1 agreement | greedy match | perplexity ratio | mean rel error |", "|---|---|---|---|---|---|---|"]
    for h in s["eval_history"]:
        lines.append(f"| {h['step']} | {round(h['step'] * per_step):,} | {h['kl']:.4f} | {h['top1_agreement']:.1%} | {_greedy(h)} | {h['ppl_ratio']:.3f} "
                     f"| {h['rel_error_mean']:.3f} |")
    return "\n".join(lines + ["", "From:", *_sources([s])])


def zoo(paths: list[str]) -> str:
    lines = ["| teacher | arch | layers x hidden | heads:kv | teacher ppl | KL before -> after | top-1 agreement | greedy match | ratio before -> after "
             "| training (s) | rollbacks |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    results = [load(p) for p in paths]
    for res in results:
        flags = " ".join(res["flags"]) or "defaults"
        for row in res["rows"]:
            t, s = row["teacher"], row["summary"]
            b, e = s["eval_before"], s["eval"]
            lines.append(f"| {row['model']} (`{flags}`) | {t['architecture']} | {t['layers']} x {t['hidden']} | {t['gqa']} | {e['teacher_ppl']:.2f} "
                         f"| {b['kl']:.3f} -> **{e['kl']:.3f}** | {e['top1_agreement']:.1%} | {_greedy(e)} | {b['ppl_ratio']:.3f} -> **{e['ppl_ratio']:.3f}** "
                         f"| {s['train_seconds']:.0f} | {len(s['rollbacks'])} |")
    return "\n".join(lines + ["", "From:", *_sources(results)])


def ablation(paths: list[str]) -> str:
    lines = ["| variant | flags | KL (nats/token, 95%) | top-1 agreement | greedy match | perplexity ratio | mean rel error | time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    results = [load(p) for p in paths]
    for res in results:
        for row in res["rows"]:
            e = row["summary"]["eval"]
            lines.append(f"| {row['variant']} | `{row['flags']}` | {_kl(e)} | {e['top1_agreement']:.1%} | {_greedy(e)} | {e['ppl_ratio']:.3f} "
                         f"| {e['rel_error_mean']:.4f} | {row['seconds']:.0f} |")
    return "\n".join(lines + ["", "From:", *_sources(results)])


def benchmark(paths: list[str]) -> str:
    results = [load(p) for p in paths]
    parts = [shape["report"].strip() for res in results for shape in res["shapes"]]
    return "\n\n".join(parts + ["From:\n" + "\n".join(_sources(results))])


KINDS = {"runs": runs, "curve": curve, "zoo": zoo, "ablation": ablation, "benchmark": benchmark}


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
