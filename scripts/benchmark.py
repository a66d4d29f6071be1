#!/usr/bin/env python
"""Step cost of NPT equivalence pre-training, measured side by side.

    python scripts/benchmark.py                                   # embedded and mid-size shapes, CPU
    python scripts/benchmark.py --shapes llama-1b --device cuda --dtype bfloat16 --batch_size 8 --seq_len 1024
    python scripts/benchmark.py --model_name meta-llama/Llama-3.2-1B --device cuda --dtype bfloat16
    python scripts/benchmark.py --shapes mid --modulate gate --contenders original,free   # against the original design (the gate alone)
    python scripts/benchmark.py --scaling --shapes mid            # tokens/s and memory vs sequence length and batch size
    python scripts/benchmark.py --shapes smollm2-135m --batch_size 4 --seq_len 64 --contenders free --no_memory   # the real teacher's shape
    python scripts/benchmark.py --shapes embedded,smollm2-135m --compare_ranks 16x16,32x16,16x16-nogain --seq_len 64   # adapter sizes' step cost
    python scripts/benchmark.py --shapes embedded --compare_ranks 16x32,16x32+up,16x32+up+down,16x16+up   # the variants' step cost
    python scripts/benchmark.py --shapes smollm2-135m --npt_layers 26-29 --batch_size 4 --seq_len 64 --contenders free,free_full --no_memory
    python scripts/benchmark.py --shapes gemma3-270m --npt_layers 16-17 --batch_size 4 --seq_len 64 --contenders free,free_full --no_memory

For each shape: the teacher forward alone (the floor), the project's teacher-forced and
free-running training steps (forward, loss, backward, optimizer step) and, with `--contenders
original --modulate gate`, a faithful re-creation of the original design, alternated on the
same model and batch; tokens/s, the step / teacher-forward ratio and peak memory, as a
markdown table. Shapes use random weights (a speed benchmark needs no trained model). Each
contender's matmul work is counted and printed as GFLOP/s next to this machine's dense matmul
rate, measured in the same process and dtype on the shape's own MLP matmul: on small shapes the
FLOP count says little about the step, the fraction of the measured rate says how far each is
from what the hardware does on its largest matmul.

`free_full` is the free-running step as it was before the student reused the teacher's prefix
(it runs every layer from the embeddings; the result is the same, bit for bit): with only the upper
layers converted (`--npt_layers`), `free` against `free_full` is what the reuse saves.

The original design held two full model copies (teacher and student), took its targets from
`output_hidden_states` (a full forward with logits), ran every student layer completely (its
attention recomputed) on the teacher's hidden states with autograd recording everything. The
re-creation keeps all of that cost; its two correctness bugs are fixed (the last target is
taken before the final norm; HF builds the mask), so both designs compute the same per-layer
losses, which the tests check.

Timing alternates the contenders in one process on the same batch; peak memory is measured for
each contender in a fresh process (RSS above the interpreter's baseline on CPU, max allocated on
CUDA), so one contender's allocations cannot inflate another's.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from npt.architecture import decoder_layers, resolve_layers
from npt.config import Parser
from npt.kl import real_tokens
from npt.layer import parse_modulate
from npt.loading import DTYPES, load_model
from npt.losses import LayerTensors, LossConfig, NPTLoss
from npt.model import AdapterArguments, NPTModel
from npt.objective import EquivalenceObjective
from npt.provenance import provenance

SHAPES = {
    "tiny": dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2),
    # the embedded default teacher's shape
    "embedded": dict(vocab_size=2048, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4),
    "mid": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8),
    # Llama-3.2-1B's shape (random weights)
    # SmolLM2-135M's shape (random weights): 30 layers, vocabulary 49152, tied head
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, tie_word_embeddings=True, rope_theta=100000.0),
    # Gemma-3-270M's shape (random weights, Llama layers): 18 layers of hidden 640, a 262k vocabulary
    "gemma3-270m": dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                        num_key_value_heads=1, head_dim=256, tie_word_embeddings=True),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, rope_theta=500000.0),
}


@dataclasses.dataclass
class BenchSpec:
    shape: str = "embedded"  # a key of SHAPES, or a model name/path
    batch_size: int = 8
    seq_len: int = 128
    rank: int = AdapterArguments.adapter_rank
    num_ranks: int = AdapterArguments.num_ranks
    gate_gain: bool = AdapterArguments.gate_gain
    bottleneck_bias: bool = AdapterArguments.bottleneck_bias
    adapter_input: str = AdapterArguments.adapter_input
    modulation_scale: float = AdapterArguments.modulation_scale
    npt_layers: str = AdapterArguments.npt_layers
    modulate: str = AdapterArguments.modulate
    device: str = "cpu"
    dtype: str = "float32"
    loss_type: str = "improved_npt"
    seed: int = 0
    gradient_checkpointing: bool = False

    @property
    def compute_dtype(self) -> str:
        return self.dtype


def build_model(spec: BenchSpec):
    dtype = DTYPES[spec.dtype]
    torch.manual_seed(spec.seed)
    if spec.shape in SHAPES:
        model = AutoModelForCausalLM.from_config(model_config(spec), attn_implementation="sdpa", dtype=dtype)
    else:
        model, _ = load_model(spec.shape, dtype, spec.device)
    model.to(spec.device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@torch.no_grad()
def mid_training(npt_model: NPTModel, seed: int, scale: float = 0.05) -> None:
    """Random adapter weights, as mid-training: a fresh adapter (B_f = 0) adds nothing, so a
    contender that computed the delta wrongly would still agree with the others."""
    g = torch.Generator().manual_seed(seed)
    for p in npt_model.adapter_parameters():
        p.copy_(torch.randn(p.shape, generator=g).to(p) * scale)


class TeacherForward:
    name = "teacher forward (floor)"

    def __init__(self, model, spec: BenchSpec):
        self.model = model

    @torch.no_grad()
    def step(self, x: torch.Tensor) -> None:
        self.model.model(input_ids=x, use_cache=False)


class ProjectStep:
    name = "project step"
    free_running = False

    reuse_prefix = True

    def __init__(self, model, spec: BenchSpec):
        self.npt = NPTModel.convert(model, spec.npt_layers, spec.rank, spec.num_ranks, spec.modulation_scale, gate_gain=spec.gate_gain,
                                    modulate=spec.modulate, bottleneck_bias=spec.bottleneck_bias, adapter_input=spec.adapter_input)
        self.npt.set_gradient_checkpointing(spec.gradient_checkpointing)
        mid_training(self.npt, spec.seed + 1)
        loss = NPTLoss(LossConfig(loss_type=spec.loss_type, logit_kl_weight=1.0 if self.free_running else 0.0), len(self.npt.npt_config.layers))
        self.objective = EquivalenceObjective(self.npt, loss)
        self.objective.reuse_prefix = self.reuse_prefix
        self.opt = torch.optim.AdamW(list(self.npt.adapter_parameters()), lr=1e-4)
        self.autocast = spec.device.startswith("cuda") and spec.dtype != "float32"
        self.dtype = DTYPES[spec.dtype]

    def step(self, x: torch.Tensor) -> None:
        with torch.autocast(x.device.type, dtype=self.dtype, enabled=self.autocast):
            out = self.objective(x, None, step=10**9, free_running=self.free_running)
        out.objective.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def layer_losses(self, x: torch.Tensor) -> list[float]:
        with torch.no_grad():
            return self.objective(x, None, step=10**9).metrics["layer_loss"].tolist()


class FreeRunningStep(ProjectStep):
    """The default recipe's second phase: the student runs as deployed (its own attention on its
    own hidden states, the backward through every layer) and the logit KL is added. Not part of
    the original design's comparison, which was teacher-forced; reported so its cost is known."""

    name = "project step, free-running + logit KL"
    free_running = True


class FreeRunningStepFull(FreeRunningStep):
    """The free-running step with the student run from the embeddings, as before it reused the
    teacher's hidden state below the lowest converted layer (same result)."""

    name = "project step, free-running + logit KL, from the embeddings"
    reuse_prefix = False


class ProjectStepBF16(ProjectStep):
    """The teacher-forced step under bfloat16 autocast, over the same weights (`--mixed_precision
    bf16`; on CPU it pays where the CPU multiplies bfloat16 natively, e.g. AVX512-BF16)."""

    name = "project step, bf16 autocast"
    compute_dtype = "bfloat16"

    def __init__(self, model, spec: BenchSpec):
        super().__init__(model, spec)
        self.autocast, self.dtype = True, torch.bfloat16


class FreeRunningStepBF16(FreeRunningStep):
    name = "project step, free-running + logit KL, bf16 autocast"
    compute_dtype = "bfloat16"

    def __init__(self, model, spec: BenchSpec):
        super().__init__(model, spec)
        self.autocast, self.dtype = True, torch.bfloat16


class OriginalStep:
    name = "original design"

    def __init__(self, model, spec: BenchSpec, adapters: dict | None = None):
        self.teacher = model
        student = copy.deepcopy(model)  # the second full copy of the weights
        if spec.npt_layers != "all" or parse_modulate(spec.modulate) != ("gate",):
            raise SystemExit("--contenders original re-creates a design that converted every layer and modulated the gate only, so it is "
                             "compared with a project step that does the same: add --modulate gate and drop --npt_layers (or drop 'original').")
        self.student = NPTModel.convert(student, "all", spec.rank, spec.num_ranks, spec.modulation_scale, gate_gain=spec.gate_gain, modulate="gate")
        if adapters is not None:
            self.student.load_adapter_state_dict(adapters)
        else:
            mid_training(self.student, spec.seed + 1)
        self.loss = NPTLoss(LossConfig(loss_type=spec.loss_type), len(self.student.npt_config.layers))
        self.opt = torch.optim.AdamW(list(self.student.adapter_parameters()), lr=1e-4)
        self.autocast = spec.device.startswith("cuda") and spec.dtype != "float32"
        self.dtype = DTYPES[spec.dtype]

    def _losses(self, x: torch.Tensor):
        last = {}
        hook = decoder_layers(self.teacher)[-1].register_forward_hook(lambda m, a, o: last.__setitem__("t", o))
        with torch.no_grad():
            hidden = self.teacher(input_ids=x, output_hidden_states=True, use_cache=False).hidden_states
        hook.remove()
        targets = list(hidden[1:-1]) + [last["t"]]  # hidden[-1] has the final norm applied: the original's bug, fixed
        base = self.student.model.model
        pos = torch.arange(x.shape[1], device=x.device)[None]
        emb = base.rotary_emb(hidden[0], pos)
        layers = []
        for i, layer in self.student.npt_layers.items():
            h = hidden[i].detach().requires_grad_(True)  # everything recorded, as in the original
            attn = layer.attention(h, attention_mask=None, position_embeddings=emb, position_ids=pos)  # recomputed
            s = naive_npt_output(layer, h, attn)
            t, hh = real_tokens(targets[i], None), real_tokens(h, None)
            layers.append(LayerTensors(real_tokens(s, None), t, hh, (t - hh).pow(2).mean().detach()))
        return self.loss(layers, torch.zeros(len(layers), device=x.device), None, step=10**9)

    def step(self, x: torch.Tensor) -> None:
        with torch.autocast(x.device.type, dtype=self.dtype, enabled=self.autocast):
            out = self._losses(x)
        out.objective.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def layer_losses(self, x: torch.Tensor) -> list[float]:
        return self._losses(x).metrics["layer_loss"].tolist()


def naive_npt_output(layer, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """The NPT formula as written, with plain autograd: v_m and v_f formed per token, the MLP as
    one generic graph (the original design had neither of the project's shortcuts)."""
    mlp, ad = layer.layer.mlp, layer.adapter
    x = layer.layer.post_attention_layernorm(h)
    attn = layer.adapter_input(h, attn)
    v_m, v_f = ad.vectors(attn)
    coef = torch.einsum("...kd,...d->...k", v_m, x.to(v_m.dtype))
    delta = ad.scale * torch.einsum("...k,...kf->...f", coef, v_f)
    gate = mlp.gate_proj(x) * (1 + ad.gamma(attn).unsqueeze(-1)).to(x.dtype)  # the gain (zero without one)
    return h + mlp.down_proj(mlp.act_fn(gate + delta.to(x.dtype)) * mlp.up_proj(x))


CONTENDERS = {"teacher": TeacherForward, "project": ProjectStep, "original": OriginalStep, "free": FreeRunningStep,
              "free_full": FreeRunningStepFull, "project_bf16": ProjectStepBF16, "free_bf16": FreeRunningStepBF16}
FLOPS_AS = {"project_bf16": "project", "free_bf16": "free"}  # the same matmul work as


def make_batch(model, spec: BenchSpec) -> torch.Tensor:
    g = torch.Generator().manual_seed(spec.seed)
    return torch.randint(0, model.config.vocab_size, (spec.batch_size, spec.seq_len), generator=g).to(spec.device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_contenders(spec: BenchSpec, rounds: int = 5, steps: int = 3, warmup: int = 2, which=("teacher", "project", "original")) -> dict[str, float]:
    """Median seconds per step of each contender, alternating them round by round."""
    model = build_model(spec)
    x = make_batch(model, spec)
    # The project converts `model` in place; the original design gets its own teacher copy here
    # (and its student copy on top). Memory is measured per contender in separate processes.
    # The free-running contender converts its own copy too (its adapters are the same).
    # contenders that convert the model build on their own copy; the project step converts `model`
    built = {k: CONTENDERS[k](copy.deepcopy(model) if k not in ("teacher", "project") else model, spec)
             for k in (*(k for k in which if k not in ("teacher", "project")), "teacher", "project") if k in which}
    return alternate({k: built[k] for k in which}, x, spec.device, rounds, steps, warmup)


def alternate(contenders: dict, x: torch.Tensor, device: str, rounds: int, steps: int, warmup: int) -> dict[str, float]:
    """Median seconds per step of each contender, timed round by round in turn on the batch `x`."""
    for c in contenders.values():
        for _ in range(warmup):
            c.step(x)
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(rounds):
        for key, c in contenders.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                c.step(x)
            _sync(device)
            times[key].append((time.perf_counter() - t0) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_and_reset_peak() -> None:
    """Return freed heap pages to the OS and restart the kernel's peak-RSS (VmHWM) counter, so
    the peak measured afterwards is that of training steps, not of building a random model."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure_memory_here(spec: BenchSpec, contender: str, steps: int = 2) -> float:
    """Peak memory (MB) of one contender's training steps, in this process: resident memory above
    the interpreter's baseline (weights, activations, optimizer state) on CPU, max allocated on CUDA."""
    cuda = spec.device.startswith("cuda")
    warm = build_model(dataclasses.replace(spec, shape="tiny"))  # imports the modeling code before the baseline
    warm_step = CONTENDERS[contender](warm, dataclasses.replace(spec, shape="tiny"))
    warm_step.step(make_batch(warm, dataclasses.replace(spec, shape="tiny", seq_len=8)))
    del warm, warm_step
    _release_and_reset_peak()
    baseline = _status_mb("VmRSS")
    model = build_model(spec)
    x = make_batch(model, spec)
    c = CONTENDERS[contender](model, spec)
    c.step(x)  # the first step allocates optimizer state
    _sync(spec.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        _release_and_reset_peak()
    for _ in range(steps):
        c.step(x)
    _sync(spec.device)
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**20
    return _status_mb("VmHWM") - baseline


def measure_memory(spec: BenchSpec, contender: str) -> float:
    """`measure_memory_here` in a fresh interpreter (this script in its child mode)."""
    # Large blocks go to mmap and back to the OS when freed, so resident memory tracks live
    # tensors instead of the heap's high-water mark (the same for every contender).
    env = os.environ | {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}
    cmd = [sys.executable, os.path.abspath(__file__), "--memory_child", json.dumps({"spec": dataclasses.asdict(spec), "contender": contender})]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def model_config(spec: BenchSpec):
    if spec.shape in SHAPES:
        return LlamaConfig(max_position_embeddings=max(4096, spec.seq_len), **SHAPES[spec.shape])
    return AutoConfig.from_pretrained(spec.shape)


def step_flops(spec: BenchSpec) -> dict[str, float]:
    """Matmul FLOPs of one step of each contender: the teacher forward (decoder layers, no LM
    head), the project's teacher-forced step (plus, per converted layer, the student MLP forward,
    its input-gradient backward, the adapter), the original design (its student attention again,
    every backward through it) and the free-running step (teacher and student forwards, the
    student's input-gradient backward from the lowest converted layer up, the LM head for the
    logit KL; `free` starts the student at the lowest converted layer, `free_full` at the
    embeddings)."""
    c = model_config(spec)
    n = spec.batch_size * spec.seq_len
    d, f, L, V = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    converted = resolve_layers(spec.npt_layers, L)
    C, S = len(converted), L - min(converted)  # converted layers; layers from the lowest converted one up
    hd = getattr(c, "head_dim", None) or d // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    attn_proj = 2 * n * d * (2 * q + 2 * kv)
    attn_scores = 2 * 2 * spec.batch_size * c.num_attention_heads * hd * spec.seq_len * (spec.seq_len + 1) / 2
    mlp = 2 * n * 3 * d * f
    adapter = 2 * n * (d * spec.rank + len(parse_modulate(spec.modulate)) * spec.num_ranks * spec.rank * (d + f))  # each modulation: d + f wide
    layer = attn_proj + attn_scores + mlp
    teacher = L * layer
    student_tf = C * (mlp + 2 * n * d * f + 3 * adapter)  # forward MLP, backward through W_d, adapter fwd + bwd
    # the original: the student layer again (attention included), backward through all of it
    original = teacher + C * (layer + 3 * adapter + (attn_proj + 2 * attn_scores + mlp))
    head = 2 * n * d * V
    # free-running: student forward, its input-gradient backward (~ the forward's matmuls, scores
    # twice) through the layers above the lowest converted one, teacher and student heads, head backward
    backward = S * (attn_proj + 2 * attn_scores + mlp) + C * 2 * adapter
    free = teacher + S * layer + C * adapter + backward + 3 * head
    return {"teacher": teacher, "project": teacher + student_tf, "original": original, "free": free, "free_full": free + (L - S) * layer}


def matmul_rate(spec: BenchSpec, dtype_name: str, repeats: int = 20) -> float:
    """This machine's dense matmul rate (FLOP/s) on the run's device in `dtype_name`, on the
    shape's own largest matmul: [batch x seq, d_model] @ [d_model, d_ffn]. The best of `repeats`."""
    c = model_config(spec)
    dtype = DTYPES[dtype_name]
    n, d, f = spec.batch_size * spec.seq_len, c.hidden_size, c.intermediate_size
    a = torch.randn(n, d, device=spec.device, dtype=dtype)
    b = torch.randn(d, f, device=spec.device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        _sync(spec.device)
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b
        _sync(spec.device)
        best = min(best, (time.perf_counter() - t0) / 5)
    return 2 * n * d * f / best


def gflops(flops_per_s: float) -> str:
    """GFLOP/s to one decimal, or two significant digits below 1 (tiny shapes on a busy CPU)."""
    g = flops_per_s / 1e9
    return f"{g:.1f}" if g >= 1 else f"{g:.2g}"


def report(spec: BenchSpec, times: dict[str, float], memory: dict[str, float] | None, rates: dict[str, float] | None = None) -> str:
    tokens = spec.batch_size * spec.seq_len
    lines = [
        f"**{spec.shape}** (batch {spec.batch_size} x {spec.seq_len} tokens, NPT layers {spec.npt_layers}, r={spec.rank}, k={spec.num_ranks}, "
        f"{'' if spec.modulate == 'gate' else 'modulating ' + spec.modulate + ', '}{'' if spec.gate_gain else 'no gate gain, '}{'bottleneck bias, ' if spec.bottleneck_bias else ''}{'' if spec.adapter_input == 'attention' else 'adapter input ' + spec.adapter_input + ', '}{'' if spec.modulation_scale == 1.0 else f's={spec.modulation_scale:g}, '}{spec.device}, {spec.dtype}"
        f"{', gradient checkpointing' if spec.gradient_checkpointing else ''})",
        "",
        "| contender | ms / step | tokens/s | step / teacher forward | GFLOP/s | of the matmul rate | peak memory (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    flops = step_flops(spec)
    for key, step_cls in CONTENDERS.items():
        if key not in times:
            continue
        mem = f"{memory[key]:.0f}" if memory and key in memory else "-"
        achieved = flops[FLOPS_AS.get(key, key)] / times[key]
        rate = rates.get(getattr(step_cls, "compute_dtype", spec.compute_dtype)) if rates else None
        share = f"{achieved / rate:.0%}" if rate else "-"
        lines.append(f"| {step_cls.name} | {times[key] * 1e3:.1f} | {tokens / times[key]:.0f} | {times[key] / times['teacher']:.2f} | "
                     f"{gflops(achieved)} | {share} | {mem} |")
    lines.append("")
    for dtype, rate in (rates or {}).items():
        lines.append(f"Dense matmul rate measured here ({dtype}, [{tokens} x {model_config(spec).hidden_size}] @ "
                     f"[{model_config(spec).hidden_size} x {model_config(spec).intermediate_size}]): {gflops(rate)} GFLOP/s.")
    if "free_full" in times and "free" in times:
        lines.append(f"Free-running step started at the lowest converted layer vs from the embeddings: {times['free_full'] / times['free']:.2f}x the tokens/s.")
    if "original" in times:
        mem_ratio = f", {memory['project'] / memory['original']:.2f}x its peak memory" if memory else ""
        lines.append(f"Project vs original: {times['original'] / times['project']:.2f}x the tokens/s{mem_ratio}.")
    return "\n".join(lines)


@dataclasses.dataclass
class BenchArguments:
    shapes: str = dataclasses.field(default="embedded,mid", metadata={"help": f"comma-separated: {', '.join(SHAPES)}"})
    model_name: str | None = dataclasses.field(default=None, metadata={"help": "benchmark this model (hub id or folder) instead of --shapes"})
    batch_size: int | None = dataclasses.field(default=None, metadata={"help": "default: 8 (embedded), 4 (others)"})
    seq_len: int | None = dataclasses.field(default=None, metadata={"help": "default: 128 (embedded), 512 (others)"})
    device: str = dataclasses.field(default="cuda" if torch.cuda.is_available() else "cpu", metadata={"help": "cpu or cuda"})
    dtype: str | None = dataclasses.field(default=None, metadata={"help": "default: bfloat16 on CUDA, float32 on CPU"})
    gradient_checkpointing: bool = dataclasses.field(default=False, metadata={"help": "the project step with --gradient_checkpointing"})
    rounds: int = 5
    steps: int = 3
    no_memory: bool = dataclasses.field(default=False, metadata={"help": "skip the per-contender memory processes"})
    contenders: str = dataclasses.field(default="teacher,project,free", metadata={
        "help": "comma-separated; 'free' is the default recipe's free-running step with the logit KL, 'free_full' the same run from the embeddings "
                "(as before the teacher's prefix was reused), 'original' the original design (every layer, the gate alone: with --modulate gate), "
                "'project_bf16' and 'free_bf16' under bfloat16 autocast (teacher and project are always run)"})
    scaling: bool = dataclasses.field(default=False, metadata={"help": "also tokens/s and memory against sequence length and batch size"})
    peak_tflops: float | None = dataclasses.field(default=None, metadata={"help": "the device's dense peak, for the fraction of ideal FLOP rate (H100 bf16: 989)"})
    compare_ranks: str | None = dataclasses.field(default=None, metadata={
        "help": "instead of the contenders: the default recipe's free-running step at each adapter size r x k (e.g. 16x16,32x16; 16x16-nogain: without the gate gain; 16x32+up, 16x32+up+down: dual and triple modulation), side by side"})
    output_json: str | None = dataclasses.field(default=None, metadata={"help": "also write the figures, each shape's printed report and the provenance (command, commit, date, machine) to this file"})
    memory_child: str | None = dataclasses.field(default=None, metadata={"help": argparse.SUPPRESS})


def main(argv: list[str] | None = None) -> int:
    args, adapter = parse(argv)
    if args.memory_child:  # one contender's memory, in this fresh process
        job = json.loads(args.memory_child)
        print(json.dumps(measure_memory_here(BenchSpec(**job["spec"]), job["contender"])))
        return 0
    shapes = [args.model_name] if args.model_name else args.shapes.split(",")
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads\n")
    records = []
    for shape in shapes:
        spec = spec_for(shape, args, adapter)
        record = {"spec": dataclasses.asdict(spec)}
        if args.compare_ranks:
            record["report"] = rank_costs(spec, parse_sizes(args.compare_ranks), args.rounds, args.steps)
            print(record["report"])
        else:
            which = tuple(k for k in CONTENDERS if k in {"teacher", "project", *args.contenders.split(",")})
            times = time_contenders(spec, args.rounds, args.steps, which=which)
            memory = None if args.no_memory else {k: measure_memory(spec, k) for k in which}
            dtypes = {spec.compute_dtype} | {getattr(CONTENDERS[k], "compute_dtype", spec.compute_dtype) for k in which}
            rates = {d: matmul_rate(spec, d) for d in sorted(dtypes)}
            record |= {"seconds_per_step": times, "peak_memory_mb": memory, "matmul_flops_per_s": rates, "flops_per_step": step_flops(spec),
                       "report": report(spec, times, memory, rates)}
            print(record["report"])
            if args.peak_tflops:  # a device's datasheet peak (a GPU's), next to the measured matmul rate
                achieved = record["flops_per_step"]["project"] / times["project"] / 1e12
                record["peak_tflops"] = args.peak_tflops
                print(f"Project step: {achieved:.1f} TFLOP/s of matmul work, {achieved / args.peak_tflops:.1%} of the {args.peak_tflops:g} TFLOP/s peak.")
            print()
            if args.scaling:
                record["scaling_report"] = scaling(spec, args)
                print(record["scaling_report"])
        records.append(record)
    if args.output_json:
        dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
        Path(args.output_json).write_text(json.dumps({"kind": "benchmark", "provenance": provenance(args.device, dtype), "shapes": records}, indent=2) + "\n")
        print(f"Written: {args.output_json}")
    return 0


def parse(argv: list[str] | None) -> tuple[BenchArguments, AdapterArguments]:
    parser = Parser([BenchArguments, AdapterArguments], prog="scripts/benchmark.py", description=__doc__)  # the commands' own flags (--no-gate_gain)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parsed = parser.parse_into(argv)
    args, adapter = parsed[BenchArguments], parsed[AdapterArguments]
    check_adapter_flags(adapter)
    return args, adapter


def spec_for(shape: str, args: BenchArguments, adapter: AdapterArguments) -> BenchSpec:
    """The benchmark of one shape, with every adapter flag the command line gave."""
    small = shape == "embedded"
    return BenchSpec(shape=shape, batch_size=args.batch_size or (8 if small else 4), seq_len=args.seq_len or (128 if small else 512),
                     rank=adapter.adapter_rank, num_ranks=adapter.num_ranks, gate_gain=adapter.gate_gain, bottleneck_bias=adapter.bottleneck_bias, adapter_input=adapter.adapter_input,
                     modulation_scale=adapter.modulation_scale, npt_layers=adapter.npt_layers, modulate=adapter.modulate, device=args.device,
                     dtype=args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"),
                     gradient_checkpointing=args.gradient_checkpointing)


def check_adapter_flags(adapter: AdapterArguments) -> None:
    """Every adapter flag is honoured (r, k, the gain, the scale, the layers, the modulated projections) but the initialisation:
    the benchmark draws random adapters, so --adapter_init would change nothing, and is refused."""
    if adapter.adapter_init != AdapterArguments.adapter_init:
        raise SystemExit(f"--adapter_init {adapter.adapter_init}: the benchmark times random adapters, so the initialisation changes nothing; drop the flag.")


@dataclasses.dataclass(frozen=True)
class AdapterSize:
    rank: int
    num_ranks: int
    gate_gain: bool = True
    modulate: str = "gate"
    bottleneck_bias: bool = False

    @property
    def name(self) -> str:
        extra = "".join("+" + p for p in self.modulate.split(",")[1:])
        return f"{self.rank}x{self.num_ranks}{extra}" + ("" if self.gate_gain else "-nogain") + ("-bias" if self.bottleneck_bias else "")


def parse_sizes(text: str) -> list[AdapterSize]:
    """'16x16,32x16,16x16-nogain,16x16+up,16x16+up+down,16x16-bias': adapter rank r x number of
    rank-1 terms k, with the gain unless the size has -nogain, with the bottleneck bias where it has
    -bias, modulating the gate and the projections named after + (up: dual, up+down: triple)."""
    sizes = []
    for item in text.split(","):
        size, *suffixes = item.strip().lower().split("-")
        size, *extra = size.split("+")
        try:
            r, k = (int(v) for v in size.split("x"))
        except ValueError:
            r = k = 0
        if min(r, k) < 1 or not set(suffixes) <= {"nogain", "bias"} or any(p not in ("up", "down") for p in extra):
            raise SystemExit(f"--compare_ranks {text!r}: expected sizes r x k such as 16x16,32x16 (16x16-nogain: without the gate gain; "
                             "16x16-bias: with the bottleneck bias; 16x16+up, 16x16+up+down: dual and triple modulation).")
        sizes.append(AdapterSize(r, k, "nogain" not in suffixes, ",".join(["gate", *extra]), "bias" in suffixes))
    return sizes


def rank_costs(spec: BenchSpec, sizes: list[AdapterSize], rounds: int = 5, steps: int = 3, warmup: int = 2) -> str:
    """The free-running step (the default recipe's dearer phase) at each adapter size and variant,
    each on its own copy of the same model, alternated round by round on one batch, against the
    teacher forward."""
    model = build_model(spec)
    x = make_batch(model, spec)
    contenders = {"teacher": TeacherForward(model, spec)}
    specs = {size.name: dataclasses.replace(spec, rank=size.rank, num_ranks=size.num_ranks, gate_gain=size.gate_gain, modulate=size.modulate,
                                     bottleneck_bias=size.bottleneck_bias)
             for size in sizes}
    for name, sized in specs.items():
        contenders[name] = FreeRunningStep(copy.deepcopy(model), sized)
    med = alternate(contenders, x, spec.device, rounds, steps, warmup)
    rate = matmul_rate(spec, spec.compute_dtype)
    first = sizes[0].name
    rows = [f"Adapter size on {spec.shape} ({spec.batch_size} x {spec.seq_len} tokens, NPT layers {spec.npt_layers}, {spec.dtype}, {spec.device}): "
            "the free-running step, side by side",
            "", f"| adapter r x k | adapter parameters | s / step | tokens/s | step / teacher forward | step / {first} step | of the matmul rate |",
            "|---|---|---|---|---|---|---|"]
    tokens = spec.batch_size * spec.seq_len
    for key, sized in specs.items():
        c = contenders[key]
        share = step_flops(sized)["free"] / med[key] / rate
        params = sum(p.numel() for p in c.npt.adapter_parameters())
        rows.append(f"| {key} | {params:,} | {med[key]:.3f} | {tokens / med[key]:.0f} | {med[key] / med['teacher']:.2f} | {med[key] / med[first]:.2f} | {share:.0%} |")
    rows += ["", f"Dense matmul rate measured here ({spec.compute_dtype}): {rate / 1e9:.1f} GFLOP/s."]
    return "\n".join(rows) + "\n"


def scaling(spec: BenchSpec, args) -> str:
    rows = ["| batch x seq | tokens/s (project step) | step / teacher forward | of the matmul rate | peak memory (MB) |", "|---|---|---|---|---|"]
    grid = [(1, s) for s in (256, 512, 1024, 2048)] + [(b, 256) for b in (2, 4, 8)]
    for b, s in grid:
        sp = dataclasses.replace(spec, batch_size=b, seq_len=s)
        t = time_contenders(sp, args.rounds, max(1, args.steps - 1), warmup=1, which=("teacher", "project"))
        mem = "-" if args.no_memory else f"{measure_memory(sp, 'project'):.0f}"
        share = step_flops(sp)["project"] / t["project"] / matmul_rate(sp, sp.compute_dtype)
        rows.append(f"| {b} x {s} | {b * s / t['project']:.0f} | {t['project'] / t['teacher']:.2f} | {share:.0%} | {mem} |")
    return f"Scaling of the project step ({spec.shape}):\n\n" + "\n".join(rows) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
