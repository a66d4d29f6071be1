"""The NPT layer.

A decoder layer computes, with m its residual multiplier (1 but for Granite) and each norm present
or not according to its placement (architecture.py: pre-norm Llama, sandwich Gemma 2/3, post-norm
OLMo 2/3):

    a   = Post_a(SelfAttn(Norm_a(h)))                                  the attention branch
    out = u + m Post_f(W_d(act(W_g Norm_f(u)) * W_u Norm_f(u))),  u = h + m a

The NPT layer drops the attention residual (u = h) and lets `a` modulate the gate weights per token:

    z      = c_a A a                   A:   d_model -> r
    v_m[j] = c_m B_m[j] z,  v_f[j] = c_f B_f[j] z      j = 1..k
    gamma  = b_g + r^-1/2 g . z        the gain (--gate_gain; 0 without it)
    x      = Norm_f(h)
    gate   = (1 + gamma) W_g x + s * sum_j v_f[j] (v_m[j] . x)
           == (W_g + dW) x,   dW = gamma W_g + s sum_j v_f[j] v_m[j]^T
    out    = h + m Post_f(W_d(act(gate) * W_u x))

(A, B_m, B_f, g, b_g trained; c_a, c_m, c_f fixed multipliers set per model, see NPTAdapter.)
The d_ffn x d_model delta is never materialised: the dot-product form above is exact and costs
O(k (d_model + d_ffn)) per token instead of O(d_model d_ffn). A fused gate-up projection
(Phi-3, GLM) runs as its one GEMM and the gate half is modulated as a view of its output.

Why the gain: the teacher's MLP reads Norm_f(h + a), the NPT layer's Norm_f(h); the ratio
rms(h) / rms(h + a) scales the teacher's whole gate input per token (0.73 +- 0.10 in the first
layer of the zoo's Gemma-3-style teacher, 0.92 +- 0.08 in the embedded default's), a change of W_g
by a multiple of itself, which no rank-k delta can make. Trained, the gain does more than undo
that ratio on the small zoo teachers: its constant part b_g ends between -0.09 and -0.93 (W_g
turned down to 7-91% of itself, so the modulation carries more of the gate), its per-token
part has a scale |g| / sqrt(r) of 0.03-0.45 (z has unit RMS); on the real SmolLM2-135M (top four
layers) it stays small, b_g -0.05 to -0.18, |g| / sqrt(r) 0.02-0.06. On the zoo (docs/zoo.md, at k = 16) the default with the gain against without it:
held-out KL 4-15% lower on every teacher, at 1.12-1.35x the free-running step on CPU at small
batches, a per-step cost that large batches amortise (docs/performance.md).
"""

from __future__ import annotations

import contextlib
import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend
from torch.utils.checkpoint import checkpoint

from .architecture import Wiring


class NPTAdapter(nn.Module):
    """Maps the attention output to k rank-1 modulations (v_m, v_f) of the gate weights, and
    (with a gain) to a per-token gain gamma of the whole gate weight matrix.

        z = c_a A a,   v_m[j] = c_m B_m[j] z,   v_f[j] = c_f B_f[j] z,   gamma = b_g + r^-1/2 g . z

    A, B_m and B_f are stored at unit scale (A and B_m drawn from N(0, 1), B_f exactly zero) and
    the fixed multipliers c_a, c_m, c_f (buffers, saved with the weights) carry each model's
    scales, so that one Adam step means the same relative change on every model: Adam moves each
    entry by about the learning rate whatever its scale, so a weight stored at the model's scale
    (attention outputs range over 1e-3 .. 1e+1 in RMS between models) would learn at a rate that
    depends on the model. `calibrate_` sets c_a and c_m so that z and v_m . x have unit RMS on real
    tokens, and c_f so that a B_f with unit entries moves the gate by its own RMS. Measured on a
    random-weight tiny Llama (gate RMS 0.16), the learning rate tuned on trained teachers made
    every loss type diverge with weights at the model's scale.

    B_f = 0 and a zero gain make a fresh adapter add nothing: the NPT layer starts as the teacher layer with its
    attention dropped. B_m starts random: were both zero, neither would ever receive a gradient
    (the delta is bilinear in them).
    """

    def __init__(self, d_model: int, d_ffn: int, rank: int, num_ranks: int, scale: float, gate_gain: bool = False):
        super().__init__()
        self.d_model, self.d_ffn, self.rank, self.num_ranks, self.scale = d_model, d_ffn, rank, num_ranks, scale
        self.A = nn.Linear(d_model, rank, bias=False)
        self.B_m = nn.Linear(rank, num_ranks * d_model, bias=False)
        self.B_f = nn.Linear(rank, num_ranks * d_ffn, bias=False)
        nn.init.normal_(self.A.weight)
        nn.init.normal_(self.B_m.weight)
        nn.init.zeros_(self.B_f.weight)
        # gamma = b_g + r^-1/2 g . z, zero at the start like B_f; None: the low-rank delta alone
        self.gain = nn.Linear(rank, 1) if gate_gain else None
        if self.gain is not None:
            nn.init.zeros_(self.gain.weight)
            nn.init.zeros_(self.gain.bias)
        # fan-in scaling until calibration: unit-RMS inputs give unit-RMS z and v_m entries
        self.register_buffer("c_a", torch.tensor(d_model**-0.5))
        self.register_buffer("c_m", torch.tensor(rank**-0.5))
        self.register_buffer("c_f", torch.tensor((num_ranks * rank) ** -0.5))

    def bottleneck(self, attn: torch.Tensor) -> torch.Tensor:
        """z = c_a A a, in the adapter's own (fp32) dtype: what every output of the adapter reads."""
        return self.c_a * self.A(attn.to(self.A.weight.dtype))

    def vectors(self, attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """v_m [..., k, d_model] and v_f [..., k, d_ffn], in the adapter's own (fp32) dtype."""
        z = self.bottleneck(attn)
        v_m = (self.c_m * self.B_m(z)).unflatten(-1, (self.num_ranks, self.d_model))
        v_f = (self.c_f * self.B_f(z)).unflatten(-1, (self.num_ranks, self.d_ffn))
        return v_m, v_f

    def gamma(self, attn: torch.Tensor) -> torch.Tensor:
        """The per-token gain [...] of W_g (zeros without --gate_gain), in the adapter's dtype."""
        z = self.bottleneck(attn)
        gamma = self._gamma(z)
        return torch.zeros_like(z[..., 0]) if gamma is None else gamma

    def _gamma(self, z: torch.Tensor) -> torch.Tensor | None:
        if self.gain is None:
            return None
        return self.gain(z * self.rank**-0.5).squeeze(-1)

    def forward(self, x: torch.Tensor | None, attn: torch.Tensor, gate: torch.Tensor | None = None,
                w_gate: torch.Tensor | None = None, regularizer: bool = True) -> tuple[torch.Tensor, torch.Tensor | None] | torch.Tensor:
        """The modulated gate (1 + gamma) W_g x + s * sum_j v_f[j] (v_m[j] . x), given `gate` = W_g x,
        and the per-token squared Frobenius norm of dW = gamma W_g + s * sum_j v_f[j] v_m[j]^T (the
        regulariser; `w_gate` = W_g is needed for it when there is a gain), without forming the
        matrix, nor even the vectors v_m, v_f per token:

            v_m[j] . x           = c_m (B_m[j]^T x) . z      one GEMM over all j
            sum_j coef_j v_f[j]  = c_f B_f (coef (x) z)       one GEMM, (x) the outer product
            v[j] . v[l]          = z^T (B[j]^T B[l]) z        r x r Gram matrices of the weights

        so the adapter costs O(k r (d_model + d_ffn)) per token and stores no [tokens, k, d_ffn]
        tensor. `vectors()` gives v_m, v_f explicitly (same values).

        `x` None: the regulariser alone (it depends on `attn` only). Called as the module, not as
        a method, so that a sharded (FSDP) adapter gathers its weights for it."""
        z = self.bottleneck(attn)
        gamma = self._gamma(z)
        if x is None:
            return self._frob2(z, gamma, w_gate)
        k, r, d, f = self.num_ranks, self.rank, self.d_model, self.d_ffn
        w_m = self.B_m.weight.view(k, d, r)
        w_f = self.B_f.weight.view(k, f, r)
        xb = F.linear(x.to(z.dtype), w_m.transpose(1, 2).reshape(k * r, d)).unflatten(-1, (k, r))  # B_m[j]^T x
        coef = self.c_m * (xb * z.unsqueeze(-2)).sum(-1)  # [..., k] = v_m[j] . x
        outer = (coef.unsqueeze(-1) * z.unsqueeze(-2)).flatten(-2)  # [..., k r]
        delta = ((self.scale * self.c_f) * F.linear(outer, w_f.transpose(0, 1).reshape(f, k * r))).to(gate.dtype)
        modulated = gate + delta if gamma is None else gate * (1.0 + gamma.unsqueeze(-1)).to(gate.dtype) + delta
        return modulated, (self._frob2(z, gamma, w_gate) if regularizer else None)

    def _frob2(self, z: torch.Tensor, gamma: torch.Tensor | None = None, w_gate: torch.Tensor | None = None) -> torch.Tensor:
        low_rank = self._low_rank_frob2(z)
        if gamma is None:
            return low_rank
        if w_gate is None:
            raise ValueError("The regulariser of an adapter with a gain needs the gate weight (w_gate).")
        # ||gamma W_g + L||^2 = gamma^2 ||W_g||^2 + 2 gamma <W_g, L> + ||L||^2, and
        # <W_g, L> = s sum_j v_f[j]^T W_g v_m[j] = s c_f c_m z^T (sum_j B_f[j]^T W_g B_m[j]) z:
        # one [r, r] matrix per step (k r d_model d_ffn), then r^2 per token
        k, d, f, r = self.num_ranks, self.d_model, self.d_ffn, self.rank
        w = w_gate.detach().to(z.dtype)
        wg_bm = torch.einsum("fd,kdr->kfr", w, self.B_m.weight.view(k, d, r))
        cross = torch.einsum("kfr,kfs->rs", self.B_f.weight.view(k, f, r), wg_bm)
        zz = (z.unsqueeze(-1) * z.unsqueeze(-2)).flatten(-2)
        inner = (self.scale * self.c_f * self.c_m) * (zz @ cross.flatten())
        return gamma.square() * w.square().sum() + 2.0 * gamma * inner + low_rank

    def _low_rank_frob2(self, z: torch.Tensor) -> torch.Tensor:
        k, d, f, r = self.num_ranks, self.d_model, self.d_ffn, self.rank
        w_m = self.B_m.weight.view(k, d, r)
        w_f = self.B_f.weight.view(k, f, r)
        # dots[j, l] = dots[l, j], so only pairs j <= l enter (off-diagonal ones counted twice): a
        # [tokens, r^2] x [r^2, k(k+1)/2] GEMM instead of [r^2] x [r^2, k^2]
        a, b = torch.triu_indices(k, k, device=z.device)
        twice = (a != b).to(z.dtype) + 1.0
        zz = (z.unsqueeze(-1) * z.unsqueeze(-2)).flatten(-2)  # [..., r^2]
        dots_m = zz @ _pair_gram(w_m, a, b)  # [..., k(k+1)/2]: v_m[j] . v_m[l] / c_m^2
        dots_f = zz @ _pair_gram(w_f, a, b)
        return (self.scale * self.c_m * self.c_f) ** 2 * ((dots_m * dots_f) @ twice)

    @torch.no_grad()
    def calibrate_(self, x: torch.Tensor, attn: torch.Tensor, gate: torch.Tensor) -> dict[str, float]:
        """Set the multipliers on a sample of real tokens: x = Norm2(h), attention outputs, and
        the gate pre-activations W_g x. Only scales change; B_f stays zero, so the student still
        starts at "attention dropped"."""
        z_rms = self.bottleneck(attn).pow(2).mean().sqrt().item()
        if math.isfinite(z_rms) and z_rms > 0.0:
            self.c_a.div_(z_rms)
        v_m, _ = self.vectors(attn)
        coef_rms = torch.einsum("...kd,...d->...k", v_m, x.to(v_m.dtype)).pow(2).mean().sqrt().item()
        if math.isfinite(coef_rms) and coef_rms > 0.0:
            self.c_m.div_(coef_rms)
        gate_rms = gate.float().pow(2).mean().sqrt().item()
        if math.isfinite(gate_rms) and gate_rms > 0.0:
            self.c_f.fill_(gate_rms / math.sqrt(self.num_ranks * self.rank))
        return {"z_rms": z_rms, "coef_rms": coef_rms, "gate_rms": gate_rms}


def _pair_gram(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[r^2, P]: the Gram blocks B[j]^T B[l] of w = [k, n, r] for the index pairs (a, b)."""
    k, n, r = w.shape
    gram = _Gram.apply(w.permute(1, 0, 2).reshape(n, k * r)).view(k, r, k, r).transpose(1, 2)  # [j, l, r, s]
    return gram[a, b].flatten(1).transpose(0, 1)


class _Gram(torch.autograd.Function):
    """M^T M for M = [n, c], with the backward of a symmetric product: d M = M (G' + G'^T), one
    GEMM where autograd's generic matmul backward takes two (one per operand). Splitting the
    product into triangular blocks, to skip the pairs j > l in the forward too, was measured slower
    on CPU (small GEMMs and the copies they need)."""

    @staticmethod
    def forward(ctx, m):
        ctx.save_for_backward(m)
        return m.transpose(0, 1) @ m

    @staticmethod
    def backward(ctx, grad):
        # under autocast the forward multiplied in the autocast dtype (grad's); the backward does too
        (m,) = ctx.saved_tensors
        return (m.to(grad.dtype) @ (grad + grad.transpose(0, 1))).to(m.dtype)


class NPTDecoderLayer(nn.Module):
    """Wraps an HF decoder layer: teacher behaviour or NPT behaviour on the same weights.

    `npt_enabled` selects which one runs. Either way the call goes through the wrapped layer's own
    `__call__` (its `forward` is dispatched here, per instance), so every hook on it sees what the
    layer returns in the current mode: HF's `output_hidden_states` recorder, which hooks the
    model's decoder-layer class, gets the NPT output in NPT mode, not nothing. In teacher mode
    the layer's own class `forward` runs (HF's exact computation, whatever its quirks).
    """

    def __init__(self, layer: nn.Module, adapter: NPTAdapter, layer_idx: int, wiring: Wiring):
        super().__init__()
        self.layer = layer
        self.wiring = wiring
        self.adapter = adapter
        self.layer_idx = layer_idx
        self.npt_enabled = True
        # Recompute this layer's student computation in backward instead of keeping its
        # activations (teacher-forced: the MLP and adapter; free-running: attention too).
        self.gradient_checkpointing = False
        self.compiled_output = None  # see compile_student()
        self._signature = inspect.signature(type(layer).forward)
        layer.forward = self._dispatch  # an instance attribute: the class's forward stays the teacher's

    def unwrap(self) -> nn.Module:
        """The original layer, its own forward restored."""
        self.layer.__dict__.pop("forward", None)
        return self.layer

    @property
    def self_attn(self) -> nn.Module:
        return self.layer.self_attn

    def forward(self, hidden_states: torch.Tensor, *args, npt_student_attn: torch.Tensor | None = None,
                npt_regularizer_of: torch.Tensor | None = None, **kwargs):
        """Teacher layer (npt_enabled False), NPT layer (True); given `npt_student_attn`, the
        teacher-forced student output and regulariser for input h and attention output a; given
        `npt_regularizer_of` (an attention output), the regulariser alone (a free-running step's:
        HF's decoder loop passes one tensor from layer to layer, so it is computed afterwards from
        the recorded attention outputs).

        The student computations go through this module's call (not a plain method) so that a
        sharded (FSDP) layer gathers its weights for them, and again for their backward."""
        if npt_student_attn is not None:
            return self.student_output(hidden_states, npt_student_attn)
        if npt_regularizer_of is not None:
            return self.adapter(None, npt_regularizer_of, w_gate=self.wiring.gate_weight(self.layer))
        return self.layer(hidden_states, *args, **kwargs)

    def _dispatch(self, hidden_states: torch.Tensor, *args, **kwargs):
        """The wrapped layer's forward in either mode."""
        if not self.npt_enabled:
            return type(self.layer).forward(self.layer, hidden_states, *args, **kwargs)
        if args:  # HF passes everything but the hidden states by keyword; be safe if a model does not
            bound = self._signature.bind(self.layer, hidden_states, *args, **kwargs)
            bound.arguments.pop("self")
            bound.arguments.pop("hidden_states")
            extra = bound.arguments.pop("kwargs", {})
            kwargs = {**bound.arguments, **extra}
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._npt_forward, hidden_states, use_reentrant=False, context_fn=_same_sdpa_backends, **kwargs)
        return self._npt_forward(hidden_states, **kwargs)

    def _npt_forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        # HF's decoder loop passes one tensor on: a regulariser computed here would be dropped (the
        # objective computes it from the recorded attention outputs), at the cost of its Gram and
        # cross terms, as much again as the one kept
        return self.npt_output(hidden_states, self.attention(hidden_states, **kwargs), regularizer=False)[0]

    def student_output(self, hidden_states: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`npt_output`, recomputed in backward when gradient checkpointing is on."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self.npt_output, hidden_states, attn, use_reentrant=False, context_fn=_same_sdpa_backends)
        return self.npt_output(hidden_states, attn)

    def attention(self, hidden_states: torch.Tensor, **attn_kwargs) -> torch.Tensor:
        """a = Post_a(SelfAttn(Norm_a(h))), with the same keyword arguments the decoder layer receives."""
        w, layer = self.wiring, self.layer
        out = layer.self_attn(hidden_states=w.apply(layer, w.attn_norm, hidden_states), **attn_kwargs)
        return w.apply(layer, w.attn_out_norm, out[0] if isinstance(out, tuple) else out)

    def mlp_input(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """x = Norm_f(h): what the (modulated) MLP reads."""
        return self.wiring.apply(self.layer, self.wiring.mlp_norm, hidden_states)

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """W_g x and W_u x (a fused projection: one GEMM, split as views)."""
        return self.wiring.gate_up(self.layer, x)

    def teacher_output(self, hidden_states: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The teacher layer rebuilt from its parts: u + m Post_f(MLP(Norm_f(u))), u = h + m a, with
        the MLP module's own forward (the conversion proof compares it with the layer's result)."""
        w, m = self.wiring, self.wiring.residual_multiplier
        u = hidden_states + m * attn
        return u + m * w.apply(self.layer, w.mlp_out_norm, self.layer.mlp(w.apply(self.layer, w.mlp_norm, u)))

    def compile_student(self, **options) -> None:
        """Run `npt_output` compiled from now on (both phases use it). The module's own forward
        is left alone: HF's loop, hooks and the teacher mode see the same module."""
        self.compiled_output = torch.compile(self._npt_output, **options)

    def npt_output(self, hidden_states: torch.Tensor, attn: torch.Tensor, regularizer: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The NPT layer's output for input h and attention output a, and the per-token
        regulariser (None when not asked for; compiled after `compile_student()`)."""
        return (self.compiled_output or self._npt_output)(hidden_states, attn, regularizer)

    def _npt_output(self, hidden_states: torch.Tensor, attn: torch.Tensor, regularizer: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`npt_output`, eager. When h does not require grad (teacher forcing), the frozen projections
        W_g x and W_u x record no autograd state, and the MLP tail W_d(act(gate) * up) is one
        autograd node that keeps one d_ffn-wide tensor for its backward."""
        w, mlp = self.wiring, self.layer.mlp
        x = self.mlp_input(hidden_states)
        gate, up = self.gate_up(x)
        gate, frob2 = self.adapter(x, attn, gate, self.wiring.gate_weight(self.layer), regularizer)
        act = w.activation(self.layer)
        if up.requires_grad or mlp.down_proj.weight.requires_grad:  # free-running, or a trainable MLP
            tail = mlp.down_proj(act(gate) * up)
        else:
            tail = _GatedDown.apply(gate, up, mlp.down_proj.weight, mlp.down_proj.bias, act)
        tail = w.apply(self.layer, w.mlp_out_norm, tail)
        if w.residual_multiplier != 1.0:
            tail = w.residual_multiplier * tail
        return hidden_states + tail, frob2

    def gate_weight_sq_norm(self) -> torch.Tensor:
        """||W_g||_F^2, the scale against which the regulariser is measured when it is normalised."""
        return self.wiring.gate_weight(self.layer).detach().float().pow(2).sum()


class _SDPABackends:
    """Enables exactly the given SDPA backends inside the block. Unlike `sdpa_kernel`, one object
    can be entered again, as a checkpoint's recompute context is under double backward."""

    _FLAGS = (
        (SDPBackend.FLASH_ATTENTION, torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.enable_flash_sdp),
        (SDPBackend.EFFICIENT_ATTENTION, torch.backends.cuda.mem_efficient_sdp_enabled, torch.backends.cuda.enable_mem_efficient_sdp),
        (SDPBackend.MATH, torch.backends.cuda.math_sdp_enabled, torch.backends.cuda.enable_math_sdp),
        (SDPBackend.CUDNN_ATTENTION, torch.backends.cuda.cudnn_sdp_enabled, torch.backends.cuda.enable_cudnn_sdp),
    )

    def __init__(self, backends: set):
        self.backends = backends
        self.saved: list[list[bool]] = []

    @classmethod
    def current(cls) -> "_SDPABackends":
        return cls({backend for backend, is_on, _ in cls._FLAGS if is_on()})

    def __enter__(self):
        self.saved.append([is_on() for _, is_on, _ in self._FLAGS])
        for backend, _, enable in self._FLAGS:
            enable(backend in self.backends)

    def __exit__(self, *exc):
        for (_, _, enable), was_on in zip(self._FLAGS, self.saved.pop()):
            enable(was_on)


def _same_sdpa_backends():
    """Checkpoint contexts: the recomputation in backward runs under the SDPA backends that were
    enabled for the forward. Otherwise a forward under `sdpa_kernel(MATH)` (the gradient
    penalty's, for its double backward) is replayed outside that block, another kernel saves
    tensors of other shapes, and the checkpoint refuses them."""
    return contextlib.nullcontext(), _SDPABackends.current()


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
