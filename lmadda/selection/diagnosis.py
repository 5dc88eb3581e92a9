"""`lmadda diagnose`: for a folder of new, unlabelled images, is the model still in its domain, and if not, what to do.

Each image gets the per-image domain score of `lmadda.domain` (the prediction's own forward pass).
Over the images:

- the fraction out of domain (and borderline);
- the discrepancy profile: per layer, the mean distance of the images' features from the reference,
  in units of the held-out in-domain level (1 = no shift at that layer);
- where the shift lives: the first layer whose excess over the in-domain level reaches half the
  profile's largest excess (`lmadda.selection.criteria.predict_layer`, the zero-training layer predictor of the
  label-free selector, applied to this profile);
- whether a cheap input correction would do: the images are histogram-matched onto the reference's
  input intensities (the correction `lmadda adapt --layer auto` can choose) and scored again.

The recommendation follows from these, in this order: no change needed (at most MAX_OUT_FRACTION out
of domain and the median image in domain); an input correction suffices (the same, after correction);
the shift is too large (the median image, even corrected, lies beyond the out-of-domain threshold by
more than the out-of-domain threshold lies beyond the in-domain level, i.e. score > out**2); otherwise
adapt, matching from the layer where the shift enters. This module returns data; the CLI renders it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lmadda.data.correction import HistogramMatcher
from lmadda.domain import DomainReference, DomainScore, predict_and_score
from lmadda.selection.criteria import predict_layer

MAX_OUT_FRACTION = 0.1  # a few odd images in a folder (an empty field, a bubble) are not a domain shift


@dataclass
class Diagnosis:
    names: list[str]
    scores: list[DomainScore]
    corrected: list[DomainScore] | None  # after histogram matching onto the reference; None when the model already corrects
    layers: list[int]
    profile: list[float]  # per layer, mean over images of its distance ratio (1 = the in-domain level)
    shift_layer: int | None
    recommendation: str
    adapt_layers: tuple[int, int] | None = None
    thresholds: tuple[float, float] = (0.0, 0.0)
    reasons: list[str] = field(default_factory=list)

    def fraction(self, verdict: str, corrected: bool = False) -> float:
        scores = self.corrected if corrected and self.corrected is not None else self.scores
        return float(np.mean([s.verdict == verdict for s in scores]))

    def as_dict(self) -> dict:
        return {
            "images": len(self.names), "fraction_out_of_domain": self.fraction("out_of_domain"),
            "fraction_borderline": self.fraction("borderline"),
            "fraction_out_of_domain_after_input_correction": self.fraction("out_of_domain", True) if self.corrected else None,
            "median_score": float(np.median([s.score for s in self.scores])), "thresholds": list(self.thresholds),
            "profile": {str(layer): round(value, 4) for layer, value in zip(self.layers, self.profile)},
            "shift_layer": self.shift_layer, "recommendation": self.recommendation,
            "adapt_layers": list(self.adapt_layers) if self.adapt_layers else None, "reasons": self.reasons,
            "per_image": [{"image": n, **s.as_dict()} for n, s in zip(self.names, self.scores)],
        }


def _settled(scores: list[DomainScore], reference: DomainReference) -> bool:
    """At most MAX_OUT_FRACTION out of domain and the median image in domain."""
    out = np.mean([s.verdict == "out_of_domain" for s in scores])
    return out <= MAX_OUT_FRACTION and float(np.median([s.score for s in scores])) <= reference.thresholds[0]


def diagnose(generator, reference: DomainReference, images: dict[str, np.ndarray], *, try_correction: bool = True,
             tile: int = 256, overlap: float = 0.25, batch_size: int = 8, device: str | None = None) -> Diagnosis:
    """`images`: name -> model-unit input (normalised, and corrected if the model carries a correction)."""
    def score_all(inputs: dict[str, np.ndarray]) -> list[DomainScore]:
        return [predict_and_score(generator, reference, image, tile=tile, overlap=overlap, batch_size=batch_size, device=device)[1]
                for image in inputs.values()]

    scores = score_all(images)
    corrected = None
    if try_correction:
        matcher = HistogramMatcher.from_source_values(reference.input_quantiles)
        corrected = score_all({name: matcher(image) for name, image in images.items()})
    layers = reference.encoder_layers  # where a shift of the input can enter (not the output the score also weighs)
    profile = [float(np.mean([s.layer_distances[layer] for s in scores])) for layer in layers]
    excess = [max(value - 1.0, 0.0) for value in profile]
    shift_layer = layers[predict_layer(excess)] if max(excess) > 0 else None
    borderline, out = reference.thresholds
    median = float(np.median([s.score for s in scores]))
    reasons = [f"{np.mean([s.verdict == 'out_of_domain' for s in scores]):.0%} of {len(scores)} images out of domain, "
               f"median score {median:.2f} (in domain up to {borderline:.2f}, out of domain above {out:.2f})"]
    adapt_layers = None
    if _settled(scores, reference):
        recommendation, shift_layer = "no_change", None  # the profile's largest excess is within in-domain noise
    elif corrected is not None and _settled(corrected, reference):
        recommendation = "input_correction"
        reasons.append(f"after histogram matching onto the reference's input intensities, "
                       f"{np.mean([s.verdict == 'out_of_domain' for s in corrected]):.0%} out of domain")
    else:
        best = min(median, float(np.median([s.score for s in corrected]))) if corrected is not None else median
        if best > out**2:
            recommendation = "too_large"
            reasons.append(f"median score {best:.2f} even after input correction, beyond {out**2:.2f} (the out-of-domain threshold squared)")
        else:
            recommendation = "adapt"
            last = layers[-1]
            start = shift_layer if shift_layer is not None else 0
            adapt_layers = (start, min(start + 2, last))
        if shift_layer is not None:
            reasons.append(f"the shift enters at layer {shift_layer} (first layer reaching half the largest excess over the in-domain level)")
    return Diagnosis(list(images), scores, corrected, list(layers), profile, shift_layer, recommendation, adapt_layers,
                     reference.thresholds, reasons)
