"""Tiled inference with feathered blending: any image size in bounded memory.

The image is covered by overlapping tiles (a multiple of 2**depth); tiles run through the generator
in batches; each tile's prediction is weighted by a window that is 1 in its centre and falls to near 0
at its edges over the overlap, so seams vanish and border effects of each tile are down-weighted.
Memory is the tile batch plus two float32 accumulators of the output's size.
This is the one tiling routine: `lmadda predict`, evaluation and the HTTP endpoint all call it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lmadda.data.calibration import PixelSize, PixelSizeCheck, PixelSizeNote, check_pixel_size
from lmadda.data.dataset import target_from_model_range, tile_origins, to_model_range
from lmadda.data.io import check_image_output, read_image, write_image
from lmadda.data.normalise import denormalise, normalise
from lmadda.errors import LmaddaError
from lmadda.models.generator import UNetGenerator
from lmadda.training.common import Progress


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def feather_window(tile: int, overlap: int) -> np.ndarray:
    """2-D weights: a raised-cosine ramp over `overlap` pixels at each edge, 1 inside."""
    ramp = np.ones(tile, np.float32)
    if overlap > 0:
        t = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
        edge = 0.5 - 0.5 * np.cos(np.pi * t)
        ramp[:overlap] = edge
        ramp[-overlap:] = edge[::-1]
    return np.outer(ramp, ramp)


class TilePlan:
    """How an image is cut into overlapping tiles and how the tiles' predictions are blended back.

    `predict_tiled` runs it in one call; the HTTP endpoint runs the same plan with its tiles
    micro-batched across requests, so both produce the same pixels.
    """

    def __init__(self, image: np.ndarray, config, *, tile: int = 256, overlap: float = 0.25):
        if image.ndim != 3 or image.shape[0] != config.in_channels:
            raise LmaddaError(f"image has shape {image.shape}; this model expects ({config.in_channels}, H, W)")
        if not 0 <= overlap < 1:
            raise LmaddaError(f"overlap {overlap} must be a fraction in [0, 1), e.g. 0.25")
        if tile % config.multiple:
            raise LmaddaError(f"tile {tile} must be a multiple of {config.multiple} (2**depth of this generator)")
        self.height, self.width = image.shape[1:]
        self.tile, self.out_channels = tile, config.out_channels
        # Small images are reflect-padded up to one tile (padding keeps the statistics of the image).
        padded_h, padded_w = max(self.height, tile), max(self.width, tile)
        if (padded_h, padded_w) != (self.height, self.width):
            mode = "reflect" if self.height > 1 and self.width > 1 and padded_h < 2 * self.height and padded_w < 2 * self.width else "symmetric"
            image = np.pad(image, ((0, 0), (0, padded_h - self.height), (0, padded_w - self.width)), mode=mode)
        self.image = image
        overlap_px = int(round(tile * overlap))
        stride = max(tile - overlap_px, 1)
        window = feather_window(tile, overlap_px // 2 if overlap_px else 0)
        self.window = np.maximum(window, 1e-3)  # the image border is covered by one tile only: keep it
        self.origins = [(top, left) for top in tile_origins(padded_h, tile, stride) for left in tile_origins(padded_w, tile, stride)]
        self.output = np.zeros((config.out_channels, padded_h, padded_w), np.float32)
        self.weight = np.zeros((padded_h, padded_w), np.float32)

    def batches(self, batch_size: int, progress: str | None = None):
        """(origins, stacked input tiles) in groups of at most `batch_size`.

        With a `progress` label, tiles done/total go to stderr as each group comes back for the next
        (`Progress`), on images of more than one group only: a single forward needs no progress line."""
        if batch_size < 1:
            raise LmaddaError(f"batch size {batch_size} must be >= 1")
        total = len(self.origins)
        bar = Progress(total, progress or "", enabled=progress is not None and total > batch_size)
        for start in range(0, total, batch_size):
            origins = self.origins[start : start + batch_size]
            tile = self.tile
            yield origins, np.stack([self.image[:, t : t + tile, l : l + tile] for t, l in origins])
            bar.update(min(start + batch_size, total))

    def add(self, origins, predictions: np.ndarray) -> None:
        tile = self.tile
        for (t, l), prediction in zip(origins, predictions):
            self.output[:, t : t + tile, l : l + tile] += prediction * self.window
            self.weight[t : t + tile, l : l + tile] += self.window

    def result(self) -> np.ndarray:
        return (self.output / self.weight)[:, : self.height, : self.width]


@torch.no_grad()
def predict_tiled(
    generator: UNetGenerator,
    image: np.ndarray,
    *,
    tile: int = 256,
    overlap: float = 0.25,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: str | None = None,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray:
    """Predict a (C_in, H, W) image in model units ([-1, 1]); returns (C_out, H, W) in model units.
    With a `progress` label, tiles done/total go to stderr on images of more than one batch.
    `forward` replaces `generator(batch)` for callers that take more from the same pass (lmadda.domain).

    Runs the generator in eval mode (BatchNorm running statistics, no dropout): pix2pix's own test
    script keeps train-mode BatchNorm, which silently adapts to each test batch; lmadda does not.
    """
    plan = TilePlan(image, generator.config, tile=tile, overlap=overlap)
    device = torch.device(device) if device is not None else default_device()
    was_training = generator.training
    generator.eval().to(device)
    run = forward or generator
    for origins, batch in plan.batches(batch_size, progress=progress):
        plan.add(origins, run(torch.from_numpy(batch).to(device)).float().cpu().numpy())
    generator.train(was_training)
    return plan.result()


def predict_file(
    checkpoint_path: str | Path,
    input_path: str | Path,
    output_path: str | Path,
    *,
    tile: int = 256,
    overlap: float = 0.25,
    batch_size: int = 8,
    device: str | None = None,
    bit_depth: int | None = None,
    on_domain=None,
    pixel_size: PixelSize | None = None,
    pixel_size_check: PixelSizeCheck = PixelSizeCheck(),
    on_pixel_size: Callable[[PixelSizeNote], None] | None = None,
    progress: bool = False,
) -> Path:
    """`lmadda predict`: read an image, stain it, write the markers in camera units as the image type
    `output_path` names (TIFF, or PNG for a single 8/16-bit marker).

    With a domain reference in the checkpoint, the same forward pass scores the image against it
    (`lmadda.domain`); the score goes into the TIFF's metadata and to `on_domain(score)` (None
    without a reference), which the CLI uses to warn about out-of-domain images.

    The prediction carries the input's pixel size (`pixel_size` when given, else what the file records), and
    `on_pixel_size(note)` hears, before the work, when it differs from the model's training pixel size by more
    than `pixel_size_check.tolerance` or either is unknown (`lmadda.data.calibration.check_pixel_size`).
    `progress` shows tiles done/total on stderr for images of more than one batch."""
    from lmadda.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(checkpoint_path)
    check_image_output(output_path, channels=checkpoint.config.out_channels, dtype=checkpoint.target_dtype)  # before the work
    raw = read_image(input_path, bit_depth=bit_depth)
    if raw.channels != checkpoint.config.in_channels:
        raise LmaddaError(
            f"{input_path} has {raw.channels} channel(s); the model {checkpoint_path} expects {checkpoint.config.in_channels}"
        )
    pixel_size = pixel_size or raw.pixel_size
    note = check_pixel_size(pixel_size, checkpoint.pixel_size_um, image_name=str(input_path), model_name=str(checkpoint_path),
                            check=pixel_size_check)
    if note is not None and on_pixel_size is not None:
        on_pixel_size(note)
    label = f"predict {Path(input_path).name}: tiles" if progress else None
    image, domain = model_input(raw.pixels, checkpoint), None
    if checkpoint.domain_reference is None:
        prediction = predict_tiled(checkpoint.generator, image, tile=tile, overlap=overlap, batch_size=batch_size, device=device,
                                   progress=label)
    else:
        from lmadda.domain import predict_and_score

        prediction, domain = predict_and_score(checkpoint.generator, checkpoint.domain_reference, image, tile=tile, overlap=overlap,
                                               batch_size=batch_size, device=device, progress=label)
    if on_domain is not None:
        on_domain(domain)
    return write_prediction(output_path, target_from_model_range(prediction), checkpoint, domain=domain, pixel_size=pixel_size)


def model_input(pixels: np.ndarray, checkpoint) -> np.ndarray:
    """Camera pixels -> the generator's input: the source model's normalisation, then the checkpoint's
    input correction when the label-free choice was one (histogram matching onto the source domain)."""
    from lmadda.baselines import input_correction

    normalised, _ = normalise(pixels, checkpoint.percentiles)
    image = to_model_range(normalised)
    correction = input_correction(checkpoint.metadata)
    return image if correction is None else correction(image)


def to_camera_units(prediction01: np.ndarray, checkpoint) -> np.ndarray:
    """Map a prediction in normalised 0..1 units to the marker's typical camera range."""
    if checkpoint.target_norm is None:
        return prediction01 * 65535.0 if checkpoint.target_dtype == "uint16" else prediction01
    return denormalise(prediction01, checkpoint.target_norm)


def write_prediction(output_path: str | Path, prediction01: np.ndarray, checkpoint, domain=None,
                     pixel_size: PixelSize | None = None) -> Path:
    """Write the stain in camera units, with the model that made it and, when known, the input's pixel size."""
    metadata = {
        "lmadda_markers": ",".join(checkpoint.markers),
        "lmadda_setting": checkpoint.setting,
        "lmadda_model": checkpoint.describe(),
    }
    if domain is not None:  # lmadda.domain.DomainScore of the input: is this stain to be trusted?
        metadata["lmadda_domain"] = domain.as_dict()
    pixels = to_camera_units(prediction01, checkpoint)
    return write_image(output_path, pixels if pixels.shape[0] > 1 else pixels[0], dtype=checkpoint.target_dtype, metadata=metadata,
                       pixel_size=pixel_size)
