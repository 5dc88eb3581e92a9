"""`VirtualStainer`: the common path in one object (as CAREamics' CAREamist is for CARE): load a model, adapt it
to a new microscope setting without target labels (or let the label-free selector choose, "don't adapt" included),
stain images, save the result.

    stainer = VirtualStainer.load("models/source.pt")
    outcome = stainer.adapt("data/sim/manifest.parquet", "bright_field", layer="auto", steps=300)
    print(outcome.summary)                    # what was chosen and why
    stains = outcome.stainer.stain(pixels)    # (C, H, W) camera pixels -> (markers, H, W) camera units
    outcome.stainer.save("models/bf_chosen.pt")

It adds no science of its own: `lmadda adapt` is a thin call into `adapt`, and `stain` is the one staining routine
(`lmadda.inference.StainPlan`) that `lmadda predict` and the HTTP endpoint drive. Nothing is global: each stainer
holds its checkpoint and device, and adapting returns a new stainer, leaving the source model as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch

from lmadda.checkpoint import GeneratorCheckpoint, load_checkpoint, save_checkpoint
from lmadda.core.config import read_config_file, validated
from lmadda.core.device import resolve_device
from lmadda.data.calibration import PixelSize
from lmadda.data.dataset import load_images
from lmadda.data.manifest import images_pixel_size
from lmadda.data.manifest import Manifest
from lmadda.data.shifts import Shift
from lmadda.domain import DomainScore
from lmadda.inference import predict_file, stain
from lmadda.core.registry_names import target_name
from lmadda.selection.selector import Choice
from lmadda.training.adapt import AdaptConfig, AdaptResult, adapt
from lmadda.training.auto import AutoResult, adapt_and_choose

Layer = int | list[int] | Literal["auto"]


@dataclass(frozen=True)
class AdaptOutcome:
    """What `VirtualStainer.adapt` made: the model to use for the target and how it came about.

    With explicit layers `result` is the LM-ADDA run; with `layer="auto"` `auto` holds the label-free choice among
    the unadapted model, AdaBN, histogram matching and each adapted layer, and every run made for it."""

    stainer: VirtualStainer
    target: str  # the target's name: setting, with its shift (registry_names.target_name)
    config: AdaptConfig
    result: AdaptResult | None = None
    auto: AutoResult | None = None

    @property
    def choice(self) -> Choice | None:
        return self.auto.choice if self.auto is not None else None

    @property
    def collapsed(self) -> bool:
        """The single run collapsed (its model is still returned, as `lmadda adapt` still writes it); a collapsed
        candidate of `layer="auto"` is never chosen, so an auto outcome is never collapsed."""
        return self.result is not None and self.result.collapsed

    @property
    def summary(self) -> str:
        if self.choice is not None:
            choice = self.choice
            scores = ", ".join(f"{name} {value:.4f}" for name, value in sorted(choice.means.items(), key=lambda kv: kv[1]))
            kept = " (kept the unadapted model)" if choice.fell_back else ""
            return (f"label-free choice {choice.chosen}{kept}: {choice.reason}\n"
                    f"{choice.score} per candidate (lower is better): {scores}")
        result = self.result
        state = f"COLLAPSED ({result.collapse_reason})" if result.collapsed else "ok"
        return (f"layer {self.config.layer}, {result.steps_done} steps in {result.seconds:.0f} s, {state}"
                + (", discriminator saturated" if result.d_saturated else "") + f"; G' updated at {result.g_updates} steps")


class VirtualStainer:
    """One virtual-staining model (a `GeneratorCheckpoint`) and the device it stains on."""

    def __init__(self, checkpoint: GeneratorCheckpoint, device: torch.device | str | None = None):
        self.checkpoint = checkpoint
        self.device = resolve_device(device)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str | None = None) -> VirtualStainer:
        """A stainer of the checkpoint at `path`, on `device` (None or "auto": the first GPU, else the CPU)."""
        return cls(load_checkpoint(path), device)

    @property
    def markers(self) -> list[str]:
        return list(self.checkpoint.markers)

    @property
    def setting(self) -> str:
        """The microscope setting it was trained or adapted for (an adapted model: its target's name)."""
        return self.checkpoint.setting

    def __repr__(self) -> str:
        return f"VirtualStainer({self.checkpoint.describe()}, device={self.device})"

    # -- adapt ------------------------------------------------------------------------------------------------
    def adapt(self, manifest: str | Path | Manifest, setting: str, *, shift: str | Shift | None = None, layer: Layer | None = None,
              config: AdaptConfig | Mapping[str, Any] | str | Path | None = None, source_manifest: str | Path | Manifest | None = None,
              selector_options: Mapping[str, Any] | None = None, progress: bool = True, **options: Any) -> AdaptOutcome:
        """Adapt to the `setting` images of `manifest`'s train split (under `shift`), without their labels.

        `layer`: the matched layer(s) (0..2*depth-1; the last one is ADDA), or "auto" to adapt at several layers and let
        the label-free selector choose among them, AdaBN, histogram matching and this model unadapted, which it keeps
        unless one is confidently better; None takes the layer from `config`. `config` (an AdaptConfig, its options, or a
        YAML/JSON file of them) and `options` (which win) are `lmadda adapt`'s options. The source images are this
        model's own setting in `source_manifest` (default: `manifest`). The new model records the target images' pixel
        size (else keeps this model's); this stainer is left unchanged."""
        auto = layer == "auto"
        adapt_config = _adapt_config(config, [0] if auto else layer, options)
        source = self.checkpoint
        source_setting = source.metadata.get("train_config", {}).get("setting", source.setting)
        manifest = _manifest(manifest)
        source_manifest = _manifest(source_manifest) if source_manifest is not None else manifest
        shift = Shift.parse(shift) if isinstance(shift, str) else shift
        source_images = load_images(source_manifest, source_setting, "train", percentiles=source.percentiles)
        target_images = load_images(manifest, setting, "train", shift=shift, percentiles=source.percentiles, seed=adapt_config.seed)
        target = target_name(setting, shift)
        target_pixel_size = images_pixel_size(manifest, setting, shift)  # the adapted model is meant for the target's images
        if auto:
            log: Callable[[str], None] = print if progress else (lambda line: None)
            chosen = adapt_and_choose(source, source_images, target_images, adapt_config, target,
                                      selector_options=dict(selector_options or {}), progress=progress, log=log)
            if target_pixel_size is not None:
                chosen.checkpoint.metadata["pixel_size_um"] = target_pixel_size
            return AdaptOutcome(VirtualStainer(chosen.checkpoint, self.device), target, adapt_config, auto=chosen)
        result = adapt(source, source_images, target_images, adapt_config, progress=progress)
        adapted = result.checkpoint(source, adapt_config, target, pixel_size_um=target_pixel_size)
        return AdaptOutcome(VirtualStainer(adapted, self.device), target, adapt_config, result=result)

    # -- stain ------------------------------------------------------------------------------------------------
    def stain(self, pixels: np.ndarray, *, tile: int = 256, overlap: float = 0.25, batch_size: int = 8) -> np.ndarray:
        """(C_in, H, W) camera pixels -> (markers, H, W) stains in the markers' camera units (float; round them to
        `checkpoint.target_dtype` to write them), exactly as `lmadda predict` and the endpoint stain the image."""
        return stain(self.checkpoint, np.asarray(pixels), tile=tile, overlap=overlap, batch_size=batch_size, device=self.device).camera

    def stain_file(self, input_path: str | Path, output_path: str | Path, *, tile: int = 256, overlap: float = 0.25,
                   batch_size: int = 8, bit_depth: int | None = None, channel: int | str | None = None,
                   pixel_size: PixelSize | None = None, on_domain: Callable[[DomainScore | None], None] | None = None) -> Path:
        """`lmadda predict` with this model: read `input_path` (TIFF, PNG, OME-Zarr), write the stains to `output_path`
        with the model, its domain check and the input's pixel size in the metadata (`lmadda.inference.predict_file`)."""
        return predict_file(self.checkpoint, input_path, output_path, tile=tile, overlap=overlap, batch_size=batch_size,
                            device=self.device, bit_depth=bit_depth, channel=channel, pixel_size=pixel_size, on_domain=on_domain)

    def save(self, path: str | Path) -> Path:
        """Write the checkpoint (atomically), loadable by `VirtualStainer.load`, `lmadda predict` and the endpoint."""
        return save_checkpoint(path, self.checkpoint)


def _manifest(manifest: str | Path | Manifest) -> Manifest:
    return manifest if isinstance(manifest, Manifest) else Manifest.load(manifest)


def _adapt_config(config: AdaptConfig | Mapping[str, Any] | str | Path | None, layer: int | list[int] | None,
                  options: Mapping[str, Any]) -> AdaptConfig:
    """`config` with `options` over it and `layer` over both, validated as `lmadda adapt` validates its options.
    Unlike CLI flags, an option given as None is kept: `gate_accuracy=None` means "update G' at every step"."""
    if isinstance(config, AdaptConfig):
        data, source = config.model_dump(), "AdaptConfig"
    elif isinstance(config, Mapping) or config is None:
        data, source = dict(config or {}), "AdaptConfig"
    else:
        data, source = read_config_file(config), f"config {config}"
    data.update(options)
    if layer is not None:
        data["layer"] = layer
    return validated(AdaptConfig, data, source)
