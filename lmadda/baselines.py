"""Honest, cheap baselines that need no target labels, to compare LM-ADDA against.

- AdaBN (Li et al. 2016): re-estimate every BatchNorm's statistics on target images; no training.
- Histogram matching: map each target input's intensities onto the source inputs' distribution.
- Fourier domain adaptation (FDA, Yang & Soatto 2020) at test time: give a target image the
  low-frequency amplitude spectrum of a source image, keeping its own phase; no training.
- The oracle (a generator trained on paired target data) is `train_source` on the target setting,
  an upper bound that exists only when target pairs exist.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from lmadda.data.dataset import LoadedImage
from lmadda.errors import LmaddaError
from lmadda.inference import default_device
from lmadda.models.generator import UNetGenerator

BASELINES = ("unadapted", "adabn", "histogram_matching", "fda")


@torch.no_grad()
def adabn(generator: UNetGenerator, target_images: list[LoadedImage], *, tile: int | None = None, batch_size: int = 4,
          device: torch.device | str | None = None) -> UNetGenerator:
    """A copy of `generator` whose BatchNorm running statistics are the target images' own.

    Statistics come from tiles of `tile` pixels (default: the largest multiple of 2**depth up to 256
    that fits the smallest image).
    """
    device = torch.device(device) if device else default_device()
    if tile is None:
        multiple = generator.config.multiple
        smallest = min((min(image.input.shape[1:]) for image in target_images), default=0)
        tile = min(256, smallest) // multiple * multiple
        if tile == 0:
            raise LmaddaError(f"AdaBN: target images ({smallest} px) are smaller than the model's input multiple {multiple}")
    adapted = copy.deepcopy(generator).to(device).eval()
    norms = [m for m in adapted.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over all target batches
        norm.train()
    tiles = []
    for image in target_images:
        height, width = image.input.shape[1:]
        if height < tile or width < tile:
            raise LmaddaError(f"AdaBN: target field {image.field} is {height}x{width}, smaller than the tile {tile}")
        for top in range(0, height - tile + 1, tile):
            for left in range(0, width - tile + 1, tile):
                tiles.append(image.input[:, top : top + tile, left : left + tile])
    if not tiles:
        raise LmaddaError("AdaBN needs at least one target image")
    for start in range(0, len(tiles), batch_size):
        adapted(torch.from_numpy(np.stack(tiles[start : start + batch_size])).to(device))
    adapted.eval()
    return adapted.cpu()


class HistogramMatcher:
    """Quantile mapping of target inputs onto the pooled source input distribution."""

    def __init__(self, source_images: list[LoadedImage], quantiles: int = 1001):
        if not source_images:
            raise LmaddaError("histogram matching needs source images")
        pooled = np.concatenate([image.input.ravel() for image in source_images])
        self.levels = np.linspace(0.0, 1.0, quantiles)
        self.source_values = np.quantile(pooled, self.levels)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        flat = image.ravel()
        ranks = np.empty(flat.size, np.float64)
        order = np.argsort(flat, kind="stable")
        ranks[order] = np.linspace(0.0, 1.0, flat.size)
        return np.interp(ranks, self.levels, self.source_values).reshape(image.shape).astype(np.float32)


class FourierAmplitudeTransfer:
    """FDA: replace the lowest frequencies' amplitude (a square of half-width beta * size) with a source image's."""

    def __init__(self, source_images: list[LoadedImage], beta: float = 0.01, seed: int = 0):
        if not 0 < beta < 0.5:
            raise LmaddaError(f"FDA beta {beta} must lie in (0, 0.5); the paper uses 0.01-0.09")
        if not source_images:
            raise LmaddaError("FDA needs source images")
        self.sources = [image.input for image in source_images]
        self.beta = beta
        self.rng = np.random.default_rng(seed)

    def _source_like(self, shape: tuple[int, ...]) -> np.ndarray:
        source = self.sources[int(self.rng.integers(len(self.sources)))]
        reps = (1, -(-shape[1] // source.shape[1]), -(-shape[2] // source.shape[2]))
        return np.tile(source, reps)[:, : shape[1], : shape[2]]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        # Swap in non-negative 0..1 units, as FDA does on 0..255 images: in the zero-centred model range
        # a dark image's DC term has phase pi, and the source's DC amplitude would flip its brightness.
        source = (self._source_like(image.shape) + 1.0) / 2.0
        image = (image + 1.0) / 2.0
        target_spectrum = np.fft.fftshift(np.fft.fft2(image), axes=(-2, -1))
        source_amplitude = np.abs(np.fft.fftshift(np.fft.fft2(source), axes=(-2, -1)))
        height, width = image.shape[1:]
        b = max(1, int(np.floor(min(height, width) * self.beta)))
        cy, cx = height // 2, width // 2
        amplitude = np.abs(target_spectrum)
        phase = np.angle(target_spectrum)
        amplitude[:, cy - b : cy + b + 1, cx - b : cx + b + 1] = source_amplitude[:, cy - b : cy + b + 1, cx - b : cx + b + 1]
        mixed = np.fft.ifftshift(amplitude * np.exp(1j * phase), axes=(-2, -1))
        return (np.real(np.fft.ifft2(mixed)) * 2.0 - 1.0).astype(np.float32)
