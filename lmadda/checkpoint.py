"""One self-describing checkpoint format for every generator lmadda writes, and one loader.

A checkpoint holds the weights, the generator config, the markers it predicts, the input setting it
was trained or adapted for, how inputs are normalised, the typical target range per marker (to map
predictions back to camera units), free-form metadata (data, shift, layer, metrics) and the lmadda
version, and the domain reference that `lmadda.domain` checks images against (None in checkpoints
written before it existed). It is a plain `torch.save` dict of tensors and builtins, loaded with `weights_only=True`,
so loading never runs code from the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmadda import __version__
from lmadda.data.normalise import NormalisationParams, PercentileRange
from lmadda.domain import DomainReference
from lmadda.errors import LmaddaError
from lmadda.models.generator import GeneratorConfig, UNetGenerator

FORMAT = "lmadda-generator"
FORMAT_VERSION = 1


@dataclass
class GeneratorCheckpoint:
    generator: UNetGenerator
    markers: list[str]
    setting: str
    percentiles: PercentileRange = PercentileRange()
    target_norm: NormalisationParams | None = None
    target_dtype: str = "uint16"
    metadata: dict[str, Any] = field(default_factory=dict)
    lmadda_version: str = __version__
    domain_reference: DomainReference | None = None  # the images it was trained or adapted on, as its features see them

    @property
    def config(self) -> GeneratorConfig:
        return self.generator.config

    @property
    def pixel_size_um(self) -> float | None:
        """The pixel size (µm) of the images it was trained or adapted on (`metadata["pixel_size_um"]`); None when
        unknown, as in checkpoints written before lmadda recorded it."""
        from lmadda.data.calibration import model_pixel_size

        return model_pixel_size(self.metadata)

    def describe(self) -> str:
        kind = self.metadata.get("method", "source")
        layer = self.metadata.get("layer")
        return f"{kind}{'' if layer is None else f' layer {layer}'} ({self.setting} -> {', '.join(self.markers)})"


def save_checkpoint(path: str | Path, checkpoint: GeneratorCheckpoint) -> Path:
    """Write atomically: a crash mid-write never replaces a good checkpoint with a broken one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lmadda_version": checkpoint.lmadda_version,
        "generator_config": checkpoint.config.model_dump(),
        "state_dict": {k: v.detach().cpu() for k, v in checkpoint.generator.state_dict().items()},
        "markers": list(checkpoint.markers),
        "setting": checkpoint.setting,
        "percentiles": [checkpoint.percentiles.low, checkpoint.percentiles.high],
        "target_norm": checkpoint.target_norm.to_dict() if checkpoint.target_norm else None,
        "target_dtype": checkpoint.target_dtype,
        "metadata": checkpoint.metadata,
        "domain_reference": checkpoint.domain_reference.to_dict() if checkpoint.domain_reference else None,
    }
    return _write_atomically(path, payload)


def _write_atomically(path: Path, payload: dict) -> Path:
    temporary = path.with_name(f".{path.name}.partial")
    torch.save(payload, temporary)
    temporary.replace(path)
    return path


def add_domain_reference(path: str | Path, reference: DomainReference) -> Path:
    """Store `reference` in an existing checkpoint, leaving everything else in it as it was.

    The new file is written beside the old one and read back (as `load_checkpoint` would) before it
    replaces it, so a crash or a bad reference never leaves a broken checkpoint behind.
    """
    path = Path(path)
    load_checkpoint(path)  # a clear error for a missing, foreign or corrupt file before anything is written
    payload = torch.load(path, map_location="cpu", weights_only=True)
    payload["domain_reference"] = reference.to_dict()
    temporary = path.with_name(f".{path.name}.partial")
    torch.save(payload, temporary)
    try:
        load_checkpoint(temporary)
    except LmaddaError:
        temporary.unlink(missing_ok=True)
        raise
    temporary.replace(path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> GeneratorCheckpoint:
    """Load any lmadda generator checkpoint; a clear error for a missing, foreign or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise LmaddaError(f"checkpoint {path} not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise LmaddaError(f"checkpoint {path} is corrupt or not a PyTorch file ({type(error).__name__}); re-export or re-train it") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise LmaddaError(f"checkpoint {path} is not an lmadda generator checkpoint (no format={FORMAT!r} marker)")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise LmaddaError(f"checkpoint {path} has format version {payload['format_version']}; this lmadda reads up to {FORMAT_VERSION}: upgrade lmadda")
    required = ("generator_config", "state_dict", "markers", "setting")
    missing = [k for k in required if k not in payload]
    if missing:
        raise LmaddaError(f"checkpoint {path} lacks {missing}; it is incomplete")
    try:
        config = GeneratorConfig.model_validate(payload["generator_config"])
        generator = UNetGenerator(config)
        generator.load_state_dict(payload["state_dict"])
    except Exception as error:
        raise LmaddaError(f"checkpoint {path}: weights do not fit its generator config ({error})") from error
    generator.eval()
    low, high = payload.get("percentiles", [1.0, 99.8])
    target_norm = payload.get("target_norm")
    reference = payload.get("domain_reference")
    reference = DomainReference.from_dict(reference, f"checkpoint {path}") if reference is not None else None
    if reference is not None:
        reference.check_fits(generator, f"checkpoint {path}")
    return GeneratorCheckpoint(
        generator=generator,
        markers=list(payload["markers"]),
        setting=str(payload["setting"]),
        percentiles=PercentileRange(low, high),
        target_norm=NormalisationParams.from_dict(target_norm) if target_norm else None,
        target_dtype=payload.get("target_dtype", "uint16"),
        metadata=dict(payload.get("metadata") or {}),
        lmadda_version=str(payload.get("lmadda_version", "unknown")),
        domain_reference=reference,
    )
