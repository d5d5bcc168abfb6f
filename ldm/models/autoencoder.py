"""The KL-regularised autoencoder (VAE) that maps images to latents and back.

Module names follow diffusers' AutoencoderKL; the CompVis mapping (`first_stage_model.*`) lives in
`ldm.checkpoints.compvis`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm.models.attention import Attention
from ldm.models.unet import ResBlock, Upsample


@dataclass(frozen=True)
class AutoencoderConfig:
    in_channels: int = 3                                   # image channels
    out_channels: int = 3
    latent_channels: int = 4
    channels: tuple[int, ...] = (128, 256, 512, 512)       # width per level; len - 1 downsamplings
    layers_per_level: int = 2                              # ResBlocks per encoder level (decoder has one more)
    norm_groups: int = 32
    mid_attention: bool = True                             # self-attention in the middle blocks
    use_quant_conv: bool = True                            # 1x1 convs around the latent (absent in some VAEs)
    scaling_factor: float = 0.18215                        # latents are (z - shift) * scale for the UNet
    shift_factor: float = 0.0

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)


class DiagonalGaussian:
    """The encoder's posterior q(z | x): a Gaussian with diagonal covariance per latent element."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # keeps exp() finite for untrained or extreme encoders
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype,
                            device=generator.device if generator is not None else self.mean.device)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over latent elements, one value per image."""
        return 0.5 * (self.mean.pow(2) + self.std.pow(2) - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class SpatialSelfAttention(Attention):
    """Single-head self-attention over all pixels of a feature map, added back to its input."""

    def __init__(self, channels: int, groups: int):
        super().__init__(channels, heads=1, qkv_bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        out = super().forward(tokens).transpose(1, 2).reshape(batch, channels, height, width)
        return x + out


class Downsample(nn.Module):
    """Stride-2 conv with the original asymmetric padding (right and bottom only)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


def _resblocks(in_channels: int, out_channels: int, count: int, groups: int) -> nn.ModuleList:
    widths = [in_channels] + [out_channels] * count
    return nn.ModuleList(ResBlock(widths[i], out_channels, None, groups, 1e-6) for i in range(count))


class EncoderLevel(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, count: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = _resblocks(in_channels, out_channels, count, groups)
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class DecoderLevel(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, count: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = _resblocks(in_channels, out_channels, count, groups)
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is None:
            return x
        return self.upsamplers[0](x, size=(2 * x.shape[-2], 2 * x.shape[-1]))


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = _resblocks(channels, channels, 2, groups)
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)]) if attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        widths, groups = config.channels, config.norm_groups
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            EncoderLevel(widths[max(i - 1, 0)], widths[i], config.layers_per_level, groups, i < len(widths) - 1)
            for i in range(len(widths))
        )
        self.mid_block = MidBlock(widths[-1], groups, config.mid_attention)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down_blocks:
            x = level(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        widths, groups = config.channels[::-1], config.norm_groups
        self.conv_in = nn.Conv2d(config.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], groups, config.mid_attention)
        self.up_blocks = nn.ModuleList(
            DecoderLevel(widths[max(i - 1, 0)], widths[i], config.layers_per_level + 1, groups, i < len(widths) - 1)
            for i in range(len(widths))
        )
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(widths[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            x = level(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] <-> latent (B, latent_channels, H/f, W/f), f = config.downsampling_factor."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        for width in config.channels:
            if width % config.norm_groups:
                raise ValueError(f"autoencoder width {width} is not divisible by norm_groups={config.norm_groups}")
        self.config = config
        moments, latent = 2 * config.latent_channels, config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(moments, moments, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if config.use_quant_conv else None

    def encode(self, image: torch.Tensor) -> DiagonalGaussian:
        moments = self.encoder(image)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, image: torch.Tensor, generator: torch.Generator | None = None):
        """Reconstruction through a posterior sample, and the posterior itself (for the KL term)."""
        posterior = self.encode(image)
        return self.decode(posterior.sample(generator)), posterior

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latent -> the unit-variance latent the UNet works in."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.config.scaling_factor + self.config.shift_factor
