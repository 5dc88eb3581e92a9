"""Run the experiments of a study config: data, source model, every grid, the label-free criteria.

For one experiment:
1. data: simulate it, or index a folder of real images in place;
2. the source model, trained once (reused when its checkpoint exists), and the robust source model
   (`robust`: fine-tuned from it with imaging-nuisance augmentation), likewise;
3. for each grid, seed and learning rate, `lmadda.study.grid.run_grid`: unadapted, baselines and composites,
   the robust source model (alone, with AdaBN, with histogram matching), LM-ADDA at every layer (the last
   is ADDA), multi-layer sets, the other families (moments, self-training) at their layers, and, for the
   first seed and rate, the oracle;
   each adapted model is scored by the label-free criteria on fixed target crops and its predictions
   on those crops are kept for the ensemble criteria;
4. the zero-training discrepancy profile of the source model per target, and the layer it predicts;
5. the ensemble criteria (disagreement across seeds, and across layers), once their models exist;
6. a sample panel per target: input, truth, unadapted, the best adapted layer.
Everything lands in `out/<experiment>/results.parquet` as it is measured and in MLflow per model; a
rerun skips what is done.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from lmadda.checkpoint import GeneratorCheckpoint, load_checkpoint
from lmadda.core.errors import LmaddaError
from lmadda.data.dataset import target_from_model_range
from lmadda.data.index import index_folder
from lmadda.data.io import read_image
from lmadda.data.manifest import Manifest
from lmadda.data.synth import SynthConfig, synthesize
from lmadda.evaluation.evaluate import SPLIT_SEED_OFFSET
from lmadda.evaluation.rows import TargetDomain
from lmadda.selection.criteria import SelectionProbe, layer_disagreement, predict_layer, seed_disagreement
from lmadda.study.config import ExperimentSpec, StudyConfig
from lmadda.study.failures import RECOVERABLE, FailureLog
from lmadda.study.figures import panel_file_name, stain_panel
from lmadda.study.grid import (LABEL_FREE, ROBUST_VARIANTS, ImageSource, ResultTable, check_robust_rows,
                               forget_robust_rows_record, run_grid)
from lmadda.study.tracking import StudyTracker, model_key
from lmadda.study.trial import TrialResult
from lmadda.models.tiling import predict_tiled
from lmadda.training.robust import ROBUST_FILES, RobustAdmission, has_second_try, robust_with_second_try, second_try
from lmadda.training.source import SourceTrainConfig, changed_options, train_source


SOURCE_FILE = "source.pt"


def experiment_name(spec: ExperimentSpec) -> str:
    return f"lmadda-study-{spec.name}"


def prepare_manifest(spec: ExperimentSpec, out: Path, log=print) -> Path:
    path = out / "data" / "manifest.parquet"
    if spec.data.simulate is not None:
        if not path.exists():
            simulate = spec.data.simulate
            _, seconds = synthesize(out / "data", SynthConfig(fields=simulate.fields, size=simulate.size, seed=simulate.seed))
            log(f"[study:{spec.name}] simulated {simulate.fields} fields of {simulate.size} px in {seconds:.0f} s")
        return path
    index = spec.data.index
    if not index.root.is_dir():
        raise LmaddaError(f"experiment {spec.name}: data folder {index.root} not found; set data.index.root to the folder "
                          "of images (a relative path starts where `lmadda study` runs), or leave this experiment out of the config")
    manifest, _ = index_folder(index.root, index.index_spec())
    check_indexed_data(spec, manifest)
    manifest.save(path)  # re-indexed every run: cheap, and it follows the folder
    return path


def check_indexed_data(spec: ExperimentSpec, manifest: Manifest) -> None:
    """Before any training: the settings exist, and every crop fits the smallest image of the settings used."""
    settings = {spec.source.setting} | {TargetDomain.parse(t).setting for grid in spec.grids for t in grid.targets}
    missing = sorted(settings - set(manifest.settings))
    if missing:
        raise LmaddaError(f"experiment {spec.name}: setting(s) {', '.join(missing)} not in the indexed data {spec.data.index.root}; "
                          f"its settings: {', '.join(manifest.settings)} (check source.setting, the grids' targets and data.index)")
    shapes = [read_image(manifest.resolve(row), bit_depth=row.bit_depth).pixels.shape[1:]
              for row in manifest.rows if row.role == "input" and row.setting in settings]
    height, width = min(h for h, _ in shapes), min(w for _, w in shapes)
    try:
        spec.check_field_size(height, width, data=f"the smallest image in {spec.data.index.root}")
    except ValueError as error:
        raise LmaddaError(str(error)) from None


def _source_config(spec: ExperimentSpec, manifest_path: Path) -> SourceTrainConfig:
    return SourceTrainConfig(manifest=manifest_path, setting=spec.source.setting, markers=spec.source.markers, **spec.source.train)


def _robust_config(spec: ExperimentSpec, manifest_path: Path, source_path: Path, again: bool = False) -> SourceTrainConfig | None:
    config = spec.robust_config()
    if config is None:
        return None
    config = config.model_copy(update={"manifest": manifest_path, "init_from": source_path})
    if not again:
        return config
    return second_try(config) if has_second_try(config) else None  # a config that keeps only recognisable copies has none


def check_reused_models(spec: ExperimentSpec, study: StudyConfig, retrain_robust: bool = False) -> None:
    """Before any work: the source and robust models an earlier run left are reused only if the config still trains
    them as they were trained; every result beside them was measured with them."""
    out = study.out / spec.name
    manifest_path, source_path = out / "data" / "manifest.parquet", out / "models" / SOURCE_FILE
    if source_path.exists():
        _refuse_changed_source(spec, source_path, _source_config(spec, manifest_path), out)
    for again, name in ROBUST_FILES.items():
        if not (out / "models" / name).exists() or retrain_robust:
            continue
        robust_config = _robust_config(spec, manifest_path, source_path, again)
        if robust_config is not None:  # None: a try this config no longer makes, left unused
            _refuse_changed_robust(spec, out / "models" / name, robust_config)


def _refuse_changed_source(spec: ExperimentSpec, path: Path, config: SourceTrainConfig, out: Path) -> None:
    changed = changed_options(path, config)
    if changed:
        raise LmaddaError(f"{path} was trained with other options than experiment {spec.name}'s source ({'; '.join(changed)}); "
                          f"every model of the experiment was adapted from it, so it is not reused: give the study another "
                          f"`out`, or move {out} aside, and run again")


def _refuse_changed_robust(spec: ExperimentSpec, path: Path, config: SourceTrainConfig) -> None:
    changed = changed_options(path, config)
    if changed:
        raise LmaddaError(f"{path} was fine-tuned with other options than experiment {spec.name}'s `robust` ({'; '.join(changed)}); "
                          f"run `lmadda study --retrain-robust --only {spec.name}`: it keeps that model beside it, fine-tunes the "
                          "robust model again and measures its rows again; nothing else is adapted again")


def prepare_source(spec: ExperimentSpec, data: ImageSource, manifest_path: Path, out: Path, log=print) -> tuple[Path, SourceTrainConfig]:
    path = out / "models" / SOURCE_FILE
    config = _source_config(spec, manifest_path)
    if path.exists():
        _refuse_changed_source(spec, path, config, out)
        log(f"[study:{spec.name}] reusing source model {path}")
        return path, config
    markers, seed = config.markers, config.seed
    images = (data.load(config.setting, "train", markers, seed=seed), data.load(config.setting, "val", markers, seed=seed + 1))
    def epoch_done(record: dict, state: dict) -> None:
        losses = ", ".join(f"{key} {record[key]:.3f}" for key in ("g_l1", "g_gan", "d_loss") if key in record)
        log(f"[study:{spec.name}] source epoch {record['epoch']}/{config.epochs}: {losses}, "
            f"validation Pearson {record['val_pearson']:.3f} ({time.perf_counter() - start:.0f} s)")

    log(f"[study:{spec.name}] training the source model {config.setting} -> {', '.join(markers)}: {config.epochs} epochs")
    start = time.perf_counter()
    # Steps done/total within each epoch (`Progress`); the per-epoch lines above say how the epochs went.
    result = train_source(config, path, progress=True, data=images, on_epoch=epoch_done)
    log(f"[study:{spec.name}] source model: validation Pearson {result.best_val_pearson:.3f} ({result.seconds:.0f} s) -> {path}")
    return path, config


def prepare_robust_source(spec: ExperimentSpec, data: ImageSource, manifest_path: Path, out: Path, source_path: Path,
                          log=print, again: bool = False) -> Path | None:
    """The robust source model (`robust` in the experiment): the source model fine-tuned on its training fields and
    their imaging-nuisance copies (lmadda.data.augment), keeping its best epoch on the validation fields and their
    augmented copies (`NuisanceAugmentation.for_validation`), as `lmadda train-source` does. `again`: its second try,
    recognisable copies only (`lmadda.training.robust.second_try`). Trained once; reused when its checkpoint exists."""
    config = _robust_config(spec, manifest_path, source_path, again)
    if config is None:
        return None
    path = out / "models" / ROBUST_FILES[again]
    what = "robust source model" + (" (second try: recognisable copies only)" if again else "")
    if path.exists():
        _refuse_changed_robust(spec, path, config)
        log(f"[study:{spec.name}] reusing {what} {path}")
        return path
    augment, markers, seed = config.augment, config.markers, config.seed
    images = (data.load(config.setting, "train", markers, seed=seed, augment=augment),
              data.load(config.setting, "val", markers, seed=seed + 1, augment=augment.for_validation()))
    log(f"[study:{spec.name}] fine-tuning the {what}: {config.epochs} epochs on {len(images[0])} fields "
        f"({augment.copies} augmented copies each: {', '.join(augment.nuisances)})")
    result = train_source(config, path, progress=False, data=images)
    log(f"[study:{spec.name}] {what}: validation Pearson {result.best_val_pearson:.3f} (clean + augmented validation "
        f"fields, {result.seconds:.0f} s) -> {path}")
    return path


def admitted_robust(spec: ExperimentSpec, data: ImageSource, manifest_path: Path, out: Path, source: GeneratorCheckpoint,
                    source_path: Path, log=print) -> tuple[GeneratorCheckpoint | None, RobustAdmission | None, bool]:
    """The experiment's robust source model and its admission (source labels only: lmadda.training.robust), after a
    second try where the first was refused. Returns (model, admission, whether it is the second try)."""
    if spec.robust is None:
        return None, None, False

    def make(again: bool) -> GeneratorCheckpoint:
        return load_checkpoint(prepare_robust_source(spec, data, manifest_path, out, source_path, log, again=again))

    validation = data.load(spec.source.setting, "val", source.markers, percentiles=source.percentiles)
    again = _robust_config(spec, manifest_path, source_path, again=True) is not None
    return robust_with_second_try(source.generator, validation, source.markers, lambda: make(False),
                                  (lambda: make(True)) if again else None, log=lambda line: log(f"[study:{spec.name}] {line}"))


class CriteriaRecorder:
    """Scores every adapted model with the label-free criteria and keeps its predictions on the probe crops."""

    def __init__(self, spec: ExperimentSpec, source: GeneratorCheckpoint, data: ImageSource, out: Path):
        self.spec, self.source, self.data = spec, source, data
        self.folder = out / "predictions"
        self.probes: dict[str, SelectionProbe] = {}
        self.windows: dict[tuple[str, int], tuple] = {}

    def probe(self, domain: TargetDomain) -> SelectionProbe:
        if domain.name not in self.probes:
            criteria = self.spec.criteria
            source_images = self.data.load(self.spec.source.setting, "train", percentiles=self.source.percentiles)
            target_images = self.data.load(domain.setting, "train", shift=domain.shift, percentiles=self.source.percentiles)
            self.probes[domain.name] = SelectionProbe(self.source.generator, source_images, target_images,
                                                      crop_size=criteria.crop_size, crops=criteria.crops)
        return self.probes[domain.name]

    def __call__(self, domain: TargetDomain, tags: dict, trial: TrialResult) -> None:
        """Keep an adapted model's stains of the probe crops (the ensemble criteria compare them) and, for single
        layers, of the sample panel's window."""
        path = self.prediction_path(tags)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, trial.probe_prediction.astype(np.float16))
        if tags["method"] in ("lmadda", "adda"):  # the sample panel's stain, kept so that drawing it adapts nothing again
            window = self._window_input(domain, tags["seed"])
            correct = trial.adapted.input_correction or (lambda image: image)
            np.save(self.panel_path(tags), predict_tiled(trial.adapted.generator, correct(window)).astype(np.float16))

    def prediction_path(self, row: dict) -> Path:
        return self.folder / (model_key(row).replace("|", "__").replace(":", "_").replace("+", "_") + ".npy")

    def panel_path(self, row: dict) -> Path:
        return self.prediction_path(row).with_suffix(".panel.npy")

    def _test_window(self, domain: TargetDomain, seed: int):
        """The panel's test field (its shift drawn as the test split's, `SPLIT_SEED_OFFSET`) and a 256-px window from its middle,
        which keeps the panel small and legible."""
        if (domain.name, seed) not in self.windows:
            image = self.data.load(domain.setting, "test", self.source.markers, shift=domain.shift,
                                   percentiles=self.source.percentiles, seed=seed + SPLIT_SEED_OFFSET["test"])[0]
            height, width = image.input.shape[1:]
            size = min(256, height, width) // self.source.config.multiple * self.source.config.multiple
            top, left = (height - size) // 2, (width - size) // 2
            self.windows[(domain.name, seed)] = image, (slice(None), slice(top, top + size), slice(left, left + size))
        return self.windows[(domain.name, seed)]

    def _window_input(self, domain: TargetDomain, seed: int) -> np.ndarray:
        image, window = self._test_window(domain, seed)
        return image.input[window]

    def panel_window(self, domain: TargetDomain, seed: int) -> dict:
        """Input, truth and the unadapted stain of the panel's window, (H, W) each, and the field's name."""
        image, window = self._test_window(domain, seed)
        return {"input": image.input[0][window[1:]], "truth": target_from_model_range(image.target[window])[0],
                "unadapted": target_from_model_range(predict_tiled(self.source.generator, image.input[window]))[0],
                "field": image.field}


def ensemble_criteria(rows: list[dict], predictions: CriteriaRecorder) -> dict[str, dict[str, float]]:
    """model key -> {lf_seed_disagreement, lf_layer_disagreement} from the kept predictions."""
    models = {model_key(r): r for r in rows if r["method"] in ("lmadda", "adda", "lmadda_multi")}
    loaded = {key: np.load(predictions.prediction_path(row)) for key, row in models.items() if predictions.prediction_path(row).exists()}
    result: dict[str, dict[str, float]] = defaultdict(dict)
    by_config: dict[tuple, list[str]] = defaultdict(list)
    by_seed: dict[tuple, dict[str, np.ndarray]] = defaultdict(dict)
    for key, row in models.items():
        if key not in loaded:
            continue
        by_config[(row["target"], row["method"], row["matched"], row["lr"])].append(key)
        if row["method"] != "lmadda_multi":
            by_seed[(row["target"], row["lr"], row["seed"])][key] = loaded[key]
    for keys in by_config.values():
        value = seed_disagreement([loaded[key] for key in keys])
        for key in keys:
            result[key]["lf_seed_disagreement"] = value
    for group in by_seed.values():
        for key, value in layer_disagreement(group).items():
            result[key]["lf_layer_disagreement"] = value
    return result


def _panel(spec: ExperimentSpec, recorder: "CriteriaRecorder", domain: TargetDomain, rows: list[dict], out: Path) -> Path | None:
    """Input, truth, unadapted and the best single adapted layer (by labelled Pearson), drawn from the
    window stains the recorder kept when that model was adapted (no model is adapted again to draw it)."""
    scores: dict[tuple, list[float]] = defaultdict(list)
    keys: dict[tuple, dict] = {}
    for row in rows:
        if row["target"] == domain.name and row["method"] in ("lmadda", "adda") and not row["collapsed"] and math.isfinite(row["pearson"]):
            config = (int(row["layer"]), row["lr"], row["seed"])
            scores[config].append(row["pearson"])
            keys[config] = row
    if not scores:
        return None
    best = max(scores, key=lambda key: np.mean(scores[key]))
    stored = recorder.panel_path(keys[best])
    if not stored.exists():  # a model adapted before panels were kept (an older study): nothing to draw from
        return None
    window = recorder.panel_window(domain, keys[best]["seed"])
    images = {**window, "adapted": target_from_model_range(np.load(stored).astype(np.float32))[0]}
    return stain_panel(domain.name, recorder.source.markers[0], best[0], images, out / "panels" / panel_file_name(domain.name),
                       title=f"{spec.title}: {domain.name}, test field {window['field']}")


def forget_robust(spec: ExperimentSpec, study: StudyConfig, log=print) -> list[Path]:
    """Set the experiment's robust source models aside (renamed `*.replaced-N.pt`, not deleted; its second try too) and
    drop what was measured with them: their rows, their candidate observations and every label-free choice (rows and
    MLflow runs), so that the next run fine-tunes them again and measures and chooses again. Returns where the old
    models now lie."""
    if spec.robust is None:
        raise LmaddaError(f"experiment {spec.name} has no `robust`: there is no robust source model to fine-tune again")
    out = study.out / spec.name
    forget_choices(spec, study, log)
    table = ResultTable(out / "results.parquet")
    dropped = [row for row in table.rows if row["method"] in ROBUST_VARIANTS]
    # MLflow first: a run left behind would keep its old figures in the document (the new rows share its key)
    StudyTracker(study.tracking_uri, experiment_name(spec), study.out).forget({model_key(row) for row in dropped})
    table.replace([row for row in table.rows if row["method"] not in ROBUST_VARIANTS])
    for observation in (out / "selection").glob("*/seed*/*.npz"):
        if observation.stem in ROBUST_VARIANTS:  # observations of the old model; the new one is observed again
            observation.unlink()
    forget_robust_rows_record(out)
    aside = []
    for name in ROBUST_FILES.values():
        path = out / "models" / name
        if path.exists():
            number = 1
            while path.with_suffix(f".replaced-{number}.pt").exists():
                number += 1
            aside.append(path.rename(path.with_suffix(f".replaced-{number}.pt")))
    kept = f"set aside as {', '.join(map(str, aside))}" if aside else "none to set aside"
    log(f"[study:{spec.name}] robust source models: {kept}; {len(dropped)} rows measured with them dropped; they are "
        "measured again")
    return aside


def forget_choices(spec: ExperimentSpec, study: StudyConfig, log=print) -> int:
    """Drop the experiment's label-free choices (rows and MLflow runs) so that the next run makes them again
    from the kept observations; every model and its other rows stay. Returns how many choices were dropped."""
    out = study.out / spec.name
    table = ResultTable(out / "results.parquet")
    dropped = {model_key(row) for row in table.rows if row["method"] == LABEL_FREE}
    table.replace([row for row in table.rows if row["method"] != LABEL_FREE])
    StudyTracker(study.tracking_uri, experiment_name(spec), study.out).forget(dropped)
    log(f"[study:{spec.name}] {len(dropped)} label-free choices dropped; they are made again from the kept observations")
    return len(dropped)


def run_experiment(spec: ExperimentSpec, study: StudyConfig, log=print) -> list[dict]:
    start = time.perf_counter()
    out = study.out / spec.name
    failures = FailureLog(out, spec.name)  # this run's failures; a rerun retries every target
    manifest_path = prepare_manifest(spec, out, log)
    data = ImageSource(Manifest.load(manifest_path), spec.data.validation_rows)
    source_path, source_config = prepare_source(spec, data, manifest_path, out, log)
    source = load_checkpoint(source_path)
    robust, admission, again = admitted_robust(spec, data, manifest_path, out, source, source_path, log)
    if robust is not None:
        check_robust_rows(out, out / "models" / ROBUST_FILES[again],
                          fix=f"run `lmadda study --retrain-robust --only {spec.name}` to measure them again")
    tracker = StudyTracker(study.tracking_uri, experiment_name(spec), study.out)
    robust_admitted = True
    if admission is not None:
        tracker.log_facts({**{f"robust_{key}": float(value) for key, value in admission.as_dict().items()},
                           "robust_second_try": float(again)})
        robust_admitted = admission.admitted
    recorder = CriteriaRecorder(spec, source, data, out)
    table = ResultTable(out / "results.parquet")
    tracker.sync(table.rows)  # rows a killed run measured but had not logged yet
    oracle = None
    if spec.oracle is not None:
        oracle = source_config.model_copy(update={**spec.oracle, "init_from": source_path})
        oracle = SourceTrainConfig.model_validate(oracle.model_dump())
    num_layers = source.generator.num_layers
    for grid in spec.grids:
        domains = [TargetDomain.parse(t) for t in grid.targets]
        for seed in grid.seeds:
            for lr in grid.lrs:
                first = seed == grid.seeds[0] and lr == grid.lrs[0]
                for domain in domains:  # one target at a time: a target that fails is recorded, the others go on
                    if failures.failed(domain.name):
                        continue
                    try:
                        rows = run_grid(source, data, [domain], grid.points_for(domain.name, seed, lr, num_layers), spec.adapt,
                                        seed=seed, source_setting=spec.source.setting, out=out, baselines=tuple(spec.baselines),
                                        selector_options=spec.selection.options(), choose=lr == grid.lrs[-1],
                                        oracle=oracle if first else None, robust=robust,
                                        robust_admitted=robust_admitted,
                                        probe_for=recorder.probe, on_model=recorder,
                                        progress=False, log=log)
                    except RECOVERABLE as error:
                        failures.record(domain.name, f"adapting (seed {seed}, lr {lr:g})", error, log)
                        continue
                    tracker.sync(rows)
        for domain in domains:
            key = f"profile|{domain.name}"
            if not tracker.has(key) and not failures.failed(domain.name):
                try:
                    profile = recorder.probe(domain).discrepancy_profile()
                except RECOVERABLE as error:
                    failures.record(domain.name, "measuring its discrepancy profile", error, log)
                    continue
                tracker.log_profile(domain.name, profile, predict_layer(profile, spec.criteria.profile_fraction))
    rows = ResultTable(out / "results.parquet").rows
    for key, metrics in ensemble_criteria(rows, recorder).items():
        tracker.add_metrics(key, metrics)
    for grid in spec.grids:
        for target in grid.targets:
            domain = TargetDomain.parse(target)
            if not (out / "panels" / panel_file_name(domain.name)).exists() and not failures.failed(domain.name):
                try:
                    panel = _panel(spec, recorder, domain, rows, out)
                except RECOVERABLE as error:
                    failures.record(domain.name, "drawing its sample panel", error, log)
                    continue
                if panel is not None:
                    tracker.log_artifact(panel, "panels")
    failed = f"; failed targets: {', '.join(e['target'] for e in failures.entries)} ({failures.path})" if failures.entries else ""
    log(f"[study:{spec.name}] done in {time.perf_counter() - start:.0f} s; {len(rows)} result rows in {out / 'results.parquet'}{failed}")
    return rows
