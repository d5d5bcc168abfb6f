import pytest
import torch

from ldm.decoders import (
    LatentPreviewDecoder, TiledDecoder, TiledVAEDecoder, TinyAutoencoderDecoder, TinyDecoderConfig, VAEDecoder,
    load_tiny_decoder,
    tiny_decoder_state_dict,
)
from ldm.checkpoints.files import save_state_dict
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL

from conftest import randomize


def _latents(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def vae():
    config = AutoencoderConfig(channels=(32, 64), norm_groups=8, layers_per_level=1, scaling_factor=0.5,
                               shift_factor=0.1)
    return randomize(AutoencoderKL(config), seed=1)


@torch.no_grad()
def test_vae_decoder_unscales_then_decodes(vae):
    latents = _latents(2, 4, 6, 10)
    expected = vae.decode(latents / 0.5 + 0.1)
    torch.testing.assert_close(VAEDecoder(vae).decode(latents), expected, atol=0, rtol=0)


def test_decoders_reject_wrong_latents(vae):
    with pytest.raises(ValueError, match="channels"):
        VAEDecoder(vae).decode(_latents(1, 3, 8, 8))
    with pytest.raises(ValueError, match="batch"):
        VAEDecoder(vae).decode(_latents(4, 8, 8))
    with pytest.raises(ValueError, match="overlap"):
        TiledVAEDecoder(vae, tile=16, overlap=16)


@torch.no_grad()
def test_latent_within_one_tile_is_decoded_untiled(vae):
    latents = _latents(1, 4, 12, 16)
    assert torch.equal(TiledVAEDecoder(vae, tile=16, overlap=4).decode(latents), VAEDecoder(vae).decode(latents))


@torch.no_grad()
def test_tiling_blends_to_the_exact_result_for_a_per_pixel_decoder():
    # A decoder with no spatial context has no tile effects, so the cross-fade must reproduce it exactly:
    # this checks tile placement (odd sizes, last tile flush with the edge) and that the weights sum to one.
    preview = LatentPreviewDecoder(_latents(4, 3, seed=1), _latents(3, seed=2), scale_factor=2)
    latents = _latents(2, 4, 23, 37)
    tiled = TiledDecoder(preview, tile=10, overlap=3).decode(latents)
    torch.testing.assert_close(tiled, preview.decode(latents), atol=1e-6, rtol=0)


@torch.no_grad()
def test_tiled_vae_decode_is_close_to_the_full_decode(vae):
    latents = _latents(2, 4, 24, 40)
    full = VAEDecoder(vae).decode(latents)
    tiled = TiledVAEDecoder(vae, tile=16, overlap=4).decode(latents)
    # Tiles start at latent rows (0, 8) and columns (0, 12, 24): the top-left 8 x 12 latent pixels (16 x 24 image
    # pixels) come from the first tile alone, so there the result is exactly that tile's own decode...
    first_tile = VAEDecoder(vae).decode(latents[..., :16, :16])
    torch.testing.assert_close(tiled[..., :16, :24], first_tile[..., :16, :24], atol=0, rtol=0)
    # ...which differs from the full decode only because GroupNorm and mid-block attention see the tile, not the
    # image. Measured on random weights (output std ~0.2): interior <= 0.024, overall <= 0.07 over 4 seeds, so the
    # bounds below are ~2x and ~1.5x that, a few percent of the [-1, 1] range.
    assert (tiled[..., :16, :24] - full[..., :16, :24]).abs().max() < 0.05
    assert (tiled - full).abs().max() < 0.1
    # The cross-fade is what removes the seams: butted tiles (no overlap) are several times further off (~0.28).
    butted = TiledVAEDecoder(vae, tile=16, overlap=0).decode(latents)
    assert (tiled - full).abs().max() * 3 < (butted - full).abs().max()


def test_preview_fit_recovers_a_linear_decoder_exactly():
    matrix, bias = _latents(4, 3, seed=3), _latents(3, seed=4)
    linear_vae = LatentPreviewDecoder(matrix, bias, scale_factor=8)  # a decoder that IS affine per pixel
    preview = LatentPreviewDecoder.fit(linear_vae, _latents(2, 4, 5, 6))
    torch.testing.assert_close(preview.matrix, matrix, atol=1e-5, rtol=0)
    torch.testing.assert_close(preview.bias, bias, atol=1e-5, rtol=0)
    latents = _latents(1, 4, 7, 9, seed=5)
    assert preview.decode(latents).shape == (1, 3, 7, 9)  # latent resolution by default


@torch.no_grad()
def test_preview_fit_to_a_vae_is_the_least_squares_solution(vae):
    latents = _latents(3, 4, 8, 8)
    preview = LatentPreviewDecoder.fit(vae, latents)
    # Normal equations: the residual against the pooled decode is orthogonal to every feature and to the bias.
    target = torch.nn.functional.avg_pool2d(VAEDecoder(vae).decode(latents), 2)
    residual = (target - preview.decode(latents)).permute(0, 2, 3, 1).reshape(-1, 3).double()
    features = torch.cat([latents.permute(0, 2, 3, 1).reshape(-1, 4), torch.ones(192, 1)], dim=1).double()
    assert (features.T @ residual).abs().max() < 1e-4
    assert residual.abs().mean() > 1e-3  # a real VAE is not affine: the check above is not trivially zero


def test_preview_rejects_bad_shapes():
    with pytest.raises(ValueError, match="matrix"):
        LatentPreviewDecoder(torch.zeros(4, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="at least"):
        LatentPreviewDecoder.fit(LatentPreviewDecoder(torch.zeros(4, 3), torch.zeros(3)), _latents(1, 4, 1, 2))


@pytest.mark.parametrize("latent_channels", [4, 16])
@torch.no_grad()
def test_tiny_decoder_equals_diffusers_autoencoder_tiny(latent_channels):
    from diffusers import AutoencoderTiny

    theirs = randomize(AutoencoderTiny(
        latent_channels=latent_channels, encoder_block_out_channels=(16, 16, 16), num_encoder_blocks=(1, 1, 1),
        decoder_block_out_channels=(16, 16, 16), num_decoder_blocks=(2, 1, 1)), std=0.2)
    ours = TinyAutoencoderDecoder(TinyDecoderConfig(latent_channels, width=16, blocks_per_level=(2, 1, 1))).eval()
    ours.load_state_dict(tiny_decoder_state_dict(theirs.state_dict()), strict=True)
    latents = _latents(2, latent_channels, 6, 5) * 3  # large enough to exercise the tanh clamp
    expected = theirs.decode(latents / theirs.config.scaling_factor).sample  # what diffusers' pipelines do
    torch.testing.assert_close(ours.decode(latents), expected, atol=1e-5, rtol=0)
    assert expected.shape == (2, 3, 24, 20) and expected.std() > 0.05  # 4x upsampled, not a collapsed output


@torch.no_grad()
def test_tiny_decoder_loads_the_original_taesd_layout(tmp_path):
    """The original taesd.py Decoder is one Sequential whose index 0 is the clamp: conv weights sit at 1, 3, ..."""
    config = TinyDecoderConfig(width=8, blocks_per_level=(1, 1))
    reference = randomize(TinyAutoencoderDecoder(config), std=0.2)
    original = {f"{int(key.split('.')[1]) + 1}.{key.split('.', 2)[2]}": value
                for key, value in reference.state_dict().items()}
    assert {"1.weight", "3.conv.0.weight", "5.weight"} <= original.keys()
    save_state_dict(original, tmp_path / "taesd_decoder.pth")
    loaded = load_tiny_decoder(tmp_path / "taesd_decoder.pth", config)
    latents = _latents(1, 4, 3, 3)
    torch.testing.assert_close(loaded.decode(latents), reference.decode(latents), atol=0, rtol=0)


def test_tiny_decoder_state_dict_names_the_expected_layouts():
    with pytest.raises(ValueError, match="taesd_decoder.pth"):
        tiny_decoder_state_dict({"encoder.layers.0.weight": torch.zeros(1)})
