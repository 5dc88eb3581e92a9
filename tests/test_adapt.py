import numpy as np
import pytest
import torch

from lmadda.checkpoint import GeneratorCheckpoint
from lmadda.data.dataset import LoadedImage
from lmadda.data.normalise import NormalisationParams
from lmadda.models import GeneratorConfig, UNetGenerator
from lmadda.models.generator import init_weights
from lmadda.training.adapt import AdaptConfig, adapt, feature_weights

NORM = NormalisationParams((0.0,), (1.0,))


def _source() -> GeneratorCheckpoint:
    torch.manual_seed(0)
    generator = UNetGenerator(GeneratorConfig(ngf=4, depth=4, out_channels=1))
    init_weights(generator)
    # give BatchNorm non-trivial running statistics, as a trained model has
    generator.train()
    with torch.no_grad():
        for _ in range(3):
            generator(torch.randn(4, 1, 32, 32))
    return GeneratorCheckpoint(generator=generator.eval(), markers=["dapi"], setting="source")


def _images(offset: float, n: int = 4, seed: int = 0) -> list[LoadedImage]:
    rng = np.random.default_rng(seed)
    return [LoadedImage(field=f"f{i}", input=(rng.normal(size=(1, 32, 32)) + offset).astype(np.float32), input_norm=NORM) for i in range(n)]


def _config(**options) -> AdaptConfig:
    return AdaptConfig(**{"layer": 2, "steps": 4, "batch_size": 2, "crop_size": 32, "lr": 1e-2, "d_lr": None, "gate_accuracy": None,
                          "d_warmup_steps": 0, "log_every": 2, "device": "cpu", **options})


def _snapshot(generator: UNetGenerator) -> list[dict]:
    return [{k: v.clone() for k, v in layer.state_dict().items()} for layer in generator.layers]


@pytest.mark.parametrize("bn_mode", ["frozen", "train"])
@pytest.mark.parametrize("layer", [0, 2, 5])
def test_only_layers_up_to_the_cut_change_and_later_layers_and_bn_stats_are_bit_identical(layer, bn_mode):
    source = _source()
    before = _snapshot(source.generator)
    result = adapt(source, _images(0.0), _images(1.5, seed=1), _config(layer=layer, bn_mode=bn_mode), progress=False)
    after = _snapshot(result.generator)
    for index, (old, new) in enumerate(zip(before, after)):
        same = all(torch.equal(old[k], new[k]) for k in old)
        if index <= layer:
            assert not same, f"trainable layer {index} did not change"
        else:
            assert same, f"frozen layer {index} changed"
    # the source model itself is untouched
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before, _snapshot(source.generator)) for k in a)


def test_frozen_bn_mode_keeps_running_statistics_of_trained_layers():
    source = _source()
    result = adapt(source, _images(0.0), _images(1.5, seed=1), _config(layer=3, bn_mode="frozen"), progress=False)
    for old, new in zip(source.generator.layers[:4], result.generator.layers[:4]):
        for a, b in zip(old.modules(), new.modules()):
            if isinstance(a, torch.nn.BatchNorm2d):
                assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)


def test_adda_is_matching_the_last_layer():
    source = _source()
    config = _config(layer=source.generator.last_layer)
    result = adapt(source, _images(0.0), _images(1.0, seed=1), config, progress=False)
    checkpoint = result.checkpoint(source, config, "target")
    assert checkpoint.metadata["method"] == "adda" and checkpoint.metadata["layer"] == 7
    lm = adapt(source, _images(0.0), _images(1.0, seed=1), _config(layer=3), progress=False)
    assert lm.checkpoint(source, _config(layer=3), "target").metadata["method"] == "lmadda"


def test_cut_matching_adds_one_discriminator_per_pending_skip():
    assert feature_weights(_config(layer=2, match="cut"), ["layer2", "skip0", "skip1"]) == pytest.approx(
        {"layer2": 1 / 3, "skip0": 1 / 3, "skip1": 1 / 3})
    source = _source()
    result = adapt(source, _images(0.0), _images(1.0, seed=1), _config(layer=5, match="cut"), progress=False)
    assert result.steps_done == 4 and not result.collapsed


def test_multi_layer_matching_trains_up_to_the_deepest_layer():
    source = _source()
    before = _snapshot(source.generator)
    config = _config(layer=[1, 4], layer_weights=[1.0, 3.0])
    assert feature_weights(config, ["layer4", "layer1"]) == pytest.approx({"layer4": 0.75, "layer1": 0.25})
    after = _snapshot(adapt(source, _images(0.0), _images(1.0, seed=1), config, progress=False).generator)
    assert not all(torch.equal(before[4][k], after[4][k]) for k in before[4])
    assert all(torch.equal(before[5][k], after[5][k]) for k in before[5])


def test_non_finite_loss_marks_the_run_collapsed_and_stops_it():
    source = _source()
    broken = _images(0.0, seed=1)
    broken[0].input[:] = np.nan
    for image in broken[1:]:
        image.input[:] = np.nan
    result = adapt(source, _images(0.0), broken, _config(steps=20), progress=False)
    assert result.collapsed and "non-finite" in result.collapse_reason and result.steps_done == 1
    assert result.history[-1]["collapsed"] is True
    assert result.domain_reference is None  # nothing finite to describe a domain with; the run is saved and flagged


def test_generator_loss_over_the_bound_marks_collapse():
    source = _source()
    # a discriminator ten times faster than G' wins quickly, and G's loss climbs past a low bound
    config = _config(steps=30, lr=1e-4, d_lr=5e-2, collapse_g_loss=1.0)
    result = adapt(source, _images(0.0), _images(3.0, seed=1), config, progress=False)
    assert result.collapsed and "bound" in result.collapse_reason


@pytest.mark.parametrize("collapses", [False, True])
def test_a_saturated_discriminator_is_flagged_and_counts_as_collapse_only_when_asked(collapses):
    source = _source()
    # a fast discriminator against a far-off target saturates quickly; G' is held still by the gate
    config = _config(steps=30, lr=1e-4, d_lr=5e-2, gate_accuracy=1.0, log_every=1, saturation_accuracy=0.8, saturation_patience=2,
                     collapse_g_loss=1e9, saturation_collapses=collapses)
    result = adapt(source, _images(0.0), _images(3.0, seed=1), config, progress=False)
    assert result.d_saturated
    assert result.collapsed is collapses
    if collapses:
        assert "discriminator saturated for 2 logs" in result.collapse_reason and result.steps_done < 30
        assert result.history[-1]["collapsed"] and result.history[-1]["collapse_reason"] == result.collapse_reason
    else:
        assert result.steps_done == 30 and result.history[-1]["collapse_reason"] == ""


def test_gating_and_warmup_hold_the_generator_until_the_discriminator_is_informative():
    source = _source()
    before = _snapshot(source.generator)
    gated = adapt(source, _images(0.0), _images(1.0, seed=1), _config(steps=4, gate_accuracy=1.0), progress=False)
    assert all(record["g_updates"] == 0.0 for record in gated.history)
    assert gated.g_updates == 0 and gated.history[-1]["g_updates_total"] == 0  # the study reports such a model as unmoved
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before, _snapshot(gated.generator)) for k in a)
    warming = adapt(source, _images(0.0), _images(1.0, seed=1), _config(steps=4, d_warmup_steps=2), progress=False)
    assert [record["g_updates"] for record in warming.history] == [0.0, 1.0]
    assert warming.g_updates == 2 and [record["g_updates_total"] for record in warming.history] == [0, 2]


def test_bad_adapt_options_are_rejected_by_name():
    from lmadda.core.config import build_config
    from lmadda.core.errors import LmaddaError

    with pytest.raises(LmaddaError, match="unknown option 'stepz'"):
        build_config(AdaptConfig, None, layer=3, stepz=4)
    with pytest.raises(LmaddaError, match="lists a layer twice"):
        build_config(AdaptConfig, None, layer=[3, 3])
    with pytest.raises(LmaddaError, match="lr: Input should be greater than 0"):
        build_config(AdaptConfig, None, layer=3, lr=-1)
    with pytest.raises(LmaddaError, match="layer 9 does not exist"):
        adapt(_source(), _images(0.0), _images(1.0), _config(layer=9), progress=False)


def test_adapter_state_resumes_step_history_and_weights():
    from lmadda.training.adapt import Adapter

    source = _source()
    first = Adapter(source, _images(0.0), _images(1.0, seed=1), _config(steps=6))
    for _ in range(4):
        first.step()
    state = first.state_dict()
    resumed = Adapter(source, _images(0.0), _images(1.0, seed=1), _config(steps=6))
    resumed.load_state_dict(state)
    assert resumed.step_number == 4 and len(resumed.result.history) == 2
    assert resumed.result.g_updates == first.result.g_updates == 4
    assert all(torch.equal(a, b) for a, b in zip(first.target_generator.state_dict().values(), resumed.target_generator.state_dict().values()))
    while not resumed.finished:
        resumed.step()
    assert resumed.step_number == 6 and len(resumed.finish().history) == 3


def test_paper_recipe_is_adda_as_published_and_refuses_stabilisers():
    paper = AdaptConfig(layer=15, recipe="paper")
    assert (paper.lr, paper.d_lr, paper.gate_accuracy, paper.d_warmup_steps, paper.source_anchor) == (2e-4, None, None, 0, 0.0)
    assert AdaptConfig(layer=3, recipe="paper", lr=1e-4).lr == 1e-4  # the learning rate is still a sweep axis
    with pytest.raises(ValueError, match="recipe 'paper' is ADDA as published and fixes gate_accuracy"):
        AdaptConfig(layer=15, recipe="paper", gate_accuracy=0.6)


def test_faithful_adda_moves_the_adapted_generator_at_every_step():
    source = _source()
    config = AdaptConfig(layer=source.generator.last_layer, recipe="paper", steps=6, batch_size=2, crop_size=32, log_every=2, device="cpu")
    result = adapt(source, _images(0.0), _images(1.5, seed=1), config, progress=False)
    assert result.g_updates == 6  # no gate, no warm-up: never silently the unadapted model
    changed = [not torch.equal(a, b) for a, b in zip(source.generator.parameters(), result.generator.parameters())]
    assert any(changed)
    assert result.checkpoint(source, config, "target").metadata["recipe"] == "paper"


def _anchor_drift(anchor: float) -> float:
    """How far G' moves away from G on source images at the cut after a strong, ungated adaptation."""
    source = _source()
    config = _config(layer=2, steps=12, source_anchor=anchor, lr=5e-2)
    result = adapt(source, _images(0.0), _images(3.0, seed=1), config, progress=False)
    x = torch.from_numpy(np.stack([image.input for image in _images(0.0, seed=5)]))
    with torch.no_grad():
        before = source.generator.forward_to(2, x).tensors()
        after = result.generator.forward_to(2, x).tensors()
    return float(np.mean([(after[k] - before[k]).abs().mean().item() for k in before]))


def test_source_anchor_keeps_the_adapted_generator_close_to_the_source_on_source_images():
    assert _anchor_drift(100.0) < 0.5 * _anchor_drift(0.0)


def test_input_correction_adapts_on_histogram_matched_targets_and_the_checkpoint_carries_it():
    from lmadda.data.correction import input_correction

    source = _source()
    config = _config(input_correction="histogram_matching")
    result = adapt(source, _images(0.0), _images(3.0, seed=1), config, progress=False)
    carried = input_correction(result.checkpoint(source, config, "target").metadata)
    image = _images(3.0, seed=2)[0].input
    np.testing.assert_array_equal(carried(image), result.input_correction(image))
    assert abs(float(carried(image).mean())) < 0.5  # the +3 offset is gone before G' sees the image
    with pytest.raises(ValueError, match="fixes input_correction"):
        AdaptConfig(layer=3, recipe="paper", input_correction="histogram_matching")
