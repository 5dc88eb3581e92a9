"""The dataset manifest: one Parquet row per image file (a field of view in one setting or marker).

Columns
    field          field-of-view id; rows with the same field are registered images of one specimen
    split          train | val | test
    role           input (label-free image) | target (fluorescence marker)
    setting        microscope setting of an input (phase_contrast, bright_field, ...); empty for targets,
                   which belong to the specimen and pair with every input setting of the field
    marker         target marker (dapi, cd29, ...); empty for inputs
    path           image file, relative to the folder that holds the manifest
    channel_index  which channel of the file to use (multi-channel TIFF); 0 for single-channel files
    bit_depth      bits the camera really used (12 for a 12-bit camera stored as uint16); empty = storage type
    pixel_size_um  pixel size in micrometres if known; empty otherwise
"""

from __future__ import annotations

import collections
import os
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lmadda.core.atomic import write_atomically
from lmadda.core.errors import LmaddaError
from lmadda.data.calibration import effective_pixel_size
from lmadda.data.io import Named, read_image, read_pixel_size
from lmadda.data.shifts import Shift

SPLITS = ("train", "val", "test")
ROLES = ("input", "target")
MANIFEST_VERSION = "1"

SCHEMA = pa.schema(
    [
        ("field", pa.string()),
        ("split", pa.string()),
        ("role", pa.string()),
        ("setting", pa.string()),
        ("marker", pa.string()),
        ("path", pa.string()),
        ("channel_index", pa.int32()),
        ("bit_depth", pa.int32()),
        ("pixel_size_um", pa.float64()),
    ],
    metadata={"lmadda_manifest_version": MANIFEST_VERSION},
)
REQUIRED_COLUMNS = ("field", "split", "role", "path")
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_-.")


@dataclass(frozen=True)
class ManifestRow:
    field: str
    split: str
    role: str
    path: str
    setting: str | None = None
    marker: str | None = None
    channel_index: int = 0
    bit_depth: int | None = None
    pixel_size_um: float | None = None

    @property
    def channel_name(self) -> str:
        """The setting of an input or the marker of a target."""
        return (self.setting if self.role == "input" else self.marker) or ""


def check_name(kind: str, value: str) -> str:
    """Settings and markers are identifiers used in configs, URLs and MLflow names: keep them plain."""
    if not value or not set(value) <= _NAME_CHARS:
        raise LmaddaError(
            f"{kind} name {value!r} is not allowed: use lower-case letters, digits, '_', '-' or '.' (e.g. bright_field, dapi)"
        )
    return value


@dataclass
class Manifest:
    """Rows plus the folder their relative paths start from."""

    rows: list[ManifestRow]
    root: Path
    source: str = field(default="(in memory)")

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self._validate()

    # ---- validation -------------------------------------------------------------------------
    def _validate(self) -> None:
        where = self.source
        if not self.rows:
            raise LmaddaError(f"manifest {where} has no rows; index a folder with `lmadda data index`")
        seen: dict[tuple, str] = {}
        field_splits: dict[str, str] = {}
        for number, row in enumerate(self.rows):
            label = f"manifest {where}, row {number} (field {row.field!r})"
            if not row.field:
                raise LmaddaError(f"{label}: empty field id")
            if row.split not in SPLITS:
                raise LmaddaError(f"{label}: unknown split {row.split!r}; allowed: {', '.join(SPLITS)}")
            if row.role not in ROLES:
                raise LmaddaError(f"{label}: unknown role {row.role!r}; allowed: {', '.join(ROLES)}")
            if row.role == "input":
                if not row.setting or row.marker:
                    raise LmaddaError(f"{label}: an input row needs a setting and no marker (got setting={row.setting!r}, marker={row.marker!r})")
                check_name("setting", row.setting)
            else:
                if not row.marker or row.setting:
                    raise LmaddaError(f"{label}: a target row needs a marker and no setting (got marker={row.marker!r}, setting={row.setting!r})")
                check_name("marker", row.marker)
            if not row.path:
                raise LmaddaError(f"{label}: empty path")
            if row.channel_index < 0:
                raise LmaddaError(f"{label}: channel_index {row.channel_index} must be >= 0")
            if row.pixel_size_um is not None and not row.pixel_size_um > 0:
                raise LmaddaError(f"{label}: pixel_size_um {row.pixel_size_um} must be positive")
            key = (row.field, row.role, row.channel_name)
            if key in seen:
                raise LmaddaError(
                    f"manifest {where}: field {row.field!r} has two {row.role} images for {row.channel_name!r}: "
                    f"{seen[key]} and {row.path}; give them different settings or fields"
                )
            seen[key] = row.path
            if field_splits.setdefault(row.field, row.split) != row.split:
                raise LmaddaError(
                    f"manifest {where}: field {row.field!r} is in two splits ({field_splits[row.field]}, {row.split}); "
                    "a field of view must stay in one split or the test set leaks into training"
                )

    # ---- queries ----------------------------------------------------------------------------
    def resolve(self, row: ManifestRow) -> Path:
        return self.root / row.path

    def image_paths(self) -> list[Path]:
        """Every image file (or OME-Zarr image folder) the rows name, once each."""
        return list(dict.fromkeys(self.resolve(row) for row in self.rows))

    @property
    def settings(self) -> list[str]:
        return sorted({r.setting for r in self.rows if r.role == "input" and r.setting})

    @property
    def markers(self) -> list[str]:
        return sorted({r.marker for r in self.rows if r.role == "target" and r.marker})

    def fields(self, split: str | None = None) -> list[str]:
        return sorted({r.field for r in self.rows if split is None or r.split == split})

    def inputs(self, setting: str, split: str) -> list[ManifestRow]:
        """Input rows of one setting and split; a clear error when there are none."""
        self._check_known("setting", setting, self.settings)
        self._check_split(split)
        rows = [r for r in self.rows if r.role == "input" and r.setting == setting and r.split == split]
        if not rows:
            raise LmaddaError(
                f"manifest {self.source}: split {split!r} has no {setting!r} images "
                f"(splits with that setting: {self._splits_with(setting=setting)})"
            )
        return sorted(rows, key=lambda r: r.field)

    def pairs(self, setting: str, markers: list[str], split: str) -> list[tuple[ManifestRow, list[ManifestRow]]]:
        """(input, [target per marker]) for every field of `split` that has all of them."""
        for marker in markers:
            self._check_known("marker", marker, self.markers)
        targets = {(r.field, r.marker): r for r in self.rows if r.role == "target" and r.split == split}
        pairs = []
        for input_row in self.inputs(setting, split):
            found = [targets.get((input_row.field, m)) for m in markers]
            if all(found):
                pairs.append((input_row, found))
        if not pairs:
            raise LmaddaError(
                f"manifest {self.source}: split {split!r} has no field with a {setting!r} input and targets "
                f"{', '.join(markers)}; check the split assignment with `lmadda data show`"
            )
        return pairs

    def _check_known(self, kind: str, value: str, known: list[str]) -> None:
        if value not in known:
            raise LmaddaError(f"manifest {self.source} has no {kind} {value!r}; known: {', '.join(known) or '(none)'}")

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise LmaddaError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")

    def _splits_with(self, **match: str) -> str:
        splits = sorted({r.split for r in self.rows if all(getattr(r, k) == v for k, v in match.items())})
        return ", ".join(splits) or "none"

    # ---- persistence ------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write as Parquet; paths are rewritten relative to the manifest's new folder."""
        path = Path(path).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        moved = [replace(r, path=os.path.relpath(self.resolve(r).resolve(), path.parent)) for r in self.rows]
        table = pa.Table.from_pylist([asdict(r) for r in moved], schema=SCHEMA)
        return write_atomically(path, lambda temporary: pq.write_table(table, temporary))  # never half a manifest

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        path = Path(path)
        if not path.exists():
            raise LmaddaError(f"manifest {path} not found; build one with `lmadda data index DIR --out {path}`")
        try:
            table = pq.read_table(path)
        except Exception as error:
            raise LmaddaError(f"manifest {path} is not a readable Parquet file ({error})") from error
        names = set(table.column_names)
        unknown = names - set(SCHEMA.names)
        if unknown:
            raise LmaddaError(
                f"manifest {path} has unknown columns {sorted(unknown)}; allowed columns: {', '.join(SCHEMA.names)}"
            )
        missing = set(REQUIRED_COLUMNS) - names
        if missing:
            raise LmaddaError(f"manifest {path} lacks required columns {sorted(missing)}")
        rows = []
        for record in table.to_pylist():
            values = {k: v for k, v in record.items() if v is not None}
            for key in ("field", "split", "role", "setting", "marker", "path"):
                if key in values:
                    values[key] = str(values[key])
            rows.append(ManifestRow(**values))
        return cls(rows=rows, root=path.resolve().parent, source=str(path))

    # ---- summary ----------------------------------------------------------------------------
    def summary(self, *, with_images: bool = True) -> str:
        """Counts per split/setting/marker and, optionally, image shapes and dtypes read from disk."""
        lines = [f"manifest {self.source}", f"  root: {self.root}", f"  fields: {len(self.fields())}, images: {len(self.rows)}"]
        field_split = {r.field: r.split for r in self.rows}
        fields_per_split = collections.Counter(field_split.values())
        lines.append("  fields per split: " + ", ".join(f"{s}={fields_per_split.get(s, 0)}" for s in SPLITS))
        lines.append("  images per split and setting/marker:")
        counts = collections.Counter((r.split, r.role, r.channel_name) for r in self.rows)
        for role in ROLES:
            for name in sorted({k[2] for k in counts if k[1] == role}):
                per_split = ", ".join(f"{s}={counts.get((s, role, name), 0)}" for s in SPLITS)
                lines.append(f"    {role:6s} {name:34s} {per_split}")
        if with_images:
            shapes = collections.Counter()
            for row in self.rows:
                image = read_image(self.resolve(row), bit_depth=row.bit_depth)
                shapes[(row.role, row.channel_name, image.pixels.shape[1:], image.dtype)] += 1
            lines.append("  shapes and dtypes:")
            for (role, name, shape, dtype), n in sorted(shapes.items()):
                lines.append(f"    {role:6s} {name:34s} {shape[0]}x{shape[1]} {dtype} (x{n})")
        return "\n".join(lines)


# ---- what a manifest says about its images -------------------------------------------------------
def setting_pixel_size(manifest: Manifest, setting: str) -> float | None:
    """The pixel size of a setting's input images: the manifest's `pixel_size_um` where its rows give one, else what
    the files record; the median when they differ, None when nothing records it."""
    rows = [row for row in manifest.rows if row.role == "input" and row.setting == setting]
    sizes = [row.pixel_size_um for row in rows if row.pixel_size_um is not None]
    if not sizes:  # the index was made without --pixel-size: the files may still say it (OME-TIFF, calibrated TIFF)
        read = [read_pixel_size(manifest.resolve(row)) for row in rows]
        sizes = [(size.x_um + size.y_um) / 2 for size in read if size is not None]
    return float(statistics.median(sizes)) if sizes else None


def images_pixel_size(manifest: Manifest, setting: str, shift: Shift | None = None) -> float | None:
    """The pixel size a model sees when it learns from `setting` under `shift`: what a source model records at
    training, and an adapted model records of its target."""
    return effective_pixel_size(setting_pixel_size(manifest, setting), shift)


def manifest_inputs(path: str | Path | None, name: str) -> list[Named]:
    """A manifest and every image file it names, as `refuse_overwriting_inputs` inputs: a command that reads a manifest
    reads its images. A manifest that does not exist is one input (the command says it is missing); one that is not a
    manifest is refused here, as the command would refuse it."""
    if path is None:
        return []
    if not Path(path).is_file():
        return [(name, path)]
    manifest = Manifest.load(path)
    return [(name, path)] + [(f"an image of {name}", image) for image in manifest.image_paths()]
