from dataclasses import replace

import numpy as np
import pytest
import torch

from lmadda.data.correction import HistogramMatcher
from lmadda.selection.selector import UNADAPTED, Candidate, Observation, Selector, decide
from test_adapt import _images, _source


def test_decide_takes_the_best_candidate_only_when_it_wins_on_most_crops_by_a_margin():
    base = np.full(8, 1.0)
    clear = decide({UNADAPTED: base, "lmadda:3": np.full(8, 0.5)}, "consensus")
    assert (clear.chosen, clear.fell_back) == ("lmadda:3", False)
    assert "beats the unadapted model on 100% of the target crops" in clear.reason
    lucky = np.array([0.1, 0.1, 2.0, 2.0, 2.0, 0.1, 0.1, 0.1])  # better on average, worse on 3 of 8 crops
    shaky = decide({UNADAPTED: base, "adabn": lucky}, "consensus")
    assert (shaky.chosen, shaky.fell_back) == (UNADAPTED, True) and "only 62% of the target crops" in shaky.reason
    tiny = decide({UNADAPTED: base, "adabn": base - 0.01}, "consensus")
    assert (tiny.chosen, tiny.fell_back) == (UNADAPTED, True) and "removes only 1% of the unadapted model's score" in tiny.reason
    # with the source's own level as the floor, the gain counts against the excess over it
    floor = np.full(8, 0.9)
    assert decide({UNADAPTED: base, "adabn": base - 0.05}, "feature_gap", floor=floor).chosen == "adabn"  # half the excess
    in_domain = decide({UNADAPTED: floor + 0.01 * np.sign(np.arange(8) - 3.5), "adabn": floor - 0.5}, "feature_gap", floor=floor)
    assert (in_domain.chosen, in_domain.fell_back) == (UNADAPTED, True) and "looks like the source domain" in in_domain.reason
    none = decide({UNADAPTED: base, "fda": base + 1}, "consensus")
    assert (none.chosen, none.fell_back) == (UNADAPTED, True)


def _damaged(generator, scale: float):
    damaged = type(generator)(generator.config)
    damaged.load_state_dict(generator.state_dict())
    with torch.no_grad():
        for parameter in damaged.layers[0].parameters():
            parameter.add_(scale * torch.randn_like(parameter))
    return damaged.eval()


def test_on_an_in_domain_target_the_selector_keeps_the_unadapted_model():
    source = _source()
    torch.manual_seed(1)
    source_images, target_images = _images(0.0, n=6), _images(0.0, n=6, seed=9)  # same distribution: nothing to adapt to
    candidates = [Candidate(UNADAPTED, source.generator), Candidate("histogram_matching", source.generator, HistogramMatcher(source_images)),
                  Candidate("lmadda:0", _damaged(source.generator, 0.5), family="lmadda"),
                  Candidate("lmadda:1", _damaged(source.generator, 0.8), family="lmadda")]
    for score in ("consensus", "output_w1", "feature_gap"):
        choice = Selector(source.generator, source_images, target_images, crop_size=32, crops=8, score=score).choose(candidates)
        assert choice.chosen == UNADAPTED and choice.fell_back, (score, choice.reason)
        assert set(choice.means) == {c.name for c in candidates}


def test_observations_survive_a_round_trip_and_give_the_same_choice(tmp_path):
    source = _source()
    source_images, target_images = _images(0.0), _images(1.5, seed=1)
    selector = Selector(source.generator, source_images, target_images, crop_size=32, crops=4)
    candidates = [Candidate(UNADAPTED, source.generator), Candidate("lmadda:1", _damaged(source.generator, 0.3), family="lmadda")]
    kept = {c.name: Observation.load(selector.observe(c).save(tmp_path / f"{c.name}.npz")) for c in candidates}
    assert kept["lmadda:1"].family == "lmadda"
    assert selector.choose(kept).means == pytest.approx(selector.choose(candidates).means, rel=1e-2)


def test_the_selector_refuses_candidates_without_the_unadapted_model():
    source = _source()
    selector = Selector(source.generator, _images(0.0), _images(1.5, seed=1), crop_size=32, crops=4)
    with pytest.raises(ValueError, match="'don't adapt' is always an answer"):
        selector.choose([Candidate("adabn", source.generator)])


def test_the_demo_prints_the_label_free_choice_beside_the_unadapted_model_and_the_best_cheap_baseline():
    from lmadda.study.report import choice_lines

    rows = [{"target": "t", "method": m, "pearson": p, "seed": 0, "chosen": c, "fell_back": f}
            for m, p, c, f in [("unadapted", 0.5, None, None), ("adabn", 0.6, None, None), ("histogram_matching", 0.7, None, None),
                               ("label_free", 0.7, "histogram_matching", False)]]
    assert choice_lines(rows) == ["t: label-free choice 0.700 [histogram_matching] | unadapted 0.500 | "
                                  "best cheap baseline histogram_matching 0.700"]


def test_a_guard_passes_over_a_source_looking_candidate_that_the_other_methods_disagree_with():
    base = np.full(8, 1.0)
    scores = {UNADAPTED: base, "lmadda:1": np.full(8, 0.2), "adabn": np.full(8, 0.4)}
    consensus = {UNADAPTED: np.full(8, 0.3), "lmadda:1": np.full(8, 0.6), "adabn": np.full(8, 0.1)}
    assert decide(scores, "feature_gap").chosen == "lmadda:1"
    guarded = decide(scores, "feature_gap", guard=consensus)
    assert (guarded.chosen, guarded.fell_back) == ("adabn", False)
    assert "passed over: lmadda:1 looks source-like but sits farther from the other methods' consensus" in guarded.reason
    consensus["adabn"] = np.full(8, 0.9)
    alone = decide(scores, "feature_gap", guard=consensus)
    assert (alone.chosen, alone.fell_back) == (UNADAPTED, True)


def test_a_zoom_candidate_is_scored_against_source_stains_seen_at_its_scale(tmp_path):
    from lmadda.models.generator import zoomed
    from lmadda.selection.criteria import wasserstein_1d
    from lmadda.corrections.zoom import resample

    source = _source()
    source_images, target_images = _images(0.0), _images(0.0, seed=1)
    selector = Selector(source.generator, source_images, target_images, crop_size=32, crops=4)
    kept = Observation.load(selector.observe(Candidate("zoom", zoomed(source.generator, 2.0))).save(tmp_path / "zoom.npz"))
    assert kept.zoom == 2.0  # kept on disk, so a resumed study scores it alike
    pool = np.stack([resample(stain, 0.5) for stain in selector.source_pool])  # a source stain at half the scale
    expected = [wasserstein_1d(p[0], pool[:, 0], quantiles=128) for p in kept.predicted]
    scores = selector.per_crop({"unadapted": selector.observe(Candidate(UNADAPTED, source.generator)), "zoom": kept})
    np.testing.assert_allclose(scores["output_w1"]["zoom"], expected, rtol=1e-5)


def test_geometry_first_a_zoom_at_the_source_level_is_chosen_before_a_lower_score():
    floor = np.full(8, 0.010)  # the source's own level
    crops = {UNADAPTED: np.full(8, 0.020), "zoom": np.full(8, 0.009), "histogram_matching+adabn:3": np.full(8, 0.006)}
    choice = decide(crops, "output_w1", floor=floor)
    assert choice.chosen == "zoom" and "geometry first" in choice.reason  # below the source's level, lower says nothing more
    above = {**crops, "zoom": np.full(8, 0.012)}  # zoomed stains that do not look like source stains: no precedence
    assert decide(above, "output_w1", floor=floor).chosen == "histogram_matching+adabn:3"
    worse = {**crops, "zoom": np.r_[np.full(5, 0.0002), np.full(3, 0.025)]}  # at the source level on average, but on 5 of 8 crops
    assert decide(worse, "output_w1", floor=floor).chosen == "histogram_matching+adabn:3"
    # with a robust default that also sits near the source's level (its augmentation covers some of the scale), the zoom
    # still goes first: it is checked against the model it resamples, and the score cannot rank the two down there
    robust = np.r_[np.full(3, 0.008), np.full(5, 0.0095)]  # "beats" the zoom on 3 of 8 crops
    with_robust = decide({**crops, "robust": robust}, "output_w1", floor=floor, default="robust")
    assert with_robust.chosen == "zoom" and "geometry first" in with_robust.reason
    # the robust default's own in-domain level is lower than the unadapted model's: the zoom (the unadapted model
    # resampled) is still checked against the unadapted model's level, not the robust model's
    robust_floor = np.full(8, 0.005)
    own_level = decide({**crops, "robust": robust}, "output_w1", floor=robust_floor, default="robust", unadapted_floor=floor)
    assert own_level.chosen == "zoom" and "geometry first" in own_level.reason
    assert decide({**crops, "robust": robust}, "output_w1", floor=robust_floor, default="robust").chosen != "zoom"


def test_an_admitted_robust_model_is_the_default_kept_unless_a_candidate_is_confidently_better_than_it():
    floor = np.full(8, 0.5)
    unadapted, robust = np.full(8, 1.0), np.full(8, 0.8)
    # histogram matching beats the unadapted model by a margin, but not the robust one: the robust model is kept
    kept = decide({UNADAPTED: unadapted, "robust": robust, "histogram_matching": np.full(8, 0.75)}, "output_w1", floor=floor,
                  default="robust")
    assert (kept.chosen, kept.fell_back) == ("robust", True) and "keep the robust model" in kept.reason
    assert decide({UNADAPTED: unadapted, "robust": robust, "histogram_matching": np.full(8, 0.75)}, "output_w1",
                  floor=floor).chosen == "histogram_matching"  # against the unadapted model it would have won
    better = decide({UNADAPTED: unadapted, "robust": robust, "robust+adabn": np.full(8, 0.6)}, "output_w1", floor=floor,
                    default="robust")
    assert (better.chosen, better.fell_back) == ("robust+adabn", False) and "of the robust model's excess" in better.reason
    with pytest.raises(ValueError, match="default model 'robust' is not among the candidates"):
        decide({UNADAPTED: unadapted}, "output_w1", default="robust")


def test_the_study_keeps_the_robust_model_by_default_only_where_it_was_admitted(tmp_path):
    """label_free_rows: an admitted robust model (its observation present) is the default; a refused one is unseen."""
    from lmadda.study.grid import ROBUST_VARIANTS, label_free_rows

    class Recorder:
        def choose(self, observations, default):
            self.seen, self.default = sorted(observations), default
            self.bases = {name: observation.base for name, observation in observations.items()}
            return decide({name: np.full(4, 1.0) for name in observations}, "consensus", default=default)

    for name in (UNADAPTED, "robust", "robust+adabn", "adabn"):
        Observation(name, np.zeros((4, 1, 8, 8)), np.zeros((4, 1, 8, 8)), np.zeros((4, 2))).save(tmp_path / f"{name}.npz")
    admitted = Recorder()
    label_free_rows([], "t", 0, tmp_path, admitted)
    assert admitted.default == "robust" and "robust" in admitted.seen
    # kept before observations named their base: the robust rows are still measured against the robust model's stains
    assert admitted.bases == {UNADAPTED: UNADAPTED, "robust": "robust", "robust+adabn": "robust", "adabn": UNADAPTED}
    refused = Recorder()
    label_free_rows([], "t", 0, tmp_path, refused, frozenset(ROBUST_VARIANTS))
    assert refused.default == UNADAPTED and refused.seen == ["adabn", UNADAPTED]


def test_a_candidate_built_from_the_robust_model_is_measured_against_the_robust_models_own_stains(tmp_path):
    """A robust model whose stains differ from the plain model's in domain too is not "shifted" on a target in domain."""
    from lmadda.selection.criteria import wasserstein_1d

    source = _source()
    robust = _damaged(source.generator, 0.8)  # another source model: its in-domain stains differ from the plain one's
    source_images, target_images = _images(0.0, n=6), _images(0.0, n=6, seed=9)  # the target is in domain
    selector = Selector(source.generator, source_images, target_images, crop_size=32, crops=8, references={"robust": robust})
    own = Observation.load(selector.observe(Candidate("robust", robust, base="robust")).save(tmp_path / "robust.npz"))
    assert own.base == "robust"  # kept on disk, so a resumed study scores it alike
    as_plain = replace(own, base=UNADAPTED)
    scores = selector.per_crop({UNADAPTED: selector.observe(Candidate(UNADAPTED, source.generator)), "robust": own,
                                "robust as if plain": as_plain})["output_w1"]
    expected = [wasserstein_1d(p[0], selector.reference("robust").pool[:, 0], quantiles=128) for p in own.predicted]
    np.testing.assert_allclose(scores["robust"], expected, rtol=1e-5)
    assert scores["robust"].mean() < scores["robust as if plain"].mean()  # its own stains are its in-domain look
    # the in-domain level a robust default is judged against is its own: the robust model on held-out source crops
    robust_floor = selector.reference("robust").floor["output_w1"]
    assert not np.allclose(robust_floor, selector.floor["output_w1"])
    choice = selector.choose({UNADAPTED: selector.observe(Candidate(UNADAPTED, source.generator)), "robust": own}, default="robust")
    assert choice == decide(selector.per_crop({UNADAPTED: selector.observe(Candidate(UNADAPTED, source.generator)), "robust": own})
                            ["output_w1"], "output_w1", floor=robust_floor, default="robust")
    with pytest.raises(ValueError, match="pass it in `references`"):
        Selector(source.generator, source_images, target_images, crop_size=32, crops=8).per_crop({"robust": own})


def test_an_observation_kept_before_bases_existed_is_measured_against_the_unadapted_model(tmp_path):
    path = tmp_path / "old.npz"
    with path.open("wb") as file:
        np.savez(file, family=np.array("adabn"), predicted=np.zeros((2, 1, 8, 8), np.float16),
                 mirrored=np.zeros((2, 1, 8, 8), np.float16), means=np.zeros((2, 3), np.float32), zoom=np.array(1.0))
    assert Observation.load(path).base == UNADAPTED


def test_choose_judges_a_robust_default_at_its_own_floor_and_the_zoom_at_the_unadapted_models(monkeypatch):
    import lmadda.selection.selector as selector_module

    seen = {}
    real = selector_module.decide

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(selector_module, "decide", spy)
    source = _source()
    robust = _damaged(source.generator, 0.3)
    selector = Selector(source.generator, _images(0.0), _images(1.5, seed=1), crop_size=32, crops=4, references={"robust": robust})
    selector.choose([Candidate(UNADAPTED, source.generator), Candidate("robust", robust, base="robust")], default="robust")
    np.testing.assert_array_equal(seen["floor"], selector.reference("robust").floor["output_w1"])
    np.testing.assert_array_equal(seen["unadapted_floor"], selector.floor["output_w1"])
