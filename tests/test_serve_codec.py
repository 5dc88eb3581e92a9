"""Request decoding and response encoding of the staining endpoint (no Ray)."""

import io
import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from lmadda_serve.codec import RequestError, check_channels, check_name, decode_request_image, encode_tiff, parse_markers

MIB = 2**20


def _tiff(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array)
    return buffer.getvalue()


def _status(call) -> tuple[int, str]:
    with pytest.raises(RequestError) as caught:
        call()
    return caught.value.status, caught.value.message


def test_tiff_and_png_bodies_decode_to_camera_units():
    pixels = (np.arange(64 * 48, dtype=np.uint16) * 7).reshape(64, 48)
    image = decode_request_image(_tiff(pixels), "image/tiff", max_bytes=MIB)
    assert image.pixels.shape == (1, 64, 48) and image.pixels[0, 1, 0] == pixels[1, 0]
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    image = decode_request_image(buffer.getvalue(), "image/png; charset=binary", max_bytes=MIB)
    assert image.dtype == "uint8" and image.pixels.shape == (1, 64, 48)


@pytest.mark.parametrize(
    "body, content_type, status, words",
    [
        (b"\x00" * 10, "text/plain", 415, "image/tiff or image/png"),
        (b"\x00" * 10, None, 415, "Content-Type None"),
        (b"", "image/tiff", 400, "0 bytes"),
        (b"not a tiff at all", "image/tiff", 400, "cannot read image"),
        (_tiff(np.full((8, 8), np.nan, np.float32)), "image/tiff", 400, "NaN or infinite"),
        (_tiff(np.zeros((8, 8), np.complex64)), "image/tiff", 400, "complex64"),
        (b"\x00" * (MIB + 1), "image/tiff", 413, "exceeds the limit of 1 MiB"),
    ],
)
def test_bad_bodies_get_the_right_status_and_say_what_to_do(body, content_type, status, words):
    got, message = _status(lambda: decode_request_image(body, content_type, max_bytes=MIB))
    assert got == status and words in message


def test_channel_count_is_checked_against_the_model():
    rgb = decode_request_image(_tiff(np.zeros((16, 16, 3), np.uint8)), "image/tiff", max_bytes=MIB)
    status, message = _status(lambda: check_channels(rgb, 1))
    assert status == 400 and "3 channel(s)" in message and "expects 1" in message


def test_names_that_could_reach_a_path_or_uri_are_refused():
    assert check_name("setting", "overexposed_150") == "overexposed_150"
    for bad in ("../models", "a/b", "x@y", "", "a" * 65, "bright field"):
        assert _status(lambda: check_name("setting", bad))[0] == 400
    assert parse_markers("DAPI, cd29") == ["dapi", "cd29"]
    assert _status(lambda: parse_markers("dapi,dapi"))[0] == 400
    assert _status(lambda: parse_markers(" , "))[0] == 400


def test_response_tiff_keeps_dtype_range_and_metadata():
    stains = np.array([[[-5.0, 70000.0], [1.4, 2.6]], [[0.0, 1.0], [2.0, 3.0]]], np.float32)
    body = encode_tiff(stains, "uint16", {"lmadda_setting": "bright_field", "lmadda_models": [{"marker": "dapi", "model": "lmadda-dapi/3"}]})
    array = tifffile.imread(io.BytesIO(body))
    assert array.dtype == np.uint16 and array.shape == (2, 2, 2)
    assert array[0].tolist() == [[0, 65535], [1, 3]]  # clipped to the dtype's range, rounded
    with tifffile.TiffFile(io.BytesIO(body)) as file:  # what a client reads back: the JSON in the first page's description
        metadata = json.loads(file.pages[0].description)
    assert metadata["lmadda_setting"] == "bright_field" and metadata["lmadda_models"][0]["model"] == "lmadda-dapi/3"


def _bomb(kind: str, side: int = 8192) -> bytes:
    """A small body that declares side x side pixels (zeros compress ~1000:1)."""
    buffer = io.BytesIO()
    if kind == "tiff":
        tifffile.imwrite(buffer, np.zeros((side, side), np.uint16), compression="zlib", rowsperstrip=side)
    else:
        Image.fromarray(np.zeros((side, side), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["tiff", "png"])
def test_a_decompression_bomb_is_refused_from_its_header_before_decoding(kind, monkeypatch):
    import lmadda_serve.codec

    body = _bomb(kind)
    assert len(body) < 200 * 1024
    monkeypatch.setattr(lmadda_serve.codec, "decode_image", lambda *a, **k: pytest.fail("decoded a bomb"))
    status, message = _status(lambda: decode_request_image(body, f"image/{kind}", max_bytes=256 * MIB, max_megapixels=17))
    assert status == 413 and "8192x8192" in message and "67.1 megapixels" in message and "max_megapixels" in message


def test_images_below_the_minimum_side_are_refused_and_the_limit_is_named():
    for shape in [(1, 1), (2, 2), (31, 200)]:
        status, message = _status(lambda: decode_request_image(_tiff(np.ones(shape, np.uint16)), "image/tiff", max_bytes=MIB, min_side=32))
        assert status == 400 and f"{shape[0]}x{shape[1]} pixels" in message and "at least 32x32" in message
    assert decode_request_image(_tiff(np.ones((32, 32), np.uint16)), "image/tiff", max_bytes=MIB, min_side=32).pixels.shape == (1, 32, 32)
