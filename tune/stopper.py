"""Early stopping on mode collapse, the paper's criterion for which learning rates to keep.

Collapse is decided once, in the adaptation loop (`lmadda.training.adapt.Adapter`: a non-finite loss,
a generator loss above `collapse_g_loss`, or, with `saturation_collapses`, a discriminator saturated
for `saturation_patience` logs in a row). Every report carries that verdict; this stopper only reads
it and remembers why, so the results table marks the trial `collapsed` instead of dropping it.
"""

from __future__ import annotations

from ray.tune.stopper import Stopper


class ModeCollapseStopper(Stopper):
    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}

    def __call__(self, trial_id: str, result: dict) -> bool:
        if result.get("collapsed", 0.0) > 0:
            self.reasons.setdefault(trial_id, str(result.get("collapse_reason") or f"collapsed at step {result.get('step')}"))
        return trial_id in self.reasons

    def stop_all(self) -> bool:
        return False
