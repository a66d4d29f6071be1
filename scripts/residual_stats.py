#!/usr/bin/env python
"""Per decoder layer of a teacher: how the residual stream's size varies over tokens, and how large
the attention output is against it (what `--adapter_input relative` divides by).

    python scripts/residual_stats.py                                  # the embedded default
    python scripts/residual_stats.py --model_name zoo:smollm2-135m --max_length 64 --output_json stats.json

On held-out blocks of the model's built-in corpus (or --dataset_name / --data_files), the first
position of every block left out (BOS, or an attention sink), for each layer: the mean of rms(h)
over tokens and its coefficient of variation (std / mean), the same of rms(a), and of the ratio
rms(a) / rms(h), h the layer's input and a its attention branch.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
from transformers import HfArgumentParser
from transformers.hf_argparser import HfArg

from npt.architecture import decoder_layers
from npt.capture import record_layers
from npt.data import DataArguments, heldout_blocks, open_source, with_default_dataset
from npt.errors import NPTError
from npt.loading import ModelArguments, load_model
from npt.provenance import provenance


@dataclasses.dataclass
class StatsArguments:
    blocks: int = HfArg(default=16, help="Held-out blocks measured.")
    output_json: str | None = HfArg(default=None, help="Also write the figures here.")


def _mean_cv(x: torch.Tensor) -> tuple[float, float]:
    mean = x.mean()
    return mean.item(), (x.std() / mean).item()


@torch.no_grad()
def layer_stats(model, blocks: torch.Tensor) -> list[dict]:
    layers = dict(enumerate(decoder_layers(model)))
    with record_layers(layers, attention=True) as records:
        model(input_ids=blocks, use_cache=False)
    rows = []
    for i in layers:
        h, a = records[i].inputs[:, 1:].float(), records[i].attn[:, 1:].float()
        rms_h, rms_a = h.pow(2).mean(-1).sqrt().flatten(), a.pow(2).mean(-1).sqrt().flatten()
        (h_mean, h_cv), (a_mean, a_cv), (r_mean, r_cv) = _mean_cv(rms_h), _mean_cv(rms_a), _mean_cv(rms_a / rms_h)
        rows.append({"layer": i, "rms_h": h_mean, "rms_h_cv": h_cv, "rms_a": a_mean, "rms_a_cv": a_cv, "ratio": r_mean, "ratio_cv": r_cv})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = HfArgumentParser((ModelArguments, DataArguments, StatsArguments))
    margs, data, args = parser.parse_args_into_dataclasses(args=argv)
    try:
        model, tokenizer = load_model(margs.model_name)
        data = with_default_dataset(data, margs.default_dataset)
        blocks = heldout_blocks(open_source(data), tokenizer, data)[: args.blocks]
    except NPTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = layer_stats(model, blocks)
    print(f"{len(blocks)} blocks of {blocks.shape[1]} tokens, the first position left out")
    print("| layer | rms(h) | CV of rms(h) | rms(a) | CV of rms(a) | rms(a) / rms(h) | its CV |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['rms_h']:.3f} | {r['rms_h_cv']:.3f} | {r['rms_a']:.3f} | {r['rms_a_cv']:.3f} | {r['ratio']:.3f} | {r['ratio_cv']:.3f} |")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"provenance": provenance(), "blocks": len(blocks), "layers": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
