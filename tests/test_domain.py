"""The per-image domain check (lmadda.domain), `lmadda diagnose`, and the reference every checkpoint carries."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch

from lmadda.checkpoint import GeneratorCheckpoint, add_domain_reference, load_checkpoint, save_checkpoint
from lmadda.cli import main
from lmadda.core.errors import LmaddaError
from lmadda.data.dataset import load_images
from lmadda.data.shifts import Shift
from lmadda.domain import DomainReference, build_reference, forward_with_features, predict_and_score, reference_layers
from lmadda.models.generator import GeneratorConfig, UNetGenerator, init_weights
from lmadda.models.tiling import predict_tiled


def _tiny_generator(seed: int = 0) -> UNetGenerator:
    torch.manual_seed(seed)
    generator = UNetGenerator(GeneratorConfig(ngf=4, depth=3, out_channels=1))
    init_weights(generator)
    return generator.eval()


def _images(count: int, size: int = 32, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.tanh(rng.normal(0, 0.5, (1, size, size))).astype(np.float32) for _ in range(count)]


@pytest.fixture(scope="module")
def domain_data(tmp_path_factory):
    """24 simulated fields of 128x128: four validation fields to set the thresholds on."""
    from lmadda.data.synth import SynthConfig, synthesize

    return synthesize(tmp_path_factory.mktemp("domain_synth"), SynthConfig(fields=24, size=128, seed=5))[0]


@pytest.fixture(scope="module")
def source(domain_data, tmp_path_factory):
    """A tiny phase-contrast model (depth 4) trained for 30 steps (seconds): enough to have features of its own domain."""
    from lmadda.training.source import SourceTrainConfig, train_source

    path = tmp_path_factory.mktemp("domain_source") / "source.pt"
    config = SourceTrainConfig(manifest=domain_data.source, markers=["dapi"], ngf=4, depth=4, ndf=4, crop_size=128, batch_size=4,
                               epochs=3, crops_per_epoch=40, gan_loss="none", device="cpu")
    train_source(config, path, progress=False)
    return load_checkpoint(path)


def test_features_come_from_the_prediction_forward_itself():
    generator = _tiny_generator()
    x = torch.from_numpy(np.stack(_images(2)))
    with torch.no_grad():
        output, features = forward_with_features(generator, x, reference_layers(generator))
        assert torch.equal(output, generator(x))
    reference = build_reference(generator, _images(4), _images(2, seed=1), domain="noise", crop_size=32, crops=8)
    assert features.shape == (2, reference.mean.numel())
    image = _images(1, size=48, seed=2)[0]
    prediction, _ = predict_and_score(generator, reference, image, tile=32, device="cpu")
    np.testing.assert_array_equal(prediction, predict_tiled(generator, image, tile=32, device="cpu"))


def test_reference_round_trips_in_the_checkpoint_and_loads_weights_only(tmp_path):
    generator = _tiny_generator()
    reference = build_reference(generator, _images(4), _images(2, seed=1), domain="noise", crop_size=32, crops=8)
    path = save_checkpoint(tmp_path / "model.pt", GeneratorCheckpoint(generator, ["dapi"], "noise", domain_reference=reference))
    assert isinstance(torch.load(path, weights_only=True)["domain_reference"]["mean"], torch.Tensor)
    loaded = load_checkpoint(path).domain_reference
    assert loaded.layers == reference.layers and loaded.channels == reference.channels
    assert torch.equal(loaded.mean, reference.mean) and torch.equal(loaded.spread, reference.spread)
    assert loaded.thresholds == pytest.approx(reference.thresholds) and loaded.levels == pytest.approx(reference.levels)
    image = _images(1, seed=5)[0]
    assert predict_and_score(generator, loaded, image, tile=32, device="cpu")[1] == predict_and_score(generator, reference, image, tile=32, device="cpu")[1]


def test_reference_is_well_under_a_megabyte_at_the_papers_size(tmp_path):
    generator = UNetGenerator(GeneratorConfig(ngf=64, depth=8))
    from lmadda.domain import PRINCIPAL_DIRECTIONS, layer_channels

    layers = reference_layers(generator)
    channels = [2 * layer_channels(generator, layer) for layer in layers]
    assert channels == [128, 256, 512, 1024, 1024, 1024, 1024, 1024, 2]  # the encoder, then the output (one marker)
    features = sum(channels)
    reference = DomainReference("paper", layers, channels, torch.zeros(features), torch.ones(features),
                                torch.zeros(PRINCIPAL_DIRECTIONS, features), [1.0] * 9, (2.0, 4.0), [1.0] * 32, [0.0] * 101, 256,
                                output_layer=generator.last_layer)
    torch.save(reference.to_dict(), tmp_path / "reference.pt")
    assert (tmp_path / "reference.pt").stat().st_size < 150_000


def test_a_damaged_reference_is_refused_with_the_fix(tmp_path):
    generator = _tiny_generator()
    reference = build_reference(generator, _images(3), None, domain="noise", crop_size=32, crops=4)
    payload = reference.to_dict()
    payload["mean"] = payload["mean"][:-1]
    with pytest.raises(LmaddaError, match="--add-reference"):
        DomainReference.from_dict(payload)


@pytest.mark.slow  # trains the tiny source model once per module (about 15 s on 2 cores)
def test_source_training_stores_a_reference_that_calls_its_own_test_images_in_domain(source, domain_data):
    reference = source.domain_reference
    assert reference is not None and reference.domain == "phase_contrast" and reference.notes["held_out"] == "held-out images"
    borderline, out = reference.thresholds
    assert np.median(reference.held_out_scores) < borderline < out
    assert reference.output_layer == source.generator.last_layer and reference.encoder_layers == list(range(4))
    test = load_images(domain_data, "phase_contrast", "test", percentiles=source.percentiles)
    verdicts = [predict_and_score(source.generator, reference, image.input, tile=128, device="cpu")[1].verdict for image in test]
    assert "out_of_domain" not in verdicts


@pytest.mark.slow  # trains the tiny source model once per module (about 15 s on 2 cores)
@pytest.mark.parametrize("setting, shift", [("phase_contrast", "overexposure:3"), ("bright_field", None)])
def test_strongly_shifted_images_score_out_of_domain(source, domain_data, setting, shift):
    images = load_images(domain_data, setting, "test", shift=Shift.parse(shift) if shift else None, percentiles=source.percentiles)
    for image in images:
        score = predict_and_score(source.generator, source.domain_reference, image.input, tile=128, device="cpu")[1]
        assert score.verdict == "out_of_domain", f"{setting} {shift}: score {score.score:.2f}, thresholds {score.thresholds}"


@pytest.mark.slow  # trains the tiny source model once per module (about 15 s on 2 cores)
def test_headers_carry_score_and_verdict(source, domain_data):
    image = load_images(domain_data, "phase_contrast", "test", percentiles=source.percentiles)[0]
    from lmadda_serve.domain_report import domain_headers

    score = predict_and_score(source.generator, source.domain_reference, image.input, tile=128, device="cpu")[1]
    headers = domain_headers(score)
    assert float(headers["X-Lmadda-Domain-Score"]) == pytest.approx(score.score, abs=1e-3)
    assert headers["X-Lmadda-Domain-Verdict"] == score.verdict
    assert domain_headers(None) == {"X-Lmadda-Domain-Score": "nan", "X-Lmadda-Domain-Verdict": "unknown"}


def _old_checkpoint(source, path):
    return save_checkpoint(path, GeneratorCheckpoint(source.generator, source.markers, source.setting, source.percentiles,
                                                     source.target_norm, metadata=dict(source.metadata)))


@pytest.mark.slow  # trains the tiny source model once per module (about 15 s on 2 cores)
def test_an_old_checkpoint_gives_the_clear_message_and_add_reference_fixes_it(source, domain_data, tmp_path, capsys):
    old = _old_checkpoint(source, tmp_path / "old.pt")
    assert main(["diagnose", str(old), str(domain_data.source), "--out", str(tmp_path / "d")]) == 2
    message = capsys.readouterr().err
    assert "no domain reference" in message and f"lmadda diagnose --add-reference {old} --manifest" in message

    image = tmp_path / "in.tif"
    tifffile.imwrite(image, (np.random.default_rng(0).random((64, 64)) * 4000).astype(np.uint16))
    assert main(["predict", str(old), str(image), str(tmp_path / "out.tif")]) == 0
    assert "--add-reference" in capsys.readouterr().err

    weights = {k: v.clone() for k, v in load_checkpoint(old).generator.state_dict().items()}
    assert main(["diagnose", "--add-reference", str(old), "--manifest", str(domain_data.source)]) == 0
    fixed = load_checkpoint(old)
    assert fixed.domain_reference is not None and fixed.domain_reference.domain == "phase_contrast"
    assert all(torch.equal(weights[k], v) for k, v in fixed.generator.state_dict().items())
    assert not list(tmp_path.glob(".*partial*"))


@pytest.mark.slow  # trains the tiny source model once per module (about 15 s on 2 cores)
def test_add_reference_never_leaves_a_broken_checkpoint(source, tmp_path, monkeypatch):
    path = _old_checkpoint(source, tmp_path / "model.pt")
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(LmaddaError, match="cannot write .*disk full"):  # one line for the user, not a traceback
        add_domain_reference(path, source.domain_reference)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # and no partial file beside it


@pytest.mark.slow  # trains the tiny source model once per module (about 15 s on 2 cores)
def test_predict_writes_the_score_into_the_metadata_and_warns_out_of_domain(source, domain_data, tmp_path, capsys):
    row = domain_data.inputs("phase_contrast", "test")[0]
    raw = tifffile.imread(domain_data.resolve(row)).astype(np.float32)
    shifted = tmp_path / "overexposed.tif"
    tifffile.imwrite(shifted, Shift.parse("overexposure:3").apply_input(raw[None], 4095.0)[0].astype(np.uint16))
    checkpoint = tmp_path / "source.pt"
    save_checkpoint(checkpoint, source)
    for name, image in (("in", domain_data.resolve(row)), ("shifted", shifted)):
        out = tmp_path / f"{name}-stain.tif"
        assert main(["predict", str(checkpoint), str(image), str(out), "--bit-depth", "12"]) == 0
        with tifffile.TiffFile(out) as tiff:
            domain = json.loads(tiff.pages[0].description)["lmadda_domain"]
        assert domain["verdict"] in ("in_domain", "borderline", "out_of_domain") and set(domain["layer_distances"]) == {"0", "1", "2", "3", "7"}
    assert domain["verdict"] == "out_of_domain" and "OUT OF DOMAIN" in capsys.readouterr().err


@pytest.mark.slow  # trains the tiny source model once per module (about 15 s on 2 cores)
def test_diagnose_runs_on_a_manifest_and_on_a_folder(source, domain_data, tmp_path, capsys):
    checkpoint = save_checkpoint(tmp_path / "source.pt", source)
    assert main(["diagnose", str(checkpoint), str(domain_data.source), "--split", "test", "--shift", "overexposure:3",
                 "--out", str(tmp_path / "manifest")]) == 0
    report = json.loads((tmp_path / "manifest" / "diagnosis.json").read_text())
    assert report["fraction_out_of_domain"] == 1.0 and report["recommendation"] != "no_change"
    assert (tmp_path / "manifest" / "profile.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "recommendation:" in printed and "edit" not in printed.lower()

    folder = tmp_path / "images"
    folder.mkdir()
    for row in domain_data.inputs("phase_contrast", "test"):
        (folder / domain_data.resolve(row).name).write_bytes(domain_data.resolve(row).read_bytes())
    assert main(["diagnose", str(checkpoint), str(folder), "--bit-depth", "12", "--out", str(tmp_path / "folder")]) == 0
    report = json.loads((tmp_path / "folder" / "diagnosis.json").read_text())
    assert report["images"] == len(list(folder.iterdir())) and len(report["profile"]) == 4


@pytest.mark.slow  # trains the tiny source model once per module (about 15 s on 2 cores)
def test_diagnose_refuses_a_missing_folder_before_any_work(source, tmp_path, capsys):
    checkpoint = save_checkpoint(tmp_path / "source.pt", source)
    assert main(["diagnose", str(checkpoint), str(tmp_path / "nowhere")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.slow  # trains the tiny source model once per module, then adapts it for two steps
def test_adaptation_stores_the_reference_of_its_target_domain(source, domain_data):
    from lmadda.training.adapt import AdaptConfig, adapt

    source_images = load_images(domain_data, "phase_contrast", "train", percentiles=source.percentiles)
    target_images = load_images(domain_data, "bright_field", "train", percentiles=source.percentiles)
    config = AdaptConfig(layer=[1], steps=2, batch_size=2, crop_size=128, device="cpu")
    adapted = adapt(source, source_images, target_images, config, progress=False).checkpoint(source, config, "bright_field")
    reference = adapted.domain_reference
    assert reference is not None and reference.domain == "bright_field" and reference.notes["held_out"] == "held-out images"
    test = load_images(domain_data, "bright_field", "test", percentiles=source.percentiles)
    scores = [predict_and_score(adapted.generator, reference, image.input, tile=128, device="cpu")[1] for image in test]
    assert all(score.verdict != "out_of_domain" for score in scores), [s.score for s in scores]


@pytest.mark.slow  # a real Ray Serve instance and an MLflow registry in a temporary folder
def test_the_endpoint_returns_the_domain_headers(ray_session, source, domain_data, tmp_path, free_port):
    import io
    import urllib.request

    from ray import serve

    from lmadda_serve.app import StainService
    from lmadda.sweep.promotion import register_checkpoint

    path = save_checkpoint(tmp_path / "generator.pt", source)
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    register_checkpoint(tracking_uri, path, "dapi", "phase_contrast", experiment="domain-test")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    token = "domain-test-token"  # auth is on by default, loopback included
    serve.run(StainService.options(ray_actor_options={"num_cpus": 0.5, "runtime_env": {"env_vars": {"LMADDA_SERVE_TOKEN": token}}})
              .bind(tracking_uri, cache_dir=str(tmp_path / "cache"), tile=128),
              name="lmadda-domain-test", route_prefix="/")
    try:
        row = domain_data.inputs("phase_contrast", "test")[0]
        raw = tifffile.imread(domain_data.resolve(row))
        overexposed = Shift.parse("overexposure:3").apply_input(raw[None].astype(np.float32), 4095.0)[0].astype(np.uint16)
        verdicts = {}
        for name, image in (("in", raw), ("overexposed", overexposed)):
            buffer = io.BytesIO()
            tifffile.imwrite(buffer, image)
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/stain?setting=phase_contrast&marker=dapi", data=buffer.getvalue(),
                                             headers={"Content-Type": "image/tiff", "Authorization": f"Bearer {token}"}, method="POST")
            with urllib.request.urlopen(request, timeout=120) as response:
                headers = {k.lower(): v for k, v in response.headers.items()}
            float(headers["x-lmadda-domain-score"])
            verdicts[name] = headers["x-lmadda-domain-verdict"]
        assert verdicts["overexposed"] == "out_of_domain" and verdicts["in"] != "out_of_domain"
    finally:
        serve.delete("lmadda-domain-test")
        serve.shutdown()


def test_a_label_free_choice_of_a_cheap_correction_carries_the_corrected_target_as_its_domain(source, domain_data):
    from lmadda.selection.selector import Choice
    from lmadda.training.auto import baseline_candidates, checkpoint_for

    source_images = load_images(domain_data, "phase_contrast", "train", ["dapi"], percentiles=source.percentiles)
    target_images = load_images(domain_data, "phase_contrast", "train", ["dapi"], shift=Shift.parse("overexposure:3"),
                                percentiles=source.percentiles)
    candidates = baseline_candidates(source, source_images, target_images)

    def chosen(name: str) -> GeneratorCheckpoint:
        choice = Choice(chosen=name, fell_back=name == "unadapted", reason="test", score="output_w1")
        return checkpoint_for(source, choice, candidates, "overexposed", target_images=target_images)

    assert chosen("unadapted").domain_reference is source.domain_reference  # nothing about the model changed
    corrected = chosen("histogram_matching")
    assert corrected.domain_reference.domain == "overexposed"
    # the corrected model's own domain check accepts a corrected overexposed image as in domain
    image = load_images(domain_data, "phase_contrast", "test", ["dapi"], shift=Shift.parse("overexposure:3"), percentiles=source.percentiles)[0]
    from lmadda.data.correction import input_correction

    correct = input_correction(corrected.metadata)  # what lmadda predict applies before the model
    _, score = predict_and_score(corrected.generator, corrected.domain_reference, correct(image.input), tile=128)
    assert score.verdict != "out_of_domain"


def test_the_demo_shows_the_verdict_of_an_in_domain_and_a_shifted_image(source, domain_data):
    from lmadda.demo import domain_lines
    from lmadda.evaluation.rows import TargetDomain

    lines = domain_lines(source, domain_data, [TargetDomain.parse("phase_contrast+overexposure:3")])
    assert lines[0].startswith("Is this image in domain?")
    assert lines[1].split()[0] == "phase_contrast" and lines[1].endswith("in_domain")
    assert lines[2].split()[0] == "phase_contrast+overexposure:3" and lines[2].endswith("out_of_domain")
    without = GeneratorCheckpoint(**{**source.__dict__, "domain_reference": None})
    assert "--add-reference" in domain_lines(without, domain_data, [])[0]


def test_the_endpoint_tally_counts_verdicts_and_averages_the_scored_images_only():
    from lmadda.domain import DomainScore
    from lmadda_serve.domain_report import DomainTally

    tally = DomainTally()
    for score, verdict in [(1.0, "in_domain"), (3.0, "out_of_domain"), (2.0, "borderline")]:
        tally.add(DomainScore(score=score, verdict=verdict, layer_distances={}, thresholds=(1.5, 2.5)))
    tally.add(None)  # a model without a reference
    summary = tally.as_dict()
    assert summary["images"] == 4 and summary["unknown"] == 1 and summary["out_of_domain"] == 1
    assert summary["mean_score"] == 2.0 and summary["out_of_domain_fraction"] == round(1 / 3, 4)


def test_a_version_1_reference_without_the_output_layer_still_scores_on_the_encoder_alone():
    from lmadda.domain import layer_channels

    generator = _tiny_generator()
    reference = build_reference(generator, _images(4), _images(3, seed=9), domain="phase_contrast", crop_size=32, crops=8)
    old = {k: v for k, v in reference.to_dict().items() if k != "output_layer"} | {"version": 1}
    encoder = reference.encoder_layers
    keep = torch.cat([torch.arange(sum(reference.channels[:i]), sum(reference.channels[:i + 1])) for i in range(len(encoder))])
    old.update(layers=encoder, channels=[2 * layer_channels(generator, layer) for layer in encoder], mean=old["mean"][keep],
               spread=old["spread"][keep], directions=old["directions"][:, keep], levels=old["levels"][:len(encoder)])
    loaded = DomainReference.from_dict(old)
    assert loaded.output_layer is None and loaded.encoder_layers == encoder
    image = _images(1, seed=5)[0]
    features = forward_with_features(generator, torch.from_numpy(image[None]), loaded.layers)[1]
    ratios = loaded.layer_distances(features) / np.asarray(loaded.levels)
    assert loaded.score(features).score == pytest.approx(float(np.mean(ratios)))
    # the current reference weighs the output layer as much as the whole encoder
    full = forward_with_features(generator, torch.from_numpy(image[None]), reference.layers)[1]
    by_layer = dict(zip(reference.layers, reference.layer_distances(full) / np.asarray(reference.levels)))
    expected = 0.5 * (np.mean([by_layer[l] for l in encoder]) + by_layer[reference.output_layer])
    assert reference.score(full).score == pytest.approx(float(expected))


# ---- zoom: another objective's scale, found by the domain check (lmadda.corrections.zoom) ----------------------------------------
@pytest.mark.parametrize("shift, low, high", [(None, 1.0, 1.0), ("scale:0.5", 1.68, 2.0), ("scale:2", 0.5, 0.59),
                                              ("overexposure:3", 1.0, 1.0)])
def test_the_zoom_estimate_undoes_a_rescaled_target_and_leaves_other_shifts_alone(source, domain_data, shift, low, high):
    from lmadda.corrections.zoom import estimate_zoom

    source_images = load_images(domain_data, "phase_contrast", "train", percentiles=source.percentiles)
    images = load_images(domain_data, "phase_contrast", "train", shift=Shift.parse(shift) if shift else None, percentiles=source.percentiles)
    estimate = estimate_zoom(source.generator, source_images, images)
    assert low <= estimate.factor <= high, estimate
    assert 1.0 in estimate.scores and estimate.reason


def test_a_zoom_that_lowers_the_score_too_little_is_not_applied(source, domain_data, monkeypatch):
    import lmadda.corrections.zoom as zoom

    images = load_images(domain_data, "phase_contrast", "train", percentiles=source.percentiles)
    by_width = {}

    def scored(generator, reference, image, tile):  # a score that prefers a larger image by 20 % at most
        width = image.shape[-1]
        by_width.setdefault(width, 1.0 - 0.2 * min(1.0, max(0.0, width / 128 - 1.0)))
        return None, type("Score", (), {"score": by_width[width]})()

    monkeypatch.setattr(zoom, "predict_and_score", scored)
    estimate = zoom.estimate_zoom(source.generator, images, images)
    assert estimate.factor == 1.0 and "only 20%" in estimate.reason, estimate
    assert zoom.estimate_zoom(source.generator, images, images, min_reduction=0.1).factor == 2.0


def test_the_zoom_is_a_cheap_candidate_whose_checkpoint_predict_and_the_endpoint_run(source, domain_data, tmp_path):
    from lmadda.domain import forward_scored
    from lmadda.inference import predict_file
    from lmadda.selection.selector import Choice
    from lmadda.training.auto import baseline_candidates, checkpoint_for

    source_images = load_images(domain_data, "phase_contrast", "train", ["dapi"], percentiles=source.percentiles)
    target_images = load_images(domain_data, "phase_contrast", "train", ["dapi"], shift=Shift.parse("scale:0.5"),
                                percentiles=source.percentiles)
    candidates = {c.name: c for c in baseline_candidates(source, source_images, target_images)}
    assert candidates["zoom"].generator.config.input_zoom > 1.5 and candidates["zoom"].input_transform is None
    unshifted = baseline_candidates(source, source_images, source_images)
    assert "zoom" not in [c.name for c in unshifted]  # a zoom of 1 is the unadapted model: no second candidate
    choice = Choice(chosen="zoom", fell_back=False, reason="test", score="output_w1")
    path = save_checkpoint(tmp_path / "zoom.pt", checkpoint_for(source, choice, list(candidates.values()), "zoomed",
                                                              target_images=target_images))
    loaded = load_checkpoint(path)
    assert loaded.config.input_zoom == candidates["zoom"].generator.config.input_zoom
    raw = tifffile.imread(domain_data.resolve(domain_data.inputs("phase_contrast", "test")[0]))
    small = Shift.parse("scale:0.5").apply_input(raw[None].astype(np.float32), 4095.0)[0].astype(np.uint16)
    tifffile.imwrite(tmp_path / "small.tif", small)
    predict_file(path, tmp_path / "small.tif", tmp_path / "stain.tif", tile=64, device="cpu")
    assert tifffile.imread(tmp_path / "stain.tif").shape == small.shape  # the stain at the image's own size
    stains, features = forward_scored(loaded, torch.zeros(2, 1, 64, 64))  # the endpoint's forward of a tile batch
    assert stains.shape == (2, 1, 64, 64) and features is not None and features.shape[0] == 2
