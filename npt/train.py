"""The training loop: config -> model + data -> step -> loss -> logs and checkpoints.

`train(cfg)` reads top to bottom: `setup` builds everything and refuses bad input before anything
is written; `fit` runs optimizer steps of `gradient_accumulation_steps` micro-batches, logging,
evaluating and checkpointing on optimizer steps; `finish` saves the best held-out adapters and
the summary. With several processes (torchrun or accelerate launch) the same code runs on each:
DDP by default, FSDP with `--fsdp`.

No run ends worse than it began. After each log, run of non-finite steps and held-out evaluation
the divergence policy (divergence.py) says whether training diverged; the run then rolls back to
the state of the last good evaluation (adapters, optimizer and random streams), with its learning
rate times `--rollback_lr_factor`, at most `--max_rollbacks` times; the step count goes on (the
schedules and the time budget stay as they were), and the data moves on to fresh batches. The
run evaluates where teacher forcing ends, so that a free-running rate the model does not bear
(its training KL doubling within steps) goes back to the state free-running started from, not
to an earlier one, and tries again at the lower rate. The final adapter/ holds the adapters with
the lowest held-out KL seen.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.tracking import get_available_trackers
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from . import logs
from .checkpoint import apply_state, checkpoint_dir, collect_state, list_checkpoints, load_checkpoint, restore_training, save_checkpoint
from .config import Config, changed_recipe
from .data import TrainStream, block_convention, heldout_blocks, open_source, with_default_dataset
from .divergence import DivergencePolicy, Verdict
from .distributed import all_reduce_mean, all_reduce_sum, full_tensor, gather_objects, gradient_sync, shard
from .errors import NPTError
from .evaluate import EvalResult, evaluate, measure_greedy
from .loading import dtype_name, load_model
from .losses import NPTLoss
from .metrics import IntervalMeans, Tracker, to_tags
from .model import NPTModel
from .monitor import ConvergenceMonitor
from .objective import EquivalenceObjective, calibrate_adapters
from .optim import build_optimizer, reset_moments, set_learning_rate, unwrapped
from .provenance import provenance
from .run import GracefulStop, Interrupted, checkpoint_to_resume, clear_previous_run, resolve_device, resolve_output_dir
from .schedules import converted_count
from .serialization import read_adapter_config
from .teachers import EMBEDDED_NAME

CALIBRATION_BLOCKS = 16
logger = logging.getLogger(__name__)


class TooManyBadSteps(NPTError):
    pass


@dataclasses.dataclass
class Progress:
    step: int = 0  # optimizer steps taken
    tokens_seen: int = 0
    train_seconds: float = 0.0  # time in training steps (not evaluation, checkpoints or samples)
    skipped_steps: int = 0  # non-finite steps skipped in total
    consecutive_bad: int = 0
    lr_scale: float = 1.0  # lowered by each rollback
    # the step where the free-running phase last started: at the switch, or where a rollback to a
    # teacher-forced state starts it again (AdamW's moments are cleared there, its warm-up counts from there)
    free_running_since: int | None = None
    rollbacks: list = dataclasses.field(default_factory=list)  # the rollbacks done
    unrecovered: list = dataclasses.field(default_factory=list)  # divergences seen with no rollback left


@dataclasses.dataclass
class Run:
    """Everything `setup` builds; the loop advances `progress` and keeps the records below."""

    cfg: Config
    accelerator: Accelerator
    out: Path
    resume: Path | None
    npt: NPTModel
    tokenizer: object
    objective: torch.nn.Module  # as prepared: DDP-wrapped, or sharded in place (FSDP)
    objective_module: EquivalenceObjective
    loss: NPTLoss
    optimizer: torch.optim.Optimizer
    stream: TrainStream
    eval_blocks: torch.Tensor
    data_name: str
    progress: Progress = dataclasses.field(default_factory=Progress)
    monitor: ConvergenceMonitor = dataclasses.field(default_factory=ConvergenceMonitor)
    policy: DivergencePolicy = dataclasses.field(default_factory=DivergencePolicy)
    eval_history: list = dataclasses.field(default_factory=list)
    best: dict | None = None  # the evaluation with the lowest KL, and its adapters
    greedy_samples: list = dataclasses.field(default_factory=list)  # the last evaluation's greedy continuations
    provenance: dict = dataclasses.field(default_factory=dict)  # the command, commit, date and machine, taken when the run starts
    last_good: dict | None = None  # in memory: the state of the last good evaluation (rollback target)
    recipe_changes: dict = dataclasses.field(default_factory=dict)  # resumed: {flag: (the checkpoint's value, this run's)}
    resumed_at: int = 0  # the step this process started from (0: a fresh run)

    @property
    def layers(self) -> list[int]:
        return list(self.npt.npt_layers)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def sharded(self) -> bool:
        return self.cfg.run.fsdp

    def log(self, message: str, level: int = logging.INFO, **kwargs) -> None:
        """A line every process would write alike: written once, by the main process."""
        if self.is_main:
            logger.log(level, message, **kwargs)


# ---- set-up -----------------------------------------------------------------------------------------


def native_bf16(use_cpu: bool) -> bool:
    """Whether the device multiplies bfloat16 natively: CUDA with bf16, or a CPU with AVX512-BF16
    or AMX (elsewhere a CPU emulates it, and autocast would be slower than float32)."""
    if not use_cpu:
        return torch.cuda.is_bf16_supported()
    return any(getattr(torch.cpu, check, lambda: False)() for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def mixed_precision(cfg: Config, use_cpu: bool) -> str:
    """--mixed_precision, where `auto` takes accelerate's own setting (`accelerate launch
    --mixed_precision bf16`, or its config file) when there is one, else bf16 autocast where the
    device multiplies bf16 natively (the same held-out KL as float32, at a higher rate of tokens on
    a CPU with AVX512-BF16: CHANGELOG.md), else fp16 on CUDA and none on a CPU."""
    mp = cfg.run.mixed_precision
    if mp == "auto":  # accelerate launch passes its setting in the environment
        mp = os.environ.get("ACCELERATE_MIXED_PRECISION") or ("bf16" if native_bf16(use_cpu) else ("no" if use_cpu else "fp16"))
    if cfg.run.fsdp and mp == "fp16":
        raise NPTError("--fsdp supports bf16 or no mixed precision, not fp16.", "Pass --mixed_precision bf16 (or no).")
    return mp


def trackers(cfg: Config) -> list[str]:
    wanted = [t for t in cfg.run.report_to if t != "none"]
    available = {str(t) for t in get_available_trackers()}
    missing = [t for t in wanted if t != "all" and t not in available]
    if missing:
        raise NPTError(f"--report_to {missing} is not installed (available here: {sorted(available)}).",
                       f"pip install {' '.join(missing)}, or pass --report_to tensorboard (or none).")
    return wanted


def setup(cfg: Config) -> Run:
    # devices, processes and the output dir; nothing is written yet
    use_cpu = resolve_device(cfg.run.device) == "cpu"
    state = PartialState(cpu=use_cpu)
    if cfg.run.fsdp and state.num_processes < 2:
        raise NPTError("--fsdp needs several processes.", "Launch with torchrun --nproc_per_node N or accelerate launch, or drop --fsdp.")
    if cfg.loss.progressive_stages > 1 and state.num_processes > 1:
        raise NPTError("--progressive_stages runs on one process: DDP and FSDP expect every adapter in every step's backward, and a layer not converted yet has none.",
                       "Launch one process, or pass --progressive_stages 1.")
    out = resolve_output_dir(cfg.run)
    resume = checkpoint_to_resume(cfg.run, out)
    # accelerate keeps one state per process, and a second Accelerator with another
    # --mixed_precision in the same process raises ("AcceleratorState has already been
    # initialized and cannot be changed"); the ablation and zoo tools and the tests run several
    # runs in one process, each with its own precision. accelerate offers no public reset, so its
    # own (private) one is used; the process group (PartialState) stays.
    AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=use_cpu, mixed_precision=mixed_precision(cfg, use_cpu), log_with=trackers(cfg) or None, project_dir=str(out))

    # the teacher, converted in place (the embedded teacher is built once, by the main process)
    with accelerator.main_process_first():
        model, tokenizer = load_model(cfg.model.model_name, cfg.model.dtype, str(accelerator.device), cfg.model.attn_implementation)
    # Seeded after loading: building the embedded teacher (first run only) or initialising a
    # checkpoint's missing weights draws random numbers, and the adapters' initialisation must
    # not depend on that.
    set_seed(cfg.run.seed)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and cfg.data.max_length > max_pos:
        raise NPTError(f"--max_length {cfg.data.max_length} exceeds the model's {max_pos} positions.", f"Pass --max_length <= {max_pos}.")
    a = cfg.adapter
    base = cfg.model.model_name or EMBEDDED_NAME
    if Path(base).expanduser().exists():  # a local folder: recorded so that the adapters load from anywhere
        base = str(Path(base).expanduser().resolve())
    npt = NPTModel.convert(model, a.npt_layers, a.adapter_rank, a.num_ranks, a.modulation_scale, base_model_name_or_path=base,
                          gate_gain=a.gate_gain, modulate=a.modulate, bottleneck_bias=a.bottleneck_bias,
                          adapter_input=a.adapter_input)
    npt.set_gradient_checkpointing(cfg.run.gradient_checkpointing)

    # data: a built-in teacher's own corpus unless a dataset is given
    data = with_default_dataset(cfg.data, cfg.model.default_dataset)
    eval_blocks = heldout_blocks(open_source(data, cfg.run.seed), tokenizer, data)
    stream = TrainStream(open_source(data, cfg.run.seed), tokenizer, data, cfg.optim.batch_size, state.process_index, state.num_processes, cfg.run.seed)
    # Draw a first sample now: a corpus too small for one block is refused before anything is
    # written. The same fixed-size sample (not one batch, so the initialisation does not depend on
    # --batch_size) calibrates the adapters; the stream is rewound, so no training data is consumed.
    rewind = stream.state_dict()
    sample = stream.next_blocks(CALIBRATION_BLOCKS)
    stream.load_state_dict(rewind)

    # loss and objective
    loss = NPTLoss(cfg.loss, len(npt.npt_config.layers), curriculum_steps=cfg.curriculum)
    objective = EquivalenceObjective(npt, loss, cfg.run.seed, sharded=cfg.run.fsdp)
    if cfg.loss.use_gradient_penalty and not objective.penalty_pairs:
        raise NPTError(f"--use_gradient_penalty needs two adjacent converted layers; --npt_layers gives {npt.npt_config.layers}.",
                       "Convert adjacent layers (e.g. --npt_layers all) or drop --use_gradient_penalty.")
    saved = None
    if resume is not None:
        check_resume_compatible(resume, npt)
        saved = load_checkpoint(resume)
    elif cfg.adapter.adapter_init == "calibrated":
        calibrate_adapters(npt, sample.to(accelerator.device))
    if cfg.run.compile:
        for layer in npt.npt_layers.values():
            layer.compile_student()

    # several processes: shard (FSDP) or wrap (DDP), then the optimizer (FSDP replaces the parameters it shards)
    if cfg.run.fsdp:
        shard(npt, loss, accelerator.mixed_precision)
        prepared = objective
    else:
        prepared = accelerator.prepare(objective)
    optimizer = accelerator.prepare(build_optimizer(cfg.optim, list(npt.adapter_parameters()), loss))
    run = Run(cfg, accelerator, out, resume, npt, tokenizer, prepared, objective, loss, optimizer, stream, eval_blocks, data.dataset_name or str(data.data_files),
              policy=DivergencePolicy(patience=cfg.run.divergence_patience, training_kl=cfg.loss.logit_kl_weight > 0),
              monitor=ConvergenceMonitor(free_running_layers_trained=cfg.loss.free_running_layer_weight > 0),
              # taken now, with the source as this process loaded it (files edited later do not count)
              provenance=provenance(str(accelerator.device), f"{dtype_name(next(model.parameters()).dtype)} weights, {accelerator.mixed_precision} autocast"))
    if saved is not None:
        apply_state(run, saved)
        run.resumed_at = run.progress.step
        if run.progress.free_running_since is None and run.progress.step > cfg.free_running_from:
            run.progress.free_running_since = cfg.free_running_from  # a checkpoint written before the field existed
        if "config" in saved:  # (every checkpoint this code writes)
            run.recipe_changes = changed_recipe(saved["config"], cfg.to_flat())
        run.last_good = collect_state(run, with_data=False)
    return run


def check_resume_compatible(ckpt: Path, npt_model: NPTModel) -> None:
    saved = read_adapter_config(ckpt)
    ours = npt_model.npt_config
    diffs = {k: (v, ours.shape_signature()[k]) for k, v in saved.shape_signature().items() if ours.shape_signature()[k] != v}
    if saved.base_model_name_or_path != ours.base_model_name_or_path:
        diffs["base_model"] = (saved.base_model_name_or_path, ours.base_model_name_or_path)
    if diffs:
        detail = ", ".join(f"{k}: checkpoint {a} vs now {b}" for k, (a, b) in diffs.items())
        raise NPTError(f"Checkpoint {ckpt} belongs to another model or adapter shape ({detail}).",
                       "Resume with the original --model_name, --npt_layers, --adapter_rank, --num_ranks, --gate_gain, --modulate, --bottleneck_bias and --adapter_input, or start a new --output_dir.")


def start(run: Run) -> Tracker:
    """Create the output dir (the main process), write config.json, open the trackers, print the banner."""
    cfg = run.cfg
    if run.is_main:
        if cfg.run.overwrite_output_dir and run.resume is None:
            clear_previous_run(run.out)
        run.out.mkdir(parents=True, exist_ok=True)
        cfg.replace(output_dir=str(run.out)).save(run.out / "config.json")
    run.accelerator.wait_for_everyone()
    logs.configure(cfg.run.log_level, run.out / logs.FILE_NAME)
    tracker = Tracker(run.accelerator, cfg.to_flat(), purge_step=run.progress.step + 1 if run.resume else None)
    banner(run)
    return tracker


def banner(run: Run) -> None:
    cfg, acc, npt = run.cfg, run.accelerator, run.npt
    hc = npt.config
    world = acc.num_processes
    blocks = cfg.optim.batch_size * cfg.optim.gradient_accumulation_steps * world
    trainable = sum(p.numel() for p in npt.adapter_parameters()) + sum(p.numel() for p in run.loss.parameters())
    total = sum(p.numel() for p in npt.parameters()) + sum(p.numel() for p in run.loss.parameters())
    free_from = cfg.free_running_from
    phases = f"teacher forcing until step {free_from}, then free-running" if cfg.free_running else "teacher forcing throughout"
    if cfg.free_running and cfg.loss.logit_kl_weight:
        phases += f" with the logit KL (weight {cfg.loss.logit_kl_weight:g}"
        phases += f", {cfg.loss.reverse_kl_share:.0%} of it reverse)" if cfg.loss.reverse_kl_share else ")"
    if cfg.free_running and cfg.loss.free_running_layer_weight:
        phases += (f"{' and' if cfg.loss.logit_kl_weight else ' with'} the per-layer terms (weight {cfg.loss.free_running_layer_weight:g}, "
                   f"{'each layer against its teacher layer on the same input' if cfg.loss.free_running_layer_target == 'local' else 'against the teacher hidden states'})")
    if cfg.free_running and cfg.optim.free_running_lr_scale != 1:
        phases += f", at {cfg.optim.free_running_lr_scale:g} x the learning rate"
    if cfg.free_running and cfg.optim.reset_moments_at_free_running:
        phases += ", AdamW's moments cleared where it starts"
    if cfg.free_running and cfg.optim.free_running_warmup_steps:
        phases += f", its rate ramped up from 0 over {cfg.optim.free_running_warmup_steps} steps"
    if cfg.free_running and cfg.loss.progressive_stages > 1:
        phases += (f"; layers converted bottom-up in {cfg.loss.progressive_stages} stages of the free-running phase "
                   f"(the lowest {', '.join(str(converted_count(s, cfg.loss.progressive_stages, len(run.layers))) for s in range(1, cfg.loss.progressive_stages + 1))})")
    if cfg.optim.update_clipping:
        phases += f"; AdamW's updates clipped at RMS {cfg.optim.update_clipping:g}"
    base_dtype = dtype_name(next(npt.model.parameters()).dtype)
    lines = [
        f"output      {run.out}   (curves: tensorboard --logdir {run.out / 'tensorboard'})",
        f"model       {npt.npt_config.base_model_name_or_path} ({hc.model_type}, {hc.num_hidden_layers} layers, hidden {hc.hidden_size}); "
        f"NPT layers {npt.npt_config.layers}, r={npt.npt_config.rank}, k={npt.npt_config.num_ranks}, modulating {'+'.join(npt.npt_config.modulate)}",
        f"data        {run.data_name}: blocks of {cfg.data.max_length} tokens, {len(run.eval_blocks)} held-out blocks; "
        f"{block_convention(run.tokenizer)}",
        f"device      {acc.device}, {world} process{'es' if world > 1 else ''}{' (FSDP)' if cfg.run.fsdp else ''}, "
        f"{base_dtype} weights, mixed precision {acc.mixed_precision}",
        f"batch       {cfg.optim.batch_size} blocks x {cfg.optim.gradient_accumulation_steps} accumulation x {world} = {blocks} blocks "
        f"= {blocks * cfg.data.max_length} tokens per step; {cfg.optim.max_steps} steps",
        f"schedule    {cfg.optim.describe()}; {phases}",
        f"parameters  {trainable:,} trainable / {total:,} total",
    ]
    if run.resume is not None:
        lines.append(f"resume      resumed from {run.resume} at step {run.progress.step}")
    run.log("\n".join(lines))
    if run.recipe_changes:  # the flags of this command win; the checkpoint's recipe is not restored
        detail = ", ".join(f"--{k} {a} -> {b}" for k, (a, b) in sorted(run.recipe_changes.items()))
        run.log(f"resumed with another training recipe than the checkpoint's: {detail}. The run continues with the new values; "
                "to continue the original recipe exactly, pass the checkpoint's values.", logging.WARNING)


# ---- the loop ---------------------------------------------------------------------------------------


def fit(run: Run, tracker: Tracker, stopper: GracefulStop) -> None:
    cfg, acc = run.cfg, run.accelerator
    ga = cfg.optim.gradient_accumulation_steps
    tokens_per_step = cfg.optim.batch_size * cfg.data.max_length * ga * acc.num_processes
    params = list(run.npt.adapter_parameters())
    max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
    text_lines = not (cfg.run.progress and sys.stdout.isatty())
    bar = tqdm(total=cfg.optim.max_steps, initial=run.progress.step, desc="NPT pre-training", dynamic_ncols=True,
               disable=not run.is_main or text_lines)
    means = IntervalMeans()
    interval = {"tokens": 0, "seconds": 0.0}
    if run.policy.start is None:  # a fresh run: where training begins
        _, record = validate(run, tracker)
        respond(run, tracker, judge(run, record), record)
        r = run.policy.start
        greedy = f", greedy match {r['greedy_match']:.1f}/{r['greedy_tokens']}" if "greedy_match" in r else ""
        run.log(f"before training: mean rel error {r['rel_error_mean']:.4f}, KL {r['kl']:.4f}, top-1 agreement {r['top1_agreement']:.1%}{greedy}, "
                  f"perplexity teacher {r['teacher_ppl']:.2f} / student {r['student_ppl']:.2f}")

    while run.progress.step < cfg.optim.max_steps:
        p = run.progress
        # this step's learning rate and phase
        free_running = p.step >= cfg.free_running_from
        if free_running and p.free_running_since is None:  # the switch, a resume there, or a rollback to before it
            p.free_running_since = p.step
            if cfg.optim.reset_moments_at_free_running:
                reset_moments(run.optimizer)
        set_learning_rate(run.optimizer, cfg.optim.lr_factor(p.step) * p.lr_scale * (cfg.optim.free_running_factor(p.step, p.free_running_since) if free_running else 1.0))
        npt_count = cfg.npt_count(p.step, len(run.layers))
        started = time.perf_counter()
        # forward and backward over the accumulation window (gradients synchronised on its last
        # micro-batch), in a progressive stage with only the lowest layers converted
        window_objective = torch.zeros((), device=acc.device)
        window_metrics = IntervalMeans()
        with run.npt.lowest_converted(npt_count):
            for micro in range(ga):
                batch = run.stream.next_batch().to(acc.device, non_blocking=True)
                with gradient_sync(run.objective, acc, sync=micro == ga - 1):
                    with acc.autocast():
                        output = run.objective(batch, None, p.step, free_running)
                    acc.backward(output.objective / ga)
                window_objective += output.objective.detach().float()
                window_metrics.add(output.metrics)
        grad_norm = full_tensor(acc.clip_grad_norm_(params, max_norm))
        # one host sync per step: loss, gradient norm, and a signal on any process (all stop at the same step)
        signalled = torch.tensor(float(bool(stopper.signum)), device=window_objective.device)
        loss_value, grad_value, stop_requested = all_reduce_sum(torch.stack([window_objective, grad_norm.float().to(window_objective.device), signalled])).tolist()
        finite = math.isfinite(loss_value) and math.isfinite(grad_value)
        # the update, or a skipped step
        if finite:
            run.optimizer.step()
            p.step += 1
            p.consecutive_bad = 0
            p.tokens_seen += tokens_per_step
            step_metrics = window_metrics.means()
            step_metrics["grad_norm"] = grad_norm.detach().float()
            if cfg.optim.update_clipping:
                step_metrics["update_clipped"] = unwrapped(run.optimizer).pop_clipped_fraction()
            means.add(step_metrics)
            bar.update(1)
        elif math.isfinite(loss_value) and acc.mixed_precision == "fp16":
            run.optimizer.step()  # fp16 overflow: the grad scaler skips this update and lowers its scale
        else:
            p.skipped_steps += 1
            p.consecutive_bad += 1
            tracker.scalars(p.step, {"training/skipped_steps": p.skipped_steps})
            run.log(f"step {p.step}: non-finite loss or gradient, step skipped ({p.consecutive_bad} in a row, {p.skipped_steps} in total)", logging.WARNING)
        run.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        p.train_seconds += seconds
        interval["tokens"] += tokens_per_step if finite else 0
        interval["seconds"] += seconds

        # the logs (an interval ends with teacher forcing, and a free-running phase's first step is
        # one of its own, the reference of its training KL); the divergence policy on them or on a
        # run of non-finite steps, and its answer
        stage = cfg.stage(p.step - 1)
        log_now = (p.step % cfg.run.logging_steps == 0 or p.step in (cfg.optim.max_steps, cfg.free_running_from)
                   or run.policy.needs_training_reference(free_running, stage))
        if finite and log_now:
            tags, signs = log_step(run, tracker, bar, means, interval, free_running, text_lines, npt_count)
            interval = {"tokens": 0, "seconds": 0.0}
            respond(run, tracker, run.policy.observe_log(tags, signs, free_running, p.step, stage))
        elif not finite:
            respond(run, tracker, run.policy.observe_bad_steps(p.consecutive_bad))
        if p.consecutive_bad >= cfg.run.max_bad_steps:
            run.optimizer.zero_grad(set_to_none=True)
            last = list_checkpoints(run.out)
            where = f"the last good checkpoint is {last[-1][1]}" if last else "no checkpoint was written yet"
            raise TooManyBadSteps(
                f"{p.consecutive_bad} consecutive steps had a non-finite loss or gradient (step {p.step}, after {len(p.rollbacks)} rollbacks); {where}.",
                "Reduce --learning_rate, lower --max_grad_norm (e.g. 0.5), disable --use_gradient_penalty, check the teacher's outputs for extreme values, then resume.",
            )

        # a signal: checkpoint and stop (a process that got no signal itself stops as if terminated)
        if stop_requested:
            path = save(run)
            bar.close()
            tracker.close()
            raise Interrupted(stopper.signum or int(signal.SIGTERM), path)
        # held-out evaluation (also where teacher forcing ends: the state free-running starts from,
        # the rollback target should its rate prove too high) and checkpoints
        scheduled = cfg.run.eval_steps and p.step % cfg.run.eval_steps == 0
        if finite and (scheduled or (cfg.free_running and p.step == cfg.free_running_from)) and p.step < cfg.optim.max_steps:
            result, record = validate(run, tracker)
            respond(run, tracker, judge(run, record), record)
            greedy = f", greedy match {result.greedy_match:.1f}/{result.greedy_tokens}" if result.greedy_match is not None else ""
            run.log(f"step {p.step}: mean rel error {result.rel_error_mean:.4f}, KL {result.kl:.4f}, top-1 agreement {result.top1_agreement:.1%}"
                      f"{greedy}, perplexity ratio {result.ppl_ratio:.3f}")
        if finite and p.step % cfg.run.save_steps == 0 and p.step < cfg.optim.max_steps:
            save(run)
    bar.close()


def log_step(run: Run, tracker: Tracker, bar, means: IntervalMeans, interval: dict, free_running: bool, text_lines: bool,
             npt_count: int) -> tuple[dict[str, float], list]:
    """Log the interval's means and print them; their tags and the monitor's signs."""
    cfg, p = run.cfg, run.progress
    values = means.pop(reduce=all_reduce_mean)
    tags = to_tags(values, run.layers)
    c, temperature = run.loss.schedule(p.step - 1)  # those of the step just taken, like its loss and learning rate
    tags.update({
        "training/curriculum_factor": c,
        "training/temperature": temperature,
        "training/learning_rate": run.optimizer.param_groups[0]["lr"],
        "training/grad_norm": values["grad_norm"],
        "training/tokens_per_sec": interval["tokens"] / max(interval["seconds"], 1e-9),
        "training/skipped_steps": p.skipped_steps,
        "training/free_running": float(free_running),
        "training/lr_scale": p.lr_scale,
        "training/npt_layers": npt_count,
    })
    tracker.scalars(p.step, tags)
    weights = values.get("layer_weight") if cfg.loss.use_adaptive_weights else None
    signs = run.monitor.update(p.step, tags, weights, values.get("weight_temperature"))
    for sign in signs:
        run.log(sign.message, logging.WARNING)
        tracker.text(p.step, "monitor/warnings", sign.message)
        tracker.scalars(p.step, {f"monitor/{sign.key}": 1.0})
    line = (f"loss {tags['loss/total']:.4f} | mse {tags['loss/mse']:.4f} | cos {tags['loss/cosine']:.4f} | "
            f"lr {tags['training/learning_rate']:.2e} | {tags['training/tokens_per_sec']:.0f} tok/s")
    if text_lines:
        run.log(f"step {p.step}/{cfg.optim.max_steps} | {line}{' | free-running' if free_running else ''}")
    else:
        bar.set_postfix_str(line)
    return tags, signs


# ---- evaluation, rollback, checkpoints --------------------------------------------------------------


def validate(run: Run, tracker: Tracker) -> tuple[EvalResult, dict]:
    """Evaluate on the held-out blocks: the result and its record (logged, added to the history)."""
    cfg, p = run.cfg, run.progress
    result = evaluate(run.npt, run.eval_blocks, cfg.run.eval_batch_size)
    samples = []
    if cfg.run.greedy_prompts:  # on every process: sharded layers need all of them, and the records stay alike
        result, samples = measure_greedy(result, run.npt, run.tokenizer, run.eval_blocks, cfg.run.greedy_prompts, cfg.run.greedy_tokens, synced=run.sharded)
    tracker.scalars(p.step, result.scalars())
    record = {"step": p.step, "train_seconds": round(p.train_seconds, 3)} | result.record()  # the time to it: "KL x within t minutes"
    run.eval_history.append(record)
    run.greedy_samples = samples
    if samples and cfg.run.num_samples:
        tracker.text(p.step, "eval/samples", "\n\n".join(f"**prompt** {s['prompt']}\n\n**teacher** {s['teacher']}\n\n**student** {s['student']}\n\n"
                                                          f"({s['identical_tokens']} identical tokens)" for s in samples[: cfg.run.num_samples]))
    return result, record


def judge(run: Run, record: dict) -> Verdict:
    """The divergence policy's verdict on an evaluation record. The steps before it were
    free-running ones (the phase it judges) when the step is past the teacher-forced ones."""
    cfg, p = run.cfg, run.progress
    return run.policy.observe_eval(record, free_running=p.step > cfg.free_running_from, stage=cfg.stage(p.step - 1))


def respond(run: Run, tracker: Tracker, verdict: Verdict, record: dict | None = None, final: bool = False) -> None:
    """The one place the loop acts on the divergence policy's verdict. Diverged: roll back to the
    last good state with a lower learning rate (after the last step, `final`, adapter/ keeps the
    best adapters instead). Otherwise, after an evaluation (`record`): `remember` its state."""
    if verdict.diverged and final:
        run.log(f"the last evaluation is worse than the last good one ({verdict.diverged}); adapter/ keeps the best ones seen.", logging.WARNING)
    elif verdict.diverged:
        rollback(run, tracker, verdict.diverged)
    elif record is not None:
        remember(run, record, verdict.good)


def remember(run: Run, record: dict, good: bool) -> None:
    """Keep the evaluated state's adapters when its held-out KL is the lowest yet (adapter/ at the
    end), and its whole training state when the policy called it good (the rollback target)."""
    best = run.best is None or record["kl"] < run.best["kl"]
    if good or best:
        snapshot = collect_state(run, with_data=False)
        if best:
            run.best = record | {"adapters": snapshot["adapters"]}
        if good:
            run.last_good = snapshot


def can_roll_back(run: Run) -> bool:
    return run.last_good is not None and len(run.progress.rollbacks) < run.cfg.run.max_rollbacks


def rollback(run: Run, tracker: Tracker, reason: str) -> None:
    """Back to the last good state with a lower learning rate; the step count, the data position
    and the run's records (best, history, counters) go on."""
    p = run.progress
    if not can_roll_back(run):
        if not p.unrecovered:
            run.log(f"step {p.step}: training diverged ({reason}); no rollback left ({len(p.rollbacks)} of --max_rollbacks "
                    f"{run.cfg.run.max_rollbacks} used). The saved adapters will be the best held-out ones.", logging.WARNING)
        p.unrecovered.append({"step": p.step, "reason": reason})
        return
    restore_training(run, run.last_good)
    run.policy.rolled_back()
    target = run.last_good["progress"]["step"]
    if target <= run.cfg.free_running_from:
        p.free_running_since = None  # a teacher-forced state: the free-running phase starts again from it
    p.consecutive_bad = 0
    p.lr_scale *= run.cfg.run.rollback_lr_factor
    p.rollbacks.append({"step": p.step, "to_step": target, "reason": reason, "lr_scale": p.lr_scale})
    message = (f"step {p.step}: training diverged ({reason}). Rolled back to the state of step {target}, "
               f"learning rate x{p.lr_scale:.3g} (rollback {len(p.rollbacks)} of {run.cfg.run.max_rollbacks}).")
    run.log(message, logging.WARNING)
    tracker.text(p.step, "training/rollbacks", message)
    tracker.scalars(p.step, {"training/rollbacks": len(p.rollbacks), "training/lr_scale": p.lr_scale})


def save(run: Run) -> Path:
    """A checkpoint of the current state (collective; the main process writes it)."""
    state = collect_state(run) | {"config": run.cfg.to_flat()}
    path = checkpoint_dir(run.out, run.progress.step)
    if run.is_main:
        path = save_checkpoint(run.out, run.progress.step, state, run.npt.npt_config, run.cfg.run.save_total_limit)
    run.accelerator.wait_for_everyone()
    return path


def finish(run: Run, tracker: Tracker, wall_start: float) -> dict:
    """Final evaluation and checkpoint; the best adapters into adapter/; the summary (printed and saved)."""
    acc, p, out = run.accelerator, run.progress, run.out
    result, record = validate(run, tracker)
    respond(run, tracker, judge(run, record), record, final=True)
    final_ckpt = save(run)
    digests = gather_objects(run.npt.adapter_digest())
    if len(set(digests)) > 1:
        run.log(f"the processes hold different adapters ({digests}); the saved ones are process 0's. This is a bug: please report it.", logging.WARNING)
    best = {k: v for k, v in run.best.items() if k != "adapters"}
    final = run.eval_history[-1]
    summary = {
        "output_dir": str(out),
        "steps": p.step,
        "tokens_seen": p.tokens_seen,
        "train_seconds": round(p.train_seconds, 1),
        "runtime_seconds": round(time.perf_counter() - wall_start, 1),  # this process's; train_seconds counts every resumed segment
        "runtime_since_step": run.resumed_at,
        "skipped_steps": p.skipped_steps,
        "checkpoint": str(final_ckpt),
        "adapter_dir": str(out / "adapter"),
        "adapter_step": best["step"],
        "adapter_choice": f"the lowest held-out KL of {len(run.eval_history)} evaluations (step {best['step']}: KL {best['kl']:.4f})",
        "eval": best,
        "eval_final": final,
        "eval_before": run.policy.start,
        "eval_history": run.eval_history,
        "adapter": {"modulate": ",".join(run.npt.npt_config.modulate), "num_ranks": run.npt.npt_config.num_ranks, "rank": run.npt.npt_config.rank},
        "greedy_samples_final": run.greedy_samples,
        "rollbacks": p.rollbacks,
        "unrecovered_divergences": p.unrecovered,
        "processes": acc.num_processes,
        "mixed_precision": acc.mixed_precision,
        "block_layout": block_convention(run.tokenizer),
        "adapter_sha256_per_process": digests,
        "warnings": dict(run.monitor.fired),
        "healthy_signs": run.monitor.healthy_summary(),
        "provenance": run.provenance,
    }
    if run.is_main:
        run.npt.save_pretrained(out / "adapter", state_dict=run.best["adapters"])
        run.tokenizer.save_pretrained(out / "adapter")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        lines = ["", "Held-out evaluation after training:", result.table()]
        if best["step"] != final["step"]:
            lines.append(f"adapter/ holds the adapters of step {best['step']} (KL {best['kl']:.4f}, perplexity ratio {best['ppl_ratio']:.3f}): "
                         f"the lowest held-out KL seen; the last step's are in {final_ckpt}.")
        lines += ["", "The guide's healthy-training signs:", *("  " + line for line in summary["healthy_signs"])]
        lines.append(f"\nTrained {p.step} steps, {p.tokens_seen:,} tokens in {p.train_seconds:.0f} s of training "
                     f"({summary['runtime_seconds']:.0f} s in all{f' since resuming at step {run.resumed_at}' if run.resumed_at else ''})"
                     f"{f', {len(p.rollbacks)} rollback(s)' if p.rollbacks else ''}.")
        lines.append(f"Adapters: {out / 'adapter'}   Curves: tensorboard --logdir {out / 'tensorboard'}")
        run.log("\n".join(lines), extra={"plain": True})  # the final table, without the line prefix
    tracker.close()
    acc.wait_for_everyone()
    return summary


def train(cfg: Config) -> dict:
    wall_start = time.perf_counter()
    logs.configure(cfg.run.log_level)
    run = setup(cfg)
    # from the first file written on, SIGINT/SIGTERM end the run with a checkpoint at the next step
    with GracefulStop() as stopper:
        tracker = start(run)
        fit(run, tracker, stopper)
        return finish(run, tracker, wall_start)
