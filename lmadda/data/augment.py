"""Imaging-nuisance augmentation: the robust source model a lab would train instead of adapting.

Cytoland/VisCy (Liu et al., Nature Machine Intelligence 2025) trains virtual staining with input
augmentations of the imaging nuisances (contrast, intensity, noise, blur, affine scale) and claims
robustness to imaging parameters. `NuisanceAugmentation` replays the same nuisances, plus sensor
saturation, which none of its recipes models, with the physics of `lmadda.data.shifts`: each
augmented copy of a training field is the raw camera image put through a random chain of shifts,
*then* normalised per image, exactly as a shifted target image is. So an augmentation covers a
target shift when it draws that shift at that magnitude (`covers`).

Intensity scale and offset are not separate nuisances here: per-image percentile normalisation
removes them exactly, except where they clip, which is what `overexposure` models. The target
(fluorescence) is never augmented, except by zoom, which moves both images together.

Magnitudes are in camera units, so what a draw does depends on where the camera put the image. A
16-bit bright field a few thousand counts below saturation (ColiCoords) turns white at gain 1.05, and
noise or vignetting at a few per cent of full scale drowns its whole contrast; the same draws leave a
12-bit phase image sitting mid-range recognisable. A copy that no longer shows its field teaches the
model only to guess. With `min_similarity` set, each copy's intensity nuisances (`INTENSITY`) are
redrawn until the copy still correlates with its field under the same optics at least that much
(Pearson of the pixels), at most `REDRAWS` times; then the copy keeps its optics alone (a copy that drew
no zoom or defocus is then a second clean copy). The check draws its own noise, another realisation of
the same level as the copy trained on. The rule needs no target and no label, only the camera's own
images. It is off by default: on cameras whose images
fill their range the strong draws it would drop are what made the robust model robust
(`lmadda.training.robust` turns it on only for a robust model that failed its admission).

Copies are drawn once, when the images load (`variants`), from the augmentation's own seed: the same
config gives the same training set, bit for bit, and the checkpoint records the config
(`SourceTrainConfig.augment`).
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from lmadda.core.errors import LmaddaError
from lmadda.data.shifts import Shift

# Application order: optics first (zoom, defocus, vignetting), then the camera (gain with saturation,
# shot and read noise, response curve), as light reaches the sensor.
ORDER = ("scale", "defocus", "illumination", "overexposure", "noise", "gamma")
# Ranges drawn log-uniformly (multiplicative knobs: x2 and x0.5 are equally far from 1).
LOG_UNIFORM = ("scale", "overexposure", "gamma")
# The nuisances that change intensities only, judged by `min_similarity`; zoom and defocus change what the field
# looks like by design (a defocused phase image may invert its contrast) and are never redrawn.
INTENSITY = ("illumination", "overexposure", "noise", "gamma")
# Draws of a copy's intensity nuisances before it keeps its optics alone.
REDRAWS = 8

Range = tuple[float, float]


class NuisanceAugmentation(BaseModel):
    """Input-only augmentation of source training fields by random chains of imaging shifts.

    Each nuisance has a magnitude range (None: never drawn). Every training field keeps its clean
    copy and gains `copies` augmented ones; each augmented copy draws each nuisance with
    `probability` (at least one per copy), its magnitude uniformly (log-uniformly for gain, zoom and
    gamma) in its range."""

    model_config = ConfigDict(extra="forbid")

    copies: int = Field(3, ge=1, le=32, description="augmented copies of each training field, beside its clean copy")
    probability: float = Field(0.5, gt=0, le=1, description="chance that a copy draws each nuisance")
    overexposure: Range | None = Field((1.0, 4.0), description="gain with clipping at the sensor maximum")
    gamma: Range | None = Field((0.6, 1.6), description="contrast exponent")
    noise: Range | None = Field((0.0, 0.05), description="Poisson-Gaussian noise level at full scale")
    defocus: Range | None = Field((0.0, 1.0), description="defocus in waves (W20)")
    scale: Range | None = Field((0.5, 1.5), description="zoom: blur (anti-aliasing), then rescale, input and target together")
    illumination: Range | None = Field((0.0, 0.4), description="uneven illumination (vignetting strength)")
    min_size: int = Field(256, ge=1, description="a zoom never makes a field smaller than this (pixels): crops and tiles fit")
    min_similarity: float | None = Field(None, gt=0, lt=1, description="redraw a copy's intensity nuisances while its pixels "
                                                                       "correlate with its field under the same optics below this "
                                                                       "(None: keep every draw)")
    seed: int = 0

    @model_validator(mode="after")
    def _ranges_valid(self) -> "NuisanceAugmentation":
        if not self.nuisances:
            raise ValueError("augment: every nuisance is off; give at least one range, or leave augment out")
        for name in self.nuisances:
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"augment.{name}: range [{low}, {high}] runs backwards; write [low, high]")
            for value in (low, high):
                try:
                    Shift(name, value)  # names the shift's own valid range when a bound lies outside it
                except LmaddaError as error:
                    raise ValueError(f"augment.{name}: {error}") from None
            if name in LOG_UNIFORM and low <= 0:
                raise ValueError(f"augment.{name}: {low} must be above 0 (drawn log-uniformly)")
        return self

    @property
    def nuisances(self) -> list[str]:
        return [name for name in ORDER if getattr(self, name) is not None]

    def draw(self, rng: np.random.Generator) -> list[Shift]:
        """One augmented copy's chain of shifts, in application order (never empty)."""
        chosen = [name for name in self.nuisances if rng.random() < self.probability]
        if not chosen:
            chosen = [self.nuisances[int(rng.integers(len(self.nuisances)))]]
        chain = []
        for name in ORDER:
            if name not in chosen:
                continue
            low, high = getattr(self, name)
            if name in LOG_UNIFORM:
                magnitude = math.exp(rng.uniform(math.log(low), math.log(high)))
            else:
                magnitude = float(rng.uniform(low, high))
            chain.append(Shift(name, magnitude))
        return chain

    def variants(self, field_number: int, raw: np.ndarray | None = None, sensor_max: float = math.inf) -> list[list[Shift]]:
        """The shift chains of one training field: its clean copy (no shift), then `copies` augmented ones. With the
        field's raw (C, H, W) pixels, a zoom that would leave it smaller than `min_size` is drawn up to that size, and
        intensity nuisances that leave a copy unrecognisable are redrawn (`min_similarity`)."""
        rng = np.random.default_rng([self.seed, field_number])
        chains = []
        for copy_number in range(self.copies):
            chain = self.draw(rng)
            if raw is not None:
                chain = self._fitted(chain, raw.shape[1:])
                if self.min_similarity is not None:
                    seed = self.seed * 1_000_003 + field_number * 101 + copy_number
                    chain = self._recognisable_chain(chain, raw, sensor_max, rng, seed)
            chains.append(chain)
        return [[]] + chains

    def _recognisable_chain(self, chain: list[Shift], raw: np.ndarray, sensor_max: float, rng: np.random.Generator,
                            seed: int) -> list[Shift]:
        """`chain` with its intensity nuisances redrawn until the copy is recognisable; its optics alone if none is."""
        optics = [shift for shift in chain if shift.name not in INTENSITY]
        reference = apply_chain(raw, optics, sensor_max, seed) if optics else raw  # the field under this copy's optics
        for redraws in range(REDRAWS + 1):  # the first draw, then up to REDRAWS redraws, each checked
            if redraws:
                redrawn = [shift for shift in self.draw(rng) if shift.name in INTENSITY]
                chain = sorted(optics + redrawn, key=lambda shift: ORDER.index(shift.name))
            if self.recognisable(reference, [shift for shift in chain if shift.name in INTENSITY], sensor_max, seed):
                return chain
        return optics

    def _fitted(self, chain: list[Shift], shape: tuple[int, ...]) -> list[Shift]:
        floor = min(1.0, self.min_size / min(shape))
        return [Shift("scale", max(shift.magnitude, floor)) if shift.name == "scale" else shift for shift in chain]

    def recognisable(self, reference: np.ndarray, intensity: list[Shift], sensor_max: float, seed: int) -> bool:
        """Whether the `intensity` nuisances leave a field recognisable: the copy's pixels correlate with `reference`
        (the raw field under the copy's optics) at least `min_similarity`. A copy saturated flat correlates with nothing."""
        if self.min_similarity is None or not intensity:
            return True
        copy = apply_chain(reference, intensity, sensor_max, seed).reshape(-1).astype(np.float64)
        flat = reference.reshape(-1).astype(np.float64)
        if flat.std() == 0 or copy.std() == 0:
            return bool(copy.std() == flat.std())  # a blank field stays itself; a field turned blank is lost
        return float(np.corrcoef(flat, copy)[0, 1]) >= self.min_similarity

    def for_validation(self) -> "NuisanceAugmentation":
        """The augmentation of a robust model's validation fields: one copy each, another draw. A robust model keeps its
        best epoch by Pearson on the clean validation fields and these copies together: robustness and in-domain
        accuracy both count, and no target is looked at."""
        return self.model_copy(update={"seed": self.seed + 1, "copies": 1})

    def covers(self, shift: Shift | None) -> bool:
        """Whether this augmentation replays `shift`: it draws that nuisance, over a range holding its magnitude.
        A change of setting (another contrast, another experiment) is never covered: pass its shift, or None."""
        if shift is None or shift.name not in self.nuisances:
            return False
        low, high = getattr(self, shift.name)
        return low <= shift.magnitude <= high


def apply_chain(pixels: np.ndarray, chain: list[Shift], sensor_max: float, seed: int) -> np.ndarray:
    """A raw (C, H, W) input image in camera units through each shift of `chain` in turn."""
    for number, shift in enumerate(chain):  # the first shift draws from `seed` itself: a lone shift is as it always was
        pixels = shift.apply_input(pixels, sensor_max, seed=seed if number == 0 else seed * 31 + number)
    return pixels


def apply_chain_to_target(pixels: np.ndarray, chain: list[Shift]) -> np.ndarray:
    """The target moves with the input's geometry (zoom) and nothing else."""
    for shift in chain:
        pixels = shift.apply_target(pixels)
    return pixels
