"""Adaptive layer weights that balance instead of collapsing.

The guide's weights are learnable, softmax-normalised, with a learnable temperature. Trained on
the alignment loss itself (sum_i p_i L_i) they collapse onto the easiest layer: the minimum of a
linear function over the simplex is a vertex (measured on the original code: weights -> one-hot,
temperature -> 0.005).

Here the weights get their own objective, uncertainty weighting (Kendall et al. 2018) restricted
to the simplex:

    J(p) = sum_i p_i l_i - (1/n) sum_i log p_i,     l_i = L_i * mean_j(1 / L_j)   (L detached)

J is convex in p, and its minimum over the simplex is exactly p_i = (1/L_i) / sum_j (1/L_j): every
weighted contribution p_i L_i is then the same, a layer with a small loss scale is not drowned
by one with a large scale, and no weight reaches 0 or 1 while every L_i is finite and positive.
The normalisation of l makes J independent of the overall loss scale. The adapters are trained on
sum_i stopgrad(p_i) L_i, so the weights never pull the layers' losses apart, and the weights
never see the adapters' gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AdaptiveLayerWeights(nn.Module):
    def __init__(self, num_layers: int):
        super().__init__()
        self.layer_weights = nn.Parameter(torch.ones(num_layers))
        # temperature = exp(log_temperature) stays positive whatever the optimizer does (init 1.0).
        # One element, not a scalar: FSDP cannot shard 0-dim parameters.
        self.log_temperature = nn.Parameter(torch.zeros(1))

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()[0]

    def log_weights(self) -> torch.Tensor:
        return F.log_softmax(self.layer_weights / self.temperature, dim=0)

    def weights(self) -> torch.Tensor:
        return self.log_weights().exp()

    def balance_loss(self, layer_losses: torch.Tensor) -> torch.Tensor:
        """J(p) above; gradients reach only the weights and the temperature."""
        losses = layer_losses.detach().float().clamp_min(1e-12)
        scaled = losses * losses.reciprocal().mean()
        log_p = self.log_weights()
        return (log_p.exp() * scaled).sum() - log_p.mean()
