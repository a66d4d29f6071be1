"""The training step's forward: one teacher capture, the student in the step's phase, the loss.

Teacher-forced steps: student layer i gets the teacher's input h_i and must produce the teacher's
output t_i. The student's attention is the teacher's attention on the same input, so it is taken
from the capture instead of being computed again; the layers are independent, and the only
autograd graph is, per layer, W_d, the activation and the adapter.

Free-running steps: the student runs as deployed, each NPT layer fed by the one below (its own
attention on its own hidden states), layer i's output is compared with t_i, and the logit KL of
the next-token distributions is added; the backward runs through every layer. Running freely,
layer i's error adds up those of every layer below, so its per-layer terms weigh
`free_running_layer_weight`. With `free_running_layer_target="local"` layer i is compared instead
with its teacher layer on the student's own input (h_i and a_i of the free-running pass, detached):
its own error, in units of the teacher's update of that input.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .capture import LayerRecord, Prefix, capture_teacher, run_student
from .distributed import all_reduce_sum, world
from .kl import LogitHead, real_tokens, softened_kl
from .losses import LayerTensors, LossOutput, NPTLoss
from .model import NPTModel


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x.float().mean() if mask is None else x.float()[mask].mean()


class EquivalenceObjective(nn.Module):
    """Holds the NPT model and the loss module, so that DDP/FSDP see every trained parameter.

    `sharded`: the model will be sharded with FSDP. The teacher forward then runs to the end (an
    exception must not cut through a sharded module's forward) and the logit KL is taken on full
    logits (a sharded LM head is whole only inside the model's own forward)."""

    def __init__(self, npt_model: NPTModel, loss: NPTLoss, seed: int = 0, sharded: bool = False):
        super().__init__()
        self.npt = npt_model
        self.loss = loss
        cfg = loss.cfg
        self.sharded = sharded
        self.reuse_prefix = True  # free-running steps start at the lowest converted layer (False: at the embeddings, same result)
        self.normalize = cfg.loss_normalization == "update"
        layers = npt_model.npt_config.layers
        self.penalty_pairs = [(i, i + 1) for i in layers if i + 1 in layers][:: cfg.gradient_penalty_every]
        # Per-token interpolation weights of the gradient penalty come from this generator, which
        # is part of the training state, so a resumed run draws the same ones.
        self.generator = torch.Generator().manual_seed(seed + 4049)
        # ||W_g||_F^2 of each layer, the regulariser's scale. The weights are frozen, so this is
        # computed once, here, while they are whole (under FSDP they are sharded afterwards).
        self.gate_norms = {idx: layer.gate_weight_sq_norm() for idx, layer in npt_model.npt_layers.items()}

    def layer_tensors(self, students: dict[int, torch.Tensor], records: dict[int, LayerRecord], mask: torch.Tensor | None) -> dict[int, LayerTensors]:
        """Real tokens of S, T, h per layer, and E = mean((T - h)^2) over the *global* batch: with
        several processes the sums are added across them (one small all-reduce), so that the
        loss, like the data, does not depend on how the batch is split. E is the loss's unit with
        update normalisation, and the logged loss/mse is measured in it in every setting."""
        out = {}
        sums = []
        for idx, student in students.items():
            rec = records[idx]
            s, t, h = real_tokens(student, mask), real_tokens(rec.outputs, mask), real_tokens(rec.inputs, mask)
            out[idx] = LayerTensors(s, t, h, torch.ones((), device=s.device))
            with torch.no_grad():
                sums.append(torch.stack([(t - h).pow(2).sum(), torch.tensor(float(t.numel()), device=t.device)]))
        totals = all_reduce_sum(torch.stack(sums))
        for layer, (sq, count) in zip(out.values(), totals):
            layer.energy = (sq / count).clamp_min(1e-30)
            if self.normalize:
                layer.scale = layer.energy
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
        use_kl = free_running and self.loss.cfg.logit_kl_weight > 0
        full, fused = use_kl and self.sharded, use_kl and not self.sharded
        stop_early = not self.sharded
        records, t_final = capture_teacher(self.npt, input_ids, attention_mask, with_logits=full, with_final_hidden=fused, stop_early=stop_early)
        if free_running:
            runs, s_final = run_student(self.npt, input_ids, attention_mask, with_logits=full, with_final_hidden=fused, stop_early=stop_early,
                                        prefix=Prefix.of(self.npt, records) if self.reuse_prefix else None)
            layers = self.npt.npt_layers
            if self.loss.cfg.free_running_layer_target == "local" and self.loss.cfg.free_running_layer_weight > 0:
                records, students, frob2s = self.local_terms(runs)
            else:
                students = {idx: rec.outputs for idx, rec in runs.items()}
                frob2s = {idx: layers[idx].call("regularizer", rec.inputs, rec.attn) for idx, rec in runs.items() if layers[idx].npt_enabled}
        else:
            students, frob2s = {}, {}
            for idx, layer in self.npt.npt_layers.items():
                students[idx], frob2s[idx] = layer.call("student_output", records[idx].inputs, records[idx].attn)
        tensors = self.layer_tensors(students, records, mask)
        regs = []
        for idx in self.npt.npt_layers:
            if idx not in frob2s:  # a layer not converted yet (progressive stages): its adapter is unused
                regs.append(torch.zeros((), device=input_ids.device))
                continue
            reg = masked_mean(frob2s[idx], mask)
            regs.append(reg / self.gate_norms[idx] if self.normalize else reg)
        gp = None
        if self.loss.cfg.use_gradient_penalty:
            gp = self.gradient_penalty(records, students, tensors, mask)
        kl = None
        if use_kl:
            _, temperature = self.loss.schedule(step)
            head = LogitHead.of(self.npt.model) if fused else None
            kl = softened_kl(t_final, s_final, mask, temperature, head=head, reverse_share=self.loss.cfg.reverse_kl_share)
        return self.loss(list(tensors.values()), torch.stack(regs), gp, step, logit_kl=kl, free_running=free_running)

    def local_terms(self, runs: dict[int, LayerRecord]) -> tuple[dict[int, LayerRecord], dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Per converted layer of a free-running pass: the record of its teacher layer on the
        student's own input (h_i, a_i detached; target: the teacher layer's output on them), the
        NPT layer's output on the same (h_i, a_i), and its regulariser. A layer running as the
        teacher's (progressive stages) is its own target and has no regulariser."""
        records, students, frob2s = {}, {}, {}
        for idx, rec in runs.items():
            layer = self.npt.npt_layers[idx]
            h, a = rec.inputs.detach(), rec.attn.detach()
            with torch.no_grad():
                target = layer.teacher_output(h, a)
            records[idx] = LayerRecord(inputs=h, outputs=target, attn_kwargs=rec.attn_kwargs, attn=a)
            if layer.npt_enabled:
                students[idx], frob2s[idx] = layer.call("student_output", h, a)
            else:
                students[idx] = target
        return records, students, frob2s

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
                per_token = err.pow(2).sum(-1) / (d * tensors[j].scale)
                loss_sum = per_token.sum() if mask is None else per_token[mask].sum()
                (grad,) = torch.autograd.grad(loss_sum, x, create_graph=True)
            g2 = grad.float().pow(2).sum(-1)
            terms.append(d * tensors[i].scale * masked_mean(g2, mask))
        return torch.stack(terms).mean()


@torch.no_grad()
def calibrate_adapters(npt_model: NPTModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[int, dict]:
    """Set each adapter's multipliers on one batch (see NPTAdapter.calibrate_)."""
    records, _ = capture_teacher(npt_model, input_ids, attention_mask)
    mask = attention_mask.bool() if attention_mask is not None else None
    stats = {}
    for idx, layer in npt_model.npt_layers.items():
        rec = records[idx]
        x = layer.mlp_input(rec.inputs)
        gate, up = layer.gate_up(x)
        extra = {}
        if layer.adapter.up is not None:
            extra["up"] = real_tokens(up, mask)
        if layer.adapter.down is not None:
            y = layer.wiring.activation(layer.layer)(gate) * up
            extra |= {"hidden": real_tokens(y, mask), "down": real_tokens(layer.layer.mlp.down_proj(y), mask)}
        stats[idx] = layer.adapter.calibrate_(real_tokens(x, mask), real_tokens(layer.adapter_input(rec.inputs, rec.attn), mask), real_tokens(gate, mask), **extra)
    return stats
