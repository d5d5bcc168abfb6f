import pytest
import torch

from ldm.checkpoints.diffusers_folder import unet_config_from_diffusers, unet_config_to_diffusers
from ldm.models.unet import UNet, UNetConfig, timestep_embedding


def ours_from(diffusers_unet) -> UNet:
    unet = UNet(unet_config_from_diffusers(dict(diffusers_unet.config))).eval()
    unet.load_state_dict(diffusers_unet.state_dict(), strict=True)
    return unet


def test_state_dict_keys_and_shapes_equal_diffusers(diffusers_unet):
    ours = UNet(unet_config_from_diffusers(dict(diffusers_unet.config))).state_dict()
    theirs = diffusers_unet.state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


@pytest.mark.parametrize("size", [(8, 8), (12, 20), (10, 6)])
def test_forward_equals_diffusers(diffusers_unet, size):
    ours = ours_from(diffusers_unet)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, *size, generator=generator)
    context = torch.randn(2, 7, diffusers_unet.config.cross_attention_dim, generator=generator)
    t = torch.tensor([3.0, 871.5])
    with torch.no_grad():
        expected = diffusers_unet(x, t, context).sample
        actual = ours(x, t, context)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_scalar_timestep_broadcasts(diffusers_unet):
    ours = ours_from(diffusers_unet)
    x = torch.randn(3, 4, 8, 8)
    context = torch.randn(3, 5, diffusers_unet.config.cross_attention_dim)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, 250, context), ours(x, torch.full((3,), 250.0), context))


def test_timestep_embedding_closed_form():
    # dim 4, no shift: frequencies 10000^(-i/2) for i = 0, 1 -> [cos t, cos t/100, sin t, sin t/100].
    t = torch.tensor([0.0, 1.0, 50.0])
    expected = torch.stack([t.cos(), (t / 100).cos(), t.sin(), (t / 100).sin()], dim=1)
    torch.testing.assert_close(timestep_embedding(t, 4, True, 0.0), expected)
    torch.testing.assert_close(timestep_embedding(t, 4, False, 0.0), expected[:, [2, 3, 0, 1]])


def test_config_round_trips_through_diffusers_json(diffusers_unet):
    config = unet_config_from_diffusers(dict(diffusers_unet.config))
    assert unet_config_from_diffusers(unet_config_to_diffusers(config)) == config


def test_sd15_shaped_config_builds_with_sd15_parameter_count():
    sd15 = {"block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "attention_head_dim": 8,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
    with torch.device("meta"):
        unet = UNet(unet_config_from_diffusers(sd15))
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # SD 1.5's published UNet size


def test_bad_configs_are_rejected_with_the_field_named():
    with pytest.raises(ValueError, match="heads"):
        UNet(UNetConfig(channels=(32, 64), attention_levels=(True, False), heads=(2,), transformer_depth=(1, 1),
                        norm_groups=8))
    with pytest.raises(ValueError, match="norm_groups"):
        UNet(UNetConfig(channels=(30, 64), attention_levels=(True, False), heads=(2, 2), transformer_depth=(1, 1),
                        norm_groups=8))
