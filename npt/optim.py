"""Optimisation: its arguments, the optimizer over the adapters, and the learning rate per step."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import nn
from transformers.hf_argparser import HfArg

from .errors import NPTError
from .schedules import lr_factor, wsd_decay_start


def resolve_steps(value: str | int | None, max_steps: int, name: str, times: int = 1) -> int:
    """A step count ('300', 300) or a fraction of max_steps ('0.1'), times `times` (a fraction is
    multiplied before rounding: twice 10% of 4 steps is 1, not 2 x 0)."""
    text = str(value).strip()
    try:
        if "." in text or "e" in text.lower():
            frac = float(text)
            if not 0.0 <= frac <= 1.0:
                raise ValueError
            return int(round(times * frac * max_steps))
        count = int(text)
        if count < 0:
            raise ValueError
        return times * count
    except ValueError:
        raise NPTError(
            f"--{name} {value!r} is neither a step count nor a fraction in [0, 1].",
            "Pass a count such as 100 or a fraction of --max_steps such as 0.1.",
        ) from None


@dataclasses.dataclass
class OptimArguments:
    learning_rate: float = HfArg(default=6e-3, help="Peak learning rate of the adapters (AdamW).")
    free_running_lr_scale: float = HfArg(default=1.0, help="Multiplies the learning rate in free-running steps (the schedule and rollbacks apply as before). A rate the model does not bear running freely is found and lowered by the rollbacks (docs/checkpoints.md); a lower start saves their steps on a model known to need it.")
    free_running_warmup: str = HfArg(default="0", help="Ramp the learning rate linearly from 0 over the first free-running steps (a count, or a fraction of max_steps), as at the start of training: the loss changes there, and with --reset_moments_at_free_running AdamW's first updates after the reset move every weight by about the full rate. 0: none.")
    reset_moments_at_free_running: bool = HfArg(default=False, help="Clear AdamW's moments where free-running starts. The teacher-forced phase leaves second moments of another loss's gradients, far smaller than the free-running ones, so that without the reset the first few hundred free-running updates are several times the rate.")
    weight_decay: float = HfArg(default=0.0, help="AdamW weight decay of the adapters.")
    adam_beta1: float = HfArg(default=0.9, help="AdamW beta1.")
    adam_beta2: float = HfArg(default=0.999, help="AdamW beta2.")
    adam_eps: float = HfArg(default=1e-8, aliases=["--adam_epsilon"], help="AdamW eps.")
    update_clipping: float = HfArg(default=0.0, help="AdamW with update clipping (StableAdamW): each tensor's step is divided by max(1, RMS(g / sqrt(v)) / this), v the second moment with this step's gradient in it, so that a gradient far above its running scale (a single batch's spike, the switch to free-running) moves the tensor by no more than about the learning rate. 1 is the published value; 0 disables (plain AdamW).")
    max_grad_norm: float = HfArg(default=1.0, help="Gradient clipping norm (0 disables).")
    warmup_steps: str = HfArg(default="0.1", help="Learning-rate warm-up (and default curriculum length): a count, or a fraction of max_steps such as 0.1.")
    lr_scheduler: Literal["cosine", "linear", "constant", "wsd"] = HfArg(default="wsd", aliases=["--lr_scheduler_type"], help="Decay after warm-up; wsd: the peak until the last --lr_decay_steps, then linear decay.")
    lr_decay_steps: str = HfArg(default="0.2", help="wsd only: the steps of its final decay, a count or a fraction of max_steps.")
    min_lr_ratio: float = HfArg(default=0.1, help="Final learning rate as a fraction of the peak.")
    batch_size: int = HfArg(default=8, aliases=["--per_device_train_batch_size"], help="Blocks per micro-batch per process.")
    gradient_accumulation_steps: int = HfArg(default=1, help="Micro-batches per optimizer step.")
    max_steps: int = HfArg(default=2000, help="Optimizer steps.")
    adaptive_weights_lr: float = HfArg(default=0.01, help="Learning rate of the adaptive layer weights.")

    def __post_init__(self):
        for name in ("weight_decay", "max_grad_norm"):
            if not getattr(self, name) >= 0:
                raise NPTError(f"--{name} {getattr(self, name)} is negative.", f"Pass --{name} >= 0.")
        for name in ("batch_size", "gradient_accumulation_steps", "max_steps"):
            if getattr(self, name) < 1:
                raise NPTError(f"--{name} {getattr(self, name)} must be at least 1.", f"Pass --{name} >= 1.")
        if not (self.free_running_lr_scale > 0 and math.isfinite(self.free_running_lr_scale)):
            raise NPTError(f"--free_running_lr_scale {self.free_running_lr_scale} is not a positive number.", "Pass e.g. 0.1, or 1 for the same rate in both phases.")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise NPTError(f"--learning_rate {self.learning_rate} must be a positive number.", "Pass e.g. --learning_rate 1e-3.")
        if not self.adaptive_weights_lr > 0:
            raise NPTError(f"--adaptive_weights_lr {self.adaptive_weights_lr} must be positive.", "Pass e.g. 0.01.")
        if not 0 <= self.min_lr_ratio <= 1:
            raise NPTError(f"--min_lr_ratio {self.min_lr_ratio} is outside [0, 1].", "Pass e.g. 0.1.")
        if not (self.update_clipping >= 0 and math.isfinite(self.update_clipping)):
            raise NPTError(f"--update_clipping {self.update_clipping} is not a number >= 0.", "Pass 1 for the published threshold, or 0 for plain AdamW.")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1 and self.adam_eps > 0):
            raise NPTError("AdamW betas must be in [0, 1) and eps positive.", "Use the defaults (0.9, 0.999, 1e-8).")
        _ = self.warmup, self.decay, self.free_running_warmup_steps  # parse errors surface here

    @property
    def warmup(self) -> int:
        return resolve_steps(self.warmup_steps, self.max_steps, "warmup_steps")

    @property
    def decay(self) -> int:
        return resolve_steps(self.lr_decay_steps, self.max_steps, "lr_decay_steps")

    @property
    def free_running_warmup_steps(self) -> int:
        return resolve_steps(self.free_running_warmup, self.max_steps, "free_running_warmup")

    def free_running_factor(self, step: int, free_from: int) -> float:
        """What multiplies the schedule's rate in free-running step `step` (the phase starting at
        `free_from`): --free_running_lr_scale, ramped up over --free_running_warmup steps."""
        n = self.free_running_warmup_steps
        return self.free_running_lr_scale * (min(1.0, (step - free_from + 1) / n) if n else 1.0)

    def describe(self) -> str:
        """The learning-rate schedule in words, for the run's header."""
        peak, low = f"{self.learning_rate:g}", f"{self.learning_rate * self.min_lr_ratio:g}"
        shape = {"constant": f"then constant at {peak}",
                 "cosine": f"then cosine decay to {low}",
                 "linear": f"then linear decay to {low}",
                 "wsd": f"stable at {peak} until step {wsd_decay_start(self.warmup, self.max_steps, self.decay)}, then linear decay to {low}"}
        return f"learning rate warm-up {self.warmup} steps to {peak}, {shape[self.lr_scheduler]}"

    def lr_factor(self, step: int) -> float:
        return lr_factor(step, self.warmup, self.max_steps, self.lr_scheduler, self.min_lr_ratio, self.decay)


def build_optimizer(args: OptimArguments, adapters: list[nn.Parameter], loss_module: nn.Module | None) -> torch.optim.Optimizer:
    """AdamW over the adapters, and over the loss module's own parameters (the adaptive layer
    weights) with their own learning rate. Each group keeps its peak rate as `base_lr`."""
    groups = [{"params": adapters, "lr": args.learning_rate, "weight_decay": args.weight_decay, "base_lr": args.learning_rate}]
    extra = [p for p in loss_module.parameters()] if loss_module is not None else []
    if extra:
        groups.append({"params": extra, "lr": args.adaptive_weights_lr, "weight_decay": 0.0, "base_lr": args.adaptive_weights_lr})
    if args.update_clipping:
        return ClippedAdamW(groups, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps, threshold=args.update_clipping)
    return torch.optim.AdamW(groups, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps)


class ClippedAdamW(torch.optim.Optimizer):
    """AdamW whose step of each tensor is scaled down where its gradient is far above the tensor's
    running scale (update clipping, as in Adafactor and StableAdamW, Wortsman et al. 2023):

        m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2,   m^ = m / (1 - b1^t),   v^ = v / (1 - b2^t)
        rms = sqrt(mean(g^2 / max(v^, eps^2)))          (per tensor; v^ already holds this g)
        p <- p - lr / max(1, rms / threshold) * (m^ / (sqrt(v^) + eps) + weight_decay p)

    With rms <= threshold this is torch's AdamW step exactly. AdamW's step per element can reach
    (1 - b1) / sqrt(1 - b2) times the rate (3.2x at b2 0.999) when a gradient jumps above the
    scale v remembers; clipping bounds that without shortening v's memory, as a lower b2 would.
    The state keeps AdamW's names (step, exp_avg, exp_avg_sq), so `reset_moments` applies. Under
    FSDP a tensor is its local shard. `clipped` counts the tensors clipped since it was last read
    (a tensor, so that no step waits on the device)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, threshold: float = 1.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, threshold=threshold))
        self.clipped = torch.zeros(())
        self.updates = 0

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                state["step"] += 1
                t = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                v_hat = v / (1 - b2 ** t)
                rms = (g.square() / v_hat.clamp_min(group["eps"] ** 2)).mean().sqrt()
                ratio = (rms / group["threshold"]).clamp_min(1.0)
                self.clipped = self.clipped.to(ratio.device) + (ratio > 1).float()
                self.updates += 1
                update = (m / (1 - b1 ** t)).div_(v_hat.sqrt_().add_(group["eps"]))
                if group["weight_decay"]:
                    update.add_(p.float(), alpha=group["weight_decay"])
                p.sub_((update * (group["lr"] / ratio)).to(p.dtype))
        return loss

    def pop_clipped_fraction(self) -> torch.Tensor:
        """The fraction of tensor updates clipped since the last call (0 before any)."""
        fraction = self.clipped / max(self.updates, 1)
        self.clipped, self.updates = torch.zeros((), device=fraction.device), 0
        return fraction


def unwrapped(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer itself, through accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def reset_moments(optimizer: torch.optim.Optimizer) -> None:
    """Forget AdamW's moments and step counts; each parameter's state is rebuilt, bias correction
    included, at its next update."""
    unwrapped(optimizer).state.clear()


def set_learning_rate(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
