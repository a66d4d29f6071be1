"""Runs speak, and speak the Hugging Face ecosystem's language: flag names, trackers, mixed
precision, adapter folders that say what they are, adapters from a hub id."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from helpers import read_scalars

from npt.cli import main
from npt.config import parse_args
from npt.errors import NPTError
from npt.model import NPTModel
from npt.serialization import read_adapter_config


def tiny(teacher: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_name", str(teacher), "--output_dir", str(out), "--max_length", "32", "--batch_size", "4", "--eval_blocks", "4",
            "--num_samples", "0", "--no-progress", "--max_steps", "6", "--eval_steps", "0", *extra]


def refusal(argv: list[str]) -> str:
    with pytest.raises(NPTError) as e:
        parse_args(argv)
    return str(e.value)


def test_flags_are_never_abbreviated_and_a_typo_gets_a_did_you_mean():
    assert "did you mean --learning_rate?" in refusal(["--learning_rat", "3e-4"])
    assert "did you mean --learning_rate?" in refusal(["--lr", "3e-4"])
    assert "did you mean --max_steps?" in refusal(["--max_step", "10"])
    assert "invalid float value: 'abc'" in refusal(["--learning_rate", "abc"])


def test_hugging_face_argument_names_are_aliases_of_ours():
    cfg = parse_args(["--model_name_or_path", "m", "--per_device_train_batch_size", "3", "--per_device_eval_batch_size", "5",
                      "--lr_scheduler_type", "linear", "--adam_epsilon", "1e-6", "--torch_compile", "--bf16"])
    assert (cfg.model.model_name, cfg.optim.batch_size, cfg.run.eval_batch_size) == ("m", 3, 5)
    assert (cfg.optim.lr_scheduler, cfg.optim.adam_eps, cfg.run.compile, cfg.run.mixed_precision) == ("linear", 1e-6, True, "bf16")
    assert parse_args(["--fp16"]).run.mixed_precision == "fp16"
    assert parse_args(["--config", "difficult", "--no-use_gradient_penalty"]).loss.use_gradient_penalty is False


@pytest.mark.slow
def test_a_run_speaks_before_during_and_after_training(tmp_path, trained_teacher_dir, capsys, monkeypatch):
    """The banner, one line per logging step without a terminal, tokens/s over training time
    only (evaluation made slow here must not show in it), runtime and tokens in the summary."""
    import npt.train

    real_evaluate = npt.train.evaluate

    def slow_evaluate(*args, **kwargs):
        time.sleep(1.0)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(npt.train, "evaluate", slow_evaluate)
    out = tmp_path / "run"
    assert main(tiny(trained_teacher_dir, out, "--max_steps", "8", "--logging_steps", "2", "--eval_steps", "2")) == 0
    stdout = capsys.readouterr().out
    for field in ("[npt] output ", f"tensorboard --logdir {out / 'tensorboard'}", "[npt] model ", "[npt] data ", "[npt] device      cpu, 1 process",
                  "[npt] batch       4 blocks x 1 accumulation x 1 = 4 blocks = 128 tokens per step; 8 steps",
                  "teacher forcing until step 2, then free-running", "[npt] parameters "):
        assert field in stdout, field
    # every 2 steps, and the first free-running step (3) on its own: the reference of its training KL
    assert [line.split("|")[0].strip() for line in stdout.splitlines() if line.startswith("[npt] step ") and "| loss" in line] == \
        [f"[npt] step {s}/8" for s in (2, 3, 4, 6, 8)]
    rates = read_scalars(out)["training/tokens_per_sec"]
    steps_in = {2: 2, 3: 1, 4: 1, 6: 2, 8: 2}  # the steps each logged interval holds
    summary = json.loads((out / "summary.json").read_text())
    # 5 evaluations slept 5 s: wall time has them; training time does not, and tokens/s is taken
    # over training time: each log's steps x 128 tokens over its rate add up to it exactly
    assert summary["runtime_seconds"] - summary["train_seconds"] > 5.0
    assert sum(steps_in[s] * 128 / r for s, r in rates.items()) == pytest.approx(summary["train_seconds"], abs=0.1)
    assert summary["tokens_seen"] == 8 * 4 * 32
    assert summary["mixed_precision"] == npt.train.mixed_precision(parse_args([]), use_cpu=True)  # auto: bf16 where this CPU has it
    # the same lines, with times and module names, in train.log; the behaviour metrics in the summary
    log = (out / "train.log").read_text()
    assert " INFO npt.train: step 8/8 | loss" in log and " INFO npt.train: before training: mean rel error" in log
    final = summary["eval"]
    assert 0 <= final["top1_agreement"] <= 1 and final["greedy_prompts"] == 4 and 0 <= final["greedy_match"] <= 32
    assert len(summary["greedy_samples_final"]) == 4 and {"eval/top1_agreement", "eval/greedy_match"} <= set(read_scalars(out))


@pytest.mark.slow
def test_the_run_config_goes_to_the_trackers_and_an_absent_tracker_is_refused(tmp_path, trained_teacher_dir, capsys):
    out = tmp_path / "run"
    assert main(tiny(trained_teacher_dir, out, "--learning_rate", "0.0042")) == 0
    hparams = list((out / "tensorboard").rglob("hparams.yml"))
    assert len(hparams) == 1 and "learning_rate: 0.0042" in hparams[0].read_text()
    capsys.readouterr()
    assert main(tiny(trained_teacher_dir, tmp_path / "other", "--report_to", "no-such-tracker")) == 2
    assert "--report_to ['no-such-tracker'] is not installed" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


@pytest.mark.slow
def test_accelerates_own_mixed_precision_is_honoured_when_the_flag_is_auto(tmp_path, trained_teacher_dir, monkeypatch):
    """`accelerate launch --mixed_precision bf16` sets ACCELERATE_MIXED_PRECISION; on CPU this
    also trains under bfloat16 autocast."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert main(tiny(trained_teacher_dir, tmp_path / "auto")) == 0
    auto = json.loads((tmp_path / "auto" / "summary.json").read_text())
    assert auto["mixed_precision"] == "bf16" and auto["eval"]["kl"] < auto["eval_before"]["kl"]
    assert main(tiny(trained_teacher_dir, tmp_path / "no", "--mixed_precision", "no")) == 0
    assert json.loads((tmp_path / "no" / "summary.json").read_text())["mixed_precision"] == "no"


@pytest.mark.slow
def test_an_adapter_folder_says_it_is_npt_and_loads_from_a_hub_id(tmp_path, trained_teacher_dir, monkeypatch):
    out = tmp_path / "run"
    assert main(tiny(trained_teacher_dir, out)) == 0
    adapter = out / "adapter"
    raw = json.loads((adapter / "adapter_config.json").read_text())
    assert raw["adapter_type"] == "npt" and "peft_type" not in raw
    assert "not a PEFT adapter" in (adapter / "README.md").read_text()
    assert (adapter / "tokenizer_config.json").is_file()  # the tokenizer travels with the adapters
    # a PEFT adapter config is refused with a hint, not a KeyError
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(NPTError, match="describes a LORA adapter, not an NPT adapter"):
        read_adapter_config(peft)
    # a hub id, resolved through the HF cache exactly as a download would leave it (offline here)
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--npt-adapter" / "snapshots" / ("0" * 40)
    shutil.copytree(adapter, snapshot)
    (cache / "models--acme--npt-adapter" / "refs").mkdir()
    (cache / "models--acme--npt-adapter" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    from_hub = NPTModel.from_pretrained("acme/npt-adapter")
    from_folder = NPTModel.from_pretrained(adapter)
    for k, v in from_folder.adapter_state_dict().items():
        assert torch.equal(from_hub.adapter_state_dict()[k], v), k
    with pytest.raises(NPTError, match="not in the local HF cache"):
        NPTModel.from_pretrained("acme/no-such-adapter")


def test_auto_mixed_precision_is_bf16_where_the_device_multiplies_it_natively(monkeypatch):
    import npt.train
    from npt.config import parse_args

    cfg = parse_args([])
    assert cfg.run.mixed_precision == "auto"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    for avx512_bf16, amx, expected in ((True, False, "bf16"), (False, True, "bf16"), (False, False, "no")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert npt.train.mixed_precision(cfg, use_cpu=True) == expected
        assert npt.train.mixed_precision(parse_args(["--mixed_precision", "no"]), use_cpu=True) == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # accelerate's own setting wins
    assert npt.train.mixed_precision(cfg, use_cpu=True) == "fp16"


def test_a_resumed_run_names_each_flag_of_the_recipe_it_changes():
    from npt.config import changed_recipe

    saved = {"learning_rate": 0.02, "max_steps": 4, "seed": 1, "output_dir": "a"}
    now = {"learning_rate": 0.001, "max_steps": 6, "seed": 1, "output_dir": "b", "modulate": "gate"}
    # max_steps and output_dir may change; a flag the checkpoint never recorded had an older default
    assert changed_recipe(saved, now) == {"learning_rate": (0.02, 0.001), "modulate": ("(not recorded)", "gate")}
    assert changed_recipe(now, now) == {}
