"""A killed sweep resumes from Ray Tune's last complete experiment state, not from a file cut in half.

Tune rewrites its experiment state in place (`experiment_state-<session>.json`: open, then dump), so a driver killed
while it writes leaves the file empty or cut off. `Tuner.restore` then logs "Failed to restore the run state" and
starts the experiment again with no trials and an empty trial config: every finished point would be run again, and
lmadda would have nothing to say but nonsense. So:

- `StateBackup`, a Tune callback in the sweep's driver, copies the state files each time the experiment state has
  changed and is complete (it parses), into `BACKUP_DIR` beside them: one consistent pair, written atomically.
- `recover_tune_state`, before a restore, checks the newest state; where it is not complete it puts the backup back
  (the trials that finished after it are found in their point store, so they are not run again), and where there is
  no backup it refuses in one line, saying what happened and what to do.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ray.tune import Callback

from lmadda.core.atomic import write_atomically
from lmadda.core.errors import LmaddaError

EXPERIMENT_STATE = "experiment_state-*.json"  # Tune's trial table (JSON), one per driver session
SEARCHER_STATE = "basic-variant-state-*.json"  # Tune's grid generator (a pickle, despite the name), written atomically
BACKUP_DIR = ".lmadda-state-backup"
PICKLE_STOP = b"."  # the last byte of every complete pickle


def _newest(folder: Path, pattern: str) -> Path | None:
    found = sorted(folder.glob(pattern))  # the session timestamp in the name sorts as Tune's own choice does
    return found[-1] if found else None


def _state_files(folder: Path) -> list[Path]:
    """The newest experiment state and searcher state in `folder` ([] without an experiment state)."""
    state = _newest(folder, EXPERIMENT_STATE)
    searcher = _newest(folder, SEARCHER_STATE)
    return [state, *([searcher] if searcher else [])] if state else []


def state_problem(path: Path) -> str | None:
    """Why a Tune state file is not complete (None when it is): an experiment state must parse as JSON, a searcher
    state must end as a pickle ends. Nothing is unpickled here."""
    data = path.read_bytes()
    if not data:
        return "it is empty"
    if path.match(EXPERIMENT_STATE):
        try:
            json.loads(data)
        except ValueError as error:
            return f"it is cut off ({error})"
    elif not data.endswith(PICKLE_STOP):
        return "it is cut off"
    return None


class StateBackup(Callback):
    """Keeps the last complete copy of the sweep's Tune state in its experiment folder's BACKUP_DIR.

    The folder is taken from the trials' storage, not given: Tune pickles its callbacks with the experiment and a
    restore uses them again, also after the folder was moved."""

    def __init__(self) -> None:
        self._saved: tuple | None = None  # (name, mtime_ns, size) of each state file last copied

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if trials:  # before the first trial there is nothing to lose
            self.save(Path(trials[0].storage.experiment_fs_path))

    def on_experiment_end(self, trials: list, **info) -> None:
        if trials:
            self.save(Path(trials[0].storage.experiment_fs_path))

    def save(self, experiment_path: Path) -> None:
        """Copy the state files of `experiment_path` to its BACKUP_DIR, when they changed and are complete."""
        files = _state_files(experiment_path)
        if not files:
            return
        seen = tuple((path.name, path.stat().st_mtime_ns, path.stat().st_size) for path in files)
        if seen == self._saved:
            return
        if any(state_problem(path) for path in files):
            return  # being written now: the next step copies it
        backup = experiment_path / BACKUP_DIR
        backup.mkdir(exist_ok=True)
        for path in files:
            data = path.read_bytes()
            write_atomically(backup / path.name, lambda temporary, data=data: temporary.write_bytes(data))
        self._saved = seen


def recover_tune_state(experiment_path: Path, log=print) -> None:
    """Before `Tuner.restore`: put the last complete Tune state back where the newest one is not complete, or refuse."""
    files = _state_files(experiment_path)
    if not files:
        return  # nothing to check: `Tuner.can_restore` says whether there is a sweep to resume
    broken = {path: problem for path in files if (problem := state_problem(path))}
    if not broken:
        return
    what = "; ".join(f"{path.name}: {problem}" for path, problem in broken.items())
    backup = experiment_path / BACKUP_DIR
    copies = {path: backup / path.name for path in broken}
    if not all(copy.is_file() and state_problem(copy) is None for copy in copies.values()):
        raise LmaddaError(
            f"cannot resume the sweep at {experiment_path}: Ray Tune's state is not complete ({what}), most likely because "
            f"the driver was killed while Tune was writing it, and there is no complete copy in {backup}. The finished "
            "points' models are kept under the storage path's train/ folder; run the sweep again under a new name")
    for path, copy in copies.items():
        write_atomically(path, lambda temporary, copy=copy: shutil.copyfile(copy, temporary))
    log(f"[sweep] Ray Tune's state was not complete ({what}), most likely because the driver was killed while writing "
        f"it; resuming from its last complete copy ({backup}). Points finished since are found in their store, not run again")
