"""Tiled prediction with feathered blending: any image size in bounded memory.

The image is covered by overlapping tiles (a multiple of 2**depth); tiles run through the generator
in batches; each tile's prediction is weighted by a window that is 1 in its centre and falls to near 0
at its edges over the overlap, so seams vanish and border effects of each tile are down-weighted.
This is the one tiling routine (`TileGrid`): `lmadda predict`, evaluation, the domain check and the HTTP
endpoint all call it, with the tiles' predictions gathered in one of two ways that give the same pixels:

- `TilePlan` (`predict_tiled`): the image in memory, two float32 accumulators of the output's size;
- `BandedTilePlan` (`predict_banded`): the input read one row of tiles at a time and the accumulators one
  tile high. Tiles run in the same order and batches, and each pixel's weighted predictions are added in the
  same order, so the blend is bit-identical; once the next row of tiles starts below a row of pixels, that row
  is final and goes to the output (an OME-Zarr image written chunk by chunk), so a whole slide or a plate
  never needs its input or its output in memory. `lmadda predict` takes this path when IN or OUT is OME-Zarr.

It knows generators and arrays only: checkpoints, normalisation and the domain check sit above it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch

from lmadda.core.device import resolve_device
from lmadda.core.errors import LmaddaError
from lmadda.core.progress import Progress
from lmadda.models.generator import UNetGenerator


def tile_origins(length: int, tile: int, stride: int) -> list[int]:
    """Start positions covering [0, length) with tiles of `tile`, the last one flush with the end."""
    if length <= tile:
        return [0]
    origins = list(range(0, length - tile + 1, stride))
    if origins[-1] != length - tile:
        origins.append(length - tile)
    return origins


def feather_window(tile: int, overlap: int) -> np.ndarray:
    """2-D weights: a raised-cosine ramp over `overlap` pixels at each edge, 1 inside."""
    ramp = np.ones(tile, np.float32)
    if overlap > 0:
        t = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
        edge = 0.5 - 0.5 * np.cos(np.pi * t)
        ramp[:overlap] = edge
        ramp[-overlap:] = edge[::-1]
    return np.outer(ramp, ramp)


class TileGrid:
    """Where the tiles of an H x W image go and how each tile's prediction is weighted.

    Small images are reflect-padded up to one tile (padding keeps the statistics of the image); tiles
    start every `tile - overlap` pixels, the last one flush with the far edge; `origins` are row by row,
    left to right, the order in which tiles run and their predictions are added.
    """

    def __init__(self, height: int, width: int, config, *, tile: int = 256, overlap: float = 0.25):
        if not 0 <= overlap < 1:
            raise LmaddaError(f"overlap {overlap} must be a fraction in [0, 1), e.g. 0.25")
        if tile % config.multiple:
            raise LmaddaError(f"tile {tile} must be a multiple of {config.multiple} (2**depth of this generator)")
        self.height, self.width = height, width
        self.tile, self.in_channels, self.out_channels = tile, config.in_channels, config.out_channels
        self.padded_h, self.padded_w = max(height, tile), max(width, tile)
        small = height > 1 and width > 1 and self.padded_h < 2 * height and self.padded_w < 2 * width
        self.pad_mode = "reflect" if small else "symmetric"
        overlap_px = int(round(tile * overlap))
        stride = max(tile - overlap_px, 1)
        window = feather_window(tile, overlap_px // 2 if overlap_px else 0)
        self.window = np.maximum(window, 1e-3)  # the image border is covered by one tile only: keep it
        self.origins = [(top, left) for top in tile_origins(self.padded_h, tile, stride) for left in tile_origins(self.padded_w, tile, stride)]

    def pad(self, pixels: np.ndarray) -> np.ndarray:
        """The whole image, or the one band of all its rows, padded as the grid pads the image."""
        extra_h, extra_w = self.padded_h - self.height, self.padded_w - self.width
        if not (extra_h or extra_w):
            return pixels
        return np.pad(pixels, ((0, 0), (0, extra_h), (0, extra_w)), mode=self.pad_mode)

    def _tile(self, top: int, left: int) -> np.ndarray:
        raise NotImplementedError

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
            yield origins, np.stack([self._tile(t, l) for t, l in origins])
            bar.update(min(start + batch_size, total))


class TilePlan(TileGrid):
    """How an image is cut into overlapping tiles and how the tiles' predictions are blended back.

    `predict_tiled` runs it in one call; `StainPlan` holds one for a whole stain, from camera pixels to camera
    units, which `lmadda predict` and the HTTP endpoint (its tiles micro-batched across requests) both drive.
    """

    def __init__(self, image: np.ndarray, config, *, tile: int = 256, overlap: float = 0.25):
        if image.ndim != 3 or image.shape[0] != config.in_channels:
            raise LmaddaError(f"image has shape {image.shape}; this model expects ({config.in_channels}, H, W)")
        super().__init__(image.shape[1], image.shape[2], config, tile=tile, overlap=overlap)
        self.image = self.pad(image)
        self.output = np.zeros((config.out_channels, self.padded_h, self.padded_w), np.float32)
        self.weight = np.zeros((self.padded_h, self.padded_w), np.float32)

    def _tile(self, top: int, left: int) -> np.ndarray:
        return self.image[:, top : top + self.tile, left : left + self.tile]

    def add(self, origins, predictions: np.ndarray) -> None:
        tile = self.tile
        for (t, l), prediction in zip(origins, predictions):
            self.output[:, t : t + tile, l : l + tile] += prediction * self.window
            self.weight[t : t + tile, l : l + tile] += self.window

    def result(self) -> np.ndarray:
        return (self.output / self.weight)[:, : self.height, : self.width]


RowReader = Callable[[int, int], np.ndarray]  # (top, bottom) -> (C_in, bottom - top, W) model-input rows
RowWriter = Callable[[int, np.ndarray], None]  # (top, (C_out, rows, W) blended model-unit rows), top to bottom


class BandedTilePlan(TileGrid):
    """`TilePlan` for images too large to hold: one row of tiles in memory at a time, on both sides.

    Input rows come from `read_rows` when a row of tiles first needs them; predictions are added into
    accumulators one tile high (the tiles of one row share their top), exactly as `TilePlan.add` adds
    them, and when the next row of tiles begins at `top`, the rows above it are final: they are blended
    and handed to `write_rows`, and the rest of the accumulators moves up.
    """

    def __init__(self, height: int, width: int, config, read_rows: RowReader, write_rows: RowWriter, *, tile: int = 256,
                 overlap: float = 0.25):
        super().__init__(height, width, config, tile=tile, overlap=overlap)
        self.read_rows, self.write_rows = read_rows, write_rows
        self.inputs: dict[int, np.ndarray] = {}  # top of a row of tiles -> its padded input rows
        self.top = 0  # the first row not yet written: the accumulators start here
        self.output = np.zeros((config.out_channels, tile, self.padded_w), np.float32)
        self.weight = np.zeros((tile, self.padded_w), np.float32)
        self.added = 0

    def _tile(self, top: int, left: int) -> np.ndarray:
        rows = self.inputs.get(top)
        if rows is None:
            for done in [t for t in self.inputs if t < top]:
                del self.inputs[done]
            rows = self.pad(self.read_rows(top, min(top + self.tile, self.height)))
            if rows.shape[0] != self.in_channels:
                raise LmaddaError(f"image has {rows.shape[0]} channel(s); this model expects ({self.in_channels}, H, W)")
            self.inputs[top] = rows
        return rows[:, :, left : left + self.tile]

    def add(self, origins, predictions: np.ndarray) -> None:
        tile = self.tile
        for (t, l), prediction in zip(origins, predictions):
            if t != self.top:
                self._write(t)
            self.output[:, :, l : l + tile] += prediction * self.window
            self.weight[:, l : l + tile] += self.window
            self.added += 1
        if self.added == len(self.origins):
            self._write(self.height)

    def _write(self, below: int) -> None:
        """Blend and write rows top..below (final: no tile still to come covers them), then move the rest up."""
        if below <= self.top:
            raise ValueError(f"tiles must come row by row: a tile at row {below} after row {self.top}")
        rows = min(below, self.height) - self.top
        self.write_rows(self.top, (self.output[:, :rows] / self.weight[:rows])[:, :, : self.width])
        shift = below - self.top
        kept = self.tile - shift
        self.output[:, :kept] = self.output[:, shift:]
        self.output[:, kept:] = 0
        self.weight[:kept] = self.weight[shift:]
        self.weight[kept:] = 0
        self.top = below


@contextmanager
def evaluating(generator: UNetGenerator, device) -> Iterator[torch.device]:
    """The generator in eval mode on `device` (resolved) for the duration; its training flag restored after."""
    device = resolve_device(device)
    was_training = generator.training
    generator.eval().to(device)
    try:
        yield device
    finally:
        generator.train(was_training)


def _run_plan(plan: TileGrid, generator: UNetGenerator, *, batch_size: int, device, progress: str | None,
              forward: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
    """Every tile of `plan` through the generator (in eval mode), in batches, into `plan.add`."""
    with evaluating(generator, device) as device:
        run = forward or generator
        for origins, batch in plan.batches(batch_size, progress=progress):
            plan.add(origins, run(torch.from_numpy(batch).to(device)).float().cpu().numpy())


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
    _run_plan(plan, generator, batch_size=batch_size, device=device, progress=progress, forward=forward)
    return plan.result()


@torch.no_grad()
def predict_banded(
    generator: UNetGenerator,
    read_rows: RowReader,
    shape: tuple[int, int],
    write_rows: RowWriter,
    *,
    tile: int = 256,
    overlap: float = 0.25,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: str | None = None,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """`predict_tiled` of an (H, W) = `shape` image that is never whole in memory: `read_rows(top, bottom)` gives its
    model-input rows as a row of tiles needs them, and `write_rows(top, rows)` receives the prediction (model units),
    top to bottom, each row once it is final. Same tiles, batches and blend as `predict_tiled`: the same pixels."""
    plan = BandedTilePlan(shape[0], shape[1], generator.config, read_rows, write_rows, tile=tile, overlap=overlap)
    _run_plan(plan, generator, batch_size=batch_size, device=device, progress=progress, forward=forward)
