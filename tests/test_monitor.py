"""Each warning sign fires on a synthetic curve that shows it and stays silent on a healthy one."""

from __future__ import annotations

import math

import pytest
import torch

from npt.monitor import REMEDIES, ConvergenceMonitor


def healthy(n: int = 60, seed: int = 0) -> list[dict[str, float]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for k in range(n):
        noise = 1 + 0.02 * torch.randn((), generator=g).item()
        rows.append(
            {
                "loss/alignment": (0.2 + 0.3 * math.exp(-k / 15)) * noise,
                "loss/mse": (0.3 + 0.4 * math.exp(-k / 15)) * noise,
                "loss/cosine": (0.1 + 0.2 * math.exp(-k / 20)) * noise,
                "loss/grad_penalty": 2.0 * noise,
                "training/curriculum_factor": min(1.0, 0.5 + k / 20),
            }
        )
    return rows


def feed(rows, weights=None, temperature=None) -> tuple[ConvergenceMonitor, list]:
    mon = ConvergenceMonitor()
    fired = []
    for step, row in enumerate(rows):
        fired += mon.update(step, row, weights, temperature)
    return mon, fired


def test_healthy_curve_fires_nothing_and_summarises_well():
    mon, fired = feed(healthy(), weights=[0.3, 0.3, 0.4], temperature=0.8)
    assert fired == []
    summary = mon.healthy_summary()
    assert summary and all(line.startswith("ok") for line in summary), summary


def test_oscillating_loss():
    rows = healthy()
    for k, row in enumerate(rows[30:], start=30):
        row["loss/alignment"] *= 1.4 if k % 2 else 0.7
    _, fired = feed(rows)
    assert [s.key for s in fired] == ["oscillating_loss"]
    assert "reduce the learning rate" in fired[0].message


def test_grad_penalty_rising_fast():
    rows = healthy()
    for k, row in enumerate(rows):
        row["loss/grad_penalty"] = 1.0 * 1.1**k
    _, fired = feed(rows)
    assert [s.key for s in fired] == ["grad_penalty_rising"]
    assert "gradient_penalty_lambda" in fired[0].message


def test_cosine_not_decreasing():
    rows = healthy()
    for k, row in enumerate(rows):
        row["loss/cosine"] = 0.2 + 0.001 * k
    _, fired = feed(rows)
    assert [s.key for s in fired] == ["cosine_not_decreasing"]
    assert "cosine_weight" in fired[0].message


@pytest.mark.parametrize("bad", [float("nan"), 50.0])
def test_mse_exploding_or_nan(bad):
    rows = healthy()
    rows[40]["loss/mse"] = bad
    _, fired = feed(rows)
    assert "mse_exploding" in [s.key for s in fired]


def test_adaptive_weights_collapsing():
    _, fired = feed(healthy(10), weights=[0.97, 0.02, 0.01])
    assert [s.key for s in fired] == ["weights_collapsing"]
    _, fired = feed(healthy(10), weights=[0.4, 0.3, 0.3], temperature=0.005)
    assert [s.key for s in fired] == ["weights_collapsing"]


def test_each_sign_fires_once_and_state_round_trips():
    rows = healthy()
    for row in rows:
        row["loss/grad_penalty"] = float("nan")
        row["loss/mse"] = float("nan")
    mon, fired = feed(rows)
    assert [s.key for s in fired] == ["mse_exploding"]
    copy = ConvergenceMonitor()
    copy.load_state_dict(mon.state_dict())
    assert copy.update(99, rows[0]) == []  # already fired before the "resume"
    assert set(REMEDIES) == {"oscillating_loss", "grad_penalty_rising", "cosine_not_decreasing", "mse_exploding", "weights_collapsing"}


def test_the_switch_to_free_running_is_not_an_explosion_and_phases_are_summarised_apart():
    rows = healthy(60)
    for k, row in enumerate(rows):
        row["training/free_running"] = 1.0 if k >= 30 else 0.0
        if k >= 30:  # running freely, errors add up across layers: the curves jump, then fall again
            row["loss/mse"] *= 20 * (1 - (k - 30) / 100)
            row["loss/alignment"] *= 20 * (1 - (k - 30) / 100)
            row["loss/cosine"] *= 3 * (1 - (k - 30) / 100)
    mon, fired = feed(rows)
    assert fired == []
    summary = mon.healthy_summary()
    assert any(line.endswith("[teacher-forced]") for line in summary) and any(line.endswith("[free-running]") for line in summary)
    assert all(line.startswith("ok") for line in summary), summary
    copy = ConvergenceMonitor()
    copy.load_state_dict(mon.state_dict())
    assert copy.healthy_summary() == summary


def test_untrained_per_layer_terms_of_a_free_running_phase_are_not_judged():
    """With --free_running_layer_weight 0 the free-running phase trains on the logit KL alone: its
    per-layer curves drift (the zoo's healthy runs: cosine up 1-2%), which must not fire the guide's
    signs; a non-finite loss/mse still does. With the terms trained, the same curves do fire."""
    rows = healthy(70)
    for k, row in enumerate(rows):
        row["training/free_running"] = 1.0 if k >= 30 else 0.0
        if k >= 30:
            row["loss/cosine"] = 0.3 + 0.001 * k  # rising while loss/mse falls
            row["loss/mse"] = 2.0 - 0.01 * k
    trained = ConvergenceMonitor(free_running_layers_trained=True)
    assert [s.key for k, row in enumerate(rows) for s in trained.update(k, row)] == ["cosine_not_decreasing"]
    untrained = ConvergenceMonitor(free_running_layers_trained=False)
    assert [s.key for k, row in enumerate(rows) for s in untrained.update(k, row)] == []
    summary = untrained.healthy_summary()
    assert any(line.startswith("ok") and line.endswith("[teacher-forced]") for line in summary)
    assert [line for line in summary if line.endswith("[free-running]")] == [
        "--  per-layer terms logged but not trained (--free_running_layer_weight 0): the held-out KL judges this phase [free-running]"]
    nan = dict(rows[-1], **{"loss/mse": float("nan")})
    assert [s.key for s in untrained.update(70, nan)] == ["mse_exploding"]
