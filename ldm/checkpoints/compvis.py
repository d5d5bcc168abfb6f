"""CompVis / Stability single-file checkpoints: key names, config inference and CompVis YAML configs.

A single-file checkpoint holds a whole Stable Diffusion model under three prefixes:

    model.diffusion_model.*              UNet  (input_blocks / middle_block / output_blocks, time_embed, out)
    first_stage_model.*                  VAE   (encoder.down.N.block.M, mid.attn_1, quant_conv, ...)
    cond_stage_model.transformer.*       SD1 text encoder: a transformers CLIPTextModel ("clip")
    cond_stage_model.model.*             SD2 text encoder: an open_clip text tower ("open_clip")

Our UNet and VAE use diffusers' module names, so every renaming between the two layouts lives in this module,
written once as a table of (CompVis name, our name) module pairs generated from the model config and read in
either direction. The text encoders keep their library's own names (transformers or open_clip); only the prefix
changes, plus a separate open_clip <-> transformers conversion for exports to diffusers folders.

What the weights cannot tell (attention heads, prediction type, noise schedule, latent scale) comes from a
CompVis YAML when there is one, else from Stable Diffusion's own conventions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Container, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ldm.errors import CheckpointError, StateDictMismatchError, UnknownArchitectureError
from ldm.models.autoencoder import AutoencoderConfig
from ldm.models.unet import UNetConfig

StateDict = dict[str, torch.Tensor]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."
TEXT_PREFIXES = {
    "clip": "cond_stage_model.transformer.",    # followed by `text_model.` in every SD1 release
    "open_clip": "cond_stage_model.model.",
}
# Tensors stored under a text prefix that are not weights of the text model we build: a buffer older transformers
# saved, and the CLIP contrastive temperature that open_clip keeps beside the text tower.
_TEXT_NON_WEIGHTS = {"clip": {"embeddings.position_ids"}, "open_clip": {"logit_scale"}}
_CLIP_WRAPPER = "text_model."


# --------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class TextEncoderSpec:
    kind: str                  # "clip": transformers CLIPTextModel (SD1); "open_clip": open_clip text tower (SD2)
    config: dict[str, Any]     # CLIPTextConfig kwargs, or OpenCLIPTextConfig's (ldm.models.text_encoders) fields
    clip_skip: int = 0         # final layers skipped (diffusers' meaning); SD2 reads the penultimate layer: 1


@dataclass(frozen=True)
class NoiseSchedule:
    beta_schedule: str = "scaled_linear"   # diffusers' name; CompVis calls it "linear" (linear in sqrt(beta))
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000


@dataclass(frozen=True)
class SingleFileConfig:
    unet: UNetConfig
    vae: AutoencoderConfig | None
    text: TextEncoderSpec | None
    prediction_type: str = "epsilon"       # "epsilon", "v_prediction" or "sample"
    schedule: NoiseSchedule = NoiseSchedule()


@dataclass
class CheckpointParts:
    """A single-file checkpoint taken apart: each model's weights under our names, and what we left alone."""

    config: SingleFileConfig
    unet: StateDict
    vae: StateDict | None = None
    text: StateDict | None = None          # in the layout config.text.kind names
    extras: StateDict = field(default_factory=dict)  # unconverted tensors (EMA copy, schedule buffers) by full key


# --------------------------------------------------------------------------------- the renaming table


@dataclass(frozen=True)
class _Leaves:
    """How parameter names inside one kind of module differ between CompVis and us."""

    renames: tuple[tuple[str, str], ...] = ()    # (CompVis sub-name, our sub-name); unlisted names are equal
    conv1x1_as_linear: tuple[str, ...] = ()      # our sub-names held as Linear weights, stored as 1x1 convs


_SAME = _Leaves()
_UNET_RESNET = _Leaves((
    ("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"),
))
_VAE_RESNET = _Leaves((("nin_shortcut", "conv_shortcut"),))
_VAE_ATTENTION = _Leaves(
    (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")),
    conv1x1_as_linear=("to_q", "to_k", "to_v", "to_out.0"),
)
_OPEN_CLIP_LAYER = _Leaves((
    ("ln_1", "layer_norm1"), ("attn", "self_attn"), ("ln_2", "layer_norm2"),
    ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"),
))


@dataclass(frozen=True)
class _Module:
    compvis: str          # module (or parameter) name in the CompVis / open_clip layout
    ours: str             # the same in ours (diffusers / transformers)
    leaves: _Leaves = _SAME


def _split_at_known_head(name: str, known: Container[str]) -> tuple[str, str] | None:
    """Splits `name` after its longest dotted head that `known` holds: (head, rest); None if no head is known."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in known:
            return head, ".".join(parts[cut:])
    return None


def _join(*names: str) -> str:
    return ".".join(n for n in names if n)


class _KeyMap:
    """Module-name pairs between two layouts, applied to state-dict keys in either direction."""

    def __init__(self, modules: Iterable[_Module]):
        self._modules = list(modules)
        self._by_compvis = {m.compvis: m for m in self._modules}
        self._by_ours = {m.ours: m for m in self._modules}

    def to_ours(self, state: Mapping[str, torch.Tensor], path=None, prefix: str = "") -> StateDict:
        """CompVis names -> ours. Keys no module claims, and modules with no key, raise StateDictMismatchError
        (naming the keys with `prefix`, their place in the file)."""
        return self._apply(state, True, path, prefix)

    def to_compvis(self, state: Mapping[str, torch.Tensor], path=None, prefix: str = "") -> StateDict:
        """Our names -> CompVis; mismatches raise as in `to_ours`."""
        return self._apply(state, False, path, prefix)

    def _apply(self, state, to_ours: bool, path, prefix: str) -> StateDict:
        modules = self._by_compvis if to_ours else self._by_ours
        renamed, unmatched, seen = {}, [], set()
        for key, tensor in state.items():
            found = _split_at_known_head(key, modules)
            if found is None:
                unmatched.append(key)
                continue
            module, rest = modules[found[0]], found[1]
            seen.add(module)
            new_rest, our_sub_name = _rename_leaf(rest, module.leaves, to_ours)
            if our_sub_name in module.leaves.conv1x1_as_linear and rest.endswith("weight"):
                tensor = _conv1x1_to_linear(tensor) if to_ours else _linear_to_conv1x1(tensor)
            renamed[_join(module.ours if to_ours else module.compvis, new_rest)] = tensor
        missing = [m.compvis if to_ours else m.ours for m in self._modules if m not in seen]
        if unmatched or missing:
            raise StateDictMismatchError(path, missing=[prefix + name for name in missing],
                                         unexpected=[prefix + key for key in unmatched])
        return renamed


def _rename_leaf(rest: str, leaves: _Leaves, to_ours: bool) -> tuple[str, str | None]:
    """Renames the sub-module part of `rest`; also returns our name for that sub-module (None if unlisted)."""
    pairs = dict(leaves.renames) if to_ours else {ours: compvis for compvis, ours in leaves.renames}
    found = _split_at_known_head(rest, pairs)
    if found is None:
        return rest, None
    head, param = found
    return _join(pairs[head], param), pairs[head] if to_ours else head


def _conv1x1_to_linear(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[:2]) if weight.ndim > 2 else weight   # (out, in, 1, 1) -> (out, in)


def _linear_to_conv1x1(weight: torch.Tensor) -> torch.Tensor:
    return weight[:, :, None, None] if weight.ndim == 2 else weight       # (out, in) -> (out, in, 1, 1)


def _unet_modules(config: UNetConfig) -> Iterator[_Module]:
    yield _Module("time_embed.0", "time_embedding.linear_1")
    yield _Module("time_embed.2", "time_embedding.linear_2")
    yield _Module("input_blocks.0.0", "conv_in")
    yield from _unet_down_modules(config)
    yield _Module("middle_block.0", "mid_block.resnets.0", _UNET_RESNET)
    if config.mid_attention:
        yield _Module("middle_block.1", "mid_block.attentions.0")
        yield _Module("middle_block.2", "mid_block.resnets.1", _UNET_RESNET)
    else:
        yield _Module("middle_block.1", "mid_block.resnets.1", _UNET_RESNET)
    yield from _unet_up_modules(config)
    yield _Module("out.0", "conv_norm_out")
    yield _Module("out.2", "conv_out")


def _unet_down_modules(config: UNetConfig) -> Iterator[_Module]:
    """CompVis numbers input blocks flat: per level, one block per ResBlock (+ transformer), then a downsampler."""
    levels = len(config.channels)
    block = 1
    for level in range(levels):
        for layer in range(config.layers_per_level):
            yield _Module(f"input_blocks.{block}.0", f"down_blocks.{level}.resnets.{layer}", _UNET_RESNET)
            if config.attention_levels[level]:
                yield _Module(f"input_blocks.{block}.1", f"down_blocks.{level}.attentions.{layer}")
            block += 1
        if level < levels - 1:
            yield _Module(f"input_blocks.{block}.0.op", f"down_blocks.{level}.downsamplers.0.conv")
            block += 1


def _unet_up_modules(config: UNetConfig) -> Iterator[_Module]:
    """Output blocks go coarsest level first; a level's last block also carries the upsampler, after any attention."""
    levels = len(config.channels)
    block = 0
    for up in range(levels):
        level = levels - 1 - up
        for layer in range(config.layers_per_level + 1):
            yield _Module(f"output_blocks.{block}.0", f"up_blocks.{up}.resnets.{layer}", _UNET_RESNET)
            if config.attention_levels[level]:
                yield _Module(f"output_blocks.{block}.1", f"up_blocks.{up}.attentions.{layer}")
            block += 1
        if level > 0:
            slot = 2 if config.attention_levels[level] else 1
            yield _Module(f"output_blocks.{block - 1}.{slot}.conv", f"up_blocks.{up}.upsamplers.0.conv")


def _vae_modules(config: AutoencoderConfig) -> Iterator[_Module]:
    levels = len(config.channels)
    for level in range(levels):
        for layer in range(config.layers_per_level):
            yield _Module(f"encoder.down.{level}.block.{layer}", f"encoder.down_blocks.{level}.resnets.{layer}",
                          _VAE_RESNET)
        if level < levels - 1:
            yield _Module(f"encoder.down.{level}.downsample.conv", f"encoder.down_blocks.{level}.downsamplers.0.conv")
    for up in range(levels):     # CompVis numbers decoder levels finest first, diffusers coarsest first
        level = levels - 1 - up
        for layer in range(config.layers_per_level + 1):
            yield _Module(f"decoder.up.{level}.block.{layer}", f"decoder.up_blocks.{up}.resnets.{layer}", _VAE_RESNET)
        if level > 0:
            yield _Module(f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{up}.upsamplers.0.conv")
    for part in ("encoder", "decoder"):
        yield _Module(f"{part}.conv_in", f"{part}.conv_in")
        yield _Module(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", _VAE_RESNET)
        if config.mid_attention:
            yield _Module(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", _VAE_ATTENTION)
        yield _Module(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", _VAE_RESNET)
        yield _Module(f"{part}.norm_out", f"{part}.conv_norm_out")
        yield _Module(f"{part}.conv_out", f"{part}.conv_out")
    if config.use_quant_conv:
        yield _Module("quant_conv", "quant_conv")
        yield _Module("post_quant_conv", "post_quant_conv")


def _open_clip_modules(layers: int) -> Iterator[_Module]:
    yield _Module("token_embedding", "embeddings.token_embedding")
    yield _Module("positional_embedding", "embeddings.position_embedding.weight")
    for layer in range(layers):
        yield _Module(f"transformer.resblocks.{layer}", f"encoder.layers.{layer}", _OPEN_CLIP_LAYER)
    yield _Module("ln_final", "final_layer_norm")


# ------------------------------------------------------------------------ single file <-> components


@dataclass
class _Grouped:
    unet: StateDict
    vae: StateDict
    text: StateDict
    text_kind: str | None
    extras: StateDict


def _group(state: Mapping[str, torch.Tensor], path) -> _Grouped:
    """Sorts a single-file state dict by component, prefixes removed; anything else goes to extras."""
    if any(key.startswith("conditioner.embedders.") for key in state):
        raise UnknownArchitectureError(path, "this is an SDXL-style checkpoint (conditioner.embedders.*); only "
                                             "SD1/SD2 single files (cond_stage_model.*) are supported")
    grouped = _Grouped({}, {}, {}, None, {})
    for key, tensor in state.items():
        if key.startswith(UNET_PREFIX):
            grouped.unet[key[len(UNET_PREFIX):]] = tensor
        elif key.startswith(VAE_PREFIX):
            grouped.vae[key[len(VAE_PREFIX):]] = tensor
        elif not _take_text_key(grouped, key, tensor):
            grouped.extras[key] = tensor
    if not grouped.unet:
        raise UnknownArchitectureError(path, _layout_hint(state))
    return grouped


def _take_text_key(grouped: _Grouped, key: str, tensor: torch.Tensor) -> bool:
    for kind, prefix in TEXT_PREFIXES.items():
        if key.startswith(prefix):
            name = key[len(prefix):].removeprefix(_CLIP_WRAPPER if kind == "clip" else "")   # a few merges lack it
            if name in _TEXT_NON_WEIGHTS[kind]:
                return False
            grouped.text_kind = kind
            grouped.text[name] = tensor
            return True
    return False


def _layout_hint(state: Mapping[str, torch.Tensor]) -> str:
    sample = ", ".join(list(state)[:5]) or "no keys at all"
    return (f"no UNet weights: a CompVis single-file checkpoint keeps them under '{UNET_PREFIX}' (VAE under "
            f"'{VAE_PREFIX}', text encoder under '{TEXT_PREFIXES['clip']}' or '{TEXT_PREFIXES['open_clip']}'), "
            f"but this file has {sample}; a diffusers folder or a bare component file needs the diffusers loader")


def split_checkpoint(state: Mapping[str, torch.Tensor], config: SingleFileConfig | None = None, *,
                     use_ema: bool = False, path=None) -> CheckpointParts:
    """Takes a CompVis single-file state dict apart into UNet / VAE / text weights under our names.

    `config` (e.g. from `read_yaml_config`) fixes what the weights cannot tell; without it `infer_config` decides.
    `use_ema` takes the UNet from the EMA copy (`model_ema.*`) that full training checkpoints carry.
    Keys outside the three models (EMA copy, schedule buffers, ...) come back untouched in `extras`.
    """
    grouped = _group(state, path)
    config = _completed(config, grouped, path)
    unet_state = _ema_unet(grouped, path) if use_ema else grouped.unet
    unet = _KeyMap(_unet_modules(config.unet)).to_ours(unet_state, path, UNET_PREFIX)
    vae = _KeyMap(_vae_modules(config.vae)).to_ours(grouped.vae, path, VAE_PREFIX) if grouped.vae else None
    if grouped.text and config.text.kind != grouped.text_kind:
        raise CheckpointError(path, f"the config names a {config.text.kind!r} text encoder but the checkpoint "
                                    f"holds a {grouped.text_kind!r} one; use the config that came with the weights")
    return CheckpointParts(config, unet, vae, grouped.text or None, grouped.extras)


def _completed(config: SingleFileConfig | None, grouped: _Grouped, path) -> SingleFileConfig:
    """The given config, with what it leaves out (None) inferred from the weights present."""
    if config is None:
        return _infer_from_groups(grouped, path)
    return dataclasses.replace(config, vae=config.vae or _infer_vae(grouped, path),
                               text=config.text or _infer_text(grouped, path))


def _ema_unet(grouped: _Grouped, path) -> StateDict:
    """CompVis' EMA keeps `model.diffusion_model.out.2.weight` as `model_ema.diffusion_modelout2weight`."""
    ema = {}
    for name in grouped.unet:
        ema_key = EMA_PREFIX + ("diffusion_model." + name).replace(".", "")
        if ema_key not in grouped.extras:
            raise CheckpointError(path, f"use_ema=True but the checkpoint has no EMA weights ({ema_key} is "
                                        "missing); load it with use_ema=False")
        ema[name] = grouped.extras[ema_key]
    return ema


def join_checkpoint(parts: CheckpointParts) -> StateDict:
    """Puts components (our names) back together as one CompVis single-file state dict; `extras` are written
    as they are (e.g. the schedule buffers, only when given)."""
    config = parts.config
    state = _prefixed(UNET_PREFIX, _KeyMap(_unet_modules(config.unet)).to_compvis(parts.unet))
    if parts.vae is not None:
        if config.vae is None:
            raise ValueError("CheckpointParts has VAE weights but config.vae is None; give its AutoencoderConfig")
        state |= _prefixed(VAE_PREFIX, _KeyMap(_vae_modules(config.vae)).to_compvis(parts.vae))
    if parts.text is not None:
        state |= _compvis_text(parts.text, config.text)
    clashes = sorted(set(parts.extras) & set(state))
    if clashes:
        raise ValueError(f"extras would overwrite model weights: {clashes[:5]}; extras are for non-model keys")
    return state | parts.extras


def _prefixed(prefix: str, state: Mapping[str, torch.Tensor]) -> StateDict:
    return {prefix + key: tensor for key, tensor in state.items()}


def _compvis_text(text: StateDict, spec: TextEncoderSpec | None) -> StateDict:
    if spec is None:
        raise ValueError("CheckpointParts has text weights but config.text is None; give its TextEncoderSpec")
    if spec.kind == "clip":
        text = {key.removeprefix(_CLIP_WRAPPER): tensor for key, tensor in text.items()}
        _require_key(text, "embeddings.token_embedding.weight", "transformers CLIPTextModel",
                     "set config.text.kind='open_clip' if these are open_clip weights")
        return _prefixed(TEXT_PREFIXES["clip"] + _CLIP_WRAPPER, text)
    if spec.kind == "open_clip":
        _require_key(text, "token_embedding.weight", "open_clip text tower",
                     "convert transformers CLIP weights with clip_text_to_open_clip first")
        return _prefixed(TEXT_PREFIXES["open_clip"], text)
    raise ValueError(f"unknown text encoder kind {spec.kind!r}; expected one of {sorted(TEXT_PREFIXES)}")


def _require_key(text: Mapping[str, torch.Tensor], key: str, layout: str, fix: str) -> None:
    if key not in text:
        raise ValueError(f"text weights are not in the {layout} layout (no {key!r}); {fix}")


# ------------------------------------------------------------------------ open_clip <-> transformers


def open_clip_text_to_clip(state: Mapping[str, torch.Tensor], num_layers: int | None = None) -> StateDict:
    """open_clip text-tower weights -> transformers CLIPTextModel weights (what a diffusers SD2 folder holds).

    Keeps the first `num_layers` blocks (SD2's diffusers text encoder keeps all but the last, since SD2 reads the
    penultimate layer). CLIPTextModel has no projection, so `text_projection` is left out; pass it back to
    `clip_text_to_open_clip` to restore it.
    """
    _require_key(state, "token_embedding.weight", "open_clip text tower", "give the open_clip tower's state dict")
    width = state["token_embedding.weight"].shape[1]
    layers = _count_children(state, "transformer.resblocks")
    kept = layers if num_layers is None else num_layers
    if not 0 < kept <= layers:
        raise ValueError(f"num_layers={num_layers} but the text tower has {layers} layers; choose 1..{layers}")
    state = {k: v for k, v in state.items() if k != "text_projection" and not _is_layer_at_or_after(k, kept)}
    return _split_fused_qkv(_KeyMap(_open_clip_modules(kept)).to_ours(state), width)


def clip_text_to_open_clip(state: Mapping[str, torch.Tensor],
                           text_projection: torch.Tensor | None = None) -> StateDict:
    """transformers CLIPTextModel weights -> open_clip text-tower weights; `text_projection` (width, embed) is
    added when given, since CLIPTextModel does not hold one."""
    state = {key.removeprefix(_CLIP_WRAPPER): tensor for key, tensor in state.items()}
    _require_key(state, "embeddings.token_embedding.weight", "transformers CLIPTextModel",
                 "give a CLIPTextModel's state dict")
    renamed = _KeyMap(_open_clip_modules(_count_children(state, "encoder.layers"))).to_compvis(_fuse_qkv(state))
    if text_projection is not None:
        renamed["text_projection"] = text_projection
    return renamed


def clip_text_config_from_open_clip(config: Mapping[str, Any], num_layers: int | None = None) -> dict[str, Any]:
    """CLIPTextConfig kwargs for the transformers model `open_clip_text_to_clip` fills."""
    return {
        "vocab_size": config["vocab_size"],
        "hidden_size": config["width"],
        "intermediate_size": 4 * config["width"],           # open_clip's text MLPs are 4x wide
        "num_hidden_layers": config["layers"] if num_layers is None else num_layers,
        "num_attention_heads": config["heads"],
        "max_position_embeddings": config["context_length"],
        "hidden_act": config["activation"],                 # transformers knows both "gelu" and "quick_gelu"
    }


def _is_layer_at_or_after(key: str, first_dropped: int) -> bool:
    parts = key.split(".")
    return parts[:2] == ["transformer", "resblocks"] and int(parts[2]) >= first_dropped


_QKV = ("q_proj", "k_proj", "v_proj")


def _split_fused_qkv(state: StateDict, width: int) -> StateDict:
    """open_clip's fused in_proj (3*width rows, q then k then v) -> transformers' q_proj / k_proj / v_proj."""
    result = {}
    for key, tensor in state.items():
        head, fused, param = key.rpartition(".in_proj_")
        if not fused:
            result[key] = tensor
            continue
        for name, chunk in zip(_QKV, tensor.split(width, dim=0)):
            result[f"{head}.{name}.{param}"] = chunk
    return result


def _fuse_qkv(state: Mapping[str, torch.Tensor]) -> StateDict:
    """transformers' q_proj / k_proj / v_proj -> one in_proj, stacked q, k, v as open_clip holds it."""
    result = {}
    for key, tensor in state.items():
        head, is_query, param = key.rpartition(".q_proj.")
        if is_query:
            result[f"{head}.in_proj_{param}"] = torch.cat([state[f"{head}.{name}.{param}"] for name in _QKV], dim=0)
        elif not any(f".{name}." in key for name in _QKV[1:]):
            result[key] = tensor
    return result


# ---------------------------------------------------------------------------------- config inference


def infer_config(state: Mapping[str, torch.Tensor], path=None) -> SingleFileConfig:
    """Model configs from a single-file state dict's key names and shapes.

    Weights do not record attention heads, prediction type, noise schedule or latent scale; those follow Stable
    Diffusion's conventions (8 heads per level for 768-wide text, 64-wide heads for 1024-wide text, epsilon
    prediction, SD's schedule, scale 0.18215). A v-prediction model (SD2 768-v) needs its YAML.
    """
    return _infer_from_groups(_group(state, path), path)


def _infer_from_groups(grouped: _Grouped, path) -> SingleFileConfig:
    unet = _infer_unet_config(_Keys(grouped.unet, "UNet", path))
    return SingleFileConfig(unet, _infer_vae(grouped, path), _infer_text(grouped, path))


def _infer_vae(grouped: _Grouped, path) -> AutoencoderConfig | None:
    return _infer_vae_config(_Keys(grouped.vae, "VAE", path)) if grouped.vae else None


def _infer_text(grouped: _Grouped, path) -> TextEncoderSpec | None:
    return _infer_text_spec(_Keys(grouped.text, f"{grouped.text_kind} text encoder", path)) if grouped.text else None


def _count_children(state: Iterable[str], prefix: str) -> int:
    """How many numbered children `prefix.N.*` the keys show."""
    start = prefix + "."
    return len({key[len(start):].split(".")[0] for key in state if key.startswith(start)})


@dataclass(frozen=True)
class _Keys:
    """Questions about one component's keys, with errors that name the component and the key it lacks."""

    state: Mapping[str, torch.Tensor]
    component: str
    path: Any

    def __contains__(self, key: str) -> bool:
        return key in self.state

    def shape(self, key: str) -> torch.Size:
        if key not in self.state:
            raise UnknownArchitectureError(self.path, f"{self.component} weights lack {key!r}, which every Stable "
                                                      f"Diffusion {self.component} has: not an SD1/SD2 checkpoint")
        return self.state[key].shape

    def count(self, prefix: str) -> int:
        return _count_children(self.state, prefix)


def _infer_unet_config(unet: _Keys) -> UNetConfig:
    blocks = unet.count("input_blocks")
    levels = 1 + sum(f"input_blocks.{block}.0.op.weight" in unet for block in range(blocks))
    blocks_per_level, remainder = divmod(blocks, levels)      # ResBlocks + a downsampler (+ the stem conv)
    if remainder or blocks_per_level < 2:
        raise UnknownArchitectureError(unet.path, f"the UNet's {blocks} input blocks do not split into {levels} "
                                                  "levels of ResBlocks and a downsampler, as SD1/SD2 UNets do")
    first_blocks = [1 + level * blocks_per_level for level in range(levels)]
    attention = tuple(f"input_blocks.{block}.1.proj_in.weight" in unet for block in first_blocks)
    if not any(attention):
        raise UnknownArchitectureError(unet.path, "the UNet has no cross-attention; only text-conditioned "
                                                  "UNets (SD1/SD2) are supported")
    attended = f"input_blocks.{first_blocks[attention.index(True)]}.1"
    context_dim = unet.shape(f"{attended}.transformer_blocks.0.attn2.to_k.weight")[1]
    channels = tuple(unet.shape(f"input_blocks.{block}.0.out_layers.3.weight")[0] for block in first_blocks)
    mid_attention = "middle_block.1.proj_in.weight" in unet
    mid_depth = unet.count("middle_block.1.transformer_blocks") if mid_attention else 1
    return UNetConfig(
        in_channels=unet.shape("input_blocks.0.0.weight")[1],
        out_channels=unet.shape("out.2.weight")[0],
        channels=channels,
        layers_per_level=blocks_per_level - 1,
        attention_levels=attention,
        heads=_conventional_heads(channels, context_dim),
        # a level without attention has no depth of its own; the mid block takes the last level's
        transformer_depth=tuple(unet.count(f"input_blocks.{block}.1.transformer_blocks") if attends else mid_depth
                                for block, attends in zip(first_blocks, attention)),
        context_dim=context_dim,
        linear_projection=len(unet.shape(f"{attended}.proj_in.weight")) == 2,
        mid_attention=mid_attention,
    )


def _conventional_heads(channels: tuple[int, ...], context_dim: int) -> tuple[int, ...]:
    """SD2 (OpenCLIP-H, 1024-wide text) fixes the head width at 64; SD1 (and our default) fixes 8 heads per level."""
    if context_dim == 1024:
        return tuple(max(1, width // 64) for width in channels)
    return (8,) * len(channels)


def _infer_vae_config(vae: _Keys) -> AutoencoderConfig:
    return AutoencoderConfig(
        in_channels=vae.shape("encoder.conv_in.weight")[1],
        out_channels=vae.shape("decoder.conv_out.weight")[0],
        latent_channels=vae.shape("decoder.conv_in.weight")[1],
        channels=tuple(vae.shape(f"encoder.down.{level}.block.0.conv1.weight")[0]
                       for level in range(vae.count("encoder.down"))),
        layers_per_level=vae.count("encoder.down.0.block"),
        mid_attention="encoder.mid.attn_1.q.weight" in vae,
        use_quant_conv="quant_conv.weight" in vae,
    )


def _infer_text_spec(text: _Keys) -> TextEncoderSpec:
    """CLIP text towers use 64-wide heads (ViT-L/14: 768 / 12, ViT-H/14: 1024 / 16)."""
    if "token_embedding.weight" not in text:
        vocab, width = text.shape("embeddings.token_embedding.weight")
        return TextEncoderSpec("clip", {
            "vocab_size": vocab,
            "hidden_size": width,
            "intermediate_size": text.shape("encoder.layers.0.mlp.fc1.weight")[0],
            "num_hidden_layers": text.count("encoder.layers"),
            "num_attention_heads": max(1, width // 64),
            "max_position_embeddings": text.shape("embeddings.position_embedding.weight")[0],
            "hidden_act": "quick_gelu",                    # OpenAI's CLIP, which SD1 uses
        })
    vocab, width = text.shape("token_embedding.weight")
    return TextEncoderSpec("open_clip", {
        "width": width,
        "heads": max(1, width // 64),
        "layers": text.count("transformer.resblocks"),
        "vocab_size": vocab,
        "context_length": text.shape("positional_embedding")[0],
        "projection_dim": text.shape("text_projection")[1],
        "activation": "gelu",                              # LAION's OpenCLIP, which SD2 uses
    }, clip_skip=1)                                        # SD2 conditions on the penultimate layer


# ------------------------------------------------------------------------------ CompVis YAML configs
# A YAML names classes by dotted path ({target, params}). We never import them: each target is only
# recognised against this allowlist, and its params are read as data (yaml.safe_load builds no objects).

_LATENT_DIFFUSION = "ldm.models.diffusion.ddpm.LatentDiffusion"
_INPAINT_DIFFUSION = "ldm.models.diffusion.ddpm.LatentInpaintDiffusion"   # 9-channel UNet: latent, mask, masked image
_MODEL_TARGETS = {_LATENT_DIFFUSION: "crossattn", _INPAINT_DIFFUSION: "hybrid"}   # target -> conditioning_key
_UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
_VAE_TARGET = "ldm.models.autoencoder.AutoencoderKL"
_TEXT_TARGETS = {
    "clip": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
    "open_clip": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
}
# The one text tower each embedder builds (CLIP ViT-L/14 for SD1, OpenCLIP ViT-H/14 for SD2).
_TEXT_CONFIGS = {
    "clip": {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
             "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu"},
    "open_clip": {"width": 1024, "heads": 16, "layers": 24, "vocab_size": 49408, "context_length": 77,
                  "projection_dim": 1024, "activation": "gelu"},
}
_TEXT_LAYERS = {"last": 0, "penultimate": 1}       # the embedders' `layer` param -> clip_skip
_PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
_BETA_SCHEDULES = {"linear": "scaled_linear", "sqrt_linear": "linear"}     # CompVis name -> diffusers name
# What CompVis' classes hard-code, so a YAML cannot say otherwise.
_COMPVIS_UNET = {"mid_attention": True, "norm_groups": 32, "norm_eps": 1e-5, "flip_sin_to_cos": True,
                 "freq_shift": 0.0}
_COMPVIS_VAE = {"mid_attention": True, "norm_groups": 32, "use_quant_conv": True, "shift_factor": 0.0}


def read_yaml_config(path: str | Path) -> SingleFileConfig:
    """Our configs from a CompVis inference YAML (v1-inference.yaml and the like), building nothing it names."""
    _, params = _Section(_load_yaml(path), "", path).component("model", _MODEL_TARGETS)
    _, unet_params = params.component("unet_config", [_UNET_TARGET])
    _, vae_params = params.component("first_stage_config", [_VAE_TARGET])
    return SingleFileConfig(
        unet=_unet_from_yaml(unet_params),
        vae=_vae_from_yaml(vae_params.section("ddconfig"), vae_params, params.get("scale_factor", 1.0)),
        text=_text_from_yaml(params),
        prediction_type=_choice(params, "parameterization", "eps", _PREDICTION_TYPES),
        schedule=NoiseSchedule(
            beta_schedule=_choice(params, "beta_schedule", "linear", _BETA_SCHEDULES),
            beta_start=float(params.get("linear_start", 1e-4)),       # defaults: CompVis' DDPM
            beta_end=float(params.get("linear_end", 2e-2)),
            num_train_timesteps=int(params.get("timesteps", 1000)),
        ),
    )


def _load_yaml(path: str | Path) -> Mapping[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not plain YAML data ({error}); a CompVis config needs no Python tags, "
                         "and we never build objects from a config") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: not a CompVis config (expected a mapping with a 'model' section)")
    return data


@dataclass(frozen=True)
class _Section:
    """One mapping of a YAML file, with errors that say where in the file the problem is."""

    data: Any
    where: str
    path: Any

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.data:
            raise ValueError(f"{self.path}: {self.at(key)} is missing; a CompVis config sets it")
        return self.data[key]

    def section(self, key: str) -> _Section:
        value = self.require(key)
        if not isinstance(value, Mapping):
            raise ValueError(f"{self.path}: {self.at(key)} should be a mapping, got {type(value).__name__}")
        return _Section(value, self.at(key), self.path)

    def component(self, key: str, targets: Iterable[str]) -> tuple[str, _Section]:
        """The target and params of `key: {target, params}`, once the target is one we know."""
        node = self.section(key)
        target = node.get("target")
        if target not in targets:
            raise ValueError(f"{self.path}: {self.at(key)}.target is {target!r}, which is not a CompVis class "
                             f"this reader knows ({', '.join(sorted(targets))}); targets are recognised, never "
                             "imported, so only these are accepted")
        return target, _Section(node.get("params") or {}, f"{self.at(key)}.params", self.path)

    def at(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key


def _choice(params: _Section, key: str, default: str, choices: Mapping[str, Any]) -> Any:
    value = params.get(key, default)
    if value not in choices:
        raise ValueError(f"{params.path}: {params.at(key)} is {value!r}; supported: {sorted(choices)}")
    return choices[value]


def _per_level(params: _Section, key: str, value: Any, levels: int) -> tuple:
    """CompVis accepts one value for every level or a list per level."""
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * levels
    if len(values) != levels:
        raise ValueError(f"{params.path}: {params.at(key)} has {len(values)} entries for {levels} levels")
    return values


def _unet_from_yaml(params: _Section) -> UNetConfig:
    base = params.require("model_channels")
    channels = tuple(base * mult for mult in params.require("channel_mult"))
    levels = len(channels)
    layers = set(_per_level(params, "num_res_blocks", params.require("num_res_blocks"), levels))
    context_dims = set(_per_level(params, "context_dim", params.require("context_dim"), levels))
    if len(layers) != 1 or len(context_dims) != 1:
        raise ValueError(f"{params.path}: {params.where} varies num_res_blocks or context_dim across levels, "
                         "which Stable Diffusion UNets never do")
    attention_resolutions = set(params.require("attention_resolutions"))
    return UNetConfig(
        in_channels=params.require("in_channels"),
        out_channels=params.require("out_channels"),
        channels=channels,
        layers_per_level=layers.pop(),
        attention_levels=tuple(2**level in attention_resolutions for level in range(levels)),
        heads=_heads_from_yaml(params, channels),
        transformer_depth=_per_level(params, "transformer_depth", params.get("transformer_depth", 1), levels),
        context_dim=context_dims.pop(),
        linear_projection=bool(params.get("use_linear_in_transformer", False)),
        **_COMPVIS_UNET,
    )


def _heads_from_yaml(params: _Section, channels: tuple[int, ...]) -> tuple[int, ...]:
    """CompVis sets either a head count for every level or a head width (num_head_channels, which wins)."""
    head_width = params.get("num_head_channels", -1)
    if head_width > 0:
        return tuple(width // head_width for width in channels)
    heads = params.get("num_heads", -1)
    if heads > 0:
        return (heads,) * len(channels)
    raise ValueError(f"{params.path}: {params.where} sets neither num_heads nor num_head_channels")


def _vae_from_yaml(dd: _Section, params: _Section, scale_factor: float) -> AutoencoderConfig:
    latent = dd.require("z_channels")
    if params.get("embed_dim", latent) != latent:
        raise ValueError(f"{params.path}: {params.at('embed_dim')} differs from ddconfig.z_channels; our VAE "
                         "(like diffusers' AutoencoderKL) needs them equal")
    if dd.get("attn_resolutions"):
        raise ValueError(f"{params.path}: {dd.at('attn_resolutions')} is not empty; only Stable Diffusion's VAE "
                         "(attention in the middle blocks only) is supported")
    base = dd.require("ch")
    return AutoencoderConfig(
        in_channels=dd.require("in_channels"),
        out_channels=dd.require("out_ch"),
        latent_channels=latent,
        channels=tuple(base * mult for mult in dd.require("ch_mult")),
        layers_per_level=dd.require("num_res_blocks"),
        scaling_factor=float(scale_factor),        # CompVis' LatentDiffusion defaults to 1.0; SD sets 0.18215
        **_COMPVIS_VAE,
    )


def _text_from_yaml(params: _Section) -> TextEncoderSpec:
    kinds = {target: kind for kind, target in _TEXT_TARGETS.items()}
    target, text_params = params.component("cond_stage_config", kinds)
    kind = kinds[target]
    named, sd_tower = ("arch", "ViT-H-14") if kind == "open_clip" else ("version", "openai/clip-vit-large-patch14")
    if text_params.get(named, sd_tower) != sd_tower:
        raise ValueError(f"{params.path}: {text_params.where} names a text tower other than SD's (CLIP ViT-L/14 "
                         "for FrozenCLIPEmbedder, OpenCLIP ViT-H-14 for FrozenOpenCLIPEmbedder)")
    layers = _TEXT_LAYERS if kind == "open_clip" else {"last": 0}    # CLIPEmbedder's "hidden" skips the final norm
    return TextEncoderSpec(kind, dict(_TEXT_CONFIGS[kind]), clip_skip=_choice(text_params, "layer", "last", layers))


def write_yaml_config(config: SingleFileConfig, path: str | Path) -> None:
    """Writes `config` as a CompVis inference YAML, so an exported single file says how to build it."""
    Path(path).write_text(yaml.safe_dump(_yaml_data(config), sort_keys=False))


def _yaml_data(config: SingleFileConfig) -> dict[str, Any]:
    if config.vae is None or config.text is None:
        raise ValueError("a CompVis YAML describes the whole model; config.vae and config.text must be set")
    schedule = config.schedule
    model_target = _INPAINT_DIFFUSION if config.unet.in_channels == 9 else _LATENT_DIFFUSION
    params: dict[str, Any] = {
        "linear_start": schedule.beta_start,
        "linear_end": schedule.beta_end,
        "timesteps": schedule.num_train_timesteps,
        "beta_schedule": _compvis_name(_BETA_SCHEDULES, schedule.beta_schedule, "beta_schedule"),
        "parameterization": _compvis_name(_PREDICTION_TYPES, config.prediction_type, "prediction_type"),
        "first_stage_key": "jpg",
        "cond_stage_key": "txt",
        "image_size": 64,                      # latent size seen in training; sampling may use any size
        "channels": config.vae.latent_channels,
        "cond_stage_trainable": False,
        "conditioning_key": _MODEL_TARGETS[model_target],
        "scale_factor": config.vae.scaling_factor,
        "unet_config": {"target": _UNET_TARGET, "params": _unet_yaml(config.unet)},
        "first_stage_config": {"target": _VAE_TARGET, "params": _vae_yaml(config.vae)},
        "cond_stage_config": _text_yaml(config.text),
    }
    return {"model": {"target": model_target, "params": params}}


def _compvis_name(names: Mapping[str, str], ours: str, field_name: str) -> str:
    for compvis, value in names.items():
        if value == ours:
            return compvis
    raise ValueError(f"{field_name}={ours!r} has no CompVis equivalent; supported: {sorted(names.values())}")


def _check_compvis_fixed(config: Any, fixed: Mapping[str, Any], what: str) -> None:
    differing = {name: getattr(config, name) for name, value in fixed.items() if getattr(config, name) != value}
    if differing:
        raise ValueError(f"the {what} config sets {differing}, which CompVis' classes fix at "
                         f"{ {name: fixed[name] for name in differing} }; a CompVis YAML cannot describe it")


def _multipliers(channels: tuple[int, ...], what: str) -> list[int]:
    if any(width % channels[0] for width in channels):
        raise ValueError(f"{what} channels {channels} are not multiples of the first; CompVis writes them as "
                         "multiples (channel_mult)")
    return [width // channels[0] for width in channels]


def _unet_yaml(config: UNetConfig) -> dict[str, Any]:
    """`upcast_attention` is a runtime precision choice that CompVis YAMLs do not record."""
    _check_compvis_fixed(config, _COMPVIS_UNET, "UNet")
    depths = set(config.transformer_depth)
    return {
        "image_size": 32,                      # required by CompVis' UNetModel, unused by it
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "model_channels": config.channels[0],
        "attention_resolutions": [2**level for level, attends in enumerate(config.attention_levels) if attends],
        "num_res_blocks": config.layers_per_level,
        "channel_mult": _multipliers(config.channels, "UNet"),
        **_heads_yaml(config),
        "use_spatial_transformer": True,
        "use_linear_in_transformer": config.linear_projection,
        "transformer_depth": depths.pop() if len(depths) == 1 else list(config.transformer_depth),
        "context_dim": config.context_dim,
        "legacy": False,
    }


def _heads_yaml(config: UNetConfig) -> dict[str, int]:
    if len(set(config.heads)) == 1:
        return {"num_heads": config.heads[0]}
    pairs = list(zip(config.channels, config.heads))
    if all(width % heads == 0 for width, heads in pairs) and len({width // heads for width, heads in pairs}) == 1:
        return {"num_head_channels": pairs[0][0] // pairs[0][1]}
    raise ValueError(f"heads {config.heads} are neither one count for every level nor one head width; "
                     "CompVis' UNetModel can express only those two")


def _vae_yaml(config: AutoencoderConfig) -> dict[str, Any]:
    _check_compvis_fixed(config, _COMPVIS_VAE, "VAE")
    return {
        "embed_dim": config.latent_channels,
        "ddconfig": {
            "double_z": True,
            "z_channels": config.latent_channels,
            "resolution": 256,
            "in_channels": config.in_channels,
            "out_ch": config.out_channels,
            "ch": config.channels[0],
            "ch_mult": _multipliers(config.channels, "VAE"),
            "num_res_blocks": config.layers_per_level,
            "attn_resolutions": [],
            "dropout": 0.0,
        },
        "lossconfig": {"target": "torch.nn.Identity"},     # required by CompVis' AutoencoderKL, unused at inference
    }


def _text_yaml(spec: TextEncoderSpec) -> dict[str, Any]:
    if spec.kind not in _TEXT_CONFIGS or dict(spec.config) != _TEXT_CONFIGS[spec.kind]:
        raise ValueError("a CompVis YAML can only name SD's text towers (CLIP ViT-L/14 for kind 'clip', OpenCLIP "
                         f"ViT-H-14 for 'open_clip'); got kind {spec.kind!r} with {spec.config}")
    layer = _compvis_name(_TEXT_LAYERS, spec.clip_skip, "clip_skip")
    if spec.kind == "clip":
        if layer != "last":
            raise ValueError("FrozenCLIPEmbedder has no diffusers-style clip_skip; write clip_skip=0")
        return {"target": _TEXT_TARGETS["clip"]}
    return {"target": _TEXT_TARGETS["open_clip"], "params": {"freeze": True, "layer": layer}}
