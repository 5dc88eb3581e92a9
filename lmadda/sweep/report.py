"""What a finished sweep says: the unadapted reference, the learning rates the paper's rule keeps,
the best model per (marker, target), and the per-layer figures of `lmadda report`.

The paper keeps only learning rates that collapse at no layer (a rate that destroys some layers is
too aggressive to trust at the others); the figures are drawn for every rate, the selection is
reported next to them.
"""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lmadda.study.report import write_report
from lmadda.selection.criteria import CRITERIA, criterion_agreement
from lmadda.study.results import stable_learning_rates


def markers_of(rows: list[dict]) -> list[str]:
    return sorted({k[len("pearson_"):] for r in rows for k in r if k.startswith("pearson_")})


def best_per_target(rows: list[dict], unadapted: dict[str, dict[str, float]]) -> list[dict]:
    """Per (marker, target): the best non-collapsed trial among the stable learning rates, and the gain over unadapted."""
    stable = stable_learning_rates(rows)
    best = []
    for marker in markers_of(rows):
        for target in sorted({r["target"] for r in rows}):
            candidates = [r for r in rows if r["target"] == target and not r["collapsed"] and r["lr"] in stable.get(target, [])
                          and math.isfinite(r.get(f"pearson_{marker}", float("nan")))]
            if not candidates:
                continue
            top = max(candidates, key=lambda r: r[f"pearson_{marker}"])
            reference = unadapted.get(target, {}).get(f"pearson_{marker}", float("nan"))
            best.append({"marker": marker, "target": target, "layer": top["layer"], "lr": top["lr"], "seed": top["seed"],
                         "pearson": top[f"pearson_{marker}"], "unadapted": reference, "gain": top[f"pearson_{marker}"] - reference,
                         "generator_path": top["generator_path"]})
    return best


def write_sweep_report(rows: list[dict], results: list[dict], unadapted: dict[str, dict[str, float]], out_dir: Path) -> list[Path]:
    """Per learning rate, `lmadda report`'s summary and figures of the result rows (`results`: every trial's and the
    unadapted model's, one per model x image x marker); best.parquet and summary.txt from the grid points' rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    reference = [r for r in results if r["method"] == "unadapted"]
    for lr in sorted({r["lr"] for r in rows}):
        adapted = [r for r in results if r["method"] != "unadapted" and r["lr"] == lr]
        if adapted:
            written += write_report(adapted + reference, out_dir / f"lr_{lr:g}")
    best = best_per_target(rows, unadapted)
    if best:
        path = out_dir / "best.parquet"
        pq.write_table(pa.Table.from_pylist(best), path)
        written.append(path)
    summary = out_dir / "summary.txt"
    summary.write_text(format_selection(rows, unadapted, best) + "\n")
    written.append(summary)
    return written


def format_selection(rows: list[dict], unadapted: dict[str, dict[str, float]], best: list[dict]) -> str:
    lines = ["learning rates that collapse at no layer (the paper's rule):"]
    for target, rates in sorted(stable_learning_rates(rows).items()):
        lines.append(f"  {target:34s} {', '.join(f'{lr:g}' for lr in rates) or 'none: every rate collapses somewhere'}")
    lines += ["", "best per (marker, target), among those rates:",
              f"  {'marker':8s} {'target':34s} {'layer':>5} {'lr':>9} {'pearson':>8} {'unadapted':>9} {'gain':>7}"]
    for b in best:
        lines.append(f"  {b['marker']:8s} {b['target']:34s} {b['layer']:>5} {b['lr']:>9.2g} {b['pearson']:8.3f} {b['unadapted']:9.3f} {b['gain']:+7.3f}")
    agreement = [(name, criterion_agreement(rows, f"lf_{name}", "pearson")) for name in CRITERIA if any(f"lf_{name}" in r for r in rows)]
    if agreement and any(math.isfinite(r.get("pearson", float("nan"))) for r in rows):
        lines += ["", "label-free criteria against the labelled Pearson (per target over non-collapsed trials, then averaged):"]
        if not any(result["targets"] for _, result in agreement):  # a ranking needs 3 trials: say so, not a table of nan
            lines.append("  not ranked: no target has 3 non-collapsed trials with labels (sweep more layers or rates)")
        else:
            lines.append(f"  {'criterion':22s} {'Spearman':>9} {'regret':>8} {'targets':>8}")
            for name, result in agreement:
                lines.append(f"  {name:22s} {result['spearman']:9.3f} {result['regret']:8.3f} {result['targets']:>8}")
    return "\n".join(lines)
