"""A killed sweep resumes from Ray Tune's last complete state, not from a file cut in half.

Tune keeps two state files per driver session in the experiment folder: the trial table
(`experiment_state-<session>.json`) and the grid generator's state (`basic-variant-state-<session>.json`, a pickle,
whose counter decides the trial ids handed out next). At the storage path both are written by a plain copy from
Tune's staging folder, so a driver killed during that copy leaves a file empty or cut off. `Tuner.restore` then logs
"Failed to restore the run state" and starts the experiment again with one trial and an empty config: every finished
point would be run again, and lmadda would have nothing to say but nonsense. So:

- `StateBackup`, a Tune callback in the sweep's driver, copies the pair of state files each time they changed and are
  both complete, into `BACKUP_DIR` beside them. The bytes checked are the bytes written, atomically.
- `recover_tune_state`, before a restore, finds the newest session whose pair is complete, in the folder or in the
  backup, and puts that pair back whole (a trial table and a generator state of different moments would skip grid
  points or hand out a trial id twice). Newer sessions with a cut pair and no complete copy are moved into the
  backup folder, kept, so that Tune restores the older one; with no complete pair at all it refuses in one line.
"""

from __future__ import annotations

import io
import json
import pickletools
from pathlib import Path

from ray.tune import Callback

from lmadda.core.atomic import write_atomically
from lmadda.core.errors import LmaddaError

EXPERIMENT_STATE = "experiment_state-{}.json"  # Tune's trial table (JSON), one per driver session
SEARCHER_STATE = "basic-variant-state-{}.json"  # Tune's grid generator (a pickle, despite the name)
BACKUP_DIR = ".lmadda-state-backup"
SET_ASIDE = "cut"  # under BACKUP_DIR: the cut state of a session that was not resumable, kept for the record


def sessions(folder: Path) -> list[str]:
    """The driver sessions with an experiment state in `folder`, newest first (the timestamp sorts as Tune's own
    choice of the newest does)."""
    prefix, suffix = EXPERIMENT_STATE.split("{}")
    return sorted((path.name[len(prefix):-len(suffix)] for path in folder.glob(EXPERIMENT_STATE.format("*"))), reverse=True)


def state_problem(name: str, data: bytes) -> str | None:
    """Why the Tune state file `name` holding `data` is not complete (None when it is): an experiment state must parse
    as JSON, a searcher state must be a whole pickle (its opcodes are read, nothing is unpickled)."""
    if not data:
        return "it is empty"
    if name.startswith("experiment_state-"):
        try:
            json.loads(data)
        except ValueError as error:
            return f"it is cut off ({error})"
        return None
    try:  # dis walks the opcodes and checks the stack and the marks, running none of them
        pickletools.dis(data, out=io.StringIO())
    except ValueError as error:
        return f"it is cut off ({error})"
    # A cut at an opcode boundary can still read as a smaller pickle; the frames (protocol 4+) say how long they are,
    # and each must end before the next begins (large objects sit between frames) and within the data.
    frames = [(position, length) for opcode, length, position in pickletools.genops(data) if opcode.name == "FRAME"]
    ends = [position for position, _ in frames[1:]] + [len(data)]
    if any(position + 9 + length > end for (position, length), end in zip(frames, ends)):
        return "it is cut off (shorter than its frames)"
    return None


def _files(folder: Path, session: str) -> list[Path]:
    """`session`'s state files in `folder` (the searcher state may not exist)."""
    return [path for path in (folder / EXPERIMENT_STATE.format(session), folder / SEARCHER_STATE.format(session)) if path.is_file()]


def _pair(folder: Path, session: str) -> dict[str, bytes]:
    """File name -> bytes of `session`'s state files in `folder` (read once)."""
    return {path.name: path.read_bytes() for path in _files(folder, session)}


def _problems(pair: dict[str, bytes]) -> dict[str, str]:
    return {name: problem for name, data in pair.items() if (problem := state_problem(name, data))}


def _write(folder: Path, pair: dict[str, bytes]) -> None:
    folder.mkdir(exist_ok=True)
    for name, data in pair.items():
        write_atomically(folder / name, lambda temporary, data=data: temporary.write_bytes(data))


class StateBackup(Callback):
    """Keeps the last complete pair of the sweep's Tune state files in its experiment folder's BACKUP_DIR.

    The folder is taken from the trials' storage, not given: Tune pickles its callbacks with the experiment and a
    restore uses them again, also after the folder was moved."""

    def __init__(self) -> None:
        self._seen: tuple | None = None  # (name, mtime, size) of the files last looked at: a step reads only what changed

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if trials:  # before the first trial there is nothing to lose
            self.save(Path(trials[0].storage.experiment_fs_path))

    def on_experiment_end(self, trials: list, **info) -> None:
        if trials:
            self.save(Path(trials[0].storage.experiment_fs_path))

    def save(self, experiment_path: Path) -> None:
        """Copy the newest session's state pair of `experiment_path` to its BACKUP_DIR, when it changed and is complete."""
        found = sessions(experiment_path)
        if not found:
            return
        seen = tuple((path.name, info.st_mtime_ns, info.st_size) for path in _files(experiment_path, found[0])
                     for info in [path.stat()])
        if seen == self._seen:
            return
        pair = _pair(experiment_path, found[0])
        if _problems(pair):
            return  # being written now: a later step copies it
        _write(experiment_path / BACKUP_DIR, pair)
        self._seen = seen


def recover_tune_state(experiment_path: Path, log=print) -> None:
    """Before `Tuner.restore`: leave the newest complete state pair where Tune reads it, or refuse in one line."""
    backup = experiment_path / BACKUP_DIR
    found = sessions(experiment_path)
    cut: dict[str, str] = {}  # file name -> what is wrong with it, for the sessions passed over
    for session in found:
        pair = _pair(experiment_path, session)
        problems = _problems(pair)
        copy = _pair(backup, session)
        if not problems:
            if not cut:
                return  # the newest state is complete: nothing to do
            restored = None
        elif EXPERIMENT_STATE.format(session) in copy and not _problems(copy):
            restored = copy  # the whole pair, so that the trial table and the generator agree
        else:
            cut.update(problems)
            continue
        what = "; ".join(f"{name}: {problem}" for name, problem in {**cut, **problems}.items())
        # Set aside, not deleted: the newer sessions' files (Tune takes the newest session it finds), and this session's
        # own files where its copy replaces them (a searcher state the copy lacks would not agree with the copy)
        newer = [path.name for s in found[:found.index(session)] for path in _files(experiment_path, s)]
        replaced = list(pair) if restored is not None else []
        if newer or replaced:
            aside = backup / SET_ASIDE
            aside.mkdir(parents=True, exist_ok=True)
            for name in newer + replaced:
                (experiment_path / name).replace(aside / name)
        if restored is not None:
            _write(experiment_path, restored)
        log(f"[sweep] Ray Tune's state was not complete ({what}), most likely because the driver was killed while it was "
            f"written; resuming from the last complete state ({'its copy in ' + str(backup) if restored else 'session ' + session}). "
            "Points finished since are found in their store, not run again")
        return
    if cut:
        what = "; ".join(f"{name}: {problem}" for name, problem in cut.items())
        raise LmaddaError(
            f"cannot resume the sweep at {experiment_path}: Ray Tune's state is not complete ({what}), most likely because "
            f"the driver was killed while it was written, and there is no complete copy in {backup}. The finished points' "
            "models are kept under the storage path's train/ folder; run the sweep again under a new name")
