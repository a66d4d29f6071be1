"""Held-out evaluation: is the student equivalent to its teacher?

Per converted layer, teacher-forced (student layer i gets the teacher's input):
    rel_i = ||S_i - T_i|| / ||T_i - h_i||     over all held-out tokens (0: perfect; an NPT layer that
                                               ignores attention has rel ~ ||a|| / ||update||)
    cos_i = mean over tokens of cos(S_i - h_i, T_i - h_i)
Running the student freely (each NPT layer feeds the next, as in deployment):
    kl          mean over predicted tokens of KL(teacher || student) of the next-token distributions
    teacher_ppl, student_ppl   exp of the mean next-token negative log-likelihood
Padding is excluded everywhere. `evaluate_sums` returns sums so that processes can add theirs.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from .capture import capture_teacher, final_hidden
from .distributed import all_reduce_sum, evaluation_padding, is_sharded, world
from .kl import next_token_sums
from .model import NPTModel


@dataclasses.dataclass
class EvalResult:
    layers: list[int]
    rel_error: list[float]
    update_cosine: list[float]
    kl: float
    teacher_ppl: float
    student_ppl: float
    tokens: int

    @property
    def rel_error_mean(self) -> float:
        return sum(self.rel_error) / len(self.rel_error)

    @property
    def ppl_ratio(self) -> float:
        return self.student_ppl / self.teacher_ppl

    def record(self) -> dict:
        """The result as the run's summary and `npt-eval` write it."""
        return {"rel_error_mean": self.rel_error_mean, "rel_error": self.rel_error, "update_cosine": self.update_cosine, "kl": self.kl,
                "teacher_ppl": self.teacher_ppl, "student_ppl": self.student_ppl, "ppl_ratio": self.ppl_ratio, "tokens": self.tokens}

    def scalars(self) -> dict[str, float]:
        out = {
            "eval/rel_error_mean": self.rel_error_mean,
            "eval/update_cosine_mean": sum(self.update_cosine) / len(self.update_cosine),
            "eval/kl": self.kl,
            "eval/teacher_ppl": self.teacher_ppl,
            "eval/student_ppl": self.student_ppl,
            "eval/ppl_ratio": self.ppl_ratio,
        }
        for i, r, c in zip(self.layers, self.rel_error, self.update_cosine):
            out[f"eval/rel_error/layer_{i:02d}"] = r
            out[f"eval/update_cosine/layer_{i:02d}"] = c
        return out

    def table(self) -> str:
        rows = ["| layer | rel error | update cosine |", "|---|---|---|"]
        rows += [f"| {i} | {r:.4f} | {c:.4f} |" for i, r, c in zip(self.layers, self.rel_error, self.update_cosine)]
        rows.append(f"| mean | {self.rel_error_mean:.4f} | {sum(self.update_cosine) / len(self.update_cosine):.4f} |")
        rows.append("")
        rows.append(
            f"free-running: KL(teacher||student) {self.kl:.4f} nats/token, perplexity teacher {self.teacher_ppl:.2f}, "
            f"student {self.student_ppl:.2f} (ratio {self.ppl_ratio:.3f}), {self.tokens} tokens"
        )
        return "\n".join(rows)


@torch.no_grad()
def evaluate_sums(npt_model: NPTModel, blocks: torch.Tensor, batch_size: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """A flat float64 vector of sums: per layer (err^2, update^2, cosine sum, tokens), then
    (KL, teacher NLL, student NLL, predicted tokens)."""
    device = npt_model.device
    layers = list(npt_model.npt_layers)
    if len(blocks) == 0:  # more processes than held-out blocks
        return torch.zeros(4 * len(layers) + 4, dtype=torch.float64, device=device)
    per_layer = torch.zeros(len(layers), 4, dtype=torch.float64, device=device)
    logit_sums = torch.zeros(4, dtype=torch.float64, device=device)
    # Logits chunk by chunk from the final hidden states, except under FSDP: its sharded LM head
    # is whole only inside the model's own forward.
    fused = not is_sharded(npt_model.model)
    head = npt_model.model.get_output_embeddings() if fused else None
    for start in range(0, len(blocks), batch_size):
        x = blocks[start : start + batch_size].to(device)
        mask = None if attention_mask is None else attention_mask[start : start + batch_size].to(device)
        real = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
        records, t_out = capture_teacher(npt_model, x, mask, with_logits=not fused, with_final_hidden=fused)
        for k, (idx, layer) in enumerate(npt_model.npt_layers.items()):
            rec = records[idx]
            s, _ = layer(rec.inputs, npt_student_attn=rec.attn)
            s, t, h = s[real].float(), rec.outputs[real].float(), rec.inputs[real].float()
            per_layer[k, 0] += (s - t).pow(2).sum().double()
            per_layer[k, 1] += (t - h).pow(2).sum().double()
            per_layer[k, 2] += F.cosine_similarity(s - h, t - h, dim=-1, eps=1e-12).sum().double()
            per_layer[k, 3] += real.sum()
        if fused:
            s_out = final_hidden(npt_model.model, x, mask)
        else:
            s_out = npt_model(input_ids=x, attention_mask=mask, use_cache=False).logits
        valid = real[:, :-1] & real[:, 1:]
        logit_sums[:3] += next_token_sums(t_out[:, :-1], s_out[:, :-1], x[:, 1:], valid, head)
        logit_sums[3] += valid.sum()
    return torch.cat([per_layer.flatten(), logit_sums])


def finalize(sums: torch.Tensor, layers: list[int]) -> EvalResult:
    n = len(layers)
    per_layer = sums[: 4 * n].view(n, 4).cpu()
    kl, t_nll, s_nll, count = sums[4 * n :].tolist()
    count = max(count, 1.0)
    return EvalResult(
        layers=list(layers),
        rel_error=[math.sqrt(e / max(u, 1e-300)) for e, u in per_layer[:, :2].tolist()],
        update_cosine=[c / max(t, 1.0) for c, t in per_layer[:, 2:].tolist()],
        kl=kl / count,
        teacher_ppl=math.exp(t_nll / count),
        student_ppl=math.exp(s_nll / count),
        tokens=int(count),
    )


def evaluate(npt_model: NPTModel, blocks: torch.Tensor, batch_size: int = 8, attention_mask: torch.Tensor | None = None) -> EvalResult:
    """The held-out evaluation of `blocks`. With several processes every process calls it with the
    same blocks: each evaluates its share (`blocks[rank::world]`), and the sums are added."""
    rank, size = world()
    was_training = npt_model.training
    npt_model.eval()
    try:
        mine = slice(rank, None, size)
        shard_mask = None if attention_mask is None else attention_mask[mine]
        sums = evaluate_sums(npt_model, blocks[mine], batch_size, shard_mask)
        if is_sharded(npt_model.model):
            spare = evaluation_padding(len(blocks), batch_size)
            if spare:  # sharded forwards are collectives: run as many as the others, drop the sums
                evaluate_sums(npt_model, blocks[:1].repeat(spare, 1), 1)
        return finalize(all_reduce_sum(sums), list(npt_model.npt_layers))
    finally:
        npt_model.train(was_training)


@torch.no_grad()
def sample_generations(npt_model: NPTModel, tokenizer, blocks: torch.Tensor, num: int, prompt_len: int = 16, new_tokens: int = 32,
                       synced: bool = False) -> list[dict[str, str]]:
    """Greedy continuations of held-out prompts by the teacher and by the free-running student.
    `synced` (sharded models): every process keeps stepping until all have finished, since a
    process that stopped early at an EOS would leave the others waiting in a collective."""
    out = []
    for block in blocks[:num]:
        prompt = block[:prompt_len].unsqueeze(0).to(npt_model.device)
        kwargs = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id, synced_gpus=synced)
        with npt_model.teacher_mode():
            t = npt_model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kwargs)
        s = npt_model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kwargs)
        out.append(
            {
                "prompt": tokenizer.decode(prompt[0], skip_special_tokens=True),
                "teacher": tokenizer.decode(t[0, prompt_len:], skip_special_tokens=True),
                "student": tokenizer.decode(s[0, prompt_len:], skip_special_tokens=True),
            }
        )
    return out
