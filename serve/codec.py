"""Request and response bodies of the staining endpoint, without Ray: plain functions, testable alone.

A request is the raw image as the body (`image/tiff` or `image/png`: Serve has no multipart parser)
plus `setting` and `marker` parameters. A response is a TIFF of the predicted markers in their
camera units and dtype, with the model versions and normalisation in its metadata.
"""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
import tifffile

from lmadda.core.errors import LmaddaError
from lmadda.data.calibration import PixelSize, tiff_resolution
from lmadda.data.io import decode_image
from lmadda.data.raw import RawImage

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


async def read_body(chunks: AsyncIterator[bytes], *, declared_length: str | None, max_bytes: int, timeout_s: float) -> bytes:
    """The whole request body, read under two limits so that no client can hold a replica's memory or
    its slots: 413 as soon as the bytes received pass `max_bytes` (a chunked body declares no length,
    so the limit is kept while streaming), and 408 when the body takes longer than `timeout_s` to
    arrive (a client that sends headers and then stalls). Serve's proxy reads bodies the same way
    (serve/proxy.py), before the request reaches a replica."""
    if declared_length and declared_length.isdigit():  # refuse before reading it into memory
        check_body_size(int(declared_length), max_bytes)
    parts: list[bytes] = []
    received = 0

    async def collect() -> None:
        nonlocal received
        async for chunk in chunks:
            received += len(chunk)
            if received > max_bytes:  # the chunk that passes the limit is counted, never kept
                raise RequestError(413, f"the body passed the limit of {max_bytes / 2**20:.0f} MiB while streaming; "
                                        "send a smaller image or ask the operator to raise max_body_mb")
            parts.append(chunk)

    try:
        await asyncio.wait_for(collect(), timeout_s)
    except asyncio.TimeoutError:
        raise RequestError(408, f"the body did not arrive within {timeout_s:g} s ({received} bytes received); "
                                "send it without pauses, or ask the operator to raise body_timeout_s") from None
    return b"".join(parts)


def declared_pixels(body: bytes, kind: str) -> tuple[tuple[int, ...], int]:
    """The shape and sample count an image declares in its header, read without decoding the pixels
    (a 150 KiB zlib TIFF can declare 8192x8192 and take gigabytes to decode). (shape, 0) when the
    header cannot be read: the decoder then gives its own 400."""
    try:
        if kind == "tiff":
            with tifffile.TiffFile(io.BytesIO(body)) as file:
                series = file.series[0]  # what tifffile.imread (and so decode_image) decodes
                return tuple(series.shape), int(series.size)
        from PIL import Image

        with Image.open(io.BytesIO(body)) as image:  # reads the header only
            shape = (image.height, image.width, len(image.getbands()))
            return shape, shape[0] * shape[1] * shape[2]
    except Exception as error:
        if type(error).__name__ == "DecompressionBombError":  # PIL's own limit, above ours by default
            raise RequestError(413, f"the image declares more pixels than the decoder accepts ({error}); tile it into smaller images") from error
        return (), 0


def check_pixel_count(body: bytes, kind: str, max_megapixels: float) -> None:
    """413 for an image that declares more than `max_megapixels` million samples, before it is decoded."""
    shape, count = declared_pixels(body, kind)
    if count > max_megapixels * 1e6:
        raise RequestError(413, f"the image declares shape {'x'.join(map(str, shape))} = {count / 1e6:.1f} megapixels; the limit is "
                                f"{max_megapixels:g} (max_megapixels): tile it into smaller images or ask the operator to raise max_megapixels")


def check_image_size(image: RawImage, min_side: int) -> None:
    """400 for an image smaller than `min_side` on a side: it holds no cell to stain, and it would be
    padded to a whole tile (a 1x1 image costs a full forward and returns a constant)."""
    height, width = image.pixels.shape[1:]
    if min(height, width) < min_side:
        raise RequestError(400, f"the image is {height}x{width} pixels; the endpoint needs at least {min_side}x{min_side} "
                                "(min_side): send the whole field of view")


def declared_request(body: bytes, content_type: str | None, *, max_bytes: int, max_megapixels: float = 17.0) -> tuple[str, int]:
    """(image kind, samples the image declares), from the body's header only: 415/413 with a clear message
    otherwise. What a replica admits a request by (its pixel budget) before decoding a single pixel."""
    kind = CONTENT_TYPES.get((content_type or "").split(";")[0].strip().lower())
    if kind is None:
        raise RequestError(415, f"Content-Type {content_type!r} is not supported: send the raw image bytes as image/tiff or image/png")
    check_body_size(len(body), max_bytes)
    check_pixel_count(body, kind, max_megapixels)
    return kind, declared_pixels(body, kind)[1]


def decode_request_image(body: bytes, content_type: str | None, *, max_bytes: int, max_megapixels: float = 17.0,
                         min_side: int = 1) -> RawImage:
    """The request body as a (C, H, W) image in camera units; 413/415/400 with a clear message otherwise.
    The pixel limit is checked on the header, before a single pixel is decoded."""
    kind, _ = declared_request(body, content_type, max_bytes=max_bytes, max_megapixels=max_megapixels)
    try:
        image = decode_image(body, kind, "request body")
    except LmaddaError as error:
        raise RequestError(400, str(error)) from error
    if np.dtype(image.dtype).kind not in "uif":
        raise RequestError(400, f"pixel type {image.dtype} is not supported: send unsigned integer (8/16-bit) or float images")
    check_image_size(image, min_side)
    return image


def check_channels(image: RawImage, expected: int) -> None:
    if image.channels != expected:
        raise RequestError(400, f"the image has {image.channels} channel(s); the model expects {expected} "
                                "(a single-channel label-free image: phase contrast or bright field)")


def encode_tiff(stains: np.ndarray, dtype: str, metadata: dict, pixel_size: PixelSize | None = None) -> bytes:
    """(C, H, W) or (H, W) stains in camera units -> TIFF bytes in `dtype`, clipped to its range, with
    `metadata` as JSON in the ImageDescription (tifffile's shaped format) and, when the input recorded
    one, its pixel size in the resolution tags (as `lmadda predict` writes it)."""
    target = np.dtype(dtype)
    array = np.asarray(stains)
    if target.kind in "ui":
        info = np.iinfo(target)
        array = np.clip(np.rint(array), info.min, info.max)
    buffer = io.BytesIO()
    resolution = tiff_resolution(pixel_size) if pixel_size is not None else {}
    tifffile.imwrite(buffer, array.astype(target), photometric="minisblack", metadata=metadata, **resolution)
    return buffer.getvalue()
