"""`lmadda report` and the sweep report: text tables from a per-image results table, and the figures
the rows allow (drawn by `lmadda.study.figures`)."""

from __future__ import annotations

import math
from pathlib import Path

from lmadda.evaluation.metrics import finite_mean_std
from lmadda.study.figures import plot_pearson_by_layer, plot_pearson_vs_magnitude
from lmadda.study.results import aggregate

METHOD_ORDER = ["unadapted", "adabn", "histogram_matching", "histogram_matching+adabn", "fda", "robust", "robust+adabn",
                "robust+histogram_matching", "lmadda", "adda", "lmadda_paper", "adda_paper", "moments", "self_training",
                "histogram_matching+self_training", "label_free", "oracle"]
LAYERED = ("lmadda", "adda", "lmadda_paper", "adda_paper", "moments", "self_training", "histogram_matching+self_training")


def _method_label(method: str, layer: int) -> str:
    if method == "label_free":
        return "label-free choice"
    family = method.split(" [")[0]
    return f"{method} L{layer}" if layer >= 0 and family in LAYERED else method


def _order(method: str) -> int:
    """Where a method's lines go: its family's place (`adabn:3` beside `adabn`), unknown methods last."""
    family = method.split(" [")[0].split(":")[0]
    return METHOD_ORDER.index(family) if family in METHOD_ORDER else len(METHOD_ORDER)


def choice_lines(rows: list[dict]) -> list[str]:
    """Per target: the label-free choice beside the unadapted model and the best cheap baseline (test Pearson)."""
    lines = []
    for target in sorted({r["target"] for r in rows if r["method"] == "label_free"}):
        def mean(method: str, **match) -> float:
            values = [r["pearson"] for r in rows if r["target"] == target and r["method"] == method
                      and all(r.get(k) == v for k, v in match.items())]
            return finite_mean_std(values)[0]

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
                         key=lambda k: (_order(k[0]), k[1], k[0]))
        lines += ["", f"{target}", f"  {'method':30s}" + "".join(f"{m:>18s}" for m in markers)]
        for method, layer in methods:
            cells = []
            for marker in markers:
                entry = stats.get((target, marker, method, layer))
                text = "" if entry is None else f"{entry[0]:.3f} ± {entry[1]:.3f}" + ("*" if entry[3] else "")
                cells.append(f"{text:>18s}")
            lines.append(f"  {_method_label(method, layer):30s}" + "".join(cells))
    return "\n".join(lines)


REPORT_FILES = ("summary.txt", "pearson_by_layer.png", "pearson_vs_magnitude.png")  # what `write_report` may write in its folder


def write_report(rows: list[dict], out_dir: Path) -> list[Path]:
    """The text table and every figure the rows allow (`REPORT_FILES`)."""
    summary, by_layer, by_magnitude = (out_dir / name for name in REPORT_FILES)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary.write_text(summary_table(rows) + "\n")
    written = [summary]
    for path in (plot_pearson_by_layer(rows, by_layer), plot_pearson_vs_magnitude(rows, by_magnitude)):
        if path is not None:
            written.append(path)
    return written
