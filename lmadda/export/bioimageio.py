"""`lmadda export --format bioimageio`: a generator checkpoint as a BioImage Model Zoo package (model description 0.5).

The package runs the generator as `lmadda predict` runs it on one tile, written in the zoo's own steps:

    input           camera pixels, float32, axes (batch, channel, y, x); y and x a multiple of 2**depth
    preprocessing   scale_range    per image and channel: percentile `low` -> 0, `high` -> 1   (lmadda.data.normalise)
                    scale_linear   x * 2 - 1: the generator's input range -1..1                (to_model_range)
    network         the generator in eval mode, as TorchScript and as a PyTorch state dict
    postprocessing  scale_linear   (y / 0.8 + 1) / 2: 0..1 over the marker's training range    (target_from_model_range)
                    scale_linear   per marker, the training set's typical camera range          (to_camera_units)
                    clip           to the range of the camera type lmadda writes (uint16: 0..65535)
    output          one channel per marker in float32 camera units: `lmadda predict`'s image before rounding

The test tensors are a crop of a real image of the model's setting (one tile), and the test output is what lmadda's own
path (`model_input`, `predict_tiled`, `to_camera_units`) makes of that crop, so `bioimageio test` checks that the
package reproduces lmadda. An adapted model's package records where it came from and how it was adapted (matched
layer, target setting, the label-free choice) in `config.lmadda`, and names its source model as `parent` when that
model is published in the zoo (`parent` accepts nothing but a zoo id).

bioimageio.spec and bioimageio.core are optional (`pip install 'lmadda[bioimageio]'`) and imported only here, when an
export runs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import string
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmadda.checkpoint import GeneratorCheckpoint, load_checkpoint
from lmadda.core.atomic import write_atomically
from lmadda.core.errors import LmaddaError
from lmadda.core.version import __version__
from lmadda.data.dataset import TARGET_HEADROOM, target_from_model_range
from lmadda.data.io import read_image, refuse_overwriting_inputs
from lmadda.export.package_readme import ADDA, LAYER_MATCHING, LICENSE, NAME_CHARS, PIX2PIX, camera_range, default_name, is_adapted, readme
from lmadda.inference import model_input, to_camera_units
from lmadda.models.tiling import predict_tiled

INSTALL_HINT = "pip install 'lmadda[bioimageio]'"
SAMPLE_SIDE = 256  # the test tile's side at most: `lmadda predict`'s default tile, so the test is one tile of it
SCALE_RANGE_EPS = 1e-6  # lmadda.data.normalise's smallest spread; the zoo adds it to the spread instead
_ZOO_ID_CHARS = set(string.ascii_lowercase + string.digits + "_-/.")

@dataclass(frozen=True)
class ExportResult:
    path: Path
    sample: Path  # the image the test tensors were cut from
    crop: tuple[int, int, int]  # top, left, side (px) of the test tile in it
    adapted: bool
    tested: bool  # bioimageio.core ran the package on its test tensors and reproduced lmadda's output


def check_export_request(checkpoint: str | Path, out: str | Path, *, overwrite: bool = False,
                         sample_image: str | Path | None = None, parent: str | None = None, authors: list[str] | None = None,
                         name: str | None = None) -> Path:
    """Refuse, before any work, a request that cannot succeed; returns `out` as a Path."""
    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.is_file():
        raise LmaddaError(f"checkpoint {checkpoint} not found; name an lmadda generator checkpoint (.pt), e.g. one "
                          "`lmadda train-source` or `lmadda adapt` wrote")
    if out.suffix.lower() != ".zip":
        raise LmaddaError(f"--out {out}: a BioImage Model Zoo package is a .zip file; name it e.g. {out.with_suffix('.zip')}")
    if out.is_dir():
        raise LmaddaError(f"--out {out} is a folder; name the package file, e.g. {out / 'model.zip'}")
    existing = next((folder for folder in out.parents if folder.exists()), None)
    if existing is not None and not existing.is_dir():
        raise LmaddaError(f"--out {out}: {existing} is a file, not a folder; choose an --out in a folder")
    if out.exists() and not overwrite:
        raise LmaddaError(f"package {out} already exists; pass --overwrite to replace it, or choose another --out")
    if sample_image is not None and not Path(sample_image).is_file():
        raise LmaddaError(f"--sample-image {sample_image} not found; name an image (TIFF or PNG) of the setting the model is for")
    refuse_overwriting_inputs([("--out", out)], [("CHECKPOINT", checkpoint), ("--sample-image", sample_image)])
    if parent is not None and (not parent or not set(parent) <= _ZOO_ID_CHARS or parent.startswith("/") or parent.endswith("/")):
        raise LmaddaError(f"--parent {parent!r} is not a BioImage Model Zoo id: use the source model's zoo id "
                          "(lower-case letters, digits, '_', '-', '.', '/'; e.g. affable-shark)")
    for author in authors or []:
        if not author.strip() or "/" in author or "\\" in author:
            raise LmaddaError(f"--author {author!r}: the zoo wants a person's name without '/' or '\\', e.g. 'Ada Lovelace'")
    if name is not None and not (5 <= len(name) <= 128 and set(name) <= NAME_CHARS):
        raise LmaddaError(f"--name {name!r}: the zoo wants 5 to 128 characters of letters, digits, spaces and _ + - ( ), "
                          "e.g. 'LM-ADDA phase contrast to DAPI'")
    return out


def require_bioimageio():
    """The two bioimageio modules an export needs, or a clear error saying how to install them."""
    try:
        import bioimageio.core as core
        from bioimageio.spec.model import v0_5 as spec
    except ImportError as error:
        raise LmaddaError(f"exporting to the BioImage Model Zoo needs bioimageio.core and bioimageio.spec ({error}); "
                          f"install them with: {INSTALL_HINT}") from error
    return core, spec


def lineage(checkpoint: GeneratorCheckpoint, checkpoint_path: str | Path, parent: str | None = None) -> dict:
    """What the package records in `config.lmadda`: the checkpoint it was made from and, for an adapted model, its
    source model and its adaptation (matched layer, target setting, label-free evidence). Plain YAML values only."""
    path = Path(checkpoint_path)
    metadata = checkpoint.metadata
    record: dict = {
        "lmadda_version": __version__,
        "checkpoint": {"file": path.name, "sha256": _sha256(path), "lmadda_version": checkpoint.lmadda_version},
        "method": metadata.get("method", "source"),
        "setting": checkpoint.setting,
        "markers": list(checkpoint.markers),
        "generator_config": checkpoint.config.model_dump(),
        "percentiles": [checkpoint.percentiles.low, checkpoint.percentiles.high],
        "target_norm": checkpoint.target_norm.to_dict() if checkpoint.target_norm else None,
        "target_dtype": checkpoint.target_dtype,
        "pixel_size_um": checkpoint.pixel_size_um,
    }
    if not is_adapted(metadata):
        record["training"] = _source_summary(metadata)
        return _yaml_values(record)
    # `lmadda adapt` keeps the source's metadata under source_metadata; the label-free choice of a cheap baseline
    # (AdaBN, histogram matching, the unadapted model) keeps it at the top level.
    source = metadata.get("source_metadata") or metadata
    train = source.get("train_config") or {}
    source_setting = metadata.get("source_setting") or train.get("setting")
    record["parent"] = {
        "zoo_id": parent,
        "note": "the source model as lmadda recorded it; `parent` names it only when it is published in the zoo",
        "setting": source_setting,
        **_source_summary(source),
    }
    record["adaptation"] = {
        "method": metadata.get("method"),
        "target_setting": checkpoint.setting,
        "source_setting": source_setting,
        "matched_layer": metadata.get("layer"),
        "recipe": metadata.get("recipe"),
        "adapt_config": metadata.get("adapt_config"),
        "steps_done": metadata.get("steps_done"),
        "g_updates": metadata.get("g_updates"),
        "collapsed": metadata.get("collapsed"),
        "collapse_reason": metadata.get("collapse_reason"),
        "d_saturated": metadata.get("d_saturated"),
        # the label-free selector's evidence (`lmadda adapt --layer auto`): choice, reason, score per candidate
        "label_free_choice": metadata.get("label_free_choice"),
    }
    return _yaml_values(record)


def _source_summary(metadata: dict) -> dict:
    train = metadata.get("train_config") or {}
    keys = ("setting", "shift", "markers", "epochs", "ngf", "depth", "seed")  # not the manifest: a path on the lab's disk
    return {"train_config": {k: train[k] for k in keys if k in train}, "best_val_pearson": metadata.get("best_val_pearson"),
            "pixel_size_um": metadata.get("pixel_size_um")}


def _yaml_values(value):
    """Builtins only (tuples as lists, paths as text), as the zoo's `config` requires."""
    return json.loads(json.dumps(value, default=str))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def recorded_sample(checkpoint: GeneratorCheckpoint) -> Path | None:
    """An image of the model's own setting from the manifest its training recorded (test split first), or None."""
    from lmadda.data.manifest import Manifest

    manifest_path = (checkpoint.metadata.get("train_config") or {}).get("manifest")
    if not manifest_path or not Path(manifest_path).is_file():
        return None
    manifest = Manifest.load(manifest_path)
    if checkpoint.setting not in manifest.settings:
        return None  # an adapted or shifted setting: its images are not in the source's manifest as they are
    for split in ("test", "val", "train"):
        rows = [r for r in manifest.rows if r.role == "input" and r.setting == checkpoint.setting and r.split == split]
        if rows:
            return manifest.resolve(sorted(rows, key=lambda r: r.field)[0])
    return None


def sample_tile(pixels: np.ndarray, multiple: int, name: str) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The centre crop the test tensors are made of: the largest square side that is a multiple of 2**depth, at most
    256 px (or 2**depth when that is more), and fits the image; returns it and (top, left, side)."""
    height, width = pixels.shape[1:]
    side = max(multiple, min(SAMPLE_SIDE, height, width) // multiple * multiple)
    if side > min(height, width):
        raise LmaddaError(f"sample image {name} is {height}x{width} px, smaller than this model's input multiple {multiple} "
                          f"(2**depth); pass a --sample-image of at least {multiple}x{multiple} px")
    top, left = (height - side) // 2, (width - side) // 2
    return np.ascontiguousarray(pixels[:, top : top + side, left : left + side]), (top, left, side)


@torch.no_grad()
def lmadda_output(checkpoint: GeneratorCheckpoint, pixels: np.ndarray) -> np.ndarray:
    """What `lmadda predict` makes of a square tile of camera pixels (C, S, S) with S a multiple of 2**depth, before it
    rounds: the markers in float32 camera units, clipped to the range of the marker's camera type."""
    side = pixels.shape[-1]
    prediction = predict_tiled(checkpoint.generator, model_input(pixels, checkpoint), tile=side, batch_size=1, device="cpu")
    camera = to_camera_units(target_from_model_range(prediction), checkpoint).astype(np.float32)
    limits = camera_range(checkpoint.target_dtype)
    return camera if limits is None else np.clip(camera, *limits).astype(np.float32)


def export_bioimageio(checkpoint_path: str | Path, out: str | Path, *, sample_image: str | Path | None = None,
                      overwrite: bool = False, parent: str | None = None, authors: list[str] | None = None,
                      name: str | None = None, test: bool = True) -> ExportResult:
    """Write `checkpoint_path` as a BioImage Model Zoo package at `out` (.zip).

    The test tile comes from `sample_image` or, when none is given, from the manifest the model's training recorded.
    With `test`, bioimageio.core runs the finished package on its test input and must reproduce lmadda's output on it
    before the package replaces anything at `out`; a failure leaves nothing there, as does a crash mid-write.
    """
    out = check_export_request(checkpoint_path, out, overwrite=overwrite, sample_image=sample_image, parent=parent,
                               authors=authors, name=name)
    core, spec = require_bioimageio()
    checkpoint = load_checkpoint(checkpoint_path)
    if checkpoint.metadata.get("input_correction"):
        kind = checkpoint.metadata["input_correction"].get("kind")
        raise LmaddaError(f"checkpoint {checkpoint_path} applies an input correction ({kind}) to each whole image before the "
                          "generator, which the zoo's preprocessing steps cannot express, so it is not exported; use "
                          "`lmadda predict` or the endpoint for this model")
    if checkpoint.config.input_zoom != 1.0:
        raise LmaddaError(f"checkpoint {checkpoint_path} resamples each input by {checkpoint.config.input_zoom:g} (the zoom "
                          "correction), which TorchScript weights would fix to one image size, so it is not exported; use "
                          "`lmadda predict` or the endpoint for this model")
    adapted = is_adapted(checkpoint.metadata)
    if parent is not None and not adapted:
        raise LmaddaError(f"--parent names the zoo model an adapted model came from; {checkpoint_path} is a source model "
                          "(trained by `lmadda train-source`), so it has no parent: leave --parent out")
    if not 1 < checkpoint.percentiles.high:
        raise LmaddaError(f"checkpoint {checkpoint_path} normalises to percentile {checkpoint.percentiles.high}; the zoo's "
                          "scale_range needs an upper percentile above 1")
    sample = Path(sample_image) if sample_image is not None else recorded_sample(checkpoint)
    if sample is None:
        raise LmaddaError(f"no sample image for the package's test tensors: pass --sample-image PATH, an image of the "
                          f"setting {checkpoint.setting!r} this model is for (its training manifest has none to offer)")
    raw = read_image(sample)
    if raw.channels != checkpoint.config.in_channels:
        raise LmaddaError(f"sample image {sample} has {raw.channels} channel(s); the model {checkpoint_path} expects "
                          f"{checkpoint.config.in_channels}")
    tile, crop = sample_tile(raw.pixels, checkpoint.config.multiple, str(sample))
    with tempfile.TemporaryDirectory(prefix="lmadda-export-") as folder:
        staged = _stage_files(Path(folder), checkpoint, tile, raw.dtype)
        record = lineage(checkpoint, checkpoint_path, parent)
        staged["README.md"].write_text(readme(checkpoint, record, sample=sample, crop=crop), encoding="utf-8")
        description = build_description(spec, checkpoint, staged, record, parent=parent, authors=authors, name=name)
        package = Path(folder) / "model.zip"  # bioimageio reads a package back by its .zip name
        _package(core, description, package)
        if test:
            _test_package(core, package)
        write_atomically(out, lambda temporary: shutil.copyfile(package, temporary))
    return ExportResult(path=out, sample=sample, crop=crop, adapted=adapted, tested=test)


_FILES = ("weights.pt", "weights_torchscript.pt", "test_input.npy", "test_output.npy", "sample_input.tif",
          "sample_output.tif", "cover.png", "README.md")


def _stage_files(folder: Path, checkpoint: GeneratorCheckpoint, tile: np.ndarray, dtype: str) -> dict[str, Path]:
    """Write the package's files: weights in two formats, the test tensors (.npy), the same tile and its stain as TIFF
    for people (`dtype`: the sample image's own pixel type), a cover, and (later) the README."""
    import tifffile

    generator = copy.deepcopy(checkpoint.generator).cpu().eval()
    files = {name: folder / name for name in _FILES}
    torch.save({k: v.detach().cpu() for k, v in generator.state_dict().items()}, files["weights.pt"])
    example = torch.zeros((1, checkpoint.config.in_channels, tile.shape[1], tile.shape[2]))
    with torch.no_grad(), warnings.catch_warnings():
        # deprecated in recent PyTorch, and still the one format deepImageJ and most zoo consumers run
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
        traced = torch.jit.trace(generator, example, check_trace=False)
    traced.save(str(files["weights_torchscript.pt"]))
    stain = lmadda_output(checkpoint, tile)
    np.save(files["test_input.npy"], tile[None].astype(np.float32))
    np.save(files["test_output.npy"], stain[None])
    tifffile.imwrite(files["sample_input.tif"], np.squeeze(tile.astype(dtype)), photometric="minisblack")
    tifffile.imwrite(files["sample_output.tif"], np.squeeze(stain), photometric="minisblack")
    _write_cover(files["cover.png"], tile[0], stain[0])
    return files


def _write_cover(path: Path, image: np.ndarray, stain: np.ndarray) -> None:
    """The zoo's cover (2:1): the test tile beside its first marker's stain, each stretched to 8 bits."""
    from PIL import Image

    def grey(values: np.ndarray) -> np.ndarray:
        low, high = np.percentile(values, (1.0, 99.8))
        return (np.clip((values - low) / max(high - low, 1e-6), 0, 1) * 255).astype(np.uint8)

    Image.fromarray(np.hstack([grey(image), grey(stain)])).save(path)


def build_description(spec, checkpoint: GeneratorCheckpoint, files: dict[str, Path], lineage_record: dict, *,
                      parent: str | None = None, authors: list[str] | None = None, name: str | None = None):
    """The model description (format 0.5) of the staged files."""
    config = checkpoint.config
    adapted = is_adapted(checkpoint.metadata)
    pixel_size = checkpoint.pixel_size_um
    where = {"unit": "micrometer", "scale": pixel_size} if pixel_size else {}
    step = spec.ParameterizedSize(min=config.multiple, step=config.multiple)
    input_id = spec.TensorId("input")
    inputs = [spec.InputTensorDescr(
        id=input_id,
        description=f"{checkpoint.setting} image in camera units"[:128],
        axes=[spec.BatchAxis(),
              spec.ChannelAxis(channel_names=_channel_names(checkpoint.setting, config.in_channels)),
              spec.SpaceInputAxis(id=spec.AxisId("y"), size=step, **where),
              spec.SpaceInputAxis(id=spec.AxisId("x"), size=step, **where)],
        test_tensor=spec.FileDescr(source=files["test_input.npy"]),
        sample_tensor=spec.FileDescr(source=files["sample_input.tif"]),
        data=spec.IntervalOrRatioDataDescr(type="float32"),
        preprocessing=[
            spec.ScaleRangeDescr(kwargs=spec.ScaleRangeKwargs(axes=[spec.AxisId("y"), spec.AxisId("x")],
                                                              min_percentile=checkpoint.percentiles.low,
                                                              max_percentile=checkpoint.percentiles.high, eps=SCALE_RANGE_EPS)),
            spec.ScaleLinearDescr(kwargs=spec.ScaleLinearKwargs(gain=2.0, offset=-1.0)),
        ],
    )]
    limits = camera_range(checkpoint.target_dtype)
    outputs = [spec.OutputTensorDescr(
        id=spec.TensorId("stain"),
        description=f"{', '.join(checkpoint.markers)} in camera units (float32, before lmadda rounds to {checkpoint.target_dtype})"[:128],
        axes=[spec.BatchAxis(),
              spec.ChannelAxis(channel_names=list(checkpoint.markers)),
              spec.SpaceOutputAxis(id=spec.AxisId("y"), size=spec.SizeReference(tensor_id=input_id, axis_id=spec.AxisId("y")), **where),
              spec.SpaceOutputAxis(id=spec.AxisId("x"), size=spec.SizeReference(tensor_id=input_id, axis_id=spec.AxisId("x")), **where)],
        test_tensor=spec.FileDescr(source=files["test_output.npy"]),
        sample_tensor=spec.FileDescr(source=files["sample_output.tif"]),
        data=spec.IntervalOrRatioDataDescr(type="float32", range=limits or (None, None)),
        postprocessing=_postprocessing(spec, checkpoint),
    )]
    pytorch_version = spec.Version(torch.__version__.split("+")[0])
    weights = spec.WeightsDescr(
        pytorch_state_dict=spec.PytorchStateDictWeightsDescr(
            source=files["weights.pt"], pytorch_version=pytorch_version,
            architecture=spec.ArchitectureFromLibraryDescr(import_from="lmadda.models.generator", callable="build_generator",
                                                           kwargs=config.model_dump()),
            comment="needs lmadda installed: the architecture is lmadda.models.generator.UNetGenerator"),
        torchscript=spec.TorchscriptWeightsDescr(source=files["weights_torchscript.pt"], pytorch_version=pytorch_version,
                                                 parent="pytorch_state_dict",
                                                 comment="traced in eval mode (BatchNorm running statistics, no dropout)"),
    )
    cite = [spec.CiteEntry(text=PIX2PIX[0], doi=spec.Doi(PIX2PIX[1])),
            spec.CiteEntry(text=LAYER_MATCHING[0], url=LAYER_MATCHING[1])]
    if adapted:
        cite.append(spec.CiteEntry(text=ADDA[0], doi=spec.Doi(ADDA[1])))
    tags = ["virtual-staining", "image-to-image", "pix2pix", "unet", "2d", "pytorch", "torchscript", "lmadda"]
    if adapted:
        tags += ["domain-adaptation", "lm-adda"]
    return spec.ModelDescr(
        name=name or default_name(checkpoint, adapted),
        description=_summary(checkpoint, lineage_record, adapted),
        authors=[spec.Author(name=author) for author in (authors or ["Unknown (set with lmadda export --author)"])],
        cite=cite,
        license=spec.LicenseId(LICENSE),
        documentation=spec.FileDescr(source=files["README.md"]),
        covers=[spec.FileDescr(source=files["cover.png"])],
        tags=tags,
        inputs=inputs,
        outputs=outputs,
        weights=weights,
        parent=spec.LinkedModel(id=spec.ModelId(parent)) if parent else None,
        config=spec.Config(
            bioimageio=spec.BioimageioConfig(
                architecture_type="pix2pix UNet",
                architecture_description=f"pix2pix UNet generator, depth {config.depth} ({config.num_layers} indexed layers), "
                                         f"ngf {config.ngf}, Tanh output; lmadda.models.generator",
                task="virtual staining (image-to-image)",
                modality=checkpoint.setting,
                target_structure=list(checkpoint.markers),
                model_parameter_count=sum(p.numel() for p in checkpoint.generator.parameters()),
                reproducibility_tolerance=_tolerance(spec, float(np.abs(np.load(files["test_output.npy"])).max())),
            ),
            lmadda=lineage_record,
        ),
    )


def _postprocessing(spec, checkpoint: GeneratorCheckpoint) -> list:
    """Generator output (Tanh, targets trained at -0.8..0.8) -> 0..1 marker units -> camera units -> clipped."""
    steps = [spec.ScaleLinearDescr(kwargs=spec.ScaleLinearKwargs(gain=0.5 / TARGET_HEADROOM, offset=0.5))]
    norm = checkpoint.target_norm
    if norm is not None and (any(v != 1.0 for v in norm.scale) or any(v != 0.0 for v in norm.offset)):  # the zoo refuses x1 + 0
        steps.append(spec.ScaleLinearDescr(kwargs=spec.ScaleLinearAlongAxisKwargs(
            axis=spec.AxisId("channel"), gain=list(checkpoint.target_norm.scale), offset=list(checkpoint.target_norm.offset))))
    elif checkpoint.target_dtype == "uint16":
        steps.append(spec.ScaleLinearDescr(kwargs=spec.ScaleLinearKwargs(gain=65535.0)))  # as to_camera_units without a range
    limits = camera_range(checkpoint.target_dtype)
    if limits is not None:
        steps.append(spec.ClipDescr(kwargs=spec.ClipKwargs(min=limits[0], max=limits[1])))
    return steps


def _tolerance(spec, largest: float) -> list:
    """How closely a run of the package must reproduce the test output: 1e-4 of its largest value absolute, 1e-3
    relative (numpy and the zoo's tools differ in float32's last bits: 2e-4 camera units on a 0..2300 test tile).
    Nothing for an all-zero output, where the zoo allows no absolute tolerance: its defaults apply then."""
    return [spec.ReproducibilityTolerance(absolute_tolerance=1e-4 * largest, relative_tolerance=1e-3)] if largest > 0 else []


def _channel_names(setting: str, channels: int) -> list[str]:
    return [setting] if channels == 1 else [f"{setting}_{i}" for i in range(channels)]


def _summary(checkpoint: GeneratorCheckpoint, lineage_record: dict, adapted: bool) -> str:
    text = (f"Virtual staining: predicts {', '.join(checkpoint.markers)} from {checkpoint.setting} images "
            f"(pix2pix UNet, depth {checkpoint.config.depth}).")
    if adapted:
        adaptation = lineage_record["adaptation"]
        layer = adaptation["matched_layer"]
        text += (f" Adapted without target labels ({adaptation['method']}{'' if layer is None else f', layer {layer}'}) "
                 f"from a model trained on {adaptation['source_setting']}.")
    return (text + f" Exported by lmadda {__version__}.")[:512]


def _package(core, description, path: Path) -> None:
    try:
        core.save_bioimageio_package(description, output_path=path)
    except Exception as error:  # bioimageio validates the package it wrote and raises on anything invalid
        raise LmaddaError(f"bioimageio could not write a valid package ({type(error).__name__}: {error})") from error


def _test_package(core, path: Path) -> None:
    """bioimageio.core runs the package on its test input (every weights format) and must match the test output."""
    summary = core.test_model(path, devices=["cpu"])
    if summary.status != "passed":
        failed = [f"{d.name}: {'; '.join(e.msg for e in d.errors) or 'failed'}" for d in summary.details if d.status == "failed"]
        raise LmaddaError("the exported package does not reproduce lmadda's output under bioimageio.core, so it was not "
                          "written:\n  " + "\n  ".join(failed or [summary.status]))
