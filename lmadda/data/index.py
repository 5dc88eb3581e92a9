"""Build a manifest from a folder of images by filename patterns.

Each pattern is a regular expression matched against the path relative to the folder, with named
groups:
    field    (required) the field-of-view id
    channel  (required) a name for what the file shows; names listed as targets become markers,
             all others are input settings
    z        (optional) focus position in micrometres; files of one (field, channel) form a focus
             stack whose median z is in focus, others become `<setting>_defocus_m10um` / `_p10um`
    split    (optional) train | val | test
Files that match no pattern are reported, not silently dropped.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

from lmadda.data.io import SUPPORTED_SUFFIXES
from lmadda.data.manifest import SPLITS, Manifest, ManifestRow, check_name
from lmadda.errors import LmaddaError


@dataclass(frozen=True)
class IndexSpec:
    """How to turn file names into manifest rows."""

    patterns: list[str]
    targets: dict[str, str] = field(default_factory=dict)  # channel name -> marker
    rename: dict[str, str] = field(default_factory=dict)  # channel name -> setting
    splits: dict[str, str] = field(default_factory=dict)  # field -> split
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 0
    bit_depth: int | None = None
    pixel_size_um: float | None = None
    focus_round_um: float = 1.0  # stage positions are noisy: name defocus to this step

    def compiled(self) -> list[re.Pattern]:
        if not self.patterns:
            raise LmaddaError("give at least one --pattern with (?P<field>...) and (?P<channel>...) groups")
        compiled = []
        for text in self.patterns:
            try:
                pattern = re.compile(text)
            except re.error as error:
                raise LmaddaError(f"pattern {text!r} is not a valid regular expression: {error}") from error
            missing = {"field", "channel"} - set(pattern.groupindex)
            if missing:
                raise LmaddaError(f"pattern {text!r} lacks the named group(s) {sorted(missing)}; e.g. (?P<field>\\w+)_(?P<channel>\\w+)\\.tif")
            compiled.append(pattern)
        return compiled


def assign_splits(fields: list[str], fractions: tuple[float, float, float], seed: int) -> dict[str, str]:
    """Deterministic split by a seeded hash of the field id; every split gets a field when there are enough."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise LmaddaError(f"split fractions {fractions} must be three non-negative numbers (train, val, test) summing to 1")
    ordered = sorted(fields, key=lambda f: hashlib.sha256(f"{seed}:{f}".encode()).hexdigest())
    n = len(ordered)
    n_val = round(n * fractions[1])
    n_test = round(n * fractions[2])
    if n >= 3:  # keep every requested split non-empty when the data allow it
        n_val = max(n_val, 1 if fractions[1] > 0 else 0)
        n_test = max(n_test, 1 if fractions[2] > 0 else 0)
    n_train = n - n_val - n_test
    names = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    return dict(zip(ordered, names))


def _defocus_setting(setting: str, dz: float, step: float) -> str:
    microns = round(round(abs(dz) / step) * step)
    if microns == 0:
        return setting
    return f"{setting}_defocus_{'p' if dz > 0 else 'm'}{microns}um"


def index_folder(root: str | Path, spec: IndexSpec) -> tuple[Manifest, list[str]]:
    """Scan `root` recursively; return a validated manifest (paths relative to `root`) and the files no pattern matched."""
    root = Path(root)
    if not spec.focus_round_um > 0:
        raise LmaddaError(f"focus rounding {spec.focus_round_um} um must be positive (e.g. 1 or 5)")
    if not root.is_dir():
        raise LmaddaError(f"{root}: not a folder; give the folder that holds the images")
    patterns = spec.compiled()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES)
    if not files:
        raise LmaddaError(f"{root}: no image files ({', '.join(SUPPORTED_SUFFIXES)}) found")
    matched: list[dict] = []
    unmatched: list[str] = []
    for path in files:
        relative = path.relative_to(root).as_posix()
        match = next((m for p in patterns if (m := p.search(relative))), None)
        if match is None:
            unmatched.append(relative)
            continue
        groups = match.groupdict()
        z = groups.get("z")
        try:
            z_value = float(z) if z is not None else None
        except ValueError as error:
            raise LmaddaError(f"{relative}: focus group z={z!r} is not a number") from error
        matched.append({"path": relative, "field": groups["field"], "channel": groups["channel"], "z": z_value, "split": groups.get("split")})
    if not matched:
        raise LmaddaError(f"{root}: none of {len(files)} images matched the patterns {spec.patterns}; first file: {unmatched[0]}")
    unknown_targets = set(spec.targets) - {m["channel"] for m in matched}
    if unknown_targets:
        raise LmaddaError(f"--target names {sorted(unknown_targets)} match no file; channels found: {sorted({m['channel'] for m in matched})}")

    # Focus stacks: the median z of each (field, channel) is the in-focus plane.
    stacks: dict[tuple[str, str], list[float]] = {}
    for m in matched:
        if m["z"] is not None:
            stacks.setdefault((m["field"], m["channel"]), []).append(m["z"])

    fields = sorted({m["field"] for m in matched})
    splits = {f: s for f, s in ((m["field"], m["split"]) for m in matched) if s}
    for f, s in spec.splits.items():
        if f not in fields:
            raise LmaddaError(f"--split names field {f!r}, which no file has; fields: {', '.join(fields)}")
        splits[f] = s
    for f, s in splits.items():
        if s not in SPLITS:
            raise LmaddaError(f"field {f!r}: unknown split {s!r}; allowed: {', '.join(SPLITS)}")
    unassigned = [f for f in fields if f not in splits]
    splits.update(assign_splits(unassigned, spec.split_fractions, spec.seed))

    rows = []
    for m in matched:
        channel = m["channel"]
        if channel in spec.targets:
            role, setting, marker = "target", None, check_name("marker", spec.targets[channel])
        else:
            setting = check_name("setting", spec.rename.get(channel, channel).lower())
            if m["z"] is not None:
                setting = _defocus_setting(setting, m["z"] - median(stacks[(m["field"], channel)]), spec.focus_round_um)
            role, marker = "input", None
        rows.append(
            ManifestRow(
                field=m["field"], split=splits[m["field"]], role=role, setting=setting, marker=marker,
                path=m["path"], bit_depth=spec.bit_depth, pixel_size_um=spec.pixel_size_um,
            )
        )
    return Manifest(rows=rows, root=root, source=str(root)), unmatched
