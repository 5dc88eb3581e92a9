"""Every figure lmadda draws (matplotlib, Agg backend): the study document's, `lmadda report`'s and
the sweep report's Pearson by layer and vs magnitude, the criteria and discrepancy-profile plots, and
the sample panels. PNGs that a document links are shrunk to a 64-colour palette.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from lmadda.selection.criteria import spearman
from lmadda.study.analysis import selection_rows
from lmadda.study.results import BASELINE_METHODS, Results, aggregate


def _figure(rows: int, columns: int, width: float = 3.6, height: float = 2.8):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)


def _save(figure, out: Path, dpi: int) -> Path:
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=dpi)
    plt.close(figure)
    return out


def label_axis(axis, title: str, xlabel: str, metric: str) -> None:
    axis.set_title(title, fontsize=9)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(metric)
    axis.grid(alpha=0.3)


def save_grid(figure, axes, out: Path) -> Path:
    """One legend under the panel grid (from the first panel), then write the PNG."""
    handles, labels = axes[0][0].get_legend_handles_labels()
    columns = max(1, min(len(labels), 3 * len(axes[0])))  # as many entries per row as the width holds
    rows = -(-len(labels) // columns)
    figure.legend(handles, labels, loc="lower center", ncol=columns, fontsize=8)
    height = figure.get_size_inches()[1]
    figure.tight_layout(rect=(0, min(0.4, 0.25 * rows / height + 0.02), 1, 1))
    return _save(figure, out, dpi=90)


def stain_panel(domain: str, marker: str, layer: int | str, images: dict[str, np.ndarray], out: Path, title: str) -> Path:
    """The demo's and the study's sample panel: input, truth, unadapted and adapted stain of one field.
    `images`: "input", "truth", "unadapted", "adapted", each (H, W); `layer`: LM-ADDA's layer, or the adapted model's label."""
    label = f"LM-ADDA layer {layer}" if isinstance(layer, int) else layer
    panels = [(f"input ({domain})", images["input"]), (f"truth ({marker})", images["truth"]),
              ("unadapted", images["unadapted"]), (label, images["adapted"])]
    return sample_panel(panels, out, title=title)


def panel_file_name(domain: str) -> str:
    return "panel_" + domain.replace(":", "_").replace("+", "_") + ".png"


# ------------------------------------------------------------ per-image rows (lmadda report, sweeps)


def plot_pearson_by_layer(rows: list[dict], out: Path, metric: str = "pearson") -> Path | None:
    """One panel per target domain: LM-ADDA per matched layer with error bars, baselines as lines."""
    stats = aggregate(rows, metric)
    targets = sorted({t for t, _, _, _ in stats if t != "source"})
    if not targets:
        return None
    markers = sorted({m for _, m, _, _ in stats})
    figure, axes = _figure(len(markers), len(targets), width=4.2, height=3.2)
    colours = {"unadapted": "black", "adabn": "tab:green", "histogram_matching": "tab:purple", "fda": "tab:brown", "oracle": "tab:red"}
    for col, target in enumerate(targets):
        for row_index, marker in enumerate(markers):
            axis = axes[row_index][col]
            layered = sorted((layer, *stats[(target, marker, meth, layer)][:2]) for (t, m, meth, layer) in stats
                             if t == target and m == marker and meth in ("lmadda", "adda"))
            if layered:
                x, y, err = zip(*layered)
                axis.errorbar(x, y, yerr=err, marker="o", capsize=3, color="tab:blue", label="LM-ADDA (last = ADDA)")
                collapsed = [(l, stats[(target, marker, meth, l)][0]) for (t, m, meth, l) in stats
                             if t == target and m == marker and meth in ("lmadda", "adda") and stats[(t, m, meth, l)][3]]
                if collapsed:
                    axis.scatter(*zip(*collapsed), marker="x", color="red", zorder=5, label="collapsed")
            for method, colour in colours.items():
                entry = stats.get((target, marker, method, -1))
                if entry:
                    axis.axhline(entry[0], color=colour, linestyle="--" if method != "oracle" else ":", linewidth=1, label=method)
            label_axis(axis, f"{target} — {marker}", "matched layer", metric)
    return save_grid(figure, axes, out)


def plot_pearson_vs_magnitude(rows: list[dict], out: Path, metric: str = "pearson") -> Path | None:
    """For each shift with several magnitudes: unadapted, best LM-ADDA layer, ADDA and baselines vs magnitude."""
    by_shift: dict[tuple[str, str], set[float]] = defaultdict(set)
    for row in rows:
        if row["shift"] not in (None, "none") and row["magnitude"] is not None and math.isfinite(row["magnitude"]):
            by_shift[(row["setting"], row["shift"])].add(float(row["magnitude"]))
    series_keys = [k for k, mags in by_shift.items() if len(mags) >= 2]
    if not series_keys:
        return None
    markers = sorted({r["marker"] for r in rows})
    figure, axes = _figure(len(markers), len(series_keys), width=4.2, height=3.2)
    for col, (setting, shift) in enumerate(series_keys):
        for row_index, marker in enumerate(markers):
            axis = axes[row_index][col]
            subset = [r for r in rows if r["setting"] == setting and r["shift"] == shift and r["marker"] == marker]
            curves: dict[str, dict[float, float]] = defaultdict(dict)
            stats = aggregate(subset, metric)
            magnitudes = {r["target"]: float(r["magnitude"]) for r in subset}
            best_lm: dict[float, float] = {}
            for (target, _, method, layer), (mean, _, _, collapsed) in stats.items():
                magnitude = magnitudes[target]
                if method == "lmadda":
                    if not collapsed:
                        best_lm[magnitude] = max(best_lm.get(magnitude, -1.0), mean)
                else:
                    curves[method][magnitude] = mean
            curves["LM-ADDA (best layer)"] = best_lm
            for name, curve in curves.items():
                if curve:
                    xs = sorted(curve)
                    axis.plot(xs, [curve[x] for x in xs], marker="o", label=name)
            label_axis(axis, f"{setting} + {shift} — {marker}", "shift magnitude", metric)
    return save_grid(figure, axes, out)


def sample_panel(panels: list[tuple[str, np.ndarray]], out: Path, title: str = "") -> Path:
    """Images side by side (input / truth / unadapted / adapted ...), each stretched to its own range."""
    figure, axes = _figure(1, len(panels), width=2.6, height=2.9)
    for axis, (label, image) in zip(axes[0], panels):
        low, high = np.percentile(image, [0.5, 99.8])
        axis.imshow(image, cmap="gray", vmin=low, vmax=high if high > low else low + 1)
        axis.set_title(label, fontsize=8)
        axis.axis("off")
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return _save(figure, out, dpi=90)



# ------------------------------------------------------------------ the study document's runs


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
    return _save(figure, out, dpi=80)


# ------------------------------------------------------------------------------------- what held up


def shrink_png(path: Path, colours: int = 64) -> Path:
    """Committed figures stay small: a 64-colour palette loses nothing visible in line plots and
    grey panels, and cuts the files to a third or less."""
    from PIL import Image

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=colours, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)
    return path
