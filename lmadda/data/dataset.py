"""PyTorch datasets over a manifest: paired crops for training, deterministic tiles for evaluation,
unpaired input crops for the target domain of adaptation.

Images are read once, shifted in camera units (if a shift is given), normalised per image, and kept
in memory as float32 (C, H, W). Inputs map from normalised 0..1 to -1..1 (not clipped). Targets are
clipped to 0..1 and mapped to -0.8..0.8, not -1..1: the generator ends in Tanh, and fluorescence is
mostly background, so at -1 nearly every target pixel would sit at Tanh's saturation, where its
gradient vanishes; the model then settles on "background everywhere" and sparse stains such as DAPI
are never learnt (seen on the simulated data: L1 stuck at the all-background value).

Every dataset is map-style and index-deterministic: item i of epoch e is drawn from a generator
seeded by (seed, e, i), so results do not depend on worker count or on `DistributedSampler`'s split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from lmadda.core.errors import LmaddaError
from lmadda.data.augment import NuisanceAugmentation, apply_chain, apply_chain_to_target
from lmadda.data.io import read_image
from lmadda.data.manifest import Manifest, ManifestRow
from lmadda.data.normalise import NormalisationParams, PercentileRange, normalise
from lmadda.data.shifts import Shift


TARGET_HEADROOM = 0.8  # targets span -0.8..0.8 of Tanh's -1..1 (see the module docstring)


def to_model_range(normalised: np.ndarray) -> np.ndarray:
    """Input images: normalised 0..1 -> -1..1."""
    return normalised * 2.0 - 1.0


def target_to_model_range(normalised: np.ndarray) -> np.ndarray:
    """Target stains: normalised 0..1 (clipped) -> -0.8..0.8."""
    return (np.clip(normalised, 0.0, 1.0) * 2.0 - 1.0) * TARGET_HEADROOM


def target_from_model_range(model_values: np.ndarray) -> np.ndarray:
    """Generator output -> normalised target units (0..1 for the training range; may exceed it slightly)."""
    return (model_values / TARGET_HEADROOM + 1.0) / 2.0


@dataclass
class LoadedImage:
    """One field ready for a model: input (C_in, H, W) and, if paired, target (C_out, H, W), both in [-1, 1] units."""

    field: str
    input: np.ndarray
    input_norm: NormalisationParams
    target: np.ndarray | None = None
    target_norm: NormalisationParams | None = None


def spread(images: list[LoadedImage], count: int) -> list[LoadedImage]:
    """At most `count` of `images`, evenly spread over the list (fields come in order, so over the fields)."""
    return images[:: max(1, len(images) // count)][:count]


def _read_channel(manifest: Manifest, row: ManifestRow) -> tuple[np.ndarray, float]:
    image = read_image(manifest.resolve(row), bit_depth=row.bit_depth)
    if row.channel_index >= image.channels:
        raise LmaddaError(f"{image.path}: channel_index {row.channel_index} requested but the file has {image.channels} channel(s)")
    return image.pixels[row.channel_index : row.channel_index + 1], image.sensor_max


def load_images(
    manifest: Manifest,
    setting: str,
    split: str,
    markers: list[str] | None = None,
    shift: Shift | None = None,
    percentiles: PercentileRange = PercentileRange(),
    seed: int = 0,
    augment: NuisanceAugmentation | None = None,
) -> list[LoadedImage]:
    """Read, shift, normalise. With `markers`, fields come paired with their targets; without, input only.

    `augment` (source training): each field comes as its clean copy and then its augmented copies, each
    put through its own chain of imaging shifts in camera units before normalisation (`lmadda.data.augment`);
    copies are named `<field>~aug<k>`."""
    loaded = []
    if markers:
        entries = [(row, targets) for row, targets in manifest.pairs(setting, markers, split)]
    else:
        entries = [(row, []) for row in manifest.inputs(setting, split)]
    for number, (input_row, target_rows) in enumerate(entries):
        raw, sensor_max = _read_channel(manifest, input_row)
        targets = []
        for target_row in target_rows:
            pixels, _ = _read_channel(manifest, target_row)
            if pixels.shape[1:] != raw.shape[1:]:
                raise LmaddaError(
                    f"field {input_row.field}: input {manifest.resolve(input_row)} is {raw.shape[1]}x{raw.shape[2]} but target "
                    f"{manifest.resolve(target_row)} is {pixels.shape[1]}x{pixels.shape[2]}; paired images must be registered and the same size"
                )
            targets.append(pixels)
        chains = augment.variants(number, raw, sensor_max) if augment is not None else [[]]
        for copy_number, chain in enumerate(chains):
            chain = ([shift] if shift is not None else []) + chain
            name = input_row.field if copy_number == 0 else f"{input_row.field}~aug{copy_number}"
            loaded.append(_prepared(name, raw, sensor_max, targets, chain, percentiles, seed * 100_003 + number + 7919 * copy_number))
    return loaded


def _prepared(name: str, raw: np.ndarray, sensor_max: float, targets: list[np.ndarray], chain: list[Shift],
              percentiles: PercentileRange, seed: int) -> LoadedImage:
    """One field through its chain of shifts (camera units), then normalised per image."""
    shifted = apply_chain(raw, chain, sensor_max, seed) if chain else raw
    input_normalised, input_norm = normalise(shifted, percentiles)
    item = LoadedImage(field=name, input=to_model_range(input_normalised).astype(np.float32), input_norm=input_norm)
    if targets:
        channels = [apply_chain_to_target(pixels, chain)[0] for pixels in targets]
        if channels[0].shape != shifted.shape[1:]:
            raise LmaddaError(f"field {name}: input and target sizes differ after shifts {', '.join(map(str, chain))}")
        target_normalised, target_norm = normalise(np.stack(channels), percentiles)
        item.target = target_to_model_range(target_normalised).astype(np.float32)
        item.target_norm = target_norm
    return item


def _check_crop(images: list[LoadedImage], crop_size: int) -> None:
    if not images:
        raise LmaddaError("no images to sample crops from")
    for image in images:
        height, width = image.input.shape[1:]
        if height < crop_size or width < crop_size:
            raise LmaddaError(f"field {image.field} is {height}x{width}, smaller than the crop size {crop_size}; use a smaller crop_size")


class _SeededCrops(Dataset):
    def __init__(self, images: list[LoadedImage], crop_size: int, length: int, seed: int, flips: bool):
        _check_crop(images, crop_size)
        if length < 1:
            raise LmaddaError(f"samples per epoch must be >= 1, got {length}")
        self.images, self.crop_size, self.length, self.seed, self.flips = images, crop_size, length, seed, flips
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """New crops each epoch, reproducibly (call it as you would DistributedSampler.set_epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def _window(self, index: int) -> tuple[LoadedImage, slice, slice, int, bool]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image = self.images[int(rng.integers(len(self.images)))]
        height, width = image.input.shape[1:]
        top = int(rng.integers(0, height - self.crop_size + 1))
        left = int(rng.integers(0, width - self.crop_size + 1))
        rotations = int(rng.integers(4)) if self.flips else 0
        flip = bool(rng.integers(2)) if self.flips else False
        return image, slice(top, top + self.crop_size), slice(left, left + self.crop_size), rotations, flip

    @staticmethod
    def _augment(array: np.ndarray, rotations: int, flip: bool) -> torch.Tensor:
        # The 8 symmetries of the square: microscope images have no preferred orientation.
        array = np.rot90(array, rotations, axes=(1, 2))
        if flip:
            array = array[:, :, ::-1]
        return torch.from_numpy(np.ascontiguousarray(array))


class PairedCrops(_SeededCrops):
    """(input, target) random crops with the 8 square symmetries, for source training."""

    def __init__(self, images: list[LoadedImage], crop_size: int = 256, length: int = 256, seed: int = 0, flips: bool = True):
        missing = [image.field for image in images if image.target is None]
        if missing:
            raise LmaddaError(f"fields {missing[:3]} have no target; paired crops need paired images")
        super().__init__(images, crop_size, length, seed, flips)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, rows, cols, rotations, flip = self._window(index)
        return (self._augment(image.input[:, rows, cols], rotations, flip), self._augment(image.target[:, rows, cols], rotations, flip))


class UnpairedCrops(_SeededCrops):
    """Input-only random crops: the unlabelled target domain of adaptation (or source images for D)."""

    def __init__(self, images: list[LoadedImage], crop_size: int = 256, length: int = 256, seed: int = 0, flips: bool = True):
        super().__init__(images, crop_size, length, seed, flips)

    def __getitem__(self, index: int) -> torch.Tensor:
        image, rows, cols, rotations, flip = self._window(index)
        return self._augment(image.input[:, rows, cols], rotations, flip)

