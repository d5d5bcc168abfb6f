"""Build a model's components from a diffusers folder or a CompVis/Stability single file, and write them back.

The weights always go through `ldm.checkpoints.files` (safetensors first, pickles only with weights_only=True).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
from transformers import CLIPTextConfig, T5Config

from ldm.call_settings import RECOMMENDABLE, setting_problem
from ldm.checkpoints import compvis
from ldm.checkpoints.diffusers_folder import (
    is_diffusers_folder, load_unet, load_vae, model_index, read_json, save_unet, save_vae, write_json,
)
from ldm.checkpoints.files import find_weights_file, load_checkpoint, load_into, load_state_dict, save_state_dict
from ldm.errors import CheckpointError, UnknownArchitectureError
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.models.text_encoders import (
    CLIPTextEncoder, OpenCLIPTextConfig, OpenCLIPTextEncoder, T5TextEncoder, TextEncoder, clip_tokenizer,
    load_tokenizer, open_clip_tokenizer,
)
from ldm.models.unet import UNet, UNetConfig

# Single files written by ldm carry their exact config (and tokenizer padding) in the safetensors metadata.
CONFIG_METADATA_KEY = "ldm.config"
PAD_TOKEN_METADATA_KEY = "ldm.pad_token"
SAMPLING_DEFAULTS_METADATA_KEY = "ldm.sampling_defaults"

# A model may recommend call settings, measured by evaluating it (weights.md): a folder in this file, a single file
# in its metadata. Pipelines use them where the caller passes nothing; diffusers ignores the file.
SAMPLING_DEFAULTS_FILE = "sampling_defaults.json"


@dataclass
class Components:
    unet: UNet
    vae: AutoencoderKL
    text_encoder: TextEncoder
    scheduler_config: dict[str, Any]  # a diffusers scheduler config (its `_class_name` names the sampler)
    source: dict[str, Any] = field(default_factory=dict)  # where it came from: path, format, sha256 prefix
    sampling_defaults: dict[str, Any] = field(default_factory=dict)  # the model's recommended call settings

    @property
    def networks(self) -> dict[str, torch.nn.Module]:
        """The modules that hold weights, by component name."""
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder.model}


# Models that ship inside the package, by name: trained by ldm's own trainer (see weights.md).
EMBEDDED_MODELS = {name: Path(__file__).parent / "weights" / name for name in ("shapes", "shapes-edit")}
DEFAULT_MODEL = "shapes"


def resolve_model(path: str | Path) -> Path:
    """An embedded model's name -> its folder; anything else is a path."""
    if str(path) in EMBEDDED_MODELS:
        folder = EMBEDDED_MODELS[str(path)]
        if not is_diffusers_folder(folder):
            raise CheckpointError(folder, f"the embedded model {str(path)!r} is missing from this installation; "
                                  "reinstall ldm, or train it with the commands in weights.md")
        return folder
    return Path(path)


def load_components(path: str | Path, config: str | Path | None = None, variant: str | None = None) -> Components:
    """An embedded model's name ("shapes"), a diffusers folder (model_index.json) or a single .safetensors/.ckpt file
    (with an optional CompVis YAML)."""
    name = str(path)
    path = resolve_model(path)
    if name in EMBEDDED_MODELS:
        return dataclasses.replace(_from_diffusers_folder(path, variant), source={"path": name, "format": "embedded"})
    if is_diffusers_folder(path):
        return _from_diffusers_folder(path, variant)
    if path.is_file():
        return _from_single_file(path, config)
    if path.is_dir():
        raise CheckpointError(path, "is a folder without model_index.json; pass a diffusers pipeline folder")
    raise CheckpointError(path, "no such file or folder (ldm never downloads: pass a local path)")


def _from_diffusers_folder(folder: Path, variant: str | None) -> Components:
    index = model_index(folder)
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not index.get(name) or index[name][0] is None:
            raise UnknownArchitectureError(folder, f"model_index.json has no {name!r} component")
    return Components(
        unet=load_unet(folder / "unet", variant),
        vae=load_vae(folder / "vae", variant),
        text_encoder=_load_text_encoder(folder / "text_encoder", folder / "tokenizer", variant),
        scheduler_config=read_json(folder / "scheduler" / "scheduler_config.json"),
        source={"path": str(folder), "format": "diffusers"},
        sampling_defaults=_folder_sampling_defaults(folder / SAMPLING_DEFAULTS_FILE),
    )


def _folder_sampling_defaults(path: Path) -> dict[str, Any]:
    return check_sampling_defaults(read_json(path), path) if path.is_file() else {}


def check_sampling_defaults(values: Any, path: str | Path) -> dict[str, Any]:
    """`values` if it is a mapping of known call settings to valid values, else a CheckpointError naming the key."""
    if not isinstance(values, dict):
        raise CheckpointError(path, f"sampling defaults must be a JSON object such as {{\"guidance_scale\": 5.0}}, "
                              f"got {values!r}")
    for key, value in values.items():
        if key not in RECOMMENDABLE:
            raise CheckpointError(path, f"unknown sampling default {key!r}; known: {', '.join(RECOMMENDABLE)}")
        problem = setting_problem(key, value)
        if problem:
            raise CheckpointError(path, f"sampling default {problem}")
    return dict(values)


def _load_text_encoder(folder: Path, tokenizer_folder: Path, variant: str | None) -> TextEncoder:
    config = read_json(folder / "config.json")
    tokenizer = load_tokenizer(tokenizer_folder)
    model_type = config.get("model_type")
    if model_type == "clip_text_model":
        encoder = CLIPTextEncoder.from_config(CLIPTextConfig(**config), tokenizer)
    elif model_type == "t5":
        encoder = T5TextEncoder.from_config(T5Config(**config), tokenizer)
    else:
        raise UnknownArchitectureError(folder / "config.json", f"unsupported text encoder model_type {model_type!r}")
    weights = find_weights_file(folder, names=("model", "pytorch_model"), variant=variant)
    load_into(encoder.model, encoder.state_dict_for_model(load_state_dict(weights)), weights)
    return encoder


def _from_single_file(path: Path, yaml: str | Path | None) -> Components:
    checkpoint = load_checkpoint(path)
    recorded = checkpoint.metadata.get(CONFIG_METADATA_KEY)
    if yaml:
        config = compvis.read_yaml_config(yaml)
    elif recorded:  # written by save_single_file: exact, where inference from shapes would have to guess
        config = _single_file_config_from_json(recorded)
    else:
        config = None
    parts = compvis.split_checkpoint(checkpoint.tensors, config, path=path)
    config = parts.config
    if parts.vae is None or parts.text is None:
        raise UnknownArchitectureError(path, "holds only a UNet; ldm needs the VAE and text encoder in the same file")
    unet, vae = UNet(config.unet), AutoencoderKL(config.vae)
    load_into(unet, parts.unet, path)
    load_into(vae, parts.vae, path)
    return Components(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=_single_file_text_encoder(config.text, parts.text, path,
                                               checkpoint.metadata.get(PAD_TOKEN_METADATA_KEY)),
        scheduler_config=_scheduler_config(config),
        source={"path": str(path), "format": "single_file"},
        sampling_defaults=_metadata_sampling_defaults(checkpoint.metadata, path),
    )


def _metadata_sampling_defaults(metadata: dict[str, str], path: Path) -> dict[str, Any]:
    text = metadata.get(SAMPLING_DEFAULTS_METADATA_KEY)
    if text is None:
        return {}
    try:
        values = json.loads(text)
    except (TypeError, json.JSONDecodeError) as error:
        raise CheckpointError(path, f"metadata {SAMPLING_DEFAULTS_METADATA_KEY!r} is not JSON ({error})") from None
    return check_sampling_defaults(values, path)


def _single_file_text_encoder(spec: compvis.TextEncoderSpec, state: dict, path: Path,
                              pad_token: str | None) -> TextEncoder:
    if spec.kind == "clip":
        tokenizer = clip_tokenizer(pad_token=pad_token) if pad_token else clip_tokenizer()
        encoder = CLIPTextEncoder.from_config(CLIPTextConfig(**spec.config), tokenizer, spec.clip_skip)
    elif spec.kind == "open_clip":
        open_config = OpenCLIPTextConfig(**spec.config)
        encoder = OpenCLIPTextEncoder.from_config(open_config, open_clip_tokenizer(), clip_skip=spec.clip_skip)
    else:
        raise UnknownArchitectureError(path, f"unsupported text encoder kind {spec.kind!r}")
    load_into(encoder.model, encoder.state_dict_for_model(state), path)
    return encoder


def _scheduler_config(config: compvis.SingleFileConfig) -> dict[str, Any]:
    """The scheduler SD's own scripts sample with (PNDM/PLMS), on the checkpoint's training schedule."""
    schedule = config.schedule
    return {
        "_class_name": "PNDMScheduler", "beta_schedule": schedule.beta_schedule, "beta_start": schedule.beta_start,
        "beta_end": schedule.beta_end, "num_train_timesteps": schedule.num_train_timesteps,
        "prediction_type": config.prediction_type, "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "clip_sample": False,
    }


# The diffusers pipeline a folder names in model_index.json, by the UNet's input channels.
PIPELINE_CLASS_BY_IN_CHANNELS = {8: "StableDiffusionInstructPix2PixPipeline", 9: "StableDiffusionInpaintPipeline"}


def save_diffusers_folder(components: Components, folder: str | Path) -> None:
    """Write a folder diffusers' StableDiffusionPipeline (or, for 8/9-channel UNets, its InstructPix2Pix/Inpaint
    pipeline) loads with from_pretrained."""
    folder = Path(folder)
    encoder = components.text_encoder
    if not isinstance(encoder, (CLIPTextEncoder, T5TextEncoder)):
        raise ValueError("a diffusers folder needs a transformers text encoder; export an OpenCLIP (SD2 single-file) "
                         "model with format='single_file', or convert its text tower with compvis.open_clip_text_to_clip")
    save_unet(components.unet, folder / "unet")
    save_vae(components.vae, folder / "vae")
    write_json(encoder.model.config.to_dict(), folder / "text_encoder" / "config.json")
    save_state_dict(encoder.model.state_dict(), folder / "text_encoder" / "model.safetensors")
    encoder.tokenizer.save_pretrained(folder / "tokenizer")
    write_json(components.scheduler_config, folder / "scheduler" / "scheduler_config.json")
    if components.sampling_defaults:
        write_json(components.sampling_defaults, folder / SAMPLING_DEFAULTS_FILE)
    text_class = type(encoder.model).__name__
    tokenizer_class = "CLIPTokenizer" if isinstance(encoder, CLIPTextEncoder) else "T5Tokenizer"
    write_json({
        "_class_name": PIPELINE_CLASS_BY_IN_CHANNELS.get(components.unet.config.in_channels, "StableDiffusionPipeline"),
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", text_class], "tokenizer": ["transformers", tokenizer_class],
        "scheduler": ["diffusers", components.scheduler_config["_class_name"]],
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False,
    }, folder / "model_index.json")


def save_single_file(components: Components, path: str | Path) -> None:
    """Write one CompVis-layout checkpoint (.safetensors or .ckpt) holding UNet, VAE and text encoder."""
    encoder = components.text_encoder
    if isinstance(encoder, CLIPTextEncoder):
        spec = compvis.TextEncoderSpec("clip", encoder.model.config.to_dict(), encoder.clip_skip)
    elif isinstance(encoder, OpenCLIPTextEncoder):
        spec = compvis.TextEncoderSpec("open_clip", {}, encoder.clip_skip)
    else:
        raise ValueError("a CompVis single file holds a CLIP or OpenCLIP text encoder; T5 models stay diffusers folders")
    config = compvis.SingleFileConfig(components.unet.config, components.vae.config, spec,
                                      components.scheduler_config.get("prediction_type", "epsilon"))
    parts = compvis.CheckpointParts(config, components.unet.state_dict(), components.vae.state_dict(),
                                    encoder.model.state_dict())
    metadata = {}
    if components.sampling_defaults:
        metadata[SAMPLING_DEFAULTS_METADATA_KEY] = json.dumps(components.sampling_defaults)
    if isinstance(encoder, CLIPTextEncoder):  # an OpenCLIP tower's config is read back from its shapes instead
        metadata[CONFIG_METADATA_KEY] = json.dumps(dataclasses.asdict(config))
        metadata[PAD_TOKEN_METADATA_KEY] = encoder.tokenizer.pad_token
    save_state_dict(compvis.join_checkpoint(parts), path, metadata=metadata)


def _single_file_config_from_json(text: str) -> compvis.SingleFileConfig:
    data = json.loads(text)
    tuples = lambda d: {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return compvis.SingleFileConfig(
        unet=UNetConfig(**tuples(data["unet"])),
        vae=AutoencoderConfig(**tuples(data["vae"])),
        text=compvis.TextEncoderSpec(**data["text"]),
        prediction_type=data["prediction_type"],
        schedule=compvis.NoiseSchedule(**data["schedule"]),
    )


def scheduler_from_config(config: dict[str, Any]):
    """The diffusers scheduler object a config names (users swap `pipe.scheduler` the diffusers way)."""
    scheduler_class = getattr(diffusers, config["_class_name"], None)
    if scheduler_class is None:
        raise ValueError(f"unknown diffusers scheduler class {config['_class_name']!r}")
    return scheduler_class.from_config(config)
