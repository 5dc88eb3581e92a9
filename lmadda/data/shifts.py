"""Domain shifts as transforms of raw camera images, each with one magnitude knob.

A shift is named in configs and sweeps as `name:magnitude` (e.g. `overexposure:1.5`). It acts on
raw pixels in camera units, before normalisation, because that is where microscopes change:
a longer exposure saturates at the sensor maximum, a different objective changes the scale.

| name          | magnitude                          | what it models |
|---------------|------------------------------------|----------------|
| overexposure  | gain >= 1 (1.5 = 150 % exposure)    | longer exposure / higher lamp power: counts scale by the gain and clip at the sensor maximum |
| scale         | zoom factor in (0.1, 10]           | another objective or camera binning: input and target are resampled together |
| defocus       | defocus in waves (W20), >= 0       | the specimen out of the focal plane: incoherent blur by a defocused circular pupil |
| noise         | relative shot noise at full scale  | fewer photons: Poisson noise (full-scale photon count 1/m^2) plus Gaussian read noise m/10 |
| illumination  | vignetting strength in [0, 1)      | uneven illumination: intensity falls as 1 - m r^2 towards the corners |
| gamma         | exponent in [0.2, 5]               | another camera response or display curve: counts go to full * (counts / full)^m |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from lmadda.core.errors import LmaddaError


@dataclass(frozen=True)
class ShiftKind:
    name: str
    low: float
    high: float
    low_inclusive: bool
    identity: float
    changes_geometry: bool
    description: str


KINDS: dict[str, ShiftKind] = {
    k.name: k
    for k in (
        ShiftKind("overexposure", 1.0, 100.0, True, 1.0, False, "exposure gain, saturating at the sensor maximum"),
        ShiftKind("scale", 0.1, 10.0, True, 1.0, True, "zoom factor applied to input and target"),
        ShiftKind("defocus", 0.0, 50.0, True, 0.0, False, "defocus in waves of the pupil's W20 aberration"),
        ShiftKind("noise", 0.0, 1.0, True, 0.0, False, "relative shot noise at full scale"),
        ShiftKind("illumination", 0.0, 1.0, True, 0.0, False, "vignetting strength (intensity 1 - m r^2)"),
        ShiftKind("gamma", 0.2, 5.0, True, 1.0, False, "contrast exponent of the camera response"),
    )
}


@dataclass(frozen=True)
class Shift:
    """One named shift at one magnitude; `Shift.parse('overexposure:1.5')`."""

    name: str
    magnitude: float

    def __post_init__(self) -> None:
        kind = KINDS.get(self.name)
        if kind is None:
            raise LmaddaError(f"unknown shift {self.name!r}; known shifts: {', '.join(KINDS)}")
        m = self.magnitude
        below = m < kind.low if kind.low_inclusive else m <= kind.low
        if not np.isfinite(m) or below or m > kind.high:
            bracket = "[" if kind.low_inclusive else "("
            raise LmaddaError(
                f"shift {self.name}: magnitude {m} out of range; {kind.description} must lie in {bracket}{kind.low}, {kind.high}]"
            )

    @classmethod
    def parse(cls, text: str) -> "Shift":
        name, sep, value = text.partition(":")
        if not sep:
            raise LmaddaError(f"shift {text!r} must be written name:magnitude, e.g. overexposure:1.5; known shifts: {', '.join(KINDS)}")
        try:
            magnitude = float(value)
        except ValueError as error:
            raise LmaddaError(f"shift {text!r}: magnitude {value!r} is not a number") from error
        return cls(name.strip(), magnitude)

    def __str__(self) -> str:
        return f"{self.name}:{self.magnitude:g}"

    @property
    def changes_geometry(self) -> bool:
        return KINDS[self.name].changes_geometry

    @property
    def is_identity(self) -> bool:
        return self.magnitude == KINDS[self.name].identity

    def apply_input(self, pixels: np.ndarray, sensor_max: float, seed: int = 0) -> np.ndarray:
        """Shift a raw (C, H, W) input image in camera units."""
        if self.is_identity:
            return pixels
        return _INPUT_TRANSFORMS[self.name](pixels.astype(np.float32), self.magnitude, sensor_max, seed)

    def apply_target(self, pixels: np.ndarray) -> np.ndarray:
        """Shifts that move pixels (scale) move the target with the input; the others leave it alone."""
        if self.changes_geometry and not self.is_identity:
            return _rescale(pixels, self.magnitude)
        return pixels


def _saturation(sensor_max: float, pixels: np.ndarray) -> float:
    # Float images carry no sensor limit; without one, saturate where the brightest pixel was.
    return sensor_max if np.isfinite(sensor_max) else float(pixels.max())


def _overexposure(pixels: np.ndarray, gain: float, sensor_max: float, seed: int) -> np.ndarray:
    return np.minimum(pixels * gain, _saturation(sensor_max, pixels))


def _rescale(pixels: np.ndarray, factor: float) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None]
    height, width = pixels.shape[1:]
    size = (max(1, round(height * factor)), max(1, round(width * factor)))
    # antialias keeps downsampling honest (no aliasing artefacts that a real objective would not make)
    out = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=factor < 1)
    return out[0].numpy()


def _scale_input(pixels: np.ndarray, factor: float, sensor_max: float, seed: int) -> np.ndarray:
    return _rescale(pixels, factor)


def defocus_psf(shape: tuple[int, int], waves: float, pupil_fraction: float = 0.5) -> np.ndarray:
    """Incoherent PSF of a circular pupil with W20 defocus of `waves` waves at the pupil edge.

    `pupil_fraction` is the pupil radius as a fraction of the Nyquist frequency; 0.5 gives a
    diffraction-limited PSF of a few pixels, as for a well-sampled camera.
    """
    height, width = shape
    fy = np.fft.fftfreq(height)[:, None] / 0.5
    fx = np.fft.fftfreq(width)[None, :] / 0.5
    rho2 = (fx**2 + fy**2) / pupil_fraction**2
    pupil = (rho2 <= 1.0) * np.exp(2j * np.pi * waves * rho2)
    psf = np.abs(np.fft.ifft2(pupil)) ** 2
    return psf / psf.sum()


def _defocus(pixels: np.ndarray, waves: float, sensor_max: float, seed: int) -> np.ndarray:
    # Reflect-pad so the circular FFT convolution does not wrap one edge onto the other;
    # the PSF sums to 1, so mean brightness is preserved.
    pad = min(pixels.shape[1], pixels.shape[2]) // 4
    padded = np.pad(pixels, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
    otf = np.fft.fft2(defocus_psf(padded.shape[1:], waves))
    blurred = np.real(np.fft.ifft2(np.fft.fft2(padded) * otf))
    return blurred[:, pad : pad + pixels.shape[1], pad : pad + pixels.shape[2]].astype(np.float32)


def _noise(pixels: np.ndarray, level: float, sensor_max: float, seed: int) -> np.ndarray:
    full_scale = _saturation(sensor_max, pixels)
    rng = np.random.default_rng(seed)
    photons_at_full_scale = 1.0 / level**2
    photons = rng.poisson(np.clip(pixels, 0, None) / full_scale * photons_at_full_scale)
    read = rng.normal(0.0, level / 10.0, size=pixels.shape)
    noisy = (photons / photons_at_full_scale + read) * full_scale
    return np.clip(noisy, 0, full_scale).astype(np.float32)


def _illumination(pixels: np.ndarray, strength: float, sensor_max: float, seed: int) -> np.ndarray:
    height, width = pixels.shape[1:]
    y = np.linspace(-1, 1, height)[:, None]
    x = np.linspace(-1, 1, width)[None, :]
    r2 = (x**2 + y**2) / 2.0  # 1 at the corners
    return (pixels * (1.0 - strength * r2)).astype(np.float32)


def _gamma(pixels: np.ndarray, exponent: float, sensor_max: float, seed: int) -> np.ndarray:
    full_scale = _saturation(sensor_max, pixels)
    return (full_scale * np.power(np.clip(pixels, 0, full_scale) / full_scale, exponent)).astype(np.float32)


_INPUT_TRANSFORMS: dict[str, Callable[[np.ndarray, float, float, int], np.ndarray]] = {
    "overexposure": _overexposure,
    "scale": _scale_input,
    "defocus": _defocus,
    "noise": _noise,
    "illumination": _illumination,
    "gamma": _gamma,
}
