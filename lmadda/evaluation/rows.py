"""The one result-row schema: what a measured model is, per test image and marker, in every table lmadda writes.

The study (`lmadda study`, `lmadda demo`), the sweep (`lmadda sweep run`) and `lmadda evaluate` all
write the same rows: one per model x test image x marker, with the model's identity (target domain,
method, matched layers, learning rate, seed), its metrics on that image (Pearson, SSIM, PSNR, NRMSE),
how its adaptation went (collapsed, discriminator saturated, G' updates, seconds) and its label-free
criteria (`lf_*`, one value per model, repeated on its rows). So `lmadda report` draws any of them,
and MLflow runs are made from them the same way (`model_metrics`).

A *target domain* is an input setting of a manifest plus an optional shift applied to it
(`bright_field`, or `phase_contrast+overexposure:2`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pyarrow as pa

from lmadda.data.shifts import Shift
from lmadda.evaluation.metrics import is_finite
from lmadda.core.registry_names import SHIFT_SEPARATOR, target_name

RESULT_COLUMNS = [
    "target", "setting", "shift", "magnitude", "method", "layer", "matched", "lr", "seed", "marker", "field",
    "pearson", "ssim", "psnr", "nrmse", "collapsed", "d_saturated", "g_updates", "seconds", "chosen", "fell_back",
]
CRITERION_PREFIX = "lf_"  # label-free criterion columns (lmadda.selection.criteria), kept as they come
METRICS = ("pearson", "ssim", "psnr", "nrmse")  # per image; a model's are their means
PARAMS = ("target", "setting", "shift", "magnitude", "method", "layer", "matched", "lr", "seed")  # a model's identity


@dataclass(frozen=True)
class TargetDomain:
    setting: str
    shift: Shift | None = None

    @classmethod
    def parse(cls, text: str) -> "TargetDomain":
        """`bright_field` or `phase_contrast+overexposure:2`."""
        setting, _, shift = text.partition(SHIFT_SEPARATOR)
        return cls(setting.strip(), Shift.parse(shift) if shift else None)

    @property
    def name(self) -> str:
        return target_name(self.setting, self.shift)

    @property
    def magnitude(self) -> float:
        return float(self.shift.magnitude) if self.shift else float("nan")

    def columns(self) -> dict:
        """The result-row columns that say which domain a model was measured on."""
        return {"target": self.name, "setting": self.setting, "shift": self.shift.name if self.shift else "none",
                "magnitude": self.magnitude}


def matched_name(layers: Iterable[int]) -> str:
    """'7' for single-layer matching, '0+7+15' for a set of layers."""
    return "+".join(str(layer) for layer in sorted(layers))


def adda_or_lmadda(layers: Iterable[int], last_layer: int) -> str:
    """The one rule that names adversarial matching: `adda` when it matches at the generator's last layer alone (ADDA,
    Tzeng et al. 2017), `lmadda` at any other layer or set of layers."""
    return "adda" if sorted(layers) == [last_layer] else "lmadda"


def adaptation_method(layers: Iterable[int], last_layer: int, recipe: str = "lmadda") -> str:
    """How the result rows name an adapted model: `adda` (the last layer alone), `lmadda` (another single
    layer), `lmadda_multi` (a set of layers), with `_paper` for the published recipe (`recipe: paper`)."""
    layers = sorted(layers)
    if len(layers) > 1:
        return "lmadda_multi"
    method = adda_or_lmadda(layers, last_layer)
    return f"{method}_paper" if recipe == "paper" else method


def tag_rows(rows: list[dict], domain: TargetDomain, target: str | None = None, **tags) -> list[dict]:
    """Label per-image rows (`lmadda.evaluation.evaluate.evaluate_generator`) with the model and the domain they were
    measured on (`target` overrides the domain's name, e.g. `source`); returns `rows`, changed in place."""
    columns = {**domain.columns(), **({"target": target} if target else {})}
    for row in rows:
        row.update(**columns, **tags)
    return rows


def criterion_columns(rows: Iterable[dict]) -> list[str]:
    return sorted({key for row in rows for key in row if key.startswith(CRITERION_PREFIX)})


def rows_table(rows: list[dict], leading: tuple[str, ...] = ()) -> pa.Table:
    """The rows as an Arrow table of the schema's columns (`leading` first, then the criteria). Every row gets
    every column: pyarrow takes the columns from the first row, and the first rows (the unadapted model, the
    baselines) have no criterion columns."""
    columns = [*leading, *RESULT_COLUMNS, *criterion_columns(rows)]
    return pa.Table.from_pylist([{column: row.get(column) for column in columns} for row in rows])


def marker_means(rows: list[dict], metric: str = "pearson") -> dict[str, float]:
    """`{metric}_{marker}` (the mean over the model's test images) for each marker, and `{metric}`, their mean;
    empty when no row has a finite value (a target without labels)."""
    means: dict[str, float] = {}
    for marker in sorted({row["marker"] for row in rows}):
        values = [row[metric] for row in rows if row["marker"] == marker and is_finite(row.get(metric))]
        if values:
            means[f"{metric}_{marker}"] = float(np.mean(values))
    if means:
        means[metric] = float(np.mean(list(means.values())))
    return means


def model_params(row: dict) -> dict:
    """A model's identity (`PARAMS`) from one of its rows, as its MLflow run's params."""
    params = {name: row.get(name) for name in PARAMS}
    params["matched"] = params["matched"] or str(row["layer"])
    return params


def model_metrics(rows: list[dict]) -> dict[str, float]:
    """One model's rows -> the metrics its MLflow run carries (the study's model runs, the sweep's trial runs):
    each metric averaged over test images, overall and per marker, the adaptation's flags and the criteria."""
    first = rows[0]
    metrics: dict[str, float] = {}
    for metric in METRICS:
        values = [row[metric] for row in rows if is_finite(row.get(metric))]
        if values:
            metrics[metric] = float(np.mean(values))  # over every image and marker, as the study has always logged it
        metrics.update({key: value for key, value in marker_means(rows, metric).items() if key != metric})
    metrics["collapsed"] = float(bool(first.get("collapsed")))
    metrics["d_saturated"] = float(bool(first.get("d_saturated")))
    for name in ("g_updates", "seconds"):
        if is_finite(first.get(name)):
            metrics[name] = float(first[name])
    if first.get("fell_back") is not None:  # a label-free choice: did it keep the unadapted model?
        metrics["fell_back"] = float(bool(first["fell_back"]))
    metrics.update({key: float(value) for key, value in first.items() if key.startswith(CRITERION_PREFIX) and is_finite(value)})
    return metrics
