"""The zoom correction (lmadda.corrections.zoom), measured on VALIDATION fields: the factor it finds and what it gains.

For one experiment of a study config (its data and source model, reused from its `out` folder, so run
it after `make study` or `lmadda study --only NAME`), and for each target (default: the experiment's
grid targets plus zoom 0.5 and 0.7 of the source setting):

- the factor `estimate_zoom` finds from the target's unlabelled train fields, with the score of each
  factor tried;
- validation-field Pearson of the unadapted model and of the zoomed one;
- the selector's label-free choice among the cheap candidates (`lmadda.training.auto.baseline_candidates`,
  the zoom among them when its factor is not 1), and that choice's validation Pearson.

Nothing here looks at test fields.

    .venv/bin/python bench/zoom_estimate.py --experiment simulated
    .venv/bin/python bench/zoom_estimate.py --experiment colicoords --targets bright_field_ds4+scale:0.5 bright_field_ds1

Results go to bench/results/zoom_estimate.jsonl (one line per target).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from lmadda.evaluation.evaluate import evaluate_generator
from lmadda.evaluation.rows import TargetDomain
from lmadda.selection.selector import Selector
from lmadda.training.auto import baseline_candidates
from lmadda.corrections.zoom import estimate_zoom
from study_experiment import experiment_parser, load_experiment


def main() -> None:
    args = experiment_parser(__doc__.splitlines()[0], "bench/results/zoom_estimate.jsonl",
                             "default: the grid targets, and the source setting at zoom 0.5 and 0.7").parse_args()
    experiment = load_experiment(args.config, args.experiment)
    spec, data, source, source_train = experiment.spec, experiment.data, experiment.source, experiment.source_train
    markers, percentiles = source.markers, source.percentiles
    grid_targets = experiment.grid_targets
    targets = args.targets or [*grid_targets, f"{spec.source.setting}+scale:0.5", f"{spec.source.setting}+scale:0.7"]
    results = Path(args.out)
    results.parent.mkdir(parents=True, exist_ok=True)
    for target in dict.fromkeys(targets):
        domain = TargetDomain.parse(target)
        train = data.load(domain.setting, "train", None, shift=domain.shift, percentiles=percentiles, seed=0)
        if not data.validation_rows and not any(row.setting == domain.setting and row.split == "val" for row in data.manifest.rows):
            print(f"{target}: no validation fields; skipped", flush=True)
            continue
        val = data.load(domain.setting, "val", markers, shift=domain.shift, percentiles=percentiles, seed=1)
        started = time.perf_counter()
        estimate = estimate_zoom(source.generator, source_train, train)
        seconds = time.perf_counter() - started
        candidates = baseline_candidates(source, source_train, train)
        choice = Selector(source.generator, source_train, train, domain_reference=source.domain_reference).choose(candidates)
        by_name = {c.name: c for c in candidates}

        def pearson(name: str) -> float:
            candidate = by_name[name]
            return float(np.mean([r["pearson"] for r in evaluate_generator(candidate.generator, val, markers,
                                                                            input_transform=candidate.input_transform)]))

        record = {"experiment": spec.name, "target": target, "factor": estimate.factor, "reason": estimate.reason,
                  "scores": estimate.as_dict()["scores"], "estimate_seconds": round(seconds, 1),
                  "unadapted": round(pearson("unadapted"), 4), "zoom": round(pearson("zoom"), 4) if "zoom" in by_name else None,
                  "chosen": choice.chosen, "chosen_pearson": round(pearson(choice.chosen), 4)}
        print(f"  {choice.reason[:160]}", flush=True)
        print(f"{target}: factor {estimate.factor:g} ({seconds:.0f} s); validation Pearson unadapted {record['unadapted']:.3f}, "
              f"zoom {record['zoom'] if record['zoom'] is not None else '-'}; chosen {choice.chosen} {record['chosen_pearson']:.3f}",
              flush=True)
        with results.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
