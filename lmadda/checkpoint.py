"""One self-describing checkpoint format for every generator lmadda writes, and one loader; and the
resume states of the training loops, written and loaded the same safe way.

A checkpoint holds the weights, the generator config, the markers it predicts, the input setting it
was trained or adapted for, how inputs are normalised, the typical target range per marker (to map
predictions back to camera units), free-form metadata (data, shift, layer, metrics) and the lmadda
version, and the domain reference that `lmadda.domain` checks images against (None in checkpoints
written before it existed). It is a plain `torch.save` dict of tensors and builtins, loaded with `weights_only=True`,
so loading never runs code from the file.

Resume states (`save_loop_state` / `load_loop_state`) hold what a training loop needs to continue
after an interruption: weights, optimiser states, counters, history. They follow the same rules: a
`format` marker and a `format_version`, only tensors and plain data (dicts, lists, tuples, numbers,
strings), written atomically and loaded with `weights_only=True`. A state from before these rules
(an unmarked pickle) is refused with an error that says to rerun without resuming, never unpickled.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel

from lmadda.core.atomic import write_atomically
from lmadda.core.errors import LmaddaError
from lmadda.core.version import __version__
from lmadda.data.normalise import NormalisationParams, PercentileRange
from lmadda.domain import DomainReference
from lmadda.models.generator import GeneratorConfig, UNetGenerator

FORMAT = "lmadda-generator"
FORMAT_VERSION = 1
LOOP_STATE_FORMAT = "lmadda-loop-state"
LOOP_STATE_VERSION = 1
LOOPS = ("adapter", "source")  # Adapter.state_dict(); train_source's per-epoch state
RERUN = "rerun it without --resume (a sweep: under a new name, or delete this grid point's folder to restart only it)"


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
    return write_atomically(path, lambda temporary: torch.save(payload, temporary))


def add_domain_reference(path: str | Path, reference: DomainReference) -> Path:
    """Store `reference` in an existing checkpoint, leaving everything else in it as it was.

    The new file is written beside the old one and read back (as `load_checkpoint` would) before it
    replaces it, so a crash or a bad reference never leaves a broken checkpoint behind.
    """
    path = Path(path)
    load_checkpoint(path)  # a clear error for a missing, foreign or corrupt file before anything is written
    payload = torch.load(path, map_location="cpu", weights_only=True)
    payload["domain_reference"] = reference.to_dict()

    def write(temporary: Path) -> None:
        torch.save(payload, temporary)
        load_checkpoint(temporary)  # read back before it replaces the good file; a failure leaves that file as it was

    return write_atomically(path, write)


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


# -- resume states ---------------------------------------------------------------------------------
@dataclass
class LoopState:
    """A training loop's resume state as stored: which loop wrote it, the state itself, free-form plain
    metadata beside it (e.g. the metrics last reported), and the lmadda version that wrote it."""

    loop: str
    state: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    lmadda_version: str = __version__


def plain(value: Any, where: str = "state") -> Any:
    """`value` as data a `weights_only=True` load accepts: tensors (detached, on the CPU), None, bools, numbers,
    strings, and lists, tuples and dicts of them. numpy arrays become tensors, numpy scalars Python numbers, paths
    strings and pydantic models their JSON-ready dict; anything else is refused, naming where it sits."""
    if isinstance(value, np.generic):  # before the builtins: np.float64 is a float subclass the safe load refuses
        return value.item()
    if value is None:
        return None
    for builtin in (bool, int, float, str):  # subclasses (np.float64, enums) as their plain base type
        if isinstance(value, builtin):
            return builtin(value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value))
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        converted = (OrderedDict if isinstance(value, OrderedDict) else dict)(
            (key if isinstance(key, (str, int)) else str(key), plain(item, f"{where}[{key!r}]")) for key, item in value.items())
        if hasattr(value, "_metadata"):  # a module state dict's per-module versions (BatchNorm reads them on load)
            converted._metadata = plain(value._metadata, f"{where}._metadata")
        return converted
    if isinstance(value, (list, tuple)):
        items = [plain(item, f"{where}[{index}]") for index, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise LmaddaError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which a resume state cannot hold "
                      "(only tensors, numbers, strings, bools, None, and lists, tuples and dicts of them); convert it to those first")


def save_loop_state(path: str | Path, loop: str, state: dict, metadata: dict | None = None) -> Path:
    """Write a loop's resume state atomically, as plain data (see `plain`), marked with its format, version and loop."""
    if loop not in LOOPS:
        raise ValueError(f"unknown loop {loop!r}; one of {LOOPS}")
    payload = {
        "format": LOOP_STATE_FORMAT, "format_version": LOOP_STATE_VERSION, "loop": loop, "lmadda_version": __version__,
        "state": plain(state), "metadata": plain(metadata or {}, "metadata"),
    }
    return write_atomically(Path(path), lambda temporary: torch.save(payload, temporary))


def load_loop_state(path: str | Path, loop: str, map_location: str | torch.device = "cpu", *, fix: str = RERUN) -> LoopState:
    """Load a resume state written by `save_loop_state` for `loop`, with `weights_only=True`: nothing in the file runs.

    A clear error (ending in `fix`, what to do instead) for a missing file, a state from before states were
    versioned (an unmarked dict, or a pickle of Python objects that the safe load refuses), another loop's state,
    and a version this lmadda does not know.
    """
    path = Path(path)
    if not path.is_file():
        raise LmaddaError(f"resume state {path} not found; {fix}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # UnpicklingError for objects outside plain data; anything else for a damaged file
        raise LmaddaError(f"resume state {path} cannot be loaded safely ({type(error).__name__}): it holds Python objects that "
                          f"a weights-only load refuses (a state written by an older lmadda, or not an lmadda file), or it is "
                          f"damaged; it was not unpickled. {fix[0].upper()}{fix[1:]}") from error
    if not isinstance(payload, dict) or payload.get("format") != LOOP_STATE_FORMAT:
        raise LmaddaError(f"resume state {path} has no format={LOOP_STATE_FORMAT!r} marker: it was written by an older lmadda, "
                          f"before resume states were versioned, and cannot be resumed; {fix}")
    version = payload.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= LOOP_STATE_VERSION:
        raise LmaddaError(f"resume state {path} has format version {version!r} (written by lmadda {payload.get('lmadda_version', '?')}); "
                          f"this lmadda ({__version__}) reads versions 1 to {LOOP_STATE_VERSION}: use that lmadda, or {fix}")
    if payload.get("loop") != loop:
        raise LmaddaError(f"resume state {path} is the {payload.get('loop')!r} loop's state, not the {loop!r} loop's; "
                          "resume from a checkpoint of the same kind of run")
    if not isinstance(payload.get("state"), dict):
        raise LmaddaError(f"resume state {path} lacks its state; it is incomplete: {fix}")
    return LoopState(loop=loop, state=payload["state"], metadata=dict(payload.get("metadata") or {}),
                     lmadda_version=str(payload.get("lmadda_version", "unknown")))
