"""Whether a robust source model may stand in for the plain one: its price in domain, on validation fields.

A robust source model (the plain source fine-tuned on imaging-nuisance copies, `lmadda.data.augment`) is worth
choosing on a target only if it did not unlearn the source setting. That is checked with source labels only: both
models stain the source setting's clean validation fields, and the robust model is admitted as a candidate of the
label-free choice when its mean Pearson is within `tolerance` of the plain model's.

A refused model gets one second try (`second_try`): the same augmentation, keeping only copies that still show their
field (`NuisanceAugmentation.min_similarity`). Draws in camera units mean different things on different cameras: on a
16-bit bright field that sits near saturation (ColiCoords) most gains, noise and vignetting draws leave a white or
drowned field, which teaches the model images this microscope does not make; on a camera whose images fill its range
the same strong draws are what makes the model robust, so the rule is not on from the start. Where the second try is
refused too, its rows are still measured and reported; the selector never sees them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from lmadda.core.errors import LmaddaError
from lmadda.data.dataset import LoadedImage
from lmadda.evaluation import evaluate_generator
from lmadda.models.generator import UNetGenerator
from lmadda.training.source import SourceTrainConfig

# Issue 25's bar for the robust model's in-domain cost; used as the admission rule so the selector never picks a
# model that already fails it on validation fields.
IN_DOMAIN_TOLERANCE = 0.01
# The second try keeps a copy only if its pixels still correlate with its field at least this much (Pearson 0.5: a
# quarter of the copy's variance is the field's). Set before any measurement, not tuned.
RECOGNISABLE = 0.5


def second_try(config: SourceTrainConfig) -> SourceTrainConfig:
    """The robust model's training for its second try, after it failed its admission: recognisable copies only."""
    if config.augment is None:
        raise LmaddaError("a second try needs the robust model's augmentation; this config has none")
    if config.augment.min_similarity is not None:
        raise LmaddaError(f"the robust model already kept only recognisable copies (augment.min_similarity "
                          f"{config.augment.min_similarity}); there is no second try to make")
    return config.model_copy(update={"augment": config.augment.model_copy(update={"min_similarity": RECOGNISABLE})})


@dataclass(frozen=True)
class RobustAdmission:
    plain_validation: float  # mean Pearson of the plain source model on the source's clean validation fields
    robust_validation: float  # the same for the robust source model
    tolerance: float = IN_DOMAIN_TOLERANCE

    @property
    def admitted(self) -> bool:
        return math.isfinite(self.robust_validation) and self.robust_validation >= self.plain_validation - self.tolerance

    @property
    def reason(self) -> str:
        figures = (f"in-domain validation Pearson {self.robust_validation:.3f} against the plain source's "
                   f"{self.plain_validation:.3f}")
        if self.admitted:
            return f"robust source model admitted as a candidate: {figures}"
        return (f"robust source model refused as a candidate: {figures}, more than {self.tolerance} lower. Its "
                "augmentation teaches images this microscope does not make: keep only recognisable copies "
                "(`augment: {min_similarity: 0.5}`) or narrow its ranges to the camera")

    def as_dict(self) -> dict:
        return {**asdict(self), "admitted": self.admitted}


def admit_robust(plain: UNetGenerator, robust: UNetGenerator, validation: list[LoadedImage], markers: list[str],
                 tolerance: float = IN_DOMAIN_TOLERANCE) -> RobustAdmission:
    """Score both models on the source setting's clean (unaugmented) validation fields."""
    def mean_pearson(generator: UNetGenerator) -> float:
        # A constant stain has no Pearson (NaN); a model that paints only constants scores NaN and is refused.
        values = [row["pearson"] for row in evaluate_generator(generator, validation, markers) if math.isfinite(row["pearson"])]
        return float(np.mean(values)) if values else math.nan

    return RobustAdmission(mean_pearson(plain), mean_pearson(robust), tolerance)
