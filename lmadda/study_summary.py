"""The study's verdict on the label-free choice, as records (`summary.json`) and as the document's table.

One record per (experiment, target), Pearson averaged over markers, test images and seeds:

    experiment, target, seeds
    unadapted, adabn, histogram, fda, adda, adda_stabilised, oracle   Pearson of each (adda: as published)
    best_labelled  {method, layer, pearson}          the best model chosen WITH test labels (optimistic)
    label_free     {method, layer, pearson, fell_back, choices}   the selector's choice (no labels)
    gap_recovered_label_free   (label_free - unadapted) / (oracle - unadapted), null when that gap < MIN_GAP

The three bars the adaptation issue set are checked here, on targets whose oracle gap is at least
MIN_GAP: the choice recovers >= 60 % of the gap on >= 2/3 of them, is at least as good as the best
cheap baseline on >= 2/3 of them, and is never worse than the unadapted model by more than 0.01.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from lmadda.metrics import gap_recovered

MIN_GAP = 0.05  # an oracle this little above the unadapted model leaves no gap worth recovering
RECOVERY_BAR, SHARE_BAR, HARM_BAR = 0.60, 2 / 3, 0.01
TIE = 0.005  # "at least as good as the best cheap baseline" allows this much noise
CHEAP = {"adabn": "adabn", "histogram_matching": "histogram", "fda": "fda"}
NOT_CANDIDATES = ("oracle", "label_free", "lmadda_multi")


def _mean(values) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _json_number(value: float) -> float | None:
    return round(value, 4) if math.isfinite(value) else None


def summary_records(experiment: str, models: list[dict]) -> list[dict]:
    """`models`: the experiment's model runs as `read_study` returns them (one per model, `pearson` marker-averaged)."""
    records = []
    for target in sorted({m["target"] for m in models if m["target"] != "source"}):
        runs = [m for m in models if m["target"] == target]

        def mean_of(method: str) -> float:
            return _mean(m["pearson"] for m in runs if m["method"] == method)

        configs: dict[tuple, list[dict]] = defaultdict(list)
        for m in runs:
            if m["method"] not in NOT_CANDIDATES:
                configs[(m["method"], m["layer"], m.get("lr"))].append(m)
        best_key = max(configs, key=lambda key: _mean(m["pearson"] for m in configs[key]), default=None)
        choices = sorted((m for m in runs if m["method"] == "label_free"), key=lambda m: m["seed"])
        unadapted, oracle = mean_of("unadapted"), mean_of("oracle")
        chosen = Counter(m["matched"] for m in choices).most_common(1)
        label_free = {
            "method": chosen[0][0].split(":")[0] if chosen else None,
            "layer": int(Counter(m["layer"] for m in choices).most_common(1)[0][0]) if choices else None,
            "pearson": _json_number(_mean(m["pearson"] for m in choices)),
            "fell_back": bool(choices) and sum(m.get("fell_back", 0.0) > 0 for m in choices) > len(choices) / 2,
            "choices": [m["matched"] for m in choices],
        }
        gap = oracle - unadapted
        recovered = gap_recovered(_mean(m["pearson"] for m in choices), unadapted, oracle) if gap >= MIN_GAP else float("nan")
        records.append({
            "experiment": experiment, "target": target,
            "seeds": len({m["seed"] for m in runs if m["method"] in ("lmadda", "adda", "label_free")}),
            "unadapted": _json_number(unadapted),
            **{name: _json_number(mean_of(method)) for method, name in CHEAP.items()},
            "adda": _json_number(mean_of("adda_paper")), "adda_stabilised": _json_number(mean_of("adda")),
            "oracle": _json_number(oracle),
            "best_labelled": None if best_key is None else {
                "method": best_key[0], "layer": int(best_key[1]), "pearson": _json_number(_mean(m["pearson"] for m in configs[best_key]))},
            "label_free": label_free,
            "gap_recovered_label_free": _json_number(recovered),
        })
    return records


def write_summary(records: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_text(json.dumps(records, indent=1) + "\n")
    temporary.replace(path)
    return path


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _best_cheap(record: dict) -> tuple[str, float] | None:
    cheap = {name: record[name] for name in CHEAP.values() if record.get(name) is not None}
    if not cheap:
        return None
    name = max(cheap, key=cheap.get)
    return name, cheap[name]


def choice_table(records: list[dict]) -> list[str]:
    """The label-free choice beside the unadapted model, the cheap corrections, ADDA and the oracle."""
    lines = ["| experiment | target | unadapted | best cheap | ADDA (published) | label-free choice | chosen (per seed) | "
             "best with labels | oracle | gap recovered |", "|---" * 10 + "|"]
    for r in records:
        cheap = _best_cheap(r)
        lf = r["label_free"]
        best = r["best_labelled"]
        recovered = r["gap_recovered_label_free"]
        lines.append(
            f"| {r['experiment']} | {r['target']} | {_cell(r['unadapted'])} | "
            + (f"{_cell(cheap[1])} ({cheap[0]})" if cheap else "—") + f" | {_cell(r['adda'])} | **{_cell(lf['pearson'])}** | "
            + (", ".join(lf["choices"]) or "—") + " | "
            + (f"{_cell(best['pearson'])} ({best['method']}{'' if best['layer'] < 0 else ' L' + str(best['layer'])})" if best else "—")
            + f" | {_cell(r['oracle'])} | " + ("n/a (gap < 0.05)" if recovered is None else f"{recovered:.0%}") + " |")
    return lines


def _labelled_recovery(record: dict) -> float | None:
    best, gap = record["best_labelled"], record["oracle"] - record["unadapted"]
    return None if not best or best["pearson"] is None else (best["pearson"] - record["unadapted"]) / gap


def _ceiling(missed: list[dict]) -> list[str]:
    """Where the choice falls short, whether a better rule could have helped: the best model picked WITH labels."""
    if not missed:
        return []
    ceilings = {f"{r['experiment']}/{r['target']}": _labelled_recovery(r) for r in missed}
    beyond_reach = [name for name, value in ceilings.items() if value is not None and value < RECOVERY_BAR]
    line = "  - Even the best single model chosen with test labels recovers " + ", ".join(
        f"{'—' if value is None else f'{value:.0%}'} on {name}" for name, value in ceilings.items()) + "."
    if len(beyond_reach) == len(missed):
        line += " No candidate gets there, so no label-free rule over these candidates could: the adaptation falls short, not the choice."
    elif beyond_reach:
        line += f" On {', '.join(beyond_reach)} no candidate gets there; elsewhere the choice missed a better candidate."
    return [line]


def verdict(records: list[dict]) -> list[str]:
    """The issue's three bars, decided from the records."""
    scored = [r for r in records if r["label_free"]["pearson"] is not None and r["unadapted"] is not None]
    gapped = [r for r in scored if r["gap_recovered_label_free"] is not None]
    if not gapped:
        return [f"- No target has an oracle gap of at least {MIN_GAP}: the bars below cannot be judged."]
    recovered = [r for r in gapped if r["gap_recovered_label_free"] >= RECOVERY_BAR]
    as_good = [r for r in gapped if (c := _best_cheap(r)) is None or r["label_free"]["pearson"] >= c[1] - TIE]
    harmed = [r for r in gapped if r["label_free"]["pearson"] < r["unadapted"] - HARM_BAR]

    def bar(passed: bool) -> str:
        return "met" if passed else "**not met**"

    need = math.ceil(SHARE_BAR * len(gapped) - 1e-9)
    missed = [r for r in gapped if r not in recovered]
    return [
        f"- Targets with an oracle gap of at least {MIN_GAP}: {len(gapped)} of {len(scored)}.",
        f"- Recovers at least {RECOVERY_BAR:.0%} of the gap: {len(recovered)} of {len(gapped)} (bar: {need}) — {bar(len(recovered) >= need)}"
        + (f"; not on {', '.join(r['experiment'] + '/' + r['target'] for r in missed)}" if missed else ""),
        *_ceiling(missed),
        f"- At least as good as the best cheap baseline (within {TIE}): {len(as_good)} of {len(gapped)} (bar: {need}) — {bar(len(as_good) >= need)}",
        f"- Worse than the unadapted model by more than {HARM_BAR}: {len(harmed)} of {len(gapped)} (bar: 0) — {bar(not harmed)}"
        + (f" ({', '.join(r['experiment'] + '/' + r['target'] for r in harmed)})" if harmed else ""),
    ]
