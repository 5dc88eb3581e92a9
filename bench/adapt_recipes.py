"""Adaptation recipes measured on VALIDATION fields: the measurement behind docs/method.md's recipe tables.

Uses the data and source model of one experiment of a study config (trained or reused in its `out`
folder, so `make study` reuses them), adapts with each named recipe at each layer and seed, and
prints Pearson on the target's validation split beside the unadapted model and the cheap baselines.
Nothing here looks at test fields: the study's defaults are chosen from these figures, and the study
reports on test fields.

    .venv/bin/python bench/adapt_recipes.py --experiment simulated \
        --targets phase_contrast+overexposure:2.5 --layers 0 3 7 15 --seeds 0 1 \
        --recipe default='{}' --recipe paper='{"recipe": "paper"}' --recipe anchor='{"source_anchor": 10}'

Results are appended to bench/results/adapt_recipes.jsonl (one line per model) and printed as a table.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from lmadda.corrections.baselines import FourierAmplitudeTransfer, adabn
from lmadda.checkpoint import load_checkpoint
from lmadda.core.config import build_config, read_config_file
from lmadda.data.correction import HistogramMatcher
from lmadda.data.manifest import Manifest
from lmadda.evaluation.evaluate import evaluate_generator
from lmadda.evaluation.rows import TargetDomain
from lmadda.selection.selector import SCORES, Candidate, Selector, decide
from lmadda.study.config import StudyConfig
from lmadda.study.grid import ImageSource
from lmadda.study.runner import prepare_manifest, prepare_source
from lmadda.training.adapt import AdaptConfig, adapt


def _mean(rows: list[dict]) -> float:
    return float(np.nanmean([r["pearson"] for r in rows]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="docs/study.yaml")
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--targets", nargs="+", required=True)
    parser.add_argument("--layers", nargs="+", type=int, required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--recipe", action="append", required=True, help="name=JSON of AdaptConfig options over the experiment's adapt")
    parser.add_argument("--split", default="val", choices=["val"], help="always validation: choices are never made on test fields")
    parser.add_argument("--crops", type=int, default=16, help="target crops the selector scores on")
    parser.add_argument("--out", default="bench/results/adapt_recipes.jsonl")
    args = parser.parse_args()

    study = build_config(StudyConfig, None, **read_config_file(args.config)).resolved(Path.cwd())
    spec = next(e for e in study.experiments if e.name == args.experiment)
    out = study.out / spec.name
    manifest_path = prepare_manifest(spec, out)
    data = ImageSource(Manifest.load(manifest_path), spec.data.validation_rows)
    source_path, _ = prepare_source(spec, data, manifest_path, out)
    source = load_checkpoint(source_path)
    recipes = {name: json.loads(options) for name, options in (r.split("=", 1) for r in args.recipe)}
    results = Path(args.out)
    results.parent.mkdir(parents=True, exist_ok=True)
    table: dict[tuple, list[float]] = defaultdict(list)
    source_train = data.load(spec.source.setting, "train", percentiles=source.percentiles)
    for target in args.targets:
        domain = TargetDomain.parse(target)
        target_train = data.load(domain.setting, "train", shift=domain.shift, percentiles=source.percentiles)
        target_val = data.load(domain.setting, "val", source.markers, shift=domain.shift, percentiles=source.percentiles, seed=1)
        # the study's candidates (FDA needs source images at run time: a reference, never a candidate)
        candidates = [Candidate("unadapted", source.generator), Candidate("adabn", adabn(source.generator, target_train)),
                      Candidate("histogram_matching", source.generator, HistogramMatcher(source_train))]
        reference = {c.name: evaluate_generator(c.generator, target_val, source.markers, input_transform=c.input_transform)
                     for c in candidates}
        reference["fda"] = evaluate_generator(source.generator, target_val, source.markers, input_transform=FourierAmplitudeTransfer(source_train))
        val_pearson = {name: _mean(rows) for name, rows in reference.items()}
        print(f"\n{target} (validation, {len(target_val)} fields): " + "  ".join(f"{k} {_mean(v):.3f}" for k, v in reference.items()), flush=True)
        for name, options in recipes.items():
            options = dict(options)
            for layer in options.pop("layers", args.layers):  # a recipe may name its own layers: {"recipe": "paper", "layers": [15]}
                for seed in args.seeds:
                    config = AdaptConfig(**{**spec.adapt, **options, "layer": [layer], "seed": seed})
                    start = time.perf_counter()
                    result = adapt(source, source_train, target_train, config, progress=False)
                    pearson = _mean(evaluate_generator(result.generator, target_val, source.markers, input_transform=result.input_correction))
                    table[(target, name, layer)].append(pearson)
                    candidates.append(Candidate(f"{name}:{layer}:s{seed}", result.generator, result.input_correction, family=name))
                    val_pearson[candidates[-1].name] = pearson
                    record = {"experiment": spec.name, "target": target, "recipe": name, "options": options, "layer": layer, "seed": seed,
                              "val_pearson": pearson, "unadapted": _mean(reference["unadapted"]), "g_updates": result.g_updates,
                              "collapsed": result.collapsed, "seconds": round(time.perf_counter() - start, 1)}
                    with results.open("a") as handle:
                        handle.write(json.dumps(record) + "\n")
                    print(f"  {name:12s} layer {layer:2d} seed {seed}: {pearson:.3f}  (G' steps {result.g_updates}, "
                          f"{record['seconds']:.0f} s{', collapsed' if result.collapsed else ''})", flush=True)
        selector = Selector(source.generator, source_train, target_train, crops=args.crops)
        per_crop = selector.per_crop(candidates)
        val_pearson = {name: value for name, value in val_pearson.items() if name != "fda"}
        best = max(val_pearson, key=val_pearson.get)
        print(f"  best by validation labels: {best} {val_pearson[best]:.3f}")
        for score in SCORES:
            choice = decide(per_crop[score], score, floor=None if score == "consensus" else selector.floor[score])
            print(f"  {score:12s} chooses {choice.chosen:24s} val {val_pearson[choice.chosen]:.3f} "
                  f"(regret {val_pearson[best] - val_pearson[choice.chosen]:.3f}); {choice.reason}")
        with Path(args.out).with_name("adapt_recipes_selection.jsonl").open("a") as handle:
            handle.write(json.dumps({"experiment": spec.name, "target": target, "val_pearson": val_pearson,
                                     "per_crop": {s: {n: v.tolist() for n, v in per_crop[s].items()} for s in SCORES},
                                     "floor": {s: v.tolist() for s, v in selector.floor.items() if s != "consensus"}}) + "\n")
    print("\nmean over seeds (validation Pearson)")
    for (target, name, layer), values in table.items():
        print(f"{target:36s} {name:12s} layer {layer:2d}: {np.mean(values):.3f} ± {np.std(values):.3f} (n={len(values)})")


if __name__ == "__main__":
    main()
