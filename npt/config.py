"""The run configuration: one typed dataclass, validated in one place.

Command-line flags, YAML config files and the configuration saved with each run all come from
the fields below, so a flag cannot exist without a default, a help text and a validation rule.
Precedence: field default < `--config FILE` < explicit command-line flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
from pathlib import Path
from typing import Any

from .errors import NPTError
from .losses import LOSSES, LossConfig


def _f(default, help: str, choices=None, group: str = "run", **kw):
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "group": group, **kw})


@dataclasses.dataclass
class TrainConfig:
    # model
    model_name: str | None = _f(None, "Teacher: hub id or local folder of a Llama-family causal LM. Default: the embedded teacher (built offline on first use).", group="model")
    dtype: str = _f("auto", "Dtype of the frozen base weights (auto: bfloat16 on CUDA when supported, float32 on CPU).", ["auto", "float32", "bfloat16", "float16"], group="model")
    attn_implementation: str = _f("sdpa", "HF attention implementation of the teacher.", ["sdpa", "eager", "flash_attention_2"], group="model")
    npt_layers: str = _f("all", "Layers to convert: all, upper_half, lower_half, or indices/ranges such as '0,2,5-7'.", group="model")
    adapter_rank: int = _f(16, "Adapter bottleneck rank r (A: d_model -> r).", group="model")
    num_ranks: int = _f(4, "Number k of rank-1 gate modulations per token (the guide: 1; 4 is the measured default recipe).", group="model")
    modulation_scale: float = _f(1.0, "Modulation scale s of the gate delta.", group="model")
    adapter_init: str = _f("calibrated", "calibrated: scale A and B_m so z and v_m.x have unit RMS on 16 training blocks; default: PyTorch's init.", ["calibrated", "default"], group="model")
    # data
    dataset_name: str | None = _f(None, "Hub dataset name (or a local dataset folder). Default: the embedded corpus (stdlib docstrings).", group="data")
    dataset_config: str | None = _f(None, "Dataset configuration name (the second argument of load_dataset).", group="data")
    data_files: list[str] | None = _f(None, "Local text files or folders (txt, json/jsonl, csv, parquet).", group="data", nargs="+")
    dataset_split: str = _f("train", "Dataset split to read.", group="data")
    text_column: str = _f("text", "Column holding the text.", group="data")
    streaming: bool = _f(False, "Stream the dataset instead of downloading/preparing it whole.", group="data")
    max_length: int = _f(128, "Tokens per training block (documents are packed, EOS between them).", group="data")
    eval_fraction: float = _f(0.02, "Fraction of documents held out (chosen by a hash of the text).", group="data")
    eval_blocks: int = _f(32, "Number of held-out blocks used for evaluation.", group="data")
    shuffle_buffer: int = _f(1024, "Blocks in the shuffle buffer.", group="data")
    # loss (the guide's names)
    loss_type: str = _f("improved_npt", "Per-layer alignment loss.", sorted(LOSSES), group="loss")
    use_adaptive_weights: bool = _f(False, "Learnable, balancing softmax weights over layers.", group="loss")
    use_gradient_penalty: bool = _f(False, "Gradient penalty between adjacent converted layers.", group="loss")
    mse_weight: float = _f(0.8, "Weight of the MSE term (improved_npt, smooth_l1_mse).", group="loss")
    cosine_weight: float = _f(0.2, "Weight of the cosine term (improved_npt).", group="loss")
    cosine_on: str = _f("update", "Cosine on the layer update (S-h vs T-h) or on whole hidden states.", ["update", "hidden"], group="loss")
    loss_normalization: str = _f("update", "update: errors in units of the teacher's layer update (scale-free); none: raw MSE.", ["update", "none"], group="loss")
    regularization_lambda: float = _f(0.01, "Weight of the modulation-norm regulariser (times the curriculum factor).", group="loss")
    gradient_penalty_lambda: float = _f(0.001, "Weight of the gradient penalty (times the curriculum factor).", group="loss")
    gradient_penalty_every: int = _f(1, "Compute the gradient penalty on every k-th adjacent layer pair.", group="loss")
    distill_temperature: float = _f(3.0, "Temperature at step 0; falls to 1.0 when the curriculum ends.", group="loss")
    curriculum_start: float = _f(0.5, "Curriculum factor at step 0 (rises to 1.0).", group="loss")
    curriculum_steps: str | None = _f(None, "Curriculum length: a count, or a fraction of max_steps. Default: the warm-up.", group="loss")
    focal_gamma: float = _f(2.0, "Focusing exponent of focal_mse.", group="loss")
    smooth_beta: float = _f(1.0, "Beta of the smooth L1 term of smooth_l1_mse.", group="loss")
    adaptive_weights_lr: float = _f(0.01, "Learning rate of the adaptive layer weights.", group="loss")
    free_running_steps: str = _f("0.6", "Train the last N steps (a count, or a fraction of max_steps) with the student running freely, each NPT layer fed by the one below.", group="loss")
    logit_kl_weight: float = _f(1.0, "Weight of T^2 * KL(teacher || student) of the next-token distributions at the curriculum temperature, in free-running steps.", group="loss")
    # optimisation
    learning_rate: float = _f(1e-2, "Peak learning rate of the adapters (AdamW).", group="optim")
    weight_decay: float = _f(0.0, "AdamW weight decay of the adapters.", group="optim")
    adam_beta1: float = _f(0.9, "AdamW beta1.", group="optim")
    adam_beta2: float = _f(0.999, "AdamW beta2.", group="optim")
    adam_eps: float = _f(1e-8, "AdamW eps.", group="optim")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables).", group="optim")
    warmup_steps: str = _f("0.1", "Learning-rate warm-up (and default curriculum length): a count, or a fraction of max_steps such as 0.1.", group="optim")
    lr_scheduler: str = _f("cosine", "Decay after warm-up.", ["cosine", "linear", "constant"], group="optim")
    min_lr_ratio: float = _f(0.1, "Final learning rate as a fraction of the peak.", group="optim")
    batch_size: int = _f(8, "Blocks per micro-batch per process.", group="optim")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.", group="optim")
    max_steps: int = _f(2000, "Optimizer steps.", group="optim")
    # run
    output_dir: str | None = _f(None, "Where TensorBoard logs, checkpoints and the final adapters go. Default: runs/npt-<date>-<time>.")
    overwrite_output_dir: bool = _f(False, "Allow writing into an output dir that holds another run.")
    resume_from_checkpoint: str | None = _f(None, "A checkpoint folder, or 'latest' for the newest in output_dir.")
    logging_steps: int = _f(10, "Log every N optimizer steps.")
    save_steps: int = _f(500, "Checkpoint every N optimizer steps (and at the end).")
    save_total_limit: int = _f(3, "Keep the newest N checkpoints.")
    eval_steps: int = _f(500, "Evaluate on the held-out blocks every N optimizer steps (and at the end); 0: only at the end.")
    eval_batch_size: int = _f(8, "Blocks per evaluation batch.")
    num_samples: int = _f(2, "Sample generations (teacher and student) shown at each evaluation.")
    max_bad_steps: int = _f(10, "Stop after this many consecutive non-finite steps.")
    seed: int = _f(0, "Random seed (adapter init, data order, gradient-penalty draws).")
    device: str = _f("auto", "auto (CUDA when present), cpu or cuda.", ["auto", "cpu", "cuda"])
    mixed_precision: str = _f("auto", "Autocast: auto (bf16 on CUDA, none on CPU), no, bf16, fp16.", ["auto", "no", "bf16", "fp16"])
    fsdp: bool = _f(False, "Shard the teacher's weights across processes (FSDP2) instead of replicating them (DDP); for teachers that do not fit one device. Needs several processes.")
    gradient_checkpointing: bool = _f(False, "Recompute each NPT layer's student computation in backward instead of storing its activations (less memory, more compute; matters most in free-running steps).")
    compile: bool = _f(False, "torch.compile each NPT layer's student computation (meant for CUDA; no gain measured on CPU).")
    progress: bool = _f(True, "Show the tqdm progress bar.")

    # ---- derived values ------------------------------------------------------------------------

    def _steps(self, value: str | None, name: str) -> int:
        text = str(value).strip()
        try:
            if "." in text or "e" in text.lower():
                frac = float(text)
                if not 0.0 <= frac < 1.0:
                    raise ValueError
                return int(round(frac * self.max_steps))
            count = int(text)
            if count < 0:
                raise ValueError
            return count
        except ValueError:
            raise NPTError(
                f"--{name} {value!r} is neither a step count nor a fraction in [0, 1).",
                f"Pass a count such as 100 or a fraction of --max_steps such as 0.1.",
            ) from None

    @property
    def warmup(self) -> int:
        return self._steps(self.warmup_steps, "warmup_steps")

    @property
    def free_running(self) -> int:
        return self._steps(self.free_running_steps, "free_running_steps")

    @property
    def curriculum(self) -> int:
        return self.warmup if self.curriculum_steps in (None, "") else self._steps(self.curriculum_steps, "curriculum_steps")

    def loss_config(self) -> LossConfig:
        return LossConfig(
            loss_type=self.loss_type,
            mse_weight=self.mse_weight,
            cosine_weight=self.cosine_weight,
            cosine_on=self.cosine_on,
            normalization=self.loss_normalization,
            focal_gamma=self.focal_gamma,
            smooth_beta=self.smooth_beta,
            regularization_lambda=self.regularization_lambda,
            use_adaptive_weights=self.use_adaptive_weights,
            use_gradient_penalty=self.use_gradient_penalty,
            gradient_penalty_lambda=self.gradient_penalty_lambda,
            distill_temperature=self.distill_temperature,
            curriculum_start=self.curriculum_start,
            curriculum_steps=self.curriculum,
        )

    def data_spec(self):
        from .data import DataSpec

        return DataSpec(
            dataset_name=self.dataset_name,
            dataset_config=self.dataset_config,
            data_files=self.data_files,
            dataset_split=self.dataset_split,
            text_column=self.text_column,
            streaming=self.streaming,
            max_length=self.max_length,
            eval_fraction=self.eval_fraction,
            eval_blocks=self.eval_blocks,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
        )

    # ---- validation ----------------------------------------------------------------------------

    def validate(self) -> "TrainConfig":
        """Refuse every bad value before anything is loaded or written."""

        def need(ok: bool, cause: str, fix: str) -> None:
            if not ok:
                raise NPTError(cause, fix)

        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            need(choices is None or value in choices, f"--{f.name} {value!r} is not one of {choices}.", f"Use one of {choices}.")
            if isinstance(value, float):
                need(math.isfinite(value), f"--{f.name} is {value}.", f"Pass a finite number for --{f.name}.")
        for name in ("mse_weight", "cosine_weight", "regularization_lambda", "gradient_penalty_lambda", "weight_decay", "max_grad_norm", "focal_gamma"):
            need(getattr(self, name) >= 0, f"--{name} {getattr(self, name)} is negative.", f"Pass --{name} >= 0.")
        if self.loss_type == "improved_npt":
            need(
                self.mse_weight + self.cosine_weight > 0,
                "--mse_weight and --cosine_weight are both 0: improved_npt would train nothing.",
                "Give at least one of them a positive weight (the guide: 0.8 and 0.2).",
            )
        if self.loss_type == "smooth_l1_mse":
            need(self.mse_weight <= 1, f"--mse_weight {self.mse_weight} > 1 gives smooth_l1_mse a negative smooth-L1 weight.", "Pass --mse_weight in [0, 1] (the guide: 0.5).")
        need(self.smooth_beta > 0, f"--smooth_beta {self.smooth_beta} must be positive.", "Pass --smooth_beta > 0 (the guide: 1.0).")
        for name in ("adapter_rank", "num_ranks", "batch_size", "gradient_accumulation_steps", "max_steps", "eval_blocks", "eval_batch_size", "logging_steps", "save_steps", "save_total_limit", "max_bad_steps", "gradient_penalty_every"):
            need(getattr(self, name) >= 1, f"--{name} {getattr(self, name)} must be at least 1.", f"Pass --{name} >= 1.")
        for name in ("eval_steps", "num_samples", "shuffle_buffer"):
            need(getattr(self, name) >= 0, f"--{name} {getattr(self, name)} is negative.", f"Pass --{name} >= 0.")
        need(self.max_length >= 2, f"--max_length {self.max_length} is too short.", "Pass --max_length of at least 2 (typically 512-2048).")
        need(self.learning_rate > 0, f"--learning_rate {self.learning_rate} must be positive.", "Pass e.g. --learning_rate 1e-3.")
        need(self.adaptive_weights_lr > 0, f"--adaptive_weights_lr {self.adaptive_weights_lr} must be positive.", "Pass e.g. 0.01.")
        need(0 < self.eval_fraction < 1, f"--eval_fraction {self.eval_fraction} is outside (0, 1).", "Pass e.g. --eval_fraction 0.02.")
        need(self.distill_temperature >= 1, f"--distill_temperature {self.distill_temperature} < 1 would sharpen, not soften, targets.", "Pass --distill_temperature >= 1 (the guide: 2-5).")
        need(0 <= self.curriculum_start <= 1, f"--curriculum_start {self.curriculum_start} is outside [0, 1].", "Pass e.g. 0.5 (the guide's).")
        need(0 <= self.min_lr_ratio <= 1, f"--min_lr_ratio {self.min_lr_ratio} is outside [0, 1].", "Pass e.g. 0.1.")
        need(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1 and self.adam_eps > 0, "AdamW betas must be in [0, 1) and eps positive.", "Use the defaults (0.9, 0.999, 1e-8).")
        _ = self.warmup, self.curriculum  # parse errors surface here
        need(
            not (self.fsdp and self.use_gradient_penalty),
            "--use_gradient_penalty does not work with --fsdp: its double backward runs through layers whose weights FSDP has already freed.",
            "Drop one of them (configs/standard.yaml and difficult.yaml turn the penalty on: add --no-use_gradient_penalty).",
        )
        need(self.free_running <= self.max_steps, f"--free_running_steps {self.free_running_steps} exceeds --max_steps {self.max_steps}.", "Pass a count up to --max_steps or a fraction such as 0.3.")
        need(self.logit_kl_weight >= 0, f"--logit_kl_weight {self.logit_kl_weight} is negative.", "Pass --logit_kl_weight >= 0.")
        need(
            self.logit_kl_weight == 0 or self.free_running > 0,
            "--logit_kl_weight acts only in free-running steps, and --free_running_steps is 0.",
            "Add --free_running_steps (e.g. 0.3), or drop --logit_kl_weight.",
        )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        data = self.to_dict() | {"resolved": {"warmup_steps": self.warmup, "curriculum_steps": self.curriculum, "free_running_steps": self.free_running}}
        path.write_text(json.dumps(data, indent=2) + "\n")


# ---- command line ---------------------------------------------------------------------------------

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _type_of(f: dataclasses.Field):
    hint = str(f.type)
    if "bool" in hint:
        return bool
    if "int" in hint:
        return int
    if "float" in hint:
        return float
    return str


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (cause and fix), not the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message}. Fix: see `{self.prog} --help`.\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pretrain_npt_improved.py",
        description="Equivalence pre-training of Neuro-Plastic Transformer (NPT) adapters with the improved loss.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML (or JSON) file of defaults; explicit flags override it.")
    groups = {g: parser.add_argument_group(g) for g in ("model", "data", "loss", "optim", "run")}
    for name, f in FIELDS.items():
        kind = _type_of(f)
        kwargs: dict[str, Any] = {"default": f.default, "help": f.metadata["help"], "dest": name}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
            if f.metadata.get("nargs"):
                kwargs["nargs"] = f.metadata["nargs"]
        groups[f.metadata["group"]].add_argument(f"--{name}", **kwargs)
    return parser


def load_config_file(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise NPTError(f"Config file {path} does not exist.", "Pass an existing file, e.g. --config configs/standard.yaml.")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise NPTError(f"Config file {path} is not valid YAML: {str(e).splitlines()[0]}", "Fix the file's syntax.") from None
    if not isinstance(data, dict):
        raise NPTError(f"Config file {path} must be a mapping of option: value.", "See configs/standard.yaml.")
    data.pop("resolved", None)  # a saved config.json can be used as a config file
    for key, value in data.items():
        if key not in FIELDS:
            close = difflib.get_close_matches(key, FIELDS, n=1)
            raise NPTError(f"Config file {path}: unknown option {key!r}.", f"Did you mean {close[0]!r}?" if close else "See --help for the options.")
        kind = _type_of(FIELDS[key])
        if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                value = data[key] = float(value)
            except ValueError:
                pass
        if value is not None and kind is not str and not (kind is float and isinstance(value, int)) and not isinstance(value, kind):
            raise NPTError(f"Config file {path}: {key} = {value!r} is not a {kind.__name__}.", f"Give {key} a {kind.__name__} value.")
        if key == "data_files" and isinstance(value, str):
            data[key] = [value]
        elif kind is str and value is not None and key != "data_files":
            data[key] = str(value)
    return data


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**load_config_file(pre.config))
    args = vars(parser.parse_args(argv))
    args.pop("config")
    return TrainConfig(**args).validate()
