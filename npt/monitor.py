"""The guide's "warning signs", detected while training, and its "healthy signs" at the end.

The monitor reads the values logged every `logging_steps` (each already a mean over that many
optimizer steps). Thresholds, over the last `window` (20) logged values:

  oscillating_loss       loss/alignment changed direction at >= 60% of the steps and its mean
                         step-to-step change is > 10% of its level
  grad_penalty_rising    mean of the last 5 values of loss/grad_penalty > 2x the mean of the first 5
  cosine_not_decreasing  least-squares slope of loss/cosine >= 0 while loss/mse falls by > 5% over
                         the window (magnitudes improve, directions do not), cosine above 0.01
  mse_exploding          loss/mse not finite, or > 10x the lowest value seen so far
  weights_collapsing     an adaptive layer weight > 0.9 or < 0.001, or their temperature < 0.01

Each sign fires once per run, is printed with the guide's remedy and is logged.

Teacher-forced and free-running steps measure different errors (running freely, errors add up
across layers), so the curves jump when the free-running phase starts. The monitor keeps the two
phases apart: windows restart at the switch, and the healthy signs are reported per phase.

The signs judge the per-layer terms, so they are judged only where those terms are trained. With
`--free_running_layer_weight 0` (the default) a free-running step trains on the logit KL alone;
its per-layer terms are still logged, but their trends say nothing about the training (measured on
the zoo: loss/cosine drifted up by 1-2% on three of seven healthy runs, which fired
cosine_not_decreasing), and only a non-finite loss/mse is reported there. The held-out KL judges
that phase (divergence.py).
"""

from __future__ import annotations

import dataclasses
import math

REMEDIES = {
    "oscillating_loss": "Oscillating losses: reduce the learning rate (--learning_rate).",
    "grad_penalty_rising": "Gradient penalty increasing rapidly: reduce --gradient_penalty_lambda.",
    "cosine_not_decreasing": "Cosine loss not decreasing: increase --cosine_weight.",
    "mse_exploding": "MSE exploding: check for NaN (teacher outputs, data), reduce the learning rate.",
    "weights_collapsing": "Adaptive layer weights collapsing: check the layer_weights values; lower --adaptive_weights_lr or disable --use_adaptive_weights.",
}


@dataclasses.dataclass
class Sign:
    key: str
    step: int
    detail: str

    @property
    def message(self) -> str:
        return f"[monitor] step {self.step}: {self.detail}. Remedy: {REMEDIES[self.key]}"


def _slope(ys: list[float]) -> float:
    n = len(ys)
    xm, ym = (n - 1) / 2, sum(ys) / n
    den = sum((x - xm) ** 2 for x in range(n))
    return sum((x - xm) * (y - ym) for x, y in enumerate(ys)) / den


def _mean(ys: list[float]) -> float:
    return sum(ys) / len(ys)


class ConvergenceMonitor:
    def __init__(self, window: int = 20, free_running_layers_trained: bool = True):
        self.window = window
        self.free_running_layers_trained = free_running_layers_trained
        self.history: dict[str, list[float]] = {}  # the current phase
        self.finished: list[tuple[str, dict[str, list[float]]]] = []  # earlier phases, for the summary
        self.phase = "teacher-forced"
        self.fired: dict[str, int] = {}

    def _series(self, key: str) -> list[float]:
        return self.history.get(key, [])

    def update(self, step: int, scalars: dict[str, float], layer_weights: list[float] | None = None, weight_temperature: float | None = None) -> list[Sign]:
        phase = "free-running" if scalars.get("training/free_running") else "teacher-forced"
        if phase != self.phase:
            if self.history:
                self.finished.append((self.phase, self.history))
            self.phase, self.history = phase, {}
        for key in ("loss/alignment", "loss/mse", "loss/cosine", "loss/grad_penalty", "training/curriculum_factor"):
            if key in scalars:
                self.history.setdefault(key, []).append(float(scalars[key]))
        signs = self._check(step, layer_weights, weight_temperature) if self._judged(phase) else self._check_finite(step)
        found = [s for s in signs if s.key not in self.fired]
        for s in found:
            self.fired[s.key] = step
        return found

    def _judged(self, phase: str) -> bool:
        return phase == "teacher-forced" or self.free_running_layers_trained

    def _check_finite(self, step: int) -> list[Sign]:
        mse = self._series("loss/mse")
        return [Sign("mse_exploding", step, f"loss/mse is {mse[-1]}")] if mse and not math.isfinite(mse[-1]) else []

    def _check(self, step: int, layer_weights, weight_temperature) -> list[Sign]:
        signs: list[Sign] = []
        w = self.window
        align = self._series("loss/alignment")[-w:]
        if len(align) == w and all(map(math.isfinite, align)):
            d = [b - a for a, b in zip(align, align[1:])]
            turns = sum(1 for a, b in zip(d, d[1:]) if a * b < 0)
            level = abs(_mean(align)) or 1.0
            amplitude = _mean([abs(x) for x in d]) / level
            if turns >= 0.6 * (w - 2) and amplitude > 0.10:
                signs.append(Sign("oscillating_loss", step, f"loss/alignment turned {turns} times in {w} logs, mean change {amplitude:.0%} of its level"))
        gp = self._series("loss/grad_penalty")[-w:]
        if len(gp) == w and all(map(math.isfinite, gp)) and _mean(gp[:5]) > 0:
            ratio = _mean(gp[-5:]) / _mean(gp[:5])
            if ratio > 2.0:
                signs.append(Sign("grad_penalty_rising", step, f"loss/grad_penalty grew {ratio:.1f}x over the last {w} logs"))
        cos, mse = self._series("loss/cosine")[-w:], self._series("loss/mse")[-w:]
        if len(cos) == w and len(mse) == w and all(map(math.isfinite, cos + mse)):
            mse_drop = -_slope(mse) * (w - 1) / (abs(_mean(mse)) or 1.0)
            if _slope(cos) >= 0 and mse_drop > 0.05 and _mean(cos) > 0.01:
                signs.append(Sign("cosine_not_decreasing", step, f"loss/cosine is flat or rising ({cos[0]:.4f} -> {cos[-1]:.4f}) while loss/mse falls"))
        not_finite = self._check_finite(step)
        signs += not_finite
        all_mse = self._series("loss/mse")
        if not not_finite and len(all_mse) >= 5 and all_mse[-1] > 10 * min(all_mse):
            signs.append(Sign("mse_exploding", step, f"loss/mse {all_mse[-1]:.4g} is {all_mse[-1] / min(all_mse):.0f}x its lowest value"))
        if layer_weights and len(layer_weights) > 1:
            hi, lo = max(layer_weights), min(layer_weights)
            if hi > 0.9 or lo < 0.001 or (weight_temperature is not None and weight_temperature < 0.01):
                signs.append(Sign("weights_collapsing", step, f"layer weights span {lo:.4f}..{hi:.4f}, temperature {weight_temperature}"))
        return signs

    def healthy_summary(self) -> list[str]:
        """The guide's "healthy training signs", checked over each phase of the run."""
        phases = self.finished + [(self.phase, self.history)]
        several = len([h for _, h in phases if h]) > 1
        lines = []
        for name, history in phases:
            if history:
                judged = self._healthy(history) if self._judged(name) else [
                    "--  per-layer terms logged but not trained (--free_running_layer_weight 0): the held-out KL judges this phase"]
                lines += [f"{line} [{name}]" if several else line for line in judged]
        for key, step in self.fired.items():
            lines.append(f"NO  warning sign '{key}' fired at step {step}")
        return lines

    def _healthy(self, history: dict[str, list[float]]) -> list[str]:
        lines = []

        def ends(key: str) -> tuple[float, float] | None:
            ys = [y for y in history.get(key, []) if math.isfinite(y)]
            if len(ys) < 2:
                return None
            k = max(1, len(ys) // 10)
            return _mean(ys[:k]), _mean(ys[-k:])

        def mark(ok: bool) -> str:
            return "ok " if ok else "NO "

        # While the temperature falls, alignment = MSE / T^2 rises by construction: compare only
        # the values logged after the curriculum ended.
        cf = history.get("training/curriculum_factor", [])
        done = next((i for i, c in enumerate(cf) if c >= 0.999), None)
        align = history.get("loss/alignment", [])
        if done is not None and len(align) - done >= 2:
            tail = [y for y in align[done:] if math.isfinite(y)]
            k = max(1, len(tail) // 10)
            a = (_mean(tail[:k]), _mean(tail[-k:])) if len(tail) >= 2 else None
            if a:
                ok = a[1] < a[0] and "oscillating_loss" not in self.fired
                lines.append(f"{mark(ok)} smooth decrease in alignment loss after the curriculum ({a[0]:.4g} -> {a[1]:.4g})")
        elif align:
            lines.append("--  alignment loss: the curriculum had not ended, so its values (scaled by 1/T^2) are not comparable")
        m, c = ends("loss/mse"), ends("loss/cosine")
        if m and c:
            lines.append(f"{mark(m[1] < m[0] and c[1] < c[0])} MSE and cosine both decreasing (mse {m[0]:.4g} -> {m[1]:.4g}, cosine {c[0]:.4g} -> {c[1]:.4g})")
        g = ends("loss/grad_penalty")
        if g and g[0] > 0:
            lines.append(f"{mark(0.5 <= g[1] / g[0] <= 2.0)} gradient penalty staying relatively constant ({g[0]:.4g} -> {g[1]:.4g})")
        if len(cf) >= 2 and cf[0] < 0.999:  # only in the phase the curriculum ran in
            mono = all(b >= a - 1e-12 for a, b in zip(cf, cf[1:]))
            lines.append(f"{mark(mono and cf[-1] >= 0.999)} curriculum factor smoothly increasing ({cf[0]:.3f} -> {cf[-1]:.3f})")
        return lines

    def state_dict(self) -> dict:
        return {
            "history": {k: list(v) for k, v in self.history.items()},
            "phase": self.phase,
            "finished": [[name, {k: list(v) for k, v in h.items()}] for name, h in self.finished],
            "fired": dict(self.fired),
        }

    def load_state_dict(self, state: dict) -> None:
        self.history = {k: list(v) for k, v in state["history"].items()}
        self.phase = state["phase"]
        self.finished = [(name, {k: list(v) for k, v in h.items()}) for name, h in state["finished"]]
        self.fired = dict(state["fired"])
