"""The adaptation families beyond LM-ADDA: self-training, moment matching, layer-limited AdaBN, composites,
and the imaging-nuisance augmentation of the robust source model."""

import copy
import json

import numpy as np
import pytest
import torch

from lmadda.corrections.baselines import adabn, build_baseline, parse_baseline
from lmadda.checkpoint import GeneratorCheckpoint, load_checkpoint, save_checkpoint
from lmadda.core.errors import LmaddaError
from lmadda.data.augment import NuisanceAugmentation, apply_chain
from lmadda.data.correction import HistogramMatcher
from lmadda.data.dataset import LoadedImage, load_images
from lmadda.data.normalise import NormalisationParams
from lmadda.data.shifts import Shift
from lmadda.models import GeneratorConfig, UNetGenerator
from lmadda.models.generator import init_weights
from lmadda.training.adapt import AdaptConfig, adapt, moment_gap
from lmadda.training.self_training import SelfTrainConfig, SelfTrainer

NORM = NormalisationParams((0.0,), (1.0,))


def _source() -> GeneratorCheckpoint:
    torch.manual_seed(0)
    generator = UNetGenerator(GeneratorConfig(ngf=4, depth=4, out_channels=1))
    init_weights(generator)
    generator.train()
    with torch.no_grad():  # non-trivial running statistics, as a trained model has
        for _ in range(3):
            generator(torch.randn(4, 1, 32, 32))
    return GeneratorCheckpoint(generator=generator.eval(), markers=["dapi"], setting="source")


def _images(offset: float, n: int = 4, seed: int = 0, scale: float = 1.0) -> list[LoadedImage]:
    rng = np.random.default_rng(seed)
    return [LoadedImage(field=f"f{i}", input=(rng.normal(size=(1, 32, 32)) * scale + offset).astype(np.float32), input_norm=NORM)
            for i in range(n)]


def _layers(generator: UNetGenerator) -> list[dict]:
    return [{k: v.clone() for k, v in layer.state_dict().items()} for layer in generator.layers]


def _self_train(source: GeneratorCheckpoint, **options):
    config = SelfTrainConfig(**{"layer": 2, "steps": 6, "batch_size": 2, "crop_size": 32, "lr": 1e-2, "ema": 0.5, "log_every": 2,
                                "patience": 100, "device": "cpu", **options})
    trainer = SelfTrainer(source, _images(0.0), _images(1.5, seed=1), config)
    while not trainer.finished:
        trainer.step()
    return trainer, trainer.finish()


@pytest.mark.parametrize("layer", [1, 2, 5])
def test_self_training_updates_only_layers_up_to_l(layer):
    source = _source()
    before = _layers(source.generator)
    _, result = _self_train(source, layer=layer)
    after = _layers(result.generator)
    for index, (old, new) in enumerate(zip(before, after)):
        weights_same = all(torch.equal(old[k], new[k]) for k in old if "running" not in k and "num_batches" not in k)
        stats_same = all(torch.equal(old[k], new[k]) for k in old if "running" in k)
        assert stats_same, f"layer {index}: BatchNorm statistics changed (self-training keeps the source's)"
        if index <= layer:
            assert not weights_same, f"trainable layer {index} did not change"
        else:
            assert weights_same, f"frozen layer {index} changed"
    assert result.method == "self_training" and result.g_updates == 6


def test_l2_sp_bounds_the_drift_from_the_source_weights():
    free, _ = _self_train(_source(), l2_sp=0.0)
    held, _ = _self_train(_source(), l2_sp=50.0)
    assert float(held.drift().detach()) < 0.5 * float(free.drift().detach())
    assert float(free.drift().detach()) > 0


def test_self_training_stops_by_its_label_free_rule_before_the_step_budget():
    trainer, result = _self_train(_source(), steps=200, patience=1, min_delta=0.99, lr=1e-6)
    assert trainer.stopped and result.steps_done < 200
    assert all(np.isfinite(record["probe_disagreement"]) for record in result.history)


def test_self_training_refuses_several_layers():
    with pytest.raises(ValueError, match="one layer"):
        SelfTrainConfig(layer=[1, 3])


def test_moment_gap_is_zero_for_equal_batches_and_grows_with_the_shift():
    x = torch.randn(2, 8, 6, 6)
    assert float(moment_gap(x, x)) == pytest.approx(0.0, abs=1e-7)
    assert float(moment_gap(x, x + 0.5)) < float(moment_gap(x, x + 2.0))
    assert float(moment_gap(x, 3 * x)) > 0  # covariance alone differs


def test_moment_matching_trains_only_the_head_and_never_collapses_on_its_scale():
    source = _source()
    before = _layers(source.generator)
    config = AdaptConfig(layer=2, adversary="moments", steps=6, batch_size=2, crop_size=32, lr=1e-2, log_every=2, device="cpu",
                         saturation_collapses=True, collapse_g_loss=1e-9)
    result = adapt(source, _images(0.0), _images(3.0, seed=1, scale=4.0), config, progress=False)
    assert result.g_updates == 6 and not result.collapsed and not result.d_saturated
    after = _layers(result.generator)
    assert not all(torch.equal(before[1][k], after[1][k]) for k in before[1])
    assert all(torch.equal(before[3][k], after[3][k]) for k in before[3])
    assert result.checkpoint(source, config, "target").metadata["method"] == "moments"


def test_paper_recipe_refuses_moment_matching():
    with pytest.raises(ValueError, match="adversary"):
        AdaptConfig(layer=3, recipe="paper", adversary="moments")


@pytest.mark.parametrize("up_to", [1, 3, 5])
def test_layer_limited_adabn_changes_only_the_statistics_of_batchnorms_up_to_l(up_to):
    source = _source().generator
    adapted = adabn(source, _images(2.0, seed=1), up_to=up_to, device="cpu")
    for index, (old, new) in enumerate(zip(source.layers, adapted.layers)):
        old_state, new_state = old.state_dict(), new.state_dict()
        assert all(torch.equal(old_state[k], new_state[k]) for k in old_state if "running" not in k and "num_batches" not in k), \
            "weights must not change"
        stats = [k for k in old_state if k.endswith("running_mean")]
        changed = any(not torch.equal(old_state[k], new_state[k]) for k in stats)
        if stats:
            assert changed == (index <= up_to), f"layer {index}: statistics {'unchanged' if index <= up_to else 'changed'}"


def test_adabn_up_to_a_layer_without_batchnorm_is_refused():
    with pytest.raises(LmaddaError, match="no BatchNorm"):
        adabn(_source().generator, _images(2.0), up_to=0, device="cpu")


def test_composite_baseline_corrects_inputs_before_estimating_statistics():
    source = _source().generator
    generator, transform = build_baseline("histogram_matching+adabn:3", source, _images(0.0), _images(2.0, seed=1))
    assert isinstance(transform, HistogramMatcher)
    corrected = [LoadedImage(i.field, transform(i.input), NORM) for i in _images(2.0, seed=1)]
    expected = adabn(source, corrected, up_to=3, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(generator.state_dict().values(), expected.state_dict().values()))


@pytest.mark.parametrize("name, message", [("adabn:x", "adabn:<layer>"), ("fda:3", "only AdaBN"), ("fda+adabn", "unknown"),
                                           ("adabm", "unknown")])
def test_bad_baseline_names_say_what_is_known(name, message):
    with pytest.raises(LmaddaError, match=message):
        parse_baseline(name)


def test_saturation_augmentation_clips_at_the_sensor_maximum():
    pixels = np.linspace(0, 4095, 64 * 64, dtype=np.float32).reshape(1, 64, 64)
    shifted = Shift("overexposure", 3.0).apply_input(pixels, sensor_max=4095.0)
    assert shifted.max() == 4095.0
    assert np.mean(shifted == 4095.0) == pytest.approx(2 / 3, abs=0.01)  # everything above a third of full scale saturates
    np.testing.assert_allclose(shifted[pixels * 3 < 4095], (pixels * 3)[pixels * 3 < 4095])


def test_gamma_shift_keeps_the_range_and_bends_the_contrast():
    pixels = np.array([[[0.0, 1024.0, 4095.0]]], dtype=np.float32)
    out = Shift("gamma", 2.0).apply_input(pixels, sensor_max=4095.0)
    np.testing.assert_allclose(out[0, 0], [0.0, 4095.0 * (1024 / 4095) ** 2, 4095.0], rtol=1e-5)


def test_augmentation_draws_are_seeded_and_cover_only_their_families():
    augment = NuisanceAugmentation(copies=4, seed=1)
    assert augment.variants(0) == augment.variants(0) and augment.variants(0) != augment.variants(1)
    assert augment.variants(0)[0] == [] and all(chain for chain in augment.variants(0)[1:])
    assert augment.covers(Shift("overexposure", 3.0)) and not augment.covers(Shift("overexposure", 5.0))
    assert augment.covers(Shift("scale", 0.5)) and not augment.covers(None)
    assert not NuisanceAugmentation(overexposure=None).covers(Shift("overexposure", 2.0))


def test_augmentation_redraws_intensity_nuisances_that_leave_a_field_unrecognisable():
    # A 16-bit bright field a few thousand counts below saturation, as ColiCoords': most gains turn it white, and
    # noise or vignetting at a few per cent of full scale drowns its contrast.
    rng = np.random.default_rng(0)
    cells = (rng.random((1, 128, 128)) < 0.05).astype(np.float32)
    near_saturation = (64_500 - 1_500 * cells + rng.normal(0, 50, (1, 128, 128))).astype(np.float32)
    blind = NuisanceAugmentation(copies=8, scale=None, defocus=None, seed=3)  # the default: every draw kept
    augment = blind.model_copy(update={"min_similarity": 0.5})
    kept = augment.variants(0, near_saturation, 65_535.0)
    blind = blind.variants(0, near_saturation, 65_535.0)
    assert kept[0] == [] and len(kept) == len(blind) == 9

    def similarity(chain):
        copy = apply_chain(near_saturation, chain, 65_535.0, seed=1).ravel()
        return 0.0 if copy.std() == 0 else float(np.corrcoef(near_saturation.ravel(), copy)[0, 1])

    assert min(similarity(chain) for chain in blind[1:]) < 0.5  # without the rule, copies the model cannot read
    assert all(similarity(chain) >= 0.45 for chain in kept[1:])  # another noise draw than the check's: a small margin
    assert kept != blind
    # Mild nuisances on a mid-range 12-bit image leave every copy recognisable: the rule redraws nothing.
    mid_range = (1_000 + 2_000 * rng.random((1, 128, 128))).astype(np.float32)
    mild = NuisanceAugmentation(copies=6, overexposure=(1.0, 1.2), noise=(0.0, 0.01), gamma=(0.8, 1.25), illumination=(0.0, 0.1),
                                min_size=64)
    assert mild.model_copy(update={"min_similarity": 0.5}).variants(0, mid_range, 4_095.0) == mild.variants(0, mid_range, 4_095.0)


def test_a_refused_robust_model_gets_one_second_try_with_recognisable_copies_only(tmp_path):
    from lmadda.training.robust import RECOGNISABLE, has_second_try, second_try
    from lmadda.training.source import SourceTrainConfig

    config = SourceTrainConfig(manifest=tmp_path / "m.parquet", markers=["dapi"], augment={"copies": 2})
    again = second_try(config)
    assert again.augment.min_similarity == RECOGNISABLE and again.augment.copies == 2 and config.augment.min_similarity is None
    assert has_second_try(config) and not has_second_try(again) and not has_second_try(config.model_copy(update={"augment": None}))
    with pytest.raises(LmaddaError, match="no second try"):
        second_try(again)


@pytest.mark.parametrize("options, message", [({"gamma": (1.5, 0.7)}, "backwards"), ({"overexposure": (0.5, 2.0)}, "out of range"),
                                              ({name: None for name in ("overexposure", "gamma", "noise", "defocus", "scale",
                                                                         "illumination")}, "every nuisance is off")])
def test_bad_augmentation_configs_are_refused_with_the_rule(options, message):
    with pytest.raises(ValueError, match=message):
        NuisanceAugmentation(**options)


def test_augmented_loading_keeps_clean_copies_and_adds_shifted_ones(tiny_synth):
    from lmadda.data.manifest import Manifest

    manifest = Manifest.load(tiny_synth.source)
    clean = load_images(manifest, "phase_contrast", "train", ["dapi"])
    augment = NuisanceAugmentation(copies=2, scale=None, seed=0)
    augmented = load_images(manifest, "phase_contrast", "train", ["dapi"], augment=augment)
    assert len(augmented) == 3 * len(clean)
    for number, image in enumerate(clean):
        assert augmented[3 * number].field == image.field and np.array_equal(augmented[3 * number].input, image.input)
        assert augmented[3 * number + 1].field == f"{image.field}~aug1"
        assert np.array_equal(augmented[3 * number + 1].target, image.target)  # only zoom would move the target
        assert not np.array_equal(augmented[3 * number + 1].input, image.input)


def test_robust_source_records_its_augmentation_in_the_checkpoint(tiny_synth, tmp_path):
    from lmadda.demo import _check_reusable
    from lmadda.training.source import SourceTrainConfig, changed_options, train_source

    augment = {"copies": 1, "scale": None}
    config = SourceTrainConfig(manifest=tiny_synth.source, markers=["dapi"], ngf=4, depth=6, ndf=4, crop_size=64, batch_size=2,
                               epochs=1, crops_per_epoch=2, device="cpu", augment=augment)
    train_source(config, tmp_path / "robust.pt", progress=False)
    recorded = load_checkpoint(tmp_path / "robust.pt").metadata["train_config"]["augment"]
    assert NuisanceAugmentation(**recorded) == NuisanceAugmentation(**augment)
    # What a study or the demo checks before reusing the model: the options it was trained with, paths aside.
    assert changed_options(tmp_path / "robust.pt", config.model_copy(update={"manifest": tmp_path / "moved.parquet"})) == []
    other = config.model_copy(update={"augment": NuisanceAugmentation(copies=2, scale=None), "epochs": 2})
    assert changed_options(tmp_path / "robust.pt", other) == ["augment.copies: 1 -> 2", "epochs: 1 -> 2"]
    with pytest.raises(LmaddaError, match="augment.copies: 1 -> 2.*give the demo another --out"):
        _check_reusable(tmp_path / "robust.pt", other, tmp_path)
    plain = config.model_dump(mode="json")
    plain.pop("augment")
    legacy = load_checkpoint(tmp_path / "robust.pt")  # a model saved before `augment` existed: read as off
    legacy.metadata["train_config"] = plain
    save_checkpoint(tmp_path / "legacy.pt", legacy)
    assert changed_options(tmp_path / "legacy.pt", config.model_copy(update={"augment": None})) == []


def test_self_trained_model_is_a_checkpoint_that_predict_serves(tmp_path):
    source = _source()
    trainer, result = _self_train(source, input_correction="histogram_matching")
    path = save_checkpoint(tmp_path / "st.pt", result.checkpoint(source, trainer.config, "target"))
    loaded = load_checkpoint(path)
    assert loaded.metadata["method"] == "self_training" and loaded.metadata["input_correction"]["kind"] == "histogram_matching"
    with torch.no_grad():
        assert torch.equal(loaded.generator(torch.ones(1, 1, 32, 32)), result.generator(torch.ones(1, 1, 32, 32)))


def test_every_family_is_a_selector_candidate_and_a_checkpoint_that_stains(tmp_path):
    from lmadda.selection.selector import Choice
    from lmadda.stainer import VirtualStainer
    from lmadda.training.auto import adapt_and_choose, checkpoint_for

    source = _source()
    config = AdaptConfig(layer=[0], steps=2, batch_size=2, crop_size=32, log_every=1, device="cpu", gate_accuracy=None, d_warmup_steps=0)
    auto = adapt_and_choose(source, _images(0.0), _images(1.5, seed=1), config, "target", layers=[1, 7], progress=False,
                            log=lambda _: None)
    names = {candidate.name for candidate in auto.candidates}
    assert {"unadapted", "adabn", "histogram_matching", "histogram_matching+adabn", "adabn:3", "histogram_matching+adabn:3",
            "lmadda:1", "adda:7", "moments:3", "self_training:3", "histogram_matching+self_training:3"} <= names
    pixels = np.random.default_rng(0).integers(0, 4096, size=(1, 48, 40)).astype(np.uint16)
    for name in names:
        choice = Choice(name, name == "unadapted", "test", "output_w1")
        checkpoint = checkpoint_for(source, choice, auto.candidates, "target", auto.checkpoints.get(name))
        loaded = load_checkpoint(save_checkpoint(tmp_path / f"{name.replace(':', '_')}.pt", checkpoint))
        corrected = name.startswith("histogram_matching")
        assert ("input_correction" in loaded.metadata) == corrected, name
        stain = VirtualStainer(loaded, "cpu").stain(pixels, tile=32)
        assert stain.shape[-2:] == pixels.shape[-2:] and np.isfinite(stain).all(), name


def _broken_copy(checkpoint: GeneratorCheckpoint) -> GeneratorCheckpoint:
    """A robust model that unlearned the source: its last layer paints a constant."""
    generator = copy.deepcopy(checkpoint.generator)
    with torch.no_grad():
        for parameter in generator.layers[-1].parameters():
            parameter.zero_()
    return GeneratorCheckpoint(generator=generator, markers=checkpoint.markers, setting=checkpoint.setting,
                               percentiles=checkpoint.percentiles)


def test_robust_admission_takes_a_model_as_good_in_domain_and_refuses_one_that_forgot_the_source(tiny_synth, tiny_source):
    from lmadda.training.robust import admit_robust

    source = load_checkpoint(tiny_source)
    validation = load_images(tiny_synth, "phase_contrast", "val", source.markers, percentiles=source.percentiles)
    same = admit_robust(source.generator, copy.deepcopy(source.generator), validation, source.markers)
    assert same.admitted and same.robust_validation == pytest.approx(same.plain_validation)
    broken = admit_robust(source.generator, _broken_copy(source).generator, validation, source.markers)
    assert not broken.admitted and "refused" in broken.reason and "augment" in broken.reason
    assert broken.as_dict()["admitted"] is False


def test_a_refused_robust_model_is_measured_but_never_seen_by_the_selector(tiny_synth, tiny_source, tmp_path):
    from lmadda.evaluation.rows import TargetDomain
    from lmadda.study.config import SelectionSpec
    from lmadda.study.grid import ROBUST_VARIANTS, run_grid

    source = load_checkpoint(tiny_source)
    target = "phase_contrast+overexposure:3"
    options = dict(seed=0, source_setting="phase_contrast", out=tmp_path, baselines=("adabn",), progress=False, log=lambda *_: None,
                   selector_options=SelectionSpec(crops=4, crop_size=64).options())
    rows = run_grid(source, tiny_synth, [TargetDomain.parse(target)], [], {"device": "cpu"}, robust=_broken_copy(source),
                    robust_admitted=False, **options)
    assert set(ROBUST_VARIANTS) <= {r["method"] for r in rows if r["target"] == target}  # measured and reported
    observed = {p.stem for p in (tmp_path / "selection" / "phase_contrast+overexposure_3" / "seed0").glob("*.npz")}
    assert observed and not observed & set(ROBUST_VARIANTS)
    choice = json.loads((tmp_path / "selection" / "phase_contrast+overexposure_3" / "seed0" / "choice.json").read_text())
    assert choice["chosen"] not in ROBUST_VARIANTS


def test_robust_rows_an_earlier_run_left_are_no_candidates_when_no_robust_model_is_given(tiny_synth, tiny_source, tmp_path):
    """The selector measures robust rows against the robust model's own stains; a run without the model (a demo with
    robust_epochs 0 over an earlier run's folder) leaves them out instead of failing."""
    from lmadda.evaluation.rows import TargetDomain
    from lmadda.study.config import SelectionSpec
    from lmadda.study.grid import ROBUST_VARIANTS, run_grid

    source = load_checkpoint(tiny_source)
    domain = TargetDomain.parse("phase_contrast+overexposure:3")
    options = dict(seed=0, source_setting="phase_contrast", out=tmp_path, baselines=("adabn",), progress=False, log=lambda *_: None,
                   selector_options=SelectionSpec(crops=4, crop_size=64).options())
    run_grid(source, tiny_synth, [domain], [], {"device": "cpu"}, robust=copy.deepcopy(source), choose=False, **options)
    selection = tmp_path / "selection" / "phase_contrast+overexposure_3" / "seed0"
    assert set(ROBUST_VARIANTS) <= {p.stem for p in selection.glob("*.npz")}  # kept from the first run
    run_grid(source, tiny_synth, [domain], [], {"device": "cpu"}, **options)  # no robust model this time
    choice = json.loads((selection / "choice.json").read_text())
    assert choice["chosen"] not in ROBUST_VARIANTS and not set(choice["means"]) & set(ROBUST_VARIANTS)
