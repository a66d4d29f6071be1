"""The run's configuration: small argument dataclasses, each owned by the module that uses it,
composed here and parsed by `HfArgumentParser`.

    model   ModelArguments    loading.py     which teacher, dtype, attention
    adapter AdapterArguments  model.py       layers, rank r, k, scale, init
    data    DataArguments     data.py        dataset, split, block length, held-out set
    loss    LossConfig        losses.py      the guide's loss and its mechanisms
    optim   OptimArguments    optim.py       optimizer, schedule, batch, steps
    run     RunArguments      run.py         output, logging, evaluation, devices, reliability

Every field is a flag of the same name (`--learning_rate`), and a key of the same name in a YAML
config file. Precedence: field default < `--config FILE` < explicit command-line flag. Values of a
config file are parsed as flags, so they are checked by the same rules. A bad value is refused in
one line that names the flag and the fix; an unknown flag or key gets a "did you mean".
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.resources
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from .data import DataArguments
from .errors import NPTError
from .loading import ModelArguments
from .losses import LossConfig
from .model import AdapterArguments
from .optim import OptimArguments, resolve_steps
from .run import RunArguments
from .schedules import converted_count, progressive_stage

GROUPS: dict[str, type] = {
    "model": ModelArguments,
    "adapter": AdapterArguments,
    "data": DataArguments,
    "loss": LossConfig,
    "optim": OptimArguments,
    "run": RunArguments,
}
FIELD_GROUP = {f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}
# Names people type that are not ours: the one they meant.
SYNONYMS = {"lr": "learning_rate", "model": "model_name", "epochs": "max_steps", "num_train_steps": "max_steps",
            "batch": "batch_size", "train_batch_size": "batch_size", "warmup": "warmup_steps", "rank": "adapter_rank"}


@dataclasses.dataclass
class Config:
    model: ModelArguments = dataclasses.field(default_factory=ModelArguments)
    adapter: AdapterArguments = dataclasses.field(default_factory=AdapterArguments)
    data: DataArguments = dataclasses.field(default_factory=DataArguments)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimArguments = dataclasses.field(default_factory=OptimArguments)
    run: RunArguments = dataclasses.field(default_factory=RunArguments)

    def __post_init__(self):
        """Rules that span groups (each group checks its own fields when it is made)."""
        if self.free_running > self.optim.max_steps:
            raise NPTError(f"--free_running_steps {self.loss.free_running_steps} exceeds --max_steps {self.optim.max_steps}.",
                           "Pass a count up to --max_steps or a fraction such as 0.3.")
        if self.loss.logit_kl_weight > 0 and self.free_running == 0:
            raise NPTError("--logit_kl_weight acts only in free-running steps, and --free_running_steps is 0.",
                           "Add --free_running_steps (e.g. 0.3), or pass --logit_kl_weight 0.")
        if self.free_running and self.loss.logit_kl_weight == 0 and self.loss.free_running_layer_weight == 0:
            raise NPTError("--free_running_layer_weight 0 and --logit_kl_weight 0: free-running steps would train nothing.",
                           "Give one of them a positive weight (the default: the logit KL, weight 1).")
        if self.loss.progressive_stages > max(self.free_running, 1):
            raise NPTError(f"--progressive_stages {self.loss.progressive_stages}: the stages split the free-running phase, which has {self.free_running} steps.",
                           "Pass at most as many stages as free-running steps (and --free_running_steps > 0).")
        if self.run.fsdp and self.loss.use_gradient_penalty:
            raise NPTError("--use_gradient_penalty does not work with --fsdp: its double backward runs through layers whose weights FSDP has already freed.",
                           "Drop one of them (configs/standard.yaml and difficult.yaml turn the penalty on: add --no-use_gradient_penalty).")
        _ = self.curriculum  # parse errors surface here

    # ---- step counts given as counts or fractions of max_steps --------------------------------

    @property
    def warmup(self) -> int:
        return self.optim.warmup

    @property
    def curriculum(self) -> int:
        value, flag = self._curriculum_spec
        return resolve_steps(value, self.optim.max_steps, flag)

    @property
    def _curriculum_spec(self) -> tuple[str, str]:
        """(value, flag) that sets the curriculum's length: its own flag, or the warm-up's."""
        value = self.loss.curriculum_steps
        return (self.optim.warmup_steps, "warmup_steps") if value in (None, "") else (value, "curriculum_steps")

    @property
    def free_running(self) -> int:
        if str(self.loss.free_running_steps).strip() == "auto":
            # teacher forcing outlasts the curriculum (the guide's loss acts there) by as long again;
            # more teacher forcing than that made every teacher measured worse (docs/loss.md)
            value, flag = self._curriculum_spec
            forced = resolve_steps(value, self.optim.max_steps, flag, times=2)
            return self.optim.max_steps - min(forced, self.optim.max_steps // 2)
        return resolve_steps(self.loss.free_running_steps, self.optim.max_steps, "free_running_steps")

    @property
    def free_running_from(self) -> int:
        """The first step that runs the student freely."""
        return self.optim.max_steps - self.free_running

    def stage(self, step: int) -> int:
        """The progressive stage of step `step`: 0 in teacher-forced steps and when every layer is
        converted at once (--progressive_stages 1), else 1..N."""
        if self.loss.progressive_stages == 1 or step < self.free_running_from:
            return 0
        return progressive_stage(step, self.free_running_from, self.optim.max_steps, self.loss.progressive_stages)

    def npt_count(self, step: int, layers: int) -> int:
        """How many of the `layers` converted layers (the lowest) run as NPT layers in step `step`."""
        stage = self.stage(step)
        return layers if stage == 0 else converted_count(stage, self.loss.progressive_stages, layers)

    # ---- flat views (flags, config files, config.json) ----------------------------------------

    def to_flat(self) -> dict[str, Any]:
        return {k: v for group in GROUPS for k, v in dataclasses.asdict(getattr(self, group)).items()}

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> "Config":
        groups = {g: {} for g in GROUPS}
        for key, value in values.items():
            groups[FIELD_GROUP[key]][key] = value
        return cls(**{g: GROUPS[g](**kw) for g, kw in groups.items()})

    def replace(self, **flat: Any) -> "Config":
        """A copy with some fields changed (by flag name), validated again."""
        return Config.from_flat(self.to_flat() | flat)

    def save(self, path: Path) -> None:
        resolved = {"warmup_steps": self.warmup, "curriculum_steps": self.curriculum, "free_running_steps": self.free_running}
        path.write_text(json.dumps(self.to_flat() | {"resolved": resolved}, indent=2) + "\n")


# ---- command line -----------------------------------------------------------------------------------


class Parser(HfArgumentParser):
    """HfArgumentParser with this project's conventions: no abbreviations, one-line errors with
    "did you mean", `--no-X` for every boolean. Every command uses it."""

    def __init__(self, dataclass_types, prog: str, description: str | None = None):
        super().__init__(list(dataclass_types), prog=prog, description=description, allow_abbrev=False)

    @staticmethod
    def _parse_dataclass_field(parser, field):
        HfArgumentParser._parse_dataclass_field(parser, field)
        if field.type is bool and field.default is False:  # HfArgumentParser adds --no_X only for default-True booleans
            parser.add_argument(f"--no_{field.name}", f"--no-{field.name}", dest=field.name, action="store_false",
                                help=f"Turn --{field.name} off (e.g. over a config file).")
        elif field.type is bool and "_" in field.name:
            parser.add_argument(f"--no-{field.name}", dest=field.name, action="store_false", help=argparse.SUPPRESS)

    def error(self, message: str):
        if message.startswith("unrecognized arguments:"):
            unknown = [a.split("=")[0] for a in message.split(":", 1)[1].split() if a.startswith("-")]
            hints = [f"{u}: did you mean {s}?" for u in unknown if (s := self.suggest(u))]
            raise NPTError(f"{message}.", " ".join(hints) or f"See `{self.prog} --help` for the options.")
        raise NPTError(f"{message}.", f"See `{self.prog} --help`.")

    def suggest(self, option: str) -> str | None:
        name = option.lstrip("-").replace("-", "_")
        if name in SYNONYMS:
            return f"--{SYNONYMS[name]}"
        options = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        close = difflib.get_close_matches("--" + name, options, n=1, cutoff=0.7)
        return close[0] if close else None

    def parse_into(self, argv: list[str] | None) -> dict[type, object]:
        """{dataclass type: instance} from the command line (no `.args` files, no leftovers)."""
        namespace = vars(self.parse_args(argv))
        return {cls: cls(**{f.name: namespace[f.name] for f in dataclasses.fields(cls) if f.init}) for cls in self.dataclass_types}


class ArgumentParser(Parser):
    """The pre-training command's parser: every group, plus `--config FILE`, `--bf16` / `--fp16`."""

    def __init__(self, prog: str = "npt-pretrain", description: str | None = None):
        super().__init__(GROUPS.values(), prog=prog, description=description)
        self.add_argument("--config", default=None, help="YAML (or JSON) file of option: value defaults; explicit flags override it.")
        self.add_argument("--bf16", dest="mixed_precision", action="store_const", const="bf16", help="Same as --mixed_precision bf16.")
        self.add_argument("--fp16", dest="mixed_precision", action="store_const", const="fp16", help="Same as --mixed_precision fp16.")


# Flags a resumed run may change without changing what it trains: where and how often it logs,
# saves and evaluates, how long it runs, how the work is laid out on the device(s).
RESUMABLE_CHANGES = frozenset({
    "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "progress", "report_to", "log_level", "logging_steps",
    "save_steps", "save_total_limit", "eval_steps", "eval_blocks", "eval_batch_size", "num_samples", "greedy_prompts",
    "greedy_tokens", "max_steps", "device", "compile", "gradient_checkpointing", "attn_implementation", "fsdp",
    "divergence_patience", "max_rollbacks", "max_bad_steps",
})


def changed_recipe(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{flag: (checkpoint's value, this run's value)} for every flag of the training recipe that a
    resumed run changes (a flag the checkpoint did not record counts as changed: its run trained
    with an older default)."""
    return {k: (saved.get(k, "(not recorded)"), v) for k, v in now.items()
            if k not in RESUMABLE_CHANGES and (k not in saved or saved[k] != v)}


def bundled_config(name: str) -> Path | None:
    """A recipe shipped with the package (`standard`, `difficult`, `fast`): installed as package
    data `npt.configs`, or the configs/ folder next to the package in a checkout."""
    try:
        found = Path(str(importlib.resources.files("npt.configs") / f"{name}.yaml"))
    except ModuleNotFoundError:
        found = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    return found if found.is_file() else None


def config_file_args(path: str, parser: ArgumentParser) -> list[str]:
    """The flags a YAML/JSON config file stands for (a saved config.json works too); a bare name
    such as `standard` is a bundled recipe."""
    p = Path(path)
    if not p.is_file() and "/" not in path and bundled_config(path.removesuffix(".yaml")):
        p = bundled_config(path.removesuffix(".yaml"))
    if not p.is_file():
        raise NPTError(f"Config file {path} does not exist.", "Pass an existing file, or a bundled recipe: --config standard, difficult or fast.")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise NPTError(f"Config file {path} is not valid YAML: {str(e).splitlines()[0]}", "Fix the file's syntax.") from None
    if not isinstance(data, dict):
        raise NPTError(f"Config file {path} must be a mapping of option: value.", "See configs/standard.yaml.")
    data.pop("resolved", None)
    args: list[str] = []
    for key, value in data.items():
        if key not in FIELD_GROUP:
            hint = parser.suggest(key)
            raise NPTError(f"Config file {path}: unknown option {key!r}.", f"Did you mean {hint.lstrip('-')!r}?" if hint else "See --help for the options.")
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        args += [f"--{key}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    try:  # the file's values on their own, so that an error names the file
        parser.parse_args(args)
    except NPTError as e:
        raise NPTError(f"Config file {path}: {e.cause}", e.fix) from None
    return args


def parse_args(argv: list[str] | None = None, prog: str = "npt-pretrain") -> Config:
    parser = ArgumentParser(prog=prog, description="Equivalence pre-training of Neuro-Plastic Transformer (NPT) adapters with the improved loss.")
    argv = list(sys.argv[1:] if argv is None else argv)
    first, _ = parser.parse_known_args(argv)
    file_args = config_file_args(first.config, parser) if first.config else []
    namespace = vars(parser.parse_args(file_args + argv))
    namespace.pop("config")
    return Config.from_flat(namespace)
