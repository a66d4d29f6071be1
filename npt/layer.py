"""The NPT layer.

A Llama-family decoder layer computes  out = h + a + MLP(Norm2(h + a)),  a = SelfAttn(Norm1(h)).
The NPT layer drops the attention residual and lets `a` modulate the gate weights per token:

    z      = A a                       A:   d_model -> r
    v_m[j] = B_m z,  v_f[j] = B_f z    j = 1..k
    x      = Norm2(h)
    gate   = W_g x + s * sum_j v_f[j] (v_m[j] . x)      == (W_g + s sum_j v_f[j] v_m[j]^T) x
    out    = h + W_d(act(gate) * W_u x)

The d_ffn x d_model delta is never materialised: the dot-product form above is exact and costs
O(k (d_model + d_ffn)) per token instead of O(d_model d_ffn).
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn


class NPTAdapter(nn.Module):
    """Maps the attention output to k rank-1 modulations (v_m, v_f) of the gate weights.

    B_f starts at exactly zero, so a fresh adapter adds nothing and the NPT layer starts as the
    teacher layer with its attention dropped. B_m starts random: were both zero, neither would
    ever receive a gradient (the delta is bilinear in them).
    """

    def __init__(self, d_model: int, d_ffn: int, rank: int, num_ranks: int = 1, scale: float = 1.0):
        super().__init__()
        self.d_model, self.d_ffn, self.rank, self.num_ranks, self.scale = d_model, d_ffn, rank, num_ranks, scale
        self.A = nn.Linear(d_model, rank, bias=False)
        self.B_m = nn.Linear(rank, num_ranks * d_model, bias=False)
        self.B_f = nn.Linear(rank, num_ranks * d_ffn, bias=False)
        nn.init.zeros_(self.B_f.weight)

    def vectors(self, attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """v_m [..., k, d_model] and v_f [..., k, d_ffn], in the adapter's own (fp32) dtype."""
        z = self.A(attn.to(self.A.weight.dtype))
        v_m = self.B_m(z).unflatten(-1, (self.num_ranks, self.d_model))
        v_f = self.B_f(z).unflatten(-1, (self.num_ranks, self.d_ffn))
        return v_m, v_f

    def forward(self, x: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate delta s * sum_j v_f[j] (v_m[j] . x) and the per-token squared Frobenius norm of
        s * sum_j v_f[j] v_m[j]^T (the regulariser), without forming the matrix."""
        v_m, v_f = self.vectors(attn)
        coef = torch.einsum("...kd,...d->...k", v_m, x.to(v_m.dtype))
        delta = self.scale * torch.einsum("...k,...kf->...f", coef, v_f)
        # ||sum_j v_f[j] v_m[j]^T||_F^2 = sum_{j,l} (v_f[j].v_f[l]) (v_m[j].v_m[l])
        gram_m = torch.einsum("...jd,...ld->...jl", v_m, v_m)
        gram_f = torch.einsum("...jf,...lf->...jl", v_f, v_f)
        frob2 = self.scale**2 * (gram_m * gram_f).sum(dim=(-1, -2))
        return delta, frob2

    @torch.no_grad()
    def calibrate_(self, x: torch.Tensor, attn: torch.Tensor) -> dict[str, float]:
        """Rescale A and B_m so that z and (v_m . x) have unit RMS on a sample of real tokens.

        Attention outputs of real models range over orders of magnitude (RMS 1e-3 .. 1e+1) and
        x = Norm2(h) has |x| ~ sqrt(d_model). With the default init, Adam's fixed-size steps then
        move the delta either far too slowly or far too fast. Calibration keeps z = A a exactly,
        only choosing the scale of the starting point, so the same learning rate works across
        models. B_f stays zero, so the student still starts at "attention dropped".
        """
        z = self.A(attn.to(self.A.weight.dtype))
        z_rms = z.pow(2).mean().sqrt().item()
        if not math.isfinite(z_rms) or z_rms == 0.0:
            return {"z_rms": z_rms, "coef_rms": float("nan")}
        self.A.weight.div_(z_rms)
        v_m, _ = self.vectors(attn)
        coef = torch.einsum("...kd,...d->...k", v_m, x.to(v_m.dtype))
        coef_rms = coef.pow(2).mean().sqrt().item()
        if math.isfinite(coef_rms) and coef_rms > 0.0:
            self.B_m.weight.div_(coef_rms)
        return {"z_rms": z_rms, "coef_rms": coef_rms}


class NPTDecoderLayer(nn.Module):
    """Wraps an HF decoder layer: teacher behaviour or NPT behaviour on the same weights.

    `npt_enabled` selects which one `forward` runs. The wrapped layer is kept whole, so in teacher
    mode its own forward runs (HF's exact computation, whatever its quirks), and forward hooks on
    it and on its `self_attn` see what they would see in the unconverted model.
    """

    def __init__(self, layer: nn.Module, adapter: NPTAdapter, layer_idx: int):
        super().__init__()
        self.layer = layer
        self.adapter = adapter
        self.layer_idx = layer_idx
        self.npt_enabled = True
        self._signature = inspect.signature(layer.forward)

    @property
    def self_attn(self) -> nn.Module:
        return self.layer.self_attn

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self.npt_enabled:
            return self.layer(hidden_states, *args, **kwargs)
        if args:  # HF passes everything but the hidden states by keyword; be safe if a model does not
            bound = self._signature.bind(hidden_states, *args, **kwargs)
            bound.arguments.pop("hidden_states")
            extra = bound.arguments.pop("kwargs", {})
            kwargs = {**bound.arguments, **extra}
        attn = self.attention(hidden_states, **kwargs)
        out, _ = self.npt_output(hidden_states, attn)
        return out

    def attention(self, hidden_states: torch.Tensor, **attn_kwargs) -> torch.Tensor:
        """a = SelfAttn(Norm1(h)), with the same keyword arguments the decoder layer receives."""
        out = self.layer.self_attn(hidden_states=self.layer.input_layernorm(hidden_states), **attn_kwargs)
        return out[0] if isinstance(out, tuple) else out

    def npt_output(self, hidden_states: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The NPT layer's output for input h and attention output a, and the per-token
        regulariser. When h does not require grad (teacher forcing), the frozen projections
        W_g x and W_u x record no autograd state: backward only goes through W_d, the activation
        and the adapter."""
        mlp = self.layer.mlp
        x = self.layer.post_attention_layernorm(hidden_states)
        gate = mlp.gate_proj(x)
        up = mlp.up_proj(x)
        delta, frob2 = self.adapter(x, attn)
        gate = gate + delta.to(gate.dtype)
        out = hidden_states + mlp.down_proj(mlp.act_fn(gate) * up)
        return out, frob2

    def gate_weight_sq_norm(self) -> torch.Tensor:
        """||W_g||_F^2, the scale against which the regulariser is measured when it is normalised."""
        return self.layer.mlp.gate_proj.weight.detach().float().pow(2).sum()

