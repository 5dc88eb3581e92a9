import numpy as np
import pytest

from lmadda.core.errors import LmaddaError
from lmadda.data.shifts import Shift

SENSOR_MAX = 4095.0


def _image(size=64):
    rng = np.random.default_rng(0)
    return (rng.uniform(200, 4000, size=(1, size, size))).astype(np.float32)


def test_overexposure_saturates_at_the_sensor_max_and_is_monotone_in_magnitude():
    image = _image()
    outputs = [Shift("overexposure", g).apply_input(image, SENSOR_MAX) for g in (1.1, 1.5, 2.0)]
    for out in outputs:
        assert out.max() == SENSOR_MAX
    saturated = [float((out == SENSOR_MAX).mean()) for out in outputs]
    assert saturated == sorted(saturated) and saturated[0] < saturated[-1]
    assert np.all(outputs[1] >= outputs[0]) and np.all(outputs[2] >= outputs[1])
    dark = image < SENSOR_MAX / 2.0
    np.testing.assert_allclose(outputs[2][dark], image[dark] * 2.0, rtol=1e-6)


def test_scale_zooms_input_and_target_consistently():
    image = _image(64)
    target = np.zeros((1, 64, 64), np.float32)
    target[0, 20:30, 40:50] = 1.0
    shift = Shift.parse("scale:2")
    zoomed_input, zoomed_target = shift.apply_input(image, SENSOR_MAX), shift.apply_target(target)
    assert zoomed_input.shape == zoomed_target.shape == (1, 128, 128)
    ys, xs = np.nonzero(zoomed_target[0] > 0.5)
    assert 40 <= ys.min() <= 42 and 58 <= ys.max() <= 60 and 80 <= xs.min() <= 82
    assert Shift.parse("scale:0.5").apply_target(target).shape == (1, 32, 32)
    assert Shift.parse("overexposure:1.5").apply_target(target) is target


def test_defocus_blurs_but_keeps_mean_brightness():
    image = _image()
    blurred = Shift("defocus", 2.0).apply_input(image, SENSOR_MAX)
    assert blurred.shape == image.shape
    assert blurred.mean() == pytest.approx(image.mean(), rel=0.02)
    assert np.abs(np.diff(blurred, axis=2)).mean() < 0.5 * np.abs(np.diff(image, axis=2)).mean()


def test_noise_is_seeded_and_grows_with_magnitude():
    image = np.full((1, 64, 64), 2000.0, np.float32)
    a = Shift("noise", 0.05).apply_input(image, SENSOR_MAX, seed=1)
    np.testing.assert_array_equal(a, Shift("noise", 0.05).apply_input(image, SENSOR_MAX, seed=1))
    assert Shift("noise", 0.2).apply_input(image, SENSOR_MAX, seed=1).std() > a.std() > 0


def test_illumination_darkens_corners_not_centre():
    image = np.full((1, 65, 65), 1000.0, np.float32)
    out = Shift("illumination", 0.5).apply_input(image, SENSOR_MAX)
    assert out[0, 32, 32] == pytest.approx(1000.0) and out[0, 0, 0] == pytest.approx(500.0)


def test_identity_magnitudes_change_nothing():
    image = _image()
    for text in ("overexposure:1", "scale:1", "defocus:0", "noise:0", "illumination:0"):
        assert Shift.parse(text).apply_input(image, SENSOR_MAX) is image


@pytest.mark.parametrize(
    "text, message",
    [
        ("blur:2", "unknown shift 'blur'; known shifts: overexposure, scale, defocus, noise, illumination"),
        ("overexposure", "must be written name:magnitude"),
        ("overexposure:lots", "magnitude 'lots' is not a number"),
        ("overexposure:0.5", r"magnitude 0.5 out of range; .* must lie in \[1.0, 100.0\]"),
        ("scale:-1", "out of range"),
        ("illumination:1.5", "out of range"),
    ],
)
def test_bad_shift_names_and_magnitudes_are_explained(text, message):
    with pytest.raises(LmaddaError, match=message):
        Shift.parse(text)
