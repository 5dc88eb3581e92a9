import numpy as np
import pytest
import torch

from lmadda.baselines import FourierAmplitudeTransfer, HistogramMatcher, adabn
from lmadda.data.dataset import LoadedImage
from lmadda.data.normalise import NormalisationParams
from lmadda.models import GeneratorConfig, UNetGenerator

NORM = NormalisationParams((0.0,), (1.0,))


def _images(offset, scale=1.0, n=3, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return [LoadedImage(field=str(i), input=(rng.normal(size=(1, size, size)) * scale + offset).astype(np.float32), input_norm=NORM) for i in range(n)]


def test_adabn_re_estimates_batchnorm_statistics_on_target_images_only():
    torch.manual_seed(0)
    generator = UNetGenerator(GeneratorConfig(ngf=4, depth=3)).eval()
    adapted = adabn(generator, _images(5.0), tile=32, device="cpu")
    first_bn = adapted.layers[1][2]
    original_bn = generator.layers[1][2]
    assert not torch.equal(first_bn.running_mean, original_bn.running_mean)
    assert torch.equal(adapted.layers[0][0].weight, generator.layers[0][0].weight)  # weights untouched
    assert not adapted.training


def test_histogram_matching_maps_target_onto_source_quantiles():
    source = _images(0.0, 1.0)
    matcher = HistogramMatcher(source)
    target = _images(3.0, 0.2, seed=1)[0].input
    matched = matcher(target)
    pooled = np.concatenate([s.input.ravel() for s in source])
    assert abs(np.median(matched) - np.median(pooled)) < 0.05
    assert np.corrcoef(np.argsort(np.argsort(matched.ravel())), np.argsort(np.argsort(target.ravel())))[0, 1] > 0.999


def test_fda_swaps_only_the_low_frequency_amplitude():
    source = _images(0.5, 0.2)
    target = _images(-0.5, 0.2, seed=1)[0].input  # darker than the source: mean below zero in model units
    transfer = FourierAmplitudeTransfer(source, beta=0.05)
    out = transfer(target)
    assert out.shape == target.shape
    assert out.mean() == pytest.approx(0.5, abs=0.05)  # the DC term (brightness) came from the source
    high = lambda a: np.abs(np.fft.fft2(a))[:, 8:24, 8:24]
    np.testing.assert_allclose(high(out), high(target), rtol=1e-3, atol=1e-3)
