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
from typing import Callable

import numpy as np

from lmadda.core.errors import LmaddaError
from lmadda.checkpoint import GeneratorCheckpoint
from lmadda.data.dataset import LoadedImage
from lmadda.evaluation.evaluate import evaluate_generator
from lmadda.models.generator import UNetGenerator
from lmadda.training.source import SourceTrainConfig

# Issue 25's bar for the robust model's in-domain cost; used as the admission rule so the selector never picks a
# model that already fails it on validation fields.
IN_DOMAIN_TOLERANCE = 0.01
# The second try keeps a copy only if its pixels still correlate with its field at least this much (Pearson 0.5: a
# quarter of the copy's variance is the field's). Set before any measurement, not tuned.
RECOGNISABLE = 0.5
# Where a study or the demo keeps the robust model's first try and its second (in its `models/` folder).
ROBUST_FILES = {False: "source_robust.pt", True: "source_robust_second_try.pt"}


def has_second_try(config: SourceTrainConfig) -> bool:
    """Whether a refused robust model can try again: it kept every draw (a config that already sets
    `augment.min_similarity` was its lab's own second try)."""
    return config.augment is not None and config.augment.min_similarity is None


def second_try(config: SourceTrainConfig) -> SourceTrainConfig:
    """The robust model's training for its second try, after it failed its admission: recognisable copies only."""
    if not has_second_try(config):
        raise LmaddaError("the robust model has no second try: it has no augmentation, or already keeps only recognisable "
                          "copies (augment.min_similarity)")
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
        return (f"robust source model refused as a candidate: {figures}, more than {self.tolerance} lower: its "
                "augmentation teaches images this microscope does not make")

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


def robust_with_second_try(plain: UNetGenerator, validation: list[LoadedImage], markers: list[str],
                           first: Callable[[], GeneratorCheckpoint], second: Callable[[], GeneratorCheckpoint] | None,
                           log: Callable[[str], object] = print) -> tuple[GeneratorCheckpoint, RobustAdmission, bool]:
    """The robust model a study or the demo goes on with, its admission, and whether it is the second try: the first
    try (`first()` trains or reuses it) where it is admitted; else the second (`second()`, None where there is none),
    admitted or not (a refused model's rows are still measured; the selector never sees them)."""
    robust = first()
    admission = admit_robust(plain, robust.generator, validation, markers)
    if admission.admitted:
        log(admission.reason)
        return robust, admission, False
    if second is None:
        log(f"{admission.reason}; narrow its ranges (`augment:`) to what the camera does")
        return robust, admission, False
    log(f"{admission.reason}; a second try keeps only copies that still show their field (augment.min_similarity {RECOGNISABLE})")
    robust = second()
    admission = admit_robust(plain, robust.generator, validation, markers)
    log(f"second try: {admission.reason}" + ("" if admission.admitted else "; narrow its ranges (`augment:`) to what the camera does"))
    return robust, admission, True
