"""The divergence policy: each phase judged by what it trains, against the last good evaluation,
with patience; and the loop acting on its verdicts."""

from __future__ import annotations

import json
import math

import pytest

from npt.config import parse_args
from npt.divergence import DivergencePolicy
from npt.evaluate import EvalResult
from npt.monitor import Sign
from npt.train import fit, finish, setup, start


def rec(step: int, kl: float, rel: float) -> dict:
    return {"step": step, "kl": kl, "rel_error_mean": rel, "rel_error": [rel, rel]}


def test_a_teacher_forced_phase_whose_layers_improve_is_not_rolled_back_for_a_rising_kl():
    """SmolLM2-135M's first evaluations: every layer's error falls while the free-running KL rises."""
    policy = DivergencePolicy(patience=2)
    assert policy.observe_eval(rec(0, 6.92, 0.55), free_running=False).good
    for step, kl, rel in [(20, 9.39, 0.45), (40, 12.0, 0.40), (60, 13.5, 0.38)]:
        verdict = policy.observe_eval(rec(step, kl, rel), free_running=False)
        assert verdict.diverged is None and verdict.good, (step, verdict)
    assert policy.last_good["step"] == 60


def test_a_teacher_forced_phase_whose_layers_get_worse_is_rolled_back_after_the_patience():
    policy = DivergencePolicy(patience=2)
    policy.observe_eval(rec(0, 6.9, 0.55), free_running=False)
    policy.observe_eval(rec(20, 6.0, 0.45), free_running=False)
    first = policy.observe_eval(rec(40, 5.0, 0.50), free_running=False)  # 11% worse than step 20: a strike
    assert first.diverged is None and not first.good
    second = policy.observe_eval(rec(60, 5.0, 0.52), free_running=False)
    assert second.diverged and "step 20" in second.diverged and "2 evaluations in a row" in second.diverged
    assert policy.last_good["step"] == 20  # the rollback target
    # a recovery between two strikes clears them
    policy.rolled_back()
    policy.observe_eval(rec(80, 5.0, 0.50), free_running=False)
    assert policy.observe_eval(rec(100, 5.0, 0.44), free_running=False).good
    assert policy.observe_eval(rec(120, 5.0, 0.46), free_running=False).diverged is None


def test_a_real_divergence_rolls_back_at_once():
    policy = DivergencePolicy(patience=2)
    policy.observe_eval(rec(0, 6.9, 0.55), free_running=False)
    blown = policy.observe_eval(rec(20, 7.0, 1.20), free_running=False)  # rel error 2.2x the reference
    assert blown.diverged and "2.2x" in blown.diverged
    assert policy.observe_eval(rec(40, math.nan, 0.40), free_running=False).diverged == "the held-out KL is nan"


def test_the_free_running_phase_is_judged_by_the_kl_against_its_own_last_good_evaluation():
    policy = DivergencePolicy(patience=2)
    policy.observe_eval(rec(0, 6.9, 0.55), free_running=False)
    policy.observe_eval(rec(200, 9.0, 0.30), free_running=False)  # end of teacher forcing
    # the first free-running evaluation has no reference of its phase: good unless 2x the last good KL
    assert policy.observe_eval(rec(250, 10.0, 1.5), free_running=True).good
    assert policy.observe_eval(rec(300, 4.0, 2.0), free_running=True).good  # rel error is not its measure
    assert policy.observe_eval(rec(350, 4.5, 1.0), free_running=True).diverged is None  # strike 1
    late = policy.observe_eval(rec(400, 4.4, 1.0), free_running=True)
    assert late.diverged and "held-out KL" in late.diverged
    assert policy.observe_eval(rec(450, 8.1, 1.0), free_running=True).diverged  # 2x step 300's KL: at once

    fresh = DivergencePolicy()
    fresh.observe_eval(rec(0, 3.0, 0.5), free_running=False)
    assert fresh.observe_eval(rec(100, 6.5, 0.4), free_running=True).diverged  # first free-running eval at 2x


def test_logged_losses_judge_only_teacher_forced_steps_except_non_finite():
    policy = DivergencePolicy()
    policy.observe_eval(rec(0, 6.9, 0.5), free_running=False)  # loss/mse before training: mean(0.5^2) = 0.25
    explode = [Sign("mse_exploding", 10, "x")]
    assert policy.observe_log({"loss/mse": 0.49}, [], free_running=False).diverged is None
    assert "twice its value before training (0.25)" in policy.observe_log({"loss/mse": 0.51}, [], free_running=False).diverged
    assert policy.observe_log({"loss/mse": 0.2}, explode, free_running=False).diverged == "the monitor saw loss/mse explode"
    # running freely, loss/mse adds up every layer's error: only a non-finite value counts
    assert policy.observe_log({"loss/mse": 1800.0}, explode, free_running=True).diverged is None
    assert policy.observe_log({"loss/mse": math.inf}, [], free_running=True).diverged == "loss/mse is inf"
    assert policy.observe_bad_steps(2).diverged is None and policy.observe_bad_steps(3).diverged


def test_the_free_running_training_kl_is_judged_against_the_first_step_of_its_phase():
    """SmolLM2-135M's 30 layers at the teacher-forced rate: 2.33 at the first free-running step,
    then interval means that climb to several times that within steps."""
    policy = DivergencePolicy()
    assert not policy.needs_training_reference(free_running=False)
    assert policy.needs_training_reference(free_running=True)  # the phase's first step is logged on its own
    assert policy.observe_log({"loss/mse": 1e9, "loss/logit_kl": 2.33}, [], free_running=True, step=401).diverged is None
    assert not policy.needs_training_reference(free_running=True)
    assert policy.observe_log({"loss/mse": 1e9, "loss/logit_kl": 4.65}, [], free_running=True, step=410).diverged is None  # 1.996x
    assert policy.observe_log({"loss/mse": 1e9, "loss/logit_kl": 0.50}, [], free_running=True, step=420).diverged is None
    # a noisy low step is no reference: only the phase's first step is (a micro batch's KL swings 6x)
    assert policy.observe_log({"loss/mse": 1e9, "loss/logit_kl": 3.00}, [], free_running=True, step=430).diverged is None
    blown = policy.observe_log({"loss/mse": 1e9, "loss/logit_kl": 4.66}, [], free_running=True, step=440).diverged
    assert blown == "the training KL (loss/logit_kl) 4.6600 is 2.0x that of step 401 (2.3300), where this free-running phase started"
    assert policy.observe_log({"loss/mse": 1.0, "loss/logit_kl": math.nan}, [], free_running=True, step=450).diverged == "the training KL (loss/logit_kl) is nan"
    # a rollback starts the reference afresh: the next step is the new first one
    policy.rolled_back()
    assert policy.needs_training_reference(free_running=True)
    assert policy.observe_log({"loss/mse": 1.0, "loss/logit_kl": 5.0}, [], free_running=True, step=451).diverged is None
    assert policy.observe_log({"loss/mse": 1.0, "loss/logit_kl": 9.9}, [], free_running=True, step=460).diverged is None
    # each progressive stage is a phase of its own, with its own first step
    assert policy.needs_training_reference(free_running=True, stage=2)
    assert policy.observe_log({"loss/mse": 1.0, "loss/logit_kl": 20.0}, [], free_running=True, step=470, stage=2).diverged is None
    # free-running steps that do not train the KL are not judged by it
    untrained = DivergencePolicy(training_kl=False)
    assert not untrained.needs_training_reference(free_running=True)
    assert untrained.observe_log({"loss/mse": 1.0, "loss/logit_kl": 1.0}, [], free_running=True, step=1).diverged is None
    assert untrained.observe_log({"loss/mse": 1.0, "loss/logit_kl": 9.0}, [], free_running=True, step=2).diverged is None


def test_the_policy_state_round_trips():
    policy = DivergencePolicy()
    policy.observe_eval(rec(0, 6.9, 0.5), free_running=False)
    policy.observe_eval(rec(10, 6.0, 0.6), free_running=False)  # a strike
    policy.observe_log({"loss/mse": 1.0, "loss/logit_kl": 0.7}, [], free_running=True, step=11)
    other = DivergencePolicy()
    other.load_state_dict(json.loads(json.dumps(policy.state_dict())))
    assert other.state_dict() == policy.state_dict() and other.strikes == 1
    assert other.observe_log({"loss/mse": 1.0, "loss/logit_kl": 1.4}, [], free_running=True, step=20).diverged  # 2x the restored first step


@pytest.mark.slow
def test_the_loop_keeps_training_through_a_rising_kl_and_rolls_back_a_rising_layer_error(tmp_path, micro_teacher, monkeypatch):
    """The run acts on the verdicts: evaluations are scripted (kl, rel error) per step."""
    teacher, text = micro_teacher
    script = {0: (6.9, 0.55), 2: (9.4, 0.45), 4: (12.0, 0.40), 6: (12.0, 0.60), 8: (12.0, 0.62), 10: (12.0, 0.40)}
    state = {}

    def scripted(npt_model, blocks, batch_size):
        kl, rel = script[state["run"].progress.step]
        return EvalResult([0, 1], [rel, rel], [0.5, 0.5], kl, 10.0, 10.0 * math.exp(kl), 100)

    monkeypatch.setattr("npt.train.evaluate", scripted)
    cfg = parse_args(["--model_name", str(teacher), "--data_files", str(text), "--output_dir", str(tmp_path / "run"), "--max_length", "32",
                      "--batch_size", "2", "--eval_blocks", "2", "--num_samples", "0", "--no-progress", "--max_steps", "10", "--eval_steps", "2",
                      "--free_running_steps", "0", "--logit_kl_weight", "0", "--report_to", "none", "--learning_rate", "1e-3"])
    run = setup(cfg)
    state["run"] = run
    tracker = start(run)
    fit(run, tracker, stopper=type("NoSignal", (), {"signum": 0})())
    summary = finish(run, tracker, 0.0)
    # steps 2 and 4: the KL rose, every layer improved: no rollback; steps 6 and 8: two strikes -> back to step 4
    assert [(r["step"], r["to_step"]) for r in summary["rollbacks"]] == [(8, 4)]
    assert "held-out mean relative error 0.6200 is above that of step 4 (0.4000)" in summary["rollbacks"][0]["reason"]


def test_each_progressive_stage_is_judged_against_its_own_evaluations():
    """A stage converts more layers than the one before: its first KL may be higher, and is not a
    strike against the stage before; within a stage the usual rule holds."""
    policy = DivergencePolicy(patience=2)
    policy.observe_eval(rec(0, 6.9, 0.55), free_running=False)
    assert policy.observe_eval(rec(100, 3.0, 0.5), free_running=True, stage=1).good
    assert policy.observe_eval(rec(150, 2.5, 0.5), free_running=True, stage=1).good
    assert policy.observe_eval(rec(200, 4.0, 0.6), free_running=True, stage=2).good  # 1.6x stage 1's last: a new phase
    assert policy.observe_eval(rec(250, 4.2, 0.6), free_running=True, stage=2).diverged is None  # strike 1 within stage 2
    late = policy.observe_eval(rec(300, 4.3, 0.6), free_running=True, stage=2)
    assert late.diverged and "step 200" in late.diverged
    assert policy.observe_eval(rec(350, 8.1, 0.6), free_running=True, stage=3).diverged  # 2x the last good (step 200's 4.0)
