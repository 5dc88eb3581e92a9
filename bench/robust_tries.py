"""The robust source model's two tries, measured on VALIDATION fields: every draw, then recognisable copies only.

For each named experiment of a study config (its data and source model reused from the study's `out`), fine-tunes
the robust model's first try (the experiment's `robust`, every augmentation draw kept) and its second try
(`lmadda.training.robust.second_try`: copies whose pixels no longer correlate with their field at least 0.5 are
redrawn) into `--out`, reusing them there, and prints each model's Pearson on the source's clean validation fields
(its admission) and on every target's validation fields, alone and with AdaBN. docs/method.md reports the table.
No test field is read.

    .venv/bin/python bench/robust_tries.py --experiments simulated sephace colicoords --out /tmp/robust-tries

Results go to bench/results/robust_tries.jsonl (one line per model and validation set).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lmadda.corrections.baselines import build_baseline
from lmadda.checkpoint import load_checkpoint
from lmadda.core.config import build_config, read_config_file
from lmadda.core.errors import LmaddaError
from lmadda.data.manifest import Manifest
from lmadda.evaluation.evaluate import evaluate_generator
from lmadda.evaluation.rows import TargetDomain
from lmadda.study.config import StudyConfig
from lmadda.study.grid import ImageSource
from lmadda.study.runner import prepare_manifest, prepare_robust_source, prepare_source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="docs/study.yaml")
    parser.add_argument("--experiments", nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True, help="where the two tries are trained (reused when there)")
    parser.add_argument("--epochs", type=int, default=None, help="the robust model's epochs instead of the config's (its budget)")
    parser.add_argument("--lr", type=float, default=None, help="the robust model's fine-tuning learning rate instead of the config's")
    parser.add_argument("--only-first", action="store_true", help="train and measure the first try only")
    parser.add_argument("--results", default="bench/results/robust_tries.jsonl")
    args = parser.parse_args()

    study = build_config(StudyConfig, None, **read_config_file(args.config)).resolved(Path.cwd())
    unknown = sorted(set(args.experiments) - {e.name for e in study.experiments})
    if unknown:
        raise SystemExit(f"--experiments {', '.join(unknown)}: not in {args.config}")
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    for spec in (e for e in study.experiments if e.name in args.experiments):
        if spec.robust is None:
            print(f"{spec.name}: no `robust` in {args.config}, skipped")
            continue
        overrides = {key: value for key, value in (("epochs", args.epochs), ("lr", args.lr)) if value is not None}
        spec = spec.model_copy(update={"robust": {**spec.robust, **overrides}})
        epochs, lr = spec.robust_config().epochs, spec.robust_config().lr
        study_out = study.out / spec.name
        manifest_path = prepare_manifest(spec, study_out)
        data = ImageSource(Manifest.load(manifest_path), spec.data.validation_rows)
        source_path, _ = prepare_source(spec, data, manifest_path, study_out)
        source = load_checkpoint(source_path)
        tries = {"plain": source}
        for again in (False,) if args.only_first else (False, True):
            (args.out / spec.name / "models").mkdir(parents=True, exist_ok=True)
            path = prepare_robust_source(spec, data, manifest_path, args.out / spec.name, source_path, again=again)
            tries["second try" if again else "first try"] = load_checkpoint(path)
        markers, percentiles = source.markers, source.percentiles
        source_train = data.load(spec.source.setting, "train", percentiles=percentiles)
        validation = {"in domain": (data.load(spec.source.setting, "val", markers, percentiles=percentiles, seed=1), source_train)}
        for target in dict.fromkeys(t for grid in spec.grids for t in grid.targets):
            domain = TargetDomain.parse(target)
            try:
                fields = data.load(domain.setting, "val", markers, shift=domain.shift, percentiles=percentiles, seed=1)
            except LmaddaError:
                fields = []
            if fields and target != spec.source.setting:
                validation[target] = (fields, data.load(domain.setting, "train", shift=domain.shift, percentiles=percentiles))
        for name, (fields, unlabelled) in validation.items():
            line = []
            for label, model in tries.items():
                alone = float(np.nanmean([r["pearson"] for r in evaluate_generator(model.generator, fields, markers)]))
                generator, transform = build_baseline("adabn", model.generator, source_train, unlabelled)
                with_adabn = float(np.nanmean([r["pearson"] for r in evaluate_generator(generator, fields, markers,
                                                                                        input_transform=transform)]))
                line.append(f"{label} {alone:.3f} (+AdaBN {with_adabn:.3f})")
                with results.open("a") as handle:
                    handle.write(json.dumps({"experiment": spec.name, "epochs": epochs, "lr": lr, "validation": name, "model": label,
                                             "val_pearson": alone, "val_pearson_adabn": with_adabn}) + "\n")
            print(f"{spec.name:11s} {epochs:2d} epochs lr {lr:g} {name:36s} " + "  ".join(line), flush=True)


if __name__ == "__main__":
    main()
