import hashlib

import numpy as np

from lmadda.data.io import read_image
from lmadda.data.synth import SynthConfig, render_field, synthesize


def _digest(manifest):
    return [hashlib.sha256(manifest.resolve(r).read_bytes()).hexdigest() for r in manifest.rows]


def test_simulator_is_deterministic_for_a_seed(tmp_path):
    a, _ = synthesize(tmp_path / "a", SynthConfig(fields=3, size=64, seed=7))
    b, _ = synthesize(tmp_path / "b", SynthConfig(fields=3, size=64, seed=7))
    c, _ = synthesize(tmp_path / "c", SynthConfig(fields=3, size=64, seed=8))
    assert _digest(a) == _digest(b) != _digest(c)


def test_simulated_images_are_well_exposed_registered_and_differ_between_microscopes():
    images = render_field(np.random.default_rng(0), 256)
    assert images["phase_contrast"].max() <= 4095 and images["bright_field"].max() <= 4095
    # well exposed: uses a good part of the 12-bit range without mass saturation
    for name in ("phase_contrast", "bright_field"):
        assert np.percentile(images[name], 99.9) > 0.4 * 4095
        assert (images[name] >= 4095).mean() < 0.001
    pc, bf = images["phase_contrast"].ravel(), images["bright_field"].ravel()
    assert abs(np.corrcoef(pc, bf)[0, 1]) < 0.6  # two different microscopes, not a rescaled copy
    dapi, cd29 = images["dapi"].ravel(), images["cd29"].ravel()
    assert np.corrcoef(dapi, cd29)[0, 1] < 0.6  # CD29 is not a copy of the nucleus channel


def test_simulated_fields_are_written_as_single_channel_images(tmp_path):
    synthesize(tmp_path, SynthConfig(fields=4, size=256, seed=0))
    assert read_image(tmp_path / "images" / "field_0000_dapi.tif").pixels.shape == (1, 256, 256)
