"""Progress of a long loop: a one-line bar on a terminal, occasional lines in logs and CI."""

from __future__ import annotations

import sys


class Progress:
    """A one-line progress bar on a terminal, occasional lines otherwise (logs, CI)."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label, self.enabled = total, label, enabled
        self.tty = sys.stderr.isatty()
        self.last_line = -1

    def update(self, done: int, **values: float) -> None:
        if not self.enabled:
            return
        shown = " ".join(f"{k}={v:.3g}" for k, v in values.items())
        if self.tty:
            filled = int(30 * done / max(self.total, 1))
            sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total} {shown}   ")
            if done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()
        else:
            tenth = 10 * done // max(self.total, 1)
            if tenth != self.last_line or done >= self.total:
                self.last_line = tenth
                print(f"{self.label} {done}/{self.total} {shown}", file=sys.stderr, flush=True)
