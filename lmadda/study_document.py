"""The study document (its config's `document`, e.g. docs/study.md) and its figures, written from the study's MLflow runs (`lmadda study`).

Every number in the document is computed here from the tracking store; the statements under
"What held up" are computed too (a claim holds when its gain exceeds the seeds' spread), so the
document cannot say more than the runs show.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from lmadda import __version__
from lmadda.report import label_axis, save_grid
from lmadda.selection import CRITERIA as PER_TRIAL_CRITERIA
from lmadda.selection import criterion_agreement, spearman
from lmadda.study_config import ExperimentSpec, StudyConfig
from lmadda.study_failures import failed_targets_section
from lmadda.study_runner import experiment_name
from lmadda.study_summary import choice_table, summary_records, verdict, write_summary
from lmadda.study_tracking import read_study
from lmadda.training.adapt import AdaptConfig

BASELINE_METHODS = ("unadapted", "adabn", "histogram_matching", "fda")
ADAPTED = ("lmadda", "adda")
CRITERIA = {  # label-free criterion -> what it is (all: lower is better)
    "lf_output_w1": "W1 between predicted target stains and the source model's source stains",
    "lf_probe_shift": "bottleneck channel-mean shift of target vs source activations",
    "lf_flip_inconsistency": "prediction change under a mirrored input",
    "lf_seed_disagreement": "ensemble uncertainty: spread of predictions across seeds (SIT-ADDA-Auto's signal)",
    "lf_layer_disagreement": "distance to the median prediction of the models adapted at every layer",
}
PUBLISHED_BASELINE = "lf_seed_disagreement"


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan"), 0
    return float(np.mean(finite)), float(np.std(finite)), len(finite)


def _cell(values: list[float], collapsed: bool = False, unmoved: bool = False) -> str:
    mean, std, n = _mean_std(values)
    if n == 0:
        return "—"
    text = f"{mean:.3f}" if n == 1 else f"{mean:.3f} ± {std:.3f}"
    return text + (" *" if collapsed else "") + (" °" if unmoved else "")


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
        """The paper's rule: learning rates whose runs collapsed at no layer (any seed)."""
        return [lr for lr in self.lrs(target) if not any(m["collapsed"] for m in self.select(target, ADAPTED, lr=lr))]

    def mean_over_layers(self, target: str, lr: float) -> float:
        return _mean_std([m["pearson"] for m in self.select(target, ADAPTED, lr=lr)])[0]

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
            entry = {"pearson": _mean_std([r.get(metric, float("nan")) for r in runs])[0],
                     "values": [r.get(metric, float("nan")) for r in runs], "collapsed": any(r["collapsed"] for r in runs),
                     "layer": runs[0]["layer"], "target": target}
            for criterion in CRITERIA:
                entry[criterion] = _mean_std([r.get(criterion, float("nan")) for r in runs])[0]
            result[key] = entry
        return result

    def best_single(self, target: str, lr: float | None) -> tuple[int, dict] | None:
        configs = {k: v for k, v in self.config_means(target).items() if k[2] == lr and not v["collapsed"]}
        if not configs:
            return None
        key = max(configs, key=lambda k: configs[k]["pearson"])
        return configs[key]["layer"], configs[key]


# ----------------------------------------------------------------------------------------- tables


def main_table(results: Results) -> list[str]:
    header = ["unadapted", "AdaBN", "histogram", "FDA", "ADDA (published)", "ADDA (lmadda recipe)", "best LM-ADDA (layer)",
              "label-free choice", "oracle"]
    lines = ["| target | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for target in results.targets:
        lr = results.chosen_lr(target)
        cells = [_cell([m["pearson"] for m in results.select(target, method)]) for method in BASELINE_METHODS]
        published = results.select(target, "adda_paper")
        cells.append(_cell([m["pearson"] for m in published], any(m["collapsed"] for m in published), never_moved(published)))
        adda = results.select(target, "adda", lr=lr)
        cells.append(_cell([m["pearson"] for m in adda], any(m["collapsed"] for m in adda), never_moved(adda)))
        best = results.best_single(target, lr)
        cells.append("—" if best is None else f"{_cell(best[1]['values'])} (L{best[0]})")
        cells.append(_cell([m["pearson"] for m in results.select(target, "label_free")]))
        cells.append(_cell([m["pearson"] for m in results.select(target, "oracle")]))
        lines.append(f"| {target} | " + " | ".join(cells) + " |")
    return lines


def per_marker_table(results: Results) -> list[str]:
    header = ["target", "method"] + results.markers
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for target in results.targets:
        lr = results.chosen_lr(target)
        best = results.best_single(target, lr)
        rows = [(name, results.select(target, name)) for name in BASELINE_METHODS]
        rows.append(("ADDA", results.select(target, "adda", lr=lr)))
        if best is not None:
            rows.append((f"LM-ADDA L{best[0]}", results.select(target, ADAPTED, lr=lr, layer=best[0])))
        rows.append(("oracle", results.select(target, "oracle")))
        for name, runs in rows:
            if runs:
                lines.append(f"| {target} | {name} | " + " | ".join(_cell([r.get(f"pearson_{m}", float('nan')) for r in runs]) for m in results.markers) + " |")
    return lines


def lr_table(results: Results) -> list[str]:
    lines = ["| target | learning rate | layers that collapsed (any seed) | mean Pearson over layers | stable | used |",
             "|---|---|---|---|---|---|"]
    for target in results.targets:
        if len(results.lrs(target)) < 2:
            continue
        for lr in results.lrs(target):
            collapsed = sorted({m["layer"] for m in results.select(target, ADAPTED, lr=lr) if m["collapsed"]})
            lines.append(f"| {target} | {lr:g} | {', '.join(map(str, collapsed)) or 'none'} | {results.mean_over_layers(target, lr):.3f} | "
                         f"{'yes' if lr in results.stable_lrs(target) else 'no'} | {'**yes**' if lr == results.chosen_lr(target) else ''} |")
    return lines


def movement_table(results: Results) -> list[str]:
    """How often G' moved at all: the gate lets G' step only while D tells the domains apart, so a
    model with no G' step is the source model, and its Pearson says nothing about matching that layer."""
    known = [m for m in results.models if m["method"] in (*ADAPTED, "lmadda_multi") and m.get("g_updates") is not None
             and math.isfinite(m["g_updates"])]
    if not known:
        return []
    lines = ["| target | learning rate | models where G' moved | median G' steps | layers where G' never moved (any seed) |",
             "|---|---|---|---|---|"]
    for target in results.targets:
        for lr in results.lrs(target):
            runs = [m for m in known if m["target"] == target and m["lr"] == lr]
            if not runs:
                continue
            still = sorted({m["matched"] or str(m["layer"]) for m in runs if m["g_updates"] == 0}, key=lambda t: [int(x) for x in t.split("+")])
            moved = sum(m["g_updates"] > 0 for m in runs)
            lines.append(f"| {target} | {lr:g} | {moved} of {len(runs)} | {np.median([m['g_updates'] for m in runs]):.0f} | "
                         f"{', '.join(still) or 'none'} |")
    return lines


def layer_table(results: Results) -> list[str]:
    """Pearson (mean over markers and seeds) per matched layer at the used rate, one column per target."""
    targets = [t for t in results.targets if len(results.layers(t)) >= 4]
    if not targets:
        return []
    layers = sorted({l for t in targets for l in results.layers(t)})
    lines = ["| layer | " + " | ".join(targets) + " |", "|---" * (len(targets) + 1) + "|"]
    for layer in layers:
        cells = []
        for target in targets:
            runs = results.select(target, ADAPTED, lr=results.chosen_lr(target), layer=layer)
            best = results.best_single(target, results.chosen_lr(target))
            text = _cell([r["pearson"] for r in runs], any(r["collapsed"] for r in runs), never_moved(runs))
            cells.append(f"**{text}**" if best is not None and best[0] == layer else text)
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    unadapted = [_cell([m["pearson"] for m in results.select(t, "unadapted")]) for t in targets]
    lines.append("| unadapted | " + " | ".join(unadapted) + " |")
    return lines


def multi_layer_table(results: Results) -> list[str]:
    lines = ["| target | matched | Pearson | vs best single layer |", "|---|---|---|---|"]
    found = False
    for target in results.targets:
        lr = results.chosen_lr(target)
        multi = {k: v for k, v in results.config_means(target, ("lmadda_multi",)).items() if k[2] == lr}
        if not multi:
            continue
        found = True
        best = results.best_single(target, lr)
        adda = results.select(target, "adda", lr=lr)
        if best is not None:
            lines.append(f"| {target} | layer {best[0]} (best single) | {_cell(best[1]['values'])} | |")
        lines.append(f"| {target} | ADDA (last layer) | {_cell([m['pearson'] for m in adda])} | |")
        for (_, matched, _), entry in sorted(multi.items(), key=lambda kv: kv[0][1]):
            delta = "" if best is None else f"{entry['pearson'] - best[1]['pearson']:+.3f}"
            lines.append(f"| {target} | layers {matched.replace('+', ', ')} | {_cell(entry['values'], entry['collapsed'])} | {delta} |")
    return lines if found else []


# ------------------------------------------------------------------------------ label-free selection


def selection_rows(results: Results) -> list[dict]:
    """Every single-layer configuration (layer x lr), seeds averaged: the candidates a lab chooses among."""
    rows = []
    for target in results.targets:
        for (method, matched, lr), entry in results.config_means(target).items():
            rows.append({**entry, "target": target, "method": method, "matched": matched, "lr": lr})
    return rows


def selection_table(results: Results) -> tuple[list[str], dict[str, dict], dict[str, float]]:
    """The criteria table, each criterion's agreement with the labelled Pearson, and the regret of the
    choices that use no criterion (`reference_regrets`)."""
    rows = selection_rows(results)
    scores = {criterion: criterion_agreement(rows, criterion, "pearson") for criterion in CRITERIA}
    lines = ["| criterion | Spearman with labelled Pearson | regret (Pearson lost) | targets | what it measures |", "|---|---|---|---|---|"]
    for criterion, score in scores.items():
        if score["targets"] == 0:
            continue
        label = f"`{criterion[3:]}`" + (" (published baseline)" if criterion == PUBLISHED_BASELINE else "")
        lines.append(f"| {label} | {score['spearman']:.2f} | {score['regret']:.3f} | {score['targets']} | {CRITERIA[criterion]} |")
    reference = reference_regrets(rows)
    for name, value in reference.items():
        lines.append(f"| {name} | — | {value:.3f} | {len({r['target'] for r in rows})} | no criterion |")
    return lines, scores, reference


def reference_regrets(rows: list[dict]) -> dict[str, float]:
    """Regret of choices that use no criterion: a random configuration (expected), always ADDA, always layer 0."""
    random, adda, first = [], [], []
    for target in sorted({r["target"] for r in rows}):
        trials = [r for r in rows if r["target"] == target and not r["collapsed"] and math.isfinite(r["pearson"])]
        if len(trials) < 3:
            continue
        best = max(r["pearson"] for r in trials)
        random.append(best - float(np.mean([r["pearson"] for r in trials])))
        for bucket, method, layer in ((adda, "adda", None), (first, None, 0)):
            chosen = [r for r in trials if (method and r["method"] == method) or (layer is not None and r["layer"] == layer)]
            if chosen:  # several learning rates: the expected regret over them
                bucket.append(best - float(np.mean([r["pearson"] for r in chosen])))
    return {"random configuration (expected)": float(np.mean(random)) if random else float("nan"),
            "always ADDA": float(np.mean(adda)) if adda else float("nan"),
            "always layer 0": float(np.mean(first)) if first else float("nan")}


def predictor_table(results: Results) -> list[str]:
    lines = ["| target | predicted layer (no training) | best layer (labelled) | Pearson at predicted | at best | regret |", "|---|---|---|---|---|---|"]
    regrets = []
    for target in results.targets:
        profile = results.profiles.get(target)
        lr = results.chosen_lr(target)
        best = results.best_single(target, lr)
        if profile is None or best is None or len(results.layers(target)) < 4:
            continue
        configs = results.config_means(target)
        layer = profile["predicted_layer"]
        # nearest swept layer when the predicted one was not swept
        swept = min(results.layers(target), key=lambda l: abs(l - layer))
        at = next((v for k, v in configs.items() if k[2] == lr and v["layer"] == swept), None)
        if at is None:
            continue
        regret = best[1]["pearson"] - at["pearson"]
        regrets.append(regret)
        lines.append(f"| {target} | {layer}{'' if swept == layer else f' (swept: {swept})'} | {best[0]} | {at['pearson']:.3f} | "
                     f"{best[1]['pearson']:.3f} | {regret:.3f} |")
    if regrets:
        lines.append(f"| **mean** | | | | | **{np.mean(regrets):.3f}** |")
    return lines if regrets else []


# ------------------------------------------------------------------------------------------ figures


def _figure(rows: int, columns: int, width: float = 3.6, height: float = 2.8):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)


def plot_by_layer(results: Results, out: Path) -> Path | None:
    targets = [t for t in results.targets if len(results.layers(t)) >= 4]
    if not targets:
        return None
    figure, axes = _figure(len(results.markers), len(targets))
    styles = {"unadapted": ("black", "--"), "adabn": ("tab:green", "--"), "histogram_matching": ("tab:purple", "--"),
              "fda": ("tab:brown", "--"), "oracle": ("tab:red", ":")}
    for col, target in enumerate(targets):
        for row, marker in enumerate(results.markers):
            axis = axes[row][col]
            metric = f"pearson_{marker}"
            for index, lr in enumerate(results.lrs(target)):
                configs = results.config_means(target, metric=metric)
                points = sorted((v["layer"], v["pearson"], float(np.nanstd(v["values"])), v["collapsed"]) for k, v in configs.items() if k[2] == lr)
                if not points:
                    continue
                x, y, err, collapsed = zip(*points)
                used = lr == results.chosen_lr(target)
                axis.errorbar(x, y, yerr=err, marker="o", markersize=3, capsize=2, linewidth=1.6 if used else 0.8,
                              alpha=1.0 if used else 0.5, label=f"LM-ADDA lr {lr:g}" + (" (used)" if used else ""), color=f"C{index}")
                bad = [(a, b) for a, b, c in zip(x, y, collapsed) if c]
                if bad:
                    axis.scatter(*zip(*bad), marker="x", color="red", zorder=5, label="collapsed" if index == 0 else None)
            for method, (colour, style) in styles.items():
                values = [m.get(metric, float("nan")) for m in results.select(target, method)]
                if values:
                    axis.axhline(np.nanmean(values), color=colour, linestyle=style, linewidth=1, label=method)
            label_axis(axis, f"{target} — {marker}", f"matched layer ({max(results.layers(target))} = ADDA)", "Pearson")
    return save_grid(figure, axes, out)


def plot_vs_magnitude(results: Results, out: Path) -> Path | None:
    shifts = defaultdict(list)
    for target in results.targets:
        if results.shift_of(target) != "none":
            shifts[results.shift_of(target)].append(target)
    shifts = {s: sorted(ts, key=results.magnitude_of) for s, ts in shifts.items() if len(ts) >= 2}
    if not shifts:
        return None
    figure, axes = _figure(len(results.markers), len(shifts))
    for col, (shift, targets) in enumerate(shifts.items()):
        for row, marker in enumerate(results.markers):
            axis = axes[row][col]
            metric = f"pearson_{marker}"
            magnitudes = [results.magnitude_of(t) for t in targets]
            curves = {name: [np.nanmean([m.get(metric, float("nan")) for m in results.select(t, name)] or [float("nan")]) for t in targets]
                      for name in (*BASELINE_METHODS, "oracle")}
            curves["ADDA"] = [np.nanmean([m.get(metric, float("nan")) for m in results.select(t, "adda", lr=results.chosen_lr(t))] or [float("nan")]) for t in targets]
            best = []
            for t in targets:
                configs = {k: v for k, v in results.config_means(t, metric=metric).items() if k[2] == results.chosen_lr(t) and not v["collapsed"]}
                best.append(max((v["pearson"] for v in configs.values()), default=float("nan")))
            curves["LM-ADDA (best layer)"] = best
            for name, values in curves.items():
                if any(math.isfinite(v) for v in values):
                    axis.plot(magnitudes, values, marker="o", markersize=3, label=name)
            label_axis(axis, f"{shift} — {marker}", f"{shift} magnitude", "Pearson")
    return save_grid(figure, axes, out)


def plot_selection(results: Results, criteria: list[str], out: Path) -> Path | None:
    """Per target: each criterion (x, lower is better) against the labelled Pearson (y) over layer x lr configurations."""
    rows = selection_rows(results)
    counts = {t: sum(r["target"] == t for r in rows) for t in results.targets}
    most = max(counts.values(), default=0)  # the main grid's targets: the others have too few points to show a ranking
    targets = [t for t in results.targets if counts[t] == most and most >= 3]
    criteria = [c for c in criteria if any(math.isfinite(r.get(c, float("nan"))) for r in rows if r["target"] in targets)]
    if not targets or not criteria:
        return None
    figure, axes = _figure(len(criteria), len(targets), width=3.0, height=2.5)
    for col, target in enumerate(targets):
        for row, criterion in enumerate(criteria):
            axis = axes[row][col]
            trials = [r for r in rows if r["target"] == target and math.isfinite(r.get(criterion, float("nan")))]
            ok = [r for r in trials if not r["collapsed"]]
            axis.scatter([r[criterion] for r in ok], [r["pearson"] for r in ok], s=10, c=[r["layer"] for r in ok], cmap="viridis", label="layer x lr")
            bad = [r for r in trials if r["collapsed"]]
            if bad:
                axis.scatter([r[criterion] for r in bad], [r["pearson"] for r in bad], s=14, marker="x", color="red", label="collapsed")
            rho = spearman([-r[criterion] for r in ok], [r["pearson"] for r in ok])
            label_axis(axis, f"{target}\nSpearman {rho:.2f}", criterion[3:], "Pearson")
            axis.title.set_fontsize(7)
    return save_grid(figure, axes, out)


def plot_profiles(results: Results, out: Path) -> Path | None:
    targets = [t for t in results.targets if t in results.profiles and len(results.layers(t)) >= 4]
    if not targets:
        return None
    columns = min(4, len(targets))
    figure, axes = _figure(-(-len(targets) // columns), columns, width=3.2, height=2.6)
    for axis in axes.flat[len(targets):]:
        axis.set_visible(False)
    for col, target in enumerate(targets):
        axis = axes.flat[col]
        profile = results.profiles[target]["profile"]
        axis.plot(range(len(profile)), profile, marker="o", markersize=3, color="tab:gray", label="discrepancy (unadapted)")
        axis.axvline(results.profiles[target]["predicted_layer"], color="tab:gray", linestyle=":", label="predicted layer")
        twin = axis.twinx()
        configs = {k: v for k, v in results.config_means(target).items() if k[2] == results.chosen_lr(target)}
        points = sorted((v["layer"], v["pearson"]) for v in configs.values())
        if points:
            twin.plot(*zip(*points), marker="s", markersize=3, color="tab:blue", label="Pearson after LM-ADDA")
            twin.tick_params(labelsize=7)
        label_axis(axis, target, "layer", "discrepancy")
        if col == 0:
            handles = axis.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
            labels = axis.get_legend_handles_labels()[1] + twin.get_legend_handles_labels()[1]
            axis.legend(handles, labels, fontsize=6, loc="upper right")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=80)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return out


# ------------------------------------------------------------------------------------- what held up


NOISE_FLOOR = 0.005  # Pearson differences below this are not called a difference, whatever the seeds say


def _seed_std(runs: list[dict]) -> float:
    values = [r["pearson"] for r in runs if math.isfinite(r["pearson"])]
    return float(np.std(values)) if len(values) > 1 else 0.0


def _verdict(items: list[tuple[str, float, float, str]], claim: str) -> str:
    """items: (target, gain, spread, where). A gain counts when it exceeds 2 x spread and the noise floor."""
    held = [i for i in items if i[1] > max(2 * i[2], NOISE_FLOOR)]
    details = "; ".join(f"{t}: {g:+.3f}{f' ± {sd:.3f}' if sd else ''}{f' ({w})' if w else ''}" for t, g, sd, w in items)
    return f"- {claim}: **{len(held)} of {len(items)} targets**" + (f" ({details})" if items else "")


def label_free_choice(results: Results, target: str, criterion: str) -> dict | None:
    """The (layer, lr) configuration a lab without labels would take: the criterion's lowest, non-collapsed."""
    configs = [v for v in results.config_means(target).values() if not v["collapsed"] and math.isfinite(v.get(criterion, float("nan")))]
    return min(configs, key=lambda v: v[criterion]) if configs else None


def findings(results: Results, scores: dict[str, dict], reference: dict[str, float]) -> list[str]:
    """Each claim the issue asks about, decided from the runs. A difference counts when it exceeds twice
    the seed spread and NOISE_FLOOR; with one seed only the floor applies. Choosing the best of many
    layers by labelled Pearson is optimistic (the maximum of noisy values), so the claims about
    adaptation are also made for choices that use no labels: ADDA, and the best criterion's choice."""
    ranked = sorted(((c, s) for c, s in scores.items() if s["targets"]), key=lambda cs: cs[1]["regret"])
    criterion = ranked[0][0] if ranked else None
    adda_gain, best_gain, free_gain, lm_vs_adda, early, multi = [], [], [], [], [], []
    adda_still, oracle_below = [], []
    for target in results.targets:
        lr = results.chosen_lr(target)
        unadapted = _mean_std([m["pearson"] for m in results.select(target, "unadapted")])[0]
        adda = results.select(target, "adda", lr=lr)
        best = results.best_single(target, lr)
        oracle = _mean_std([m["pearson"] for m in results.select(target, "oracle")])[0]
        if oracle < unadapted - NOISE_FLOOR:
            oracle_below.append(f"{target}: {oracle:.3f} vs {unadapted:.3f}")
        if never_moved(adda):
            adda_still.append(target)
        if adda:
            adda_mean = _mean_std([m["pearson"] for m in adda])[0]
            adda_gain.append((target, adda_mean - unadapted, _seed_std(adda), ""))
        if best is not None and len(results.layers(target)) >= 2:
            spread = float(np.std(best[1]["values"])) if len(best[1]["values"]) > 1 else 0.0
            best_gain.append((target, best[1]["pearson"] - unadapted, spread, f"layer {best[0]}"))
            if adda:
                lm_vs_adda.append((target, best[1]["pearson"] - adda_mean, max(spread, _seed_std(adda)), f"layer {best[0]}"))
            if results.shift_of(target) == "overexposure":
                early.append((target, best[0], len(results.layers(target))))
            for (_, matched, multi_lr), entry in results.config_means(target, ("lmadda_multi",)).items():
                if multi_lr == lr:
                    multi.append((target, matched, entry["pearson"] - best[1]["pearson"], entry["pearson"] - (adda_mean if adda else float("nan"))))
        if criterion is not None:
            chosen = label_free_choice(results, target, criterion)
            if chosen is not None:
                spread = float(np.std(chosen["values"])) if len(chosen["values"]) > 1 else 0.0
                free_gain.append((target, chosen["pearson"] - unadapted, spread, f"layer {chosen['layer']}"))

    adda_line = _verdict(adda_gain, "ADDA (no layer choice) beats the unadapted model")
    if adda_still:
        adda_line += (f". In {len(adda_still)} of {len(adda_gain)} targets ADDA's G' never moved (its discriminator never "
                      "passed the gate), so these say nothing about matching the last layer, only that D found no shift there "
                      "within the steps given")
    lines = [adda_line,
             _verdict(best_gain, "The best matched layer, chosen with labels (optimistic), beats the unadapted model")]
    if criterion is not None:
        lines.append(_verdict(free_gain, f"The layer chosen without labels (`{criterion[3:]}`) beats the unadapted model"))
    lines.append(_verdict(lm_vs_adda, "LM-ADDA at its best layer (chosen with labels, optimistic) beats ADDA"))
    if early:
        lines.append("- Best matched layer for overexposure: " + ", ".join(f"{t}: layer {l} (of {n} layers swept)" for t, l, n in early)
                     + f"; an early encoder layer (0-3) in {sum(l <= 3 for _, l, _ in early)} of {len(early)} targets.")
    if multi:
        worse = sum(d < -NOISE_FLOOR for _, _, d, _ in multi)
        lines.append(f"- Multi-layer matching: {worse} of {len(multi)} layer sets score below the best single layer by more than "
                     f"{NOISE_FLOOR}; {sum(d > NOISE_FLOOR for _, _, _, d in multi)} of {len(multi)} beat ADDA by more than that.")
    if criterion is not None:
        score = scores[criterion]
        baseline = scores.get(PUBLISHED_BASELINE, {})
        text = (f"- Lowest-regret label-free criterion: `{criterion[3:]}` (Spearman {score['spearman']:.2f}, regret "
                f"{score['regret']:.3f} over {score['targets']} targets)")
        if baseline.get("targets"):
            text += (f"; the published baseline, seed disagreement: Spearman {baseline['spearman']:.2f}, regret {baseline['regret']:.3f} "
                     f"over {baseline['targets']} targets")
        text += (f". Without any criterion: always ADDA loses {reference['always ADDA']:.3f}, a random configuration "
                 f"{reference['random configuration (expected)']:.3f} on average")
        lines.append(text + ".")
    known = [m for m in results.models if m["method"] in (*ADAPTED, "lmadda_multi") and math.isfinite(m.get("g_updates", float("nan")))]
    if known:
        lines.append(f"- G' moved at all in {sum(m['g_updates'] > 0 for m in known)} of {len(known)} adapted models; the others "
                     "stayed the source model because the discriminator never passed the gate (table above).")
    if oracle_below:
        lines.append(f"- The oracle scores below the unadapted model on {len(oracle_below)} target(s) ({'; '.join(oracle_below)}): "
                     "fine-tuned on the target pairs of the training fields only (likely overfitting them), it is no upper bound here.")
    lines.append("- Every comparison uses the target labels that the label-free criteria never see. "
                 f"A difference counts when it exceeds twice the seed spread and {NOISE_FLOOR}.")
    return lines


# ------------------------------------------------------------------------------------------ document


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def shrink_png(path: Path, colours: int = 64) -> Path:
    """Committed figures stay small: a 64-colour palette loses nothing visible in line plots and
    grey panels, and cuts the files to a third or less."""
    from PIL import Image

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=colours, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)
    return path


def _relative_path(path: Path, document: Path) -> str:
    try:
        return str(path.relative_to(document.parent))
    except ValueError:
        return str(path)


def _relative(path: Path, document: Path) -> str:
    """The figure's path as the document links it (every linked figure is shrunk first)."""
    shrink_png(path)
    return _relative_path(path, document)


def experiment_section(spec: ExperimentSpec, config: StudyConfig, config_path: Path | str = "...") -> tuple[list[str], dict[str, float]]:
    """The document's section for one experiment, and the regret of each label-free choice there."""
    models, profiles, artifacts = read_study(config.tracking_uri, experiment_name(spec))
    lines = [f"## {spec.title}", "", spec.about.strip(), "", *failed_targets_section(config.out / spec.name)]
    if not models:
        return lines + [f"No results in MLflow yet: run `lmadda study --config {config_path} --only {spec.name}`.", ""], {}
    results = Results(models, profiles)
    adapted = sum(m["method"] in (*ADAPTED, "lmadda_multi") for m in models)
    seeds = sorted({m["seed"] for m in models})
    lines += [f"{adapted} adapted models, seeds {', '.join(map(str, seeds))}; adaptation options {spec.adapt}. "
              f"Pearson is per test image, averaged over markers ({', '.join(results.markers)}) and test images; "
              "± is the standard deviation over seeds; * marks a collapsed run.", ""]
    figures = config.figures
    prefix = spec.name

    lines += ["### Pearson by method", "", *main_table(results), "",
              "ADDA (published) is Tzeng et al.'s recipe (no gate, one learning rate, `recipe: paper`); ADDA (lmadda recipe) "
              "and LM-ADDA use this project's stabilised recipe at the learning rate the rule below picks. \"best LM-ADDA\" "
              "is the best layer by labelled test Pearson (an upper bound on what a lab without labels gets); the "
              "label-free choice is what the selector picked per seed without labels (see \"Which model to use\"). "
              "The oracle is the source model fine-tuned on target pairs (first seed only).", "",
              "<details><summary>Per marker</summary>", "", *per_marker_table(results), "", "</details>", ""]
    lr_lines = lr_table(results)
    if len(lr_lines) > 2:
        lines += ["### Learning-rate rule", "",
                  "The paper keeps only learning rates that collapse at no layer (here: a non-finite or unbounded "
                  "generator loss, or a saturated discriminator) and reports the best of those; the tables above and "
                  "below use, per target, the stable rate with the best mean Pearson over all layers (a choice that "
                  "uses labels, as the paper's does). When none is stable the smallest is used.", "", *lr_lines, ""]
    movement = movement_table(results)
    if movement:
        adapt_options = AdaptConfig(layer=[0], **spec.adapt)
        lines += ["### Did the adapted generator move?", "",
                  f"G' steps only while the discriminator's running accuracy is at least the gate ({adapt_options.gate_accuracy}) "
                  f"after {adapt_options.d_warmup_steps} D-only steps: when D cannot tell target from source features "
                  f"within the {adapt_options.steps} steps, G' keeps "
                  "the source weights and the \"adapted\" model is the unadapted one. Counted per model:", "", *movement, ""]
    by_layer = layer_table(results)
    if by_layer:
        lines += ["### Pearson by matched layer", "", *by_layer, "",
                  "Bold: the best layer per target." + (" ° G' never moved in any seed: the model is the source model." if movement else ""), ""]
    figure = plot_by_layer(results, figures / f"{prefix}_pearson_by_layer.png")
    if figure:
        lines += [f"![Pearson by matched layer]({_relative(figure, config.document)})", ""]
    figure = plot_vs_magnitude(results, figures / f"{prefix}_pearson_vs_magnitude.png")
    if figure:
        lines += ["### Pearson vs shift magnitude", "", f"![Pearson vs magnitude]({_relative(figure, config.document)})", ""]
    multi = multi_layer_table(results)
    if multi:
        lines += ["### Single-layer vs multi-layer matching", "",
                  "The paper's \"less is more\": matching one well-chosen layer against matching several at once "
                  "(one discriminator per layer, equal weights).", "", *multi, ""]
    if artifacts is not None and (artifacts / "panels").is_dir():
        lines += ["### Sample panels", "", "Input, truth, unadapted and the best adapted layer, first marker, centre of the first test field.", ""]
        for panel in sorted((artifacts / "panels").glob("*.png")):
            copied = figures / f"{prefix}_{panel.name}"
            copied.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(panel, copied)
            lines += [f"![{panel.stem}]({_relative(copied, config.document)})", ""]

    selection, scores, reference = selection_table(results)
    lines += ["### Choosing the layer without target labels", "",
              "Each candidate is one (layer, learning rate) configuration, seeds averaged. Spearman: rank correlation of "
              "the criterion (lower is better) with the labelled Pearson per target, averaged over targets; regret: "
              "Pearson lost by taking the criterion's choice instead of the truly best configuration.", "", *selection, ""]
    figure = plot_selection(results, [c for c in CRITERIA], figures / f"{prefix}_criteria.png")
    if figure:
        lines += [f"![criteria vs Pearson]({_relative(figure, config.document)})", ""]
    predictor = predictor_table(results)
    if predictor:
        lines += ["**Zero-training layer predictor.** The unadapted source model runs once on source and target crops; "
                  "the discrepancy after each layer is the mean channel shift in units of the source's spread; the "
                  "predicted layer is the first that reaches half of the profile's maximum (a rule fixed before "
                  "looking at any result).", "", *predictor, ""]
        figure = plot_profiles(results, figures / f"{prefix}_profiles.png")
        if figure:
            lines += [f"![discrepancy profiles]({_relative(figure, config.document)})", ""]
    lines += ["### What held up", "", *findings(results, scores, reference), ""]
    return lines, {c: s["regret"] for c, s in scores.items() if s["targets"]} | reference


def write_study_document(config: StudyConfig, config_path: Path | str = "...") -> Path:
    """`config_path`: the config file as `lmadda study --config` was given it (the document's provenance)."""
    config.figures.mkdir(parents=True, exist_ok=True)
    lines = [f"# {config.title}", "",
             f"Generated by `lmadda study --config {config_path}` from the MLflow runs in `{config.tracking_uri.split('/')[-1]}` "
             f"(lmadda {__version__}, commit {_git_commit()}, {datetime.now(timezone.utc):%Y-%m-%d}). Do not edit by hand: "
             f"change the config or the code and regenerate. `lmadda study --config {config_path} --document-only` rewrites "
             "this file from the tracking store without running anything.", ""]
    sections, records = [], []
    for spec in config.experiments:
        section, _ = experiment_section(spec, config, config_path)
        sections += section
        records += summary_records(spec.name, read_study(config.tracking_uri, experiment_name(spec))[0])
    if records:
        summary = write_summary(records, config.figures / "summary.json")
        lines += ["## Which model to use: the label-free choice", "",
                  "For every target, `lmadda.selector` chose among the unadapted model, AdaBN, histogram matching and every "
                  "adapted model (LM-ADDA at each layer, ADDA with this project's recipe and as published) without target "
                  "labels, and kept the unadapted model unless a candidate was confidently better (docs/method.md). The same "
                  "selector backs `lmadda adapt --layer auto` and `lmadda sweep promote`. Test Pearson, averaged over markers, "
                  "test images and seeds; \"best with labels\" is the best single model by test Pearson, an optimistic bound "
                  "no lab without labels can reach; gap recovered is (choice - unadapted) / (oracle - unadapted). "
                  f"Machine-readable: [{summary.name}]({_relative_path(summary, config.document)}).", "",
                  *choice_table(records), "", "**The bars set for the label-free choice** (issue \"Adaptation that pays off\"):", "",
                  *verdict(records), ""]
    lines += sections
    config.document.parent.mkdir(parents=True, exist_ok=True)
    config.document.write_text("\n".join(lines).rstrip() + "\n")
    return config.document
