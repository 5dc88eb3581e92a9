import numpy as np
import pytest
import torch

from lmadda.checkpoint import GeneratorCheckpoint, save_checkpoint
from lmadda.core.errors import LmaddaError
from lmadda.data.io import read_image, write_tiff
from lmadda.data.normalise import NormalisationParams
from lmadda.inference import predict_file
from lmadda.models import GeneratorConfig, UNetGenerator
from lmadda.models.generator import init_weights
from lmadda.models.tiling import feather_window, predict_tiled


def _shallow_generator() -> UNetGenerator:
    # depth 3: a receptive field of a few tens of pixels, so tiles with enough overlap agree exactly
    torch.manual_seed(0)
    generator = UNetGenerator(GeneratorConfig(ngf=4, depth=3, out_channels=2))
    init_weights(generator)
    return generator.eval()


def test_tiled_prediction_equals_whole_image_away_from_borders():
    generator = _shallow_generator()
    image = np.random.default_rng(0).normal(size=(1, 160, 224)).astype(np.float32)
    with torch.no_grad():
        whole = generator(torch.from_numpy(image)[None])[0].numpy()
    tiled = predict_tiled(generator, image, tile=64, overlap=0.5, batch_size=3, device="cpu")
    assert tiled.shape == whole.shape
    margin = 16
    np.testing.assert_allclose(tiled[:, margin:-margin, margin:-margin], whole[:, margin:-margin, margin:-margin], atol=2e-3)


def test_tiled_prediction_has_no_seams():
    generator = _shallow_generator()
    image = np.random.default_rng(1).normal(size=(1, 192, 192)).astype(np.float32)
    tiled = predict_tiled(generator, image, tile=64, overlap=0.25, device="cpu")
    steps = np.abs(np.diff(tiled, axis=2)).mean(axis=(0, 1))  # mean jump between neighbouring columns
    tile_edges = [c - 1 for c in range(48, 192, 48)]
    assert steps[tile_edges].max() < 1.5 * np.median(steps)


def test_small_and_odd_sized_images_are_padded_and_cropped_back():
    generator = _shallow_generator()
    out = predict_tiled(generator, np.zeros((1, 37, 50), np.float32), tile=64, device="cpu")
    assert out.shape == (2, 37, 50) and np.isfinite(out).all()


def test_feather_window_is_one_inside_and_small_at_edges():
    window = feather_window(64, 16)
    assert window[32, 32] == 1.0 and window[0, 0] < 0.01


def test_predict_file_writes_markers_in_camera_units_as_uint16(tmp_path):
    checkpoint = GeneratorCheckpoint(generator=_shallow_generator(), markers=["dapi", "cd29"], setting="phase_contrast",
                                     target_norm=NormalisationParams((500.0, 600.0), (20000.0, 8000.0)))
    model = save_checkpoint(tmp_path / "g.pt", checkpoint)
    write_tiff(tmp_path / "in.tif", np.random.default_rng(0).integers(0, 4095, size=(300, 200)), dtype="uint16")
    out = predict_file(model, tmp_path / "in.tif", tmp_path / "out.tif", tile=64)
    prediction = read_image(out)
    assert prediction.pixels.shape == (2, 300, 200) and prediction.dtype == "uint16"
    assert prediction.pixels[0].mean() > 100  # mapped back to the DAPI range, not left in 0..1


def test_wrong_channels_and_bad_tiling_options_are_explained(tmp_path):
    generator = _shallow_generator()
    with pytest.raises(LmaddaError, match="expects \\(1, H, W\\)"):
        predict_tiled(generator, np.zeros((3, 64, 64), np.float32))
    with pytest.raises(LmaddaError, match="multiple of 8"):
        predict_tiled(generator, np.zeros((1, 64, 64), np.float32), tile=60)
    with pytest.raises(LmaddaError, match="overlap 1.5"):
        predict_tiled(generator, np.zeros((1, 64, 64), np.float32), tile=64, overlap=1.5)


def test_the_tiling_names_that_moved_say_where_they_are_now():
    import lmadda.inference
    from lmadda.models.tiling import predict_tiled  # noqa: F401 (the new place)

    with pytest.raises(ImportError, match="moved to lmadda.models.tiling: from lmadda.models.tiling import predict_tiled"):
        from lmadda.inference import predict_tiled  # noqa: F401,F811
    with pytest.raises(AttributeError):
        lmadda.inference.no_such_name
