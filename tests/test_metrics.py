import numpy as np
import pytest

from lmadda.evaluation.metrics import gap_recovered, nrmse, pearson, psnr, ssim


def test_pearson_known_values_and_affine_invariance():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(32, 32))
    assert pearson(truth, truth) == pytest.approx(1.0)
    assert pearson(-truth, truth) == pytest.approx(-1.0)
    assert pearson(3 * truth + 7, truth) == pytest.approx(1.0)
    x = np.array([1.0, 2.0, 3.0, 4.0])
    y = np.array([1.0, 3.0, 2.0, 4.0])
    assert pearson(x, y) == pytest.approx(0.8)
    assert np.isnan(pearson(np.ones(4), y))


def test_ssim_psnr_nrmse_known_values():
    rng = np.random.default_rng(1)
    truth = rng.uniform(size=(64, 64))
    assert ssim(truth, truth, data_range=1.0) == pytest.approx(1.0)
    assert ssim(rng.uniform(size=(64, 64)), truth, data_range=1.0) < 0.1
    assert psnr(truth + 0.1, truth, data_range=1.0) == pytest.approx(20.0)
    assert nrmse(truth + 0.1, truth) == pytest.approx(0.1 / (truth.max() - truth.min()))


def test_gap_recovered():
    assert gap_recovered(0.7, 0.5, 0.9) == pytest.approx(0.5)
    assert np.isnan(gap_recovered(0.7, 0.9, 0.8))
