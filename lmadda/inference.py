"""Staining an image with a checkpoint: camera pixels in, the markers in camera units out, files in and out.

Staining a whole image in memory, from camera pixels to the markers' camera units, is one routine (`StainPlan`):
it owns every step but the forward, so `stain` drives it with a plain call and the endpoint with its awaited,
micro-batched one, and both give the same pixels. The tiles and their blend are `lmadda.models.tiling`'s; `predict_file`
reads and writes TIFF, PNG and OME-Zarr, band by band where either side is OME-Zarr.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from lmadda.checkpoint import GeneratorCheckpoint, load_checkpoint
from lmadda.core.errors import LmaddaError
from lmadda.data.bands import BLOCK_VALUES, RegionSource, ValueCounts, blocks, percentiles
from lmadda.data.calibration import PixelSize, PixelSizeCheck, PixelSizeNote, check_pixel_size
from lmadda.data.dataset import target_from_model_range, to_model_range
from lmadda.data.io import check_image_output, read_image, refuse_overwriting_inputs, write_image
from lmadda.data.normalise import apply_normalisation, denormalise, normalise, params_from_percentiles
from lmadda.data.raw import clip_to_dtype, sensor_max_for
from lmadda.domain import DomainScore, forward_scored, score_tiles
from lmadda.models.tiling import RowReader, TilePlan, evaluating, predict_banded


# Names that moved to lmadda.models.tiling when the tiling went below the domain check (imports only go down): a user's
# `from lmadda.inference import predict_tiled` says where they are now instead of failing without a hint.
MOVED_TO_TILING = ("predict_tiled", "predict_banded", "feather_window", "TileGrid", "TilePlan", "BandedTilePlan")


def __getattr__(name: str):
    if name in MOVED_TO_TILING:
        raise ImportError(f"lmadda.inference.{name} moved to lmadda.models.tiling: from lmadda.models.tiling import {name}")
    raise AttributeError(f"module 'lmadda.inference' has no attribute {name!r}")


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


@torch.no_grad()
def stain(checkpoint: GeneratorCheckpoint, pixels: np.ndarray, *, tile: int = 256, overlap: float = 0.25, batch_size: int = 8,
          device: torch.device | str | None = None, progress: str | None = None) -> Stain:
    """Stain (C_in, H, W) camera pixels with `checkpoint`: `StainPlan` driven with the generator's own forward (in eval
    mode, on `device`). The markers in camera units and the domain score, exactly as the endpoint stains the image."""
    plan = StainPlan(checkpoint, pixels, tile=tile, overlap=overlap)
    with evaluating(checkpoint.generator, device) as device:
        for origins, tiles in plan.batches(batch_size, progress=progress):
            plan.add(origins, *forward_scored(checkpoint, torch.from_numpy(tiles).to(device)))
    return plan.result()


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
        from lmadda.data.correction import HistogramMatcher, input_correction

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
    from lmadda.data.correction import input_correction

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
