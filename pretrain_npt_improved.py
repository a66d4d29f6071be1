#!/usr/bin/env python
"""Equivalence pre-training of Neuro-Plastic Transformer (NPT) adapters.

    python pretrain_npt_improved.py                       # the embedded default (its time: README, "Results")
    python pretrain_npt_improved.py --config configs/standard.yaml --model_name meta-llama/Llama-3.2-1B \
        --dataset_name HuggingFaceFW/fineweb-edu --streaming --max_length 1024

See README.md for every flag, the configs, the TensorBoard curves and how to resume.
"""

from npt.cli import script_main

if __name__ == "__main__":
    script_main()
