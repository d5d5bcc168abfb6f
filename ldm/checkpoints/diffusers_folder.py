"""diffusers folders: `model_index.json` plus one sub-folder per component, configs as JSON.

Our UNet and VAE use diffusers' module names, so weights load as they are; what needs translating is the config
JSON, in both directions, including the legacy meaning of `attention_head_dim` (it counts heads, not widths).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ldm.checkpoints.files import find_weights_file, load_into, load_state_dict, save_state_dict
from ldm.errors import CheckpointError, UnknownArchitectureError
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.models.unet import UNet, UNetConfig

# diffusers UNet settings our UNet does not implement, with the only value we accept for each.
_UNET_FIXED = {
    "center_input_sample": False, "only_cross_attention": False, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "dual_cross_attention": False, "class_embed_type": None, "addition_embed_type": None, "num_class_embeds": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "attention_type": "default", "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
    "cross_attention_norm": None, "reverse_transformer_layers_per_block": None,
}
_VAE_FIXED = {"act_fn": "silu", "latents_mean": None, "latents_std": None}
_DOWN_BLOCKS = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP_BLOCKS = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(path, "file not found; a diffusers folder needs it") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(path, f"not valid JSON ({error})") from None


def write_json(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _per_level(value, levels: int) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * levels


def _check_fixed(config: dict, fixed: dict, path) -> None:
    unsupported = {k: config[k] for k, v in fixed.items() if k in config and config[k] != v}
    if unsupported:
        raise UnknownArchitectureError(path, f"unsupported diffusers settings {unsupported}")


# SD 1.x and 2.x-base latents (512 px): the size assumed for a UNet whose config does not say.
DEFAULT_SAMPLE_SIZE = 64


def unet_config_from_diffusers(config: dict, path=None) -> UNetConfig:
    """Translate a diffusers `unet/config.json` into a UNetConfig, refusing layouts we do not implement."""
    _check_fixed(config, _UNET_FIXED, path)
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    if any(t not in _DOWN_BLOCKS for t in down) or any(t not in _UP_BLOCKS for t in up):
        raise UnknownArchitectureError(path, f"unsupported block types {down} / {up}")
    attention_levels = tuple(_DOWN_BLOCKS[t] for t in down)
    if tuple(_UP_BLOCKS[t] for t in reversed(up)) != attention_levels:
        raise UnknownArchitectureError(path, f"up blocks {up} do not mirror down blocks {down}")
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid not in ("UNetMidBlock2DCrossAttn", None):
        raise UnknownArchitectureError(path, f"unsupported mid block {mid!r}")
    if isinstance(config.get("cross_attention_dim"), (list, tuple)):
        raise UnknownArchitectureError(path, "per-level cross_attention_dim is not supported")
    levels = len(down)
    # Legacy naming: diffusers' `attention_head_dim` is the number of heads unless num_attention_heads is set.
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    layers = config.get("layers_per_block", 2)
    if isinstance(layers, (list, tuple)):
        raise UnknownArchitectureError(path, "per-level layers_per_block is not supported")
    return UNetConfig(
        in_channels=config.get("in_channels", 4),
        out_channels=config.get("out_channels", 4),
        channels=tuple(config["block_out_channels"]),
        layers_per_level=layers,
        attention_levels=attention_levels,
        heads=_per_level(heads, levels),
        transformer_depth=_per_level(config.get("transformer_layers_per_block", 1), levels),
        context_dim=config.get("cross_attention_dim", 1280),
        linear_projection=bool(config.get("use_linear_projection", False)),
        mid_attention=mid is not None,
        norm_groups=config.get("norm_num_groups", 32),
        norm_eps=config.get("norm_eps", 1e-5),
        flip_sin_to_cos=config.get("flip_sin_to_cos", True),
        freq_shift=config.get("freq_shift", 0),
        upcast_attention=bool(config.get("upcast_attention", False)),
        sample_size=config.get("sample_size"),
    )


def unet_config_to_diffusers(config: UNetConfig) -> dict:
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": config.sample_size or DEFAULT_SAMPLE_SIZE,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.attention_levels],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.attention_levels)],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if config.mid_attention else None,
        "block_out_channels": list(config.channels),
        "layers_per_block": config.layers_per_level,
        "attention_head_dim": list(config.heads),  # diffusers' legacy name for the head count
        "transformer_layers_per_block": list(config.transformer_depth),
        "cross_attention_dim": config.context_dim,
        "use_linear_projection": config.linear_projection,
        "norm_num_groups": config.norm_groups,
        "norm_eps": config.norm_eps,
        "flip_sin_to_cos": config.flip_sin_to_cos,
        "freq_shift": config.freq_shift,
        "upcast_attention": config.upcast_attention,
        "act_fn": "silu",
    }


def vae_config_from_diffusers(config: dict, path=None) -> AutoencoderConfig:
    _check_fixed(config, _VAE_FIXED, path)
    blocks = list(config.get("down_block_types", [])) + list(config.get("up_block_types", []))
    if any(t not in ("DownEncoderBlock2D", "UpDecoderBlock2D") for t in blocks):
        raise UnknownArchitectureError(path, f"unsupported VAE block types {blocks}")
    if config.get("use_quant_conv", True) != config.get("use_post_quant_conv", True):
        raise UnknownArchitectureError(path, "use_quant_conv and use_post_quant_conv must agree")
    return AutoencoderConfig(
        in_channels=config.get("in_channels", 3),
        out_channels=config.get("out_channels", 3),
        latent_channels=config.get("latent_channels", 4),
        channels=tuple(config.get("block_out_channels", (64,))),
        layers_per_level=config.get("layers_per_block", 1),
        norm_groups=config.get("norm_num_groups", 32),
        mid_attention=config.get("mid_block_add_attention", True),
        use_quant_conv=config.get("use_quant_conv", True),
        scaling_factor=config.get("scaling_factor", 0.18215),
        shift_factor=config.get("shift_factor") or 0.0,
    )


def vae_config_to_diffusers(config: AutoencoderConfig, sample_size: int = 512) -> dict:
    levels = len(config.channels)
    return {
        "_class_name": "AutoencoderKL",
        "sample_size": sample_size,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "latent_channels": config.latent_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": list(config.channels),
        "layers_per_block": config.layers_per_level,
        "norm_num_groups": config.norm_groups,
        "mid_block_add_attention": config.mid_attention,
        "use_quant_conv": config.use_quant_conv,
        "use_post_quant_conv": config.use_quant_conv,
        "scaling_factor": config.scaling_factor,
        "shift_factor": config.shift_factor or None,
        "act_fn": "silu",
    }


def load_unet(folder: Path, variant: str | None = None) -> UNet:
    config = unet_config_from_diffusers(read_json(folder / "config.json"), folder / "config.json")
    return _load_weights(UNet(config), folder, variant)


def load_vae(folder: Path, variant: str | None = None) -> AutoencoderKL:
    config = vae_config_from_diffusers(read_json(folder / "config.json"), folder / "config.json")
    return _load_weights(AutoencoderKL(config), folder, variant)


def _load_weights(module: nn.Module, folder: Path, variant: str | None) -> nn.Module:
    weights = find_weights_file(folder, variant=variant)
    load_into(module, load_state_dict(weights), weights)
    return module.eval()


def save_component(module: nn.Module, config: dict, folder: Path, weights_name: str) -> None:
    """Write `config.json` and `<weights_name>.safetensors` for one component."""
    write_json(config, folder / "config.json")
    save_state_dict(module.state_dict(), folder / f"{weights_name}.safetensors")  # it copies strided tensors


def save_unet(unet: UNet, folder: Path) -> None:
    save_component(unet, unet_config_to_diffusers(unet.config), folder, "diffusion_pytorch_model")


def save_vae(vae: AutoencoderKL, folder: Path) -> None:
    save_component(vae, vae_config_to_diffusers(vae.config), folder, "diffusion_pytorch_model")


def model_index(folder: Path) -> dict:
    return read_json(folder / "model_index.json")


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "model_index.json").is_file()
