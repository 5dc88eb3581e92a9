"""`lmadda study`: run a study config's experiments and regenerate its document from their MLflow results."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    study = subparsers.add_parser(
        "study", help="run a study config's experiments (default docs/study.yaml) and regenerate its document with tables and figures",
        description="Runs every experiment of the config that is not finished (a rerun skips finished models), logs each "
                    "model to MLflow, then writes the document and its figures from the MLflow results.")
    study.add_argument("--config", type=Path, default=Path("docs/study.yaml"))
    study.add_argument("--only", default=None, help="comma-separated experiment names to run (the document still covers all)")
    study.add_argument("--document-only", action="store_true", help="run nothing; rewrite the document from MLflow")
    study.add_argument("--rechoose", action="store_true",
                       help="make the label-free choices again (after changing `selection` in the config): the kept candidate "
                            "observations are scored anew, nothing is adapted again")
    study.add_argument("--retrain-robust", action="store_true",
                       help="fine-tune the robust source model again (after changing `robust` in the config): the old model is "
                            "kept beside it, its rows and the label-free choices are measured again, nothing else is adapted again")
    study.set_defaults(func=run_study_command)


def run_study_command(args: argparse.Namespace) -> int:
    from lmadda.core.config import build_config, read_config_file
    from lmadda.data.io import refuse_overwriting_inputs
    from lmadda.core.errors import LmaddaError
    from lmadda.study.config import StudyConfig
    from lmadda.study.document import write_study_document
    from lmadda.study.failures import RECOVERABLE, FailureLog, read_failures
    from lmadda.study.runner import check_reused_models, forget_choices, forget_robust, run_experiment

    config = build_config(StudyConfig, None, **read_config_file(args.config)).resolved(Path.cwd())
    refuse_overwriting_inputs([("document", config.document)], [("--config", args.config)], fix="name another document in the config")
    names = [e.name for e in config.experiments]
    only = args.only.split(",") if args.only else names
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise LmaddaError(f"--only {','.join(unknown)}: no such experiment in {args.config}; it has {', '.join(names)}")
    if (args.rechoose or args.retrain_robust) and args.document_only:
        raise LmaddaError("--rechoose and --retrain-robust run models again, --document-only runs nothing: give one of them")
    missing = [e.name for e in config.experiments if e.name in only and e.robust is None]
    if args.retrain_robust and missing:
        raise LmaddaError(f"--retrain-robust: experiment(s) {', '.join(missing)} have no `robust` in {args.config}; "
                          "name the others with --only")
    if not args.document_only:
        for experiment in config.experiments:  # before any work: a stale model stops the run, not its third hour
            if experiment.name in only:
                check_reused_models(experiment, config, retrain_robust=args.retrain_robust)
        for experiment in config.experiments:
            if experiment.name in only:
                if args.retrain_robust:
                    forget_robust(experiment, config)
                elif args.rechoose:
                    forget_choices(experiment, config)
                try:
                    run_experiment(experiment, config)
                except RECOVERABLE as error:  # the experiment as a whole (its data or source model): the others go on
                    FailureLog(config.out / experiment.name, experiment.name, fresh=False).record(
                        "(the whole experiment)", "preparing its data or source model", error)
    print(f"wrote {write_study_document(config, args.config)}")
    failed = {e.name: len(read_failures(config.out / e.name)) for e in config.experiments if e.name in only}
    if not args.document_only and any(failed.values()):
        print(f"finished with failures ({', '.join(f'{name}: {n}' for name, n in failed.items() if n)}): see \"Failed targets\" "
              f"in the document and failures.json under {config.out}; fix the cause and rerun (finished models are kept)")
        return 1
    return 0
