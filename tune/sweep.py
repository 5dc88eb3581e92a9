"""The layer x learning-rate x target (shift magnitude) sweep: the study's grid engine on Ray Tune over Ray Train,
results to Parquet and MLflow.

The grid is the study's (`lmadda.study.config.Grid`, expanded into `GridPoint`s) and each point runs the
study's trial function (`lmadda.study.trial.run_trial`). Train V2 shape: each Tune trial runs `trial_driver`
on a group of grid points (`resources.points_per_trial`; `SweepConfig.trial_groups`). With a worker group it
fits a `TorchTrainer` running `adaptation_worker` (the lmadda loop, point after point) and relays its reports
to Tune with `TuneReportCallback`; with `workers_per_trial: 0` it runs the same points in its own process.
Either way the source model, the manifest and the images are loaded once per trial, every report names its
point, and `ModeCollapseStopper` sees every report. The last report of each point carries the Pearson per
marker on the labelled target test split, where labels exist, and the label-free criteria; its folder keeps
the point's result rows. After the sweep, every grid point becomes one row of `points.parquet` and one MLflow
run nested under one sweep run, and the result rows of every point and of the unadapted model form
`results.parquet`, the study's schema.

    python -m lmadda_tune.sweep --config tune/configs/quick.yaml          # or: lmadda sweep run --config ...
    python -m lmadda_tune.sweep --config tune/configs/quick.yaml --resume # finish an interrupted sweep
"""

from __future__ import annotations

import argparse
import math
import os
import pwd
import stat
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray import tune
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
import torch

from lmadda.checkpoint import load_checkpoint
from lmadda.core.atomic import write_atomically
from lmadda.core.errors import LmaddaError
from lmadda.data.io import refuse_overwriting_inputs
from lmadda.data.manifest import manifest_inputs
from lmadda.data.manifest import Manifest
from lmadda.evaluation.evaluate import evaluate_generator
from lmadda.evaluation.rows import TargetDomain, marker_means, rows_table, tag_rows
from lmadda.study.trial import GridPoint
from lmadda.training.adapt import AdaptConfig
from lmadda.training.source import SourceTrainConfig, train_source
from lmadda_tune.stopper import ModeCollapseStopper
from lmadda.sweep.config import SweepConfig, load_sweep
from lmadda.sweep.report import best_per_target, format_selection, markers_of, write_sweep_report
from lmadda_tune.train_workers import (GENERATOR_FILE, ROWS_FILE, adaptation_worker, in_trial_adaptation, labelled_test_images,
                                        source_worker)
from lmadda.sweep.trial_config import TrialPoint, TrialSpec
from lmadda_tune.tune_state import BACKUP_DIR, StateBackup, recover_tune_state


LOCAL_RAY_NOTE = """Ray Train V2 under Tune leaves each trial's worker placement group reserved unless its
PlacementGroupCleaner sees the trial actor die (ray-project/ray#54305): trials run with
reuse_actors=False, and the Ray instance needs its dashboard (the state API the cleaner queries).
Without both, the second trial waits forever for CPUs the first one still holds."""


# Source training reports a checkpoint every epoch (Train V2 needs one for Result.metrics); only the
# latest is needed to resume or to read the result. (Adaptation trials keep theirs in a PointStore.)
KEEP_LATEST = CheckpointConfig(num_to_keep=1)
POINTS_FILE = "points.parquet"  # one row per grid point: how its run went (steps, timing, collapse, generator file
# relative to the storage path)
RESULTS_FILE = "results.parquet"  # the result rows: every point's and the unadapted model's, model x image x marker


def trial_config(sweep: SweepConfig, points: list[GridPoint]) -> TrialSpec:
    """What `run_points` needs for one trial's grid points: each point's whole AdaptConfig options (the sweep's shared
    ones under its layers, lr and seed; the published recipe's own for a paper point)."""
    return TrialSpec(
        source_checkpoint=sweep.source.checkpoint, manifest=sweep.data.manifest, source_setting=sweep.data.source_setting,
        points=[TrialPoint(key=point.key, target=point.target, adapt=point.adapt_options(sweep.adapt),
                           tags={"matched": point.matched, "lr": point.lr, "seed": point.seed, "magnitude": point.domain.magnitude})
                for point in points],
    )


def trial_points(config: dict) -> list[GridPoint]:
    """A trial's grid points, from its Tune config (`GridPoint.as_dict` each)."""
    if not config:  # Tune "restarted" an experiment whose state it could not read (tune_state keeps that from happening)
        raise LmaddaError("Ray Tune restored this trial without its configuration: the sweep's Tune state could not be read. "
                          "Run the sweep again under a new name")
    if "points" not in config:
        raise LmaddaError("this trial was started by an older lmadda (one grid point per trial): finish that sweep with the "
                          "lmadda version that started it, or run it again under a new name")
    return [GridPoint.from_dict(point) for point in config["points"]]


def trial_driver(config: dict) -> None:
    """One Tune trial: adapt its grid points with a TorchTrainer (or, with workers_per_trial 0, in this process),
    each evaluated and reported."""
    sweep = SweepConfig.model_validate(config["sweep"])
    resources = sweep.resources
    loop_config = trial_config(sweep, trial_points(config))
    # The trial id is stable across Tuner.restore, so a restored trial finds its points' saved reports.
    trial_id = tune.get_context().get_trial_id()
    store = sweep.storage_path / "train" / f"{sweep.name}-{trial_id}"
    if resources.workers_per_trial == 0:  # no worker group: what short single-device trials spend most of their time starting
        use_gpu = resources.gpus_per_worker > 0 and torch.cuda.is_available()
        in_trial_adaptation(loop_config, store, torch.device("cuda" if use_gpu else "cpu"))
        return
    trainer = TorchTrainer(
        adaptation_worker, train_loop_config=loop_config.model_copy(update={"store": store}).model_dump(mode="json"),
        scaling_config=scaling_config(sweep),
        run_config=RunConfig(name=f"{sweep.name}-{trial_id}", storage_path=str(sweep.storage_path / "train"),
                             callbacks=[TuneReportCallback()],
                             failure_config=FailureConfig(max_failures=resources.max_failures)),
    )
    trainer.fit()  # its reports (and each point's final evaluation) reach Tune through TuneReportCallback


def point_history(records: list[dict], key: str, only_point: bool) -> list[dict]:
    """One point's adaptation reports from its trial's, in step order; a step reported twice (a restarted trial
    re-reports the points it had finished) counts once, as last reported."""
    by_step = {}
    for record in records:
        named = record.get("point")
        mine = named == key if isinstance(named, str) else only_point  # reports of sweeps from before points were named
        if mine and record.get("g_loss") is not None:
            by_step[int(record.get("step", 0) or 0)] = record
    return [by_step[step] for step in sorted(by_step)]


def _collapsed(history: list[dict]) -> tuple[bool, str]:
    """The adaptation loop's own verdict, from the first report that carried it (the curve survives a restore)."""
    flagged = next((record for record in history if record.get("collapsed", 0) > 0), None)
    if flagged is None:
        return False, ""
    return True, str(flagged.get("collapse_reason") or f"collapsed at step {flagged.get('step')}")


def scaling_config(sweep: SweepConfig) -> ScalingConfig:
    resources = sweep.resources
    workers = resources.workers_per_trial
    return ScalingConfig(
        num_workers=workers, use_gpu=resources.gpus_per_worker > 0,
        resources_per_worker={"CPU": resources.cpus_per_worker, **({"GPU": resources.gpus_per_worker} if resources.gpus_per_worker else {})},
    )


def train_source_stage(sweep: SweepConfig, log=print) -> Path:
    """Train the sweep's source model with Ray Train (`source.train`), unless its checkpoint exists.

    The Train run is named after the sweep, so a re-run after an interrupted stage finds its
    checkpoints; the generator is copied to `source.checkpoint` only when training has finished.
    """
    target = sweep.source.checkpoint
    if target.is_file():
        return target
    if sweep.source.train is None:
        raise LmaddaError(f"source checkpoint {target} not found; train one with `lmadda train-source`, "
                          "or give source.train options in the sweep config to train it first")
    log(f"[sweep] training the source model -> {target}")
    if sweep.resources.workers_per_trial == 0:  # no worker group: train in this process, like the trials
        result = train_source(SourceTrainConfig(**sweep.source.train), target, progress=False)
        log(f"[sweep] source model: validation Pearson {result.best_val_pearson:.3f} -> {target}")
        return target
    trainer = TorchTrainer(
        source_worker, train_loop_config={"train": sweep.source.train}, scaling_config=scaling_config(sweep),
        run_config=RunConfig(name=f"{sweep.name}-source", storage_path=str(sweep.storage_path / "train"),
                             failure_config=FailureConfig(max_failures=sweep.resources.max_failures),
                             checkpoint_config=KEEP_LATEST),
    )
    result = trainer.fit()
    if result.checkpoint is None or not result.metrics.get("done"):
        raise LmaddaError(f"source training did not finish ({result.error or 'no final checkpoint'}); re-run the sweep to resume it")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    with result.checkpoint.as_directory() as folder:
        partial.write_bytes((Path(folder) / GENERATOR_FILE).read_bytes())
    partial.replace(target)
    log(f"[sweep] source model: validation Pearson {result.metrics.get('val_pearson', float('nan')):.3f} -> {target}")
    return target


def sweep_exists(sweep: SweepConfig) -> bool:
    return tune.Tuner.can_restore(str(sweep.storage_path / sweep.name))  # only looks for tuner.pkl; unpickles nothing


def refuse_untrusted_restore(experiment_path: Path, storage_path: Path) -> None:
    """Refuse to resume a sweep from a folder that someone other than this user can write.

    The pickle is code: `Tuner.restore` unpickles the experiment's tuner.pkl (and Tune's state files beside it), and
    unpickling runs whatever a `__reduce__` in it names. So whoever can write the storage path can run code in this
    sweep. Ray cannot be told not to, so before a restore the experiment folder, each folder above it up to and
    including `storage_path`, and everything directly in the experiment folder (tuner.pkl, the experiment and search
    states) and in its copy of Tune's state (`tune_state.BACKUP_DIR`) must belong to the current user and not be
    group- or world-writable. Paths that do not exist are not checked: there is nothing to restore from them."""
    experiment_path, storage_path = Path(experiment_path), Path(storage_path)
    chain = [experiment_path]
    for folder in experiment_path.parents:
        if folder == storage_path or storage_path not in folder.parents:
            break
        chain.append(folder)
    chain.append(storage_path)
    inside = sorted(experiment_path.iterdir()) if experiment_path.is_dir() else []
    backup = experiment_path / BACKUP_DIR  # a resume may put Tune's state back from there (lmadda_tune.tune_state)
    inside += sorted(backup.iterdir()) if backup.is_dir() else []
    for path in dict.fromkeys(chain + inside):
        try:
            info = path.stat()
        except FileNotFoundError:
            continue
        mode = stat.S_IMODE(info.st_mode)
        if info.st_uid != os.getuid():
            problem, fix = f"owned by {_user(info.st_uid)}, not by you ({_user(os.getuid())})", "start a fresh sweep in a folder you own"
        elif mode & 0o022:
            problem = f"{'group- and world' if mode & 0o022 == 0o022 else 'group' if mode & 0o020 else 'world'}-writable (mode {mode:04o})"
            fix = f"if you trust its contents, `chmod go-w {path}`; else start a fresh sweep in a folder you own"
        else:
            continue
        raise LmaddaError(f"refusing to resume the sweep from {experiment_path}: {path} is {problem}, and resuming unpickles the "
                          f"sweep's state, which runs code that anyone who can write there could have planted; {fix}")


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def refuse_overwriting_sweep_inputs(sweep: SweepConfig) -> None:
    """The sweep writes its source model (when it trains one) and its tables; none of them may be one of its inputs."""
    experiment_path = sweep.storage_path / sweep.name
    trains = not sweep.source.checkpoint.is_file()
    outputs = [("the sweep's points table", experiment_path / POINTS_FILE), ("the sweep's results table", experiment_path / RESULTS_FILE)]
    inputs = manifest_inputs(sweep.data.manifest, "data.manifest")
    if trains:
        outputs.append(("source.checkpoint", sweep.source.checkpoint))
        inputs += manifest_inputs((sweep.source.train or {}).get("manifest"), "source.train.manifest")
    else:
        inputs.append(("source.checkpoint", sweep.source.checkpoint))
    refuse_overwriting_inputs(outputs, inputs, fix="change storage_path, name or source.checkpoint in the sweep config")


def _check_cpus(sweep: SweepConfig) -> None:
    resources = sweep.resources
    needed = resources.trial_cpus + resources.workers_per_trial * resources.cpus_per_worker if resources.workers_per_trial else resources.cpus_per_worker
    available = ray.cluster_resources().get("CPU", 0)
    if needed > available:
        raise LmaddaError(
            f"a trial needs {needed:g} CPUs (trial {resources.trial_cpus:g} + {resources.workers_per_trial} workers x "
            f"{resources.cpus_per_worker:g}) but the cluster has {available:g}; lower resources.cpus_per_worker or workers_per_trial"
        )


def _in_storage(path: str, storage_path: Path) -> str:
    """A file of the sweep's storage named relative to it ('' stays '')."""
    return str(Path(path).relative_to(storage_path)) if path and Path(path).is_relative_to(storage_path) else path


def run_sweep(sweep: SweepConfig, *, resume: bool = False, log=print) -> list[dict]:
    """Run (or resume) the sweep; return one row per grid point and write points.parquet, results.parquet (the result
    rows) and the MLflow runs."""
    experiment_path = sweep.storage_path / sweep.name
    if resume:
        refuse_untrusted_restore(experiment_path, sweep.storage_path)  # before any work: restoring runs its pickles
    refuse_overwriting_sweep_inputs(sweep)
    _check_cpus(sweep)
    source = load_checkpoint(train_source_stage(sweep, log=log))
    try:
        points = sweep.points(source.generator.num_layers)
    except ValueError as error:  # a layer the source model does not have
        raise LmaddaError(f"sweep {sweep.name}: grid: {error}") from None
    resources = sweep.resources
    if resources.workers_per_trial:  # the trial only waits for its worker group
        trial_resources = {"CPU": resources.trial_cpus}
    else:  # the trial adapts: it holds one worker's resources itself
        trial_resources = {"CPU": resources.cpus_per_worker, **({"GPU": resources.gpus_per_worker} if resources.gpus_per_worker else {})}
    trainable = tune.with_resources(trial_driver, trial_resources)
    stopper = ModeCollapseStopper()
    if resume:
        if not tune.Tuner.can_restore(str(experiment_path)):
            raise LmaddaError(f"no sweep to resume at {experiment_path}; run it without --resume first")
        recover_tune_state(experiment_path, log)  # a driver killed while Tune wrote its state: its last complete copy
        tuner = tune.Tuner.restore(str(experiment_path), trainable=trainable, resume_errored=True)
        log(f"[sweep] resuming {experiment_path}")
    else:
        if experiment_path.exists() and tune.Tuner.can_restore(str(experiment_path)):
            raise LmaddaError(f"sweep {sweep.name!r} already exists at {experiment_path}; use --resume to finish it, or another name")
        groups = [[point.as_dict() for point in group] for group in sweep.trial_groups(source.generator.num_layers)]
        log(f"[sweep] {len(points)} grid points in {len(groups)} trials of up to {max(map(len, groups))}")
        tuner = tune.Tuner(
            trainable,
            param_space={"sweep": sweep.model_dump(mode="json"), "points": tune.grid_search(groups)},
            # reuse_actors=False: see LOCAL_RAY_NOTE (leaked Train placement groups otherwise).
            tune_config=tune.TuneConfig(max_concurrent_trials=resources.max_concurrent_trials, reuse_actors=False),
            run_config=tune.RunConfig(name=sweep.name, storage_path=str(sweep.storage_path), stop=stopper, verbose=0,
                                      callbacks=[StateBackup()]),  # a copy of Tune's last complete state, for --resume
        )
    grid = tuner.fit()
    rows = []
    for result in grid:
        trial = trial_points(result.config)
        records = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []
        for point in trial:
            rows.append(point_row(sweep, point, point_history(records, point.key, len(trial) == 1), result, len(trial),
                                  source.generator.last_layer))
    # The table travels (MLflow keeps it as an artifact): its generator files are named relative to the storage path
    table_rows = [{k: (_in_storage(v, sweep.storage_path) if k == "generator_path" else v) for k, v in r.items() if not k.startswith("_")}
                  for r in rows]
    points_path = write_atomically(experiment_path / POINTS_FILE, lambda temporary: pq.write_table(pa.Table.from_pylist(table_rows), temporary))
    reference = unadapted_rows(sweep, source)
    results = reference + [measured for row in rows for measured in row["_rows"]]
    out = write_atomically(experiment_path / RESULTS_FILE, lambda temporary: pq.write_table(rows_table(results), temporary))
    log(f"[sweep] {len(rows)} grid points -> {points_path}; {len(results)} result rows (model x image x marker) -> {out}")
    unadapted = {target: marker_means([r for r in reference if r["target"] == target]) for target in sorted({r["target"] for r in reference})}
    report = write_sweep_report(table_rows, results, unadapted, experiment_path / "report")
    log(format_selection(table_rows, unadapted, best_per_target(table_rows, unadapted)))
    log(f"[sweep] figures and selection -> {experiment_path / 'report'}")
    from lmadda.sweep.tracking import log_sweep

    log_sweep(sweep, rows, [out, points_path], log=log, unadapted=unadapted, report_files=report)
    return table_rows


def point_row(sweep: SweepConfig, point: GridPoint, history: list[dict], result, points_in_trial: int, last_layer: int) -> dict:
    """One grid point's row of the results table (and, in `_history`, its curve for MLflow)."""
    collapsed, reason = _collapsed(history)
    last = history[-1] if history else {}
    steps = int(last.get("step", 0) or 0)
    finished = last.get("point_done") == 1.0 or collapsed or steps >= AdaptConfig.model_validate(point.adapt_options(sweep.adapt)).steps
    saved = last.get("checkpoint_path")
    generator = Path(saved) / GENERATOR_FILE if isinstance(saved, str) and saved else None
    row = {
        "sweep": sweep.name, "trial_id": result.metrics.get("trial_id") if result.metrics else None, "point": point.key,
        **point.domain.columns(), **point.tags(last_layer),
        "steps_done": steps, "final_g_loss": last.get("g_loss"), "final_d_acc": last.get("d_acc"),
        "collapsed": collapsed, "collapse_reason": reason, "error": str(result.error) if result.error and not finished else "",
        "generator_path": str(generator) if generator is not None and generator.is_file() else "",
        # where a trial's time went: inside this point's adaptation steps, in this point, in the trial so far
        "steps_s": last.get("steps_s"), "worker_s": last.get("worker_s"), "trial_s": last.get("time_total_s"),
        "trial_points": points_in_trial,
    }
    row.update({k: v for k, v in last.items() if k.startswith(("pearson", "lf_")) and isinstance(v, float) and math.isfinite(v)})
    row["_history"] = history if finished else []  # MLflow gets finished points only; a resumed sweep logs the rest
    measured = generator.parent / ROWS_FILE if generator is not None else None
    row["_rows"] = pq.read_table(measured).to_pylist() if measured is not None and measured.is_file() else []
    return row


def unadapted_rows(sweep: SweepConfig, source) -> list[dict]:
    """The source model, unadapted, on each target's labelled test split (none where a target has no labels):
    the reference every trial must beat, in the result-row schema."""
    manifest = Manifest.load(sweep.data.manifest)
    rows = []
    for domain in dict.fromkeys(TargetDomain.parse(target) for target in sweep.grid.targets):
        images = labelled_test_images(manifest, domain.setting, domain.shift, source, sweep.grid.seeds[0])
        if images:
            rows += tag_rows(evaluate_generator(source.generator, images, source.markers), domain, method="unadapted", layer=-1,
                             seed=sweep.grid.seeds[0])
    return rows


def connect_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the Ray cluster at `address` (None: the job's cluster, or a new local instance of `num_cpus`), unless this
    process is connected already. The dashboard stays on: see LOCAL_RAY_NOTE."""
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=num_cpus, log_to_driver=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmadda_tune.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="sweep YAML (see tune/configs/)")
    parser.add_argument("--resume", action="store_true", help="finish an interrupted sweep without redoing finished trials")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: the job's cluster, or a new local one)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a new local Ray instance")
    parser.add_argument("--base-dir", type=Path, default=None, help="absolute folder the config's relative paths resolve "
                        "against (default: the working directory; under `ray job submit --working-dir .`, pass $PWD)")
    args = parser.parse_args(argv)
    # Tune saves the sweep's state at most every 10 s by default; a driver killed in between would
    # redo trials that had finished. The state is a few kB: save it every 2 s.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    try:
        sweep = load_sweep(args.config, args.base_dir)
        connect_ray(args.address, args.num_cpus)
        rows = run_sweep(sweep, resume=args.resume)
    except LmaddaError as error:
        print(f"lmadda sweep: error: {error}", file=sys.stderr)
        return 2
    print(format_sweep_table(rows))
    return 0


def format_sweep_table(rows: list[dict]) -> str:
    markers = markers_of(rows)
    header = f"{'target':34s} {'layer':>5} {'lr':>9} {'steps':>6}" + "".join(f" {('P_' + m):>8}" for m in markers) + "  collapsed"
    lines = [header]
    for r in sorted(rows, key=lambda r: (r["target"], r["lr"], r["layer"], r["seed"])):
        cells = "".join(f" {r.get('pearson_' + m, float('nan')):8.3f}" for m in markers)
        lines.append(f"{r['target']:34s} {r['layer']:>5} {r['lr']:>9.2g} {r['steps_done']:>6}{cells}  {'yes: ' + r['collapse_reason'] if r['collapsed'] else 'no'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
