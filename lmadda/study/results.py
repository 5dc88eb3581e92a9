"""One experiment's runs grouped the ways the analysis, the tables and the figures need them, and the
paper's learning-rate rule, which the sweep's report applies too.

A run is one model's MLflow record as `lmadda.study.tracking.read_study` returns it: target, method,
layer, matched, lr, seed, collapsed, Pearson (marker-averaged and per marker) and the label-free criteria.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Iterable

from lmadda.evaluation.metrics import finite_mean_std

BASELINE_METHODS = ("unadapted", "adabn", "histogram_matching", "fda")
ADAPTED = ("lmadda", "adda")
CRITERIA = {  # label-free criterion column -> what it is (all: lower is better)
    "lf_output_w1": "W1 between predicted target stains and the source model's source stains",
    "lf_probe_shift": "bottleneck channel-mean shift of target vs source activations",
    "lf_flip_inconsistency": "prediction change under a mirrored input",
    "lf_seed_disagreement": "ensemble uncertainty: spread of predictions across seeds (SIT-ADDA-Auto's signal)",
    "lf_layer_disagreement": "distance to the median prediction of the models adapted at every layer",
}
PUBLISHED_BASELINE = "lf_seed_disagreement"


def stable_learning_rates(runs: Iterable[dict]) -> dict[str, list[float]]:
    """The paper's rule, per target: the learning rates none of whose runs collapsed, at any layer and
    any seed (a rate that destroys some layers is too aggressive to trust at the others)."""
    collapsed_at: dict[str, dict[float, bool]] = defaultdict(dict)
    for run in runs:
        rates = collapsed_at[run["target"]]
        rates[run["lr"]] = rates.get(run["lr"], False) or bool(run["collapsed"])
    return {target: sorted(lr for lr, collapsed in rates.items() if not collapsed) for target, rates in collapsed_at.items()}


def never_moved(runs: list[dict]) -> bool:
    """True when G' took no step in any of these runs (the gate kept it at the source weights).
    Runs logged before the counter existed have no `g_updates` and count as unknown, not unmoved."""
    counts = [r.get("g_updates") for r in runs]
    return bool(runs) and all(c is not None and math.isfinite(c) and c == 0 for c in counts)


class Results:
    """One experiment's model runs, grouped the ways the document needs them."""

    def __init__(self, models: list[dict], profiles: list[dict]):
        self.models = models
        self.profiles = {p["target"]: p for p in profiles}
        self.markers = sorted({k[len("pearson_"):] for m in models for k in m if k.startswith("pearson_")})
        order = {"none": 0}
        self.targets = sorted({m["target"] for m in models if m["target"] != "source"},
                              key=lambda t: (order.get(self.shift_of(t), 1), self.shift_of(t), self.magnitude_of(t), t))

    def shift_of(self, target: str) -> str:
        return next((m["shift"] for m in self.models if m["target"] == target), "none")

    def magnitude_of(self, target: str) -> float:
        value = next((m["magnitude"] for m in self.models if m["target"] == target), float("nan"))
        return value if math.isfinite(value) else 0.0

    def select(self, target: str, method: str | tuple[str, ...], **match) -> list[dict]:
        methods = (method,) if isinstance(method, str) else method
        return [m for m in self.models if m["target"] == target and m["method"] in methods
                and all(m.get(k) == v for k, v in match.items())]

    def lrs(self, target: str) -> list[float]:
        return sorted({m["lr"] for m in self.select(target, ADAPTED)})

    def layers(self, target: str) -> list[int]:
        return sorted({m["layer"] for m in self.select(target, ADAPTED)})

    def stable_lrs(self, target: str) -> list[float]:
        return stable_learning_rates(self.select(target, ADAPTED)).get(target, [])

    def mean_over_layers(self, target: str, lr: float) -> float:
        return finite_mean_std([m["pearson"] for m in self.select(target, ADAPTED, lr=lr)])[0]

    def chosen_lr(self, target: str) -> float | None:
        """The paper's reporting: among the stable rates, the one with the best mean Pearson over all
        layers (this uses labels); the smallest rate when none is stable."""
        stable = self.stable_lrs(target)
        lrs = self.lrs(target)
        if not stable:
            return min(lrs) if lrs else None
        return max(stable, key=lambda lr: self.mean_over_layers(target, lr))

    def config_means(self, target: str, methods=ADAPTED, metric: str = "pearson") -> dict[tuple, dict]:
        """(method, matched, lr) -> mean metric over seeds, each criterion's mean, collapsed flag, per-seed values."""
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for m in self.select(target, methods):
            groups[(m["method"], m["matched"], m["lr"])].append(m)
        result = {}
        for key, runs in groups.items():
            entry = {"pearson": finite_mean_std([r.get(metric, float("nan")) for r in runs])[0],
                     "values": [r.get(metric, float("nan")) for r in runs], "collapsed": any(r["collapsed"] for r in runs),
                     "layer": runs[0]["layer"], "target": target}
            for criterion in CRITERIA:
                entry[criterion] = finite_mean_std([r.get(criterion, float("nan")) for r in runs])[0]
            result[key] = entry
        return result

    def best_single(self, target: str, lr: float | None) -> tuple[int, dict] | None:
        configs = {k: v for k, v in self.config_means(target).items() if k[2] == lr and not v["collapsed"]}
        if not configs:
            return None
        key = max(configs, key=lambda k: configs[k]["pearson"])
        return configs[key]["layer"], configs[key]


# ----------------------------------------------------------------------------------------- tables


def aggregate(rows: list[dict], metric: str = "pearson") -> dict[tuple, tuple[float, float, int, bool]]:
    """(target, marker, method, layer) -> (mean, std, n images, collapsed) over images and seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    checkpoints = defaultdict(set)  # `lmadda evaluate` tables name each model's checkpoint: same-layer models stay apart
    for row in rows:
        checkpoints[(row["target"], row["method"], int(row["layer"]))].add(row.get("checkpoint"))
    for row in rows:
        method = row["method"]
        if len(checkpoints[(row["target"], method, int(row["layer"]))]) > 1:
            method = f"{method} [{Path(row['checkpoint']).name}]"
        groups[(row["target"], row["marker"], method, int(row["layer"]))].append(row)
    return {
        key: (*finite_mean_std([r[metric] for r in group])[:2], len(group), any(bool(r.get("collapsed")) for r in group))
        for key, group in groups.items()
    }
