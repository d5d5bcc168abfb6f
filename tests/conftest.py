"""Tiny components built in code (random weights), shared by the parity tests."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Replace every parameter with N(0, std): default inits leave zeros (e.g. conv_out) that hide mistakes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return module.eval()


# Tiny diffusers UNet configs shaped like SD1 (conv projections, one head count) and SD2 (linear projections,
# per-level heads, upcast attention), plus the matching settings of our UNetConfig.
TINY_UNETS = {
    "sd1": dict(
        block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=16, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2, sample_size=8,
    ),
    "sd2": dict(
        block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=24, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4, 4), use_linear_projection=True, upcast_attention=True, sample_size=8,
        transformer_layers_per_block=(1, 2, 1),
    ),
}

TINY_VAE = dict(
    block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, layers_per_block=1,
)


@pytest.fixture(params=sorted(TINY_UNETS))
def diffusers_unet(request):
    from diffusers import UNet2DConditionModel

    return randomize(UNet2DConditionModel(**TINY_UNETS[request.param]))


@pytest.fixture
def diffusers_vae():
    from diffusers import AutoencoderKL

    return randomize(AutoencoderKL(**TINY_VAE))
