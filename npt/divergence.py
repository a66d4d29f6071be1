"""When has training diverged? The policy the loop asks after each log, bad step and evaluation.

The loop reports what it sees and acts on the answer; the policy keeps the references it judges
against, and nothing else (the rollback itself, and its budget, belong to the loop):

    observe_log(scalars, signs, free_running, step)  -> Verdict   the logged interval means
    observe_bad_steps(consecutive)                   -> Verdict   non-finite steps in a row
    observe_eval(record, free_running)               -> Verdict   a held-out evaluation

Each phase is judged by what it trains. A teacher-forced step trains every layer on the teacher's
input, so its evaluations are judged by the held-out per-layer relative error; a free-running step
trains the student as it runs, so its evaluations are judged by the held-out KL. On a deep model
the two disagree early on: on SmolLM2-135M (30 layers) the first 20 teacher-forced steps lowered
every layer's error (mean 0.55 -> 0.45) while the free-running KL rose 6.92 -> 9.39, because
thirty layers' remaining errors compound. Judging that phase by the KL took the run back to its
untrained start again and again.

An evaluation is compared with the last *good* evaluation of its own phase:
- worse by more than `tolerance` (relative): a strike; `patience` strikes in a row diverge;
- at least `blowup` times the reference, or not finite: diverged at once;
- no reference of its phase yet (the first evaluation of a phase): good, unless not finite, or
  (free-running) its KL is `blowup` times that of the last good evaluation of any phase.
A progressive conversion's stages (--progressive_stages) are phases of their own: each trains a
student with more layers converted than the one before, whose KL may start higher.
A good evaluation becomes the reference and the rollback target, and clears the strikes.

The logged training losses diverge when loss/mse is not finite, or, while teacher-forced (where
it measures each layer on the teacher's input), when the monitor sees it explode or it exceeds
twice its value before training. Running freely, loss/mse adds up the errors of all layers below
and swings by 10x on a deep model while the KL falls, so there it is the training KL
(loss/logit_kl, when free-running steps train it) that is judged, between evaluations: an
interval mean `blowup` times the KL the phase started from diverges. That reference is the
phase's first step, logged on its own (the loop asks `needs_training_reference`): the KL of the
state the phase starts from, before an update of that phase moved it; after a rollback, the
first step after it. A learning rate a deep model does not bear running freely shows within
steps: on SmolLM2-135M's 30 layers the training KL went 2.3 -> 17 in three steps at the
teacher-forced rate. A step's KL is noisy (one batch), so the reference is that one step and
not the lowest of many: on the embedded default no logged interval at the full rate was above
1.25x any single step before it, while the lowest of single steps on a micro batch of 32 tokens
was a sixth of the next.
"""

from __future__ import annotations

import dataclasses
import math

ROLLBACK_AFTER_BAD_STEPS = 3  # consecutive non-finite steps that count as divergence


@dataclasses.dataclass
class Verdict:
    diverged: str | None = None  # why, when training diverged
    good: bool = False  # an evaluation to keep as the reference and rollback target


class DivergencePolicy:
    def __init__(self, patience: int = 2, tolerance: float = 0.02, blowup: float = 2.0, training_kl: bool = True):
        self.patience = patience
        self.training_kl = training_kl  # whether free-running steps train (and log) the logit KL
        self.tolerance = tolerance
        self.blowup = blowup
        self.start: dict | None = None  # the evaluation before training
        self.reference: dict[str, dict] = {}  # phase -> its last good evaluation
        self.last_good: dict | None = None  # the last good evaluation of any phase
        self.strikes = 0
        self.first_kl: dict[str, dict] = {}  # phase -> its first step's training KL (since it began or the last rollback)

    @staticmethod
    def phase(free_running: bool, stage: int = 0) -> str:
        """A progressive conversion's stage (1..N) trains another student than the stage before
        it, so each stage is a phase of its own."""
        if not free_running:
            return "teacher-forced"
        return f"free-running stage {stage}" if stage else "free-running"

    @staticmethod
    def measure(free_running: bool) -> tuple[str, str]:
        """The evaluation's key a phase is judged by, and its name."""
        return ("kl", "held-out KL") if free_running else ("rel_error_mean", "held-out mean relative error")

    # ---- what the loop reports ----------------------------------------------------------------

    def observe_eval(self, record: dict, free_running: bool, stage: int = 0) -> Verdict:
        if self.start is None:  # the evaluation before training: the first reference
            self.start = record
            return self._good(record, self.phase(free_running))
        if not math.isfinite(record["kl"]):
            return self._strike_out(f"the held-out KL is {record['kl']}")
        key, name = self.measure(free_running)
        phase = self.phase(free_running, stage)
        ref = self.reference.get(phase)
        if ref is None:
            other = self.last_good
            if free_running and other is not None and record["kl"] >= self.blowup * other["kl"]:
                return self._strike_out(f"the {name} {record['kl']:.4f} is {record['kl'] / other['kl']:.1f}x that of step {other['step']} ({other['kl']:.4f})")
            return self._good(record, phase)
        value, before = record[key], ref[key]
        if value >= self.blowup * before:
            return self._strike_out(f"the {name} {value:.4f} is {value / before:.1f}x that of step {ref['step']} ({before:.4f})")
        if value > before * (1 + self.tolerance):
            self.strikes += 1
            if self.strikes >= self.patience:
                return self._strike_out(f"the {name} {value:.4f} is above that of step {ref['step']} ({before:.4f}) "
                                        f"for {self.strikes} evaluations in a row")
            return Verdict()
        return self._good(record, phase)

    def needs_training_reference(self, free_running: bool, stage: int = 0) -> bool:
        """True for a free-running phase's first step (or the first after a rollback): the loop logs
        it on its own, as the reference the phase's training KL is judged against."""
        return free_running and self.training_kl and self.phase(True, stage) not in self.first_kl

    def observe_log(self, scalars: dict[str, float], signs: list, free_running: bool, step: int = 0, stage: int = 0) -> Verdict:
        mse = scalars["loss/mse"]
        if not math.isfinite(mse):
            return Verdict(f"loss/mse is {mse}")
        if free_running:
            return self._judge_training_kl(scalars.get("loss/logit_kl"), step, self.phase(True, stage))
        if any(s.key == "mse_exploding" for s in signs):
            return Verdict("the monitor saw loss/mse explode")
        if self.start is not None:
            before = sum(r * r for r in self.start["rel_error"]) / len(self.start["rel_error"])
            if mse > 2 * before:
                return Verdict(f"loss/mse {mse:.4g} is above twice its value before training ({before:.4g})")
        return Verdict()

    def observe_bad_steps(self, consecutive: int) -> Verdict:
        if consecutive >= ROLLBACK_AFTER_BAD_STEPS:
            return Verdict(f"{consecutive} consecutive steps had a non-finite loss or gradient")
        return Verdict()

    def rolled_back(self) -> None:
        """The loop went back to the last good state: judge afresh from there."""
        self.strikes = 0
        self.first_kl = {}

    # ---- internals ----------------------------------------------------------------------------

    def _judge_training_kl(self, kl: float | None, step: int, phase: str) -> Verdict:
        if not self.training_kl or kl is None:
            return Verdict()
        if not math.isfinite(kl):
            return Verdict(f"the training KL (loss/logit_kl) is {kl}")
        first = self.first_kl.get(phase)
        if first is None:
            self.first_kl[phase] = {"step": step, "kl": kl}
        elif kl >= self.blowup * first["kl"]:
            return Verdict(f"the training KL (loss/logit_kl) {kl:.4f} is {kl / first['kl']:.1f}x that of step {first['step']} ({first['kl']:.4f}), "
                           "where this free-running phase started")
        return Verdict()

    def _good(self, record: dict, phase: str) -> Verdict:
        self.reference[phase] = record
        self.last_good = record
        self.strikes = 0
        return Verdict(good=True)

    def _strike_out(self, reason: str) -> Verdict:
        self.strikes = 0
        return Verdict(reason)

    # ---- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"start": self.start, "reference": dict(self.reference), "last_good": self.last_good, "strikes": self.strikes,
                "first_kl": dict(self.first_kl)}

    def load_state_dict(self, state: dict) -> None:
        self.start = state["start"]
        self.reference = dict(state["reference"])
        self.last_good = state["last_good"]
        self.strikes = int(state["strikes"])
        self.first_kl = dict(state.get("first_kl", {}))  # (none in checkpoints written before it was kept)
