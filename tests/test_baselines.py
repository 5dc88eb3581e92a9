import numpy as np
import pytest
import torch

from lmadda.corrections.baselines import FourierAmplitudeTransfer, adabn, build_baseline
from lmadda.core.errors import LmaddaError
from lmadda.data.correction import HistogramMatcher
from lmadda.data.dataset import LoadedImage
from lmadda.data.normalise import NormalisationParams
from lmadda.models import GeneratorConfig, UNetGenerator

NORM = NormalisationParams((0.0,), (1.0,))


def _images(offset, scale=1.0, n=3, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return [LoadedImage(field=str(i), input=(rng.normal(size=(1, size, size)) * scale + offset).astype(np.float32), input_norm=NORM) for i in range(n)]


def _loaded(arrays):
    return [LoadedImage(field=str(i), input=np.asarray(a, np.float32), input_norm=NORM) for i, a in enumerate(arrays)]


# --- AdaBN ---------------------------------------------------------------------------------------

def test_adabn_re_estimates_batchnorm_statistics_on_target_images_only():
    torch.manual_seed(0)
    generator = UNetGenerator(GeneratorConfig(ngf=4, depth=3)).eval()
    adapted = adabn(generator, _images(5.0), tile=32, device="cpu")
    first_bn = adapted.layers[1][2]
    original_bn = generator.layers[1][2]
    assert not torch.equal(first_bn.running_mean, original_bn.running_mean)
    assert torch.equal(adapted.layers[0][0].weight, generator.layers[0][0].weight)  # weights untouched
    assert not adapted.training


@pytest.mark.parametrize("batch_size", [4, 3])  # 3: a short last batch (10 tiles = 3 + 3 + 3 + 1) counts by its tiles
def test_adabn_running_mean_of_first_norm_is_the_mean_of_its_input_over_all_target_tiles(batch_size):
    torch.manual_seed(0)
    generator = UNetGenerator(GeneratorConfig(ngf=4, depth=3)).eval()
    target = _images(2.0, 0.5, n=10, seed=4)
    adapted = adabn(generator, target, tile=32, batch_size=batch_size, device="cpu")
    first_bn = adapted.layers[1][2]
    assert isinstance(first_bn, torch.nn.BatchNorm2d)
    with torch.no_grad():  # the input of that BatchNorm: layer 0, then layer 1's LeakyReLU and conv
        x = torch.from_numpy(np.stack([image.input for image in target]))
        pre_bn = adapted.layers[1][:2](adapted.layers[0](x)).double()
    torch.testing.assert_close(first_bn.running_mean.double(), pre_bn.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)


def test_adabn_on_new_images_of_the_training_distribution_keeps_predictions_close():
    torch.manual_seed(0)
    untrained = UNetGenerator(GeneratorConfig(ngf=4, depth=3)).eval()
    generator = adabn(untrained, _images(0.3, 0.5, n=24, size=64, seed=1), tile=32, device="cpu")  # stats of "source" data
    again = adabn(generator, _images(0.3, 0.5, n=24, size=64, seed=2), tile=32, device="cpu")  # same distribution, new draws
    shifted = adabn(generator, _images(3.0, 0.5, n=24, size=64, seed=2), tile=32, device="cpu")
    x = torch.from_numpy(np.stack([image.input for image in _images(0.3, 0.5, n=4, size=64, seed=3)]))
    with torch.no_grad():
        before, after, moved = generator(x), again(x), shifted(x)
    close = (after - before).abs().mean() / before.std()
    assert close < 0.05
    assert (moved - before).abs().mean() / before.std() > 5 * close  # the check can fail: a real shift moves them


# --- histogram matching --------------------------------------------------------------------------

def _skimage_reference(image, source_quantiles, levels):
    """scikit-image's `_match_cumulative_cdf` (exposure.match_histograms) onto the same pooled source quantiles,
    with the tied block's CDF position taken at its middle (HistogramMatcher's choice) instead of its top."""
    _, inverse, counts = np.unique(image.ravel(), return_inverse=True, return_counts=True)
    quantiles = (np.cumsum(counts) - counts / 2) / image.size
    return np.interp(quantiles, levels, source_quantiles)[inverse].reshape(image.shape)


def test_histogram_matching_maps_target_onto_source_quantiles():
    source = _images(0.0, 1.0)
    matcher = HistogramMatcher(source)
    target = _images(3.0, 0.2, seed=1)[0].input
    matched = matcher(target)
    pooled = np.concatenate([s.input.ravel() for s in source])
    assert abs(np.median(matched) - np.median(pooled)) < 0.05
    assert np.corrcoef(np.argsort(np.argsort(matched.ravel())), np.argsort(np.argsort(target.ravel())))[0, 1] > 0.999


def test_histogram_matching_gives_a_saturated_block_one_value_at_the_middle_of_its_cdf_range():
    rng = np.random.default_rng(0)
    source = _loaded([np.linspace(-1.0, 1.0, 100_001).reshape(1, 1, -1)])  # uniform: the q-quantile is 2q - 1
    target = rng.uniform(-1.0, 0.5, size=(1, 64, 64)).astype(np.float32)
    saturated = rng.random((64, 64)) < 0.3
    target[0, saturated] = 1.0  # overexposure clips 30% of pixels to the sensor maximum
    matched = HistogramMatcher(source)(target)
    assert np.unique(matched[0, saturated]).size == 1
    share = saturated.mean()
    assert matched[0, saturated][0] == pytest.approx(2 * (1 - share / 2) - 1, abs=1e-3)  # the block's mid-CDF quantile
    order = np.argsort(target.ravel(), kind="stable")
    assert np.all(np.diff(matched.ravel()[order]) >= 0)  # monotone: a brighter input never maps darker


def test_histogram_matching_agrees_with_the_reference_and_the_analytic_uniform_case():
    rng = np.random.default_rng(1)
    source = _loaded([np.linspace(0.0, 1.0, 100_001).reshape(1, 1, -1)])
    matcher = HistogramMatcher(source)
    target = np.round(rng.normal(size=(1, 48, 48)), 1).astype(np.float32)  # many ties
    np.testing.assert_allclose(matcher(target), _skimage_reference(target, matcher.source_values, matcher.levels), atol=1e-6)
    distinct = rng.permutation(np.arange(4096, dtype=np.float32)).reshape(1, 64, 64)  # every value once
    expected = (np.argsort(np.argsort(distinct.ravel())) + 0.5) / distinct.size  # rank (i + 0.5) / N on a uniform source
    np.testing.assert_allclose(matcher(distinct).ravel(), expected, atol=1e-4)


def test_histogram_matching_a_distribution_onto_itself_is_the_identity():
    image = _images(0.2, 0.3, n=1, size=128, seed=5)[0].input
    matched = HistogramMatcher(_loaded([image]))(image)
    spacing = np.diff(np.quantile(image, np.linspace(0, 1, 1001)))
    assert np.abs(matched - image).max() <= 2 * spacing[1:-1].max()  # within the quantile resolution
    np.testing.assert_allclose(np.median(np.abs(matched - image)), 0.0, atol=1e-3)


def test_histogram_matching_a_large_image_is_fast():
    import time

    matcher = HistogramMatcher(_images(0.0, 1.0, n=1, size=256))
    image = np.clip(np.random.default_rng(0).normal(size=(1, 2048, 2048)), -1, 1).astype(np.float32)
    start = time.perf_counter()
    matcher(image)
    assert time.perf_counter() - start < 5.0  # ~0.5 s on one core


# --- FDA -----------------------------------------------------------------------------------------

def _spectrum(image):
    return np.fft.fftshift(np.fft.fft2((image + 1.0) / 2.0), axes=(-2, -1))


def test_fda_swaps_only_the_low_frequency_amplitude():
    source = _images(0.5, 0.2)
    target = _images(-0.5, 0.2, seed=1)[0].input  # darker than the source: mean below zero in model units
    transfer = FourierAmplitudeTransfer(source, beta=0.05)
    out = transfer(target)
    assert out.shape == target.shape
    assert out.mean() == pytest.approx(0.5, abs=0.05)  # the DC term (brightness) came from the source
    high = lambda a: np.abs(np.fft.fft2(a))[:, 8:24, 8:24]
    np.testing.assert_allclose(high(out), high(target), rtol=1e-3, atol=1e-3)


def test_fda_with_the_image_itself_as_source_returns_it_unchanged():
    image = _images(0.1, 0.3, n=1, size=64, seed=2)
    np.testing.assert_allclose(FourierAmplitudeTransfer(image, beta=0.001)(image[0].input), image[0].input, atol=1e-5)


def test_fda_low_frequency_amplitude_is_the_sources_and_every_phase_is_the_targets():
    source = _images(0.4, 0.3, n=1, size=64)
    target = _images(-0.3, 0.2, n=1, size=64, seed=1)[0].input
    beta, size = 0.05, 64
    out = FourierAmplitudeTransfer(source, beta=beta)(target)
    b, c = int(np.floor(size * beta)), size // 2
    window = (slice(None), slice(c - b, c + b + 1), slice(c - b, c + b + 1))
    np.testing.assert_allclose(np.abs(_spectrum(out))[window], np.abs(_spectrum(source[0].input))[window], rtol=1e-4, atol=1e-2)
    out_spectrum, target_spectrum = _spectrum(out), _spectrum(target)
    phase_gap = np.angle(out_spectrum * np.conj(target_spectrum))
    assert np.abs(phase_gap[np.abs(target_spectrum) > 1e-3]).max() < 1e-3


def test_fda_source_choice_depends_on_the_seed_and_the_image_not_on_call_order():
    sources = _images(0.0, 0.3, n=8, seed=3)
    targets = [image.input for image in _images(-0.2, 0.3, n=12, seed=4)]
    forward = [FourierAmplitudeTransfer(sources, seed=0)(t) for t in targets]
    backward = [FourierAmplitudeTransfer(sources, seed=0)(t) for t in reversed(targets)][::-1]
    for a, b in zip(forward, backward):
        np.testing.assert_array_equal(a, b)
    transfer = FourierAmplitudeTransfer(sources, seed=0)
    chosen = [transfer.source_index(t) for t in targets]
    assert chosen == [transfer.source_index(t) for t in targets]  # transforming does not advance anything
    assert len(set(chosen)) > 1  # images are spread over the source set
    others = [FourierAmplitudeTransfer(sources, seed=seed) for seed in range(1, 4)]
    assert any([o.source_index(t) for t in targets] != chosen for o in others)


def test_build_baseline_gives_the_study_and_evaluate_the_same_seeded_fda():
    generator = UNetGenerator(GeneratorConfig(ngf=4, depth=3)).eval()
    sources, targets = _images(0.0, 0.3, n=5), _images(0.5, 0.3, n=2, seed=1)
    same_generator, transfer = build_baseline("fda", generator, sources, targets, seed=3)
    assert same_generator is generator and transfer.seed == 3
    np.testing.assert_array_equal(transfer(targets[0].input), FourierAmplitudeTransfer(sources, seed=3)(targets[0].input))
    with pytest.raises(LmaddaError, match="unknown baseline 'nope'"):
        build_baseline("nope", generator, sources, targets)


def test_a_checkpoint_carries_histogram_matching_and_predict_applies_it():
    from lmadda.data.correction import input_correction
    from lmadda.checkpoint import GeneratorCheckpoint
    from lmadda.data.dataset import to_model_range
    from lmadda.data.normalise import PercentileRange, normalise
    from lmadda.inference import model_input

    matcher = HistogramMatcher(_images(0.0, n=2))
    carried = input_correction({"input_correction": matcher.as_correction()})
    image = np.random.default_rng(4).normal(1.0, 2.0, size=(1, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(carried(image), matcher(image))
    assert input_correction({}) is None

    checkpoint = GeneratorCheckpoint(generator=UNetGenerator(GeneratorConfig(ngf=4, depth=4, out_channels=1)), markers=["dapi"],
                                     setting="t", percentiles=PercentileRange(), metadata={"input_correction": matcher.as_correction()})
    pixels = np.random.default_rng(5).integers(0, 4096, size=(1, 32, 32)).astype(np.uint16)
    expected = matcher(to_model_range(normalise(pixels, checkpoint.percentiles)[0]))
    np.testing.assert_array_equal(model_input(pixels, checkpoint), expected)


@pytest.mark.parametrize("spec, message", [
    ({"kind": "fda"}, "cannot apply"),
    ({"kind": "histogram_matching", "source_values": [0.5, 0.1]}, "damaged"),
])
def test_a_damaged_or_unknown_input_correction_is_refused_with_the_fix(spec, message):
    from lmadda.data.correction import input_correction

    with pytest.raises(LmaddaError, match=message):
        input_correction({"input_correction": spec})
