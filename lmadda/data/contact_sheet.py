"""A PNG contact sheet: a few fields, every setting and marker side by side, so a person can look."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lmadda.core.errors import LmaddaError
from lmadda.data.io import read_image
from lmadda.data.manifest import Manifest
from lmadda.data.normalise import PercentileRange, normalise

_LABEL_HEIGHT = 14


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    normalised, _ = normalise(pixels[:1], PercentileRange(0.5, 99.8))
    return (np.clip(normalised[0], 0, 1) * 255).astype(np.uint8)


def contact_sheet(manifest: Manifest, out: str | Path, *, fields: int = 4, tile: int = 192) -> Path:
    """One row per field (the first `fields` of the manifest), one column per setting/marker."""
    if fields < 1:
        raise LmaddaError(f"contact sheet needs at least one field, got {fields}")
    columns = [("input", s) for s in manifest.settings] + [("target", m) for m in manifest.markers]
    chosen = manifest.fields()[:fields]
    by_key = {(r.field, r.role, r.channel_name): r for r in manifest.rows}
    sheet = Image.new("L", (tile * len(columns), (tile + _LABEL_HEIGHT) * len(chosen)), color=255)
    draw = ImageDraw.Draw(sheet)
    for row_number, field_id in enumerate(chosen):
        top = row_number * (tile + _LABEL_HEIGHT)
        for column, (role, name) in enumerate(columns):
            left = column * tile
            draw.text((left + 3, top + 1), f"{field_id} {name}"[: tile // 6], fill=0)
            row = by_key.get((field_id, role, name))
            if row is None:
                continue
            image = read_image(manifest.resolve(row), bit_depth=row.bit_depth)
            thumbnail = Image.fromarray(_to_uint8(image.pixels[row.channel_index : row.channel_index + 1]))
            thumbnail.thumbnail((tile, tile))
            sheet.paste(thumbnail, (left, top + _LABEL_HEIGHT))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
