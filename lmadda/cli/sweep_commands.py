"""`lmadda sweep run | promote` and `lmadda runs compare`: the Ray/MLflow edge, imported only when used."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from lmadda.selection.selector import PROMOTION_CRITERIA


def register(subparsers: argparse._SubParsersAction) -> None:
    sweep = subparsers.add_parser("sweep", help="layer x lr x shift-magnitude sweeps on Ray Tune, results in MLflow")
    sweep_sub = sweep.add_subparsers(dest="sweep_command", required=True, metavar="SWEEP_COMMAND")
    run = sweep_sub.add_parser("run", help="run (or --resume) a sweep from a YAML config (see tune/configs/)",
                               description="Same as `python -m lmadda_tune.sweep`; submit it to a cluster with `ray job submit --working-dir . -- lmadda sweep run --config ...`.")
    run.add_argument("--config", type=Path, required=True)
    run.add_argument("--resume", action="store_true", help="finish an interrupted sweep without redoing finished grid points")
    run.add_argument("--reuse", action="store_true", help="resume the sweep if it exists, start it otherwise (what `make demo` uses)")
    run.add_argument("--address", default=None, help="Ray cluster address (default: the job's cluster or a new local one)")
    run.add_argument("--num-cpus", type=int, default=None, help="CPUs of a new local Ray instance")
    run.add_argument("--promote", action="store_true", help="register the best generator per (marker, setting) when done")
    run.add_argument("--base-dir", type=Path, default=None,
                     help="absolute folder the config's relative paths resolve against (default: the working directory). "
                          "Under `ray job submit --working-dir .` the working directory is Ray's copy of the repository, "
                          "without git-ignored files: pass --base-dir $PWD there")
    run.set_defaults(func=run_sweep_command)

    promote = sweep_sub.add_parser("promote", help="register the best non-collapsed generator per (marker, setting) as an MLflow "
                                     "LoggedModel and a registry version made from it, and set its alias")
    promote.add_argument("--config", type=Path, help="sweep YAML (gives tracking URI and experiment)")
    promote.add_argument("--tracking-uri", help="MLflow tracking URI (default from --config)")
    promote.add_argument("--experiment", help="MLflow experiment (default from --config)")
    promote.add_argument("--criterion", default="auto", choices=PROMOTION_CRITERIA,
                         help="pearson: labelled target Pearson (needs target labels); label_free: the label-free selector over "
                              "the unadapted model, AdaBN, histogram matching and every trial (needs --config; keeps the "
                              "unadapted model unless a candidate is confidently better); lf_*: one per-trial criterion, for "
                              "comparison; auto (default): pearson where the trials have target labels, else label_free")
    promote.add_argument("--replace", action="store_true",
                         help="move the serving alias <setting> even where a promotion by another criterion set it (without it, "
                              "this promotion lands at <setting>--<criterion> beside the served model)")
    promote.set_defaults(func=run_promote)

    runs = subparsers.add_parser("runs", help="inspect MLflow runs")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True, metavar="RUNS_COMMAND")
    compare = runs_sub.add_parser("compare", help="print the comparison table of a sweep's trial runs and its promoted generators",
                                  description="The trial runs (target, layer, lr, collapsed, Pearson per marker), then the promoted "
                                              "generators as MLflow LoggedModels: id, name, status, source run, key metrics, and the "
                                              "registry versions made from each with the aliases that point at them.")
    compare.add_argument("--experiment", required=True)
    compare.add_argument("--tracking-uri", required=True, help="e.g. sqlite:////abs/path/out/sweeps/mlflow.db or http://host:5000")
    compare.set_defaults(func=run_compare)


def _sweep_from(path: Path, base_dir: Path | None = None):
    from lmadda.sweep.config import load_sweep

    return load_sweep(path, base_dir)


@contextlib.contextmanager
def tracking_server_errors(tracking_uri: str, then: str):
    """An MLflow failure that outlasted MLflow's own retries (a server down, a wrong URI) as one line that says what to
    do next, instead of a traceback from deep inside the tracking client."""
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    from lmadda.core.errors import LmaddaError

    try:
        yield
    except (MlflowException, RequestException) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise LmaddaError(f"MLflow at {tracking_uri} failed: {first}; check that the server is up and the URI is right, "
                          f"then {then}") from error


def run_sweep_command(args: argparse.Namespace) -> int:
    from lmadda_tune.sweep import connect_ray, format_sweep_table, run_sweep, sweep_exists
    from lmadda.sweep.promotion import promote

    sweep = _sweep_from(args.config, args.base_dir)
    connect_ray(args.address, args.num_cpus)
    with tracking_server_errors(sweep.tracking_uri, f"resume with `lmadda sweep run --config {args.config} --resume` "
                                                    "(finished grid points are kept)"):
        rows = run_sweep(sweep, resume=args.resume or (args.reuse and sweep_exists(sweep)))
        print(format_sweep_table(rows))
        if args.promote:
            promote(sweep.tracking_uri, sweep.experiment, sweep=sweep)
    return 0


def run_promote(args: argparse.Namespace) -> int:
    from lmadda.core.errors import LmaddaError
    from lmadda.sweep.promotion import promote

    sweep = _sweep_from(args.config) if args.config else None
    tracking_uri = args.tracking_uri or (sweep.tracking_uri if sweep else None)
    experiment = args.experiment or (sweep.experiment if sweep else None)
    if not tracking_uri or not experiment:
        raise LmaddaError("give --config, or both --tracking-uri and --experiment")
    with tracking_server_errors(tracking_uri, "run the promotion again"):
        promote(tracking_uri, experiment, criterion=args.criterion, sweep=sweep, replace=args.replace)
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from lmadda.sweep.tracking import compare_runs

    with tracking_server_errors(args.tracking_uri, "run the comparison again"):
        print(compare_runs(args.tracking_uri, args.experiment))
    return 0
