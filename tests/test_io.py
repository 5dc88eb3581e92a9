import numpy as np
import pytest
import tifffile

from lmadda.core.errors import LmaddaError
from lmadda.data.io import read_image, write_tiff


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_integer_tiff_round_trip_keeps_values_and_sensor_max(tmp_path, dtype):
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype)
    pixels = rng.integers(0, info.max, size=(40, 30), dtype=dtype)
    write_tiff(tmp_path / "a.tif", pixels, dtype=dtype)
    image = read_image(tmp_path / "a.tif")
    assert image.pixels.shape == (1, 40, 30)
    assert image.pixels.dtype == np.float32
    np.testing.assert_array_equal(image.pixels[0], pixels.astype(np.float32))
    assert image.sensor_max == info.max and image.dtype == dtype


def test_twelve_bit_camera_in_uint16_saturates_at_4095(tmp_path):
    write_tiff(tmp_path / "a.tif", np.full((8, 8), 4095), dtype="uint16")
    assert read_image(tmp_path / "a.tif", bit_depth=12).sensor_max == 4095
    with pytest.raises(LmaddaError, match="does not fit"):
        read_image(tmp_path / "a.tif", bit_depth=20)


def test_multichannel_and_multipage_read_as_channels_first(tmp_path):
    stack = np.arange(3 * 16 * 20, dtype=np.uint16).reshape(3, 16, 20)
    tifffile.imwrite(tmp_path / "pages.tif", stack, photometric="minisblack")  # 3 pages
    tifffile.imwrite(tmp_path / "ome.ome.tif", stack, ome=True, metadata={"axes": "CYX"})
    tifffile.imwrite(tmp_path / "rgb.tif", np.moveaxis(stack, 0, -1).astype(np.uint8), photometric="rgb")
    for name in ("pages.tif", "ome.ome.tif"):
        np.testing.assert_array_equal(read_image(tmp_path / name).pixels, stack.astype(np.float32))
    assert read_image(tmp_path / "rgb.tif").pixels.shape == (3, 16, 20)


def test_float_tiff_and_png_are_read(tmp_path):
    values = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    tifffile.imwrite(tmp_path / "f.tif", values)
    assert np.allclose(read_image(tmp_path / "f.tif").pixels[0], values)
    from PIL import Image

    Image.fromarray((values * 255).astype(np.uint8)).save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").pixels.shape == (1, 8, 8)


def test_write_is_atomic_and_clips_to_dtype(tmp_path):
    write_tiff(tmp_path / "a.tif", np.array([[-5.0, 70000.0]]), dtype="uint16")
    np.testing.assert_array_equal(read_image(tmp_path / "a.tif").pixels[0], [[0, 65535]])
    assert not list(tmp_path.glob(".*partial"))


def test_missing_corrupt_and_foreign_files_have_clear_errors(tmp_path):
    with pytest.raises(LmaddaError, match="not found"):
        read_image(tmp_path / "nope.tif")
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(LmaddaError, match="bad.tif: no image data .* empty or corrupt"):
        read_image(tmp_path / "bad.tif")
    write_tiff(tmp_path / "whole.tif", np.ones((64, 64)), dtype="uint16")
    (tmp_path / "cut.tif").write_bytes((tmp_path / "whole.tif").read_bytes()[:2000])
    with pytest.raises(LmaddaError, match="cut.tif: (cannot read image|no image data)"):
        read_image(tmp_path / "cut.tif")
    (tmp_path / "x.jpg").write_bytes(b"")
    with pytest.raises(LmaddaError, match="unsupported file type .jpg"):
        read_image(tmp_path / "x.jpg")
    tifffile.imwrite(tmp_path / "nan.tif", np.array([[np.nan, 1.0]], dtype=np.float32))
    with pytest.raises(LmaddaError, match="NaN"):
        read_image(tmp_path / "nan.tif")
