"""Tiled inference with feathered blending: any image size in bounded memory.

The image is covered by overlapping tiles (a multiple of 2**depth); tiles run through the generator
in batches; each tile's prediction is weighted by a window that is 1 in its centre and falls to near 0
at its edges over the overlap, so seams vanish and border effects of each tile are down-weighted.
This is the one tiling routine (`TileGrid`): `lmadda predict`, evaluation and the HTTP endpoint all call it,
with the tiles' predictions gathered in one of two ways that give the same pixels:

- `TilePlan` (`predict_tiled`): the image in memory, two float32 accumulators of the output's size;
- `BandedTilePlan` (`predict_banded`): the input read one row of tiles at a time and the accumulators one
  tile high. Tiles run in the same order and batches, and each pixel's weighted predictions are added in the
  same order, so the blend is bit-identical; once the next row of tiles starts below a row of pixels, that row
  is final and goes to the output (an OME-Zarr image written chunk by chunk), so a whole slide or a plate
  never needs its input or its output in memory. `lmadda predict` takes this path when IN or OUT is OME-Zarr.

Staining a whole image in memory, from camera pixels to the markers' camera units, is one routine too (`StainPlan`):
it owns every step but the forward, so `stain` drives it with a plain call and the endpoint with its awaited,
micro-batched one, and both give the same pixels.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from lmadda.checkpoint import GeneratorCheckpoint, load_checkpoint
from lmadda.core.device import resolve_device
from lmadda.core.errors import LmaddaError
from lmadda.core.progress import Progress
from lmadda.data.bands import BLOCK_VALUES, RegionSource, ValueCounts, blocks, percentiles
from lmadda.data.calibration import PixelSize, PixelSizeCheck, PixelSizeNote, check_pixel_size
from lmadda.data.dataset import target_from_model_range, tile_origins, to_model_range
from lmadda.data.io import check_image_output, clip_to_dtype, read_image, refuse_overwriting_inputs, sensor_max_for, write_image
from lmadda.data.normalise import apply_normalisation, denormalise, normalise, params_from_percentiles
from lmadda.domain import DomainScore, forward_scored, score_tiles
from lmadda.models.generator import UNetGenerator


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


@dataclass(frozen=True)
class Stain:
    """One stained image: the markers in camera units ((C_out, H, W) float, not yet rounded to the output's pixel type)
    and, when the checkpoint carries a domain reference, the image's domain score from the same forward pass."""

    camera: np.ndarray
    domain: DomainScore | None


class StainPlan:
    """The one staining routine: camera pixels -> model input (the checkpoint's normalisation and input correction) ->
    tiles -> feathered blend -> 0..1 -> the markers' camera units, and the domain score from the tiles' features.

    It owns every step but the forward, because the two callers run the forward differently: `stain` (lmadda predict,
    `VirtualStainer.stain`) calls the generator, the HTTP endpoint awaits a micro-batched forward shared with other
    requests, which a synchronous loop could not do. Each drives the same plan, so both give the same pixels:

        plan = StainPlan(checkpoint, pixels, tile=256, overlap=0.25)
        for origins, tiles in plan.batches(batch_size):
            plan.add(origins, *forward(tiles))  # (predictions, features or None), as lmadda.domain.forward_scored gives
        stained = plan.result()
    """

    def __init__(self, checkpoint: GeneratorCheckpoint, pixels: np.ndarray, *, tile: int = 256, overlap: float = 0.25):
        in_channels = checkpoint.config.in_channels
        shape = getattr(pixels, "shape", None)
        if shape is None or len(shape) != 3 or shape[0] != in_channels:
            fix = "add the channel axis: pixels[None]" if shape is not None and len(shape) == 2 and in_channels == 1 else (
                f"give a (C, H, W) array with C = {in_channels}, the model's input channels")
            raise LmaddaError(f"camera pixels of shape {shape}: this model ({checkpoint.setting}) stains ({in_channels}, H, W) "
                              f"arrays; {fix}")
        self.checkpoint = checkpoint
        self.tiles = TilePlan(model_input(pixels, checkpoint), checkpoint.config, tile=tile, overlap=overlap)
        self.features: list[np.ndarray | None] = []

    def batches(self, batch_size: int, progress: str | None = None) -> Iterator[tuple[list[tuple[int, int]], np.ndarray]]:
        """(origins, model-input tiles) in groups of at most `batch_size`, in the order `add` expects them back."""
        return self.tiles.batches(batch_size, progress=progress)

    def add(self, origins: list[tuple[int, int]], predictions: np.ndarray, features: np.ndarray | None = None) -> None:
        """The model-unit predictions of one group of tiles and, for the domain check, their features (rows follow the tiles)."""
        self.tiles.add(origins, predictions)
        self.features.append(features)

    def result(self) -> Stain:
        prediction01 = target_from_model_range(self.tiles.result())
        return Stain(to_camera_units(prediction01, self.checkpoint), score_tiles(self.checkpoint, self.features))


@contextmanager
def _evaluating(generator: UNetGenerator, device) -> Iterator[torch.device]:
    """The generator in eval mode on `device` (resolved) for the duration; its training flag restored after."""
    device = resolve_device(device)
    was_training = generator.training
    generator.eval().to(device)
    try:
        yield device
    finally:
        generator.train(was_training)


@torch.no_grad()
def stain(checkpoint: GeneratorCheckpoint, pixels: np.ndarray, *, tile: int = 256, overlap: float = 0.25, batch_size: int = 8,
          device: torch.device | str | None = None, progress: str | None = None) -> Stain:
    """Stain (C_in, H, W) camera pixels with `checkpoint`: `StainPlan` driven with the generator's own forward (in eval
    mode, on `device`). The markers in camera units and the domain score, exactly as the endpoint stains the image."""
    plan = StainPlan(checkpoint, pixels, tile=tile, overlap=overlap)
    with _evaluating(checkpoint.generator, device) as device:
        for origins, tiles in plan.batches(batch_size, progress=progress):
            plan.add(origins, *forward_scored(checkpoint, torch.from_numpy(tiles).to(device)))
    return plan.result()


def _run_plan(plan: TileGrid, generator: UNetGenerator, *, batch_size: int, device, progress: str | None,
              forward: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
    """Every tile of `plan` through the generator (in eval mode), in batches, into `plan.add`."""
    with _evaluating(generator, device) as device:
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


def predict_file(
    checkpoint_path: str | Path | GeneratorCheckpoint,
    input_path: str | Path,
    output_path: str | Path,
    *,
    tile: int = 256,
    overlap: float = 0.25,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    bit_depth: int | None = None,
    on_domain=None,
    pixel_size: PixelSize | None = None,
    pixel_size_check: PixelSizeCheck = PixelSizeCheck(),
    on_pixel_size: Callable[[PixelSizeNote], None] | None = None,
    progress: bool = False,
    channel: int | str | None = None,
) -> Path:
    """`lmadda predict`: read an image, stain it, write the markers in camera units as the image type
    `output_path` names (TIFF, PNG for a single 8/16-bit marker, or OME-Zarr: .zarr / .ome.zarr). The model is a
    checkpoint file or one already in memory (`VirtualStainer.stain_file`, e.g. a model just adapted).

    With a domain reference in the checkpoint, the same forward pass scores the image against it
    (`lmadda.domain`); the score goes into the output's metadata and to `on_domain(score)` (None
    without a reference), which the CLI uses to warn about out-of-domain images.

    The prediction carries the input's pixel size (`pixel_size` when given, else what the file records), and
    `on_pixel_size(note)` hears, before the work, when it differs from the model's training pixel size by more
    than `pixel_size_check.tolerance` or either is unknown (`lmadda.data.calibration.check_pixel_size`).
    `progress` shows tiles done/total on stderr for images of more than one batch. `channel` (an index, or an
    OME-Zarr channel's name) picks the model's input from a multi-channel image, e.g. phase contrast beside DAPI.

    When the input or the output is OME-Zarr, the image goes through `predict_banded`: an OME-Zarr input is read
    one row of tiles at a time (its normalisation statistics in bands first, `ModelInputRows`) and an OME-Zarr
    output is written chunk by chunk, with the same pixels as the TIFF path.

    An output that is the input image or the checkpoint (through a link too) is refused before any work."""
    from lmadda.data.omezarr import is_zarr, open_image

    in_memory = isinstance(checkpoint_path, GeneratorCheckpoint)
    refuse_overwriting_inputs([("OUT", output_path)], [("IN", input_path), ("CHECKPOINT", None if in_memory else checkpoint_path)])
    if in_memory:  # messages name it by what it is
        checkpoint, checkpoint_path = checkpoint_path, checkpoint_path.describe()
    else:
        checkpoint = load_checkpoint(checkpoint_path)
    check_image_output(output_path, channels=checkpoint.config.out_channels, dtype=checkpoint.target_dtype)  # before the work
    if is_zarr(input_path):  # read region by region: the pixels stay on disk
        source = open_image(input_path)
        sensor_max_for(source.dtype, bit_depth)  # refuses a bit depth the pixel type cannot hold, as read_image does
        names = source.channel_names
        source = source.select(channel) if channel is not None else source
        raw, channels, file_pixel_size = None, source.shape[0], source.pixel_size
    else:
        raw = read_image(input_path, bit_depth=bit_depth)
        names = [str(index) for index in range(raw.channels)]
        if channel is not None:
            index = int(channel) if str(channel).isdigit() else -1
            if not 0 <= index < raw.channels:
                raise LmaddaError(f"{input_path}: no channel {channel!r}; it has channels 0..{raw.channels - 1} (give an index)")
            raw = dataclasses.replace(raw, pixels=raw.pixels[index : index + 1])
        channels, file_pixel_size = raw.channels, raw.pixel_size
    if channels != checkpoint.config.in_channels:
        hint = f"; pick the input with --channel (its channels: {', '.join(names)})" if channel is None and channels > 1 else ""
        raise LmaddaError(
            f"{input_path} has {channels} channel(s); the model {checkpoint_path} expects {checkpoint.config.in_channels}{hint}"
        )
    pixel_size = pixel_size or file_pixel_size
    note = check_pixel_size(pixel_size, checkpoint.pixel_size_um, image_name=str(input_path), model_name=str(checkpoint_path),
                            check=pixel_size_check)
    if note is not None and on_pixel_size is not None:
        on_pixel_size(note)
    label = f"predict {Path(input_path).name}: tiles" if progress else None
    options = dict(tile=tile, overlap=overlap, batch_size=batch_size, device=device, progress=label)
    if raw is None or is_zarr(output_path):
        if raw is None:
            read_rows, shape = ModelInputRows(source, checkpoint), source.shape[1:]
        else:  # the image is in memory already: its model input is made as the TIFF path makes it
            image = model_input(raw.pixels, checkpoint)
            read_rows, shape = (lambda top, bottom: image[:, top:bottom]), image.shape[1:]
        path, domain = _predict_to_file(checkpoint, read_rows, shape, output_path, pixel_size=pixel_size, **options)
        if on_domain is not None:
            on_domain(domain)
        return path
    stained = stain(checkpoint, raw.pixels, **options)
    if on_domain is not None:
        on_domain(stained.domain)
    return write_prediction(output_path, stained.camera, checkpoint, domain=stained.domain, pixel_size=pixel_size)


def _predict_to_file(checkpoint, read_rows: RowReader, shape: tuple[int, int], output_path: str | Path, *,
                     pixel_size: PixelSize | None, **options):
    """`predict_banded` into the image `output_path` names, in camera units: an OME-Zarr output row band by row band,
    any other through one array of the output's pixel type (TIFF and PNG are written whole). (path, domain score)."""
    from lmadda.data.omezarr import OmeZarrWriter, is_zarr

    dtype = checkpoint.target_dtype
    camera = lambda rows: clip_to_dtype(to_camera_units(target_from_model_range(rows), checkpoint), dtype)  # noqa: E731
    reference, forward = checkpoint.domain_reference, None
    if reference is not None:  # as lmadda.domain.tiled: each tile's features from the same forward pass
        from lmadda.domain import RecordingForward

        forward = RecordingForward(checkpoint.generator, reference.layers)

    out_shape = (checkpoint.config.out_channels, *shape)
    sink = (OmeZarrWriter(output_path, out_shape, dtype, pixel_size=pixel_size, channel_names=list(checkpoint.markers))
            if is_zarr(output_path) else _WholeImageWriter(output_path, out_shape, dtype, pixel_size=pixel_size))
    with sink:
        predict_banded(checkpoint.generator, read_rows, shape, lambda top, rows: sink.write_rows(top, camera(rows)), forward=forward,
                       **options)
        domain = reference.score(forward.features()) if reference is not None else None
        return sink.close(prediction_metadata(checkpoint, domain)), domain


class _WholeImageWriter:
    """`OmeZarrWriter`'s interface for a TIFF or PNG output: rows gather in one array of the output's pixel type, written
    whole at `close` (a TIFF from an OME-Zarr input: the output in memory once, the input and the blend never whole)."""

    def __init__(self, path: str | Path, shape: tuple[int, int, int], dtype: str, *, pixel_size: PixelSize | None):
        self.path, self.dtype, self.pixel_size = path, dtype, pixel_size
        self.stain = np.empty(shape, dtype)

    def write_rows(self, top: int, rows: np.ndarray) -> None:
        self.stain[:, top : top + rows.shape[1]] = rows

    def close(self, metadata: dict) -> Path:
        return write_stain(self.path, self.stain, self.dtype, metadata, self.pixel_size)

    def __enter__(self) -> "_WholeImageWriter":
        return self

    def __exit__(self, *error) -> None:
        return None


class ModelInputRows:
    """`model_input` of an image read region by region (`RegionSource`, e.g. an OME-Zarr image): rows top..bottom on demand.

    The whole-image statistics come first, block by block (`lmadda.data.bands`): each channel's percentiles for the
    normalisation and, for a checkpoint with histogram matching, every model-input value's count; rows are then
    normalised and matched exactly as `model_input` does the whole image, with the pixels never all in memory.
    """

    def __init__(self, source: RegionSource, checkpoint, values: int = BLOCK_VALUES):
        from lmadda.baselines import HistogramMatcher, input_correction

        self.source = source
        levels = percentiles(source, [checkpoint.percentiles.low, checkpoint.percentiles.high], values)
        self.params = params_from_percentiles(levels[:, 0], levels[:, 1])
        correction = input_correction(checkpoint.metadata)
        self.counts, self.matched = None, None
        if correction is not None:
            if not isinstance(correction, HistogramMatcher):
                raise LmaddaError(f"the checkpoint's input correction {type(correction).__name__} cannot be applied band by band; "
                                  "predict to a TIFF from a TIFF input")
            self.counts = ValueCounts()
            for block in blocks(source, values):
                self.counts.add(self._normalised(block))
            self.matched = correction.matched_values(self.counts.counts)

    def _normalised(self, pixels: np.ndarray) -> np.ndarray:
        return to_model_range(apply_normalisation(pixels, self.params))

    def __call__(self, top: int, bottom: int) -> np.ndarray:
        image = self._normalised(self.source.read(top, 0, bottom - top, self.source.shape[2]))
        if self.matched is None:
            return image
        return self.matched[self.counts.index(image)].astype(np.float32)


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


def write_prediction(output_path: str | Path, pixels: np.ndarray, checkpoint, domain=None,
                     pixel_size: PixelSize | None = None) -> Path:
    """Write the stain (camera units, `Stain.camera`), with the model that made it and, when known, the input's pixel size."""
    return write_stain(output_path, pixels, checkpoint.target_dtype, prediction_metadata(checkpoint, domain), pixel_size)


def write_stain(path: str | Path, pixels: np.ndarray, dtype: str, metadata: dict, pixel_size: PixelSize | None) -> Path:
    """(markers, H, W) stains as one image file of `dtype`: a single marker as a plain (H, W) image."""
    return write_image(path, pixels if pixels.shape[0] > 1 else pixels[0], dtype=dtype, metadata=metadata, pixel_size=pixel_size)


def prediction_metadata(checkpoint, domain=None) -> dict:
    """What a stain records of the model that made it and, when scored, of its input's domain check."""
    metadata = {
        "lmadda_markers": ",".join(checkpoint.markers),
        "lmadda_setting": checkpoint.setting,
        "lmadda_model": checkpoint.describe(),
    }
    if domain is not None:  # lmadda.domain.DomainScore of the input: is this stain to be trusted?
        metadata["lmadda_domain"] = domain.as_dict()
    return metadata
