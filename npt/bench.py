"""Benchmark of one training step: the project's design against the teacher forward (the floor)
and against a faithful re-creation of the original design.

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

import copy
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from .capture import capture_teacher
from .losses import LayerTensors, LossConfig, NPTLoss
from .model import NPTModel, decoder_layers
from .objective import EquivalenceObjective, real_tokens

SHAPES = {
    "tiny": dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2),
    # the embedded default teacher's shape
    "embedded": dict(vocab_size=2048, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4),
    "mid": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8),
    # Llama-3.2-1B's shape (random weights)
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, rope_theta=500000.0),
}


@dataclasses.dataclass
class BenchSpec:
    shape: str = "embedded"  # a key of SHAPES, or a model name/path
    batch_size: int = 8
    seq_len: int = 128
    rank: int = 16
    num_ranks: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    loss_type: str = "improved_npt"
    seed: int = 0
    gradient_checkpointing: bool = False


def build_model(spec: BenchSpec):
    from transformers import AutoModelForCausalLM

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec.dtype]
    torch.manual_seed(spec.seed)
    if spec.shape in SHAPES:
        model = AutoModelForCausalLM.from_config(model_config(spec), attn_implementation="sdpa", dtype=dtype)
    else:
        from .loading import load_model

        model, _ = load_model(spec.shape, dtype, spec.device)
    model.to(spec.device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _randomize_adapters(npt: NPTModel, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in npt.adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=g).to(p) * 0.05)


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

    def __init__(self, model, spec: BenchSpec):
        self.npt = NPTModel.convert(model, "all", spec.rank, spec.num_ranks)
        self.npt.set_gradient_checkpointing(spec.gradient_checkpointing)
        _randomize_adapters(self.npt, spec.seed)
        loss = NPTLoss(LossConfig(loss_type=spec.loss_type, curriculum_steps=0), len(self.npt.npt_config.layers))
        self.objective = EquivalenceObjective(self.npt, loss, logit_kl_weight=1.0 if self.free_running else 0.0)
        self.opt = torch.optim.AdamW(list(self.npt.adapter_parameters()), lr=1e-4)
        self.autocast = spec.device.startswith("cuda") and spec.dtype != "float32"
        self.dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(spec.dtype, torch.float32)

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


class OriginalStep:
    name = "original design"

    def __init__(self, model, spec: BenchSpec, adapters: dict | None = None):
        self.teacher = model
        student = copy.deepcopy(model)  # the second full copy of the weights
        self.student = NPTModel.convert(student, "all", spec.rank, spec.num_ranks)
        if adapters is not None:
            self.student.load_adapter_state_dict(adapters)
        else:
            _randomize_adapters(self.student, spec.seed)
        self.loss = NPTLoss(LossConfig(loss_type=spec.loss_type, curriculum_steps=0), len(self.student.npt_config.layers))
        self.opt = torch.optim.AdamW(list(self.student.adapter_parameters()), lr=1e-4)
        self.autocast = spec.device.startswith("cuda") and spec.dtype != "float32"
        self.dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(spec.dtype, torch.float32)

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
    v_m, v_f = ad.vectors(attn)
    coef = torch.einsum("...kd,...d->...k", v_m, x.to(v_m.dtype))
    delta = ad.scale * torch.einsum("...k,...kf->...f", coef, v_f)
    return h + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x) + delta.to(x.dtype)) * mlp.up_proj(x))


CONTENDERS = {"teacher": TeacherForward, "project": ProjectStep, "original": OriginalStep, "free": FreeRunningStep}


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
    built = {k: CONTENDERS[k](copy.deepcopy(model) if k in ("original", "free") else model, spec)
             for k in ("original", "free", "teacher", "project") if k in which}
    contenders = {k: built[k] for k in which}
    for c in contenders.values():
        for _ in range(warmup):
            c.step(x)
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(rounds):
        for key, c in contenders.items():
            _sync(spec.device)
            t0 = time.perf_counter()
            for _ in range(steps):
                c.step(x)
            _sync(spec.device)
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
    """`measure_memory_here` in a fresh interpreter."""
    code = (
        "import json,sys; from npt.bench import BenchSpec, measure_memory_here; "
        f"print(json.dumps(measure_memory_here(BenchSpec(**json.loads(sys.argv[1])), {contender!r})))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # Large blocks go to mmap and back to the OS when freed, so resident memory tracks live
    # tensors instead of the heap's high-water mark (the same for every contender).
    env = os.environ | {"PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(dataclasses.asdict(spec))], capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def model_config(spec: BenchSpec):
    from transformers import AutoConfig, LlamaConfig

    if spec.shape in SHAPES:
        return LlamaConfig(max_position_embeddings=max(4096, spec.seq_len), **SHAPES[spec.shape])
    return AutoConfig.from_pretrained(spec.shape)


def step_flops(spec: BenchSpec) -> dict[str, float]:
    """Matmul FLOPs of one step: the teacher forward (decoder layers, no LM head) and the project's
    extra work (student MLP forward, its input-gradient backward, the adapter)."""
    c = model_config(spec)
    n = spec.batch_size * spec.seq_len
    d, f, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    hd = getattr(c, "head_dim", None) or d // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    attn_proj = 2 * n * d * (2 * q + 2 * kv)
    attn_scores = 2 * 2 * spec.batch_size * c.num_attention_heads * hd * spec.seq_len * (spec.seq_len + 1) / 2
    mlp = 2 * n * 3 * d * f
    teacher = L * (attn_proj + attn_scores + mlp)
    adapter = 2 * n * (d * spec.rank + d * spec.num_ranks * spec.rank + spec.num_ranks * spec.rank * f)
    student = L * (mlp + 2 * n * d * f + 3 * adapter)  # forward MLP, backward through W_d, adapter fwd + bwd
    return {"teacher": teacher, "project": teacher + student}


def report(spec: BenchSpec, times: dict[str, float], memory: dict[str, float] | None) -> str:
    tokens = spec.batch_size * spec.seq_len
    lines = [
        f"**{spec.shape}** (batch {spec.batch_size} x {spec.seq_len} tokens, r={spec.rank}, k={spec.num_ranks}, {spec.device}, {spec.dtype}"
        f"{', gradient checkpointing' if spec.gradient_checkpointing else ''})",
        "",
        "| contender | ms / step | tokens/s | step / teacher forward | peak memory (MB) |",
        "|---|---|---|---|---|",
    ]
    for key, step_cls in CONTENDERS.items():
        if key not in times:
            continue
        mem = f"{memory[key]:.0f}" if memory and key in memory else "-"
        name = step_cls.name
        lines.append(f"| {name} | {times[key] * 1e3:.1f} | {tokens / times[key]:.0f} | {times[key] / times['teacher']:.2f} | {mem} |")
    flops = step_flops(spec)
    lines.append("")
    if "original" in times:
        mem_ratio = f", {memory['project'] / memory['original']:.2f}x its peak memory" if memory else ""
        lines.append(f"Project vs original: {times['original'] / times['project']:.2f}x the tokens/s{mem_ratio}. ")
    lines[-1] += f"Matmul FLOPs put the project step's floor at {flops['project'] / flops['teacher']:.2f}x the teacher forward."
    return "\n".join(lines)
