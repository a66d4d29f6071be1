"""Held-out evaluation: is the student equivalent to its teacher?

Per converted layer, teacher-forced (student layer i gets the teacher's input):
    rel_i = ||S_i - T_i|| / ||T_i - h_i||     over all held-out tokens (0: perfect; an NPT layer that
                                               ignores attention has rel ~ ||a|| / ||update||)
    cos_i = mean over tokens of cos(S_i - h_i, T_i - h_i)
Running the student freely (each NPT layer feeds the next, as in deployment):
    kl          mean over predicted tokens of KL(teacher || student) of the next-token distributions
    teacher_ppl, student_ppl   exp of the mean next-token negative log-likelihood
    top1_agreement   share of predicted positions where teacher and student rank the same token first
    kl_stderr, top1_stderr   standard errors of those two, over blocks (each block's mean is one
                     sample; a 95% interval is +-1.96 of them)
Generating (`greedy_match`): from held-out prompts, teacher and student each continue greedily for
`new_tokens` tokens; the match is the number of leading tokens that are identical (new_tokens:
the same continuation), averaged over prompts. A student can sit close to its teacher's
perplexity and still part ways at the first generated token; this is what a user sees.
Layer attribution (`layer_attribution`): the KL and perplexity ratio with one converted layer run
as its teacher layer (the others NPT), and with that layer the only NPT layer; a student trained
freely co-adapts its layers, so reverting one can raise the KL rather than lower it.
Padding is excluded everywhere. `evaluate_sums` returns sums (`EvalSums`) so that processes can add theirs.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from .capture import Prefix, capture_teacher, final_hidden, starting_at
from .distributed import all_reduce_sum, evaluation_padding, is_sharded, world
from .kl import LogitHead, next_token_sums
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
    top1_agreement: float = float("nan")
    kl_stderr: float = float("nan")
    top1_stderr: float = float("nan")
    greedy_match: float | None = None  # mean identical leading tokens of greedy continuations, when measured
    greedy_tokens: int = 0  # tokens generated per prompt for greedy_match
    greedy_prompts: int = 0

    @property
    def rel_error_mean(self) -> float:
        return sum(self.rel_error) / len(self.rel_error)

    @property
    def ppl_ratio(self) -> float:
        return self.student_ppl / self.teacher_ppl

    def record(self) -> dict:
        """The result as the run's summary and `npt-eval` write it."""
        out = {"rel_error_mean": self.rel_error_mean, "rel_error": self.rel_error, "update_cosine": self.update_cosine, "kl": self.kl,
               "kl_stderr": self.kl_stderr, "top1_agreement": self.top1_agreement, "top1_stderr": self.top1_stderr, "teacher_ppl": self.teacher_ppl, "student_ppl": self.student_ppl,
               "ppl_ratio": self.ppl_ratio, "tokens": self.tokens}
        if self.greedy_match is not None:
            out |= {"greedy_match": self.greedy_match, "greedy_tokens": self.greedy_tokens, "greedy_prompts": self.greedy_prompts}
        return out

    def scalars(self) -> dict[str, float]:
        out = {
            "eval/rel_error_mean": self.rel_error_mean,
            "eval/update_cosine_mean": sum(self.update_cosine) / len(self.update_cosine),
            "eval/kl": self.kl,
            "eval/top1_agreement": self.top1_agreement,
            "eval/teacher_ppl": self.teacher_ppl,
            "eval/student_ppl": self.student_ppl,
            "eval/ppl_ratio": self.ppl_ratio,
        }
        if self.greedy_match is not None:
            out["eval/greedy_match"] = self.greedy_match
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
            f"free-running: KL(teacher||student) {self.kl:.4f} +- {1.96 * self.kl_stderr:.4f} nats/token, "
            f"top-1 agreement {self.top1_agreement:.1%} +- {1.96 * self.top1_stderr:.1%} (95% intervals over blocks), "
            f"perplexity teacher {self.teacher_ppl:.2f}, student {self.student_ppl:.2f} (ratio {self.ppl_ratio:.3f}), {self.tokens} tokens"
        )
        if self.greedy_match is not None:
            rows.append(f"greedy continuations: {self.greedy_match:.1f} of {self.greedy_tokens} tokens identical on average, {self.greedy_prompts} prompts")
        return "\n".join(rows)


@dataclasses.dataclass
class EvalSums:
    """What an evaluation adds up, as float64 sums that processes add to each other's (a sum is
    exact to combine; a mean is not). Per converted layer [n], teacher-forced over real tokens;
    then over the free-running student's predicted positions; then over the blocks that have
    some, whose per-block means give the standard errors."""

    err2: torch.Tensor  # [n] sum of ||S_i - T_i||^2
    update2: torch.Tensor  # [n] sum of ||T_i - h_i||^2
    cosine: torch.Tensor  # [n] sum of cos(S_i - h_i, T_i - h_i)
    layer_tokens: torch.Tensor  # [n]
    kl: torch.Tensor  # KL(teacher || student)
    teacher_nll: torch.Tensor
    student_nll: torch.Tensor
    agree: torch.Tensor  # positions where the two argmax tokens agree
    predicted: torch.Tensor  # predicted positions
    blocks: torch.Tensor  # blocks with a predicted position
    block_kl: torch.Tensor  # sum over blocks of the block's mean KL
    block_kl_sq: torch.Tensor  # ... of its square
    block_agree: torch.Tensor  # ... of the block's agreement
    block_agree_sq: torch.Tensor

    PER_LAYER = ("err2", "update2", "cosine", "layer_tokens")  # the fields of shape [n]; the others are scalars

    @classmethod
    def zeros(cls, num_layers: int, device) -> "EvalSums":
        return cls(**{f.name: torch.zeros(num_layers if f.name in cls.PER_LAYER else (), dtype=torch.float64, device=device)
                      for f in dataclasses.fields(cls)})

    def all_reduced(self) -> "EvalSums":
        """The sums of every process (one collective over the fields flattened in their order)."""
        values = [getattr(self, f.name) for f in dataclasses.fields(self)]
        flat = all_reduce_sum(torch.cat([v.reshape(-1) for v in values]))
        parts = flat.split([v.numel() for v in values])
        return EvalSums(**{f.name: part.view(v.shape) for f, part, v in zip(dataclasses.fields(self), parts, values)})


@torch.no_grad()
def evaluate_sums(npt_model: NPTModel, blocks: torch.Tensor, batch_size: int, attention_mask: torch.Tensor | None = None) -> EvalSums:
    """The sums of `blocks` (none: zeros, for a process with no held-out block)."""
    device = npt_model.device
    sums = EvalSums.zeros(len(npt_model.npt_layers), device)
    # Logits chunk by chunk from the final hidden states, except under FSDP: its sharded LM head
    # is whole only inside the model's own forward.
    fused = not is_sharded(npt_model.model)
    head = LogitHead.of(npt_model.model) if fused else None
    for start in range(0, len(blocks), batch_size):
        x = blocks[start : start + batch_size].to(device)
        mask = None if attention_mask is None else attention_mask[start : start + batch_size].to(device)
        real = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
        records, t_out = capture_teacher(npt_model, x, mask, with_logits=not fused, with_final_hidden=fused)
        for k, (idx, layer) in enumerate(npt_model.npt_layers.items()):
            rec = records[idx]
            s, _ = layer.call("student_output", rec.inputs, rec.attn)
            s, t, h = s[real].float(), rec.outputs[real].float(), rec.inputs[real].float()
            sums.err2[k] += (s - t).pow(2).sum().double()
            sums.update2[k] += (t - h).pow(2).sum().double()
            sums.cosine[k] += F.cosine_similarity(s - h, t - h, dim=-1, eps=1e-12).sum().double()
            sums.layer_tokens[k] += real.sum()
        # the student starts from the teacher's hidden state below its lowest converted layer
        prefix = Prefix.of(npt_model, records)
        if fused:
            s_out = final_hidden(npt_model.model, x, mask, prefix)
        else:
            with starting_at(npt_model.model, prefix):
                s_out = npt_model(input_ids=x, attention_mask=mask, use_cache=False).logits
        valid = real[:, :-1] & real[:, 1:]
        per_row = next_token_sums(t_out[:, :-1], s_out[:, :-1], x[:, 1:], valid, head)  # [B, 4]
        counts = valid.sum(-1).double()
        kl, teacher_nll, student_nll, agree = per_row.sum(0).unbind()
        sums.kl += kl
        sums.teacher_nll += teacher_nll
        sums.student_nll += student_nll
        sums.agree += agree
        sums.predicted += counts.sum()
        used = counts > 0
        block_kl, block_agree = per_row[used, 0] / counts[used], per_row[used, 3] / counts[used]
        sums.blocks += used.sum()
        sums.block_kl += block_kl.sum()
        sums.block_kl_sq += block_kl.pow(2).sum()
        sums.block_agree += block_agree.sum()
        sums.block_agree_sq += block_agree.pow(2).sum()
    return sums


def finalize(sums: EvalSums, layers: list[int]) -> EvalResult:
    count = max(sums.predicted.item(), 1.0)
    return EvalResult(
        layers=list(layers),
        rel_error=[math.sqrt(e / max(u, 1e-300)) for e, u in zip(sums.err2.tolist(), sums.update2.tolist())],
        update_cosine=[c / max(t, 1.0) for c, t in zip(sums.cosine.tolist(), sums.layer_tokens.tolist())],
        kl=sums.kl.item() / count,
        teacher_ppl=math.exp(sums.teacher_nll.item() / count),
        student_ppl=math.exp(sums.student_nll.item() / count),
        tokens=int(count),
        top1_agreement=sums.agree.item() / count,
        kl_stderr=_stderr(sums.block_kl.item(), sums.block_kl_sq.item(), sums.blocks.item()),
        top1_stderr=_stderr(sums.block_agree.item(), sums.block_agree_sq.item(), sums.blocks.item()),
    )


def _stderr(total: float, squares: float, n: float) -> float:
    """Standard error of the mean of n samples given their sum and sum of squares (nan below 2)."""
    if n < 2:
        return float("nan")
    variance = max(squares - total * total / n, 0.0) / (n - 1)
    return math.sqrt(variance / n)


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
        return finalize(sums.all_reduced(), list(npt_model.npt_layers))
    finally:
        npt_model.train(was_training)


def layer_attribution(npt_model: NPTModel, blocks: torch.Tensor, batch_size: int = 8) -> list[dict]:
    """Per converted layer: the free-running KL and perplexity ratio with it reverted to its
    teacher layer, and with it alone converted (one evaluation each, 2 n in all)."""
    rows, layers = [], list(npt_model.npt_layers)
    for i in layers:
        with npt_model.converted_only(set(layers) - {i}):
            reverted = evaluate(npt_model, blocks, batch_size)
        with npt_model.converted_only({i}):
            alone = evaluate(npt_model, blocks, batch_size)
        rows.append({"layer": i, "kl_reverted": reverted.kl, "ratio_reverted": reverted.ppl_ratio, "kl_alone": alone.kl, "ratio_alone": alone.ppl_ratio})
    return rows


def attribution_table(rows: list[dict], kl: float, ppl_ratio: float) -> str:
    """`layer_attribution`'s rows as a markdown table, the fully converted model (`kl`, `ppl_ratio`) first."""
    lines = ["| layer | KL, this layer reverted (the others NPT) | ratio, reverted | KL, this layer alone NPT | ratio, alone |",
             "|---|---|---|---|---|", f"| all converted | {kl:.4f} | {ppl_ratio:.3f} | | |"]
    lines += [f"| {r['layer']} | {r['kl_reverted']:.4f} | {r['ratio_reverted']:.3f} | {r['kl_alone']:.4f} | {r['ratio_alone']:.3f} |" for r in rows]
    return "\n".join(lines)


@torch.no_grad()
def greedy_continuations(npt_model: NPTModel, prompts: torch.Tensor, new_tokens: int, pad_token_id: int | None,
                         synced: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy continuations [P, new_tokens] of equal-length `prompts` [P, L] by the teacher and by
    the free-running student. Both generate exactly `new_tokens` tokens (end-of-sequence is held
    back until then, for both alike), so that every position can be compared. `synced` (sharded
    models): every process keeps stepping until all have finished."""
    prompts = prompts.to(npt_model.device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_token_id,
                  synced_gpus=synced, attention_mask=torch.ones_like(prompts))
    with npt_model.teacher_mode():
        t = npt_model.generate(input_ids=prompts, **kwargs)[:, prompts.shape[1]:]
    s = npt_model.generate(input_ids=prompts, **kwargs)[:, prompts.shape[1]:]
    return t, s


def leading_matches(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per row, the number of leading positions where `t` and `s` hold the same token."""
    return (t == s).int().cumprod(-1).sum(-1)


def greedy_match(npt_model: NPTModel, tokenizer, blocks: torch.Tensor, num_prompts: int = 16, prompt_len: int = 32, new_tokens: int = 32,
                 synced: bool = False) -> tuple[float, list[dict]]:
    """The mean number of identical leading tokens of teacher and student greedy continuations
    of the first `num_prompts` held-out blocks' first `prompt_len` tokens, and the texts."""
    prompts = blocks[:num_prompts, : min(prompt_len, blocks.shape[1])]
    t, s = greedy_continuations(npt_model, prompts, new_tokens, tokenizer.pad_token_id, synced)
    matches = leading_matches(t, s).tolist()
    samples = [{"prompt": tokenizer.decode(p, skip_special_tokens=True), "teacher": tokenizer.decode(a, skip_special_tokens=True),
                "student": tokenizer.decode(b, skip_special_tokens=True), "identical_tokens": m}
               for p, a, b, m in zip(prompts.tolist(), t.tolist(), s.tolist(), matches)]
    return sum(matches) / max(len(matches), 1), samples


def measure_greedy(result: EvalResult, npt_model: NPTModel, tokenizer, blocks: torch.Tensor, num_prompts: int, new_tokens: int,
                   synced: bool = False) -> tuple[EvalResult, list[dict]]:
    """`result` with its greedy match measured (`greedy_match`: match, tokens, prompts), and the texts."""
    match, samples = greedy_match(npt_model, tokenizer, blocks, num_prompts, new_tokens=new_tokens, synced=synced)
    return dataclasses.replace(result, greedy_match=match, greedy_tokens=new_tokens, greedy_prompts=len(samples)), samples


def greedy_cell(record: dict) -> str:
    """A record's greedy match as a table cell ("-" when it was not measured)."""
    return f"{record['greedy_match']:.1f} / {record['greedy_tokens']}" if "greedy_match" in record else "-"
