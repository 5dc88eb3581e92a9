"""`lmadda study`: run the study's experiments and regenerate docs/study.md from their MLflow results."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    study = subparsers.add_parser(
        "study", help="run the study (docs/study.yaml) and regenerate docs/study.md with its tables and figures",
        description="Runs every experiment of the config that is not finished (a rerun skips finished models), logs each "
                    "model to MLflow, then writes the document and its figures from the MLflow results.")
    study.add_argument("--config", type=Path, default=Path("docs/study.yaml"))
    study.add_argument("--only", default=None, help="comma-separated experiment names to run (the document still covers all)")
    study.add_argument("--document-only", action="store_true", help="run nothing; rewrite the document from MLflow")
    study.set_defaults(func=run_study_command)


def run_study_command(args: argparse.Namespace) -> int:
    from lmadda.config import build_config, read_config_file
    from lmadda.errors import LmaddaError
    from lmadda.study_config import StudyConfig
    from lmadda.study_document import write_study_document
    from lmadda.study_runner import run_experiment

    config = build_config(StudyConfig, None, **read_config_file(args.config)).resolved(Path.cwd())
    names = [e.name for e in config.experiments]
    only = args.only.split(",") if args.only else names
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise LmaddaError(f"--only {','.join(unknown)}: no such experiment in {args.config}; it has {', '.join(names)}")
    if not args.document_only:
        for experiment in config.experiments:
            if experiment.name in only:
                run_experiment(experiment, config)
    print(f"wrote {write_study_document(config)}")
    return 0
