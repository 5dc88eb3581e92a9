"""The study document's markdown tables, one function per table, each from `Results` (one experiment)
or from the analysis records (all experiments)."""

from __future__ import annotations

import math

import numpy as np

from lmadda.evaluation.metrics import finite_mean_std
from lmadda.study.analysis import best_cheap, selection_rows
from lmadda.study.results import ADAPTED, BASELINE_METHODS, CRITERIA, PUBLISHED_BASELINE, Results, never_moved


def _cell(values: list[float], collapsed: bool = False, unmoved: bool = False) -> str:
    mean, std, n = finite_mean_std(values)
    if n == 0:
        return "—"
    text = f"{mean:.3f}" if n == 1 else f"{mean:.3f} ± {std:.3f}"
    return text + (" *" if collapsed else "") + (" °" if unmoved else "")


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


def selection_table(results: Results, scores: dict[str, dict], reference: dict[str, float]) -> list[str]:
    """Each criterion's agreement with the labelled Pearson, and the regret of the choices that use no criterion."""
    lines = ["| criterion | Spearman with labelled Pearson | regret (Pearson lost) | targets | what it measures |", "|---|---|---|---|---|"]
    for criterion, score in scores.items():
        if score["targets"] == 0:
            continue
        label = f"`{criterion[3:]}`" + (" (published baseline)" if criterion == PUBLISHED_BASELINE else "")
        lines.append(f"| {label} | {score['spearman']:.2f} | {score['regret']:.3f} | {score['targets']} | {CRITERIA[criterion]} |")
    for name, value in reference.items():
        lines.append(f"| {name} | — | {value:.3f} | {len({r['target'] for r in selection_rows(results)})} | no criterion |")
    return lines


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


# ------------------------------------------------------------------------- all experiments


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def choice_table(records: list[dict]) -> list[str]:
    """The label-free choice beside the unadapted model, the cheap corrections, ADDA and the oracle."""
    lines = ["| experiment | target | unadapted | best cheap | ADDA (published) | label-free choice | chosen (per seed) | "
             "best with labels | oracle | gap recovered |", "|---" * 10 + "|"]
    for r in records:
        cheap = best_cheap(r)
        lf = r["label_free"]
        best = r["best_labelled"]
        recovered = r["gap_recovered_label_free"]
        lines.append(
            f"| {r['experiment']} | {r['target']} | {_number(r['unadapted'])} | "
            + (f"{_number(cheap[1])} ({cheap[0]})" if cheap else "—") + f" | {_number(r['adda'])} | **{_number(lf['pearson'])}** | "
            + (", ".join(lf["choices"]) or "—") + " | "
            + (f"{_number(best['pearson'])} ({best['method']}{'' if best['layer'] < 0 else ' L' + str(best['layer'])})" if best else "—")
            + f" | {_number(r['oracle'])} | " + ("n/a (gap < 0.05)" if recovered is None else f"{recovered:.0%}") + " |")
    return lines


FAMILY_COLUMNS = ("lmadda", "adda_paper", "moments", "self_training", "histogram_matching+self_training", "adabn", "histogram_matching",
                  "histogram_matching+adabn", "fda", "robust", "robust+adabn", "robust+histogram_matching")


def family_table(records: list[dict]) -> list[str]:
    """Target x family: each family's best configuration by test Pearson (bold: the target's best family)."""
    present = [name for name in FAMILY_COLUMNS if any(name in r.get("families", {}) for r in records)]
    present += sorted({name for r in records for name in r.get("families", {})} - set(present))
    lines = ["| experiment | target | covered | unadapted | " + " | ".join(present) + " | oracle |", "|---" * (len(present) + 5) + "|"]
    for r in records:
        families = r.get("families", {})
        cells = []
        for name in present:
            entry = families.get(name)
            text = "—" if entry is None or entry["pearson"] is None else f"{entry['pearson']:.3f}"
            cells.append(f"**{text}**" if name == r.get("best_family") else text)
        covered = {None: "—", True: "yes", False: "no"}[r.get("covered")]
        lines.append(f"| {r['experiment']} | {r['target']} | {covered} | {_number(r['unadapted'])} | " + " | ".join(cells)
                     + f" | {_number(r['oracle'])} |")
    return lines
