"""Early stopping on mode collapse, the paper's criterion for which learning rates to keep.

Collapse is decided once, in the adaptation loop (`lmadda.training.adapt.Adapter`: a non-finite loss,
a generator loss above `collapse_g_loss`, or, with `saturation_collapses`, a discriminator saturated
for `saturation_patience` logs in a row). Every report carries that verdict; this stopper only reads
it and remembers why, so the results table marks the point `collapsed` instead of dropping it.

A trial may run several grid points (`resources.points_per_trial`). Tune can only stop a whole
trial, so the stopper ends a trial on a collapse only when it runs that one point; in a trial of
several, the point runner (`lmadda_tune.train_workers.run_points`) ends the collapsed point at the same
report, on the same flag, and goes on with the next one.
"""

from __future__ import annotations

from ray.tune.stopper import Stopper


class ModeCollapseStopper(Stopper):
    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}  # trial id, or trial id/point key in a trial of several points -> why

    def __call__(self, trial_id: str, result: dict) -> bool:
        alone = result.get("points_in_trial", 1) <= 1
        key = trial_id if alone else f"{trial_id}/{result.get('point')}"
        if result.get("collapsed", 0.0) > 0:
            self.reasons.setdefault(key, str(result.get("collapse_reason") or f"collapsed at step {result.get('step')}"))
        return alone and key in self.reasons

    def stop_all(self) -> bool:
        return False
