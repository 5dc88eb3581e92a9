"""Early stopping on mode collapse, the paper's criterion for which learning rates to keep.

A trial stops as soon as its generator loss is non-finite or above the bound, or its discriminator
has been saturated (accuracy >= threshold) for `patience` consecutive reports. The stopper remembers
why, so the results table marks the trial `collapsed` instead of dropping it.
"""

from __future__ import annotations

import math

from ray.tune.stopper import Stopper


class ModeCollapseStopper(Stopper):
    def __init__(self, g_loss_bound: float = 20.0, d_saturation_accuracy: float = 0.99, d_saturation_patience: int = 5):
        self.g_loss_bound = g_loss_bound
        self.d_saturation_accuracy = d_saturation_accuracy
        self.d_saturation_patience = d_saturation_patience
        self.saturated_reports: dict[str, int] = {}
        self.reasons: dict[str, str] = {}

    def __call__(self, trial_id: str, result: dict) -> bool:
        g_loss = result.get("g_loss")
        if g_loss is None:  # a report without adaptation metrics (e.g. the final evaluation)
            return False
        if not math.isfinite(g_loss) or result.get("collapsed", 0.0) > 0:
            self.reasons[trial_id] = f"non-finite or flagged loss at step {result.get('step')}"
        elif g_loss > self.g_loss_bound:
            self.reasons[trial_id] = f"generator loss {g_loss:.3g} > {self.g_loss_bound} at step {result.get('step')}"
        else:
            saturated = result.get("d_acc", 0.0) >= self.d_saturation_accuracy
            self.saturated_reports[trial_id] = self.saturated_reports.get(trial_id, 0) + 1 if saturated else 0
            if self.saturated_reports[trial_id] >= self.d_saturation_patience:
                self.reasons[trial_id] = f"discriminator saturated for {self.d_saturation_patience} reports (step {result.get('step')})"
        return trial_id in self.reasons

    def stop_all(self) -> bool:
        return False
