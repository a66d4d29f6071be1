"""The NPT layer.

A decoder layer computes, with m its residual multiplier (1 but for Granite) and each norm present
or not according to its placement (architecture.py: pre-norm Llama, sandwich Gemma 2/3, post-norm
OLMo 2/3):

    a   = Post_a(SelfAttn(Norm_a(h)))                                  the attention branch
    out = u + m Post_f(W_d(act(W_g Norm_f(u) + b_g) * (W_u Norm_f(u) + b_u)) + b_d),  u = h + m a

The NPT layer drops the attention residual (u = h) and lets `a` modulate the MLP's weights per
token (`modulate`: the gate; the gate and up, "dual"; gate, up and down, "triple"):

    z      = c_a A a' + e              A:   d_model -> r, shared by every modulated projection; e with --bottleneck_bias, else 0
                                       a' = a, or a / rms(h) with --adapter_input relative
    x      = Norm_f(h)
    gate   = (1 + gamma_g) W_g x + b_g + s sum_j v_f[j] (v_m[j] . x)     == (W_g + dW_g) x + b_g
    up     = (1 + gamma_u) W_u x + b_u + s sum_j u_f[j] (u_m[j] . x)     == (W_u + dW_u) x + b_u   (dual, triple; else W_u x + b_u)
    y      = act(gate) * up
    mlp    = W_d y + b_d + s sum_j w_f[j] (w_m[j] . y)                   == (W_d + dW_d) y + b_d   (triple; else W_d y + b_d)
    out    = h + m Post_f(mlp)

    v_m[j] = c_m B_m[j] z,  v_f[j] = c_f B_f[j] z  (j = 1..k; u, w likewise, each with its own B_m, B_f, c_m, c_f)
    gamma  = b + r^-1/2 g . z          per projection that reads x (gate, up), with --gate_gain; 0 without
    dW     = gamma W + s sum_j v_f[j] v_m[j]^T                           the per-token delta of each matrix

(A, B_m, B_f, g, b, e trained; c_a, c_m, c_f fixed multipliers set per model, see NPTAdapter.) The
teacher's counterpart of each: W_g, W_u read Norm_f(h + m a), W_d reads the hidden that input
makes, and the residual adds m a; the NPT layer has only h, and the deltas carry what a changed.
No d_out x d_in delta is ever materialised: the dot-product form above is exact and costs
O(k (d_in + d_out)) per token and matrix instead of O(d_in d_out). A fused gate-up projection
(Phi-3, GLM) runs as its one GEMM and its halves are modulated as views of its output.

Why the bottleneck bias: without e each rank-1 term, v_f[j] (v_m[j] . x), is the product of two
linear functions of a, so the modulation is the same for a and -a (even in a); only the gain is odd.
The teacher's response to its attention output is to first order linear in it (the residual adds
m a; Norm_f(h + m a) moves with a). With e the term is a full quadratic in a: its linear part,
v_f[j](a) (v_m[j](e) . x) + v_f[j](e) (v_m[j](a) . x), can point anywhere B_f spans.

Why a relative input: the teacher's MLP reads Norm_f(h + m a) = Norm_f(h / rms(h) + m a / rms(h)),
so what its attention output changes there is a / rms(h), the attention output in units of the
residual stream; a bottleneck that reads a alone sees one token's a at whatever scale its residual
stream has (in deep models rms(h) varies per token and grows with depth), the same a where it
moves the teacher's MLP input much and where it moves it little. Both ways the layer is as costly.
It is not the default: the teacher's output also holds the residual m a in absolute units, which
the down modulation writes from z, and a relative z has lost that scale (measured: docs/ablation.md).

Why the gain: the teacher's MLP reads Norm_f(h + a), the NPT layer's Norm_f(h); the ratio
rms(h) / rms(h + a) scales the teacher's whole gate and up input per token, a change of W_g and
W_u by a multiple of themselves, which no rank-k delta can make. It scales W x, not the bias. The
down projection reads y, which no such ratio scales: it has no gain. What the gain and the
variants buy, and cost, is measured in docs/zoo.md, docs/performance.md and CHANGELOG.md.
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
from .errors import NPTError


MODULATED = ("gate", "up", "down")  # the projections an adapter can modulate, in this order
ADAPTER_INPUTS = ("attention", "relative")  # what the bottleneck reads: a, or a / rms(h)


def parse_modulate(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """'gate', 'gate,up', 'gate,up,down' (or a list) -> the projections, in canonical order."""
    names = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else [str(p) for p in spec]
    bad = [p for p in names if p not in MODULATED]
    if bad or "gate" not in names or len(set(names)) != len(names):
        raise NPTError(f"--modulate {spec!r}: expected the gate and any of up, down, each once (e.g. gate, gate,up or gate,up,down).",
                       "Pass --modulate gate (the original NPT), gate,up (dual) or gate,up,down (triple, the default).")
    return tuple(p for p in MODULATED if p in names)


class Modulation(nn.Module):
    """A rank-k modulation of one projection W [d_out, d_in], read from the bottleneck z:

        v_m[j] = c_m B_m[j] z,   v_f[j] = c_f B_f[j] z,   gamma = b + r^-1/2 g . z  (with a gain)
        W x + b  ->  (1 + gamma) W x + b + s sum_j v_f[j] (v_m[j] . x)
                  == (W + dW) x + b,   dW = gamma W + s sum_j v_f[j] v_m[j]^T

    The gain scales W x, not the bias (a gain of W). B_m and B_f are stored at unit scale (B_m
    drawn from N(0, 1), B_f exactly zero: a fresh modulation adds nothing); the fixed multipliers
    c_m, c_f carry the model's scales (see NPTAdapter)."""

    def __init__(self, d_in: int, d_out: int, rank: int, num_ranks: int, scale: float, gain: bool = False, attn_dim: int | None = None):
        super().__init__()
        self.d_in, self.d_out, self.rank, self.num_ranks, self.scale = d_in, d_out, rank, num_ranks, scale
        # `attn_dim`: the adapter's bottleneck A (attn_dim -> r) is made here, first, so that the
        # random draws, the parameter order and the buffers of a gate-only adapter stay what every
        # saved adapter and checkpoint was made with
        if attn_dim is not None:
            self.A = nn.Linear(attn_dim, rank, bias=False)
        self.B_m = nn.Linear(rank, num_ranks * d_in, bias=False)
        self.B_f = nn.Linear(rank, num_ranks * d_out, bias=False)
        if attn_dim is not None:
            nn.init.normal_(self.A.weight)
        nn.init.normal_(self.B_m.weight)
        nn.init.zeros_(self.B_f.weight)
        # gamma = b + r^-1/2 g . z, zero at the start like B_f; None: the low-rank delta alone
        self.gain = nn.Linear(rank, 1) if gain else None
        if self.gain is not None:
            nn.init.zeros_(self.gain.weight)
            nn.init.zeros_(self.gain.bias)
        # fan-in scaling until calibration: unit-RMS inputs give unit-RMS z and v_m . x
        if attn_dim is not None:
            self.register_buffer("c_a", torch.tensor(attn_dim**-0.5))
        self.register_buffer("c_m", torch.tensor(rank**-0.5))
        self.register_buffer("c_f", torch.tensor((num_ranks * rank) ** -0.5))

    def forward(self, x: torch.Tensor, z: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`modulate`, called as a module (a sharded modulation gathers its weights for it)."""
        return self.modulate(x, z, out, bias)

    def modulate(self, x: torch.Tensor, z: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The modulated projection (1 + gamma) W x + b + s sum_j v_f[j] (v_m[j] . x), given `out` =
        W x + b (`bias` = b, to keep the gain off it), without forming the matrix, nor even the
        vectors v_m, v_f per token:

            v_m[j] . x           = c_m (B_m[j]^T x) . z      one GEMM over all j
            sum_j coef_j v_f[j]  = c_f B_f (coef (x) z)       one GEMM, (x) the outer product

        so a modulation costs O(k r (d_in + d_out)) per token and stores no [tokens, k, d_out]
        tensor. `terms()` gives v_m, v_f explicitly (same values); the regulariser ||dW||_F^2 comes
        from r x r Gram matrices of the weights (`frob2_forms`, `frob2_from`)."""
        gamma = self.gain_of(z)
        k, r, d, f = self.num_ranks, self.rank, self.d_in, self.d_out
        w_m = self.B_m.weight.view(k, d, r)
        w_f = self.B_f.weight.view(k, f, r)
        xb = F.linear(x.to(z.dtype), w_m.transpose(1, 2).reshape(k * r, d)).unflatten(-1, (k, r))  # B_m[j]^T x
        coef = self.c_m * (xb * z.unsqueeze(-2)).sum(-1)  # [..., k] = v_m[j] . x
        outer = (coef.unsqueeze(-1) * z.unsqueeze(-2)).flatten(-2)  # [..., k r]
        delta = ((self.scale * self.c_f) * F.linear(outer, w_f.transpose(0, 1).reshape(f, k * r))).to(out.dtype)
        if gamma is None:
            modulated = out + delta
        elif bias is None:
            modulated = out * (1.0 + gamma.unsqueeze(-1)).to(out.dtype) + delta
        else:  # the gain scales W x, not the bias
            modulated = (out - bias) * (1.0 + gamma.unsqueeze(-1)).to(out.dtype) + bias + delta
        return modulated

    def terms(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """v_m [..., k, d_in] and v_f [..., k, d_out] for the bottleneck z."""
        v_m = (self.c_m * self.B_m(z)).unflatten(-1, (self.num_ranks, self.d_in))
        v_f = (self.c_f * self.B_f(z)).unflatten(-1, (self.num_ranks, self.d_out))
        return v_m, v_f

    def gain_of(self, z: torch.Tensor) -> torch.Tensor | None:
        """gamma [...] for the bottleneck z (None without a gain)."""
        if self.gain is None:
            return None
        return self.gain(z * self.rank**-0.5).squeeze(-1)

    def frob2_forms(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """[r^2, n]: the per-token ||dW||_F^2 is a function of n quadratic forms z^T Q z, one
        column vec(Q) each (`frob2_from` combines them), made once per step from the weights:

            ||L||^2  = s^2 c_m^2 c_f^2 sum_{j,l} (z^T B_m[j]^T B_m[l] z) (z^T B_f[j]^T B_f[l] z)
            <W, L>   = s c_f c_m z^T (sum_j B_f[j]^T W B_m[j]) z                (with a gain)
            ||gamma W + L||^2 = gamma^2 ||W||^2 + 2 gamma <W, L> + ||L||^2

        The pairs j <= l only enter (the products are symmetric in j, l)."""
        k, d, f, r = self.num_ranks, self.d_in, self.d_out, self.rank
        w_m = self.B_m.weight.view(k, d, r)
        w_f = self.B_f.weight.view(k, f, r)
        a, b = torch.triu_indices(k, k, device=w_m.device)
        forms = [_pair_gram(w_m, a, b), _pair_gram(w_f, a, b)]  # [r^2, k(k+1)/2] each
        if self.gain is not None:
            if weight is None:
                raise ValueError("The regulariser of a modulation with a gain needs the projection's weight.")
            # one [r, r] matrix per step (k r d_in d_out), then r^2 per token
            w_bm = torch.einsum("fd,kdr->kfr", weight.detach().to(w_m.dtype), w_m)
            forms.append(torch.einsum("kfr,kfs->rs", w_f, w_bm).reshape(r * r, 1))
        return torch.cat(forms, 1)

    def frob2_from(self, forms: torch.Tensor, gamma: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The per-token ||dW||_F^2 from the values of `frob2_forms`'s quadratic forms [..., n]."""
        k = self.num_ranks
        pairs = k * (k + 1) // 2
        a, b = torch.triu_indices(k, k, device=forms.device)
        twice = (a != b).to(forms.dtype) + 1.0  # an off-diagonal pair stands for (j, l) and (l, j)
        low_rank = (self.scale * self.c_m * self.c_f) ** 2 * ((forms[..., :pairs] * forms[..., pairs : 2 * pairs]) @ twice)
        if gamma is None:
            return low_rank
        inner = (self.scale * self.c_f * self.c_m) * forms[..., 2 * pairs]
        return gamma.square() * weight.detach().to(forms.dtype).square().sum() + 2.0 * gamma * inner + low_rank

    @torch.no_grad()
    def calibrate_terms_(self, x: torch.Tensor, z: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
        """c_m so that v_m . x has unit RMS on real tokens, c_f so that a B_f with unit entries
        moves the projection by its own RMS (x: its input, out: its output W x + b)."""
        v_m, _ = self.terms(z)
        coef_rms = torch.einsum("...kd,...d->...k", v_m, x.to(v_m.dtype)).pow(2).mean().sqrt().item()
        if math.isfinite(coef_rms) and coef_rms > 0.0:
            self.c_m.div_(coef_rms)
        out_rms = out.float().pow(2).mean().sqrt().item()
        if math.isfinite(out_rms) and out_rms > 0.0:
            self.c_f.fill_(out_rms / math.sqrt(self.num_ranks * self.rank))
        return {"coef_rms": coef_rms, "out_rms": out_rms}


class NPTAdapter(Modulation):
    """Maps the attention output to a bottleneck z and, from it, to the modulation of the gate
    weights (this module's own B_m, B_f, gain) and, with `modulate`, of the up projection (`up`)
    and of the down projection (`down`), each a `Modulation`:

        z = c_a A a (+ e)             a: the attention output, or a / rms(h) (`adapter_input`, read by the layer)
        gate:  W_g x + b_g        -> (1 + gamma_g) W_g x + b_g + s sum_j v_f[j] (v_m[j] . x)     x = Norm_f(h)
        up:    W_u x + b_u        -> (1 + gamma_u) W_u x + b_u + s sum_j u_f[j] (u_m[j] . x)     (dual, triple)
        down:  W_d y + b_d        ->  W_d y + b_d + s sum_j w_f[j] (w_m[j] . y)                 (triple; y = act(gate) * up)

    The projections share the bottleneck z (one A): each has its own k rank-1 terms. The gain
    applies to the projections that read Norm_f(h), gate and up: the teacher's MLP reads
    Norm_f(h + a), whose ratio rms(h) / rms(h + a) scales both per token. Down reads the MLP's
    hidden y, which no such ratio scales; its modulation writes directly in d_model space, where
    the dropped attention residual lived.

    A, B_m and B_f are stored at unit scale (A and B_m drawn from N(0, 1), B_f exactly zero) and
    the fixed multipliers c_a, c_m, c_f (buffers, saved with the weights) carry each model's
    scales, so that one Adam step means the same relative change on every model: Adam moves each
    entry by about the learning rate whatever its scale, so a weight stored at the model's scale
    (attention outputs range over 1e-3 .. 1e+1 in RMS between models) would learn at a rate that
    depends on the model. `calibrate_` sets c_a and c_m so that z and v_m . x have unit RMS on real
    tokens, and c_f so that a B_f with unit entries moves the projection by its own RMS. Measured on a
    random-weight tiny Llama (gate RMS 0.16), the learning rate tuned on trained teachers made
    every loss type diverge with weights at the model's scale.

    B_f = 0 and zero gains make a fresh adapter add nothing: the NPT layer starts as the teacher
    layer with its attention dropped. B_m starts random: were both zero, neither would ever
    receive a gradient (the delta is bilinear in them).
    """

    def __init__(self, d_model: int, d_ffn: int, rank: int, num_ranks: int, scale: float, gate_gain: bool = False,
                 modulate: tuple[str, ...] | str = ("gate",), bottleneck_bias: bool = False, adapter_input: str = "attention"):
        super().__init__(d_model, d_ffn, rank, num_ranks, scale, gate_gain, attn_dim=d_model)
        self.d_model, self.d_ffn = d_model, d_ffn
        if adapter_input not in ADAPTER_INPUTS:
            raise NPTError(f"--adapter_input {adapter_input!r} is not one of {', '.join(ADAPTER_INPUTS)}.",
                           "Pass --adapter_input attention (a, the original NPT) or relative (a / rms(h)).")
        self.adapter_input = adapter_input
        self.modulated = parse_modulate(modulate)
        self.up = Modulation(d_model, d_ffn, rank, num_ranks, scale, gate_gain) if "up" in self.modulated else None
        self.down = Modulation(d_ffn, d_model, rank, num_ranks, scale) if "down" in self.modulated else None
        # e in z = c_a A a + e, at unit scale like z; zero: a fresh adapter's z is what it was without
        self.z_bias = nn.Parameter(torch.zeros(rank)) if bottleneck_bias else None

    def modulation(self, name: str) -> Modulation:
        """The modulation of projection `name` (gate: this module's own)."""
        return self if name == "gate" else getattr(self, name)

    def bottleneck(self, attn: torch.Tensor) -> torch.Tensor:
        """z = c_a A a (+ e with a bottleneck bias), from the attention output cast to the adapter's
        dtype (fp32; under autocast the product is bf16): what every output of the adapter reads."""
        z = self.c_a * self.A(attn.to(self.A.weight.dtype))
        return z if self.z_bias is None else z + self.z_bias.to(z.dtype)

    def vectors(self, attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate's v_m [..., k, d_model] and v_f [..., k, d_ffn], in the adapter's own (fp32) dtype."""
        return self.terms(self.bottleneck(attn))

    def gamma(self, attn: torch.Tensor) -> torch.Tensor:
        """The per-token gain [...] of W_g (zeros without --gate_gain), in the adapter's dtype."""
        z = self.bottleneck(attn)
        gamma = self.gain_of(z)
        return torch.zeros_like(z[..., 0]) if gamma is None else gamma

    def forward(self, method: str, *args):
        """`adapter("modulate_inputs", ...)`, `adapter("modulate_down", ...)`, `adapter("regularizer",
        ...)`: the named method, run through the module's call so that a sharded (FSDP) adapter
        gathers its weights for it (and again for its backward)."""
        return getattr(self, method)(*args)

    def modulate_inputs(self, x: torch.Tensor, attn: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, weights: dict,
                        regularizer: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The modulated gate and up pre-activations from `gate` = W_g x + b_g and `up` = W_u x + b_u
        (up as it is unless modulated), the bottleneck z (for the down modulation) and the
        per-token regulariser of these (None when not asked for). `weights`: {"gate": (W_g, b_g),
        "up": (W_u, b_u)}."""
        z = self.bottleneck(attn)
        gate = self.modulate(x, z, gate, weights["gate"][1])
        if self.up is not None:
            up = self.up.modulate(x, z, up, weights["up"][1])
        return gate, up, z, (self.frob2_all(z, weights) if regularizer else None)

    def modulate_down(self, y: torch.Tensor, z: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """W_d y + b_d (`down`) with the down modulation added (its regulariser is in
        `modulate_inputs`': it depends on z alone)."""
        return self.down.modulate(y, z, down)

    def regularizer(self, attn: torch.Tensor, weights: dict) -> torch.Tensor:
        """The per-token regulariser alone, sum over the modulated matrices of ||dW||_F^2 (it
        depends on `attn` only). Called through the module (`NPTDecoderLayer.regularizer`)."""
        return self.frob2_all(self.bottleneck(attn), weights)

    def frob2_all(self, z: torch.Tensor, weights: dict) -> torch.Tensor:
        """sum over the modulated matrices of the per-token ||dW||_F^2: every matrix's quadratic
        forms in z evaluated at once, from one set of z's pairwise products (`quadratic_forms`), the
        part of the regulariser that grows as r^2."""
        mods = [(self, weights["gate"][0])]
        if self.up is not None:
            mods.append((self.up, weights["up"][0]))
        if self.down is not None:
            mods.append((self.down, None))
        forms = [m.frob2_forms(w) for m, w in mods]
        values = quadratic_forms(z, torch.cat(forms, 1)).split([f.shape[1] for f in forms], -1)
        return sum(m.frob2_from(v, m.gain_of(z), w) for (m, w), v in zip(mods, values))

    @torch.no_grad()
    def calibrate_(self, x: torch.Tensor, attn: torch.Tensor, gate: torch.Tensor, up: torch.Tensor | None = None,
                   hidden: torch.Tensor | None = None, down: torch.Tensor | None = None) -> dict[str, float]:
        """Set the multipliers on a sample of real tokens: x = Norm_f(h), attention outputs, the
        gate pre-activations W_g x + b_g and, for the modulations that exist, W_u x + b_u, the MLP's
        hidden y = act(gate) * up and W_d y + b_d. Only scales change; B_f stays zero, so the
        student still starts at "attention dropped"."""
        z_rms = self.bottleneck(attn).pow(2).mean().sqrt().item()
        if math.isfinite(z_rms) and z_rms > 0.0:
            self.c_a.div_(z_rms)
        z = self.bottleneck(attn)
        gate_stats = self.calibrate_terms_(x, z, gate)
        stats = {"z_rms": z_rms, "coef_rms": gate_stats["coef_rms"], "gate_rms": gate_stats["out_rms"]}
        if self.up is not None:
            stats["up"] = self.up.calibrate_terms_(x, z, up)
        if self.down is not None:
            stats["down"] = self.down.calibrate_terms_(hidden, z, down)
        return stats


def quadratic_forms(z: torch.Tensor, forms: torch.Tensor) -> torch.Tensor:
    """[..., n]: z^T Q_c z for each column c = vec(Q_c) of `forms` [r^2, n], by whichever of two
    exact evaluations holds fewer values per token (measured the faster on CPU at the shapes of
    docs/performance.md): with few forms (n < r), the n vectors Q_c z; with many, the r(r+1)/2
    products z_i z_j, i <= j (Q_c's symmetric part folded onto them), once for all n forms."""
    r, n = z.shape[-1], forms.shape[1]
    q = forms.view(r, r, n)
    if n < r:
        qz = (z @ q.permute(0, 2, 1).reshape(r, n * r)).unflatten(-1, (n, r))  # [..., n, r]: z^T Q_c
        return (qz * z.unsqueeze(-2)).sum(-1)
    i, j = torch.triu_indices(r, r, device=z.device)
    folded = (q + q.transpose(0, 1))[i, j] * torch.where(i == j, 0.5, 1.0).to(forms.dtype).unsqueeze(-1)
    return (z[..., i] * z[..., j]) @ folded


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

    def forward(self, *args, npt_call: str | None = None, **kwargs):
        """The decoder layer as HF calls it (teacher or NPT, by `npt_enabled`) or, given
        `npt_call`, the named student method: `layer(h, a, npt_call="student_output")`,
        `layer(h, a, npt_call="regularizer")`; `call` spells these.

        One thin dispatcher because the student computations must go through this module's call,
        not a plain method: a sharded (FSDP) layer gathers its weights in its call, and again for
        the backward."""
        if npt_call is None:
            return self.layer(*args, **kwargs)
        return getattr(self, npt_call)(*args)

    def call(self, method: str, *args):
        """`method(*args)` (student_output, regularizer) through the module's call."""
        return self(*args, npt_call=method)

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
        """The teacher-forced student: `npt_output` for input h and attention output a, recomputed
        in backward when gradient checkpointing is on."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self.npt_output, hidden_states, attn, use_reentrant=False, context_fn=_same_sdpa_backends)
        return self.npt_output(hidden_states, attn)

    def regularizer(self, hidden_states: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The per-token regulariser alone for input h and attention output a (a free-running
        step's: HF's decoder loop passes one tensor from layer to layer, so it is computed
        afterwards from the recorded inputs and attention outputs)."""
        return self.adapter("regularizer", self.adapter_input(hidden_states, attn), self.projection_weights())

    def attention(self, hidden_states: torch.Tensor, **attn_kwargs) -> torch.Tensor:
        """a = Post_a(SelfAttn(Norm_a(h))), with the same keyword arguments the decoder layer receives."""
        w, layer = self.wiring, self.layer
        out = layer.self_attn(hidden_states=w.apply(layer, w.attn_norm, hidden_states), **attn_kwargs)
        return w.apply(layer, w.attn_out_norm, out[0] if isinstance(out, tuple) else out)

    def adapter_input(self, hidden_states: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """What the adapter's bottleneck reads: the attention output a, or with `--adapter_input
        relative` a / rms(h), the attention output in units of the residual stream it would have
        been added to (the scale at which the teacher's Norm_f(h + m a) sees it)."""
        if self.adapter.adapter_input == "attention":
            return attn
        inv_rms = hidden_states.float().pow(2).mean(-1, keepdim=True).add(1e-12).rsqrt()
        return attn * inv_rms.to(attn.dtype)

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
        """`npt_output`, eager. When h does not require grad (teacher forcing) and only the gate is
        modulated, the frozen projections W_g x and W_u x record no autograd state, and the MLP
        tail W_d(act(gate) * up) is one autograd node that keeps one d_ffn-wide tensor for its
        backward."""
        w, mlp = self.wiring, self.layer.mlp
        x = self.mlp_input(hidden_states)
        gate, up = self.gate_up(x)
        gate, up, z, frob2 = self.adapter("modulate_inputs", x, self.adapter_input(hidden_states, attn), gate, up, self.projection_weights(), regularizer)
        act = w.activation(self.layer)
        if self.adapter.down is not None:  # added in d_model space, before any post-feedforward norm
            y = act(gate) * up
            tail = self.adapter("modulate_down", y, z, mlp.down_proj(y))
        elif up.requires_grad or mlp.down_proj.weight.requires_grad:  # free-running, a modulated up, or a trainable MLP
            tail = mlp.down_proj(act(gate) * up)
        else:
            tail = _GatedDown.apply(gate, up, mlp.down_proj.weight, mlp.down_proj.bias, act)
        tail = w.apply(self.layer, w.mlp_out_norm, tail)
        if w.residual_multiplier != 1.0:
            tail = w.residual_multiplier * tail
        return hidden_states + tail, frob2

    def projection_weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """{"gate": (W_g, b_g), "up": (W_u, b_u)}: what the gains and the regulariser read."""
        return {name: self.wiring.projection(self.layer, name) for name in ("gate", "up")}

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
