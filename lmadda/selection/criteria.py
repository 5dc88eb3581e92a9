"""Label-free criteria: how good an adapted model looks without any target labels.

A lab adapting to a new microscope has unlabelled target images and its labelled source data, never
target stains. Each criterion below uses only those, so a sweep can rank its trials the way the
labelled Pearson would, if the criterion works (`criterion_agreement` measures whether it does):

- `output_w1`: the distance between what the adapted model predicts on target images and what the
  source model predicts on source images, as the 1-D Wasserstein distance between their pixel
  intensity distributions, per marker (lower is better: a good adaptation predicts stains that
  look like source-domain stains).
- `probe_shift`: at a fixed probe layer (the bottleneck), how far the adapted model's channel means
  on target images sit from the source model's on source images, in units of the source's
  per-channel spread (lower is better: leftover domain shift deep in the network).
- `flip_inconsistency`: how much the adapted model's prediction changes when the target input is
  mirrored (prediction mirrored back); microscope images have no preferred orientation, so a model
  that changes its answer is guessing (lower is better).

All are computed on a few fixed crops, so a criterion costs seconds, not an evaluation. The selector
(`lmadda.selection.selector`) scores the same measurements crop by crop, through the same functions
(`feature_gap`, `flip_difference`, `wasserstein_1d`) and the same crop sampler (`fixed_crops`), under its own
score names: `feature_gap` is `probe_shift` per crop, `flip` is `flip_inconsistency` per crop. The names stay
two because both are stored: the criteria as sweep metrics (`lf_probe_shift`) and promotion criteria, the
scores as config values (`selection.score`, `guard`).

Two more families need several models or none:

- ensemble disagreement (the published baseline, SIT-ADDA-Auto, arXiv 2511.12006): models adapted
  the same way with different seeds disagree where the adaptation is unsure; `seed_disagreement`
  is the mean pixel-wise spread of their predictions on the same target crops. `layer_disagreement`
  is the variant that needs one seed: how far a model's prediction sits from the median prediction
  of the models adapted at every layer.
- the zero-training layer predictor: run the unadapted source model once on source and target
  images, measure the domain discrepancy after every layer (`discrepancy_profile`), and predict the
  layer to match from where the shift enters (`predict_layer`): seconds instead of a sweep.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lmadda.data.correction import InputTransform
from lmadda.data.dataset import LoadedImage, target_from_model_range
from lmadda.models.generator import UNetGenerator
from lmadda.models.tiling import predict_tiled

CRITERIA = ("output_w1", "probe_shift", "flip_inconsistency")  # all: lower is better; the choice itself is lmadda.selection.selector's


def fixed_crops(images: list[LoadedImage], size: int, count: int, seed: int) -> np.ndarray:
    """`count` fixed random crops of the inputs, (N, C, size, size) in model units."""
    rng = np.random.default_rng(seed)
    crops = []
    for index in range(count):
        image = images[index % len(images)].input
        top = int(rng.integers(0, image.shape[1] - size + 1))
        left = int(rng.integers(0, image.shape[2] - size + 1))
        crops.append(image[:, top:top + size, left:left + size])
    return np.stack(crops).astype(np.float32)


def wasserstein_1d(a: np.ndarray, b: np.ndarray, quantiles: int = 256) -> float:
    """W1 between two samples of values, from their quantile functions."""
    levels = (np.arange(quantiles) + 0.5) / quantiles
    return float(np.mean(np.abs(np.quantile(a, levels) - np.quantile(b, levels))))


def _corrected(crops: np.ndarray, transform: InputTransform | None) -> np.ndarray:
    return crops if transform is None else np.stack([transform(crop) for crop in crops]).astype(np.float32)


@torch.no_grad()
def _predict(generator: UNetGenerator, crops: np.ndarray, transform: InputTransform | None = None) -> np.ndarray:
    crops = _corrected(crops, transform)
    return np.stack([target_from_model_range(predict_tiled(generator, crop, tile=crop.shape[-1], device="cpu")) for crop in crops])


@torch.no_grad()
def _channel_means(generator: UNetGenerator, crops: np.ndarray, layer: int, transform: InputTransform | None = None) -> np.ndarray:
    generator.eval()
    activation = generator.forward_to(layer, torch.from_numpy(_corrected(crops, transform))).activation
    return activation.mean(dim=(2, 3)).numpy()  # (N, C)


# The measurements, once: the per-model criteria below (a study's criteria table, a sweep's lf_* metrics) apply them to
# all crops pooled, the selector (lmadda.selection.selector) to each crop, so that it can count the crops a candidate wins.

def channel_spread(means: np.ndarray) -> np.ndarray:
    """The per-channel spread of (N, C) channel means over crops, floored so a constant channel divides safely."""
    return means.std(axis=0) + 1e-6


def feature_gap(means: np.ndarray, source_mean: np.ndarray, source_spread: np.ndarray) -> np.ndarray:
    """Per row of (N, C) channel means: the mean over channels of its distance from the source's channel means, in
    units of the source's spread (`probe_shift` as a criterion, `feature_gap` as a selector score)."""
    return (np.abs(means - source_mean) / source_spread).mean(axis=1)


def flip_difference(predicted: np.ndarray, mirrored: np.ndarray) -> np.ndarray:
    """Per crop of (N, C, H, W) predictions: the mean change when the input is mirrored (the prediction mirrored back;
    `flip_inconsistency` as a criterion, `flip` as a selector score)."""
    return np.abs(mirrored - predicted).mean(axis=(1, 2, 3))


def channel_mean_shift(source_means: np.ndarray, target_means: np.ndarray) -> float:
    """Mean over channels of |mean_target - mean_source| in units of the source's per-crop spread."""
    pooled = target_means.mean(axis=0, keepdims=True)
    return float(feature_gap(pooled, source_means.mean(axis=0), channel_spread(source_means))[0])


class SelectionProbe:
    """The fixed crops every label-free criterion of one study is measured on.

    Built once per (source model, target domain); `measure(adapted)` then gives the per-model
    criteria and the model's predictions on the target crops (kept for the ensemble criteria).
    """

    def __init__(self, source: UNetGenerator, source_images: list[LoadedImage], target_images: list[LoadedImage], *,
                 crop_size: int = 256, crops: int = 8, seed: int = 0):
        size = min(crop_size, *(i.input.shape[1] for i in source_images + target_images),
                   *(i.input.shape[2] for i in source_images + target_images))
        size -= size % source.config.multiple
        if size <= 0:
            raise ValueError(f"images are smaller than the model's input multiple {source.config.multiple}")
        self.source = source
        self.source_crops = fixed_crops(source_images, size, crops, seed)
        self.target_crops = fixed_crops(target_images, size, crops, seed + 1)
        self.reference = _predict(source, self.source_crops)  # what stains look like in the source domain
        self.probe_layer = source.config.depth - 1  # the bottleneck: where every input has been summarised
        self.source_means = _channel_means(source, self.source_crops, self.probe_layer)

    def measure(self, adapted: UNetGenerator, transform: InputTransform | None = None) -> tuple[dict[str, float], np.ndarray]:
        predicted = _predict(adapted, self.target_crops, transform)
        output_w1 = float(np.mean([wasserstein_1d(self.reference[:, c], predicted[:, c]) for c in range(self.reference.shape[1])]))
        probe_shift = channel_mean_shift(self.source_means, _channel_means(adapted, self.target_crops, self.probe_layer, transform))
        mirrored = _predict(adapted, self.target_crops[..., ::-1].copy(), transform)[..., ::-1]
        flip_inconsistency = float(flip_difference(predicted, mirrored).mean())
        return {"output_w1": output_w1, "probe_shift": probe_shift, "flip_inconsistency": flip_inconsistency}, predicted

    def discrepancy_profile(self) -> list[float]:
        """The unadapted source model's domain discrepancy after every layer (`channel_mean_shift`)."""
        self.source.eval()
        profile = []
        for layer in range(self.source.num_layers):
            source_means = _channel_means(self.source, self.source_crops, layer)
            target_means = _channel_means(self.source, self.target_crops, layer)
            profile.append(channel_mean_shift(source_means, target_means))
        return profile


def predict_layer(profile: list[float], fraction: float = 0.5) -> int:
    """Where the shift enters: the first layer whose discrepancy reaches `fraction` of the profile's maximum.

    The rule is fixed before looking at any labelled result: matching should start where the two
    domains first look different to the network; later layers only inherit that difference.
    """
    finite = [value for value in profile if math.isfinite(value)]
    if not finite:
        raise ValueError("the discrepancy profile has no finite value")
    threshold = fraction * max(finite)
    return next(layer for layer, value in enumerate(profile) if math.isfinite(value) and value >= threshold)


def seed_disagreement(predictions: list[np.ndarray]) -> float:
    """Ensemble uncertainty: the mean pixel-wise standard deviation across models' predictions of the same crops."""
    if len(predictions) < 2:
        return float("nan")
    return float(np.mean(np.stack(predictions).astype(np.float32).std(axis=0)))


def layer_disagreement(predictions: dict[str, np.ndarray]) -> dict[str, float]:
    """For each model, its mean absolute distance to the pixel-wise median of all models' predictions."""
    if len(predictions) < 3:
        return {key: float("nan") for key in predictions}
    median = np.median(np.stack([p.astype(np.float32) for p in predictions.values()]), axis=0)
    return {key: float(np.mean(np.abs(p.astype(np.float32) - median))) for key, p in predictions.items()}


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN with fewer than 3 pairs or no spread."""
    pairs = [(a, b) for a, b in zip(x, y) if math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3:
        return float("nan")

    def ranks(values):
        order = np.argsort(values, kind="stable")
        result = np.empty(len(values))
        result[order] = np.arange(len(values))
        for value in set(values):  # ties share their mean rank
            tied = [i for i, v in enumerate(values) if v == value]
            result[tied] = np.mean(result[tied])
        return result

    a, b = ranks([p[0] for p in pairs]), ranks([p[1] for p in pairs])
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def criterion_agreement(rows: list[dict], criterion: str, truth: str) -> dict[str, float]:
    """How well a lower-is-better criterion ranks trials like the labelled metric `truth` (higher is better).

    Per target: Spearman between -criterion and truth over the non-collapsed trials, and the regret,
    the truth lost by taking the criterion's best trial instead of the truly best one. Averaged over
    targets, with the number of targets that had at least 3 trials.
    """
    correlations, regrets = [], []
    for target in sorted({r["target"] for r in rows}):
        trials = [r for r in rows if r["target"] == target and not r["collapsed"]
                  and math.isfinite(r.get(criterion, float("nan"))) and math.isfinite(r.get(truth, float("nan")))]
        if len(trials) < 3:
            continue
        correlations.append(spearman([-r[criterion] for r in trials], [r[truth] for r in trials]))
        chosen = min(trials, key=lambda r: r[criterion])
        regrets.append(max(r[truth] for r in trials) - chosen[truth])
    finite = [c for c in correlations if math.isfinite(c)]
    return {"spearman": float(np.mean(finite)) if finite else float("nan"),
            "regret": float(np.mean(regrets)) if regrets else float("nan"), "targets": len(regrets)}
