"""Per-image percentile normalisation, invertible so predictions map back to camera units.

Each image is mapped so that its `low` percentile goes to 0 and its `high` percentile to 1 (the
CSBDeep convention). The two values are kept with the image: a prediction in normalised units
becomes camera counts again with `denormalise`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmadda.core.errors import LmaddaError

# Below this spread an image is treated as flat: normalising it would amplify noise into garbage.
_MIN_SPREAD = 1e-6


@dataclass(frozen=True)
class PercentileRange:
    """Which percentiles define 0 and 1."""

    low: float = 1.0
    high: float = 99.8

    def __post_init__(self) -> None:
        if not (0.0 <= self.low < self.high <= 100.0):
            raise LmaddaError(
                f"percentiles low={self.low}, high={self.high} are invalid: need 0 <= low < high <= 100 (default 1, 99.8)"
            )


@dataclass(frozen=True)
class NormalisationParams:
    """The camera values that became 0 and 1, one pair per channel."""

    offset: tuple[float, ...]
    scale: tuple[float, ...]

    def to_dict(self) -> dict:
        return {"offset": list(self.offset), "scale": list(self.scale)}

    @classmethod
    def from_dict(cls, data: dict) -> "NormalisationParams":
        return cls(offset=tuple(float(v) for v in data["offset"]), scale=tuple(float(v) for v in data["scale"]))


def normalise(pixels: np.ndarray, percentiles: PercentileRange = PercentileRange()) -> tuple[np.ndarray, NormalisationParams]:
    """Normalise each channel of a (C, H, W) image by its own percentiles; return the image and the params."""
    if pixels.ndim != 3:
        raise LmaddaError(f"normalise expects (C, H, W) pixels, got shape {pixels.shape}")
    flat = pixels.reshape(pixels.shape[0], -1).astype(np.float64)
    params = params_from_percentiles(np.percentile(flat, percentiles.low, axis=1), np.percentile(flat, percentiles.high, axis=1))
    return apply_normalisation(pixels, params), params


def params_from_percentiles(lows: np.ndarray, highs: np.ndarray) -> NormalisationParams:
    """The normalisation that maps each channel's low percentile to 0 and its high one to 1 (a flat channel's spread
    floored); `lmadda.data.bands.percentiles` gives them for an image too large to hold."""
    scales = np.maximum(np.asarray(highs) - np.asarray(lows), _MIN_SPREAD)
    return NormalisationParams(offset=tuple(float(v) for v in lows), scale=tuple(float(v) for v in scales))


def apply_normalisation(pixels: np.ndarray, params: NormalisationParams) -> np.ndarray:
    """Normalise with known parameters (e.g. the training set's typical target range)."""
    offset = np.asarray(params.offset, dtype=np.float32)[:, None, None]
    scale = np.asarray(params.scale, dtype=np.float32)[:, None, None]
    return ((pixels - offset) / scale).astype(np.float32)


def denormalise(normalised: np.ndarray, params: NormalisationParams) -> np.ndarray:
    """Invert `normalise`: normalised units back to camera units."""
    offset = np.asarray(params.offset, dtype=np.float32)[:, None, None]
    scale = np.asarray(params.scale, dtype=np.float32)[:, None, None]
    return (normalised * scale + offset).astype(np.float32)


def median_params(params: list[NormalisationParams]) -> NormalisationParams:
    """The typical range over many images, used to map predictions of a marker back to camera units."""
    if not params:
        raise LmaddaError("cannot summarise normalisation of zero images")
    offsets = np.median(np.array([p.offset for p in params]), axis=0)
    scales = np.median(np.array([p.scale for p in params]), axis=0)
    return NormalisationParams(offset=tuple(map(float, offsets)), scale=tuple(map(float, scales)))


__all__ = [
    "NormalisationParams",
    "PercentileRange",
    "apply_normalisation",
    "denormalise",
    "median_params",
    "normalise",
    "params_from_percentiles",
]
