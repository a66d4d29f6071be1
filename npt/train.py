"""The training loop: config -> model + data -> step -> loss -> logs and checkpoints.

`train(cfg)` reads top to bottom: `setup` builds everything and refuses bad input before anything
is written; then the loop runs optimizer steps of `gradient_accumulation_steps` micro-batches,
logging, evaluating and checkpointing on optimizer steps. With several processes (torchrun or
accelerate launch) the same code runs on each: DDP by default, FSDP with `--fsdp`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
import time
from pathlib import Path

import torch

from .checkpoint import begin_checkpoint, find_latest, finish_checkpoint, list_checkpoints, load_data_state, load_training_state, verify, write_data_state
from .config import TrainConfig
from .data import TrainStream, heldout_blocks, open_source
from .distributed import full_state_dict, full_tensor, gradient_sync, load_optimizer_state, optimizer_state, shard
from .embedded import EMBEDDED_NAME
from .errors import NPTError
from .evaluate import EvalResult, evaluate_sums, finalize, sample_generations
from .loading import load_model
from .losses import NPTLoss
from .metrics import IntervalMeans, TensorBoardLogger, to_tags
from .model import NPTModel, load_adapter_weights, read_adapter_config
from .monitor import ConvergenceMonitor
from .objective import EquivalenceObjective, calibrate_adapters
from .schedules import lr_factor

CALIBRATION_BLOCKS = 16
RUN_FILES = ("config.json", "checkpoints", "adapter", "tensorboard", "summary.json")


class TooManyBadSteps(NPTError):
    pass


class Interrupted(Exception):
    def __init__(self, signum: int, checkpoint: Path | None):
        self.signum, self.checkpoint = signum, checkpoint
        super().__init__(f"stopped by signal {signum}")


class GracefulStop:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next optimizer step and exits.
    A second SIGINT interrupts at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n[npt] signal {signum} received: saving a checkpoint at the end of this step, then exiting.", flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---- set-up ------------------------------------------------------------------------------------


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise NPTError("--device cuda was asked for, but no CUDA device is available.", "Use --device cpu (or auto), or run on a machine with a GPU.")
    use_cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "no" if use_cpu else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if cfg.fsdp and mp == "fp16":
        raise NPTError("--fsdp supports bf16 or no mixed precision, not fp16.", "Pass --mixed_precision bf16 (or no).")
    return Accelerator(cpu=use_cpu, mixed_precision=mp)


def resolve_output_dir(cfg: TrainConfig, accelerator) -> Path:
    from accelerate.utils import broadcast_object_list

    name = [cfg.output_dir]
    if cfg.output_dir is None:  # one timestamped folder, chosen by the main process for all
        name = [time.strftime("runs/npt-%Y%m%d-%H%M%S")] if accelerator.is_main_process else [None]
        if accelerator.num_processes > 1:
            broadcast_object_list(name)
    return Path(name[0])


def prepare_output_dir(cfg: TrainConfig, out: Path) -> Path | None:
    """Refuse to mix runs; return the checkpoint to resume from, if any. Writes nothing."""
    if cfg.resume_from_checkpoint:
        if cfg.resume_from_checkpoint == "latest":
            ckpt = find_latest(out)
            if ckpt is None:
                raise NPTError(f"--resume_from_checkpoint latest: no complete checkpoint in {out / 'checkpoints'}.", "Check --output_dir, or start without --resume_from_checkpoint.")
            return ckpt
        ckpt = Path(cfg.resume_from_checkpoint)
        if not ckpt.is_dir():
            raise NPTError(f"Checkpoint {ckpt} does not exist.", "Pass a checkpoint folder (output_dir/checkpoints/step-...) or 'latest'.")
        verify(ckpt)
        return ckpt
    if out.exists() and any((out / f).exists() for f in RUN_FILES) and not cfg.overwrite_output_dir:
        raise NPTError(
            f"Output dir {out} already holds a run.",
            "Pass --resume_from_checkpoint latest to continue it, --overwrite_output_dir to replace it, or another --output_dir.",
        )
    return None


def check_resume_compatible(ckpt: Path, npt_model: NPTModel) -> None:
    saved = read_adapter_config(ckpt)
    ours = npt_model.npt_config
    diffs = {k: (v, ours.shape_signature()[k]) for k, v in saved.shape_signature().items() if ours.shape_signature()[k] != v}
    if saved.base_model_name_or_path != ours.base_model_name_or_path:
        diffs["base_model"] = (saved.base_model_name_or_path, ours.base_model_name_or_path)
    if diffs:
        detail = ", ".join(f"{k}: checkpoint {a} vs now {b}" for k, (a, b) in diffs.items())
        raise NPTError(f"Checkpoint {ckpt} belongs to another model or adapter shape ({detail}).", "Resume with the original --model_name, --npt_layers, --adapter_rank and --num_ranks, or start a new --output_dir.")


def build_optimizer(cfg: TrainConfig, npt_model: NPTModel, loss: NPTLoss) -> torch.optim.Optimizer:
    groups = [{"params": list(npt_model.adapter_parameters()), "lr": cfg.learning_rate, "weight_decay": cfg.weight_decay, "base_lr": cfg.learning_rate}]
    if loss.adaptive is not None:
        groups.append({"params": list(loss.adaptive.parameters()), "lr": cfg.adaptive_weights_lr, "weight_decay": 0.0, "base_lr": cfg.adaptive_weights_lr})
    return torch.optim.AdamW(groups, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


@dataclasses.dataclass
class RunState:
    step: int = 0  # optimizer steps taken
    skipped_steps: int = 0  # non-finite steps skipped in total
    consecutive_bad: int = 0
    tokens_seen: int = 0


@dataclasses.dataclass
class Run:
    """Everything `setup` builds; the loop only reads it and advances `state`."""

    cfg: TrainConfig
    accelerator: object
    out: Path
    resume: Path | None
    npt: NPTModel
    tokenizer: object
    objective: torch.nn.Module  # the training module, possibly wrapped (DDP) or sharded (FSDP)
    loss: NPTLoss
    optimizer: torch.optim.Optimizer
    stream: TrainStream
    eval_blocks: torch.Tensor
    state: RunState
    monitor: ConvergenceMonitor
    eval_history: list

    @property
    def layers(self) -> list[int]:
        return list(self.npt.npt_layers)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def setup(cfg: TrainConfig) -> Run:
    from accelerate.utils import set_seed

    cfg.validate()
    accelerator = make_accelerator(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    if cfg.fsdp and world < 2:
        raise NPTError("--fsdp needs several processes.", "Launch with torchrun --nproc_per_node N or accelerate launch, or drop --fsdp.")
    out = resolve_output_dir(cfg, accelerator)
    resume = prepare_output_dir(cfg, out)

    # model
    with accelerator.main_process_first():  # the embedded teacher is built once, by the main process
        model, tokenizer = load_model(cfg.model_name, cfg.dtype, str(accelerator.device), cfg.attn_implementation)
    # Seeded after loading: building the embedded teacher (first run only) or initialising a
    # checkpoint's missing weights draws random numbers, and the adapters' initialisation must
    # not depend on that.
    set_seed(cfg.seed)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and cfg.max_length > max_pos:
        raise NPTError(f"--max_length {cfg.max_length} exceeds the model's {max_pos} positions.", f"Pass --max_length <= {max_pos}.")
    npt = NPTModel.convert(model, cfg.npt_layers, cfg.adapter_rank, cfg.num_ranks, cfg.modulation_scale, base_model_name_or_path=cfg.model_name or EMBEDDED_NAME)
    npt.set_gradient_checkpointing(cfg.gradient_checkpointing)

    # data
    spec = cfg.data_spec()
    eval_blocks = heldout_blocks(open_source(spec), tokenizer, spec)
    stream = TrainStream(open_source(spec), tokenizer, spec, cfg.batch_size, rank, world)
    # Draw a first sample now: a corpus too small for one block is refused before anything is
    # written. The same fixed-size sample (not one batch, so the initialisation does not depend on
    # --batch_size) calibrates the adapters; the stream is rewound, so no training data is consumed.
    rewind = stream.state_dict()
    sample = stream.next_blocks(CALIBRATION_BLOCKS)
    stream.load_state_dict(rewind)

    # loss and objective; everything a checkpoint restores is loaded before any sharding
    loss = NPTLoss(cfg.loss_config(), len(npt.npt_config.layers))
    objective = EquivalenceObjective(npt, loss, cfg.gradient_penalty_every, cfg.seed, cfg.logit_kl_weight)
    if cfg.use_gradient_penalty and not objective.penalty_pairs:
        raise NPTError(f"--use_gradient_penalty needs two adjacent converted layers; --npt_layers gives {npt.npt_config.layers}.", "Convert adjacent layers (e.g. --npt_layers all) or drop --use_gradient_penalty.")
    state, monitor, eval_history, saved = RunState(), ConvergenceMonitor(), [], None
    if resume is not None:
        check_resume_compatible(resume, npt)
        npt.load_adapter_state_dict(load_adapter_weights(resume))
        saved = load_training_state(resume)
        loss.load_state_dict(saved["loss"])
        objective.generator.set_state(saved["penalty_generator"])
        monitor.load_state_dict(saved["monitor"])
        eval_history = list(saved["eval_history"])
        state = RunState(**saved["run"])
        torch.set_rng_state(saved["torch_rng"])
        stream.load_state_dict(load_data_state(resume))
    elif cfg.adapter_init == "calibrated":
        calibrate_adapters(npt, sample.to(accelerator.device))
    if cfg.compile:
        for layer in npt.npt_layers.values():
            layer.npt_output = torch.compile(layer.npt_output)  # used by teacher-forced and free-running steps

    # wrap for several processes, then the optimizer (FSDP replaces the parameters it shards)
    if cfg.fsdp:
        objective = shard(objective, npt, accelerator.mixed_precision)
        optimizer = accelerator.prepare(build_optimizer(cfg, npt, loss))
    else:
        objective = accelerator.prepare(objective)
        optimizer = accelerator.prepare(build_optimizer(cfg, npt, loss))
    if saved is not None:
        load_optimizer_state(optimizer.optimizer, objective, saved["optimizer"], cfg.fsdp)
        accelerator.print(f"[npt] resumed from {resume} at step {state.step}")
    return Run(cfg, accelerator, out, resume, npt, tokenizer, objective, loss, optimizer, stream, eval_blocks, state, monitor, eval_history)


# ---- collective pieces (every process calls them) --------------------------------------------------


def save_checkpoint(run: Run, step: int) -> Path:
    adapters = run.npt.adapter_state_dict()
    training_state = {
        "optimizer": optimizer_state(run.optimizer.optimizer, run.objective, run.cfg.fsdp),
        "loss": full_state_dict(run.loss),
        "penalty_generator": run.accelerator.unwrap_model(run.objective).generator.get_state(),
        "monitor": run.monitor.state_dict(),
        "eval_history": run.eval_history,
        "run": dataclasses.asdict(run.state),
        "torch_rng": torch.get_rng_state(),
        "config": json.loads(json.dumps(run.cfg.to_dict())),
    }
    path = run.out / "checkpoints" / f"step-{step:08d}"
    if run.is_main:  # the data position is the same on every process (see TrainStream)
        tmp = begin_checkpoint(run.out, step)
        write_data_state(tmp, run.stream.state_dict())
        path = finish_checkpoint(run.out, step, run.npt, adapters, training_state, run.cfg.save_total_limit)
    run.accelerator.wait_for_everyone()
    return path


def evaluate_run(run: Run, logger: TensorBoardLogger, step: int) -> EvalResult:
    rank, world = run.accelerator.process_index, run.accelerator.num_processes
    shard_blocks = run.eval_blocks[rank::world]
    n, batch = len(run.layers), run.cfg.eval_batch_size
    if len(shard_blocks):
        sums = evaluate_sums(run.npt, shard_blocks, batch)
    else:
        sums = torch.zeros(4 * n + 4, dtype=torch.float64, device=run.accelerator.device)
    if run.cfg.fsdp:
        # Every forward of a sharded model is a collective: a process with one batch fewer than the
        # others (held-out blocks not divisible by processes x eval batch) would leave them waiting
        # forever. It runs the missing batches on a spare block and drops their sums.
        most = math.ceil(math.ceil(len(run.eval_blocks) / world) / batch)  # process 0 has the most blocks
        missing = most - math.ceil(len(shard_blocks) / batch)
        if missing:
            evaluate_sums(run.npt, run.eval_blocks[:1].repeat(missing, 1), 1)
    result = finalize(run.accelerator.reduce(sums, "sum"), run.layers)
    logger.scalars(step, result.scalars())
    run.eval_history.append({"step": step, "rel_error_mean": result.rel_error_mean, "rel_error": result.rel_error, "kl": result.kl,
                             "teacher_ppl": result.teacher_ppl, "student_ppl": result.student_ppl, "ppl_ratio": result.ppl_ratio})
    if run.cfg.num_samples and (run.is_main or run.cfg.fsdp):  # sharded layers need every process
        samples = sample_generations(run.npt, run.tokenizer, run.eval_blocks, run.cfg.num_samples, synced=run.cfg.fsdp)
        logger.text(step, "eval/samples", "\n\n".join(f"**prompt** {s['prompt']}\n\n**teacher** {s['teacher']}\n\n**student** {s['student']}" for s in samples))
    return result


# ---- the run -----------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> dict:
    run = setup(cfg)
    cfg, accelerator, state, monitor = run.cfg, run.accelerator, run.state, run.monitor
    world = accelerator.num_processes
    if run.is_main:
        if cfg.overwrite_output_dir and run.resume is None:
            for f in RUN_FILES:
                target = run.out / f
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
        run.out.mkdir(parents=True, exist_ok=True)
        dataclasses.replace(cfg, output_dir=str(run.out)).save(run.out / "config.json")
    accelerator.wait_for_everyone()
    # On resume, events a crashed run logged after its checkpoint are hidden (purge_step).
    logger = TensorBoardLogger(run.out / "tensorboard" if run.is_main else None, purge_step=state.step + 1 if run.resume else None)
    means = IntervalMeans()
    adapter_params = list(run.npt.adapter_parameters())
    tokens_per_step = cfg.batch_size * cfg.max_length * cfg.gradient_accumulation_steps * world
    ga = cfg.gradient_accumulation_steps

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=state.step, desc="NPT pre-training", disable=not (run.is_main and cfg.progress), dynamic_ncols=True)
    first_eval = evaluate_run(run, logger, state.step) if run.resume is None else None
    if first_eval is not None:
        accelerator.print(f"[npt] before training: mean rel error {first_eval.rel_error_mean:.4f}, KL {first_eval.kl:.4f}, perplexity teacher {first_eval.teacher_ppl:.2f} / student {first_eval.student_ppl:.2f}")
    last_log_time, last_log_step = time.perf_counter(), state.step

    with GracefulStop() as stopper:
        while state.step < cfg.max_steps:
            factor = lr_factor(state.step, cfg.warmup, cfg.max_steps, cfg.lr_scheduler, cfg.min_lr_ratio)
            for group in run.optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            free_running = state.step >= cfg.max_steps - cfg.free_running
            window_objective = torch.zeros((), device=accelerator.device)
            window_metrics = IntervalMeans()
            for micro in range(ga):
                batch = run.stream.next_batch().to(accelerator.device, non_blocking=True)
                # gradients are synchronised across processes on the window's last micro-batch only
                with gradient_sync(run.objective, accelerator, sync=micro == ga - 1):
                    with accelerator.autocast():
                        output = run.objective(batch, None, state.step, free_running)
                    accelerator.backward(output.objective / ga)
                window_objective += output.objective.detach().float()
                window_metrics.add(output.metrics)
            grad_norm = full_tensor(accelerator.clip_grad_norm_(adapter_params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")))
            # A signal on any process travels in the same reduction, so all of them stop at the same step.
            signalled = torch.tensor(float(bool(stopper.signum)), device=window_objective.device)
            check = accelerator.reduce(torch.stack([window_objective, grad_norm.float().to(window_objective.device), signalled]), "sum")
            values = check.tolist()  # the one host sync per optimizer step
            loss_ok, grad_ok = math.isfinite(values[0]), math.isfinite(values[1])
            stop_requested = values[2] > 0
            finite = loss_ok and grad_ok
            if finite:
                run.optimizer.step()
                state.step += 1
                state.consecutive_bad = 0
                state.tokens_seen += tokens_per_step
                step_metrics = window_metrics.means()
                step_metrics["grad_norm"] = grad_norm.detach().float()
                means.add(step_metrics)
                bar.update(1)
            elif loss_ok and accelerator.mixed_precision == "fp16":
                run.optimizer.step()  # fp16 overflow: the grad scaler skips this update and lowers its scale
            else:
                state.skipped_steps += 1
                state.consecutive_bad += 1
                logger.scalars(state.step, {"training/skipped_steps": state.skipped_steps})
                accelerator.print(f"[npt] step {state.step}: non-finite loss or gradient, step skipped ({state.consecutive_bad} in a row, {state.skipped_steps} in total)")
                if state.consecutive_bad >= cfg.max_bad_steps:
                    run.optimizer.zero_grad(set_to_none=True)
                    last = list_checkpoints(run.out)
                    where = f"the last good checkpoint is {last[-1][1]}" if last else "no checkpoint was written yet"
                    raise TooManyBadSteps(
                        f"{state.consecutive_bad} consecutive steps had a non-finite loss or gradient (step {state.step}); {where}.",
                        "Reduce --learning_rate, lower --max_grad_norm (e.g. 0.5), disable --use_gradient_penalty, check the teacher's outputs for extreme values, then resume.",
                    )
            run.optimizer.zero_grad(set_to_none=True)

            if finite and (state.step % cfg.logging_steps == 0 or state.step == cfg.max_steps):
                now = time.perf_counter()
                interval = means.pop(reduce=lambda t: accelerator.reduce(t, "mean"))
                tags = to_tags(interval, run.layers)
                c, temperature = run.loss.schedule(state.step)
                tags.update(
                    {
                        "training/curriculum_factor": c,
                        "training/temperature": temperature,
                        "training/learning_rate": run.optimizer.param_groups[0]["lr"],
                        "training/grad_norm": interval["grad_norm"],
                        "training/tokens_per_sec": (state.step - last_log_step) * tokens_per_step / max(now - last_log_time, 1e-9),
                        "training/skipped_steps": state.skipped_steps,
                        "training/free_running": float(free_running),
                    }
                )
                logger.scalars(state.step, tags)
                weights = interval.get("layer_weight") if cfg.use_adaptive_weights else None
                for sign in monitor.update(state.step, tags, weights, interval.get("weight_temperature")):
                    accelerator.print(sign.message)
                    logger.text(state.step, "monitor/warnings", sign.message)
                    logger.scalars(state.step, {f"monitor/{sign.key}": 1.0})
                bar.set_postfix(loss=f"{tags['loss/total']:.4f}", lr=f"{tags['training/learning_rate']:.2e}", tok_s=f"{tags['training/tokens_per_sec']:.0f}")
                last_log_time, last_log_step = now, state.step

            # (a process that got no signal itself stops as if terminated)
            signum = (stopper.signum or int(signal.SIGTERM)) if stop_requested else 0
            if signum:
                path = save_checkpoint(run, state.step)
                logger.close()
                bar.close()
                raise Interrupted(signum, path)
            if finite and cfg.eval_steps and state.step % cfg.eval_steps == 0 and state.step < cfg.max_steps:
                result = evaluate_run(run, logger, state.step)
                if run.is_main:
                    bar.write(f"[npt] step {state.step}: mean rel error {result.rel_error_mean:.4f}, KL {result.kl:.4f}, perplexity ratio {result.ppl_ratio:.3f}")
            if finite and state.step % cfg.save_steps == 0 and state.step < cfg.max_steps:
                save_checkpoint(run, state.step)
    bar.close()
    return finish(run, logger, first_eval)


def finish(run: Run, logger: TensorBoardLogger, first_eval: EvalResult | None) -> dict:
    """Final evaluation, checkpoint and adapters; the summary (printed and saved)."""
    accelerator, state, out = run.accelerator, run.state, run.out
    result = evaluate_run(run, logger, state.step)
    final_ckpt = save_checkpoint(run, state.step)
    adapters = run.npt.adapter_state_dict()
    digests = [run.npt.adapter_digest()]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        digests = gather_object(digests)
        if len(set(digests)) > 1:
            accelerator.print(f"[npt] WARNING: the processes hold different adapters ({digests}); the saved ones are process 0's. This is a bug: please report it.")

    def described(r: EvalResult | None) -> dict | None:
        return None if r is None else dataclasses.asdict(r) | {"rel_error_mean": r.rel_error_mean, "ppl_ratio": r.ppl_ratio}

    summary = {
        "output_dir": str(out),
        "steps": state.step,
        "skipped_steps": state.skipped_steps,
        "checkpoint": str(final_ckpt),
        "adapter_dir": str(out / "adapter"),
        "eval": described(result),
        "eval_before": described(first_eval),
        "eval_history": run.eval_history,
        "processes": accelerator.num_processes,
        "adapter_sha256_per_process": digests,
        "warnings": dict(run.monitor.fired),
        "healthy_signs": run.monitor.healthy_summary(),
    }
    if run.is_main:
        run.npt.save_pretrained(out / "adapter", state_dict=adapters)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        accelerator.print("\nHeld-out evaluation after training:\n" + result.table())
        accelerator.print("\nThe guide's healthy-training signs:\n" + "\n".join("  " + line for line in summary["healthy_signs"]))
        accelerator.print(f"\nAdapters: {out / 'adapter'}   TensorBoard: tensorboard --logdir {out / 'tensorboard'}")
    logger.close()
    accelerator.wait_for_everyone()
    return summary
