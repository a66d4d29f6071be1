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
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


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
        s * sum_j v_f[j] v_m[j]^T (the regulariser), without forming the matrix, nor even the
        vectors v_m, v_f per token:

            v_m[j] . x           = (B_m[j]^T x) . z          one GEMM over all j
            sum_j coef_j v_f[j]  = B_f (coef (x) z)           one GEMM, (x) the outer product
            v[j] . v[l]          = z^T (B[j]^T B[l]) z        r x r Gram matrices of the weights

        so the adapter costs O(k r (d_model + d_ffn)) per token and stores no [tokens, k, d_ffn]
        tensor. `vectors()` gives v_m, v_f explicitly (same values)."""
        k, r, d, f = self.num_ranks, self.rank, self.d_model, self.d_ffn
        w_m = self.B_m.weight.view(k, d, r)
        w_f = self.B_f.weight.view(k, f, r)
        z = self.A(attn.to(self.A.weight.dtype))
        xb = F.linear(x.to(z.dtype), w_m.transpose(1, 2).reshape(k * r, d)).unflatten(-1, (k, r))  # B_m[j]^T x
        coef = (xb * z.unsqueeze(-2)).sum(-1)  # [..., k] = v_m[j] . x
        outer = (coef.unsqueeze(-1) * z.unsqueeze(-2)).flatten(-2)  # [..., k r]
        delta = self.scale * F.linear(outer, w_f.transpose(0, 1).reshape(f, k * r))
        gram_m = torch.einsum("jdr,lds->jlrs", w_m, w_m)
        gram_f = torch.einsum("jfr,lfs->jlrs", w_f, w_f)
        zz = z.unsqueeze(-1) * z.unsqueeze(-2)  # [..., r, r]
        dots_m = torch.einsum("...rs,jlrs->...jl", zz, gram_m)  # v_m[j] . v_m[l]
        dots_f = torch.einsum("...rs,jlrs->...jl", zz, gram_f)
        frob2 = self.scale**2 * (dots_m * dots_f).sum(dim=(-1, -2))
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
        # Recompute this layer's student computation in backward instead of keeping its
        # activations (teacher-forced: the MLP and adapter; free-running: attention too).
        self.gradient_checkpointing = False
        # Set by run_student: the NPT forward then keeps its per-token regulariser here (the
        # decoder layer's output must stay a single tensor for HF's model loop).
        self.keep_regularizer = False
        self.last_regularizer: torch.Tensor | None = None
        self._signature = inspect.signature(layer.forward)

    @property
    def self_attn(self) -> nn.Module:
        return self.layer.self_attn

    def forward(self, hidden_states: torch.Tensor, *args, npt_student_attn: torch.Tensor | None = None, **kwargs):
        """Teacher layer (npt_enabled False), NPT layer (True), or, given `npt_student_attn`, the
        teacher-forced student output and regulariser for input h and attention output a.

        The student computation goes through this module's call (not a plain method) so that a
        sharded (FSDP) layer gathers its weights for it, and again for its backward."""
        if npt_student_attn is not None:
            return self.student_output(hidden_states, npt_student_attn)
        if not self.npt_enabled:
            return self.layer(hidden_states, *args, **kwargs)
        if args:  # HF passes everything but the hidden states by keyword; be safe if a model does not
            bound = self._signature.bind(hidden_states, *args, **kwargs)
            bound.arguments.pop("hidden_states")
            extra = bound.arguments.pop("kwargs", {})
            kwargs = {**bound.arguments, **extra}
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._npt_forward, hidden_states, use_reentrant=False, **kwargs)
        return self._npt_forward(hidden_states, **kwargs)

    def _npt_forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        out, frob2 = self.npt_output(hidden_states, self.attention(hidden_states, **kwargs))
        if self.keep_regularizer:
            self.last_regularizer = frob2
        return out

    def student_output(self, hidden_states: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`npt_output`, recomputed in backward when gradient checkpointing is on."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self.npt_output, hidden_states, attn, use_reentrant=False)
        return self.npt_output(hidden_states, attn)

    def attention(self, hidden_states: torch.Tensor, **attn_kwargs) -> torch.Tensor:
        """a = SelfAttn(Norm1(h)), with the same keyword arguments the decoder layer receives."""
        out = self.layer.self_attn(hidden_states=self.layer.input_layernorm(hidden_states), **attn_kwargs)
        return out[0] if isinstance(out, tuple) else out

    def npt_output(self, hidden_states: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The NPT layer's output for input h and attention output a, and the per-token
        regulariser. When h does not require grad (teacher forcing), the frozen projections
        W_g x and W_u x record no autograd state, and the MLP tail W_d(act(gate) * up) is one
        autograd node that keeps one d_ffn-wide tensor for its backward."""
        mlp = self.layer.mlp
        x = self.layer.post_attention_layernorm(hidden_states)
        gate = mlp.gate_proj(x)
        up = mlp.up_proj(x)
        delta, frob2 = self.adapter(x, attn)
        gate = gate + delta.to(gate.dtype)
        if up.requires_grad or mlp.down_proj.weight.requires_grad:  # free-running, or a trainable MLP
            tail = mlp.down_proj(mlp.act_fn(gate) * up)
        else:
            tail = _GatedDown.apply(gate, up, mlp.down_proj.weight, mlp.down_proj.bias, mlp.act_fn)
        return hidden_states + tail, frob2

    def gate_weight_sq_norm(self) -> torch.Tensor:
        """||W_g||_F^2, the scale against which the regulariser is measured when it is normalised."""
        return self.layer.mlp.gate_proj.weight.detach().float().pow(2).sum()



class _GatedDown(torch.autograd.Function):
    """W_d(act(gate) * up) + b_d, differentiated with respect to `gate` only.

    With teacher forcing, `up` = W_u x and W_d are constants, so autograd's generic graph would
    keep four d_ffn-wide tensors per layer (gate, act(gate), up, their product) for a gradient
    that needs one: d out / d gate = W_d^T(.) * up * act'(gate). That product is formed here in
    the forward (the activation's vector-Jacobian product with `up`, for any activation) and is
    all that is kept."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias, act):
        # Identity saved-tensor hooks shadow gradient checkpointing's: without them this small
        # inner graph's saved tensor would be dropped and recomputed by replaying the layer.
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            g = gate.detach().requires_grad_(True)
            a = act(g)
            (up_dact,) = torch.autograd.grad(a, g, up)
        ctx.save_for_backward(up_dact, weight)
        return F.linear(a.detach() * up, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        up_dact, weight = ctx.saved_tensors
        grad_gate = (grad_out @ weight.to(grad_out.dtype)).to(up_dact.dtype) * up_dact
        return grad_gate, None, None, None, None
