import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from lmadda.core.errors import LmaddaError
from lmadda.data.dataset import PairedCrops, UnpairedCrops, load_images
from lmadda.models.tiling import tile_origins
from lmadda.data.io import write_tiff
from lmadda.data.manifest import Manifest, ManifestRow
from lmadda.data.shifts import Shift


def test_paired_crops_are_reproducible_in_range_and_change_with_epoch(tiny_synth):
    images = load_images(tiny_synth, "phase_contrast", "train", markers=["dapi", "cd29"])
    crops = PairedCrops(images, crop_size=32, length=8, seed=5)
    x, y = crops[3]
    assert x.shape == (1, 32, 32) and y.shape == (2, 32, 32)
    assert y.min() >= -1 and y.max() <= 1
    again = PairedCrops(images, crop_size=32, length=8, seed=5)
    assert torch.equal(again[3][0], x)
    crops.set_epoch(1)
    assert not torch.equal(crops[3][0], x)


def test_crops_work_with_a_distributed_sampler(tiny_synth):
    images = load_images(tiny_synth, "bright_field", "train")
    crops = UnpairedCrops(images, crop_size=32, length=10, seed=0)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(crops, num_replicas=2, rank=rank, shuffle=False)
        seen += [batch for batch in DataLoader(crops, batch_size=5, sampler=sampler)]
    assert sum(len(b) for b in seen) == 10


def test_tile_origins_cover_every_pixel_and_end_flush_with_the_edge():
    for length, tile, stride in [(64, 48, 32), (256, 256, 192), (300, 64, 48)]:
        origins = tile_origins(length, tile, stride)
        covered = np.zeros(length, bool)
        for origin in origins:
            covered[origin : origin + tile] = True
        assert covered.all() and origins[-1] == length - tile
    assert tile_origins(64, 48, 32) == [0, 16]


def test_a_shift_is_applied_before_normalisation(tiny_synth):
    plain = load_images(tiny_synth, "phase_contrast", "test")
    shifted = load_images(tiny_synth, "phase_contrast", "test", shift=Shift("overexposure", 3.0))
    assert not np.allclose(plain[0].input, shifted[0].input)
    scaled = load_images(tiny_synth, "phase_contrast", "test", markers=["dapi"], shift=Shift("scale", 2.0))
    assert scaled[0].input.shape[1:] == scaled[0].target.shape[1:] == (128, 128)


def test_mismatched_input_and_target_shapes_are_named(tmp_path):
    write_tiff(tmp_path / "in.tif", np.ones((32, 32)), dtype="uint16")
    write_tiff(tmp_path / "t.tif", np.ones((30, 32)), dtype="uint16")
    manifest = Manifest(
        [ManifestRow(field="a", split="train", role="input", setting="pc", path="in.tif"),
         ManifestRow(field="a", split="train", role="target", marker="dapi", path="t.tif")],
        root=tmp_path,
    )
    with pytest.raises(LmaddaError, match="is 32x32 but target .*t.tif is 30x32"):
        load_images(manifest, "pc", "train", markers=["dapi"])


def test_crop_larger_than_image_is_explained(tiny_synth):
    images = load_images(tiny_synth, "phase_contrast", "train")
    with pytest.raises(LmaddaError, match="smaller than the crop size 128"):
        UnpairedCrops(images, crop_size=128)
