"""Honest, cheap baselines that need no target labels, to compare LM-ADDA against.

- AdaBN (Li et al. 2016): re-estimate every BatchNorm's statistics on target images; no training.
  `adabn:l` re-estimates only those of layers 0..l (the paper's layer cut without an adversary):
  the decoder keeps the source statistics its weights were trained with.
- Histogram matching: map each target input's intensities onto the source inputs' distribution.
- Fourier domain adaptation (FDA, Yang & Soatto 2020) at test time: give a target image the
  low-frequency amplitude spectrum of a source image, keeping its own phase; no training.
- Zoom (lmadda.corrections.zoom): resample each target input to the source's scale, estimated without labels by
  the source model's own domain check, and the stain back; the generator carries the factor.
- Composites: `histogram_matching+adabn:3` corrects the inputs first, then re-estimates the statistics
  on the corrected target images; the model carries the correction.
- The oracle (a generator trained on paired target data) is `train_source` on the target setting,
  an upper bound that exists only when target pairs exist.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib

import numpy as np
import torch
from torch import nn

from lmadda.core.device import resolve_device
from lmadda.core.errors import LmaddaError
from lmadda.data.correction import HistogramMatcher, InputTransform
from lmadda.data.dataset import LoadedImage
from lmadda.models.generator import UNetGenerator

BASELINES = ("unadapted", "adabn", "histogram_matching", "fda", "zoom")

def parse_baseline(name: str) -> tuple[str | None, str, int | None]:
    """`[correction+]baseline[:layer]` -> (correction, baseline, layer), checked: `adabn:3`, `histogram_matching+adabn`."""
    correction, _, core = name.rpartition("+")
    base, _, layer_text = core.partition(":")
    known = f"known: {', '.join(BASELINES)}, adabn:<layer> (layers 0..l only), and histogram_matching+adabn[:<layer>]"
    if base not in BASELINES or (correction and (correction != "histogram_matching" or base != "adabn")):
        raise LmaddaError(f"unknown baseline {name!r}; {known}")
    if layer_text and (base != "adabn" or not layer_text.isdigit()):
        raise LmaddaError(f"baseline {name!r}: only AdaBN takes a layer, written adabn:<layer> (e.g. adabn:3); {known}")
    return correction or None, base, int(layer_text) if layer_text else None


def is_baseline(name: str) -> bool:
    """Whether `name` names a correction `build_baseline` makes (see `parse_baseline`)."""
    try:
        parse_baseline(name)
    except LmaddaError:
        return False
    return True


def build_baseline(name: str, generator: UNetGenerator, source_train: list[LoadedImage], target_train: list[LoadedImage], *,
                   seed: int = 0) -> tuple[UNetGenerator, InputTransform | None]:
    """The (generator, input transform) pair that evaluates baseline `name` (`parse_baseline`): one construction for
    every caller (the study, `lmadda evaluate`, `adapt --layer auto`), so the same seed gives the same baseline everywhere."""
    correction, base, layer = parse_baseline(name)
    if layer is not None:
        generator.check_layer(layer)
    if base == "unadapted":
        return generator, None
    if base == "adabn":
        transform = HistogramMatcher(source_train) if correction else None
        if transform is not None:  # the statistics of the images the model will see: corrected ones
            target_train = [dataclasses.replace(image, input=transform(image.input)) for image in target_train]
        return adabn(generator, target_train, up_to=layer), transform
    if base == "histogram_matching":
        return generator, HistogramMatcher(source_train)
    if base == "zoom":
        return zoom_correction(generator, source_train, target_train), None
    return generator, FourierAmplitudeTransfer(source_train, seed=seed)


def zoom_correction(generator: UNetGenerator, source_train: list[LoadedImage], target_train: list[LoadedImage]) -> UNetGenerator:
    """The generator resampling its inputs by the zoom estimated for `target_train` (lmadda.corrections.zoom), which records the
    factor in its config (`input_zoom`). A factor of 1 returns `generator` itself: nothing to undo."""
    from lmadda.models.generator import zoomed
    from lmadda.corrections.zoom import estimate_zoom

    estimate = estimate_zoom(generator, source_train, target_train)
    return generator if estimate.factor == 1.0 else zoomed(generator, estimate.factor)


@torch.no_grad()
def adabn(generator: UNetGenerator, target_images: list[LoadedImage], *, tile: int | None = None, batch_size: int = 4,
          device: torch.device | str | None = None, up_to: int | None = None) -> UNetGenerator:
    """A copy of `generator` whose BatchNorm running statistics are the target images' own: every BatchNorm's,
    or (`up_to` l) only those of layers 0..l, the others keeping the source's.

    Statistics come from tiles of `tile` pixels (default: the largest multiple of 2**depth up to 256
    that fits the smallest image).
    """
    device = resolve_device(device)
    if tile is None:
        multiple = generator.config.multiple
        smallest = min((min(image.input.shape[1:]) for image in target_images), default=0)
        tile = min(256, smallest) // multiple * multiple
        if tile == 0:
            raise LmaddaError(f"AdaBN: target images ({smallest} px) are smaller than the model's input multiple {multiple}")
    adapted = copy.deepcopy(generator).to(device).eval()
    layers = adapted.layers if up_to is None else adapted.layers[: up_to + 1]
    norms = [m for layer in layers for m in layer.modules() if isinstance(m, nn.BatchNorm2d)]
    if not norms:  # layer 0 has no BatchNorm (pix2pix): nothing to re-estimate, which would be a silent no-op
        raise LmaddaError(f"AdaBN up to layer {up_to}: layers 0..{up_to} have no BatchNorm; choose a later layer (1 or more)")
    for norm in norms:
        norm.reset_running_stats()
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
        batch = tiles[start : start + batch_size]
        # Weight each batch by its tiles (momentum None would weight a short last batch like a full one),
        # so every running mean is exactly the mean of that layer's input over all target tiles in this
        # pass; the running variance is the tile-weighted mean of the per-batch variances.
        for norm in norms:
            norm.momentum = len(batch) / (start + len(batch))
        x = torch.from_numpy(np.stack(batch)).to(device)
        adapted(x) if up_to is None else adapted.forward_to(up_to, x)  # later layers are not re-estimated: no need to run them
    adapted.eval()
    return adapted.cpu()


class FourierAmplitudeTransfer:
    """FDA: replace the lowest frequencies' amplitude (a square of half-width beta * size) with a source image's.

    The source image paired with a target image is drawn from `seed` and a hash of the target's pixels, so
    it is the same whatever order, or whichever caller (study, `lmadda evaluate`), transforms the images.
    """

    def __init__(self, source_images: list[LoadedImage], beta: float = 0.01, seed: int = 0):
        if not 0 < beta < 0.5:
            raise LmaddaError(f"FDA beta {beta} must lie in (0, 0.5); the paper uses 0.01-0.09")
        if not source_images:
            raise LmaddaError("FDA needs source images")
        self.sources = [image.input for image in source_images]
        self.beta = beta
        self.seed = seed

    def source_index(self, image: np.ndarray) -> int:
        """Which source image `image` takes its low-frequency amplitude from."""
        digest = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=8).digest()
        rng = np.random.default_rng([self.seed, int.from_bytes(digest, "little")])
        return int(rng.integers(len(self.sources)))

    def _source_like(self, image: np.ndarray) -> np.ndarray:
        source, shape = self.sources[self.source_index(image)], image.shape
        reps = (1, -(-shape[1] // source.shape[1]), -(-shape[2] // source.shape[2]))
        return np.tile(source, reps)[:, : shape[1], : shape[2]]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        # Swap in non-negative 0..1 units, as FDA does on 0..255 images: in the zero-centred model range
        # a dark image's DC term has phase pi, and the source's DC amplitude would flip its brightness.
        source = (self._source_like(image) + 1.0) / 2.0
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
