"""The loss suite: a registry of per-layer alignment losses and the module that combines them.

Per converted layer i the student output S, target T and layer input h arrive as [N, d] float32
tensors of real tokens only (padding is removed before any loss sees it). Errors are measured in
units of the teacher's update: with `normalization="update"` (the default)

    e = (S - T) / sqrt(E) / temperature,     E = mean((T - h)^2)  (detached)

so mean(e^2) = ||S - T||^2 / ||T - h||^2 / temperature^2, whatever the scale of the model's hidden
states. (Measured: with hidden-state RMS 0.02-0.05 the first plain-MSE gradients fell below
Adam's eps and a layer stayed untrained for 1000 steps.) `normalization="none"` gives the plain
MSE. Dividing both hidden states by the temperature T, as the guide does, only rescales squared
errors by 1/T^2 and leaves the cosine untouched; a real softened-target term is the logit-level
KL offered by the objective.

Adding a loss is one decorated function:

    @register_loss("my_loss")
    def my_loss(layer: LayerTensors, cfg: LossConfig, temperature: float) -> torch.Tensor: ...
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.hf_argparser import HfArg

from .distributed import all_reduce_mean
from .errors import NPTError
from .schedules import curriculum_factor, distill_temperature
from .weighting import AdaptiveLayerWeights


@dataclasses.dataclass
class LossConfig:
    """The loss's arguments (the guide's names), for every layer and step."""

    loss_type: str = HfArg(default="improved_npt", help="Per-layer alignment loss: improved_npt, mse, focal_mse, smooth_l1_mse, or one registered with @register_loss.")
    use_adaptive_weights: bool = HfArg(default=False, help="Learnable, balancing softmax weights over layers.")
    use_gradient_penalty: bool = HfArg(default=False, help="Gradient penalty between adjacent converted layers.")
    mse_weight: float = HfArg(default=0.8, help="Weight of the MSE term (improved_npt, smooth_l1_mse).")
    cosine_weight: float = HfArg(default=0.2, help="Weight of the cosine term (improved_npt).")
    cosine_on: Literal["update", "hidden"] = HfArg(default="update", help="Cosine on the layer update (S-h vs T-h) or on whole hidden states.")
    loss_normalization: Literal["update", "none"] = HfArg(default="update", help="update: errors in units of the teacher's layer update (scale-free); none: raw MSE.")
    regularization_lambda: float = HfArg(default=0.01, help="Weight of the modulation-norm regulariser (times the curriculum factor).")
    gradient_penalty_lambda: float = HfArg(default=0.001, help="Weight of the gradient penalty (times the curriculum factor).")
    gradient_penalty_every: int = HfArg(default=1, help="Compute the gradient penalty on every k-th adjacent layer pair.")
    distill_temperature: float = HfArg(default=3.0, help="Temperature at step 0; falls to 1.0 when the curriculum ends.")
    curriculum_start: float = HfArg(default=0.5, help="Curriculum factor at step 0 (rises to 1.0).")
    curriculum_steps: str | None = HfArg(default=None, help="Curriculum length: a count, or a fraction of max_steps. Default: the warm-up.")
    focal_gamma: float = HfArg(default=2.0, help="Focusing exponent of focal_mse.")
    smooth_beta: float = HfArg(default=1.0, help="Beta of the smooth L1 term of smooth_l1_mse.")
    free_running_steps: str = HfArg(default="auto", help="Train the last N steps (a count, or a fraction of max_steps) with the student running freely, each NPT layer fed by the one below. auto: teacher forcing for twice the curriculum (the warm-up unless set), at most half the run; 20%% of the steps with the defaults.")
    logit_kl_weight: float = HfArg(default=1.0, help="Weight of T^2 * KL(teacher || student) of the next-token distributions at the curriculum temperature, in free-running steps.")
    reverse_kl_share: float = HfArg(default=0.0, help="Share b of the reverse KL(student || teacher) in the logit KL: (1 - b) forward + b reverse, in [0, 1]. The reverse KL is mode-seeking.")
    progressive_stages: int = HfArg(default=1, help="Convert the layers progressively, bottom-up: the free-running phase is split into N stages, and in stage s the lowest ceil(s n / N) of the n converted layers run as NPT layers, the rest as teacher layers (attention kept). 1: all at once. Evaluations always measure the whole student.")
    free_running_layer_weight: float = HfArg(default=0.0, help="Weight of the per-layer alignment terms in free-running steps (teacher-forced steps: 1); 0: the free-running phase trains on the logit KL alone. Running freely, layer i's error adds up those of every layer below.")
    free_running_layer_target: Literal["trajectory", "local"] = HfArg(default="trajectory", help="What a free-running step's per-layer term compares (with --free_running_layer_weight > 0). trajectory: layer i's output against the teacher's hidden state t_i, so layer i answers for the error of every layer below too. local: the NPT layer against its teacher layer on the same input, the student's own h_i (its attention output a_i detached), that layer's error alone and no gradient to the layers below; costs one more MLP forward and backward per layer.")

    def __post_init__(self):
        def need(ok: bool, cause: str, fix: str) -> None:
            if not ok:
                raise NPTError(cause, fix)

        need(self.loss_type in LOSSES, f"--loss_type {self.loss_type!r} is not a registered loss.", f"Use one of {', '.join(sorted(LOSSES))}.")
        for name in ("mse_weight", "cosine_weight", "regularization_lambda", "gradient_penalty_lambda", "focal_gamma", "logit_kl_weight", "free_running_layer_weight"):
            value = getattr(self, name)
            need(math.isfinite(value) and value >= 0, f"--{name} {value} is negative or not finite.", f"Pass --{name} >= 0.")
        need(self.progressive_stages >= 1, f"--progressive_stages {self.progressive_stages} must be at least 1.", "Pass 1 (all layers at once) or more stages.")
        need(0 <= self.reverse_kl_share <= 1, f"--reverse_kl_share {self.reverse_kl_share} is not a share.", "Pass a value in [0, 1] (0: the forward KL alone).")
        if self.loss_type == "improved_npt":
            need(self.mse_weight + self.cosine_weight > 0, "--mse_weight and --cosine_weight are both 0: improved_npt would train nothing.",
                 "Give at least one of them a positive weight (the guide: 0.8 and 0.2).")
        if self.loss_type == "smooth_l1_mse":
            need(self.mse_weight <= 1, f"--mse_weight {self.mse_weight} > 1 gives smooth_l1_mse a negative smooth-L1 weight.", "Pass --mse_weight in [0, 1] (the guide: 0.5).")
        need(self.smooth_beta > 0, f"--smooth_beta {self.smooth_beta} must be positive.", "Pass --smooth_beta > 0 (the guide: 1.0).")
        need(self.gradient_penalty_every >= 1, f"--gradient_penalty_every {self.gradient_penalty_every} must be at least 1.", "Pass --gradient_penalty_every >= 1.")
        need(self.distill_temperature >= 1, f"--distill_temperature {self.distill_temperature} < 1 would sharpen, not soften, targets.",
             "Pass --distill_temperature >= 1 (the guide: 2-5).")
        need(0 <= self.curriculum_start <= 1, f"--curriculum_start {self.curriculum_start} is outside [0, 1].", "Pass e.g. 0.5 (the guide's).")


@dataclasses.dataclass
class LayerTensors:
    student: torch.Tensor  # S  [N, d]
    target: torch.Tensor  # T  [N, d]
    inputs: torch.Tensor  # h  [N, d]
    scale: torch.Tensor  # unit of squared errors in the loss: E with update normalisation, else 1 (detached scalar)
    energy: torch.Tensor | None = None  # E = mean((T - h)^2), detached; the unit of the logged loss/mse (default: scale)

    def __post_init__(self):
        if self.energy is None:
            self.energy = self.scale

    def error(self, temperature: float = 1.0) -> torch.Tensor:
        return (self.student - self.target) / (self.scale.sqrt() * temperature)


LossFn = Callable[[LayerTensors, LossConfig, float], torch.Tensor]
LOSSES: dict[str, LossFn] = {}


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
    def deco(fn: LossFn) -> LossFn:
        LOSSES[name] = fn
        return fn

    return deco


def scaled_mse(layer: LayerTensors, temperature: float = 1.0) -> torch.Tensor:
    """The loss's MSE: mean(e^2), in units of `layer.scale`."""
    # F.mse_loss keeps only S and T (alive anyway) for its backward, no new [tokens, d] tensor
    return F.mse_loss(layer.student, layer.target) / (layer.scale * temperature**2)


def mse_ratio(layer: LayerTensors) -> torch.Tensor:
    """||S - T||^2 / ||T - h||^2: the logged loss/mse, whatever the loss's normalisation."""
    return F.mse_loss(layer.student, layer.target) / layer.energy


def cosine_distance(layer: LayerTensors, on: str = "update") -> torch.Tensor:
    """mean over tokens of 1 - cos. On whole hidden states the residual h, shared by S and T,
    dominates both vectors and compresses the signal (measured on the embedded teacher at
    initialisation: 1 - cos was 0.03-0.09 on hidden states but 0.05-0.62 on the layer updates, and
    it ranked the layers differently), so by default it is taken on the update, S - h vs T - h."""
    return _CosineDistance.apply(layer.student, layer.target, layer.inputs if on == "update" else None)


class _CosineDistance(torch.autograd.Function):
    """mean_t (1 - cos(S_t - h_t, T_t - h_t)) (h None: cos(S_t, T_t)), differentiated w.r.t. S.

    Autograd's generic graph would keep S - h, T - h and their norms, new [tokens, d] tensors per
    layer; this keeps only S, T and h, which are alive anyway, and recomputes in backward."""

    EPS = 1e-12

    @staticmethod
    def _parts(s, t, h):
        u, v = (s, t) if h is None else (s - h, t - h)
        nu = u.norm(dim=-1).clamp_min(_CosineDistance.EPS)
        nv = v.norm(dim=-1).clamp_min(_CosineDistance.EPS)
        return u, v, nu, nv, (u * v).sum(-1) / (nu * nv)

    @staticmethod
    def forward(ctx, s, t, h):
        ctx.save_for_backward(s, t, h)
        return (1.0 - _CosineDistance._parts(s, t, h)[-1]).mean()

    @staticmethod
    def backward(ctx, grad):
        s, t, h = ctx.saved_tensors
        u, v, nu, nv, cos = _CosineDistance._parts(s, t, h)
        # d cos / d u = v / (|u||v|) - cos * u / |u|^2
        dcos = v / (nu * nv).unsqueeze(-1) - (cos / nu.pow(2)).unsqueeze(-1) * u
        return -grad / cos.numel() * dcos, None, None


@register_loss("mse")
def mse_loss(layer: LayerTensors, cfg: LossConfig, temperature: float) -> torch.Tensor:
    """Plain (normalised) MSE: the baseline."""
    return scaled_mse(layer, temperature)


@register_loss("improved_npt")
def improved_npt_loss(layer: LayerTensors, cfg: LossConfig, temperature: float) -> torch.Tensor:
    """mse_weight * MSE(S/T, T/T) + cosine_weight * (1 - cos)."""
    return cfg.mse_weight * scaled_mse(layer, temperature) + cfg.cosine_weight * cosine_distance(layer, cfg.cosine_on)


@register_loss("focal_mse")
def focal_mse_loss(layer: LayerTensors, cfg: LossConfig, temperature: float) -> torch.Tensor:
    """mean(stopgrad(e^2)^(gamma/2) * e^2): large errors weigh more, easy elements less."""
    e2 = layer.error(temperature).pow(2)
    return (e2.detach().pow(cfg.focal_gamma / 2) * e2).mean()


@register_loss("smooth_l1_mse")
def smooth_l1_mse_loss(layer: LayerTensors, cfg: LossConfig, temperature: float) -> torch.Tensor:
    """mse_weight * MSE + (1 - mse_weight) * SmoothL1_beta: quadratic near 0, linear for outliers."""
    e = layer.error(temperature)
    smooth = F.smooth_l1_loss(e, torch.zeros_like(e), beta=cfg.smooth_beta)
    return cfg.mse_weight * e.pow(2).mean() + (1.0 - cfg.mse_weight) * smooth


@dataclasses.dataclass
class LossOutput:
    objective: torch.Tensor  # what backward() is called on (total + the weights' balance loss)
    metrics: dict[str, torch.Tensor]  # detached scalars and per-layer vectors (no host sync)
    curriculum_factor: float
    temperature: float


class NPTLoss(nn.Module):
    """Combines per-layer alignment terms, layer weights, curriculum, regulariser and gradient
    penalty. Its only parameters are the adaptive layer weights (when enabled)."""

    def __init__(self, cfg: LossConfig, num_layers: int, curriculum_steps: int = 0):
        super().__init__()
        self.cfg = cfg
        self.loss_fn = LOSSES[cfg.loss_type]
        self.num_layers = num_layers
        self.curriculum_steps = curriculum_steps
        self.adaptive = AdaptiveLayerWeights(num_layers) if cfg.use_adaptive_weights else None

    def schedule(self, step: int) -> tuple[float, float]:
        c = curriculum_factor(step, self.curriculum_steps, self.cfg.curriculum_start)
        return c, distill_temperature(c, self.cfg.distill_temperature, self.cfg.curriculum_start)

    def forward(
        self,
        layers: list[LayerTensors],
        regularization: torch.Tensor,
        grad_penalty: torch.Tensor | None,
        step: int,
        logit_kl: torch.Tensor | None = None,
        free_running: bool = False,
    ) -> LossOutput:
        cfg = self.cfg
        c, temperature = self.schedule(step)
        layer_loss = torch.stack([self.loss_fn(layer, cfg, temperature) for layer in layers])
        if self.adaptive is not None:
            weights = self.adaptive.weights()
            alignment = (weights.detach() * layer_loss).sum()
            balance = self.adaptive.balance_loss(all_reduce_mean(layer_loss.detach()))  # the global batch's layer losses
        else:
            weights = torch.full_like(layer_loss, 1.0 / len(layers))
            alignment = layer_loss.mean()
            balance = None
        reg = regularization.mean()
        total = (cfg.free_running_layer_weight if free_running else 1.0) * alignment + c * cfg.regularization_lambda * reg
        gp = grad_penalty if grad_penalty is not None else torch.zeros((), device=total.device)
        if grad_penalty is not None:
            total = total + c * cfg.gradient_penalty_lambda * grad_penalty
        if logit_kl is not None:
            total = total + cfg.logit_kl_weight * logit_kl
        objective = total if balance is None else total + balance

        with torch.no_grad():
            layer_mse = torch.stack([mse_ratio(layer) for layer in layers])
            layer_cos = torch.stack([cosine_distance(layer, cfg.cosine_on) for layer in layers])
        metrics = {
            "total": total.detach(),
            "alignment": alignment.detach(),
            "mse": layer_mse.mean(),
            "cosine": layer_cos.mean(),
            "regularization": reg.detach(),
            "grad_penalty": gp.detach(),
            "layer_loss": layer_loss.detach(),
            "layer_mse": layer_mse,
            "layer_cosine": layer_cos,
            "layer_weight": weights.detach(),
            "layer_regularization": regularization.detach(),
        }
        if logit_kl is not None:
            metrics["logit_kl"] = logit_kl.detach()
        if self.adaptive is not None:
            metrics["weight_temperature"] = self.adaptive.temperature.detach()
            metrics["weight_balance"] = balance.detach()
        return LossOutput(objective, metrics, c, temperature)
