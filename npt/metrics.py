"""Metric accumulation and the trackers the curves go to.

Loss components stay on the device as tensors and are summed over the logging interval; they
reach the host once per log (no `.item()` per micro-step). Tag names are the guide's, exactly:
loss/alignment, loss/mse, loss/cosine, loss/grad_penalty, training/curriculum_factor,
training/temperature; the rest follow the same scheme.
"""

from __future__ import annotations

import json

import torch

# metric key in LossOutput.metrics -> TensorBoard tag
SCALAR_TAGS = {
    "alignment": "loss/alignment",
    "mse": "loss/mse",
    "cosine": "loss/cosine",
    "grad_penalty": "loss/grad_penalty",
    "total": "loss/total",
    "regularization": "loss/regularization",
    "weight_balance": "loss/weight_balance",
    "logit_kl": "loss/logit_kl",
    "weight_temperature": "training/layer_weight_temperature",
    "update_clipped": "training/update_clipped",
}
LAYER_TAGS = {
    "layer_loss": "layers/loss",
    "layer_mse": "layers/mse",
    "layer_cosine": "layers/cosine",
    "layer_weight": "layers/weight",
    "layer_regularization": "layers/regularization",
}


class IntervalMeans:
    """Sums metric tensors over optimizer steps; `pop()` returns the means as Python numbers."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for k, v in metrics.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
            self.counts[k] = self.counts.get(k, 0) + 1

    def means(self) -> dict[str, torch.Tensor]:
        return {k: v / self.counts[k] for k, v in self.sums.items()}

    def pop(self, reduce=None) -> dict[str, float | list[float]]:
        """Means since the last pop; `reduce` (e.g. a cross-process mean) is applied on the device."""
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        flat = torch.cat([(self.sums[k] / self.counts[k]).reshape(-1) for k in keys])
        if reduce is not None:
            flat = reduce(flat)
        values = flat.tolist()
        out: dict[str, float | list[float]] = {}
        pos = 0
        for k in keys:
            n = self.sums[k].numel()
            out[k] = values[pos] if self.sums[k].ndim == 0 else values[pos : pos + n]
            pos += n
        self.sums, self.counts = {}, {}
        return out


def to_tags(means: dict[str, float | list[float]], layers: list[int]) -> dict[str, float]:
    tags: dict[str, float] = {}
    for key, value in means.items():
        if key in SCALAR_TAGS:
            tags[SCALAR_TAGS[key]] = float(value)
        elif key in LAYER_TAGS:
            for idx, v in zip(layers, value):
                tags[f"{LAYER_TAGS[key]}/layer_{idx:02d}"] = float(v)
    return tags


class Tracker:
    """The run's curves through accelerate's trackers (`--report_to`: tensorboard by default, wandb,
    mlflow, ... when installed), written by the main process. The run config goes in as the
    trackers' hyperparameters. TensorBoard writes to <output_dir>/tensorboard; on resume, events
    that a crashed run logged after its checkpoint are hidden (`purge_step`)."""

    def __init__(self, accelerator, config: dict, purge_step: int | None = None):
        self.accelerator = accelerator
        self.active = bool(accelerator.log_with)
        if self.active:
            kwargs = {"tensorboard": {"purge_step": purge_step}} if purge_step else {}
            accelerator.init_trackers("tensorboard", config=hparams(config), init_kwargs=kwargs)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.active:
            self.accelerator.log({k: float(v) for k, v in values.items()}, step=step)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.active:
            self.accelerator.log({tag: text}, step=step)

    def close(self) -> None:
        """Finish the trackers (not `accelerator.end_training()`, which also destroys the process
        group while the processes still have a barrier to pass)."""
        if self.active:
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.active = False


def hparams(config: dict) -> dict:
    """The config as trackers take it: str, int, float, bool or None values."""
    return {k: v if v is None or isinstance(v, (str, int, float, bool)) else json.dumps(v) for k, v in config.items()}
