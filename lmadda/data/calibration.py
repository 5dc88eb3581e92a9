"""Physical pixel size: read from image files, kept on predictions, compared with the model's.

A generator learns structures at the scale it was trained on: a nucleus 20 pixels wide in training and
40 pixels wide at prediction is a different image to it. So lmadda
- reads each image's pixel size where the file records it: OME-XML `PhysicalSizeX/Y` (OME-TIFF), ImageJ's
  `unit` with the resolution tags, the TIFF resolution tags in centimetres or inches, PNG's pHYs chunk;
- writes the input's pixel size into the prediction (TIFF resolution tags in centimetres, PNG pHYs), so
  Fiji, napari or Bio-Formats measure the stain in micrometres as they measured the input;
- records the training pixel size in the checkpoint (`metadata["pixel_size_um"]`, from the manifest's
  `pixel_size_um` or else the training files) and warns when an input differs from it by more than a
  tolerance (`PixelSizeCheck`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from lmadda.core.errors import LmaddaError

if TYPE_CHECKING:
    import tifffile

    from lmadda.data.shifts import Shift

# Micrometres per unit, for the unit names OME, ImageJ and TIFF use.
UNIT_UM = {
    "pm": 1e-6, "nm": 1e-3, "um": 1.0, "µm": 1.0, "μm": 1.0, "\\u00b5m": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0,
    "micrometre": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6, "å": 1e-4, "angstrom": 1e-4, "in": 25400.0, "inch": 25400.0,
}
# A resolution in inches coarser than this is a screen or print default (72, 96, 300 dpi written by image editors),
# not a calibration: 1200 dpi is a 21 µm pixel, coarser than any microscope camera pixel at the specimen.
MIN_CALIBRATED_DPI = 1200.0
TIFF_INCH, TIFF_CENTIMETER = 2, 3


@dataclass(frozen=True)
class PixelSize:
    """The side of one pixel at the specimen, in micrometres, along x (columns) and y (rows)."""

    x_um: float
    y_um: float

    def __post_init__(self) -> None:
        for axis, value in (("x", self.x_um), ("y", self.y_um)):
            if not (math.isfinite(value) and value > 0):
                raise LmaddaError(f"pixel size along {axis} is {value} µm; a pixel size must be a positive number of micrometres (e.g. 0.65)")

    @classmethod
    def square(cls, um: float) -> "PixelSize":
        return cls(float(um), float(um))

    def describe(self) -> str:
        if math.isclose(self.x_um, self.y_um, rel_tol=1e-6):
            return f"{self.x_um:.4g} µm"
        return f"{self.x_um:.4g} x {self.y_um:.4g} µm"

    def as_list(self) -> list[float]:
        return [self.x_um, self.y_um]


def _um_per(unit: str | None, default: str | None = "µm") -> float | None:
    unit = (unit or default or "").strip().lower()
    return UNIT_UM.get(unit)


def _ome_pixel_size(ome_xml: str) -> PixelSize | None:
    """PhysicalSizeX/Y of the first image's Pixels (the series `read_image` decodes); µm when no unit is given (the OME default)."""
    import xml.etree.ElementTree as ElementTree

    try:
        root = ElementTree.fromstring(ome_xml)
    except ElementTree.ParseError:
        return None  # a broken OME header leaves the pixels readable: treat the size as unknown, as for a plain TIFF
    pixels = next((element for element in root.iter() if element.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None
    sizes = []
    for axis in ("X", "Y"):
        value, per = pixels.get(f"PhysicalSize{axis}"), _um_per(pixels.get(f"PhysicalSize{axis}Unit"))
        try:
            sizes.append(float(value) * per if value is not None and per is not None else None)
        except ValueError:
            sizes.append(None)
    x, y = sizes
    if x is None and y is None:
        return None
    x, y = x or y, y or x  # one axis given: OME writers that assume square pixels
    return PixelSize(x, y) if all(math.isfinite(v) and v > 0 for v in (x, y)) else None


def _from_resolution(x_per_unit: float, y_per_unit: float, um_per_unit: float, in_inches: bool) -> PixelSize | None:
    if not (x_per_unit > 0 and y_per_unit > 0):
        return None
    if in_inches and max(x_per_unit, y_per_unit) < MIN_CALIBRATED_DPI:
        return None
    return PixelSize(um_per_unit / x_per_unit, um_per_unit / y_per_unit)


def pixel_size_of_tiff(tif: "tifffile.TiffFile") -> PixelSize | None:
    """The pixel size a TIFF records, or None: OME-XML first, then ImageJ's unit, then the resolution tags."""
    try:
        return _tiff_pixel_size(tif)
    except (LmaddaError, ArithmeticError, LookupError, TypeError, ValueError):
        return None  # odd calibration tags must not make readable pixels unreadable: the size is then unknown


def _tiff_pixel_size(tif: "tifffile.TiffFile") -> PixelSize | None:
    if tif.is_ome and tif.ome_metadata:
        found = _ome_pixel_size(tif.ome_metadata)
        if found is not None:
            return found
    page = tif.pages.first if hasattr(tif.pages, "first") else tif.pages[0]
    tags = page.tags
    if "XResolution" not in tags or "YResolution" not in tags:
        return None
    x_per_unit, y_per_unit = (_rational(tags[name].value) for name in ("XResolution", "YResolution"))
    unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else TIFF_INCH  # the TIFF default is inches
    if tif.is_imagej and unit not in (TIFF_INCH, TIFF_CENTIMETER):
        # ImageJ stores pixels per `unit` with ResolutionUnit NONE and names the unit in its description.
        per = _um_per((tif.imagej_metadata or {}).get("unit"), default=None)
        return None if per is None else _from_resolution(x_per_unit, y_per_unit, per, in_inches=False)
    if unit == TIFF_CENTIMETER:
        return _from_resolution(x_per_unit, y_per_unit, 1e4, in_inches=False)
    if unit == TIFF_INCH:
        return _from_resolution(x_per_unit, y_per_unit, 25400.0, in_inches=True)
    return None  # ResolutionUnit NONE (tifffile's default (1, 1)): an aspect ratio, not a size


def _rational(value) -> float:
    if isinstance(value, tuple):
        numerator, denominator = value
        return numerator / denominator if denominator else 0.0
    return float(value)


def pixel_size_of_png(info: dict) -> PixelSize | None:
    """The pixel size a PNG's pHYs chunk records (PIL reports it as dpi when its unit is the metre), or None."""
    dpi = info.get("dpi")
    if not dpi:
        return None
    try:
        x_dpi, y_dpi = (float(value) for value in dpi)
        return _from_resolution(x_dpi, y_dpi, 25400.0, in_inches=True)
    except (LmaddaError, ArithmeticError, TypeError, ValueError):
        return None  # as for TIFF: an odd pHYs chunk leaves the size unknown


def tiff_resolution(pixel_size: PixelSize) -> dict:
    """`tifffile.imwrite` options that record `pixel_size`: pixels per centimetre, which Bio-Formats, Fiji and tifffile read."""
    return {"resolution": (1e4 / pixel_size.x_um, 1e4 / pixel_size.y_um), "resolutionunit": "CENTIMETER"}


def png_dpi(pixel_size: PixelSize) -> tuple[float, float]:
    """PIL's `dpi` save option for `pixel_size` (stored in the pHYs chunk as pixels per metre)."""
    return 25400.0 / pixel_size.x_um, 25400.0 / pixel_size.y_um


# ---- the training pixel size of a model ---------------------------------------------------------
def effective_pixel_size(pixel_size_um: float | None, shift: "Shift | None") -> float | None:
    """The pixel size of images after `shift`: a `scale:z` zoom makes each pixel z times smaller."""
    if pixel_size_um is None or shift is None or shift.name != "scale":
        return pixel_size_um
    return pixel_size_um / shift.magnitude


def model_pixel_size(metadata: dict) -> float | None:
    """The pixel size a checkpoint was trained (or adapted) at, from its metadata; None in checkpoints that predate it
    or whose data recorded none. An adapted model without its own falls back to its source model's."""
    for record in (metadata, metadata.get("source_metadata") or {}):
        value = record.get("pixel_size_um")
        if value is not None:
            return float(value)
    return None


# ---- the check at prediction --------------------------------------------------------------------
class PixelSizeCheck(BaseModel):
    """How `lmadda predict` and the endpoint compare an input's pixel size with the model's training pixel size."""

    model_config = ConfigDict(extra="forbid")

    tolerance: float = Field(0.10, gt=0, le=10, description="relative difference allowed before a warning (0.10 = 10 %)")


@dataclass(frozen=True)
class PixelSizeNote:
    """What to tell the user about an input's pixel size: a `warning` (it differs from the model's) or a `note` (one is unknown)."""

    level: Literal["warning", "note"]
    message: str


# Models already said to lack a training pixel size: "the check is skipped" is said once per model and process.
_MODELS_WITHOUT_PIXEL_SIZE: set[str] = set()


def check_pixel_size(image: PixelSize | None, model_um: float | None, *, image_name: str, model_name: str,
                     check: PixelSizeCheck = PixelSizeCheck()) -> PixelSizeNote | None:
    """A warning when `image`'s pixel size differs from the model's by more than `check.tolerance` (the larger over the
    smaller, minus 1, on either axis), with the scale shift and the resampling that would fix it; a note when either is
    unknown (once per model for a model that records none); None when they agree."""
    if model_um is None:
        if model_name in _MODELS_WITHOUT_PIXEL_SIZE:
            return None
        _MODELS_WITHOUT_PIXEL_SIZE.add(model_name)
        return PixelSizeNote("note", f"{model_name} does not record the pixel size it was trained at (trained before lmadda "
                                     "recorded it, or its manifest had no pixel_size_um); the pixel-size check is skipped")
    if image is None:
        return PixelSizeNote("note", f"{image_name} does not record its pixel size; {model_name} was trained at {model_um:.4g} µm: "
                                     f"make sure the image matches, or state its pixel size (`lmadda predict --pixel-size UM`)")
    worst = max((image.x_um, image.y_um), key=lambda size: max(size / model_um, model_um / size))
    difference = max(worst / model_um, model_um / worst) - 1
    if difference <= check.tolerance:
        return None
    zoom = model_um / worst  # how much larger things look in this image than in training
    adapt = (f"adapt the model to this scale (`lmadda adapt {model_name} --setting SOURCE_SETTING --shift scale:{zoom:.3g} ...` "
             "simulates it from its source images)" if 0.1 <= zoom <= 10 else "train a model at this pixel size")
    return PixelSizeNote("warning", f"{image_name} has {image.describe()} pixels, {model_name} was trained at {model_um:.4g} µm "
                                    f"({difference:.0%} apart, tolerance {check.tolerance:.0%}): its stain may be unreliable. "
                                    f"Resample the image by {1 / zoom:.3g} to {model_um:.4g} µm pixels before predicting, or {adapt}")


def parse_pixel_size(text: str) -> PixelSize:
    """`--pixel-size`: one number (square pixels) or X,Y, in micrometres."""
    parts = [part for part in re.split(r"[,x ]+", text.strip()) if part]
    try:
        values = [float(part) for part in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        raise LmaddaError(f"pixel size {text!r} must be micrometres per pixel, e.g. 0.65 or 0.65,0.65 (x,y)")
    return PixelSize(values[0], values[-1])
