"""The README.md of a BioImage Model Zoo package `lmadda export` writes: what the model does, its steps, its lineage,
how to validate it, and what to cite."""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np

from lmadda.checkpoint import GeneratorCheckpoint
from lmadda.core.version import __version__
from lmadda.data.dataset import TARGET_HEADROOM

NAME_CHARS = set(string.ascii_letters + string.digits + "_+- ()")  # what the zoo allows in a model name
LICENSE = "MIT"  # lmadda's licence, an SPDX id the zoo accepts

PIX2PIX = ("Isola P, Zhu J-Y, Zhou T, Efros AA (2017). Image-to-Image Translation with Conditional Adversarial Networks "
           "(pix2pix). CVPR 2017.", "10.1109/CVPR.2017.632")
ADDA = ("Tzeng E, Hoffman J, Saenko K, Darrell T (2017). Adversarial Discriminative Domain Adaptation (ADDA). CVPR 2017.",
        "10.1109/CVPR.2017.316")
LAYER_MATCHING = ("Yang K-WK, Bai A, Bermudez A, Hong Y, Latham Z, Sloan I, Liu M, Goyal V, Hsieh C-J, Lin NYC (2025). "
                  "Uncertainty-Guided Selective Adaptation Enables Cross-Platform Predictive Fluorescence Microscopy. "
                  "arXiv:2511.12006 (adversarial adaptation of the early layers of a virtual-staining generator, the idea "
                  "LM-ADDA implements).", "https://arxiv.org/abs/2511.12006")


def is_adapted(metadata: dict) -> bool:
    """Whether a checkpoint came out of `lmadda adapt` (any layer, or the label-free choice among adapted models and
    cheap baselines) rather than out of `lmadda train-source`."""
    return metadata.get("method", "source") != "source" or "label_free_choice" in metadata or "source_metadata" in metadata


def camera_range(dtype: str) -> tuple[float, float] | None:
    """The values lmadda can write for a marker stored as `dtype` (it clips to them), or None for float images."""
    kind = np.dtype(dtype)
    return (float(np.iinfo(kind).min), float(np.iinfo(kind).max)) if kind.kind in "ui" else None



def default_name(checkpoint: GeneratorCheckpoint, adapted: bool) -> str:
    kind = "LM-ADDA" if adapted else "pix2pix"
    text = f"{kind} virtual staining {checkpoint.setting} to {' '.join(checkpoint.markers)}"
    return "".join(c if c in NAME_CHARS else "-" for c in text)[:64].strip()


def readme(checkpoint: GeneratorCheckpoint, lineage_record: dict, *, sample: Path, crop: tuple[int, int, int]) -> str:
    """The package's documentation (README.md): what the model does, its steps, its lineage, how to validate it."""
    config = checkpoint.config
    markers = ", ".join(checkpoint.markers)
    low, high = checkpoint.percentiles.low, checkpoint.percentiles.high
    limits = camera_range(checkpoint.target_dtype)
    if checkpoint.target_norm is not None:
        camera = (f"per marker, the training set's typical camera range (the median over its images of percentile {low:g} "
                  f"and of the spread to percentile {high:g}: offset {_numbers(checkpoint.target_norm.offset)}, "
                  f"scale {_numbers(checkpoint.target_norm.scale)})")
    elif checkpoint.target_dtype == "uint16":
        camera = "x 65535 (this checkpoint records no camera range of its markers)"
    else:
        camera = "none (this checkpoint records no camera range; the output stays in 0..1 marker units)"
    pixel = f"{checkpoint.pixel_size_um} µm" if checkpoint.pixel_size_um else "not recorded"
    top, left, side = crop
    lines = [
        f"# {default_name(checkpoint, is_adapted(checkpoint.metadata))}",
        "",
        f"A virtual-staining model: it predicts **{markers}** fluorescence from **{checkpoint.setting}** images of the same "
        f"cells. It is a pix2pix UNet generator (depth {config.depth}, {config.num_layers} layers, ngf {config.ngf}) made by "
        f"lmadda {__version__} and exported with `lmadda export --format bioimageio`.",
        "",
        "## Inputs and outputs",
        "",
        f"- **input** `(batch, channel, y, x)`: {config.in_channels} channel(s), the {checkpoint.setting} image in the "
        f"camera's own units (float32). `y` and `x` are multiples of {config.multiple} (2**depth), at least {config.multiple}. "
        f"Pixel size the model was trained or adapted at: {pixel}.",
        f"- **stain** `(batch, channel, y, x)`: one channel per marker ({markers}), float32, in camera units"
        + (f", clipped to {limits[0]:g}..{limits[1]:g} as `lmadda predict` writes {checkpoint.target_dtype}." if limits else "."),
        "",
        "## Preprocessing and postprocessing (as lmadda does them)",
        "",
        f"1. `scale_range`, per image and channel: percentile {low:g} goes to 0 and percentile {high:g} to 1 "
        "(`lmadda.data.normalise.normalise`).",
        "2. `scale_linear` gain 2, offset -1: the generator's input range -1..1.",
        "3. The generator (eval mode: BatchNorm running statistics, no dropout). Tanh output; targets were trained at -0.8..0.8.",
        f"4. `scale_linear` gain {0.5 / TARGET_HEADROOM:g}, offset 0.5: 0..1 over the marker's training range.",
        f"5. `scale_linear` {camera}.",
    ]
    if limits:
        lines.append(f"6. `clip` to {limits[0]:g}..{limits[1]:g}.")
    lines += [
        "",
        "The output is `lmadda predict`'s image before it rounds to integers. `lmadda predict` cuts large images into "
        "overlapping 256 px tiles and blends them with feathered weights; a tool that tiles this model should also overlap "
        "its tiles (e.g. 32-64 px) to avoid seams. The percentiles belong to the whole image: bioimageio.core computes them "
        "on the whole image before it cuts blocks; a tool that computes them per tile normalises each tile differently.",
        "",
    ]
    lines += _lineage_section(lineage_record)
    lines += [
        "## Validation",
        "",
        f"- **Reproduction.** The test input is a {side}x{side} px crop (top {top}, left {left}) of `{sample.name}`, one tile. "
        "The test output is what lmadda's own prediction path (`lmadda.inference.model_input`, `predict_tiled`, "
        "`to_camera_units`) makes of it. `bioimageio test model.zip` (bioimageio.core) runs the package on the test input "
        "with each weights format and checks that it reproduces that output; `lmadda export` runs this test before it "
        "writes the package.",
        "- **Accuracy on your data.** Stain a few fields of your setting for real, predict them with this model, and "
        "compare per image (Pearson correlation, the measure lmadda reports): `lmadda evaluate CHECKPOINT --manifest "
        "MANIFEST --setting SETTING` does this for the lmadda checkpoint this package was made from.",
        "- **Is an image in the model's domain?** A virtual stain of an image unlike the training (or adaptation) images "
        "can look plausible and be wrong. `lmadda predict` and `lmadda diagnose` score each image against the model's "
        "domain reference; this package does not carry that check.",
    ]
    best = (lineage_record.get("training") or lineage_record.get("parent") or {}).get("best_val_pearson")
    if best is not None:
        lines.append(f"- Validation Pearson of the {'source ' if 'parent' in lineage_record else ''}model during training: {best:.3f}.")
    choice = (lineage_record.get("adaptation") or {}).get("label_free_choice")
    if choice:
        lines.append(f"- Label-free choice: **{choice.get('chosen')}**. {choice.get('reason', '')}")
    lines += [
        "",
        "## Limitations",
        "",
        f"- Trained (or adapted) for {checkpoint.setting} images; other settings, objectives or pixel sizes need adaptation.",
        "- A virtual stain is a prediction, not a measurement: confirm findings that matter with a real stain.",
        "",
        "## Citation",
        "",
        f"- {PIX2PIX[0]} https://doi.org/{PIX2PIX[1]}",
        f"- {LAYER_MATCHING[0]} {LAYER_MATCHING[1]}",
    ]
    if "adaptation" in lineage_record:
        lines.append(f"- {ADDA[0]} https://doi.org/{ADDA[1]}")
    lines += ["", "## Licence", "", f"{LICENSE}, as lmadda.", ""]
    return "\n".join(lines)


def _lineage_section(record: dict) -> list[str]:
    checkpoint = record["checkpoint"]
    lines = ["## Lineage", "", f"- Exported from `{checkpoint['file']}` (sha256 `{checkpoint['sha256'][:16]}...`), "
             f"written by lmadda {checkpoint['lmadda_version']}. The package's `config.lmadda` holds the full record."]
    if "adaptation" not in record:
        train = record.get("training", {}).get("train_config", {})
        lines.append(f"- Source model: trained on paired {train.get('setting', record['setting'])} images (`lmadda train-source`).")
        return lines + [""]
    adaptation, parent = record["adaptation"], record["parent"]
    layer = adaptation["matched_layer"]
    lines += [
        f"- Adapted from a model trained on **{adaptation['source_setting']}** to **{adaptation['target_setting']}** "
        f"without target labels: method `{adaptation['method']}`"
        + ("" if layer is None else f", matched layer {layer}") + ".",
        f"- Source model: {'zoo model `' + parent['zoo_id'] + '` (`parent`)' if parent.get('zoo_id') else 'not published in the zoo; its training record is in `config.lmadda.parent`'}.",
    ]
    if adaptation.get("steps_done") is not None:
        lines.append(f"- {adaptation['steps_done']} adaptation steps, G' updated at {adaptation.get('g_updates')}; "
                     f"collapsed: {adaptation.get('collapsed')}.")
    return lines + [""]


def _numbers(values) -> str:
    return ", ".join(f"{v:.4g}" for v in values)
