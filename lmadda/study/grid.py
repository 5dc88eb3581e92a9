"""The adaptation study on one source model: every target domain x method x matched layer, one table.

A target domain is an input setting of the manifest plus an optional shift applied to it
(`bright_field`, or `phase_contrast` + `overexposure:2`). For each domain the study evaluates, on the
test split: the unadapted source model, the cheap baselines (AdaBN, histogram matching, FDA),
LM-ADDA at each requested layer (the last layer is ADDA), LM-ADDA on sets of layers at once
(multi-layer matching), and, when target pairs exist and an oracle budget is given, an oracle trained
on target pairs. Adaptation uses only unlabelled target inputs of the train split. Rows are appended
to a Parquet table after every model, atomically, so an interrupted study keeps everything it finished.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.parquet as pq

from lmadda.corrections.baselines import build_baseline, is_baseline, parse_baseline
from lmadda.checkpoint import GeneratorCheckpoint, save_checkpoint
from lmadda.core.atomic import write_atomically
from lmadda.core.errors import LmaddaError
from lmadda.core.progress import Progress
from lmadda.data.augment import NuisanceAugmentation
from lmadda.data.dataset import LoadedImage, load_images
from lmadda.data.manifest import Manifest
from lmadda.data.shifts import Shift
from lmadda.evaluation.evaluate import SPLIT_SEED_OFFSET, evaluate_generator
from lmadda.models.generator import UNetGenerator
from lmadda.evaluation.rows import CRITERION_PREFIX, RESULT_COLUMNS, TargetDomain, rows_table, tag_rows
from lmadda.selection.criteria import SelectionProbe
from lmadda.selection.selector import UNADAPTED, Candidate, Choice, Observation, Selector
from lmadda.study.trial import GridPoint, TrialResult, TrialTarget, run_trial
from lmadda.training.families import FAMILIES, make_loop
from lmadda.core.registry_names import file_sha256
from lmadda.training.robust import ROBUST_FILES
from lmadda.training.source import SourceTrainConfig, train_source

LABEL_FREE = "label_free"  # the selector's choice among the candidates of one (target, seed), as its own rows
# Methods the selector may choose: what a checkpoint can carry. FDA needs source images at run time,
# so it is reported as a baseline but is no candidate; multi-layer sets are a comparison, not a product.
_ADVERSARIAL_FAMILIES = {"lmadda": "lmadda", "adda": "lmadda", "lmadda_paper": "paper", "adda_paper": "paper"}
# The robust source model (the experiment's `robust`) as it is, and with each cheap correction: method names of its rows.
ROBUST_VARIANTS = {"robust": "unadapted", "robust+adabn": "adabn", "robust+histogram_matching": "histogram_matching"}
ROBUST = "robust"  # the robust source model as it is: the default of the label-free choice where it is admitted


def candidate_family(method: str) -> str | None:
    """The selector family of a result-row method (candidates of one family share one consensus vote), or None for a
    method the selector may not choose (FDA, multi-layer sets, the oracle, the label-free choice itself)."""
    if method in _ADVERSARIAL_FAMILIES:
        return _ADVERSARIAL_FAMILIES[method]
    if method in FAMILIES or method in ROBUST_VARIANTS:
        return method
    if not is_baseline(method) or parse_baseline(method)[1] == "fda":
        return None
    return method.split(":")[0]


class ImageSource:
    """Where a study reads its images: a manifest's splits, or (`validation_rows`) a validation split
    carved out of the bottom rows of each training field, for data sets with too few fields for a
    validation split of their own (the real two-field set: one field trains, the other tests)."""

    def __init__(self, manifest: Manifest, validation_rows: float = 0.0):
        if not 0.0 <= validation_rows < 1.0:
            raise LmaddaError(f"validation_rows {validation_rows} must be a fraction in [0, 1)")
        self.manifest = manifest
        self.validation_rows = validation_rows

    def load(self, setting: str, split: str, markers: list[str] | None = None, *, shift: Shift | None = None,
             percentiles=None, seed: int = 0, augment: NuisanceAugmentation | None = None) -> list[LoadedImage]:
        options = {} if percentiles is None else {"percentiles": percentiles}
        if augment is not None:
            options["augment"] = augment
        if not self.validation_rows or split not in ("train", "val"):
            return load_images(self.manifest, setting, split, markers, shift=shift, seed=seed, **options)
        images = load_images(self.manifest, setting, "train", markers, shift=shift, seed=seed, **options)
        return [_rows_of(image, self.validation_rows, split == "val") for image in images]


def _rows_of(image: LoadedImage, fraction: float, bottom: bool) -> LoadedImage:
    height = image.input.shape[1]
    cut = height - int(round(height * fraction))
    rows = slice(cut, height) if bottom else slice(0, cut)
    target = None if image.target is None else image.target[:, rows]
    return LoadedImage(field=f"{image.field}{'[val rows]' if bottom else '[train rows]'}", input=image.input[:, rows],
                       input_norm=image.input_norm, target=target, target_norm=image.target_norm)


RowsCallback = Callable[[list[dict]], None]
ModelCallback = Callable[[TargetDomain, dict, TrialResult], None]
ProbeFactory = Callable[[TargetDomain], SelectionProbe]


class ResultTable:
    """Rows of the study, flushed to Parquet atomically after each model."""

    def __init__(self, path: Path | None):
        self.path = path
        self.rows: list[dict] = []
        if path is not None and path.exists():
            self.rows = pq.read_table(path).to_pylist()

    def add(self, rows: list[dict]) -> None:
        self.rows.extend({**{column: row.get(column) for column in RESULT_COLUMNS},
                          **{k: v for k, v in row.items() if k.startswith(CRITERION_PREFIX)}} for row in rows)
        self._write()

    def replace(self, rows: list[dict]) -> None:
        """Keep only `rows` (e.g. without the label-free choices, to make them again)."""
        self.rows = list(rows)
        self._write()

    def _write(self) -> None:
        if self.path is not None:
            write_atomically(self.path, lambda temporary: pq.write_table(rows_table(self.rows), temporary))

    def has_choice(self, target: str, seed: int) -> bool:
        """Whether the label-free choice of (target, seed) is in the table (its layer is the chosen model's)."""
        return any(r["target"] == target and r["method"] == LABEL_FREE and r["seed"] == seed for r in self.rows)

    def has(self, target: str, method: str, layer: int, lr: float | None, seed: int, matched: str | None = None) -> bool:
        return any(r["target"] == target and r["method"] == method and r["layer"] == layer
                   and (lr is None or r["lr"] == lr) and r["seed"] == seed
                   and (matched is None or r.get("matched") == matched) for r in self.rows)


ROBUST_ROWS_RECORD = "robust_rows_from.json"  # beside results.parquet: the robust model its robust rows were measured with


def check_robust_rows(out: Path, robust_path: Path, fix: str) -> None:
    """The robust rows in `out/results.parquet` were measured with the robust model at `robust_path`, or none exist
    yet; then it is recorded (file name and SHA-256) for the next run. A rerun skips rows already measured, so rows of
    another robust model (a first try refused since, or a model trained again) would stand beside the new model's
    observations and admission: refused in one line with `fix`. Rows measured before the record existed were measured
    with the first try, the only robust model an older lmadda made."""
    record_path = out / ROBUST_ROWS_RECORD
    current = {"file": robust_path.name, "sha256": file_sha256(robust_path)}
    measured = any(row["method"] in ROBUST_VARIANTS for row in ResultTable(out / "results.parquet").rows)
    if record_path.exists():
        try:
            recorded = json.loads(record_path.read_text())
        except (OSError, ValueError) as error:
            raise LmaddaError(f"{record_path} cannot be read ({error}); {fix}") from None
    else:
        recorded = {"file": ROBUST_FILES[False], "sha256": current["sha256"]} if robust_path.name == ROBUST_FILES[False] else None
    if measured and recorded != current:
        was = "an unrecorded robust model" if recorded is None else f"{recorded.get('file')} (SHA-256 {str(recorded.get('sha256'))[:12]})"
        raise LmaddaError(f"the robust rows in {out / 'results.parquet'} were measured with {was}, not with {robust_path} "
                          f"(SHA-256 {current['sha256'][:12]}), which this run goes on with; {fix}")
    if not record_path.exists() or recorded != current:
        write_atomically(record_path, lambda temporary: temporary.write_text(json.dumps(current)))


def forget_robust_rows_record(out: Path) -> None:
    """The robust rows were dropped: the next robust model to measure them records itself."""
    (out / ROBUST_ROWS_RECORD).unlink(missing_ok=True)


def model_file_name(domain: str, layer: int, recipe: str = "lmadda", family: str = "lmadda") -> str:
    """The file `run_grid(save_models=True)` keeps an adapted model in, under `out`/models (the demo reads it back)."""
    paper = "_paper" if recipe == "paper" else ""
    suffix = "" if family == "lmadda" else f"_{family.replace('+', '_')}"
    return f"{domain.replace(':', '_')}_layer{layer:02d}{paper}{suffix}.pt"


def candidate_name(method: str, matched: str, lr: float | None) -> str:
    """How a model is named among the label-free candidates: 'lmadda:3@2e-05', 'adda_paper:15@0.0002'."""
    return f"{method}:{matched}@{lr:g}"


def label_free_rows(rows: list[dict], target: str, seed: int, selection: Path, selector: Selector,
                    refused: frozenset[str] = frozenset()) -> tuple[list[dict], Choice]:
    """The selector's choice among the observed candidates of (target, seed), as copies of the chosen model's rows;
    `refused` names observed candidates it must not see (a robust source model that failed its admission).

    The model kept unless a candidate is confidently better is the robust source model where it was admitted (it
    needs no target, and costs nothing in domain on the source's validation fields), else the unadapted one."""
    observations = {path.stem: Observation.load(path) for path in sorted(selection.glob("*.npz")) if path.stem not in refused}
    # the robust rows are built from the robust model, also where they were kept before observations named their base
    observations = {name: replace(o, base=ROBUST) if name in ROBUST_VARIANTS else o for name, o in observations.items()}
    choice = selector.choose(observations, default=ROBUST if ROBUST in observations else UNADAPTED)
    chosen = []
    for row in rows:
        if row["target"] != target or row["seed"] != seed or candidate_family(row["method"]) is None:
            continue
        name = row["method"] if row["layer"] == -1 else candidate_name(row["method"], row.get("matched") or str(row["layer"]), row["lr"])
        if name == choice.chosen:
            chosen.append({k: v for k, v in row.items() if k not in ("target", "setting", "shift", "magnitude", "method", "seed")
                           and not k.startswith(CRITERION_PREFIX)})
    (selection / "choice.json").write_text(json.dumps(choice.as_dict(), indent=1))
    return chosen, choice


def run_grid(
    source: GeneratorCheckpoint,
    manifest: Manifest | ImageSource,
    domains: list[TargetDomain],
    points: list[GridPoint],
    adapt_options: dict,
    *,
    seed: int,
    source_setting: str,
    out: Path | None = None,
    baselines: tuple[str, ...] = ("adabn", "histogram_matching", "fda"),
    selector_options: dict | None = None,
    choose: bool = True,
    oracle: SourceTrainConfig | None = None,
    robust: GeneratorCheckpoint | None = None,
    robust_admitted: bool = True,
    save_models: bool = False,
    probe_for: ProbeFactory | None = None,
    on_model: ModelCallback | None = None,
    on_rows: RowsCallback | None = None,
    progress: bool = True,
    log=print,
) -> list[dict]:
    """Evaluate, on `seed`'s shifted images, each domain's unadapted model and baselines and adapt its grid points
    (`points` whose target it is: `lmadda.study.config.Grid.points_for`), with `adapt_options` (the grid's shared
    AdaptConfig options); returns all rows (also written to `out`/results.parquet).

    `robust` (the robust source model) adds its rows: as it is (`robust`), and with AdaBN and with histogram
    matching (`ROBUST_VARIANTS`), in domain and on every target; each is a candidate of the label-free choice when
    `robust_admitted` (`lmadda.training.robust.admit_robust`; given on every call of a seed, with or without `robust`).
    Give `robust` on every call that chooses: the selector measures its rows against the robust model's own stains
    in domain, not the plain model's (rows already measured are skipped); without it, robust rows an earlier run
    left are no candidates.
    `selector_options` (Selector keywords) turns on the label-free choice: every candidate (unadapted,
    each correction and composite, the robust source's rows, each adapted model of every family) is observed on fixed unlabelled target crops, kept
    on disk in `out`/selection, and once a domain's candidates exist the choice lands as rows of
    method `label_free`, the chosen candidate's test rows with `chosen` and `fell_back` set (`choose`
    False defers it, for a caller that adds more candidates of the same seed in a later call).
    Every adapted model is one grid point run by `lmadda.study.trial.run_trial`, measured on the test split
    and, with `probe_for(domain)`, by the label-free criteria on that probe's crops (columns `lf_*` of its
    rows). `on_model(domain, tags, trial)` sees every adapted model's trial result (the study keeps its
    probe predictions); `on_rows(rows)` gets the rows of each model as they land.
    """
    data = manifest if isinstance(manifest, ImageSource) else ImageSource(manifest)
    markers = source.markers
    table = ResultTable(out / "results.parquet" if out else None)

    def add(rows: list[dict]) -> None:
        table.add(rows)
        if on_rows is not None:
            on_rows(rows)

    source_train = data.load(source_setting, "train", percentiles=source.percentiles)
    source_test = data.load(source_setting, "test", markers, percentiles=source.percentiles)
    in_domain = {"unadapted": source.generator, **({"robust": robust.generator} if robust is not None else {})}
    for method, generator in in_domain.items():
        if not table.has("source", method, -1, None, seed):
            rows = evaluate_generator(generator, source_test, markers)
            add(tag_rows(rows, TargetDomain(source_setting), method=method, layer=-1, seed=seed, target="source"))
    for domain in domains:
        target_train = data.load(domain.setting, "train", shift=domain.shift, percentiles=source.percentiles, seed=seed)
        target_test = data.load(domain.setting, "test", markers, shift=domain.shift, percentiles=source.percentiles,
                                seed=seed + SPLIT_SEED_OFFSET["test"])

        def log_model(method: str, rows: list[dict], tags: dict) -> None:
            mean = np.nanmean([r["pearson"] for r in rows])
            log(f"[study] {domain.name:34s} {method:18s} layer {tags.get('matched', tags['layer'])!s:>8s} lr {tags.get('lr') or '-'!s:7s} Pearson {mean:.3f}")

        def record(method: str, rows: list[dict], layer: int = -1, **tags) -> None:
            add(tag_rows(rows, domain, method=method, layer=layer, seed=seed, **tags))
            log_model(method, rows, {"layer": layer, **tags})

        selection = out / "selection" / domain.name.replace(":", "_") / f"seed{seed}" if selector_options is not None and out else None
        selector: Selector | None = None

        def observe(name: str, method: str, generator: UNetGenerator, transform=None, base: str = UNADAPTED) -> None:
            """Keep what the label-free choice needs of a candidate, once (`base`: the source model it was built from)."""
            nonlocal selector
            family = candidate_family(method)
            path = selection / f"{name}.npz" if selection is not None and family is not None else None
            if path is None or path.exists():
                return
            if selector is None:
                selector = make_selector()
            selector.observe(Candidate(name, generator, transform, family=family, base=base)).save(path)

        def make_selector() -> Selector:
            references = {ROBUST: robust.generator} if robust is not None else None  # the robust rows' own in-domain stains
            return Selector(source.generator, source_train, target_train, seed=seed, domain_reference=source.domain_reference,
                            references=references, **selector_options)

        # refused, or not given this run (a demo without one, over a folder an earlier run left robust rows in)
        refused = frozenset() if robust_admitted and robust is not None else frozenset(ROBUST_VARIANTS)
        cheap = [(name, source, name) for name in ("unadapted", *baselines)]
        if robust is not None:
            cheap += [(label, robust, baseline) for label, baseline in ROBUST_VARIANTS.items()]
        for name, model, baseline in cheap:
            done = table.has(domain.name, name, -1, None, seed)
            if done and (selection is None or candidate_family(name) is None or name in refused
                         or (selection / f"{name}.npz").exists()):
                continue
            started = time.perf_counter()
            generator, transform = build_baseline(baseline, model.generator, source_train, target_train, seed=seed)
            seconds = time.perf_counter() - started
            if not done:
                record(name, evaluate_generator(generator, target_test, markers, input_transform=transform), seconds=seconds)
            if name not in refused:
                observe(name, name, generator, transform, base=ROBUST if model is robust else UNADAPTED)

        last = source.generator.last_layer
        for point in (point for point in points if point.target == domain.name):
            if point.seed != seed:
                raise LmaddaError(f"grid point {point.key} has seed {point.seed}, but this grid runs seed {seed}")
            tags = point.tags(last)
            method, layer, matched = tags["method"], tags["layer"], tags["matched"]
            candidate = candidate_name(method, matched, point.lr)
            done = table.has(domain.name, method, layer, point.lr, seed, matched)
            if done and (selection is None or candidate_family(method) is None or (selection / f"{candidate}.npz").exists()):
                continue
            config = point.config(adapt_options)
            bar = Progress(config.steps, f"adapt ({point.family}) layer {config.layer}", progress)
            trial = run_trial(make_loop(config, source, source_train, target_train),
                              TrialTarget(domain, markers, target_test, probe_for(domain) if probe_for else None), tags,
                              on_record=lambda r: bar.update(r["step"], g=r["g_loss"], d=r["d_loss"], acc=r["d_acc"]))
            result = trial.adapted
            observe(candidate, method, result.generator, result.input_correction)
            if done:  # measured in an earlier run that predates the label-free choice: observed now, not re-logged
                continue
            if on_model is not None:
                on_model(domain, {**tags, "target": domain.name}, trial)
            add(trial.rows)
            log_model(method, trial.rows, tags)
            if save_models and out is not None and len(point.layers) == 1:
                checkpoint = result.checkpoint(source, config, domain.name, target=domain.name)
                save_checkpoint(out / "models" / model_file_name(domain.name, layer, point.recipe, point.family), checkpoint)

        if choose and selection is not None and not table.has_choice(domain.name, seed):
            selector = selector or make_selector()
            rows, choice = label_free_rows(table.rows, domain.name, seed, selection, selector, refused)
            if rows:
                record(LABEL_FREE, rows, layer=rows[0]["layer"], matched=choice.chosen, lr=rows[0].get("lr"),
                       chosen=choice.chosen, fell_back=choice.fell_back)
                log(f"[study] {domain.name:34s} label-free choice: {choice.chosen} ({choice.reason})")

        if oracle is not None and not table.has(domain.name, "oracle", -1, None, seed):
            start = time.perf_counter()
            oracle_config = oracle.model_copy(update={"setting": domain.setting, "shift": str(domain.shift) if domain.shift else None})
            train_pairs = data.load(domain.setting, "train", markers, shift=domain.shift, percentiles=source.percentiles, seed=seed)
            try:
                val_pairs = data.load(domain.setting, "val", markers, shift=domain.shift, percentiles=source.percentiles, seed=seed + 1)
            except LmaddaError:  # a target without validation fields: the oracle keeps its best epoch on its own training pairs
                log(f"[study] {domain.name}: no validation fields, the oracle picks its epoch on its training pairs")
                val_pairs = train_pairs
            oracle_data = (train_pairs, val_pairs)
            trained = train_source(oracle_config, progress=progress, data=oracle_data)
            record("oracle", evaluate_generator(trained.checkpoint.generator, target_test, markers), seconds=time.perf_counter() - start)
    return table.rows
