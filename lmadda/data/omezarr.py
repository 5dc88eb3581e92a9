"""OME-Zarr (OME-NGFF) images and HCS plates: read region by region, written chunk by chunk.

An OME-Zarr *image* is a folder (a Zarr group, `image.ome.zarr`, or a field of a plate, `plate.ome.zarr/A/1/0`) whose
`multiscales` metadata names its resolution levels and axes; lmadda reads the first (full-resolution) level, NGFF 0.4
(Zarr v2) or 0.5 (Zarr v3), with any of the axes t, c, z, y, x as long as t and z hold one plane (a 2-D image with
channels, as lmadda predicts). It reads regions on demand (`OmeZarrImage.read`), so a whole-slide image is never held
in memory, and the pixel size from the level's `scale` transformation with the y and x axes' unit.

An HCS *plate* (`plate` metadata: rows, columns, wells; each well's `well` metadata: its fields) is indexed field by
field (`plate_fields`, `lmadda.data.index.index_plate`).

`OmeZarrWriter` writes a (C, Y, X) image as NGFF 0.4 (Zarr v2, the version Fiji, QuPath/Bio-Formats and napari all
read) one row band at a time, buffering only up to a whole row of chunks, with the pixel size as the level's `scale`
in micrometres and the channel names as `omero` labels.

The Zarr libraries are the optional extra `lmadda[zarr]` (ome-zarr, which brings zarr 3 and dask): imported only
here, only when an OME-Zarr path is used, and missing ones are named with the install command.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmadda.core.errors import LmaddaError
from lmadda.data.calibration import UNIT_UM, PixelSize
from lmadda.data.raw import RawImage, sensor_max_for

ZARR_SUFFIX = ".zarr"
INSTALL = "pip install 'lmadda[zarr]'"
WRITTEN_BY = "lmadda"  # the attribute that marks an OME-Zarr image lmadda wrote (and so may replace)
CHUNK = 512  # output chunks are 1 x CHUNK x CHUNK: one chunk row of a 100 000-pixel-wide uint16 slide is ~100 MB per channel
_ZARR_MARKERS = ("zarr.json", ".zgroup", ".zattrs", ".zarray")
# NGFF axis units are UDUNITS-2 names; the short forms some writers use are in calibration.UNIT_UM.
NGFF_UNIT_UM = {"angstrom": 1e-4, "picometer": 1e-6, "nanometer": 1e-3, "micrometer": 1.0, "millimeter": 1e3, "centimeter": 1e4,
                "decimeter": 1e5, "meter": 1e6, "inch": 25400.0, "foot": 304800.0}
PLANE_AXES = {"t": "time point", "z": "z-plane"}


def is_zarr(path: str | Path) -> bool:
    """Does `path` name a Zarr group: a name ending in .zarr (.ome.zarr), or a folder holding Zarr metadata (a plate's field)?"""
    path = Path(path)
    return path.name.lower().endswith(ZARR_SUFFIX) or (path.is_dir() and any((path / name).is_file() for name in _ZARR_MARKERS))


def _zarr(path: Path):
    """The zarr module, or a clear error naming the extra to install."""
    try:
        import ome_zarr.writer  # noqa: F401  (the metadata helpers; checked here so a half-installed extra fails early)
        import zarr
    except ImportError as error:
        raise LmaddaError(f"{path}: reading and writing OME-Zarr needs the optional Zarr libraries ({error.name} is not "
                          f"installed); install them with: {INSTALL}") from error
    return zarr


def _open_group(path: Path):
    """(group, its NGFF metadata with NGFF 0.5's `ome` namespace unwrapped) of an existing Zarr group."""
    zarr = _zarr(path)
    from ome_zarr.writer import get_metadata

    if not path.exists():
        raise LmaddaError(f"{path}: not found; give the folder of an OME-Zarr image (e.g. image.ome.zarr, or plate.ome.zarr/A/1/0 "
                          "for one field of a plate)")
    if not path.is_dir():
        raise LmaddaError(f"{path}: is a file, and an OME-Zarr image is a folder; give the .zarr folder itself")
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as error:  # zarr raises several types for a folder without (or with broken) group metadata
        raise LmaddaError(f"{path}: not a Zarr group ({type(error).__name__}: {error}); an OME-Zarr image is a folder with "
                          "zarr.json (NGFF 0.5) or .zgroup and .zattrs (NGFF 0.4)") from error
    return group, get_metadata(group)


# ---- images ---------------------------------------------------------------------------------------
@dataclass
class OmeZarrImage:
    """The full-resolution level of an OME-Zarr image, read on demand as float32 (C, H, W) camera units."""

    path: Path
    array: Any  # zarr.Array of the first multiscales dataset, dimensions as `axes`
    axes: tuple[str, ...]
    pixel_size: PixelSize | None
    channel_names: list[str]
    channel: int | None = None  # read only this channel (`select`); None: all of them

    @property
    def shape(self) -> tuple[int, int, int]:
        sizes = dict(zip(self.axes, self.array.shape))
        return 1 if self.channel is not None else sizes.get("c", 1), sizes["y"], sizes["x"]

    def select(self, channel: int | str) -> "OmeZarrImage":
        """The same image with one channel, by index or by its name (`channel_names`, the omero label)."""
        names = self.channel_names
        index = names.index(channel) if channel in names else None
        if index is None:
            try:
                index = int(channel)
            except (TypeError, ValueError):
                index = -1
        if not 0 <= index < len(names):
            raise LmaddaError(f"{self.path}: no channel {channel!r}; its channels are "
                              + ", ".join(f"{number} ({name})" for number, name in enumerate(names)))
        return dataclasses.replace(self, channel=index, channel_names=[names[index]])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    @property
    def chunks(self) -> tuple[int, int]:
        """(rows, columns) of one stored chunk: reads aligned to them decompress each chunk once."""
        sizes = dict(zip(self.axes, self.array.chunks))
        return sizes["y"], sizes["x"]

    def read(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        """Rows top..top+height, columns left..left+width of every channel, as float32 (C, height, width)."""
        channels = slice(None) if self.channel is None else slice(self.channel, self.channel + 1)
        region = {"y": slice(top, top + height), "x": slice(left, left + width), "c": channels}
        try:
            pixels = np.asarray(self.array[tuple(region.get(axis, 0) for axis in self.axes)])
        except Exception as error:  # a missing or corrupt chunk: name the image and the region
            raise LmaddaError(f"{self.path}: cannot read rows {top}..{top + height}, columns {left}..{left + width} "
                              f"({type(error).__name__}: {error}); is the image complete?") from error
        if "c" not in self.axes:
            pixels = pixels[None]
        pixels = pixels.astype(np.float32, copy=False)
        if not np.isfinite(pixels).all():
            raise LmaddaError(f"{self.path}: image contains NaN or infinite values (rows {top}..{top + height}); replace them before use")
        return pixels

    def read_raw(self, *, bit_depth: int | None = None):
        """The whole image as `read_image` returns a TIFF: a `RawImage` (for manifest fields, which are small)."""
        _, height, width = self.shape
        pixels = np.ascontiguousarray(self.read(0, 0, height, width))
        return RawImage(pixels=pixels, sensor_max=sensor_max_for(self.dtype, bit_depth), dtype=self.dtype.name, path=self.path,
                        pixel_size=self.pixel_size)


def _axis_names(multiscale: dict, ndim: int, path: Path) -> tuple[str, ...]:
    axes = multiscale.get("axes")
    if axes is None:  # NGFF 0.1/0.2: always 5-D t, c, z, y, x
        names = ("t", "c", "z", "y", "x")[-ndim:]
    else:
        names = tuple(str(axis["name"] if isinstance(axis, dict) else axis).lower() for axis in axes)
    if len(names) != ndim or not {"y", "x"} <= set(names) or not set(names) <= {"t", "c", "z", "y", "x"} or len(set(names)) != ndim:
        raise LmaddaError(f"{path}: axes {list(names)} do not describe its {ndim}-D array; lmadda reads images with axes among "
                          "t, c, z, y, x (y and x required), as NGFF writes them")
    return names


def _unit_um(axis: Any) -> float | None:
    unit = axis.get("unit") if isinstance(axis, dict) else None
    if not unit:
        return None
    unit = str(unit).strip().lower()
    return NGFF_UNIT_UM.get(unit, UNIT_UM.get(unit))


def _scale(transformations: list | None, ndim: int) -> list[float]:
    for transformation in transformations or []:
        if transformation.get("type") == "scale" and len(transformation.get("scale") or []) == ndim:
            return [float(value) for value in transformation["scale"]]
    return [1.0] * ndim


def _pixel_size(multiscale: dict, names: tuple[str, ...]) -> PixelSize | None:
    """The pixel size of the first dataset: its scale (times the multiscale's own, if any) along y and x, in their unit.
    None when the axes carry no (known) spatial unit: a scale of 1 without a unit is NGFF's 'uncalibrated'."""
    axes = multiscale.get("axes") or []
    ndim = len(names)
    scale = np.multiply(_scale(multiscale["datasets"][0].get("coordinateTransformations"), ndim),
                        _scale(multiscale.get("coordinateTransformations"), ndim))
    sizes = []
    for name in ("x", "y"):
        index = names.index(name)
        per = _unit_um(axes[index]) if index < len(axes) else None
        sizes.append(scale[index] * per if per is not None else None)
    if any(size is None or not (np.isfinite(size) and size > 0) for size in sizes):
        return None
    return PixelSize(float(sizes[0]), float(sizes[1]))


def _plate_hint(path: Path, metadata: dict) -> str | None:
    if "plate" in metadata:
        wells = [well.get("path") for well in metadata["plate"].get("wells", [])]
        example = f"{path}/{wells[0]}/0" if wells else f"{path}/A/1/0"
        return (f"{path}: is an HCS plate ({len(wells)} wells), not one image; give one field, e.g. {example}, or index the "
                f"plate's fields with `lmadda data index {path} --out manifest.parquet`")
    if "well" in metadata:
        images = [image.get("path") for image in metadata["well"].get("images", [])]
        return f"{path}: is a well of an HCS plate ({len(images)} fields), not one image; give one field, e.g. {path}/{images[0] if images else '0'}"
    return None


def open_image(path: str | Path) -> OmeZarrImage:
    """Open an OME-Zarr image's full-resolution level without reading its pixels."""
    path = Path(path)
    group, metadata = _open_group(path)
    hint = _plate_hint(path, metadata)
    if hint:
        raise LmaddaError(hint)
    multiscales = metadata.get("multiscales")
    if not multiscales or not multiscales[0].get("datasets"):
        raise LmaddaError(f"{path}: a Zarr group without OME-NGFF `multiscales` metadata, so not an OME-Zarr image; lmadda reads "
                          "OME-Zarr images (NGFF 0.4 or 0.5) written by ome-zarr, bioformats2raw, iohub or similar")
    multiscale = multiscales[0]
    dataset = str(multiscale["datasets"][0].get("path", ""))
    try:
        array = group[dataset]
    except Exception as error:
        raise LmaddaError(f"{path}: its multiscales metadata names the level {dataset!r}, which is not an array in the group; "
                          "the image is incomplete") from error
    names = _axis_names(multiscale, array.ndim, path)
    for axis, size in zip(names, array.shape):
        if axis in PLANE_AXES and size > 1:
            raise LmaddaError(f"{path}: has {size} {PLANE_AXES[axis]}s (axis {axis}); lmadda predicts 2-D images with channels (c, y, x): "
                              f"write one {PLANE_AXES[axis]} per image, or a projection")
    if 0 in array.shape:
        raise LmaddaError(f"{path}: no image data (shape {tuple(array.shape)}); the image is empty")
    channels = dict(zip(names, array.shape)).get("c", 1)
    labels = [str(channel.get("label", "")) for channel in (metadata.get("omero") or {}).get("channels", [])]
    channel_names = labels if len(labels) == channels and all(labels) else [f"c{index}" for index in range(channels)]
    return OmeZarrImage(path=path, array=array, axes=names, pixel_size=_pixel_size(multiscale, names), channel_names=channel_names)


# ---- plates ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlateField:
    """One field of view of an HCS plate: its well (row, column) and its image's path inside the plate."""

    row: str
    column: str
    image: str  # the field's path inside its well, e.g. "0"
    path: str  # relative to the plate folder, e.g. "A/1/0"

    @property
    def well(self) -> str:
        return f"{self.row}{self.column}"

    @property
    def field_id(self) -> str:
        """The manifest's field id: well and field, e.g. A1_0."""
        return f"{self.well}_{self.image}"


def is_plate(path: str | Path) -> bool:
    """Is `path` an OME-Zarr HCS plate (a Zarr group with `plate` metadata)?"""
    path = Path(path)
    if not (path.is_dir() and is_zarr(path)):
        return False
    return "plate" in _open_group(path)[1]


def plate_fields(path: str | Path) -> list[PlateField]:
    """Every field of every well of a plate, in the plate's well order, from the plate's and wells' metadata."""
    path = Path(path)
    _, metadata = _open_group(path)
    plate = metadata.get("plate")
    if plate is None:
        raise LmaddaError(f"{path}: no `plate` metadata, so not an OME-Zarr HCS plate; index a folder of images with --pattern instead")
    rows = [row.get("name") for row in plate.get("rows", [])]
    columns = [column.get("name") for column in plate.get("columns", [])]
    fields = []
    for well in plate.get("wells", []):
        well_path = str(well.get("path", ""))
        try:
            row, column = rows[well["rowIndex"]], columns[well["columnIndex"]]
        except (KeyError, IndexError, TypeError):
            row, _, column = well_path.partition("/")  # NGFF 0.1-0.3 wells give only their path, row/column
        if not (row and column):
            raise LmaddaError(f"{path}: well {well_path!r} has no row and column; the plate metadata is damaged")
        _, well_metadata = _open_group(path / well_path)
        images = (well_metadata.get("well") or {}).get("images", [])
        if not images:
            raise LmaddaError(f"{path / well_path}: a well without fields (no `well.images` metadata); the plate is incomplete")
        fields += [PlateField(row=str(row), column=str(column), image=str(image["path"]), path=f"{well_path}/{image['path']}")
                   for image in images]
    if not fields:
        raise LmaddaError(f"{path}: the plate lists no wells with fields")
    return fields


# ---- writing --------------------------------------------------------------------------------------
def check_output(path: Path) -> Path:
    """Refuse, before any work, an OME-Zarr output that would overwrite something lmadda did not write."""
    if path.exists():
        if not path.is_dir():
            raise LmaddaError(f"{path}: exists and is a file; an OME-Zarr output is a folder: remove it or choose another name")
        if any(path.iterdir()) and not _written_by_lmadda(path):
            raise LmaddaError(f"{path}: exists and was not written by lmadda predict; remove it or choose another name "
                              "(lmadda replaces only an OME-Zarr image it wrote itself)")
    existing = next((folder for folder in path.parents if folder.exists()), None)
    if existing is not None and not existing.is_dir():
        raise LmaddaError(f"{path}: {existing} is a file, not a folder; choose an output in a folder")
    return path


def _written_by_lmadda(path: Path) -> bool:
    try:
        return WRITTEN_BY in _open_group(path)[1]
    except LmaddaError:
        return False


class OmeZarrWriter:
    """A (C, H, W) image written to OME-Zarr as its rows arrive, top to bottom.

    Rows are buffered up to a whole row of chunks and then written, so each chunk is written once and memory holds
    one chunk row, never the image. Everything goes to a hidden `.NAME.partial` folder that replaces the output only
    when `close` succeeds (use as a context manager: an error removes it), as `write_atomically` does for files.
    """

    def __init__(self, path: str | Path, shape: tuple[int, int, int], dtype: str, *, pixel_size: PixelSize | None = None,
                 channel_names: list[str] | None = None, chunk: int = CHUNK):
        self.path = check_output(Path(path))
        zarr = _zarr(self.path)
        from ome_zarr.format import FormatV04

        self.format = FormatV04()
        self.shape, self.dtype = tuple(int(size) for size in shape), np.dtype(dtype)
        self.pixel_size, self.channel_names = pixel_size, channel_names or [f"c{index}" for index in range(shape[0])]
        channels, height, width = self.shape
        self.chunk_rows = min(chunk, height)
        self.partial = self.path.with_name(f".{self.path.name}.partial")
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.partial)  # left by a run that was killed
        try:
            self.partial.parent.mkdir(parents=True, exist_ok=True)
            self.group = zarr.open_group(str(self.partial), mode="w", zarr_format=self.format.zarr_format)
            self.array = self.group.create_array("0", shape=self.shape, dtype=self.dtype, chunks=(1, self.chunk_rows, min(chunk, width)),
                                                 chunk_key_encoding=self.format.chunk_key_encoding, fill_value=0)
        except OSError as error:
            raise LmaddaError(f"cannot write {self.path}: {error.strerror or error}") from error
        self.buffer = np.zeros((channels, self.chunk_rows, width), self.dtype)
        self.next_row = 0  # rows before it have arrived
        self.written = 0  # rows before it are in the array
        self.low = np.full(channels, np.inf)
        self.high = np.full(channels, -np.inf)

    def write_rows(self, top: int, rows: np.ndarray) -> None:
        """Rows top..top+len of every channel, (C, rows, W), already of the output's pixel type; rows come in order."""
        if top != self.next_row or rows.shape[0] != self.shape[0] or rows.shape[2] != self.shape[2] or top + rows.shape[1] > self.shape[1]:
            raise ValueError(f"rows {top}..{top + rows.shape[1]} of shape {rows.shape} do not follow row {self.next_row} of {self.shape}")
        self.low = np.minimum(self.low, rows.min(axis=(1, 2)))
        self.high = np.maximum(self.high, rows.max(axis=(1, 2)))
        start = 0
        while start < rows.shape[1]:
            offset = self.next_row - self.written
            take = min(rows.shape[1] - start, self.chunk_rows - offset)
            self.buffer[:, offset : offset + take] = rows[:, start : start + take]
            start += take
            self.next_row += take
            if self.next_row - self.written == self.chunk_rows or self.next_row == self.shape[1]:
                self._flush()

    def _flush(self) -> None:
        count = self.next_row - self.written
        try:
            self.array[:, self.written : self.next_row, :] = self.buffer[:, :count]
        except OSError as error:
            raise LmaddaError(f"cannot write {self.path}: {error.strerror or error}") from error
        self.written = self.next_row

    def close(self, metadata: dict | None = None) -> Path:
        """Write the NGFF metadata (and lmadda's `metadata`), then move the image into place."""
        from ome_zarr.writer import add_metadata, write_multiscales_metadata

        if self.written != self.shape[1]:
            raise ValueError(f"{self.path}: closed after {self.written} of {self.shape[1]} rows")
        unit = {"unit": "micrometer"} if self.pixel_size is not None else {}
        axes = [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", **unit}, {"name": "x", "type": "space", **unit}]
        scale = [1.0, self.pixel_size.y_um, self.pixel_size.x_um] if self.pixel_size is not None else [1.0, 1.0, 1.0]
        integer = self.dtype.kind in "ui"
        limits = np.iinfo(self.dtype) if integer else None
        channels = [{"label": name, "color": "FFFFFF", "active": True,
                     "window": {"min": float(limits.min) if integer else float(low), "max": float(limits.max) if integer else float(high),
                                "start": float(low), "end": float(high)}}
                    for name, low, high in zip(self.channel_names, self.low, self.high)]
        write_multiscales_metadata(self.group, [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
                                   fmt=self.format, axes=axes, name=self.path.name, metadata={"omero": {"channels": channels}})
        add_metadata(self.group, {WRITTEN_BY: metadata or {}}, fmt=self.format)
        old = self.path.with_name(f".{self.path.name}.old")
        shutil.rmtree(old, ignore_errors=True)  # left by a run that was killed between the two renames
        try:
            if self.path.exists():  # check_output allowed it: an image lmadda wrote, or an empty folder
                self.path.replace(old)
            self.partial.replace(self.path)
        except OSError as error:
            raise LmaddaError(f"cannot write {self.path}: {error.strerror or error}") from error
        finally:
            shutil.rmtree(old, ignore_errors=True)
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)

    def __enter__(self) -> "OmeZarrWriter":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is not None:
            self.abort()


def write_ome_zarr(path: str | Path, pixels: np.ndarray, *, dtype: str, metadata: dict | None = None,
                   pixel_size: PixelSize | None = None, channel_names: list[str] | None = None) -> Path:
    """Write a whole (H, W) or (C, H, W) array (already of `dtype`'s range) as an OME-Zarr image."""
    array = np.asarray(pixels)
    array = array[None] if array.ndim == 2 else array
    with OmeZarrWriter(path, array.shape, dtype, pixel_size=pixel_size, channel_names=channel_names) as writer:
        writer.write_rows(0, array.astype(dtype, copy=False))
        return writer.close(metadata)
