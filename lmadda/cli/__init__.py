"""The `lmadda` command line: one subcommand per job, each with --help.

A user error (`LmaddaError`) prints one line, `lmadda: error: ...`, and exits with status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from lmadda.cli import (data_commands, demo_command, diagnose_command, export_command, science_commands, serve_commands, study_command,
                        sweep_commands)
from lmadda.core.errors import LmaddaError

# Each module adds its subcommands with `register(subparsers)` and sets `func` on its parser.
_COMMAND_MODULES = [data_commands, science_commands, diagnose_command, sweep_commands, serve_commands, demo_command, study_command,
                    export_command]


def build_parser() -> argparse.ArgumentParser:
    from lmadda.core.version import __version__

    parser = argparse.ArgumentParser(
        prog="lmadda",
        description="Adapt virtual-staining models to new microscope settings without paired data (LM-ADDA).",
    )
    parser.add_argument("--version", action="version", version=f"lmadda {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LmaddaError as error:
        print(f"lmadda: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmadda: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
