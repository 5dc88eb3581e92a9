"""Request and response bodies of the staining endpoint, without Ray: plain functions, testable alone.

A request is the raw image as the body (`image/tiff` or `image/png`: Serve has no multipart parser)
plus `setting` and `marker` parameters. A response is a TIFF of the predicted markers in their
camera units and dtype, with the model versions and normalisation in its metadata.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass

import numpy as np
import tifffile

from lmadda.data.io import RawImage, decode_image
from lmadda.errors import LmaddaError

CONTENT_TYPES = {"image/tiff": "tiff", "image/tif": "tiff", "image/x-tiff": "tiff", "image/png": "png"}
# Settings and markers name registry aliases and models; they never reach a path or URI unchecked.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass
class RequestError(Exception):
    """A client error with its HTTP status and a message that says how to fix the request."""

    status: int
    message: str
    headers: dict | None = None

    def __str__(self) -> str:
        return self.message


def check_name(kind: str, value: str) -> str:
    if not NAME_PATTERN.match(value or ""):
        raise RequestError(400, f"{kind} {value!r} is not a valid name: use 1-64 letters, digits, '_' or '-'")
    return value


def parse_markers(text: str) -> list[str]:
    """`dapi` or `dapi,cd29` -> ['dapi', 'cd29'] (lower case, no repeats)."""
    markers = [m.strip().lower() for m in (text or "").split(",") if m.strip()]
    if not markers:
        raise RequestError(400, "no marker given: pass marker=dapi (or several: marker=dapi,cd29)")
    for marker in markers:
        check_name("marker", marker)
    if len(set(markers)) != len(markers):
        raise RequestError(400, f"marker list {text!r} names a marker twice")
    return markers


def check_body_size(size: int, max_bytes: int) -> None:
    """413 for a body over the limit (called with Content-Length first, so a huge body is never read)."""
    if size > max_bytes:
        raise RequestError(413, f"image of {size / 2**20:.1f} MiB exceeds the limit of {max_bytes / 2**20:.0f} MiB; "
                                "tile it or ask the operator to raise max_body_mb")


def decode_request_image(body: bytes, content_type: str | None, *, max_bytes: int) -> RawImage:
    """The request body as a (C, H, W) image in camera units; 413/415/400 with a clear message otherwise."""
    kind = CONTENT_TYPES.get((content_type or "").split(";")[0].strip().lower())
    if kind is None:
        raise RequestError(415, f"Content-Type {content_type!r} is not supported: send the raw image bytes as image/tiff or image/png")
    check_body_size(len(body), max_bytes)
    try:
        image = decode_image(body, kind, "request body")
    except LmaddaError as error:
        raise RequestError(400, str(error)) from error
    if np.dtype(image.dtype).kind not in "uif":
        raise RequestError(400, f"pixel type {image.dtype} is not supported: send unsigned integer (8/16-bit) or float images")
    return image


def check_channels(image: RawImage, expected: int) -> None:
    if image.channels != expected:
        raise RequestError(400, f"the image has {image.channels} channel(s); the model expects {expected} "
                                "(a single-channel label-free image: phase contrast or bright field)")


def encode_tiff(stains: np.ndarray, dtype: str, metadata: dict) -> bytes:
    """(C, H, W) or (H, W) stains in camera units -> TIFF bytes in `dtype`, clipped to its range, with
    `metadata` as JSON in the ImageDescription (tifffile's shaped format)."""
    target = np.dtype(dtype)
    array = np.asarray(stains)
    if target.kind in "ui":
        info = np.iinfo(target)
        array = np.clip(np.rint(array), info.min, info.max)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array.astype(target), photometric="minisblack", metadata=metadata)
    return buffer.getvalue()


def decode_response_metadata(tiff: bytes) -> dict:
    """The metadata `encode_tiff` wrote (for clients and tests)."""
    with tifffile.TiffFile(io.BytesIO(tiff)) as file:
        return json.loads(file.pages[0].description)
