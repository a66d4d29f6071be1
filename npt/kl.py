"""Next-token distributions of teacher and student, compared without holding [tokens, vocab] logits.

A 128k vocabulary makes every float32 copy of the logits of 8 x 2048 tokens 8 GB. Both users of
the logits, the training objective's softened KL (with its gradient) and the held-out evaluation
(KL and both negative log-likelihoods), take the final hidden states and the LM head instead, and
form the logits chunk by chunk (`log_prob_chunks`). Under FSDP the sharded head is whole only
inside the model's own forward, so the full logits are passed instead (`head=None`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def kl_chunk_tokens(vocab_size: int, device: torch.device) -> int:
    """Tokens per chunk. On CUDA a chunk's logits hold 2^27 elements (512 MB in float32; a 128k
    vocabulary gets 1024 tokens), so that each chunk's matmul, which reads the whole [vocab, d]
    head, is compute-bound rather than bound by reading the head again and again. On CPU, 2^23
    elements (32 MB): larger buffers were slower on the mid-size benchmark (page faults)."""
    elements = 2**27 if device.type == "cuda" else 2**23
    return max(1, elements // vocab_size)


@dataclasses.dataclass
class LogitHead:
    """The LM head as the causal LM applies it to the final hidden state h:

        logits = cap * tanh((W h + b) / (d cap))        cap: Gemma 2's final softcap; d: Granite's logits_scaling

    (each part only where the model's config has it; the conversion proof checks that this equals
    the model's own logits, so a model with another transform is refused rather than distilled
    towards something else)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    divisor: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, model: nn.Module) -> "LogitHead":
        head, config = model.get_output_embeddings(), model.config
        weight, bias = head.weight, head.bias
        device = weight.device.type
        if torch.is_autocast_enabled(device) and weight.dtype != torch.get_autocast_dtype(device):
            # autocast would cast the [vocab, d] weight anew in every chunk's matmul, forward and
            # backward: cast once per step instead (the same bf16 numbers; a 262k vocabulary
            # made the bf16 free-running step slower than float32's on CPU)
            dtype = torch.get_autocast_dtype(device)
            weight, bias = weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype)
        return cls(weight, bias, float(getattr(config, "logits_scaling", None) or 1.0),
                   getattr(config, "final_logit_softcapping", None))

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        z = F.linear(h.to(self.weight.dtype), self.weight, self.bias)
        if self.divisor != 1.0:
            z = z / self.divisor
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z

    def input_grad(self, grad: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """d loss / d h from d loss / d logits and the logits this head gave (float32)."""
        if self.softcap is not None:
            grad = grad * (1.0 - (logits / self.softcap).square())
        if self.divisor != 1.0:
            grad = grad / self.divisor
        return grad.to(self.weight.dtype) @ self.weight


def real_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B, L, d] -> [N, d] float32, padding removed."""
    x = x.float()
    return x.reshape(-1, x.shape[-1]) if mask is None else x[mask]


def log_prob_chunks(t_out: torch.Tensor, s_out: torch.Tensor, head: LogitHead | None, temperature: float = 1.0,
                    chunk: int | None = None) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(rows, teacher log-probs, student log-probs, student logits) per chunk of rows of [N, d]
    final hidden states (or [N, vocab] logits when `head` is None), the log-probs at
    `temperature`, all in float32."""
    vocab = head.weight.shape[0] if head is not None else t_out.shape[-1]
    chunk = chunk or kl_chunk_tokens(vocab, t_out.device)
    for start in range(0, t_out.shape[0], chunk):
        rows = slice(start, start + chunk)
        t, s = t_out[rows], s_out[rows]
        if head is not None:
            t, s = head(t), head(s)
        t, s = t.float(), s.float()
        if temperature != 1.0:
            yield rows, torch.log_softmax(t / temperature, -1), torch.log_softmax(s / temperature, -1), s
        else:
            yield rows, torch.log_softmax(t, -1), torch.log_softmax(s, -1), s


class _ChunkedSoftenedKL(torch.autograd.Function):
    """T^2 * mean over rows of (1 - b) KL(p || q) + b KL(q || p), p = softmax(t/T) the teacher's,
    q = softmax(s/T) the student's, from final hidden states, with the gradient with respect to
    the student's hidden state formed chunk by chunk in the forward (per row, with respect to the
    student's logits s: T (q - p) for the forward KL, T q (log q/p - KL(q || p)) for the reverse
    one; times the head's Jacobian, over N). Only that [N, d] gradient is kept for the backward.
    The head is frozen, so it gets no gradient."""

    @staticmethod
    def forward(ctx, h_s, h_t, head, temperature, chunk, reverse_share):
        n = h_s.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=h_s.device)
        grad = torch.empty_like(h_s) if ctx.needs_input_grad[0] else None
        for rows, log_p, log_q, s_logits in log_prob_chunks(h_t, h_s, head, temperature, chunk):
            p, q = log_p.exp(), log_q.exp()
            log_ratio = log_q - log_p  # log q/p
            loss_rows = (p * log_ratio).sum(-1).mul_(reverse_share - 1)  # (1 - b) KL(p || q)
            reverse_rows = (q * log_ratio).sum(-1) if reverse_share else None  # KL(q || p)
            if reverse_rows is not None:
                loss_rows.add_(reverse_rows, alpha=reverse_share)
            if grad is not None:  # the gradient is only formed where it is asked for
                g = (q - p).mul_(1 - reverse_share)
                if reverse_rows is not None:
                    g.add_(q * (log_ratio - reverse_rows[:, None]), alpha=reverse_share)
                grad[rows] = head.input_grad(g.mul_(temperature / n), s_logits).to(grad.dtype)
                del g
            total += loss_rows.sum()
            del p, q, log_ratio
        ctx.save_for_backward(grad)
        return total * (temperature**2 / n)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None, None, None


def softened_kl(teacher_out: torch.Tensor, student_out: torch.Tensor, mask: torch.Tensor | None, temperature: float,
                head: LogitHead | None = None, chunk: int | None = None, reverse_share: float = 0.0) -> torch.Tensor:
    """T^2 * mean over real positions of (1 - b) KL(softmax(t/T) || softmax(s/T)) + b KL(softmax(s/T) ||
    softmax(t/T)), b = `reverse_share` (Hinton et al. 2015 for the forward KL at b = 0; the T^2
    keeps the gradient's size independent of T; the reverse KL is mode-seeking: it charges the
    student for mass where the teacher has little). `teacher_out`, `student_out`: final hidden
    states with `head` (chunked, see above), or logits without."""
    t, s = real_tokens(teacher_out, mask), real_tokens(student_out, mask)
    if head is not None:
        return _ChunkedSoftenedKL.apply(s.to(head.weight.dtype), t.to(head.weight.dtype).detach(), head, float(temperature), chunk,
                                        float(reverse_share))
    log_p, log_q = torch.log_softmax(t / temperature, -1), torch.log_softmax(s / temperature, -1)
    forward = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    reverse = (log_q.exp() * (log_q - log_p)).sum(-1).mean() if reverse_share > 0 else 0.0
    return temperature**2 * ((1 - reverse_share) * forward + reverse_share * reverse)


@torch.no_grad()
def next_token_sums(t_out: torch.Tensor, s_out: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                    head: LogitHead | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of the batch, float64 sums over its valid positions of KL(teacher || student),
    teacher NLL and student NLL of `labels`, and the count of positions where the two argmax next
    tokens agree: [B, 4]. `t_out`, `s_out` [B, L, *] are final hidden states (with `head`) or logits."""
    keep = valid.reshape(-1)
    row_of = valid.nonzero()[:, 0]  # the batch row of each kept position, in the same (row-major) order
    t_flat, s_flat = t_out.reshape(-1, t_out.shape[-1])[keep], s_out.reshape(-1, s_out.shape[-1])[keep]
    y = labels.reshape(-1)[keep]
    per_row = torch.zeros(valid.shape[0], 4, dtype=torch.float64, device=t_out.device)
    for rows, lt, ls, _ in log_prob_chunks(t_flat, s_flat, head):
        yy = y[rows][:, None]
        stats = torch.stack([(lt.exp() * (lt - ls)).sum(-1), -lt.gather(-1, yy)[:, 0], -ls.gather(-1, yy)[:, 0],
                             (lt.argmax(-1) == ls.argmax(-1)).float()], dim=1)
        per_row.index_add_(0, row_of[rows], stats.double())
    return per_row
