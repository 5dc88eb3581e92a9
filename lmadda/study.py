"""The adaptation study on one source model: every target domain x method x matched layer, one table.

A target domain is an input setting of the manifest plus an optional shift applied to it
(`bright_field`, or `phase_contrast` + `overexposure:2`). For each domain the study evaluates, on the
test split: the unadapted source model, the cheap baselines (AdaBN, histogram matching, FDA),
LM-ADDA at each requested layer (the last layer is ADDA), and, when target pairs exist and an oracle
budget is given, an oracle trained on target pairs. Adaptation uses only unlabelled target inputs of
the train split. Rows are appended to a Parquet table after every model, atomically, so an
interrupted study keeps everything it finished.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lmadda.baselines import FourierAmplitudeTransfer, HistogramMatcher, adabn
from lmadda.checkpoint import GeneratorCheckpoint, save_checkpoint
from lmadda.data.dataset import LoadedImage, load_images
from lmadda.data.manifest import Manifest
from lmadda.data.shifts import Shift
from lmadda.evaluation import evaluate_generator
from lmadda.training.adapt import AdaptConfig, adapt
from lmadda.training.source import SourceTrainConfig, train_source

RESULT_COLUMNS = [
    "target", "setting", "shift", "magnitude", "method", "layer", "lr", "seed", "marker", "field",
    "pearson", "ssim", "psnr", "nrmse", "collapsed", "d_saturated", "seconds",
]


@dataclass(frozen=True)
class TargetDomain:
    setting: str
    shift: Shift | None = None

    @classmethod
    def parse(cls, text: str) -> "TargetDomain":
        """`bright_field` or `phase_contrast+overexposure:2`."""
        setting, _, shift = text.partition("+")
        return cls(setting.strip(), Shift.parse(shift) if shift else None)

    @property
    def name(self) -> str:
        return self.setting if self.shift is None else f"{self.setting}+{self.shift}"


class ResultTable:
    """Rows of the study, flushed to Parquet atomically after each model."""

    def __init__(self, path: Path | None):
        self.path = path
        self.rows: list[dict] = []
        if path is not None and path.exists():
            self.rows = pq.read_table(path).to_pylist()

    def add(self, rows: list[dict]) -> None:
        self.rows.extend({column: row.get(column) for column in RESULT_COLUMNS} for row in rows)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_name(f".{self.path.name}.partial")
            pq.write_table(pa.Table.from_pylist(self.rows), temporary)
            temporary.replace(self.path)

    def has(self, target: str, method: str, layer: int, lr: float | None, seed: int) -> bool:
        return any(r["target"] == target and r["method"] == method and r["layer"] == layer
                   and (lr is None or r["lr"] == lr) and r["seed"] == seed for r in self.rows)


def _tag(rows: list[dict], domain: TargetDomain, target: str | None = None, **tags) -> list[dict]:
    """Label result rows with the domain they were measured on (`target` overrides its name)."""
    shift = domain.shift
    for row in rows:
        row.update(target=target or domain.name, setting=domain.setting, shift=shift.name if shift else "none",
                   magnitude=shift.magnitude if shift else float("nan"), **tags)
    return rows


def run_study(
    source: GeneratorCheckpoint,
    manifest: Manifest,
    domains: list[TargetDomain],
    layers: list[int],
    adapt_config: AdaptConfig,
    *,
    source_setting: str,
    out: Path | None = None,
    baselines: tuple[str, ...] = ("adabn", "histogram_matching", "fda"),
    oracle: SourceTrainConfig | None = None,
    save_models: bool = False,
    progress: bool = True,
    log=print,
) -> list[dict]:
    """Run every (domain, method, layer); returns all rows (also written to `out`/results.parquet)."""
    markers = source.markers
    table = ResultTable(out / "results.parquet" if out else None)
    seed = adapt_config.seed
    source_train = load_images(manifest, source_setting, "train", percentiles=source.percentiles)
    source_test = load_images(manifest, source_setting, "test", markers, percentiles=source.percentiles)
    if not table.has("source", "unadapted", -1, None, seed):
        rows = evaluate_generator(source.generator, source_test, markers)
        table.add(_tag(rows, TargetDomain(source_setting), method="unadapted", layer=-1, seed=seed, target="source"))
    for domain in domains:
        target_train = load_images(manifest, domain.setting, "train", shift=domain.shift, percentiles=source.percentiles, seed=seed)
        target_test = load_images(manifest, domain.setting, "test", markers, shift=domain.shift, percentiles=source.percentiles, seed=seed + 7)

        def record(method: str, rows: list[dict], layer: int = -1, **tags) -> None:
            table.add(_tag(rows, domain, method=method, layer=layer, seed=seed, **tags))
            mean = np.nanmean([r["pearson"] for r in rows])
            log(f"[study] {domain.name:34s} {method:18s} layer {layer:3d}  Pearson {mean:.3f}")

        if not table.has(domain.name, "unadapted", -1, None, seed):
            record("unadapted", evaluate_generator(source.generator, target_test, markers))
        if "adabn" in baselines and not table.has(domain.name, "adabn", -1, None, seed):
            record("adabn", evaluate_generator(adabn(source.generator, target_train), target_test, markers))
        if "histogram_matching" in baselines and not table.has(domain.name, "histogram_matching", -1, None, seed):
            record("histogram_matching", evaluate_generator(source.generator, target_test, markers, input_transform=HistogramMatcher(source_train)))
        if "fda" in baselines and not table.has(domain.name, "fda", -1, None, seed):
            record("fda", evaluate_generator(source.generator, target_test, markers, input_transform=FourierAmplitudeTransfer(source_train, seed=seed)))

        for layer in layers:
            method = "adda" if layer == source.generator.last_layer else "lmadda"
            if table.has(domain.name, method, layer, adapt_config.lr, seed):
                continue
            config = adapt_config.model_copy(update={"layer": [layer]})
            result = adapt(source, source_train, target_train, config, progress=progress)
            rows = evaluate_generator(result.generator, target_test, markers)
            record(method, rows, layer=layer, lr=config.lr, collapsed=result.collapsed, d_saturated=result.d_saturated, seconds=result.seconds)
            if save_models and out is not None:
                checkpoint = result.checkpoint(source, config, domain.name, target=domain.name)
                save_checkpoint(out / "models" / f"{domain.name.replace(':', '_')}_layer{layer:02d}.pt", checkpoint)

        if oracle is not None and not table.has(domain.name, "oracle", -1, None, seed):
            start = time.perf_counter()
            oracle_config = oracle.model_copy(update={"setting": domain.setting, "shift": str(domain.shift) if domain.shift else None})
            oracle_data = (
                load_images(manifest, domain.setting, "train", markers, shift=domain.shift, percentiles=source.percentiles, seed=seed),
                load_images(manifest, domain.setting, "val", markers, shift=domain.shift, percentiles=source.percentiles, seed=seed + 1),
            )
            trained = train_source(oracle_config, progress=progress, data=oracle_data)
            record("oracle", evaluate_generator(trained.checkpoint.generator, target_test, markers), seconds=time.perf_counter() - start)
    return table.rows
