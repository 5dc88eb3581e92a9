"""The facade (lmadda.stainer.VirtualStainer): load, adapt, select, stain, save, on the tiny simulated set."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmadda.core.errors import LmaddaError
from lmadda.data.dataset import target_from_model_range
from lmadda.data.io import read_image
from lmadda.data.manifest import images_pixel_size
from lmadda.data.raw import clip_to_dtype
from lmadda.inference import model_input, to_camera_units
from lmadda.stainer import VirtualStainer
from lmadda.models.tiling import predict_tiled

FAST = {"steps": 2, "batch_size": 2, "crop_size": 64, "device": "cpu", "progress": False}


@pytest.fixture(scope="module")
def stainer(tiny_source) -> VirtualStainer:
    return VirtualStainer.load(tiny_source, device="cpu")


@pytest.fixture(scope="module")
def pixels(tiny_synth) -> np.ndarray:
    """A held-out phase-contrast image in camera counts, (1, 64, 64) uint16."""
    return read_image(tiny_synth.resolve(tiny_synth.inputs("phase_contrast", "test")[0])).pixels


def _layers(stainer: VirtualStainer) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in layer.state_dict().items()} for layer in stainer.checkpoint.generator.layers]


def test_stain_is_the_tiled_prediction_mapped_to_the_markers_camera_units(stainer, pixels):
    checkpoint = stainer.checkpoint
    prediction = predict_tiled(checkpoint.generator, model_input(pixels, checkpoint), tile=64, device="cpu")
    expected = to_camera_units(target_from_model_range(prediction), checkpoint)
    stains = stainer.stain(pixels, tile=64)
    assert stains.shape == (len(stainer.markers), *pixels.shape[1:])
    np.testing.assert_array_equal(stains, expected)


def test_stain_file_writes_the_pixels_stain_returns(stainer, pixels, tiny_synth, tmp_path):
    image = tiny_synth.resolve(tiny_synth.inputs("phase_contrast", "test")[0])
    scores = []
    out = stainer.stain_file(image, tmp_path / "stain.tif", tile=64, on_domain=scores.append)
    written = read_image(out)
    np.testing.assert_array_equal(written.pixels, clip_to_dtype(stainer.stain(pixels, tile=64), stainer.checkpoint.target_dtype))
    assert len(scores) == 1 and scores[0] is not None  # the tiny source model carries a domain reference


def test_adapting_at_layer_k_trains_only_layers_0_to_k_and_leaves_the_source_unchanged(stainer, tiny_synth, tmp_path):
    before = _layers(stainer)
    outcome = stainer.adapt(tiny_synth.source, "bright_field", layer=2, gate_accuracy=None, d_warmup_steps=0, **FAST)
    after = _layers(outcome.stainer)
    for index, (old, new) in enumerate(zip(before, after)):
        same = all(torch.equal(old[k], new[k]) for k in old)
        assert same == (index > 2), f"layer {index} {'changed' if not same else 'did not change'}"
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before, _layers(stainer)) for k in a)  # the source stainer as it was
    assert outcome.result is not None and outcome.choice is None and outcome.config.layer == [2]
    assert outcome.summary.startswith("layer [2], 2 steps")
    saved = VirtualStainer.load(outcome.stainer.save(tmp_path / "adapted.pt"))
    assert saved.setting == "bright_field" and saved.checkpoint.metadata["layer"] == 2
    assert saved.checkpoint.pixel_size_um == images_pixel_size(tiny_synth, "bright_field")  # the target's, recorded


def test_adapt_auto_on_an_in_domain_target_keeps_the_unadapted_model(stainer, tiny_synth, pixels):
    outcome = stainer.adapt(tiny_synth.source, "phase_contrast", layer="auto", gate_accuracy=None, d_warmup_steps=0, **FAST)
    assert outcome.choice is not None and outcome.choice.chosen == "unadapted" and outcome.choice.fell_back
    assert "kept the unadapted model" in outcome.summary and not outcome.collapsed
    assert outcome.stainer.checkpoint.metadata["label_free_choice"]["chosen"] == "unadapted"
    np.testing.assert_array_equal(outcome.stainer.stain(pixels, tile=64), stainer.stain(pixels, tile=64))


def test_a_2d_array_is_refused_with_the_fix(stainer, pixels):
    with pytest.raises(LmaddaError, match=r"shape \(64, 64\).*\(1, H, W\).*pixels\[None\]"):
        stainer.stain(pixels[0])


def test_the_wrong_channel_count_is_refused_naming_the_expected_one(stainer, pixels):
    with pytest.raises(LmaddaError, match=r"shape \(3, 64, 64\).*\(1, H, W\).*C = 1"):
        stainer.stain(np.concatenate([pixels] * 3))


def test_an_unknown_setting_is_refused_naming_the_known_ones(stainer, tiny_synth):
    with pytest.raises(LmaddaError, match=r"no setting 'dark_field'; known: .*bright_field"):
        stainer.adapt(tiny_synth.source, "dark_field", layer=0, **FAST)


def test_an_unknown_adapt_option_is_refused_by_name_before_any_work(stainer, tiny_synth):
    with pytest.raises(LmaddaError, match="stepz"):
        stainer.adapt(tiny_synth.source, "bright_field", layer=0, stepz=3)


def test_a_missing_checkpoint_and_an_unknown_device_are_refused(tmp_path, tiny_source):
    with pytest.raises(LmaddaError, match="not found"):
        VirtualStainer.load(tmp_path / "missing.pt")
    with pytest.raises(LmaddaError, match="unknown device 'gpu0'; use auto, cpu"):
        VirtualStainer.load(tiny_source, device="gpu0")
