import pytest
import torch

from lmadda.core.errors import LmaddaError
from lmadda.models import FeatureDiscriminator, GeneratorConfig, PatchDiscriminator, UNetGenerator
from lmadda.models.generator import init_weights


def _generator(depth: int, ngf: int = 4, out_channels: int = 2) -> UNetGenerator:
    torch.manual_seed(0)
    generator = UNetGenerator(GeneratorConfig(ngf=ngf, depth=depth, out_channels=out_channels))
    init_weights(generator)
    return generator.eval()


@pytest.mark.parametrize("depth, size", [(8, 256), (4, 32)])
def test_forward_from_forward_to_is_forward_at_every_layer(depth, size):
    generator = _generator(depth)
    x = torch.randn(2, 1, size, size)
    with torch.no_grad():
        expected = generator(x)
        for layer in range(generator.num_layers):
            assert torch.equal(generator.forward_from(layer, generator.forward_to(layer, x)), expected), layer


def test_sixteen_layers_with_the_paper_shapes():
    generator = _generator(8, ngf=8)
    assert generator.num_layers == 16 and generator.last_layer == 15
    x = torch.randn(1, 1, 256, 256)
    with torch.no_grad():
        shapes = [tuple(generator.forward_to(l, x).activation.shape[1:]) for l in range(16)]
    assert shapes[0] == (8, 128, 128) and shapes[7] == (64, 1, 1) and shapes[8] == (64, 2, 2)
    assert shapes[14] == (8, 128, 128) and shapes[15] == (2, 256, 256)


def test_cut_state_carries_exactly_the_pending_skips():
    generator = _generator(4)
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert sorted(generator.forward_to(0, x).skips) == []
        assert sorted(generator.forward_to(2, x).skips) == [0, 1]
        assert sorted(generator.forward_to(3, x).skips) == [0, 1, 2]  # innermost: all skips pending
        assert sorted(generator.forward_to(4, x).skips) == [0, 1, 2]
        assert sorted(generator.forward_to(6, x).skips) == [0]
        assert sorted(generator.forward_to(7, x).skips) == []


def test_record_returns_earlier_layer_outputs():
    generator = _generator(4)
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        state = generator.forward_to(5, x, record=(1, 4))
        assert torch.equal(state.recorded[1], generator.forward_to(1, x).activation)
        assert torch.equal(state.recorded[4], generator.forward_to(4, x).activation)


def test_pix2pix_structure_dropout_and_tanh():
    generator = _generator(8, ngf=8)
    dropouts = [i for i, layer in enumerate(generator.layers) if any(isinstance(m, torch.nn.Dropout) for m in layer)]
    assert dropouts == [9, 10, 11]
    assert isinstance(generator.layers[15][-1], torch.nn.Tanh)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in generator.layers[0])
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in generator.layers[7])


def test_bad_layer_and_input_size_are_explained():
    generator = _generator(4)
    with pytest.raises(LmaddaError, match="layer 8 does not exist: this generator has layers 0..7"):
        generator.forward_to(8, torch.randn(1, 1, 32, 32))
    with pytest.raises(LmaddaError, match="not a multiple of 16"):
        generator.check_input(torch.randn(1, 1, 30, 32))


@pytest.mark.parametrize("channels, spatial, kind", [(64, 128, "conv"), (64, 8, "conv"), (256, 4, "mlp"), (256, 1, "mlp")])
def test_feature_discriminator_follows_the_layer_shape(channels, spatial, kind):
    discriminator = FeatureDiscriminator(channels, spatial, width=8)
    assert discriminator.kind.startswith(kind)
    logits = discriminator(torch.randn(2, channels, spatial, spatial))
    assert logits.shape[0] == 2 and logits.shape[1] == 1


def test_patch_discriminator_scores_patches():
    logits = PatchDiscriminator(in_channels=3, ndf=8)(torch.randn(1, 3, 256, 256))
    assert logits.shape == (1, 1, 30, 30)  # 70x70 receptive fields on a 256 image


@pytest.mark.parametrize("zoom", [2.0, 0.71, 1.41])
def test_a_zoomed_generator_resamples_in_and_back_and_every_cut_agrees(zoom):
    from pydantic import ValidationError

    from lmadda.models.generator import zoomed

    torch.manual_seed(0)
    plain = UNetGenerator(GeneratorConfig(ngf=4, depth=4)).eval()
    scaled = zoomed(plain, zoom).eval()
    x = torch.randn(2, 1, 48, 32)
    out = scaled(x)
    assert out.shape == (2, 1, 48, 32)  # the stain comes back at the input's size
    for layer in range(scaled.num_layers):
        torch.testing.assert_close(scaled.forward_from(layer, scaled.forward_to(layer, x)), out)
    # the same weights, applied to the resampled image: the plain model on the bilinear zoom, resampled back
    big = torch.nn.functional.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
    if zoom == 2.0:
        expected = torch.nn.functional.interpolate(plain(big), size=(48, 32), mode="bilinear", align_corners=False, antialias=True)
        torch.testing.assert_close(out, expected)
    torch.testing.assert_close(zoomed(plain, 1.0)(x), plain(x))  # a zoom of 1 changes nothing
    with pytest.raises(ValidationError):
        zoomed(plain, 8.0)
