"""Image-to-image metrics (per-image Pearson, the paper's metric; SSIM, PSNR, NRMSE) and the finite-value summaries tables use.

All take prediction and truth as (H, W) float arrays in the same units. Pearson is invariant to any
affine intensity change, so it compares the stain pattern, not the camera's gain.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def pearson(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Pearson correlation of the pixel intensities of one image; NaN when either image is flat."""
    p = np.asarray(prediction, np.float64).ravel()
    t = np.asarray(truth, np.float64).ravel()
    p = p - p.mean()
    t = t - t.mean()
    denominator = np.sqrt((p * p).sum() * (t * t).sum())
    return float((p * t).sum() / denominator) if denominator > 0 else float("nan")


def ssim(prediction: np.ndarray, truth: np.ndarray, data_range: float | None = None, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004) with an 11x11 Gaussian window."""
    if data_range is None:
        data_range = float(truth.max() - truth.min()) or 1.0
    x = torch.as_tensor(np.asarray(prediction, np.float64))[None, None]
    y = torch.as_tensor(np.asarray(truth, np.float64))[None, None]
    radius = 5
    coords = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :])[None, None]

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, window)  # valid region only, as in skimage's default cropping

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(s.mean())


def psnr(prediction: np.ndarray, truth: np.ndarray, data_range: float | None = None) -> float:
    if data_range is None:
        data_range = float(truth.max() - truth.min()) or 1.0
    mse = float(np.mean((np.asarray(prediction, np.float64) - truth) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def nrmse(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Root-mean-square error divided by the truth's intensity range."""
    spread = float(truth.max() - truth.min()) or 1.0
    return float(np.sqrt(np.mean((np.asarray(prediction, np.float64) - truth) ** 2)) / spread)


def gap_recovered(adapted: float, unadapted: float, oracle: float) -> float:
    """Share of the domain gap closed: (P_adapted - P_unadapted) / (P_oracle - P_unadapted)."""
    gap = oracle - unadapted
    return float("nan") if gap <= 0 else (adapted - unadapted) / gap


def is_finite(value) -> bool:
    """A real number that is neither NaN nor infinite; None, text and booleans are not numbers here."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and math.isfinite(float(value))


def finite_mean_std(values) -> tuple[float, float, int]:
    """Mean, standard deviation and count of the finite values (NaN, NaN, 0 when there are none).

    Tables average over seeds and images where a collapsed or unlabelled run leaves NaN or None:
    those are left out, and the count says how many values the mean stands on."""
    finite = np.array([float(v) for v in values if is_finite(v)], dtype=float)
    if finite.size == 0:
        return float("nan"), float("nan"), 0
    return float(finite.mean()), float(finite.std()), int(finite.size)
