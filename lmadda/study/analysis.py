"""What the study's runs show, as data: one record per target (`summary.json`), the adaptation issue's
bars, and the claims of "What held up", each decided from the numbers. Nothing here writes prose or
draws; `lmadda.study.document` renders these, and tests check them as values.

One record per (experiment, target), Pearson averaged over markers, test images and seeds:

    experiment, target, seeds
    unadapted, adabn, histogram, fda, adda, adda_stabilised, oracle   Pearson of each (adda: as published)
    best_labelled  {method, layer, pearson}          the best model chosen WITH test labels (optimistic)
    label_free     {method, layer, pearson, fell_back, choices}   the selector's choice (no labels)
    gap_recovered_label_free   (label_free - unadapted) / (oracle - unadapted), null when that gap < MIN_GAP
    families   {family: {pearson, config}}  each family's best configuration WITH test labels (a per-family ceiling)
    best_family                             the family of the best of those
    covered    whether the robust source's augmentation draws this target's shift at its magnitude (null: no robust
               model); a second try (recognisable copies only) may drop the strongest of those draws
    robust_in_domain_cost                   source model's in-domain Pearson minus the robust model's
    robust_admission   {plain, robust, admitted, second_try}   both models on the source's validation fields, whether
                                            the robust rows were candidates, and whether they are the refused first
                                            try's second try (lmadda.training.robust); null: not measured

A family (`family_of`) groups the methods that adapt the same way: LM-ADDA at any layer (`lmadda`,
ADDA included), ADDA as published, moment matching, self-training (alone and after histogram
matching), AdaBN (all layers or 0..l), histogram matching, histogram matching + AdaBN, FDA, and
the robust source model (alone, + AdaBN, + histogram matching).

The bars the adaptation issues set are checked here, on targets whose oracle gap is at least
MIN_GAP: the choice recovers >= 60 % of the gap on >= 2/3 of them, is at least as good as the best
cheap baseline on >= 2/3 of them, and is never worse than the unadapted model by more than 0.01;
the best single candidate with labels (the portfolio's ceiling) recovers >= 80 % on >= 2/3 of them;
and the robust source model's in-domain Pearson is within 0.01 of the plain source's.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmadda.core.atomic import write_atomically
from lmadda.evaluation.metrics import finite_mean_std, gap_recovered
from lmadda.evaluation.rows import TargetDomain
from lmadda.selection.criteria import criterion_agreement
from lmadda.study.results import ADAPTED, CRITERIA, Results, never_moved

MIN_GAP = 0.05  # an oracle this little above the unadapted model leaves no gap worth recovering
RECOVERY_BAR, SHARE_BAR, HARM_BAR = 0.60, 2 / 3, 0.01
CEILING_BAR, ROBUST_COST_BAR = 0.80, 0.01
TIE = 0.005  # "at least as good as the best cheap baseline" allows this much noise
CHEAP = {"adabn": "adabn", "histogram_matching": "histogram", "fda": "fda"}
NOT_CANDIDATES = ("oracle", "label_free", "lmadda_multi")


def _mean(values) -> float:
    return finite_mean_std(values)[0]


def _json_number(value: float) -> float | None:
    return round(value, 4) if math.isfinite(value) else None


def family_of(method: str) -> str | None:
    """The family a result-row method belongs to (see the module docstring); None for what adapts nothing itself."""
    if method in NOT_CANDIDATES or method == "unadapted":
        return None
    if method in ("lmadda", "adda"):
        return "lmadda"
    if method in ("lmadda_paper", "adda_paper"):
        return "adda_paper"
    return method.split(":")[0]


def summary_records(experiment: str, models: list[dict], augment=None, facts: dict[str, float] | None = None) -> list[dict]:
    """`models`: the experiment's model runs as `read_study` returns them (one per model, `pearson` marker-averaged);
    `augment`: the robust source model's augmentation (lmadda.data.augment.NuisanceAugmentation), or None;
    `facts`: the experiment run's metrics (`robust_*`: the robust model's admission, lmadda.training.robust)."""
    records = []
    facts = facts or {}
    admission = None if "robust_admitted" not in facts else {
        "plain": _json_number(facts["robust_plain_validation"]), "robust": _json_number(facts["robust_robust_validation"]),
        "admitted": bool(facts["robust_admitted"]), "second_try": bool(facts.get("robust_second_try", 0.0))}
    in_domain = {method: _mean(m["pearson"] for m in models if m["target"] == "source" and m["method"] == method)
                 for method in ("unadapted", "robust")}
    robust_cost = in_domain["unadapted"] - in_domain["robust"]
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
        families: dict[str, dict] = {}
        for (method, layer, lr), members in configs.items():
            family = family_of(method)
            pearson = _mean(m["pearson"] for m in members)
            if family is not None and math.isfinite(pearson) and pearson > families.get(family, {}).get("pearson", -math.inf):
                where = method if layer is None or int(layer) < 0 else f"{method} L{int(layer)}"
                families[family] = {"pearson": pearson, "config": where}
        families = {name: {"pearson": _json_number(v["pearson"]), "config": v["config"]} for name, v in sorted(families.items())}
        best_family = max(families, key=lambda name: families[name]["pearson"], default=None)
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
            "families": families,
            "best_family": best_family,
            "covered": None if augment is None else augment.covers(TargetDomain.parse(target).shift),
            "robust_in_domain_cost": _json_number(robust_cost),
            "robust_admission": admission,
        })
    return records


def write_summary(records: list[dict], path: Path) -> Path:
    """`summary.json`: the records, for anyone who wants the numbers without the document."""
    return write_atomically(path, lambda temporary: temporary.write_text(json.dumps(records, indent=1) + "\n"))


def best_cheap(record: dict) -> tuple[str, float] | None:
    """The best of the cheap corrections (AdaBN, histogram matching, FDA) on this target, by test Pearson."""
    cheap = {name: record[name] for name in CHEAP.values() if record.get(name) is not None}
    if not cheap:
        return None
    name = max(cheap, key=cheap.get)
    return name, cheap[name]


def labelled_recovery(record: dict) -> float | None:
    """Gap recovered by the best single model chosen WITH test labels: the ceiling of any label-free rule."""
    best, gap = record["best_labelled"], record["oracle"] - record["unadapted"]
    return None if not best or best["pearson"] is None else (best["pearson"] - record["unadapted"]) / gap


def _name(record: dict) -> str:
    return f"{record['experiment']}/{record['target']}"


@dataclass(frozen=True)
class Bar:
    """One of the issue's bars: how many targets pass, how many must, and which fail."""

    passed: int
    of: int
    need: int
    failing: tuple[str, ...] = ()

    @property
    def met(self) -> bool:
        return self.passed >= self.need


@dataclass(frozen=True)
class Bars:
    """The three bars of the adaptation issue, judged on the targets with an oracle gap >= MIN_GAP.

    `ceilings`: for every target where the recovery bar is missed, what the best model chosen with
    labels recovers there (None: unknown); when all of them are below the bar, the adaptation falls
    short, not the choice."""

    scored: int
    gapped: int
    recovery: Bar
    as_good_as_cheap: Bar
    harm: Bar
    ceilings: dict[str, float | None] = field(default_factory=dict)
    ceiling: Bar | None = None  # the best single candidate with labels recovers >= CEILING_BAR
    robust_cost: dict[str, float] = field(default_factory=dict)  # experiment -> in-domain Pearson the robust model gives up
    robust_admission: dict[str, dict] = field(default_factory=dict)  # experiment -> validation Pearsons and whether admitted

    @property
    def beyond_reach(self) -> list[str]:
        return [name for name, value in self.ceilings.items() if value is not None and value < RECOVERY_BAR]


def bars(records: list[dict]) -> Bars | None:
    """The issue's three bars, decided from the records; None when no target has a gap worth recovering."""
    scored = [r for r in records if r["label_free"]["pearson"] is not None and r["unadapted"] is not None]
    gapped = [r for r in scored if r["gap_recovered_label_free"] is not None]
    if not gapped:
        return None
    recovered = [r for r in gapped if r["gap_recovered_label_free"] >= RECOVERY_BAR]
    as_good = [r for r in gapped if (c := best_cheap(r)) is None or r["label_free"]["pearson"] >= c[1] - TIE]
    harmed = [r for r in gapped if r["label_free"]["pearson"] < r["unadapted"] - HARM_BAR]
    need = math.ceil(SHARE_BAR * len(gapped) - 1e-9)
    missed = [r for r in gapped if r not in recovered]
    high = [r for r in gapped if (value := labelled_recovery(r)) is not None and value >= CEILING_BAR]
    costs = {r["experiment"]: r["robust_in_domain_cost"] for r in records if r.get("robust_in_domain_cost") is not None}
    return Bars(
        scored=len(scored), gapped=len(gapped),
        recovery=Bar(len(recovered), len(gapped), need, tuple(_name(r) for r in missed)),
        as_good_as_cheap=Bar(len(as_good), len(gapped), need, tuple(_name(r) for r in gapped if r not in as_good)),
        harm=Bar(len(gapped) - len(harmed), len(gapped), len(gapped), tuple(_name(r) for r in harmed)),
        ceilings={_name(r): labelled_recovery(r) for r in missed},
        ceiling=Bar(len(high), len(gapped), need, tuple(_name(r) for r in gapped if r not in high)),
        robust_cost=costs,
        robust_admission={r["experiment"]: r["robust_admission"] for r in records if r.get("robust_admission")},
    )


# ------------------------------------------------------------------- choosing without labels


def selection_rows(results: Results) -> list[dict]:
    """Every single-layer configuration (layer x lr), seeds averaged: the candidates a lab chooses among."""
    rows = []
    for target in results.targets:
        for (method, matched, lr), entry in results.config_means(target).items():
            rows.append({**entry, "target": target, "method": method, "matched": matched, "lr": lr})
    return rows


def criterion_scores(results: Results) -> dict[str, dict]:
    """Each label-free criterion's agreement with the labelled Pearson: Spearman, regret, targets."""
    rows = selection_rows(results)
    return {criterion: criterion_agreement(rows, criterion, "pearson") for criterion in CRITERIA}


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


def label_free_choice(results: Results, target: str, criterion: str) -> dict | None:
    """The (layer, lr) configuration a lab without labels would take: the criterion's lowest, non-collapsed."""
    configs = [v for v in results.config_means(target).values() if not v["collapsed"] and math.isfinite(v.get(criterion, float("nan")))]
    return min(configs, key=lambda v: v[criterion]) if configs else None


# --------------------------------------------------------------------------------- what held up


NOISE_FLOOR = 0.005  # Pearson differences below this are not called a difference, whatever the seeds say


@dataclass(frozen=True)
class Gain:
    """One target's evidence for a claim: the Pearson gain, its seed spread, and where (e.g. the layer)."""

    target: str
    gain: float
    spread: float
    where: str = ""

    @property
    def holds(self) -> bool:
        """A gain counts when it exceeds twice the seed spread and NOISE_FLOOR (with one seed only the floor)."""
        return self.gain > max(2 * self.spread, NOISE_FLOOR)


@dataclass(frozen=True)
class Claim:
    key: str  # stable name, for tests and for anyone reading summary data
    statement: str
    gains: tuple[Gain, ...]

    @property
    def held(self) -> list[str]:
        return [g.target for g in self.gains if g.holds]


@dataclass(frozen=True)
class MultiLayer:
    target: str
    matched: str
    vs_best_single: float
    vs_adda: float


@dataclass(frozen=True)
class Findings:
    """Everything "What held up" says, as values."""

    claims: list[Claim]
    adda_never_moved: list[str]  # targets where ADDA's G' took no step in any seed
    overexposure_best_layers: list[tuple[str, int, int]]  # (target, best layer, layers swept)
    multi_layer: list[MultiLayer]
    best_criterion: str | None
    scores: dict[str, dict]
    reference: dict[str, float]
    moved: tuple[int, int]  # (adapted models where G' moved, adapted models with a known count)
    oracle_below: list[tuple[str, float, float]]  # (target, oracle, unadapted)

    def claim(self, key: str) -> Claim:
        return next(c for c in self.claims if c.key == key)


def _spread(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.std(finite)) if len(finite) > 1 else 0.0


def findings(results: Results, scores: dict[str, dict], reference: dict[str, float]) -> Findings:
    """Each claim the adaptation issue asks about, decided from the runs. Choosing the best of many
    layers by labelled Pearson is optimistic (the maximum of noisy values), so the claims about
    adaptation are also made for choices that use no labels: ADDA, and the best criterion's choice."""
    ranked = sorted(((c, s) for c, s in scores.items() if s["targets"]), key=lambda cs: cs[1]["regret"])
    criterion = ranked[0][0] if ranked else None
    adda_gain, best_gain, free_gain, lm_vs_adda, early, multi = [], [], [], [], [], []
    adda_still, oracle_below = [], []
    for target in results.targets:
        lr = results.chosen_lr(target)
        unadapted = finite_mean_std([m["pearson"] for m in results.select(target, "unadapted")])[0]
        adda = results.select(target, "adda", lr=lr)
        best = results.best_single(target, lr)
        oracle = finite_mean_std([m["pearson"] for m in results.select(target, "oracle")])[0]
        if oracle < unadapted - NOISE_FLOOR:
            oracle_below.append((target, oracle, unadapted))
        if never_moved(adda):
            adda_still.append(target)
        if adda:
            adda_mean = finite_mean_std([m["pearson"] for m in adda])[0]
            adda_gain.append(Gain(target, adda_mean - unadapted, _spread([m["pearson"] for m in adda])))
        if best is not None and len(results.layers(target)) >= 2:
            spread = _spread(best[1]["values"])
            best_gain.append(Gain(target, best[1]["pearson"] - unadapted, spread, f"layer {best[0]}"))
            if adda:
                lm_vs_adda.append(Gain(target, best[1]["pearson"] - adda_mean, max(spread, _spread([m["pearson"] for m in adda])),
                                       f"layer {best[0]}"))
            if results.shift_of(target) == "overexposure":
                early.append((target, best[0], len(results.layers(target))))
            for (_, matched, multi_lr), entry in results.config_means(target, ("lmadda_multi",)).items():
                if multi_lr == lr:
                    multi.append(MultiLayer(target, matched, entry["pearson"] - best[1]["pearson"],
                                            entry["pearson"] - (adda_mean if adda else float("nan"))))
        if criterion is not None:
            chosen = label_free_choice(results, target, criterion)
            if chosen is not None:
                free_gain.append(Gain(target, chosen["pearson"] - unadapted, _spread(chosen["values"]), f"layer {chosen['layer']}"))

    claims = [Claim("adda_beats_unadapted", "ADDA (no layer choice) beats the unadapted model", tuple(adda_gain)),
              Claim("best_layer_beats_unadapted", "The best matched layer, chosen with labels (optimistic), beats the unadapted model",
                    tuple(best_gain))]
    if criterion is not None:
        claims.append(Claim("label_free_layer_beats_unadapted",
                            f"The layer chosen without labels (`{criterion[3:]}`) beats the unadapted model", tuple(free_gain)))
    claims.append(Claim("best_layer_beats_adda", "LM-ADDA at its best layer (chosen with labels, optimistic) beats ADDA", tuple(lm_vs_adda)))
    known = [m for m in results.models if m["method"] in (*ADAPTED, "lmadda_multi") and math.isfinite(m.get("g_updates", float("nan")))]
    return Findings(claims=claims, adda_never_moved=adda_still, overexposure_best_layers=early, multi_layer=multi,
                    best_criterion=criterion, scores=scores, reference=reference,
                    moved=(sum(m["g_updates"] > 0 for m in known), len(known)), oracle_below=oracle_below)
