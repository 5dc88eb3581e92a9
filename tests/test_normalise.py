import numpy as np
import pytest

from lmadda.core.errors import LmaddaError
from lmadda.data.normalise import PercentileRange, denormalise, normalise


def test_percentile_normalisation_maps_percentiles_to_0_and_1_and_inverts():
    rng = np.random.default_rng(1)
    pixels = rng.gamma(2.0, 300.0, size=(2, 64, 64)).astype(np.float32) + 100
    normalised, params = normalise(pixels, PercentileRange(1.0, 99.8))
    for c in range(2):
        assert np.percentile(normalised[c], 1.0) == pytest.approx(0.0, abs=1e-4)
        assert np.percentile(normalised[c], 99.8) == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_allclose(denormalise(normalised, params), pixels, rtol=1e-5, atol=1e-2)


def test_flat_image_does_not_blow_up():
    normalised, _ = normalise(np.full((1, 8, 8), 7.0, dtype=np.float32))
    assert np.isfinite(normalised).all()


def test_bad_percentiles_are_rejected_with_the_rule():
    with pytest.raises(LmaddaError, match="0 <= low < high <= 100"):
        PercentileRange(99.0, 1.0)
