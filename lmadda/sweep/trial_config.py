"""What one sweep trial runs: its grid points and what they share, as a validated model.

A Tune trial hands it to the point runner (`lmadda_tune.train_workers.run_points`), in its own process
or as a Ray Train worker's `train_loop_config` (a plain dict on the way: `model_dump(mode="json")`,
validated again on arrival). Each point's adaptation options are checked as the `AdaptConfig` they
become when the spec is made, before any image is loaded.

    source_checkpoint, manifest, source_setting
    adapt       AdaptConfig options every point shares
    points      each: key (its name in the trial's store), target (setting or setting+shift:magnitude),
                adapt (its own options: layer, lr, seed; a grid point's whole set, `GridPoint.adapt_options`), tags
    store       the trial's folder of saved reports (worker groups of a sweep); None: one adaptation alone

A spec without `points` describes one adaptation, with `target` and `tags` at the top.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from lmadda.core.config import StrictModel
from lmadda.core.errors import LmaddaError
from lmadda.evaluation.rows import TargetDomain
from lmadda.training.adapt import AdaptConfig


class TrialPoint(StrictModel):
    key: str = Field(min_length=1, description="the point's name in its trial's store (GridPoint.key), e.g. bright_field-L3-lr2e-05-s0")
    target: str = Field(min_length=1, description="the target domain: a setting, or setting+shift:magnitude")
    adapt: dict[str, Any] = Field(default_factory=dict, description="this point's AdaptConfig options (its layer, lr, seed)")
    tags: dict[str, float | int | str] = Field(default_factory=dict, description="reported with every metric of the point")


class TrialSpec(StrictModel):
    source_checkpoint: Path
    manifest: Path
    source_setting: str
    adapt: dict[str, Any] = Field(default_factory=dict, description="AdaptConfig options every point shares")
    points: list[TrialPoint] = Field(min_length=1)
    store: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_adaptation(cls, values):
        """A spec without `points` is one adaptation, its target and tags at the top."""
        if isinstance(values, dict) and "points" not in values:
            values = dict(values)
            values["points"] = [{"key": "adaptation", "target": values.pop("target", ""), "tags": values.pop("tags", {})}]
        return values

    @model_validator(mode="after")
    def _points_adapt(self) -> "TrialSpec":
        for point in self.points:
            try:
                TargetDomain.parse(point.target)
            except (LmaddaError, ValueError) as error:
                raise ValueError(f"grid point {point.key}: target {point.target!r}: {error}") from None
            try:
                AdaptConfig.model_validate(self.adapt_options(point))
            except ValidationError as error:
                raise ValueError(f"grid point {point.key}: {error.errors()[0]['loc']}: {error.errors()[0]['msg']}") from None
        return self

    def adapt_options(self, point: TrialPoint) -> dict[str, Any]:
        """The point's AdaptConfig options: the shared ones, then its own."""
        return {**self.adapt, **point.adapt}
