"""One grid point, adapted and measured: the trial function the study and the sweep both run.

A grid point is LM-ADDA of the source model at some layer(s), learning rate and seed, on one target
domain. `run_trial` steps an `Adapter` to its end (its last step, or the first step flagged collapsed:
a collapse ends the point, whatever `stop_on_collapse` says), then measures the adapted model once:

- on the target's labelled test images, where they exist: one row per image x marker in the one
  result-row schema (`lmadda.result_rows`), tagged with the point;
- by the label-free criteria on fixed unlabelled target crops (`lmadda.selection.SelectionProbe`).

The study runs it in its own process (`lmadda.study.grid.run_grid`); the sweep runs it in a Ray Tune
trial or as rank 0 of a Ray Train worker group (`lmadda_tune.train_workers`), with the Adapter's
distributed hooks and an `on_record` that reports to Ray and keeps the loop state. What each keeps of
the result (the study its probe predictions, the sweep the generator file) is the caller's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from lmadda.data.dataset import LoadedImage
from lmadda.evaluation import evaluate_generator
from lmadda.result_rows import CRITERION_PREFIX, TargetDomain, tag_rows
from lmadda.selection import SelectionProbe
from lmadda.training.adapt import AdaptResult, Adapter, run_steps


@dataclass
class TrialTarget:
    """What a grid point is measured on: the target domain, its labelled test images (None: the target has no
    labels, only the label-free criteria can judge it) and the label-free probe (None: no criteria)."""

    domain: TargetDomain
    markers: list[str]
    test_images: list[LoadedImage] | None = None
    probe: SelectionProbe | None = None


@dataclass
class TrialResult:
    adapted: AdaptResult
    last_record: dict  # the loop's last log record (its `steps_s` is the time spent inside steps)
    rows: list[dict] = field(default_factory=list)  # one per test image x marker, tagged; empty without labels
    criteria: dict[str, float] = field(default_factory=dict)  # lf_<name> on the probe's crops
    probe_prediction: np.ndarray | None = None  # the adapted model's stains of the probe's crops


def run_trial(adapter: Adapter, target: TrialTarget, tags: dict, *, on_record: Callable[[dict], None] | None = None,
              steps_s: float = 0.0) -> TrialResult:
    """Adapt to the end (`on_record` sees every log record but the last), then measure the adapted model.

    `tags`: the point's identity in the result rows (method, layer, matched, lr, seed, ...); the adaptation's
    own outcome (collapsed, d_saturated, g_updates, seconds) is added here. `steps_s`: time a resumed point
    had spent inside steps before."""
    started = time.perf_counter()
    last = run_steps(adapter, on_record, end_on_collapse=True, steps_s=steps_s)
    adapted = adapter.finish()
    adapted.seconds = time.perf_counter() - started
    result = TrialResult(adapted, last)
    if target.probe is not None:
        criteria, result.probe_prediction = target.probe.measure(adapted.generator, adapted.input_correction)
        result.criteria = {f"{CRITERION_PREFIX}{name}": value for name, value in criteria.items()}
    if target.test_images:
        rows = evaluate_generator(adapted.generator, target.test_images, target.markers, input_transform=adapted.input_correction)
        outcome = dict(collapsed=adapted.collapsed, d_saturated=adapted.d_saturated, g_updates=adapted.g_updates,
                       seconds=adapted.seconds)
        result.rows = tag_rows([{**row, **result.criteria} for row in rows], target.domain, **{**tags, **outcome})
    return result
