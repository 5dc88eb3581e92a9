"""Where a benchmark's figures go: bench/results/<date>-<host>[-<name>].json (one naming for all)."""

from __future__ import annotations

import json
import platform
from datetime import date
from pathlib import Path


def result_path(out: Path, name: str | None = None) -> Path:
    stem = f"{date.today().isoformat()}-{platform.node()}" + (f"-{name}" if name else "")
    return Path(out) / f"{stem}.json"


def write_result(out: Path, name: str | None, record: dict) -> Path:
    path = result_path(out, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    return path
