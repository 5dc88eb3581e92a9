"""Targets (or whole experiments) of a study that failed: recorded with their reason, so the study goes on.

`out/<experiment>/failures.json` holds the failures of the latest run of that experiment: a rerun
clears it and retries every target (finished models are skipped as always), and the document lists
what is still recorded under "Failed targets".
"""

from __future__ import annotations

import json
from pathlib import Path

from lmadda.core.atomic import write_atomically
from lmadda.core.errors import LmaddaError

FAILURES_FILE = "failures.json"
# what a target can fail with and the study survives: bad data, a refused config, a numerical or device error
RECOVERABLE = (LmaddaError, ValueError, RuntimeError)


class FailureLog:
    """The failures of one experiment, written atomically after each one."""

    def __init__(self, folder: Path, name: str, *, fresh: bool = True):
        self.name = name
        self.path = Path(folder) / FAILURES_FILE
        self.entries: list[dict] = [] if fresh else read_failures(folder)
        if fresh and self.path.exists():
            self.path.unlink()

    def failed(self, target: str) -> bool:
        return any(entry["target"] == target for entry in self.entries)

    def record(self, target: str, stage: str, error: BaseException, log=print) -> None:
        reason = f"{type(error).__name__}: {error}"
        self.entries.append({"target": target, "stage": stage, "error": reason})
        log(f"[study:{self.name}] {target} failed while {stage}; the study goes on without it. {reason}")
        write_atomically(self.path, lambda temporary: temporary.write_text(json.dumps(self.entries, indent=1) + "\n"))


def read_failures(folder: Path) -> list[dict]:
    path = Path(folder) / FAILURES_FILE
    return json.loads(path.read_text()) if path.exists() else []


def failed_targets_section(folder: Path) -> list[str]:
    """The document's "Failed targets" lines for one experiment (none when nothing failed)."""
    entries = read_failures(folder)
    if not entries:
        return []
    lines = ["### Failed targets", "", "These failed in the latest run and have no (or only earlier) results here; "
             "fix the cause and rerun the study (finished models are kept).", "", "| target | while | error |", "|---|---|---|"]
    for entry in entries:
        error = " ".join(entry["error"].split()).replace("|", "\\|")
        lines.append(f"| {entry['target']} | {entry['stage']} | {error} |")
    return lines + [""]
