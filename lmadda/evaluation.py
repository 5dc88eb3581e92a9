"""Evaluate a generator on held-out images: per-image, per-marker metrics as table rows."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from lmadda.data.dataset import LoadedImage, target_from_model_range
from lmadda.inference import predict_tiled
from lmadda.metrics import nrmse, pearson, psnr, ssim
from lmadda.models.generator import UNetGenerator

InputTransform = Callable[[np.ndarray], np.ndarray]


def evaluate_generator(
    generator: UNetGenerator,
    images: list[LoadedImage],
    markers: list[str],
    *,
    device: torch.device | str | None = None,
    input_transform: InputTransform | None = None,
    tile: int | None = None,
) -> list[dict]:
    """One row per (image, marker): pearson, ssim, psnr, nrmse in normalised 0..1 target units.

    `input_transform` is applied to each input (model units) first: how test-time baselines such
    as histogram matching plug in. The generator runs in eval mode (see `predict_tiled`).
    """
    tile = tile or max(generator.config.multiple, 256)
    rows = []
    for image in images:
        if image.target is None:
            raise ValueError(f"field {image.field} has no target; evaluation needs paired images")
        model_input = input_transform(image.input) if input_transform else image.input
        prediction = target_from_model_range(predict_tiled(generator, model_input, tile=tile, device=device))
        truth = target_from_model_range(image.target)
        for channel, marker in enumerate(markers):
            p, t = prediction[channel], truth[channel]
            rows.append({
                "field": image.field, "marker": marker,
                "pearson": pearson(p, t), "ssim": ssim(p, t, data_range=1.0),
                "psnr": psnr(p, t, data_range=1.0), "nrmse": nrmse(p, t),
            })
    return rows
