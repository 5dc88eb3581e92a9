"""A camera image as lmadda holds it: pixels in camera units, (C, H, W), and the value the sensor saturates at.

The readers and writers of every format (`lmadda.data.io`, `lmadda.data.omezarr`) build on these; nothing here
reads or writes a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmadda.core.errors import LmaddaError
from lmadda.data.calibration import PixelSize


@dataclass(frozen=True)
class RawImage:
    """Pixels in camera units, shaped (C, H, W), the value at which the sensor saturates, and the pixel size the file
    records (None when it records none)."""

    pixels: np.ndarray
    sensor_max: float
    dtype: str
    path: Path | None = None
    pixel_size: PixelSize | None = None

    @property
    def channels(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def shape_hw(self) -> tuple[int, int]:
        return int(self.pixels.shape[1]), int(self.pixels.shape[2])


def sensor_max_for(dtype: np.dtype, bit_depth: int | None = None) -> float:
    """The largest value a camera can store: 2**bit_depth - 1 (a 12-bit camera in uint16 saturates at 4095)."""
    dtype = np.dtype(dtype)
    if bit_depth is not None:
        if not 1 <= bit_depth <= 32:
            raise LmaddaError(f"bit_depth {bit_depth} is not a camera bit depth: use 1..32 (e.g. 8, 12, 14, 16)")
        if dtype.kind in "ui" and bit_depth > dtype.itemsize * 8:
            raise LmaddaError(
                f"bit_depth {bit_depth} does not fit in {dtype.name}: use at most {dtype.itemsize * 8}"
            )
        return float(2**bit_depth - 1)
    if dtype.kind == "u":
        return float(np.iinfo(dtype).max)
    if dtype.kind == "i":
        return float(np.iinfo(dtype).max)
    if dtype.kind == "f":
        return float("inf")  # float images have no sensor limit we can know; saturation then needs bit_depth
    if dtype.kind == "b":
        return 1.0
    raise LmaddaError(f"unsupported pixel type {dtype.name}: use unsigned integer (8/12/14/16-bit) or float images")


def clip_to_dtype(pixels: np.ndarray, dtype: str) -> np.ndarray:
    """Pixels as `dtype`: rounded and clipped to an integer type's range, or cast to a float type."""
    target_dtype = np.dtype(dtype)
    array = np.asarray(pixels)
    if target_dtype.kind in "ui":
        info = np.iinfo(target_dtype)
        array = np.clip(np.rint(array), info.min, info.max)
    return array.astype(target_dtype)
