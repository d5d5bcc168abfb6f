import pytest
import torch

from ldm.checkpoints.diffusers_folder import vae_config_from_diffusers, vae_config_to_diffusers
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussian


@pytest.fixture
def pair(diffusers_vae):
    ours = AutoencoderKL(vae_config_from_diffusers(dict(diffusers_vae.config))).eval()
    ours.load_state_dict(diffusers_vae.state_dict(), strict=True)
    return ours, diffusers_vae


def test_encoder_posterior_equals_diffusers(pair):
    ours, theirs = pair
    image = torch.rand(2, 3, 24, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        expected = theirs.encode(image).latent_dist
        actual = ours.encode(image)
        torch.testing.assert_close(actual.mean, expected.mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(actual.logvar, expected.logvar, atol=1e-5, rtol=0)
        torch.testing.assert_close(actual.kl(), expected.kl(), atol=1e-4, rtol=1e-5)
        sample = actual.sample(torch.Generator().manual_seed(3))
        torch.testing.assert_close(sample, expected.sample(torch.Generator().manual_seed(3)), atol=1e-5, rtol=0)


def test_decoder_equals_diffusers(pair):
    ours, theirs = pair
    z = torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, atol=1e-5, rtol=0)


def test_kl_closed_form():
    # mean 1, logvar 0 on 2 elements: KL = 0.5 * (1 + 1 - 1 - 0) * 2 = 1.
    moments = torch.cat([torch.ones(1, 1, 1, 2), torch.zeros(1, 1, 1, 2)], dim=1)
    assert DiagonalGaussian(moments).kl().item() == pytest.approx(1.0)
    # standard normal posterior: KL = 0.
    assert DiagonalGaussian(torch.zeros(3, 8, 2, 2)).kl().abs().max().item() == 0.0


def test_latent_scaling_uses_config_factors():
    vae = AutoencoderKL(AutoencoderConfig(channels=(8,), norm_groups=4, scaling_factor=0.5, shift_factor=0.25))
    z = torch.randn(1, 4, 2, 2)
    torch.testing.assert_close(vae.scale_latents(z), (z - 0.25) * 0.5)
    torch.testing.assert_close(vae.unscale_latents(vae.scale_latents(z)), z)


def test_config_round_trips_through_diffusers_json(diffusers_vae):
    config = vae_config_from_diffusers(dict(diffusers_vae.config))
    assert config.downsampling_factor == 2
    assert vae_config_from_diffusers(vae_config_to_diffusers(config)) == config


def test_sd_vae_shaped_config_has_sd_parameter_count():
    with torch.device("meta"):
        vae = AutoencoderKL(AutoencoderConfig())
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # SD's published VAE size
