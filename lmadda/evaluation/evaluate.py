"""Evaluate generators on held-out images: per-image, per-marker metrics as table rows; and checkpoints
(with the test-time baselines) as `lmadda evaluate` does, into one Parquet table."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
import torch

from lmadda.checkpoint import GeneratorCheckpoint
from lmadda.core.atomic import write_atomically
from lmadda.core.errors import LmaddaError
from lmadda.data.correction import InputTransform
from lmadda.data.dataset import LoadedImage, load_images, target_from_model_range
from lmadda.data.manifest import Manifest
from lmadda.evaluation.metrics import nrmse, pearson, psnr, ssim
from lmadda.models.generator import UNetGenerator
from lmadda.evaluation.rows import TargetDomain, matched_name, rows_table, tag_rows
from lmadda.models.tiling import predict_tiled



def evaluate_generator(
    generator: UNetGenerator,
    images: list[LoadedImage],
    markers: list[str],
    *,
    device: torch.device | str | None = None,
    input_transform: InputTransform | None = None,
    tile: int | None = None,
    on_image: Callable[[], None] | None = None,
) -> list[dict]:
    """One row per (image, marker): pearson, ssim, psnr, nrmse in normalised 0..1 target units.

    `input_transform` is applied to each input (model units) first: how test-time baselines such
    as histogram matching plug in. The generator runs in eval mode (see `predict_tiled`).
    `on_image()` is called after each image (progress).
    """
    tile = tile or max(generator.config.multiple, 256)
    rows = []
    for image in images:
        if image.target is None:
            raise ValueError(f"field {image.field} has no target; evaluation needs paired images")
        model_input = input_transform(image.input) if input_transform else image.input
        prediction = target_from_model_range(predict_tiled(generator, model_input, tile=tile, device=device))
        truth = target_from_model_range(image.target)
        for channel, marker in enumerate(markers):
            p, t = prediction[channel], truth[channel]
            rows.append({
                "field": image.field, "marker": marker,
                "pearson": pearson(p, t), "ssim": ssim(p, t, data_range=1.0),
                "psnr": psnr(p, t, data_range=1.0), "nrmse": nrmse(p, t),
            })
        if on_image is not None:
            on_image()
    return rows


# How the study seeds each split's shifted images (lmadda.study.grid.run_grid: train `seed`, val `seed + 1`,
# test `seed + 7`); `lmadda evaluate --seed` uses the same, so its rows reproduce the study's.
SPLIT_SEED_OFFSET = {"train": 0, "val": 1, "test": 7}


def checkpoint_tags(checkpoint: GeneratorCheckpoint, name: str) -> dict:
    """The result-table columns a checkpoint's own metadata gives: which model it is and how its adaptation went.

    `checkpoint` is `name` (the path it was given as), so two checkpoints of one method and layer stay apart."""
    metadata = checkpoint.metadata
    method = metadata.get("method", "source")
    layers = metadata.get("layer", -1)
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers]
    matched = matched_name(layers) if method != "source" else None
    if method == "lmadda" and len(layers) > 1:
        method = "lmadda_multi"  # as the study names multi-layer matching
    g_updates = metadata.get("g_updates")
    return dict(checkpoint=name, method="unadapted" if method == "source" else method, layer=max(layers), matched=matched,
                lr=metadata.get("adapt_config", {}).get("lr"), collapsed=bool(metadata.get("collapsed", False)),
                d_saturated=metadata.get("d_saturated"), g_updates=None if g_updates is None else int(g_updates))


def evaluate_checkpoints(
    checkpoints: list[tuple[str, GeneratorCheckpoint]],
    manifest: Manifest,
    target: str,
    *,
    split: str = "test",
    baselines: list[str] = (),
    seed: int = 0,
    device: torch.device | str | None = None,
    log: Callable[[str], None] = print,
    progress: bool = False,
) -> list[dict]:
    """Result rows (the study's columns + `checkpoint`) for each (name, checkpoint) on `target`'s `split`,
    and, for source checkpoints, the test-time `baselines` built as the study builds them with `seed`.
    With `progress`, images evaluated / (checkpoints x methods x images) go to stderr (`Progress`)."""
    from lmadda.corrections.baselines import build_baseline
    from lmadda.core.progress import Progress

    domain = TargetDomain.parse(target)
    rows: list[dict] = []
    total = sum(len(_methods(checkpoint, name, baselines)) * len(manifest.pairs(domain.setting, checkpoint.markers, split))
                for name, checkpoint in checkpoints)
    bar, done = Progress(total, f"evaluate {len(checkpoints)} checkpoint(s) on {target} {split}: images", progress), 0

    def image_done() -> None:
        nonlocal done
        done += 1
        bar.update(done)

    for name, checkpoint in checkpoints:
        images = load_images(manifest, domain.setting, split, checkpoint.markers, shift=domain.shift,
                             percentiles=checkpoint.percentiles, seed=seed + SPLIT_SEED_OFFSET[split])
        tags = checkpoint_tags(checkpoint, name)
        variants = [(tags.pop("method"), checkpoint.generator, None)]
        if variants[0][0] == "unadapted" and baselines:
            source_setting = checkpoint.metadata.get("train_config", {}).get("setting", checkpoint.setting)
            source_train = load_images(manifest, source_setting, "train", percentiles=checkpoint.percentiles)
            target_train = load_images(manifest, domain.setting, "train", shift=domain.shift, percentiles=checkpoint.percentiles, seed=seed)
            variants += [(baseline, *build_baseline(baseline, checkpoint.generator, source_train, target_train, seed=seed))
                         for baseline in baselines if baseline != "unadapted"]
        for method, generator, transform in variants:
            measured = evaluate_generator(generator, images, checkpoint.markers, device=device, input_transform=transform,
                                          on_image=image_done)
            rows += tag_rows(measured, domain, method=method, seed=seed, **tags)
            log(f"evaluated {name} as {method}: {len(measured)} rows")
    return rows


def _methods(checkpoint: GeneratorCheckpoint, name: str, baselines: list[str]) -> list[str]:
    """The methods `evaluate_checkpoints` measures for one checkpoint: itself, plus the baselines of a source model."""
    method = checkpoint_tags(checkpoint, name)["method"]
    return [method] + ([b for b in baselines if b != "unadapted"] if method == "unadapted" else [])


def write_results(rows: list[dict], path: Path, *, overwrite: bool = False) -> Path:
    """Write result rows as a Parquet table at once and atomically; an existing `path` only with `overwrite`."""
    path = Path(path)
    refuse_existing(path, overwrite)
    table = rows_table(rows, leading=("checkpoint",))
    return write_atomically(path, lambda temporary: pq.write_table(table, temporary))


def refuse_existing(path: Path, overwrite: bool) -> None:
    path = Path(path)
    if path.is_dir():  # --overwrite cannot replace a folder by a table: say so before any work
        raise LmaddaError(f"--out {path} is a folder; name the results table file, e.g. {path / 'results.parquet'}")
    existing = next((folder for folder in path.parents if folder.exists()), None)
    if existing is not None and not existing.is_dir():
        raise LmaddaError(f"--out {path}: {existing} is a file, not a folder; choose an --out in a folder")
    if path.exists() and not overwrite:
        raise LmaddaError(f"results table {path} already exists; pass --overwrite to replace it, or choose another --out")
