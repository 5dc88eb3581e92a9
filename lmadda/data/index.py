r"""Build a manifest from a folder of images by filename patterns.

Each pattern is a regular expression matched against the path relative to the folder, with named
groups:
    field    (required) the field-of-view id
    channel  (required) a name for what the file shows; names listed as targets become markers,
             all others are input settings
    z        (optional) focus position in micrometres; files of one (field, channel) form a focus
             stack whose in-focus plane is its median z (or, per channel, `in_focus`: a z, or
             min | max | median); the others become `<setting>_defocus_m10um` / `_p10um`
    split    (optional) train | val | test
    acquisition (optional) for folders holding several experiments whose fields share file names
             (`ds1/brightfield/00001.tif`, `ds4/brightfield/00001.tif`): the field becomes
             `<acquisition>_<field>`, each input setting `<setting>_<acquisition>` (one setting per
             acquisition; markers stay shared), and split fractions apply per acquisition
Files that match no pattern are reported, not silently dropped. OME-Zarr images (folders named *.zarr)
are matched like files: `(?P<field>\w+)_(?P<channel>\w+)\.ome\.zarr`.

An OME-Zarr HCS plate needs no pattern (`index_plate`): its metadata lists the wells and each well's
fields; every field becomes a manifest field `<row><column>_<field>` (A1_0), each of its channels (named
by the plate's `omero` labels, else c0, c1, ...) a row with that channel's index, and splits are drawn
per well, so fields of one well (one sample) never straddle train and test.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

from lmadda.core.errors import LmaddaError
from lmadda.data.io import SUPPORTED_SUFFIXES, ZARR_NAME
from lmadda.data.manifest import SPLITS, Manifest, ManifestRow, check_name


@dataclass(frozen=True)
class IndexSpec:
    """How to turn file names into manifest rows."""

    patterns: list[str]
    targets: dict[str, str] = field(default_factory=dict)  # channel name -> marker
    rename: dict[str, str] = field(default_factory=dict)  # channel name -> setting
    splits: dict[str, str] = field(default_factory=dict)  # field -> split
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    acquisition_fractions: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # acquisition -> fractions
    seed: int = 0
    bit_depth: int | None = None
    pixel_size_um: float | None = None
    focus_round_um: float = 1.0  # stage positions are noisy: name defocus to this step
    in_focus: dict[str, float | str] = field(default_factory=dict)  # channel -> in-focus z, or median | min | max

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


FOCUS_RULES = {"median": median, "min": min, "max": max}


def _focus_plane(rule: float | str, planes: list[float], channel: str, field_id: str, step: float) -> float:
    """The in-focus z of one (field, channel) stack: by a rule, or a given z that must be one of its planes."""
    if isinstance(rule, str):
        try:
            return FOCUS_RULES[rule](planes)
        except KeyError:
            try:
                rule = float(rule)
            except ValueError:
                raise LmaddaError(f"in-focus plane {rule!r} of channel {channel!r}: give a z in micrometres or one of "
                                  f"{', '.join(FOCUS_RULES)}") from None
    if not any(abs(z - rule) <= step / 2 for z in planes):
        raise LmaddaError(f"in-focus z {rule:g} of channel {channel!r} is no plane of field {field_id!r}'s stack (planes "
                          f"{', '.join(f'{z:g}' for z in sorted(planes))}; within half the focus rounding, {step:g} um); "
                          "give one of them, or median | min | max")
    return rule


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
    if spec.bit_depth is not None and not 1 <= spec.bit_depth <= 32:
        raise LmaddaError(f"bit depth {spec.bit_depth} must be the camera's bits per pixel, 1 to 32 (e.g. 12 or 14 for data in uint16)")
    if spec.pixel_size_um is not None and not spec.pixel_size_um > 0:
        raise LmaddaError(f"pixel size {spec.pixel_size_um} um must be positive (e.g. 0.65)")
    patterns = spec.compiled()
    files = _image_paths(root)
    if not files:
        raise LmaddaError(f"{root}: no image files ({', '.join(SUPPORTED_SUFFIXES)}) or OME-Zarr images ({ZARR_NAME}) found")
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
        acquisition = groups.get("acquisition")
        field_id = groups["field"] if acquisition is None else f"{acquisition}_{groups['field']}"
        matched.append({"path": relative, "field": field_id, "channel": groups["channel"], "z": z_value, "split": groups.get("split"),
                        "acquisition": acquisition})
    if not matched:
        raise LmaddaError(f"{root}: none of {len(files)} images matched the patterns {spec.patterns}; first file: {unmatched[0]}")
    unknown_targets = set(spec.targets) - {m["channel"] for m in matched}
    if unknown_targets:
        raise LmaddaError(f"--target names {sorted(unknown_targets)} match no file; channels found: {sorted({m['channel'] for m in matched})}")

    # Focus stacks: the in-focus plane of each (field, channel) stack, by default its median z.
    stacks: dict[tuple[str, str], list[float]] = {}
    for m in matched:
        if m["z"] is not None:
            stacks.setdefault((m["field"], m["channel"]), []).append(m["z"])
    stacked = sorted({channel for _, channel in stacks})
    unknown_focus = set(spec.in_focus) - set(stacked)
    if unknown_focus:
        raise LmaddaError(f"in-focus plane given for {sorted(unknown_focus)}, which {'has' if len(unknown_focus) == 1 else 'have'} "
                          f"no focus stack (a z group); channels with stacks: {', '.join(stacked) or '(none)'}")
    in_focus = {key: _focus_plane(spec.in_focus.get(key[1], "median"), planes, key[1], key[0], spec.focus_round_um)
                for key, planes in stacks.items()}
    acquisitions = {m["field"]: m["acquisition"] for m in matched}
    unknown_acquisitions = set(spec.acquisition_fractions) - set(acquisitions.values())
    if unknown_acquisitions:
        found = sorted(a for a in set(acquisitions.values()) if a is not None)
        raise LmaddaError(f"split fractions given for acquisition(s) {sorted(unknown_acquisitions)}, which no file has; "
                          + (f"acquisitions: {', '.join(found)}" if found else "add an (?P<acquisition>...) group to the pattern"))

    fields = sorted({m["field"] for m in matched})
    splits = {f: s for f, s in ((m["field"], m["split"]) for m in matched) if s}
    for f, s in spec.splits.items():
        if f not in fields:
            raise LmaddaError(f"--split names field {f!r}, which no file has; fields: {', '.join(fields)}")
        splits[f] = s
    for f, s in splits.items():
        if s not in SPLITS:
            raise LmaddaError(f"field {f!r}: unknown split {s!r}; allowed: {', '.join(SPLITS)}")
    for acquisition in sorted(set(acquisitions.values()), key=str):  # one group (None) without an acquisition group
        unassigned = [f for f in fields if f not in splits and acquisitions[f] == acquisition]
        splits.update(assign_splits(unassigned, spec.acquisition_fractions.get(acquisition, spec.split_fractions), spec.seed))

    rows = []
    for m in matched:
        channel = m["channel"]
        if channel in spec.targets:
            role, setting, marker = "target", None, check_name("marker", spec.targets[channel])
        else:
            setting = spec.rename.get(channel, channel).lower()
            if m["acquisition"] is not None:
                setting = f"{setting}_{m['acquisition'].lower()}"
            setting = check_name("setting", setting)
            if m["z"] is not None:
                setting = _defocus_setting(setting, m["z"] - in_focus[(m["field"], channel)], spec.focus_round_um)
            role, marker = "input", None
        rows.append(
            ManifestRow(
                field=m["field"], split=splits[m["field"]], role=role, setting=setting, marker=marker,
                path=m["path"], bit_depth=spec.bit_depth, pixel_size_um=spec.pixel_size_um,
            )
        )
    return Manifest(rows=rows, root=root, source=str(root)), unmatched


def _image_paths(root: Path) -> list[Path]:
    """Image files and OME-Zarr image folders under `root`, not looking inside a .zarr folder; a plate among them is
    refused (its fields are indexed with `index_plate`)."""
    found, zarrs = [], []
    for path in sorted(root.rglob("*")):
        if any(parent.name.lower().endswith(".zarr") for parent in path.relative_to(root).parents):
            continue  # inside an OME-Zarr folder: chunks and metadata, or a plate's wells
        if path.is_dir() and path.name.lower().endswith(".zarr"):
            zarrs.append(path)
        elif path.is_file() and path.suffix.lower() in SUPPORTED_SUFFIXES:
            found.append(path)
    if zarrs:
        from lmadda.data.omezarr import is_plate

        plate = next((path for path in zarrs if is_plate(path)), None)
        if plate is not None:
            raise LmaddaError(f"{plate}: is an HCS plate inside the folder {root}; index the plate on its own "
                              f"(`lmadda data index {plate} --out manifest.parquet`), one manifest per plate")
    return sorted(found + zarrs)


def index_plate(plate: str | Path, spec: IndexSpec) -> tuple[Manifest, list[str]]:
    """A manifest of an OME-Zarr HCS plate: one field per (well, field of view), one row per channel of its image.

    Channel names come from the fields' `omero` labels (c0, c1, ... without them) and are turned into settings and
    markers as `index_folder` turns file-name channels: `spec.targets` and `spec.rename` by the label, settings
    lower-cased. `spec.splits` may name a well (A1) or a field (A1_0); other wells are split by `split_fractions`,
    a whole well to one split. Paths are relative to the plate folder (A/1/0). Returns (manifest, []): a plate has
    no unmatched files."""
    from lmadda.data.omezarr import open_image, plate_fields

    plate = Path(plate)
    if spec.patterns:
        raise LmaddaError(f"{plate} is an HCS plate: its wells and fields come from its metadata, so --pattern does not apply; drop it")
    if spec.in_focus or spec.acquisition_fractions:
        raise LmaddaError(f"{plate} is an HCS plate: --in-focus and --acquisition-fractions apply to folders of files; drop them")
    if spec.bit_depth is not None and not 1 <= spec.bit_depth <= 32:
        raise LmaddaError(f"bit depth {spec.bit_depth} must be the camera's bits per pixel, 1 to 32 (e.g. 12 or 14 for data in uint16)")
    if spec.pixel_size_um is not None and not spec.pixel_size_um > 0:
        raise LmaddaError(f"pixel size {spec.pixel_size_um} um must be positive (e.g. 0.65)")
    fields = plate_fields(plate)
    channels = {field.field_id: open_image(plate / field.path).channel_names for field in fields}  # metadata only
    found = sorted({name for names in channels.values() for name in names})
    unknown_targets = set(spec.targets) - set(found)
    if unknown_targets:
        raise LmaddaError(f"--target names {sorted(unknown_targets)} match no channel of the plate; channels found: {found}")
    wells = sorted({field.well for field in fields})
    field_ids = {field.field_id for field in fields}
    unknown = set(spec.splits) - set(wells) - field_ids
    if unknown:
        raise LmaddaError(f"--split names {sorted(unknown)}, which are neither wells ({', '.join(wells)}) nor fields (e.g. "
                          f"{fields[0].field_id}) of the plate")
    for name, split in spec.splits.items():
        if split not in SPLITS:
            raise LmaddaError(f"--split {name}={split}: unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    well_splits = assign_splits([well for well in wells if well not in spec.splits], spec.split_fractions, spec.seed)
    well_splits.update({name: split for name, split in spec.splits.items() if name in wells})
    rows = []
    for plate_field in fields:
        split = spec.splits.get(plate_field.field_id, well_splits[plate_field.well])
        for index, channel in enumerate(channels[plate_field.field_id]):
            if channel in spec.targets:
                role, setting, marker = "target", None, check_name("marker", spec.targets[channel])
            else:
                role, marker = "input", None
                try:
                    setting = check_name("setting", spec.rename.get(channel, channel).lower())
                except LmaddaError as error:
                    raise LmaddaError(f"{error}; or name the plate's channel {channel!r} with --rename '{channel}=SETTING'") from None
            rows.append(ManifestRow(field=plate_field.field_id, split=split, role=role, setting=setting, marker=marker, path=plate_field.path,
                                    channel_index=index, bit_depth=spec.bit_depth, pixel_size_um=spec.pixel_size_um))
    return Manifest(rows=rows, root=plate, source=str(plate)), []
