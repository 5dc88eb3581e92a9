"""Every adaptation family, measured on VALIDATION fields, with the label-free choice among all of them.

For one experiment of a study config (its data and source model, trained or reused in its `out`
folder, so `make study` reuses them; the robust source model too, from the experiment's `robust`, with its
second try where the first is refused, as the study does):

- cheap candidates (no training): the unadapted model, AdaBN over all layers and up to each of
  `--layers`, histogram matching, histogram matching + AdaBN, the robust source model alone, with
  AdaBN and with histogram matching;
- trained candidates per seed, at each of `--layers`: LM-ADDA (the study's recipe), moment matching
  at the cut, self-training, and histogram matching + self-training;
- the selector's label-free choice among all candidates of a seed, with the source's domain check
  on (the gate that sees a zoom) and off; where the robust model is admitted, also with it as the
  default, scoring its rows against its own in-domain stains (the selector's rule) and, for
  comparison, against the plain model's (bench/results/adapt_families_reference.jsonl).

Each model's Pearson is printed on the target's validation fields; its test-field Pearson is
recorded beside it for the report and for nothing else: no option here is chosen by it. Seconds per
model and per step are recorded on this machine, LM-ADDA's in the same run.

    .venv/bin/python bench/adapt_families.py --experiment simulated --layers 3 --seeds 0 1 2

Results go to bench/results/adapt_families.jsonl (one line per model and per choice).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

from lmadda.corrections.baselines import FourierAmplitudeTransfer, build_baseline
from lmadda.checkpoint import load_checkpoint
from lmadda.core.config import build_config, read_config_file
from lmadda.core.errors import LmaddaError
from lmadda.data.manifest import Manifest
from lmadda.evaluation.evaluate import evaluate_generator
from lmadda.evaluation.rows import TargetDomain
from lmadda.selection.selector import UNADAPTED, Candidate, Selector, decide
from lmadda.training.robust import RobustAdmission
from lmadda.study.config import StudyConfig
from lmadda.study.grid import ImageSource
from lmadda.study.runner import admitted_robust, prepare_manifest, prepare_source
from lmadda.training.adapt import AdaptConfig, Adapter, run_steps
from lmadda.training.self_training import SelfTrainConfig, SelfTrainer
from study_experiment import shifted_targets


def _mean(rows: list[dict]) -> float:
    return float(np.nanmean([r["pearson"] for r in rows])) if rows else float("nan")


def _trained(loop, config) -> tuple[object, float, int]:
    started = time.perf_counter()
    run_steps(loop)
    result = loop.finish()
    return result, time.perf_counter() - started, result.steps_done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="docs/study.yaml")
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--targets", nargs="*", help="default: the experiment's grid targets")
    parser.add_argument("--layers", nargs="+", type=int, default=[3])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--families", nargs="+", default=["lmadda", "moments", "self_training", "histogram_matching+self_training"],
                        help="trained families to run (the cheap candidates always run)")
    parser.add_argument("--moments-lr", type=float, default=1e-4)
    parser.add_argument("--self-training-lr", type=float, default=1e-4)
    parser.add_argument("--trained-from", nargs="+", choices=["source", "robust"], default=["source"],
                        help="which source model the trained families start from: the plain one, and/or the robust one "
                             "(its candidates are named robust+FAMILY:L and scored against the robust model's own stains)")
    parser.add_argument("--out", default="bench/results/adapt_families.jsonl")
    args = parser.parse_args()

    study = build_config(StudyConfig, None, **read_config_file(args.config)).resolved(Path.cwd())
    spec = next(e for e in study.experiments if e.name == args.experiment)
    out = study.out / spec.name
    manifest_path = prepare_manifest(spec, out)
    data = ImageSource(Manifest.load(manifest_path), spec.data.validation_rows)
    source_path, _ = prepare_source(spec, data, manifest_path, out)
    source = load_checkpoint(source_path)
    # the robust model the study goes on with: the first try, or its second where the first is refused
    robust, _, _ = admitted_robust(spec, data, manifest_path, out, source, source_path)
    results = Path(args.out)
    results.parent.mkdir(parents=True, exist_ok=True)
    markers, percentiles = source.markers, source.percentiles
    source_train = data.load(spec.source.setting, "train", percentiles=percentiles)
    source_val = data.load(spec.source.setting, "val", markers, percentiles=percentiles, seed=1)
    in_domain = {"source": _mean(evaluate_generator(source.generator, source_val, markers))}
    if robust is not None:
        in_domain["robust"] = _mean(evaluate_generator(robust.generator, source_val, markers))
    print(f"{spec.name}: in-domain validation Pearson " + ", ".join(f"{k} {v:.3f}" for k, v in in_domain.items()), flush=True)

    def write(record: dict) -> None:
        with results.open("a") as handle:
            handle.write(json.dumps({"experiment": spec.name, **record}) + "\n")

    write({"kind": "in_domain", **in_domain})
    # The robust source model as the default (what a lab keeps unless a candidate is confidently better), where it is
    # admitted on the source's clean validation fields, as the study admits it (lmadda.training.robust).
    robust_default = robust is not None and RobustAdmission(in_domain["source"], in_domain["robust"]).admitted
    targets = args.targets or shifted_targets(spec)
    adapt_shared = {**spec.adapt}
    # self-training gets the study's step budget, batch, crop and device: the same budget as LM-ADDA
    self_training_shared = {k: v for k, v in adapt_shared.items() if k in ("steps", "batch_size", "crop_size", "device", "precision")}
    for target in targets:
        domain = TargetDomain.parse(target)
        target_train = data.load(domain.setting, "train", shift=domain.shift, percentiles=percentiles)
        try:
            target_val = data.load(domain.setting, "val", markers, shift=domain.shift, percentiles=percentiles, seed=1)
        except LmaddaError:
            target_val = []
        if not target_val:
            print(f"\n{target}: no validation fields, skipped (nothing may be measured on its test fields alone)", flush=True)
            continue
        target_test = data.load(domain.setting, "test", markers, shift=domain.shift, percentiles=percentiles, seed=7)
        pearson: dict[str, tuple[float, float]] = {}

        def measure(candidate: Candidate, seed: int | None, seconds: float = 0.0, steps: int = 0) -> None:
            val = _mean(evaluate_generator(candidate.generator, target_val, markers, input_transform=candidate.input_transform))
            test = _mean(evaluate_generator(candidate.generator, target_test, markers, input_transform=candidate.input_transform))
            pearson[candidate.name] = (val, test)
            write({"kind": "model", "target": target, "candidate": candidate.name.split("#")[0], "family": candidate.family_name,
                   "seed": seed, "val_pearson": val, "test_pearson": test, "seconds": round(seconds, 2), "steps": steps,
                   "seconds_per_step": round(seconds / steps, 4) if steps else None})
            print(f"  {candidate.name:40s} val {val:.3f}  test {test:.3f}" + (f"  ({seconds:.0f} s, {steps} steps)" if steps else ""),
                  flush=True)

        print(f"\n{target} ({len(target_val)} validation fields, {len(target_test)} test fields)", flush=True)
        fda = _mean(evaluate_generator(source.generator, target_val, markers, input_transform=FourierAmplitudeTransfer(source_train)))
        print(f"  {'fda (reference, not a candidate)':40s} val {fda:.3f}", flush=True)
        cheap_names = ["unadapted", "adabn", "histogram_matching", "histogram_matching+adabn",
                       *(f"adabn:{layer}" for layer in args.layers), *(f"histogram_matching+adabn:{layer}" for layer in args.layers)]
        cheap = []
        for name in cheap_names:
            started = time.perf_counter()
            generator, transform = build_baseline(name, source.generator, source_train, target_train)
            cheap.append(Candidate(name, generator, transform, family=name.split(":")[0]))
            measure(cheap[-1], None, time.perf_counter() - started)
        if robust is not None:
            for name in ("unadapted", "adabn", "histogram_matching"):
                generator, transform = build_baseline(name, robust.generator, source_train, target_train)
                label = "robust" if name == "unadapted" else f"robust+{name}"
                cheap.append(Candidate(label, generator, transform, family=label, base="robust"))
                measure(cheap[-1], None)
        for seed in args.seeds:
            trained = []
            bases = {"source": source, "robust": robust}
            for base_name, base in ((name, bases[name]) for name in args.trained_from if bases[name] is not None):
                prefix = "" if base_name == "source" else "robust+"
                for layer in args.layers:
                    loops = {
                        f"lmadda:{layer}": lambda: Adapter(base, source_train, target_train,
                                                           AdaptConfig(**{**adapt_shared, "layer": [layer], "seed": seed})),
                        f"moments:{layer}": lambda: Adapter(base, source_train, target_train,
                                                            AdaptConfig(**{**adapt_shared, "layer": [layer], "seed": seed,
                                                                           "adversary": "moments", "lr": args.moments_lr})),
                        f"self_training:{layer}": lambda: SelfTrainer(base, source_train, target_train, SelfTrainConfig(
                            **self_training_shared, layer=layer, seed=seed, lr=args.self_training_lr)),
                        f"histogram_matching+self_training:{layer}": lambda: SelfTrainer(base, source_train, target_train, SelfTrainConfig(
                            **self_training_shared, layer=layer, seed=seed, lr=args.self_training_lr, input_correction="histogram_matching")),
                    }
                    for name, make in loops.items():
                        if name.split(":")[0] not in args.families:
                            continue
                        result, seconds, steps = _trained(make(), None)
                        if result.collapsed:
                            print(f"  {prefix}{name} seed {seed}: collapsed ({result.collapse_reason}), not a candidate", flush=True)
                            continue
                        trained.append(Candidate(f"{prefix}{name}#s{seed}", result.generator, result.input_correction,
                                                 family=prefix + name.split(":")[0], base="unadapted" if base_name == "source" else "robust"))
                        measure(trained[-1], seed, seconds, steps)
            candidates = cheap + trained
            options = spec.selection.options()
            selector = Selector(source.generator, source_train, target_train, seed=seed, crop_size=options["crop_size"],
                                crops=options["crops"], domain_reference=source.domain_reference,
                                references={"robust": robust.generator} if robust is not None else None)
            observations = selector.observe_all(candidates)  # once: every rule below decides on the same observations
            # "own": each candidate against its base model's in-domain stains (the selector's rule); "plain": every
            # candidate against the plain source model's, as before bases existed
            scored = {"own": selector.per_crop(observations),
                      "plain": selector.per_crop({name: replace(o, base=UNADAPTED) for name, o in observations.items()})}
            score = options["score"]
            rules = [(gate, guard, UNADAPTED, "own") for gate in ("domain_check", "output_w1_only") for guard in (None, "consensus")]
            rules += [("domain_check", None, "robust", reference) for reference in ("plain", "own")] if robust_default else []
            for gate, guard, default, reference in rules:
                scores = scored[reference]
                floor = selector.reference(observations[default].base if reference == "own" else UNADAPTED).floor[score]
                choice = decide(scores[score], score, floor=floor, guard=scores[guard] if guard else None,
                                min_win_fraction=options["min_win_fraction"], min_gain=options["min_gain"],
                                out_of_domain=selector.out_of_domain() if gate == "domain_check" else 0.0, default=default)
                val, test = pearson[choice.chosen]
                best = max((n for n in pearson if "#" not in n or n.endswith(f"#s{seed}")), key=lambda n: pearson[n][0])
                write({"kind": "choice", "target": target, "seed": seed, "gate": gate, "guard": guard, "default": default,
                       "reference": reference,
                       "chosen": choice.chosen.split("#")[0], "fell_back": choice.fell_back, "reason": choice.reason,
                       "val_pearson": val, "test_pearson": test, "best_by_val": best.split("#")[0], "best_val": pearson[best][0],
                       "best_val_test": pearson[best][1], "unadapted_val": pearson[UNADAPTED][0],
                       "unadapted_test": pearson[UNADAPTED][1], "out_of_domain": selector.out_of_domain()})
                print(f"  seed {seed} choice ({gate}, guard {guard}, default {default}, {reference} reference): {choice.chosen} val {val:.3f} "
                      f"test {test:.3f}; {choice.reason}", flush=True)

    by_candidate: dict[tuple, list[float]] = defaultdict(list)
    for line in results.read_text().splitlines():
        record = json.loads(line)
        if record.get("experiment") == spec.name and record.get("kind") == "model":
            by_candidate[(record["target"], record["candidate"])].append(record["val_pearson"])
    print("\nvalidation Pearson, mean ± std over seeds (all runs in the results file)")
    for (target, name), values in sorted(by_candidate.items()):
        print(f"  {target:36s} {name:40s} {np.mean(values):.3f} ± {np.std(values):.3f} (n={len(values)})")


if __name__ == "__main__":
    main()
