"""Label-free criteria: computed without target labels, and scored against labelled results."""

import math

import numpy as np
import pytest

from lmadda.checkpoint import load_checkpoint
from lmadda.data.dataset import load_images
from lmadda.data.manifest import Manifest
from lmadda.selection.criteria import SelectionProbe, criterion_agreement, spearman, wasserstein_1d


def test_the_unadapted_model_on_its_own_domain_scores_better_than_on_a_shifted_one(tiny_synth, tiny_source):
    from lmadda.data.shifts import Shift

    source = load_checkpoint(tiny_source)
    manifest = Manifest.load(tiny_synth.source)
    own = load_images(manifest, "phase_contrast", "train", percentiles=source.percentiles)
    held_out = load_images(manifest, "phase_contrast", "val", percentiles=source.percentiles)
    shifted = load_images(manifest, "phase_contrast", "val", shift=Shift.parse("overexposure:3"), percentiles=source.percentiles)
    same = SelectionProbe(source.generator, own, held_out, crop_size=64, crops=4).measure(source.generator)[0]
    moved = SelectionProbe(source.generator, own, shifted, crop_size=64, crops=4).measure(source.generator)[0]
    assert set(same) == {"output_w1", "probe_shift", "flip_inconsistency"} and all(math.isfinite(v) for v in same.values())
    assert moved["output_w1"] > same["output_w1"] and moved["probe_shift"] > same["probe_shift"]


def test_wasserstein_and_spearman_on_known_values():
    assert wasserstein_1d(np.zeros(100), np.full(100, 0.5)) == pytest.approx(0.5)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 2], [1, 2]))


def test_agreement_rewards_a_criterion_that_ranks_like_the_truth_and_measures_regret():
    rows = [{"target": "t", "collapsed": False, "pearson": p, "lf_good": 1 - p, "lf_bad": p} for p in (0.5, 0.6, 0.7, 0.8)]
    rows.append({"target": "t", "collapsed": True, "pearson": 0.99, "lf_good": 0.0, "lf_bad": 0.0})  # collapsed: ignored
    good, bad = criterion_agreement(rows, "lf_good", "pearson"), criterion_agreement(rows, "lf_bad", "pearson")
    assert good["spearman"] == pytest.approx(1.0) and good["regret"] == pytest.approx(0.0)
    assert bad["spearman"] == pytest.approx(-1.0) and bad["regret"] == pytest.approx(0.3)


def test_discrepancy_profile_sees_an_intensity_shift_at_the_first_layer_and_predicts_it(tiny_synth, tiny_source):
    from lmadda.data.shifts import Shift
    from lmadda.selection.criteria import SelectionProbe, predict_layer

    source = load_checkpoint(tiny_source)
    manifest = Manifest.load(tiny_synth.source)
    own = load_images(manifest, "phase_contrast", "train", percentiles=source.percentiles)
    held_out = load_images(manifest, "phase_contrast", "val", percentiles=source.percentiles)
    shifted = load_images(manifest, "phase_contrast", "val", shift=Shift.parse("overexposure:4"), percentiles=source.percentiles)
    same = SelectionProbe(source.generator, own, held_out, crop_size=64, crops=4).discrepancy_profile()
    moved = SelectionProbe(source.generator, own, shifted, crop_size=64, crops=4).discrepancy_profile()
    assert len(same) == len(moved) == source.generator.num_layers
    assert moved[0] > 2 * same[0]  # saturation changes the input statistics the first layer sees
    assert predict_layer(moved) == 0 or moved[predict_layer(moved)] >= 0.5 * max(moved)


def test_predict_layer_is_the_first_layer_reaching_the_fraction_of_the_maximum():
    from lmadda.selection.criteria import predict_layer

    assert predict_layer([0.1, 0.2, 1.0, 4.0, 2.0]) == 3
    assert predict_layer([0.1, 2.5, 1.0, 4.0, 2.0]) == 1
    assert predict_layer([float("nan"), 1.0, 0.2], fraction=1.0) == 1
    with pytest.raises(ValueError, match="no finite value"):
        predict_layer([float("nan")])


def test_ensemble_disagreement_is_zero_for_identical_models_and_grows_with_spread():
    from lmadda.selection.criteria import layer_disagreement, seed_disagreement

    base = np.zeros((2, 1, 8, 8), np.float16)
    assert seed_disagreement([base, base]) == 0.0
    assert seed_disagreement([base, base + 0.2]) == pytest.approx(0.1, abs=1e-3)
    assert math.isnan(seed_disagreement([base]))
    scores = layer_disagreement({"a": base, "b": base, "odd": base + 1})
    assert scores["a"] == scores["b"] == 0.0 and scores["odd"] == pytest.approx(1.0)
