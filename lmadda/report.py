"""Tables and figures from a results table: Pearson by matched layer, Pearson vs shift magnitude,
and sample panels, in the style of the paper's figures."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

METHOD_ORDER = ["unadapted", "adabn", "histogram_matching", "fda", "lmadda", "adda", "lmadda_paper", "adda_paper", "label_free", "oracle"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    array = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if array.size == 0:
        return float("nan"), float("nan")
    return float(array.mean()), float(array.std())


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
        key: (*_mean_std([r[metric] for r in group]), len(group), any(bool(r.get("collapsed")) for r in group))
        for key, group in groups.items()
    }


def _method_label(method: str, layer: int) -> str:
    if method == "label_free":
        return "label-free choice"
    family = method.split(" [")[0]
    return f"{method} L{layer}" if layer >= 0 and family in ("lmadda", "adda", "lmadda_paper", "adda_paper") else method


def choice_lines(rows: list[dict]) -> list[str]:
    """Per target: the label-free choice beside the unadapted model and the best cheap baseline (test Pearson)."""
    lines = []
    for target in sorted({r["target"] for r in rows if r["method"] == "label_free"}):
        def mean(method: str, **match) -> float:
            values = [r["pearson"] for r in rows if r["target"] == target and r["method"] == method
                      and all(r.get(k) == v for k, v in match.items())]
            return _mean_std(values)[0]

        chosen = sorted({(r["seed"], r["chosen"], bool(r["fell_back"])) for r in rows if r["target"] == target and r["method"] == "label_free"})
        baselines = {m: mean(m) for m in ("adabn", "histogram_matching", "fda") if math.isfinite(mean(m))}
        best = max(baselines, key=baselines.get) if baselines else None
        picks = ", ".join(f"{name}{' (fell back)' if fell_back else ''}" for _, name, fell_back in chosen)
        lines.append(f"{target}: label-free choice {mean('label_free'):.3f} [{picks}] | unadapted {mean('unadapted'):.3f}"
                     + (f" | best cheap baseline {best} {baselines[best]:.3f}" if best else ""))
    return lines


def summary_table(rows: list[dict], metric: str = "pearson") -> str:
    """Text tables, one block per target domain: a line per method (and matched layer), a column per marker."""
    stats = aggregate(rows, metric)
    targets = sorted({t for t, _, _, _ in stats}, key=lambda t: (t != "source", t))
    markers = sorted({m for _, m, _, _ in stats})
    lines = [f"{metric}: mean ± std over test images (* = run flagged collapsed)"]
    for target in targets:
        methods = sorted({(meth, layer) for t, _, meth, layer in stats if t == target},
                         key=lambda k: (METHOD_ORDER.index(k[0].split(" [")[0]) if k[0].split(" [")[0] in METHOD_ORDER else 99, k[1], k[0]))
        lines += ["", f"{target}", f"  {'method':20s}" + "".join(f"{m:>18s}" for m in markers)]
        for method, layer in methods:
            cells = []
            for marker in markers:
                entry = stats.get((target, marker, method, layer))
                text = "" if entry is None else f"{entry[0]:.3f} ± {entry[1]:.3f}" + ("*" if entry[3] else "")
                cells.append(f"{text:>18s}")
            lines.append(f"  {_method_label(method, layer):20s}" + "".join(cells))
    return "\n".join(lines)


def label_axis(axis, title: str, xlabel: str, metric: str) -> None:
    axis.set_title(title, fontsize=9)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(metric)
    axis.grid(alpha=0.3)


def save_grid(figure, axes, out: Path) -> Path:
    """One legend under the panel grid (from the first panel), then write the PNG."""
    import matplotlib.pyplot as plt

    handles, labels = axes[0][0].get_legend_handles_labels()
    columns = max(1, min(len(labels), 3 * len(axes[0])))  # as many entries per row as the width holds
    rows = -(-len(labels) // columns)
    figure.legend(handles, labels, loc="lower center", ncol=columns, fontsize=8)
    height = figure.get_size_inches()[1]
    figure.tight_layout(rect=(0, min(0.4, 0.25 * rows / height + 0.02), 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=90)
    plt.close(figure)
    return out


def plot_pearson_by_layer(rows: list[dict], out: Path, metric: str = "pearson") -> Path | None:
    """One panel per target domain: LM-ADDA per matched layer with error bars, baselines as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = aggregate(rows, metric)
    targets = sorted({t for t, _, _, _ in stats if t != "source"})
    if not targets:
        return None
    markers = sorted({m for _, m, _, _ in stats})
    figure, axes = plt.subplots(len(markers), len(targets), figsize=(4.2 * len(targets), 3.2 * len(markers)), squeeze=False)
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_shift: dict[tuple[str, str], set[float]] = defaultdict(set)
    for row in rows:
        if row["shift"] not in (None, "none") and row["magnitude"] is not None and math.isfinite(row["magnitude"]):
            by_shift[(row["setting"], row["shift"])].add(float(row["magnitude"]))
    series_keys = [k for k, mags in by_shift.items() if len(mags) >= 2]
    if not series_keys:
        return None
    markers = sorted({r["marker"] for r in rows})
    figure, axes = plt.subplots(len(markers), len(series_keys), figsize=(4.2 * len(series_keys), 3.2 * len(markers)), squeeze=False)
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.9), squeeze=False)
    for axis, (label, image) in zip(axes[0], panels):
        low, high = np.percentile(image, [0.5, 99.8])
        axis.imshow(image, cmap="gray", vmin=low, vmax=high if high > low else low + 1)
        axis.set_title(label, fontsize=8)
        axis.axis("off")
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=90)
    plt.close(figure)
    return out


def write_report(rows: list[dict], out_dir: Path) -> list[Path]:
    """The text table and every figure the rows allow."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "summary.txt"
    table.write_text(summary_table(rows) + "\n")
    written = [table]
    for path in (plot_pearson_by_layer(rows, out_dir / "pearson_by_layer.png"),
                 plot_pearson_vs_magnitude(rows, out_dir / "pearson_vs_magnitude.png")):
        if path is not None:
            written.append(path)
    return written
