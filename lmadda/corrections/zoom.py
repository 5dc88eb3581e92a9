"""Zoom: a target imaged at another scale (objective, camera binning), found without labels and undone by resampling.

A virtual-staining generator learns what cells look like at its training pixel size. Imaged through
another objective, the same nucleus spans half or twice the pixels, and the stain degrades. Feature
alignment (LM-ADDA, AdaBN) can only partly relearn sizes; the direct remedy, as Cellpose resizes images
to the diameter it was trained on, is to resample each input to the source's scale, predict there, and
resample the stain back (`GeneratorConfig.input_zoom`).

The factor is estimated without labels or pixel sizes, with the source model's own domain check
(lmadda.domain: encoder and output features, in units of the in-domain level): a few target images
are resampled by each factor of `ZOOMS` and scored against a reference of the source images; the
factor with the lowest median score wins, but only when it removes at least `MIN_REDUCTION` of the
unresampled images' score. Otherwise the estimate is 1 and nothing is resampled.

Like is compared with like: upsampling cannot restore the detail a zoomed-out image never had, so an
upsampled target is smoother than any source image, and a plain comparison stops short of the true
factor (1.19 for a true 2 on ColiCoords). So the source images and every resampled target are first
brought to one common band, the one a target keeps when upsampled by the largest factor tried
(`band_limited`): what is left to differ is scale. A contrast or exposure shift moves the score at
every factor alike and does not pull the minimum away from 1 (docs/method.md has the validation figures).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmadda.core.errors import LmaddaError
from lmadda.data.dataset import LoadedImage, spread
from lmadda.domain import build_reference, fitting_tile, predict_and_score
from lmadda.models.generator import UNetGenerator, resize, zoomed_size

ZOOMS = tuple(round(2 ** (k / 4), 2) for k in range(-4, 5))  # 0.5 .. 2 in quarter octaves, 1 included
MIN_REDUCTION = 0.25  # as the selector's min_gain: a correction must remove a quarter of what it corrects
SCORED_IMAGES = 8
REFERENCE_IMAGES = 16  # source images the band-limited reference is built from (every fourth held out for its level)


@dataclass(frozen=True)
class ZoomEstimate:
    """The factor to resample target inputs by (1: none), with the median domain score of each factor tried."""

    factor: float
    scores: dict[float, float]
    reason: str

    def as_dict(self) -> dict:
        return {"factor": self.factor, "scores": {str(k): round(v, 4) for k, v in self.scores.items()}, "reason": self.reason}


def resample(image: np.ndarray, factor: float) -> np.ndarray:
    """A (C, H, W) image resampled by `factor` (bilinear, antialiased when shrinking), as the zoomed generator does."""
    size = zoomed_size((image.shape[-2], image.shape[-1]), factor)
    return resize(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None], size)[0].numpy()


def band_limited(image: np.ndarray, band: float = max(ZOOMS)) -> np.ndarray:
    """`image` with only the detail it would keep if shrunk by `band` and enlarged again: the common band of `estimate_zoom`."""
    return resize(torch.from_numpy(resample(image, 1.0 / band))[None], tuple(image.shape[-2:]))[0].numpy()


def estimate_zoom(generator: UNetGenerator, source_images: list[LoadedImage], target_images: list[LoadedImage], *,
                  zooms: tuple[float, ...] = ZOOMS, min_reduction: float = MIN_REDUCTION) -> ZoomEstimate:
    """The factor that makes `target_images` look most like `source_images` to `generator`'s domain check."""
    if not target_images or not source_images:
        raise LmaddaError("estimating a zoom needs the source images and unlabelled target images")
    if 1.0 not in zooms:
        raise ValueError("the zooms tried must include 1 (no resampling)")
    band = max(zooms)
    multiple = generator.config.multiple
    references = [band_limited(image.input, band) for image in spread(source_images, REFERENCE_IMAGES)]
    held_out = references[::4] if len(references) >= 4 else None
    reference = build_reference(generator, [r for index, r in enumerate(references) if held_out is None or index % 4], held_out,
                                domain="source, band-limited")
    images = [image.input for image in spread(target_images, SCORED_IMAGES)]
    smallest = min(min(image.shape[-2:]) for image in images)
    scores: dict[float, float] = {}
    for factor in sorted(zooms):
        if round(smallest * factor) < multiple:  # too small to score as a whole image: padding would dominate
            continue
        resampled = [band_limited(image if factor == 1.0 else resample(image, factor), band) for image in images]
        scores[factor] = float(np.median([predict_and_score(generator, reference, image, tile=fitting_tile(image.shape, multiple))[1].score
                                          for image in resampled]))
    best = min(scores, key=scores.get)
    reduction = 1.0 - scores[best] / max(scores[1.0], 1e-12)
    if best == 1.0:
        return ZoomEstimate(1.0, scores, "the target images look most like the source at their own scale")
    if reduction < min_reduction:
        return ZoomEstimate(1.0, scores, f"resampling by {best:g} lowers the domain score by only {reduction:.0%} "
                                         f"(needs {min_reduction:.0%}): kept at its own scale")
    return ZoomEstimate(best, scores, f"resampled by {best:g}, the target images' domain score falls by {reduction:.0%} "
                                      f"({scores[1.0]:.2f} -> {scores[best]:.2f})")

