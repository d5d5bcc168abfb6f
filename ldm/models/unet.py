"""The UNet denoiser of latent diffusion, in one file.

Module names follow diffusers' UNet2DConditionModel, so a diffusers state dict loads as it is; the mapping to
the CompVis layout (`model.diffusion_model.*`) lives in `ldm.checkpoints.compvis`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm.models.attention import Attention


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4                                   # latent channels in (9 for SD inpainting, 8 for pix2pix)
    out_channels: int = 4                                  # channels predicted (eps, v or x0)
    channels: tuple[int, ...] = (320, 640, 1280, 1280)     # width of each resolution level, finest first
    layers_per_level: int = 2                              # ResBlocks per level going down; up has one more
    attention_levels: tuple[bool, ...] = (True, True, True, False)  # levels with spatial transformers
    heads: tuple[int, ...] = (8, 8, 8, 8)                  # attention heads per level (head dim = width / heads)
    transformer_depth: tuple[int, ...] = (1, 1, 1, 1)      # transformer blocks per attention layer, per level
    context_dim: int = 768                                 # width of the text tokens cross-attention reads
    linear_projection: bool = False                        # SD2: Linear proj_in/proj_out instead of 1x1 convs
    mid_attention: bool = True                             # a transformer between the two middle ResBlocks
    norm_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True                           # timestep embedding order [cos, sin] (SD) or [sin, cos]
    freq_shift: float = 0.0                                # timestep embedding frequency shift (0 for SD)
    upcast_attention: bool = False                         # SD2.1: attention scores in fp32 under fp16
    sample_size: int | None = None                         # latent size it was trained at: the default image size

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.channels[0]


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of the (possibly fractional) timesteps t (B,) -> (B, dim), as in the DDPM paper."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    frequencies = torch.exp(exponent / (half - freq_shift))
    angles = t.float()[:, None] * frequencies[None, :]  # (B, half)
    sin, cos = torch.sin(angles), torch.cos(angles)
    embedding = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class TimestepEmbedding(nn.Module):
    """MLP lifting the sinusoidal features to the width the ResBlocks consume."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(features)))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the timestep embedding added in between, plus a (1x1) skip."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int | None, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(time_dim, out_channels) if time_dim else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(time_emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class GEGLU(nn.Module):
    """Gated GELU: one projection to twice the width, half of it gating the other half."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner_dim * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # Indices 0 and 2 carry weights (1 is a dropout slot in the original); checkpoints name them net.0, net.2.
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text tokens, then a GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim=context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Flattens a feature map into tokens, runs transformer blocks over them, and adds the result back."""

    def __init__(self, channels: int, heads: int, depth: int, config: UNetConfig):
        super().__init__()
        self.linear_projection = config.linear_projection
        self.norm = nn.GroupNorm(config.norm_groups, channels, eps=1e-6)
        project = nn.Linear(channels, channels) if config.linear_projection else nn.Conv2d(channels, channels, 1)
        self.proj_in = project
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, heads, config.context_dim, config.upcast_attention) for _ in range(depth)
        )
        self.proj_out = nn.Linear(channels, channels) if config.linear_projection else nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        if not self.linear_projection:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)  # (B, H*W, C)
        if self.linear_projection:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear_projection:
            h = self.proj_out(h)
        h = h.transpose(1, 2).reshape(batch, channels, height, width)
        if not self.linear_projection:
            h = self.proj_out(h)
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # Upsampling to the skip connection's size (not a fixed 2x) admits odd latent sizes.
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class DownLevel(nn.Module):
    """One resolution level going down: (ResBlock, transformer) pairs, then an optional 2x downsampling."""

    def __init__(self, in_channels: int, out_channels: int, level: int, config: UNetConfig, downsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * config.layers_per_level
        self.resnets = nn.ModuleList(
            ResBlock(widths[i], out_channels, config.time_embed_dim, config.norm_groups, config.norm_eps)
            for i in range(config.layers_per_level)
        )
        self.attentions = _transformers(out_channels, level, config, config.layers_per_level)
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if downsample else None

    def forward(self, x, time_emb, context) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, time_emb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpLevel(nn.Module):
    """One resolution level going up: each ResBlock first concatenates a skip connection from the way down."""

    def __init__(self, skip_widths: list[int], in_channels: int, out_channels: int, level: int,
                 config: UNetConfig, upsample: bool):
        super().__init__()
        count = config.layers_per_level + 1
        inputs = [in_channels] + [out_channels] * (count - 1)
        self.resnets = nn.ModuleList(
            ResBlock(inputs[i] + skip_widths[i], out_channels, config.time_embed_dim, config.norm_groups,
                     config.norm_eps)
            for i in range(count)
        )
        self.attentions = _transformers(out_channels, level, config, count)
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def forward(self, x, skips: list[torch.Tensor], time_emb, context) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), time_emb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size=skips[-1].shape[-2:])  # the size of the next level's skips
        return x


class MidBlock(nn.Module):
    def __init__(self, channels: int, config: UNetConfig):
        super().__init__()
        block = lambda: ResBlock(channels, channels, config.time_embed_dim, config.norm_groups, config.norm_eps)
        self.resnets = nn.ModuleList([block(), block()])
        heads, depth = config.heads[-1], config.transformer_depth[-1]
        self.attentions = (
            nn.ModuleList([SpatialTransformer(channels, heads, depth, config)]) if config.mid_attention else None
        )

    def forward(self, x, time_emb, context) -> torch.Tensor:
        x = self.resnets[0](x, time_emb)
        if self.attentions is not None:
            x = self.attentions[0](x, context)
        return self.resnets[1](x, time_emb)


def _transformers(channels: int, level: int, config: UNetConfig, count: int) -> nn.ModuleList | None:
    if not config.attention_levels[level]:
        return None
    heads, depth = config.heads[level], config.transformer_depth[level]
    return nn.ModuleList(SpatialTransformer(channels, heads, depth, config) for _ in range(count))


class UNet(nn.Module):
    """Predicts the noise (or v, or x0) in a latent from the latent, the timestep and the text tokens."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        _validate(config)
        self.config = config
        widths = config.channels
        levels = len(widths)
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(widths[0], config.time_embed_dim)

        self.down_blocks = nn.ModuleList()
        skip_widths = [widths[0]]
        for level in range(levels):
            in_width = widths[max(level - 1, 0)]
            downsample = level < levels - 1
            self.down_blocks.append(DownLevel(in_width, widths[level], level, config, downsample))
            skip_widths += [widths[level]] * (config.layers_per_level + downsample)

        self.mid_block = MidBlock(widths[-1], config)

        self.up_blocks = nn.ModuleList()
        width = widths[-1]
        for level in reversed(range(levels)):
            level_skips = [skip_widths.pop() for _ in range(config.layers_per_level + 1)]
            upsample = level > 0
            self.up_blocks.append(UpLevel(level_skips, width, widths[level], level, config, upsample))
            width = widths[level]

        self.conv_norm_out = nn.GroupNorm(config.norm_groups, widths[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(widths[0], config.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor) -> torch.Tensor:
        """x (B, in_channels, h, w), t timesteps (B,) or a scalar, context text tokens (B, T, context_dim)."""
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        features = timestep_embedding(t, self.config.channels[0], self.config.flip_sin_to_cos, self.config.freq_shift)
        time_emb = self.time_embedding(features.to(x.dtype))
        context = context.to(x.dtype)

        x = self.conv_in(x)
        skips = [x]
        for level in self.down_blocks:
            x, level_skips = level(x, time_emb, context)
            skips += level_skips
        x = self.mid_block(x, time_emb, context)
        for level in self.up_blocks:
            x = level(x, skips, time_emb, context)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


def _validate(config: UNetConfig) -> None:
    levels = len(config.channels)
    for name in ("attention_levels", "heads", "transformer_depth"):
        if len(getattr(config, name)) != levels:
            raise ValueError(f"UNetConfig.{name} needs one entry per level ({levels}), got {getattr(config, name)}")
    for width in config.channels:
        if width % config.norm_groups:
            raise ValueError(f"UNet width {width} is not divisible by norm_groups={config.norm_groups}")
