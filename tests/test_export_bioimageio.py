"""`lmadda export --format bioimageio`: a BioImage Model Zoo package that bioimageio.core accepts, that stains an image as
`lmadda predict` does, that carries an adapted model's lineage, and a clear one-line refusal of a request that cannot work."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lmadda.checkpoint import GeneratorCheckpoint, save_checkpoint
from lmadda.cli import main
from lmadda.core.errors import LmaddaError
from lmadda.data.io import read_image, write_tiff
from lmadda.data.normalise import NormalisationParams
from lmadda.models import GeneratorConfig, UNetGenerator
from lmadda.models.generator import init_weights

core = pytest.importorskip("bioimageio.core")

from lmadda.export.bioimageio import (INSTALL_HINT, export_bioimageio, lmadda_output, recorded_sample,  # noqa: E402
                                      require_bioimageio)

MARKERS = ["dapi", "cd29"]
SOURCE_METADATA = {"method": "source", "pixel_size_um": 0.65, "best_val_pearson": 0.81,
                   "train_config": {"setting": "bright_field", "markers": MARKERS, "depth": 3, "ngf": 4, "seed": 0}}


def _generator(seed: int = 0) -> UNetGenerator:
    """A tiny generator (depth 3, so inputs are multiples of 8) with BatchNorm statistics of its own, as a trained one has."""
    torch.manual_seed(seed)
    generator = UNetGenerator(GeneratorConfig(ngf=4, depth=3, out_channels=len(MARKERS)))
    init_weights(generator)
    generator.train()
    with torch.no_grad():
        for _ in range(3):
            generator(torch.randn(4, 1, 32, 32))
    return generator.eval()


def _source(folder: Path) -> Path:
    checkpoint = GeneratorCheckpoint(generator=_generator(), markers=MARKERS, setting="bright_field", metadata=dict(SOURCE_METADATA),
                                     target_norm=NormalisationParams(offset=(110.0, 240.0), scale=(2900.0, 1400.0)))
    return save_checkpoint(folder / "source.pt", checkpoint)


@pytest.fixture(scope="module")
def sample_image(request, tmp_path_factory) -> Path:
    """A real bright-field image of sephaCe (../shared/data/sephace) when it is there, else a simulated one."""
    try:
        sephace = request.getfixturevalue("sephace_dir")
        return sorted((sephace / "tif" / "Set_1").glob("fine_*.tif"))[0]
    except pytest.skip.Exception:
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:300, 0:320]
        cells = sum(np.exp(-((yy - rng.uniform(0, 300)) ** 2 + (xx - rng.uniform(0, 320)) ** 2) / 200.0) for _ in range(12))
        pixels = 800 + 2000 * cells + rng.normal(0, 30, size=cells.shape)
        return write_tiff(tmp_path_factory.mktemp("sample") / "simulated.tif", pixels, dtype="uint16")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, sample_image):
    """One package of a source model, written without the built-in test (the test below runs it explicitly)."""
    folder = tmp_path_factory.mktemp("export")
    checkpoint = _source(folder)
    result = export_bioimageio(checkpoint, folder / "model.zip", sample_image=sample_image, authors=["Ada Lovelace"], test=False)
    return checkpoint, result


def _rdf(package: Path) -> dict:
    with zipfile.ZipFile(package) as archive:
        return yaml.safe_load(archive.read("rdf.yaml"))


def _package_stain(package: Path, pixels: np.ndarray, weight_format: str) -> np.ndarray:
    """The package's output on (C, H, W) camera pixels, run by bioimageio.core with its pre- and postprocessing."""
    description = core.load_description(package)
    sample = core.Sample(members={"input": core.Tensor.from_numpy(pixels[None].astype(np.float32), dims=("batch", "channel", "y", "x"))},
                         stat={}, id="image")
    with core.create_prediction_pipeline(description, weight_format=weight_format, devices=["cpu"]) as pipeline:
        return pipeline.predict_sample_without_blocking(sample).members["stain"].data.values[0]


def test_the_package_passes_bioimageio_core_test_model_with_both_weights_formats(exported):
    _, result = exported
    summary = core.test_model(result.path, devices=["cpu"])
    failed = [f"{d.name}: {[e.msg for e in d.errors]}" for d in summary.details if d.status != "passed"]
    assert summary.status == "passed", failed
    names = " ".join(d.name for d in summary.details)
    assert "Reproduce test outputs from test inputs (torchscript)" in names
    assert "Reproduce test outputs from test inputs (pytorch_state_dict)" in names


def test_the_package_stains_a_new_image_as_lmadda_predict_does(exported, sample_image, tmp_path, capsys):
    checkpoint, result = exported
    top, left, side = result.crop
    raw = read_image(sample_image)
    width = raw.pixels.shape[2]
    assert (0, width - side) != (top, left)  # the top-right tile, not the package's test tile
    image = write_tiff(tmp_path / "tile.tif", raw.pixels[0, :side, width - side :], dtype=raw.dtype)
    assert main(["predict", str(checkpoint), str(image), str(tmp_path / "stain.tif"), "--tile", str(side), "--device", "cpu"]) == 0
    predicted = read_image(tmp_path / "stain.tif").pixels  # uint16 camera units, rounded and clipped
    from lmadda.checkpoint import load_checkpoint

    reference = lmadda_output(load_checkpoint(checkpoint), read_image(image).pixels)  # the same before rounding
    for weight_format in ("torchscript", "pytorch_state_dict"):
        stain = _package_stain(result.path, read_image(image).pixels, weight_format)
        assert stain.shape == predicted.shape == (len(MARKERS), side, side)
        np.testing.assert_allclose(stain, reference, rtol=1e-5, atol=1e-3 * float(reference.max()))
        assert np.abs(np.clip(np.rint(stain), 0, 65535) - predicted).max() <= 1  # a rounding boundary at most


def test_the_package_describes_axes_sizes_normalisation_citations_and_a_validation_section(exported):
    _, result = exported
    rdf = _rdf(result.path)
    assert rdf["format_version"].startswith("0.5")
    (source,), (stain,) = rdf["inputs"], rdf["outputs"]
    assert [a["type"] for a in source["axes"]] == ["batch", "channel", "space", "space"]
    assert [a.get("id") for a in source["axes"][2:]] == ["y", "x"]
    assert all(a["size"] == {"min": 8, "step": 8} for a in source["axes"][2:])  # 2**depth
    assert all(a["scale"] == 0.65 and a["unit"] == "micrometer" for a in source["axes"][2:])
    steps = {step["id"]: step["kwargs"] for step in source["preprocessing"]}
    assert (steps["scale_range"]["min_percentile"], steps["scale_range"]["max_percentile"]) == (1.0, 99.8)
    assert steps["scale_range"]["axes"] == ["y", "x"]
    assert (steps["scale_linear"]["gain"], steps["scale_linear"]["offset"]) == (2.0, -1.0)
    assert stain["axes"][1]["channel_names"] == MARKERS
    assert [step["id"] for step in stain["postprocessing"] if step["id"] != "ensure_dtype"] == ["scale_linear", "scale_linear", "clip"]
    assert set(rdf["weights"]) == {"torchscript", "pytorch_state_dict"}
    assert rdf["weights"]["pytorch_state_dict"]["architecture"]["import_from"] == "lmadda.models.generator"
    assert rdf["license"] == "MIT" and rdf["authors"] == [{"name": "Ada Lovelace"}]
    assert {c.get("doi") for c in rdf["cite"]} >= {"10.1109/CVPR.2017.632"}
    assert rdf.get("parent") is None and "adaptation" not in rdf["config"]["lmadda"]
    with zipfile.ZipFile(result.path) as archive:
        readme = archive.read("README.md").decode()
    assert "## Validation" in readme and "Isola" in readme and "MIT" in readme


def test_an_adapted_model_carries_its_parent_and_its_adaptation_in_the_package(tmp_path, sample_image):
    from lmadda.checkpoint import load_checkpoint
    from lmadda.data.dataset import LoadedImage
    from lmadda.training.adapt import AdaptConfig, adapt

    source = load_checkpoint(_source(tmp_path))
    norm = NormalisationParams((0.0,), (1.0,))
    rng = np.random.default_rng(0)
    images = [[LoadedImage(field=f"f{i}", input=(rng.normal(size=(1, 32, 32)) + offset).astype(np.float32), input_norm=norm)
               for i in range(4)] for offset in (0.0, 1.5)]
    config = AdaptConfig(layer=[2], steps=4, batch_size=2, crop_size=32, gate_accuracy=None, d_warmup_steps=0, device="cpu")
    adapted = adapt(source, *images, config, progress=False).checkpoint(source, config, "phase_contrast", pixel_size_um=0.65)
    adapted.metadata["label_free_choice"] = {"chosen": "lmadda:2", "fell_back": False, "reason": "confidently better than unadapted",
                                             "score": "consistency", "means": {"unadapted": 0.2, "lmadda:2": 0.1}, "win_fraction": 0.9}
    checkpoint = save_checkpoint(tmp_path / "adapted.pt", adapted)

    result = export_bioimageio(checkpoint, tmp_path / "adapted.zip", sample_image=sample_image, parent="affable-shark", test=False)

    assert result.adapted
    rdf = _rdf(result.path)
    assert rdf["parent"] == {"id": "affable-shark"}
    lineage = rdf["config"]["lmadda"]
    assert lineage["adaptation"]["matched_layer"] == 2
    assert lineage["adaptation"]["target_setting"] == "phase_contrast"
    assert lineage["adaptation"]["source_setting"] == lineage["parent"]["setting"] == "bright_field"
    assert lineage["adaptation"]["label_free_choice"]["chosen"] == "lmadda:2"
    assert lineage["parent"]["zoo_id"] == "affable-shark" and lineage["parent"]["best_val_pearson"] == 0.81
    assert lineage["checkpoint"]["file"] == "adapted.pt" and len(lineage["checkpoint"]["sha256"]) == 64
    assert "10.1109/CVPR.2017.316" in {c.get("doi") for c in rdf["cite"]}  # ADDA
    with zipfile.ZipFile(result.path) as archive:
        readme = archive.read("README.md").decode()
    assert "## Lineage" in readme and "matched layer 2" in readme and "affable-shark" in readme


def test_without_a_sample_image_the_first_test_image_of_the_training_manifest_is_used(tiny_synth):
    metadata = {**SOURCE_METADATA, "train_config": {"setting": "phase_contrast", "manifest": str(tiny_synth.source)}}
    checkpoint = GeneratorCheckpoint(generator=_generator(), markers=MARKERS, setting="phase_contrast", metadata=metadata)
    first = tiny_synth.resolve(tiny_synth.inputs("phase_contrast", "test")[0])
    assert recorded_sample(checkpoint) == first
    assert recorded_sample(GeneratorCheckpoint(generator=_generator(), markers=MARKERS, setting="phase_contrast+overexposure:2",
                                               metadata=metadata)) is None  # a shifted setting has no images as they are


@pytest.fixture(scope="module")
def request_files(tmp_path_factory, sample_image):
    """A folder with what the refusals below need; no test changes it (each checks that nothing in it changed)."""
    tmp_path = tmp_path_factory.mktemp("requests")
    checkpoint = _source(tmp_path)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    corrected = GeneratorCheckpoint(generator=_generator(), markers=MARKERS, setting="phase_contrast",
                                    metadata={**SOURCE_METADATA, "method": "histogram_matching",
                                              "input_correction": {"kind": "histogram_matching", "source_values": [0.0, 1.0]}})
    save_checkpoint(tmp_path / "corrected.pt", corrected)
    from lmadda.models.generator import zoomed

    save_checkpoint(tmp_path / "zoomed.pt", GeneratorCheckpoint(generator=zoomed(_generator(), 2.0), markers=MARKERS,
                                                                setting="phase_contrast", metadata={**SOURCE_METADATA, "method": "zoom"}))
    write_tiff(tmp_path / "small.tif", np.ones((6, 6)), dtype="uint16")
    (tmp_path / "existing.zip").write_bytes(b"an older package")
    return {"folder": tmp_path, "checkpoint": checkpoint, "sample": sample_image}


@pytest.mark.parametrize("arguments, message", [
    (["missing.pt", "--out", "m.zip", "--sample-image", "{sample}"], "checkpoint missing.pt not found"),
    (["{checkpoint}", "--out", "m.tar", "--sample-image", "{sample}"], "a BioImage Model Zoo package is a .zip file"),
    (["{checkpoint}", "--out", "existing.zip", "--sample-image", "{sample}"], "existing.zip already exists; pass --overwrite"),
    (["{checkpoint}", "--out", "m.zip", "--sample-image", "nowhere.tif"], "--sample-image nowhere.tif not found"),
    (["{checkpoint}", "--out", "m.zip", "--sample-image", "{sample}", "--parent", "Not A Zoo Id"], "is not a BioImage Model Zoo id"),
    (["{checkpoint}", "--out", "m.zip", "--sample-image", "{sample}", "--parent", "affable-shark"], "it has no parent"),
    (["{checkpoint}", "--out", "m.zip", "--sample-image", "{sample}", "--name", "a/b"], "--name 'a/b'"),
    (["{checkpoint}", "--out", "m.zip", "--sample-image", "small.tif"], "smaller than this model's input multiple 8"),
    (["{checkpoint}", "--out", "m.zip"], "no sample image for the package's test tensors: pass --sample-image PATH"),
    (["foreign.pt", "--out", "m.zip", "--sample-image", "{sample}"], "is not an lmadda generator checkpoint"),
    (["corrected.pt", "--out", "m.zip", "--sample-image", "{sample}"], "applies an input correction (histogram_matching)"),
    (["zoomed.pt", "--out", "m.zip", "--sample-image", "{sample}"], "resamples each input by 2 (the zoom correction)"),
])
def test_a_request_that_cannot_work_is_refused_in_one_line_and_writes_nothing(request_files, monkeypatch, capsys, arguments, message):
    folder = request_files["folder"]
    monkeypatch.chdir(folder)
    before = {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    argv = ["export"] + [a.format(checkpoint=request_files["checkpoint"], sample=request_files["sample"]) for a in arguments]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("lmadda: error:") and len(error.splitlines()) == 1 and message in error, error
    assert {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()} == before  # nothing new, nothing changed


def test_a_package_that_fails_its_test_leaves_the_older_package_and_no_partial_file(tmp_path, sample_image, monkeypatch):
    import lmadda.export.bioimageio as exporter

    checkpoint, out = _source(tmp_path), tmp_path / "model.zip"
    out.write_bytes(b"an older package")

    def fails(core, package):
        raise LmaddaError("the exported package does not reproduce lmadda's output under bioimageio.core")

    monkeypatch.setattr(exporter, "_test_package", fails)
    with pytest.raises(LmaddaError, match="does not reproduce"):
        export_bioimageio(checkpoint, out, sample_image=sample_image, overwrite=True)
    assert out.read_bytes() == b"an older package"
    assert not list(tmp_path.glob(".*partial*"))


def test_without_bioimageio_installed_the_error_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bioimageio.core", None)  # as if it were not installed
    with pytest.raises(LmaddaError, match=INSTALL_HINT.replace("[", r"\[").replace("]", r"\]")):
        require_bioimageio()
