"""Swappable decoders: UNet-space latents (B, C, h, w) -> image (B, 3, H, W) in [-1, 1].

Every decoder takes the latents exactly as the sampler leaves them (scaled for the UNet) and owns whatever
unscaling its network needs, so the pipeline can swap a full VAE, a tiled VAE, a cheap linear preview or TAESD
without knowing their conventions. Outputs are not clamped; the pipeline's post-processing does that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ldm.checkpoints.files import load_into, load_state_dict
from ldm.models.autoencoder import AutoencoderKL


class Decoder(Protocol):
    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


def _check_latents(latents: torch.Tensor, channels: int) -> None:
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
        raise ValueError(f"latents must be a (batch, channels, height, width) tensor, got "
                         f"{getattr(latents, 'shape', type(latents).__name__)}; add a batch axis with latents[None]")
    if latents.shape[1] != channels:
        raise ValueError(f"latents have {latents.shape[1]} channels but this decoder expects {channels}; "
                         f"use a decoder built for the model that produced them")


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class VAEDecoder:
    """The full KL autoencoder: undo the UNet scaling, then decode."""

    def __init__(self, vae: AutoencoderKL):
        self.vae = vae

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        _check_latents(latents, self.latent_channels)
        return self.vae.decode(self.vae.unscale_latents(latents.to(_dtype_of(self.vae))))


def _tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile offsets covering [0, length): a regular stride, with the last tile flush against the end."""
    if length <= tile:
        return [0]
    return list(range(0, length - tile, stride)) + [length - tile]


def _edge_weights(size: int, ramp: int, fade_in: bool, fade_out: bool) -> torch.Tensor:
    """1 inside the tile, ramping linearly towards 0 over `ramp` pixels on sides shared with a neighbour (never
    exactly 0, so every pixel keeps a positive total weight). Image borders keep full weight: no other tile
    covers them."""
    centres = torch.arange(size) + 0.5
    weights = torch.ones(size)
    if ramp and fade_in:
        weights = torch.minimum(weights, centres / ramp)
    if ramp and fade_out:
        weights = torch.minimum(weights, centres.flip(0) / ramp)
    return weights


class TiledDecoder:
    """Decodes overlapping latent tiles one at a time and cross-fades them in the overlaps.

    Peak decoder memory is that of one `tile` x `tile` latent instead of the whole image. The result is not
    bit-identical to a full decode: a VAE's GroupNorm and mid-block attention see only their tile, so statistics
    (and attention context) differ per tile; the linear cross-fade over `overlap` latent pixels hides the seams
    this would cause. A latent no larger than one tile is decoded untiled, exactly.
    """

    def __init__(self, decoder: Decoder, tile: int = 64, overlap: int = 16):
        if not isinstance(tile, int) or tile <= 0:
            raise ValueError(f"tile={tile!r} must be a positive number of latent pixels, e.g. 64")
        if not isinstance(overlap, int) or not 0 <= overlap < tile:
            raise ValueError(f"overlap={overlap!r} must be an int in [0, tile={tile}), e.g. tile // 4")
        self.decoder, self.tile, self.overlap = decoder, tile, overlap

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        height, width = latents.shape[-2:]
        if height <= self.tile and width <= self.tile:
            return self.decoder.decode(latents)
        stride = self.tile - self.overlap
        image = weight_sum = None
        for top in _tile_starts(height, self.tile, stride):
            for left in _tile_starts(width, self.tile, stride):
                tile = latents[..., top:top + self.tile, left:left + self.tile]
                piece = self.decoder.decode(tile)
                factor = piece.shape[-1] // tile.shape[-1]
                if image is None:  # blended in fp32 so half-precision VAEs do not round the cross-fade
                    image = piece.new_zeros(*piece.shape[:2], height * factor, width * factor, dtype=torch.float32)
                    weight_sum = piece.new_zeros(height * factor, width * factor, dtype=torch.float32)
                weights = self._tile_weights((top, left), tile.shape[-2:], (height, width), factor).to(image.device)
                rows = slice(top * factor, (top + tile.shape[-2]) * factor)
                cols = slice(left * factor, (left + tile.shape[-1]) * factor)
                image[..., rows, cols] += piece * weights
                weight_sum[rows, cols] += weights
        return image / weight_sum

    def _tile_weights(self, starts, tile_size, latent_size, factor) -> torch.Tensor:
        """(tile_H * factor, tile_W * factor) blending weights for the tile at latent offset `starts`."""
        axes = [_edge_weights(size * factor, self.overlap * factor, fade_in=start > 0, fade_out=start + size < length)
                for start, size, length in zip(starts, tile_size, latent_size)]
        return axes[0][:, None] * axes[1][None, :]


class TiledVAEDecoder(TiledDecoder):
    """VAEDecoder in overlapping tiles of `tile` latent pixels (see TiledDecoder for the trade-off)."""

    def __init__(self, vae: AutoencoderKL, tile: int = 64, overlap: int = 16):
        super().__init__(VAEDecoder(vae), tile, overlap)


class LatentPreviewDecoder:
    """A per-pixel affine map latent -> RGB: a fast, approximate preview for live progress images.

    The output has the latent's resolution unless `scale_factor` > 1, which repeats each pixel (nearest) to
    reach image size. matrix is (C, 3), bias is (3,).
    """

    def __init__(self, matrix: torch.Tensor, bias: torch.Tensor, scale_factor: int = 1):
        matrix, bias = torch.as_tensor(matrix, dtype=torch.float32), torch.as_tensor(bias, dtype=torch.float32)
        if matrix.ndim != 2 or matrix.shape[1] != 3 or bias.shape != (3,):
            raise ValueError(f"matrix must be (latent_channels, 3) and bias (3,), got {tuple(matrix.shape)} "
                             f"and {tuple(bias.shape)}")
        if not isinstance(scale_factor, int) or scale_factor < 1:
            raise ValueError(f"scale_factor={scale_factor!r} must be an int >= 1 (1 keeps the latent resolution)")
        self.matrix, self.bias, self.scale_factor = matrix, bias, scale_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        _check_latents(latents, self.matrix.shape[0])
        matrix, bias = self.matrix.to(latents), self.bias.to(latents)
        rgb = torch.einsum("bchw,cr->brhw", latents, matrix) + bias[:, None, None]  # (B, 3, h, w)
        return F.interpolate(rgb, scale_factor=self.scale_factor, mode="nearest") if self.scale_factor > 1 else rgb

    @classmethod
    def fit(cls, decoder: Decoder | AutoencoderKL, latents: torch.Tensor, scale_factor: int = 1):
        """Least-squares fit to a real decoder: each latent pixel's features against the mean colour of the image
        patch it decodes to (the decode average-pooled down to latent resolution). `latents` should look like
        what the preview will see, e.g. a few sampled UNet-space latents."""
        if isinstance(decoder, AutoencoderKL):
            decoder = VAEDecoder(decoder)
        with torch.no_grad():
            image = decoder.decode(latents).double()
        factor = image.shape[-1] // latents.shape[-1]
        colours = F.avg_pool2d(image, factor).permute(0, 2, 3, 1).reshape(-1, 3)  # (N, 3)
        features = latents.double().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])  # (N, C)
        design = torch.cat([features, torch.ones(len(features), 1, dtype=features.dtype)], dim=1)
        if len(design) < design.shape[1]:
            raise ValueError(f"need at least {design.shape[1]} latent pixels to fit {latents.shape[1]} channels "
                             f"and a bias, got {len(design)}; pass a larger latents sample")
        solution = torch.linalg.lstsq(design, colours).solution  # (C + 1, 3)
        return cls(solution[:-1].float(), solution[-1].float(), scale_factor)


@dataclass(frozen=True)
class TinyDecoderConfig:
    latent_channels: int = 4                         # 16 for the SD3 / Flux variants of TAESD
    out_channels: int = 3
    width: int = 64                                  # channels of every level (TAESD keeps one width throughout)
    blocks_per_level: tuple[int, ...] = (3, 3, 3, 1)  # residual blocks per level; a 2x upsample between levels
    latent_clamp: float = 3.0                        # inputs are soft-clamped to +-this by a scaled tanh

    @property
    def upsampling_factor(self) -> int:
        return 2 ** (len(self.blocks_per_level) - 1)


class TinyBlock(nn.Module):
    """Three 3x3 convs with a residual connection; the ReLU comes after the sum."""

    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x) + x)


class TinyAutoencoderDecoder(nn.Module):
    """The TAESD decoder (Ollin Boer Bohan's tiny autoencoder): plain convs, no normalization, no attention.

    Input: UNet-space latents as they are, with no unscaling; TAESD was trained on SD's scaled latents (which
    is why diffusers' AutoencoderTiny has scaling_factor 1.0). Output: image in [-1, 1], config.upsampling_factor
    times larger. `layers` is indexed like diffusers' DecoderTiny.layers; `load_tiny_decoder` reads weights in
    diffusers' layout or the original taesd_decoder.pth one.
    """

    def __init__(self, config: TinyDecoderConfig = TinyDecoderConfig()):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = [nn.Conv2d(config.latent_channels, config.width, 3, padding=1), nn.ReLU()]
        last = len(config.blocks_per_level) - 1
        for level, count in enumerate(config.blocks_per_level):
            layers += [TinyBlock(config.width) for _ in range(count)]
            if level < last:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                           nn.Conv2d(config.width, config.width, 3, padding=1, bias=False)]
            else:
                layers.append(nn.Conv2d(config.width, config.out_channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        clamp = self.config.latent_clamp
        image = self.layers(torch.tanh(latents / clamp) * clamp)  # trained to output [0, 1]
        return image * 2 - 1

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        _check_latents(latents, self.config.latent_channels)
        return self(latents.to(_dtype_of(self)))


def tiny_decoder_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TAESD decoder weights keyed for TinyAutoencoderDecoder, from either published layout:
    - diffusers' AutoencoderTiny (`decoder.layers.N.*`; the encoder half is dropped);
    - the original `taesd_decoder.pth` (`N.*`), whose Sequential starts with the clamp, so index N is our N - 1.
    """
    prefix = "decoder.layers."
    if any(key.startswith(prefix) for key in state_dict):
        return {"layers." + key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    if state_dict and all(key.split(".")[0].isdigit() for key in state_dict):
        renamed = {}
        for key, value in state_dict.items():
            index, _, rest = key.partition(".")
            renamed[f"layers.{int(index) - 1}.{rest}"] = value
        return renamed
    raise ValueError("these are not TAESD decoder weights: expected diffusers AutoencoderTiny keys ('decoder.layers.*') "
                     "or the original taesd_decoder.pth layout ('1.weight', '3.conv.0.weight', ...)")


def load_tiny_decoder(path, config: TinyDecoderConfig = TinyDecoderConfig()) -> TinyAutoencoderDecoder:
    """A TAESD decoder from a weights file in either layout (safetensors, or a pickle read with weights_only)."""
    decoder = TinyAutoencoderDecoder(config)
    load_into(decoder, tiny_decoder_state_dict(load_state_dict(path)), path)
    return decoder.eval()
