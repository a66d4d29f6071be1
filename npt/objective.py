"""The training step's forward: one teacher capture, the teacher-forced student, the loss.

With teacher forcing, student layer i gets the teacher's input h_i and must produce the
teacher's output t_i. The student's attention is the teacher's attention on the same input, so
it is taken from the capture instead of being computed again; the layers are independent, and
the only autograd graph is, per layer, W_d, the activation and the adapter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .capture import LayerRecord, capture_teacher, run_student
from .losses import LayerTensors, LossOutput, NPTLoss
from .model import NPTModel


def real_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B, L, d] -> [N, d] float32, padding removed."""
    x = x.float()
    return x.reshape(-1, x.shape[-1]) if mask is None else x[mask]


def world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if world()[1] > 1:
        x = x.clone()
        torch.distributed.all_reduce(x)
    return x


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x.float().mean() if mask is None else x.float()[mask].mean()


def softened_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """T^2 * mean over real positions of KL(softmax(t/T) || softmax(s/T)) (Hinton et al. 2015):
    the T^2 keeps the gradient's size independent of T."""
    t = real_tokens(teacher_logits, mask) / temperature
    s = real_tokens(student_logits, mask) / temperature
    log_p, log_q = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    return temperature**2 * (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def kl_chunk_tokens(vocab_size: int, device: torch.device) -> int:
    """Tokens per chunk when logits are formed chunk by chunk. On CUDA a chunk's logits hold
    2^27 elements (512 MB in float32; a 128k vocabulary gets 1024 tokens), so that each chunk's
    matmul, which reads the whole [vocab, d] head, is compute-bound rather than bound by reading
    the head again and again. On CPU, 2^23 elements (32 MB): measured on the mid-size benchmark,
    the free-running step took 2.4 s against 3.2 s with 2^25, larger buffers costing page faults."""
    elements = 2**27 if device.type == "cuda" else 2**23
    return max(1, elements // vocab_size)


class _ChunkedSoftenedKL(torch.autograd.Function):
    """`softened_kl` from the final hidden states and the LM head, without ever holding the
    [N, vocab] logits: chunk by chunk, the teacher's and the student's logits are formed, the
    KL summed, and the gradient with respect to the student's hidden state,
    T (softmax(s/T) - softmax(t/T)) W / N, computed right away. Only that [N, d] gradient is kept
    for the backward. (The full-logits form needs several [N, vocab] float32 tensors: 8 GB each
    for 8 x 2048 tokens of a 128k vocabulary.) The head is frozen, so it gets no gradient."""

    @staticmethod
    def forward(ctx, h_s, h_t, weight, bias, temperature, chunk):
        n = h_s.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=h_s.device)
        grad = torch.empty_like(h_s) if ctx.needs_input_grad[0] else None
        for i in range(0, n, chunk):
            # In place where possible: each of these is [chunk, vocab].
            s = F.linear(h_s[i : i + chunk], weight, bias).float()
            t = F.linear(h_t[i : i + chunk], weight, bias).float()
            if temperature != 1.0:
                s.div_(temperature)
                t.div_(temperature)
            log_q, log_p = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
            del s, t
            p = log_p.exp()
            if grad is not None:
                g = log_q.exp().sub_(p).mul_(temperature / n)
                grad[i : i + chunk] = (g.to(weight.dtype) @ weight).to(grad.dtype)
                del g
            total += torch.vdot(p.view(-1), log_p.sub_(log_q).view(-1))
        ctx.save_for_backward(grad)
        return total * (temperature**2 / n)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None, None, None


def softened_kl_from_hidden(teacher_hidden: torch.Tensor, student_hidden: torch.Tensor, head: nn.Linear, mask: torch.Tensor | None,
                            temperature: float, chunk: int | None = None) -> torch.Tensor:
    """`softened_kl(head(teacher_hidden), head(student_hidden), mask, temperature)`, computed in
    chunks of tokens (see `_ChunkedSoftenedKL`)."""
    h_t, h_s = real_tokens(teacher_hidden, mask), real_tokens(student_hidden, mask)
    weight = head.weight
    h_t, h_s = h_t.to(weight.dtype), h_s.to(weight.dtype)
    chunk = chunk or kl_chunk_tokens(weight.shape[0], weight.device)
    return _ChunkedSoftenedKL.apply(h_s, h_t.detach(), weight.detach(), None if head.bias is None else head.bias.detach(), float(temperature), chunk)


class EquivalenceObjective(nn.Module):
    """Holds the NPT model and the loss module, so that DDP/FSDP see every trained parameter."""

    def __init__(self, npt_model: NPTModel, loss: NPTLoss, gradient_penalty_every: int = 1, seed: int = 0, logit_kl_weight: float = 0.0):
        super().__init__()
        self.npt = npt_model
        self.loss = loss
        self.logit_kl_weight = logit_kl_weight
        self.stop_early = True  # False under FSDP (see capture_teacher)
        # The logit KL from final hidden states in chunks; False under FSDP, whose sharded LM head
        # can only be used through its own forward (the KL is then taken on full logits).
        self.fused_kl = True
        self.gradient_penalty_every = max(1, gradient_penalty_every)
        self.normalize = loss.cfg.normalization == "update"
        layers = npt_model.npt_config.layers
        self.penalty_pairs = [(i, i + 1) for i in layers if i + 1 in layers][:: self.gradient_penalty_every]
        # Per-token interpolation weights of the gradient penalty come from this generator, which
        # is part of the training state, so a resumed run draws the same ones.
        self.generator = torch.Generator().manual_seed(seed + 4049)
        # ||W_g||_F^2 of each layer, the regulariser's scale. The weights are frozen, so this is
        # computed once, here, while they are whole (under FSDP they are sharded afterwards).
        self.gate_norms = {idx: layer.gate_weight_sq_norm() for idx, layer in npt_model.npt_layers.items()}

    def layer_tensors(self, students: dict[int, torch.Tensor], records: dict[int, LayerRecord], mask: torch.Tensor | None) -> dict[int, LayerTensors]:
        """Real tokens of S, T, h per layer, and E = mean((T - h)^2) over the *global* batch: with
        several processes the sums are added across them (one small all-reduce), so that the
        loss, like the data, does not depend on how the batch is split."""
        out = {}
        sums = []
        for idx, student in students.items():
            rec = records[idx]
            s, t, h = real_tokens(student, mask), real_tokens(rec.outputs, mask), real_tokens(rec.inputs, mask)
            out[idx] = LayerTensors(s, t, h, torch.ones((), device=s.device))
            if self.normalize:
                with torch.no_grad():
                    sums.append(torch.stack([(t - h).pow(2).sum(), torch.tensor(float(t.numel()), device=t.device)]))
        if self.normalize:
            totals = all_reduce_sum(torch.stack(sums))
            for (idx, layer), (sq, count) in zip(out.items(), totals):
                layer.energy = (sq / count).clamp_min(1e-30)
        return out

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        step: int = 0,
        free_running: bool = False,
    ) -> LossOutput:
        """Teacher-forced (default): student layer i gets the teacher's h_i and a_i. Free-running:
        the student runs as deployed, each NPT layer fed by the layer below, and layer i's output
        is compared with the teacher's t_i; `logit_kl_weight` then adds the softened-target KL of
        the next-token distributions."""
        mask = attention_mask.bool() if attention_mask is not None else None
        use_kl = free_running and self.logit_kl_weight > 0
        fused, full = use_kl and self.fused_kl, use_kl and not self.fused_kl
        records, t_final = capture_teacher(self.npt, input_ids, attention_mask, with_logits=full, with_final_hidden=fused, stop_early=self.stop_early)
        if free_running:
            students, frob2s, s_final = run_student(self.npt, input_ids, attention_mask, with_logits=full, with_final_hidden=fused, stop_early=self.stop_early)
        else:
            students, frob2s = {}, {}
            for idx, layer in self.npt.npt_layers.items():
                students[idx], frob2s[idx] = layer(records[idx].inputs, npt_student_attn=records[idx].attn)
        tensors = self.layer_tensors(students, records, mask)
        regs = []
        for idx in self.npt.npt_layers:
            reg = masked_mean(frob2s[idx], mask)
            regs.append(reg / self.gate_norms[idx] if self.normalize else reg)
        gp = None
        if self.loss.cfg.use_gradient_penalty:
            gp = self.gradient_penalty(records, students, tensors, mask)
        kl = None
        if use_kl:
            _, temperature = self.loss.schedule(step)
            if fused:
                kl = softened_kl_from_hidden(t_final, s_final, self.npt.model.get_output_embeddings(), mask, temperature)
            else:
                kl = softened_kl(t_final, s_final, mask, temperature)
        return self.loss(list(tensors.values()), torch.stack(regs), gp, step, logit_kl=kl, logit_kl_weight=self.logit_kl_weight)

    def gradient_penalty(
        self,
        records: dict[int, LayerRecord],
        students: dict[int, torch.Tensor],
        tensors: dict[int, LayerTensors],
        mask: torch.Tensor | None,
        alpha: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """How much an error in layer i's output hurts the next layer.

        For each pair of adjacent converted layers (i, j = i + 1), every k-th pair:

            x   = alpha * S_i + (1 - alpha) * T_i           alpha ~ U(0, 1) per token
            l_t = ||S_j(x)_t - T_j,t||^2 / (d E_j)          S_j(x): student layer j run freely on x
            gp  = mean over real tokens t of  d E_i * || d(sum_s l_s) / d x_t ||^2

        l_t is layer j's per-token normalised squared error, so sum_s l_s / N is its MSE term; the
        gradient of the *sum* at each token and the factor d E_i (the per-token energy of layer
        i's update, the scale of layer i's errors) make gp dimensionless and independent of
        batch x sequence size. S_j(x) includes layer j's attention on x: an error in layer i moves
        both the residual and what layer j attends to. Cost per pair: one attention forward plus
        a double backward through it (attention runs on SDPA's math kernel, the only one with
        double backward); `gradient_penalty_every` thins the pairs.
        """
        if not self.penalty_pairs:
            return torch.zeros((), device=next(iter(students.values())).device)
        terms = []
        layers = self.npt.npt_layers
        for i, j in self.penalty_pairs:
            t_i = records[i].outputs
            s_i = students[i].to(t_i.dtype)
            if alpha is None:
                # Drawn for the global batch and sliced, so that every process (and a single
                # process with the same global batch) uses the same draws for the same rows.
                rank, size = world()
                b = t_i.shape[0]
                draws = torch.rand((b * size,) + t_i.shape[1:-1] + (1,), generator=self.generator)
                a = draws[rank * b : (rank + 1) * b].to(device=t_i.device, dtype=t_i.dtype)
            else:
                a = alpha.to(device=t_i.device, dtype=t_i.dtype)
            x = a * s_i + (1 - a) * t_i
            if not x.requires_grad:
                x.requires_grad_(True)
            with sdpa_kernel(SDPBackend.MATH):
                s_j = layers[j](x, **records[j].attn_kwargs)  # layer j running freely on x, attention included
                err = (s_j - records[j].outputs).float()
                d = err.shape[-1]
                per_token = err.pow(2).sum(-1) / (d * tensors[j].energy)
                loss_sum = per_token.sum() if mask is None else per_token[mask].sum()
                (grad,) = torch.autograd.grad(loss_sum, x, create_graph=True)
            g2 = grad.float().pow(2).sum(-1)
            terms.append(d * tensors[i].energy * masked_mean(g2, mask))
        return torch.stack(terms).mean()


@torch.no_grad()
def calibrate_adapters(npt_model: NPTModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[int, dict]:
    """Scale each adapter's A and B_m on one batch (see NPTAdapter.calibrate_)."""
    records, _ = capture_teacher(npt_model, input_ids, attention_mask)
    mask = attention_mask.bool() if attention_mask is not None else None
    stats = {}
    for idx, layer in npt_model.npt_layers.items():
        rec = records[idx]
        x = layer.layer.post_attention_layernorm(rec.inputs)
        stats[idx] = layer.adapter.calibrate_(real_tokens(x, mask), real_tokens(rec.attn, mask))
    return stats
