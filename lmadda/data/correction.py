"""Input corrections: a target image's intensities mapped before the generator sees it.

The one a checkpoint can carry is histogram matching (its 1001 source quantiles travel with the model), so
`lmadda predict`, the endpoint and the study apply exactly the correction the label-free choice made. FDA
needs source images at run time and stays a study baseline (`lmadda.corrections.baselines`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from lmadda.core.errors import LmaddaError
from lmadda.data.dataset import LoadedImage

InputTransform = Callable[[np.ndarray], np.ndarray]  # a (C, H, W) model-range image -> the same, corrected


class HistogramMatcher:
    """Quantile mapping of target inputs onto the pooled source input distribution.

    Each distinct target value goes to the source quantile at its position in the image's empirical CDF,
    so equal inputs give equal outputs (as scikit-image's `exposure.match_histograms`): a saturated block
    stays one value instead of being spread over a range in raster order.
    """

    def __init__(self, source_images: list[LoadedImage], quantiles: int = 1001):
        if not source_images:
            raise LmaddaError("histogram matching needs source images")
        pooled = np.concatenate([image.input.ravel() for image in source_images])
        self.levels = np.linspace(0.0, 1.0, quantiles)
        self.source_values = np.quantile(pooled, self.levels)

    @classmethod
    def from_source_values(cls, source_values: list[float]) -> "HistogramMatcher":
        """The matcher a checkpoint carries (`as_correction`): the pooled source quantiles, evenly spaced."""
        values = np.asarray(source_values, dtype=np.float64)
        if values.ndim != 1 or values.size < 2 or not np.all(np.isfinite(values)) or np.any(np.diff(values) < 0):
            raise LmaddaError("the checkpoint's histogram-matching correction is damaged (source quantiles must be a finite, "
                              "non-decreasing list); re-export the model with `lmadda adapt --layer auto`")
        matcher = cls.__new__(cls)
        matcher.levels = np.linspace(0.0, 1.0, values.size)
        matcher.source_values = values
        return matcher

    def as_correction(self) -> dict:
        """What a checkpoint stores so that `lmadda predict` and the endpoint apply this correction too."""
        return {"kind": "histogram_matching", "source_values": [float(v) for v in self.source_values]}

    def __call__(self, image: np.ndarray) -> np.ndarray:
        _, inverse, counts = np.unique(image.ravel(), return_inverse=True, return_counts=True)
        return self.matched_values(counts)[inverse.ravel()].reshape(image.shape).astype(np.float32)

    def matched_values(self, counts: np.ndarray) -> np.ndarray:
        """The source value each distinct target value goes to, given how often each occurs (in ascending value order);
        `lmadda.inference` uses it on counts gathered band by band for images too large to hold."""
        # A tied block takes the middle of the CDF range it spans (its mid-rank), not the top as scikit-image
        # does: a saturated block holding the brightest 30% of pixels then lands on the source's 85th
        # percentile, the average of where its pixels would go if they were distinct, rather than on the
        # source maximum (one extreme pixel); and distinct values get the symmetric positions (i + 0.5) / N.
        positions = (np.cumsum(counts) - counts / 2.0) / counts.sum()
        return np.interp(positions, self.levels, self.source_values)


def input_correction(metadata: dict) -> InputTransform | None:
    """The input correction a checkpoint carries (chosen by the label-free selector), or None.

    Only corrections that are small enough to store travel with a model: histogram matching keeps its
    1001 source quantiles. FDA needs source images at run time, so it is a study baseline only.
    """
    spec = metadata.get("input_correction")
    if not spec:
        return None
    if spec.get("kind") != "histogram_matching":
        raise LmaddaError(f"the checkpoint asks for input correction {spec.get('kind')!r}, which this lmadda cannot apply; "
                          "upgrade lmadda or re-export the model")
    return HistogramMatcher.from_source_values(spec.get("source_values") or [])
