"""Reading and writing microscopy images.

Everything is read as float32 in the camera's own units (no rescaling), shaped (C, H, W), plus the
sensor maximum the stored values can reach, because overexposure saturates at that value, and the
physical pixel size where the file records one (`lmadda.data.calibration`); writers keep it.
TIFF and PNG are files; an OME-Zarr image is a folder (`lmadda.data.omezarr`, the optional extra
`lmadda[zarr]`), read here whole and by `lmadda predict` region by region.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import tifffile

from lmadda.core.atomic import write_atomically
from lmadda.core.errors import LmaddaError
from lmadda.data.calibration import PixelSize, pixel_size_of_png, pixel_size_of_tiff, png_dpi, tiff_resolution
from lmadda.data.raw import RawImage, clip_to_dtype, sensor_max_for

TIFF_SUFFIXES = (".tif", ".tiff")
PNG_SUFFIXES = (".png",)
SUPPORTED_SUFFIXES = TIFF_SUFFIXES + PNG_SUFFIXES  # image files; OME-Zarr images are folders (.zarr, .ome.zarr)
ZARR_NAME = ".ome.zarr"


def _to_chw(array: np.ndarray, path: Path, channel_axis: int | None) -> np.ndarray:
    """Bring a 2-D, 3-D (pages or channels) image to (C, H, W)."""
    # Drop size-1 axes in front (T, Z, S...) but never the two image axes, even a 1-pixel-high one.
    while array.ndim > 2 and 1 in array.shape[:-2]:
        array = np.squeeze(array, axis=array.shape[:-2].index(1))
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        return array[None]
    if array.ndim == 3:
        if channel_axis is None:
            # Colour/interleaved data puts a small axis last (RGB, YXS); pages and OME put it first.
            channel_axis = 2 if array.shape[2] <= 4 and array.shape[0] > 4 else 0
        return np.moveaxis(array, channel_axis, 0)
    raise LmaddaError(
        f"{path}: image has {array.ndim} dimensions after dropping size-1 axes (shape {array.shape}); "
        "lmadda reads 2-D images with optional channels or pages (C, H, W). Split time points or z-planes into separate files."
    )


def read_image(path: str | Path, *, bit_depth: int | None = None, channel_axis: int | None = None) -> RawImage:
    """Read a TIFF (8/16-bit, float, multi-page, multi-channel, OME), PNG or OME-Zarr image as (C, H, W) float32.

    `bit_depth` says how many bits the camera really used when that is fewer than the storage type
    (12- or 14-bit cameras store uint16); it sets the saturation value used by the overexposure shift.
    An OME-Zarr image names its axes, so `channel_axis` does not apply to it.
    """
    from lmadda.data.omezarr import is_zarr, open_image

    path = Path(path)
    if is_zarr(path):
        return open_image(path).read_raw(bit_depth=bit_depth)
    if not path.exists():
        raise LmaddaError(f"{path}: file not found")
    if path.is_dir():
        raise LmaddaError(f"{path}: is a folder, expected an image file ({', '.join(SUPPORTED_SUFFIXES)}) or an OME-Zarr image "
                          f"folder ({ZARR_NAME})")
    suffix = path.suffix.lower()
    if suffix not in TIFF_SUFFIXES + PNG_SUFFIXES:
        raise LmaddaError(f"{path}: unsupported file type {suffix or '(none)'}; lmadda reads {', '.join(SUPPORTED_SUFFIXES)}")
    return decode_image(path.read_bytes(), "tiff" if suffix in TIFF_SUFFIXES else "png", str(path),
                        bit_depth=bit_depth, channel_axis=channel_axis, path=path)


def decode_image(data: bytes, kind: str, name: str, *, bit_depth: int | None = None, channel_axis: int | None = None,
                 path: Path | None = None) -> RawImage:
    """Decode TIFF or PNG bytes (`kind` 'tiff' or 'png') as `read_image` does; `name` labels errors."""
    if not data:
        raise LmaddaError(f"{name}: no image data (0 bytes); send or export the image again")
    try:
        if kind == "tiff":
            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                array = tif.asarray()  # the first series, as tifffile.imread reads it
                pixel_size = pixel_size_of_tiff(tif)
        elif kind == "png":
            from PIL import Image

            with Image.open(io.BytesIO(data)) as image:
                array = np.asarray(image)
                pixel_size = pixel_size_of_png(image.info)
        else:
            raise LmaddaError(f"{name}: unsupported image kind {kind!r}; use 'tiff' or 'png'")
    except LmaddaError:
        raise
    except Exception as error:  # tifffile/PIL raise many types for truncated or foreign files
        raise LmaddaError(f"{name}: cannot read image ({type(error).__name__}: {error}); is the file complete and a real TIFF/PNG?") from error
    if array.size == 0:
        raise LmaddaError(f"{name}: no image data (shape {array.shape}); the file is empty or corrupt, export it again")
    sensor_max = sensor_max_for(array.dtype, bit_depth)
    chw = _to_chw(array, Path(name), channel_axis).astype(np.float32, copy=False)
    if not np.isfinite(chw).all():
        raise LmaddaError(f"{name}: image contains NaN or infinite values; replace them before use")
    return RawImage(pixels=np.ascontiguousarray(chw), sensor_max=sensor_max, dtype=array.dtype.name, path=path, pixel_size=pixel_size)


def read_pixel_size(path: str | Path) -> PixelSize | None:
    """The pixel size an image file records, reading its header only (no pixels); None when it records none or
    cannot be read (reading the image itself then says what is wrong)."""
    from lmadda.data.omezarr import is_zarr, open_image

    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if is_zarr(path):
            return open_image(path).pixel_size  # the metadata only; the pixels stay on disk
        if suffix in TIFF_SUFFIXES:
            with tifffile.TiffFile(path) as tif:
                return pixel_size_of_tiff(tif)
        if suffix in PNG_SUFFIXES:
            from PIL import Image

            with Image.open(path) as image:  # PIL reads the header here, the pixels only on demand
                return pixel_size_of_png(image.info)
    except Exception:  # tifffile/PIL/zarr raise many types for foreign files; the size is then unknown, not an error here
        return None
    return None


def check_image_output(path: str | Path, *, channels: int = 1, dtype: str = "uint16") -> Path:
    """Refuse, before any work, an output that cannot be written as the image its extension names."""
    from lmadda.data.omezarr import check_output

    path = Path(path)
    suffix = path.suffix.lower()
    if path.name.lower().endswith(".zarr"):
        return check_output(path)  # any channels and pixel type; an existing folder only if lmadda wrote it
    if path.is_dir():
        raise LmaddaError(f"{path} is a folder; name the output image file, e.g. {path / 'stain.tif'}")
    existing = next((folder for folder in path.parents if folder.exists()), None)
    if existing is not None and not existing.is_dir():
        raise LmaddaError(f"{path}: {existing} is a file, not a folder; choose an output in a folder")
    if suffix not in SUPPORTED_SUFFIXES:
        raise LmaddaError(f"{path}: cannot write {suffix or 'a file without extension'}; lmadda writes "
                          f"{', '.join(SUPPORTED_SUFFIXES)} (TIFF for any number of markers and pixel types) or {ZARR_NAME} "
                          "(OME-Zarr, written chunk by chunk for whole slides and plates)")
    if suffix in PNG_SUFFIXES:
        if channels != 1:
            raise LmaddaError(f"{path}: a PNG holds one grey channel, and this image has {channels} (one per marker); "
                              "write a .tif, or use a single-marker model")
        if np.dtype(dtype).name not in ("uint8", "uint16"):
            raise LmaddaError(f"{path}: a PNG holds 8- or 16-bit integers, and this image is {np.dtype(dtype).name}; write a .tif")
    return path


Named = tuple[str, "str | Path | None"]  # (how the user gave it, e.g. --out, OUT, --manifest; the path)


def refuse_overwriting_inputs(outputs: Iterable[Named], inputs: Iterable[Named], *, fix: str | None = None) -> None:
    """Refuse, before any work, to write an output over one of the command's own inputs: no command does that.

    An output collides with an input when both are one file once links are followed (`Path.resolve` follows symbolic
    links, `os.path.samefile` catches hard links where both exist), or when the output is a folder that holds the
    input (writing it would replace the input too). A command passes the paths it will replace as a whole: files,
    or an OME-Zarr folder; not a folder it only writes named files into. None paths are skipped. The error names
    both paths and says what to do: `fix`, by default "choose another <the output's name>"."""
    known = [(name, Path(path), Path(path).resolve()) for name, path in inputs if path is not None]
    for out_name, out in outputs:
        if out is None:
            continue
        out = Path(out)
        target = out.resolve()
        for in_name, path, source in known:
            holds = target in source.parents
            if not (target == source or holds or _same_file(out, path)):
                continue
            if holds:
                how = " (it is a folder that holds it)"
            else:
                how = "" if out.absolute() == path.absolute() else " (the same file through a link)"
            raise LmaddaError(f"{out_name} {out} would overwrite the input {in_name} {path}{how}; "
                              f"{fix or f'choose another {out_name}'}")


def _same_file(one: Path, other: Path) -> bool:
    try:
        return one.exists() and other.exists() and os.path.samefile(one, other)
    except OSError:
        return False


def write_image(path: str | Path, pixels: np.ndarray, *, dtype: str = "uint16", metadata: dict | None = None,
                pixel_size: PixelSize | None = None) -> Path:
    """Write (H, W) or (C, H, W) pixels in the format the extension names: TIFF (.tif/.tiff), PNG (.png) or OME-Zarr
    (.zarr, .ome.zarr), recording `pixel_size` when given."""
    array = np.asarray(pixels)
    check_image_output(path, channels=array.shape[0] if array.ndim == 3 else 1, dtype=dtype)
    if Path(path).name.lower().endswith(".zarr"):
        from lmadda.data.omezarr import write_ome_zarr

        return write_ome_zarr(path, clip_to_dtype(array, dtype), dtype=dtype, metadata=metadata, pixel_size=pixel_size)
    if Path(path).suffix.lower() in PNG_SUFFIXES:
        return write_png(path, array, dtype=dtype, metadata=metadata, pixel_size=pixel_size)
    return write_tiff(path, array, dtype=dtype, metadata=metadata, pixel_size=pixel_size)


def write_tiff(
    path: str | Path,
    pixels: np.ndarray,
    *,
    dtype: str = "uint16",
    metadata: dict | None = None,
    ome: bool = False,
    pixel_size: PixelSize | None = None,
) -> Path:
    """Write a (H, W) or (C, H, W) array as TIFF, clipping to the range of an integer `dtype`.

    `pixel_size` goes into the resolution tags (pixels per centimetre) and, for OME-TIFF, into
    PhysicalSizeX/Y too. The write goes to a temporary file first and is renamed into place, so an
    interrupted write never leaves a truncated image where a good one was.
    """
    array = clip_to_dtype(pixels, dtype)
    kwargs: dict = tiff_resolution(pixel_size) if pixel_size is not None else {}
    if ome:
        kwargs["ome"] = True
        kwargs["metadata"] = {"axes": "CYX" if array.ndim == 3 else "YX", **(metadata or {})}
        if pixel_size is not None:
            kwargs["metadata"].update(PhysicalSizeX=pixel_size.x_um, PhysicalSizeXUnit="µm",
                                      PhysicalSizeY=pixel_size.y_um, PhysicalSizeYUnit="µm")
    else:
        kwargs["metadata"] = metadata or None
        kwargs["photometric"] = "minisblack"
    return write_atomically(Path(path), lambda temporary: tifffile.imwrite(temporary, array, **kwargs))


def write_png(path: str | Path, pixels: np.ndarray, *, dtype: str = "uint16", metadata: dict | None = None,
              pixel_size: PixelSize | None = None) -> Path:
    """Write one grey channel as an 8- or 16-bit PNG (clipped like `write_tiff`); metadata as text chunks,
    `pixel_size` in the pHYs chunk."""
    import json

    from PIL import Image, PngImagePlugin

    array = np.asarray(pixels)
    check_image_output(path, channels=array.shape[0] if array.ndim == 3 else 1, dtype=dtype)
    array = clip_to_dtype(array.reshape(array.shape[-2:]), dtype)
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    image = Image.fromarray(array)  # uint8 -> mode L, uint16 -> mode I;16
    options = {"dpi": png_dpi(pixel_size)} if pixel_size is not None else {}
    return write_atomically(Path(path), lambda temporary: image.save(temporary, format="PNG", pnginfo=info, **options))
