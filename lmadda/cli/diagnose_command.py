"""`lmadda diagnose CHECKPOINT IMAGES_OR_MANIFEST` and `lmadda diagnose --add-reference CHECKPOINT --manifest M`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lmadda.core.errors import LmaddaError
from lmadda.data.io import refuse_overwriting_inputs
from lmadda.data.manifest import manifest_inputs

IMAGE_SUFFIXES = (".tif", ".tiff", ".png")
OUT_FILES = ("diagnosis.json", "profile.png")  # what it writes in --out
ADVICE = {
    "no_change": "no change needed: these images look like the ones the model was trained on.",
    "input_correction": "a cheap input correction suffices: histogram matching brings the images into the model's domain. Run "
                        "`lmadda adapt {checkpoint} {target} --layer auto`; the label-free selector "
                        "weighs histogram matching against the other candidates and writes the checkpoint to use.",
    "adapt": "adapt the model to these images: `lmadda adapt {checkpoint} {target} --layer auto` "
             "(adapts at several layers and keeps the unadapted model unless one is confidently better), or match at layers "
             "{first}..{last}, where the shift enters, with `--layer {first}`.",
    "too_large": "the shift is too large to trust an adapted model either: these images differ from the training domain beyond "
                 "what input correction or matching one layer is known to recover. Acquire images closer to the training "
                 "setting, or train a source model on paired images of this setting (`lmadda train-source`).",
}


class DiagnoseConfig(BaseModel):
    """What `lmadda diagnose` checks, validated before any image is read."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: Path
    images: Path | None = Field(None, description="a folder of TIFF/PNG images, or a manifest (.parquet)")
    add_reference: bool = False
    manifest: Path | None = Field(None, description="with --add-reference: the images the model was trained or adapted on")
    setting: str | None = None
    shift: str | None = None
    split: str | None = None
    out: Path = Path("diagnosis")
    tile: int = Field(256, ge=1)
    overlap: float = Field(0.25, ge=0, lt=1)
    device: str | None = None
    bit_depth: int | None = Field(None, ge=1, le=32)

    @model_validator(mode="after")
    def _inputs_exist(self) -> "DiagnoseConfig":
        if not self.checkpoint.is_file():
            raise ValueError(f"checkpoint {self.checkpoint} not found")
        if self.add_reference:
            if self.manifest is None:
                raise ValueError("--add-reference needs --manifest: the manifest of the images the model was trained or adapted on")
            if not self.manifest.is_file():
                raise ValueError(f"--manifest {self.manifest} not found")
        elif self.images is None:
            raise ValueError("give the images to check: a folder of TIFF/PNG images or a manifest (.parquet), "
                             "e.g. `lmadda diagnose model.pt new_images/`")
        elif not self.images.exists():
            raise ValueError(f"{self.images} not found; give a folder of TIFF/PNG images or a manifest (.parquet)")
        elif self.images.is_file() and self.images.suffix != ".parquet":
            raise ValueError(f"{self.images} is a file but not a manifest (.parquet); give a folder of images or a manifest")
        if self.shift:
            from lmadda.data.shifts import Shift

            Shift.parse(self.shift)
        return self


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "diagnose", help="are new images in the model's domain? a profile of where they differ, and what to do",
        description="Score every image against the domain reference the checkpoint carries: the fraction out of domain, the "
                    "per-layer discrepancy profile (a plot), the layer the shift lives in, and a recommendation. With "
                    "--add-reference, store a domain reference in a checkpoint written before lmadda made one.")
    parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT")
    parser.add_argument("images", type=Path, nargs="?", metavar="IMAGES_OR_MANIFEST", help="a folder of TIFF/PNG images or a manifest (.parquet)")
    parser.add_argument("--add-reference", action="store_true", help="store a domain reference in CHECKPOINT (atomically), from --manifest")
    parser.add_argument("--manifest", type=Path, help="with --add-reference: the images the model was trained or adapted on")
    parser.add_argument("--setting", help="input setting to read from a manifest (default: the checkpoint's)")
    parser.add_argument("--shift", help="shift applied to a manifest's images, e.g. overexposure:3 (to see what a shift looks like)")
    parser.add_argument("--split", choices=["train", "val", "test"], help="split of a manifest to check (default: every split)")
    parser.add_argument("--out", type=Path, default=Path("diagnosis"), help="folder for profile.png and diagnosis.json (default: diagnosis/)")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--device", default=None)
    parser.add_argument("--bit-depth", type=int, default=None, help="camera bit depth of the images when lower than their storage type")
    parser.set_defaults(func=run_diagnose)


def _config(args: argparse.Namespace) -> DiagnoseConfig:
    fields = {k: v for k, v in vars(args).items() if k in DiagnoseConfig.model_fields and v is not None}
    try:
        return DiagnoseConfig(**fields)
    except ValidationError as error:
        raise LmaddaError("; ".join(e["msg"].removeprefix("Value error, ") for e in error.errors())) from None


def _setting_and_shift(checkpoint, config: DiagnoseConfig) -> tuple[str, str | None]:
    """The manifest setting to read and its shift: the flags, else the checkpoint's own (e.g. 'phase_contrast+overexposure:3')."""
    own, _, own_shift = checkpoint.setting.partition("+")
    if config.setting:
        return config.setting, config.shift
    return own, config.shift or own_shift or None


def run_diagnose(args: argparse.Namespace) -> int:
    from lmadda.checkpoint import load_checkpoint

    config = _config(args)
    if not config.add_reference:  # --add-reference updates CHECKPOINT in place, as asked (atomically, read back first)
        if config.images.is_dir():
            inputs = [("IMAGES_OR_MANIFEST", path) for path in _image_files(config.images)]
        else:
            inputs = manifest_inputs(config.images, "IMAGES_OR_MANIFEST")
        refuse_overwriting_inputs([("--out", config.out / name) for name in OUT_FILES], [("CHECKPOINT", config.checkpoint), *inputs])
    checkpoint = load_checkpoint(config.checkpoint)
    if config.add_reference:
        return add_reference(config, checkpoint)
    if checkpoint.domain_reference is None:
        from lmadda.cli.domain_messages import missing_reference_message

        raise LmaddaError(missing_reference_message(str(config.checkpoint)))
    from lmadda.selection.diagnosis import diagnose

    images = _read_images(config, checkpoint)
    result = diagnose(checkpoint.generator, checkpoint.domain_reference, images, tile=config.tile, overlap=config.overlap,
                      device=config.device, try_correction="input_correction" not in checkpoint.metadata)
    config.out.mkdir(parents=True, exist_ok=True)
    summary, profile = (config.out / name for name in OUT_FILES)
    summary.write_text(json.dumps(result.as_dict(), indent=2))
    plot_profile(result, profile, checkpoint.domain_reference.domain)
    print(render(result, str(config.checkpoint), checkpoint.domain_reference.domain, _target_options(config, checkpoint)))
    print(f"wrote {profile} and {summary}")
    return 0


def add_reference(config: DiagnoseConfig, checkpoint) -> int:
    from lmadda.data.correction import input_correction
    from lmadda.checkpoint import add_domain_reference
    from lmadda.data.dataset import load_images
    from lmadda.data.manifest import Manifest
    from lmadda.data.shifts import Shift
    from lmadda.domain import reference_from_images
    from lmadda.evaluation.rows import TargetDomain

    manifest = Manifest.load(config.manifest)
    setting, shift = _setting_and_shift(checkpoint, config)
    shift = Shift.parse(shift) if shift else None
    train = load_images(manifest, setting, "train", shift=shift, percentiles=checkpoint.percentiles)
    has_val = any(r.role == "input" and r.setting == setting and r.split == "val" for r in manifest.rows)
    held_out = load_images(manifest, setting, "val", shift=shift, percentiles=checkpoint.percentiles, seed=1) if has_val else None
    domain = TargetDomain(setting, shift).name
    reference = reference_from_images(checkpoint.generator, train, held_out, domain=domain, transform=input_correction(checkpoint.metadata),
                                      device=config.device or "cpu")
    replaced = " (replacing the one it had)" if checkpoint.domain_reference is not None else ""
    add_domain_reference(config.checkpoint, reference)
    print(f"added a domain reference for {domain}{replaced} to {config.checkpoint}: {len(train)} training images, thresholds from "
          f"{'the validation images' if held_out else 'other crops of the training images (no validation split)'}; "
          f"in domain up to score {reference.thresholds[0]:.2f}, out of domain above {reference.thresholds[1]:.2f}")
    return 0


def _read_images(config: DiagnoseConfig, checkpoint) -> dict:
    """name -> the generator's input, exactly as `lmadda predict` makes it."""
    from lmadda.data.io import read_image
    from lmadda.inference import model_input

    if config.images.is_dir():
        paths = _image_files(config.images)
        if not paths:
            raise LmaddaError(f"{config.images} holds no TIFF or PNG images ({', '.join(IMAGE_SUFFIXES)})")
        if config.shift:
            raise LmaddaError("--shift applies to a manifest's images only; give a manifest, or shift the images yourself")
        raws = {p.name: read_image(p, bit_depth=config.bit_depth) for p in paths}
        sources = {name: raw.pixels for name, raw in raws.items()}
    else:
        from lmadda.data.manifest import Manifest
        from lmadda.data.shifts import Shift

        manifest = Manifest.load(config.images)
        setting, shift = _setting_and_shift(checkpoint, config)
        shift = Shift.parse(shift) if shift else None
        rows = [r for r in manifest.rows if r.role == "input" and r.setting == setting and (config.split is None or r.split == config.split)]
        if not rows:
            raise LmaddaError(f"{config.images} has no input images of setting {setting!r}{f' in split {config.split}' if config.split else ''}; "
                              f"its settings: {', '.join(manifest.settings)} (choose one with --setting)")
        sources = {}
        for number, row in enumerate(rows):
            raw = read_image(manifest.resolve(row), bit_depth=row.bit_depth)
            pixels = raw.pixels[row.channel_index:row.channel_index + 1]
            sources[row.path] = shift.apply_input(pixels, raw.sensor_max, seed=number) if shift else pixels
    channels = checkpoint.config.in_channels
    wrong = [name for name, pixels in sources.items() if pixels.shape[0] != channels]
    if wrong:
        raise LmaddaError(f"{wrong[0]} has {sources[wrong[0]].shape[0]} channel(s); the model {config.checkpoint} expects {channels}")
    return {name: model_input(pixels, checkpoint) for name, pixels in sources.items()}


def _image_files(folder: Path) -> list[Path]:
    """The images of a folder that `lmadda diagnose` checks."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _target_options(config: DiagnoseConfig, checkpoint) -> str:
    """How `lmadda adapt` would name these images: the manifest and setting checked, or placeholders for a folder."""
    if config.images.is_dir():
        return "--manifest MANIFEST --setting SETTING (a manifest of these images: `lmadda data index FOLDER --out MANIFEST`)"
    setting, shift = _setting_and_shift(checkpoint, config)
    return f"--manifest {config.images} --setting {setting}" + (f" --shift {shift}" if shift else "")


def render(result, checkpoint: str, domain: str, target: str = "--manifest MANIFEST --setting SETTING") -> str:
    summary = result.as_dict()
    lines = [f"{checkpoint}: {summary['images']} images checked against its reference domain ({domain})",
             f"  out of domain {summary['fraction_out_of_domain']:.0%}, borderline {summary['fraction_borderline']:.0%}, "
             f"median score {summary['median_score']:.2f} (in domain up to {result.thresholds[0]:.2f}, out above {result.thresholds[1]:.2f})",
             "  discrepancy per layer (1 = the in-domain level): " + " ".join(f"L{l} {v:.1f}" for l, v in zip(result.layers, result.profile))]
    if result.shift_layer is not None:
        lines.append(f"  the shift lives from layer {result.shift_layer} on")
    if summary["fraction_out_of_domain_after_input_correction"] is not None:
        lines.append(f"  after histogram matching: {summary['fraction_out_of_domain_after_input_correction']:.0%} out of domain")
    first, last = result.adapt_layers or (0, 0)
    lines.append("recommendation: " + ADVICE[result.recommendation].format(checkpoint=checkpoint, target=target, first=first, last=last))
    return "\n".join(lines)


def plot_profile(result, path: Path, domain: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.2))
    colours = ["tab:red" if result.shift_layer is not None and layer >= result.shift_layer else "tab:blue" for layer in result.layers]
    axis.bar(result.layers, result.profile, color=colours)
    axis.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="held-out in-domain level")
    axis.set_xticks(result.layers)
    axis.set_xlabel("encoder layer (where a shift of the input enters)")
    axis.set_ylabel("distance / in-domain level")
    axis.set_title(f"discrepancy from {domain}: {result.fraction('out_of_domain'):.0%} of {len(result.names)} images out of domain", fontsize=9)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
