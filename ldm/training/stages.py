"""`ldm train CONFIG.yaml`: build a training stage from an omegaconf file and run it.

A config names its `task` (autoencoder | text_to_image | instruct_edit), its `data` as `{target, params}`
(targets must be `ldm.` names: a YAML file never imports arbitrary code), the model configs, and `train`
(TrainSettings). See configs/train/ for the stages of the embedded shapes models.

Text-to-image datasets yield {"image": (3, H, W) in [-1, 1], "captions": [str, ...]}, edit datasets
{"source", "target", "instructions"}; one caption or instruction is drawn per use.
"""

from __future__ import annotations

import importlib
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.checkpoints.diffusers_folder import load_vae, save_vae
from ldm.checkpoints.files import write_atomically
from ldm.loading import Components, load_components, save_diffusers_folder
from ldm.models.attention import set_attention_backend
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.models.text_encoders import CLIPTextEncoder, clip_tokenizer, compact_clip_tokenizer, load_tokenizer
from ldm.models.unet import UNet, UNetConfig
from ldm.schedules import NoiseSchedule
from ldm.training.loop import Trainer, TrainSettings
from ldm.training.objectives import (
    AutoencoderObjective, CaptionConsistency, CaptionContrast, ChangedRegion, TextToImageObjective, TokenClassifier,
    start_posterior_narrow,
)

TASKS = ("autoencoder", "text_to_image", "instruct_edit")


# ----------------------------------------------------------------------------------------------- config helpers

def load_config(path: str | Path, overrides: list[str] = ()) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"training config {path} does not exist; see configs/train/ for examples")
    config = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
    if config.get("task") not in TASKS:
        raise ValueError(f"{path}: task={config.get('task')!r}; choose one of {TASKS}")
    return config


def instantiate(spec: DictConfig, where: str):
    """Build `{target: ldm.some.Name, params: {...}}`; only the package's own names may be targets."""
    target = spec.get("target", "")
    if not target.startswith("ldm."):
        raise ValueError(f"{where}.target={target!r}: targets must be ldm names such as ldm.data.shapes.ShapesDataset")
    module_name, _, name = target.rpartition(".")
    try:
        factory = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"{where}.target={target!r} does not exist ({error})") from error
    return factory(**OmegaConf.to_container(OmegaConf.create(spec.get("params") or {}), resolve=True))


def dataclass_from(cls, section: DictConfig | dict | None, where: str):
    """A dataclass from a config section, naming any unknown field and the allowed ones."""
    values = OmegaConf.to_container(OmegaConf.create(section or {}), resolve=True)
    allowed = {field.name for field in fields(cls)}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in values.items()})


def train(config_path: str | Path, overrides: list[str] = ()) -> Path:
    """Run (or resume) the stage a config describes; returns the folder of the exported model."""
    config = load_config(config_path, overrides)
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.yaml").write_text(OmegaConf.to_yaml(config), encoding="utf-8")
    settings = dataclass_from(TrainSettings, config.get("train"), "train")
    torch.manual_seed(settings.seed)  # model initialisation; every later draw uses its own generator
    stage = {"autoencoder": autoencoder_stage, "text_to_image": text_to_image_stage,
             "instruct_edit": instruct_edit_stage}[config.task]
    trainer = stage(config, settings, output)
    trainer.run(evaluate=instantiate(config.evaluation, "evaluation") if config.get("evaluation") else None)
    return output / "model"


def _images(dataset, indices: torch.Tensor) -> torch.Tensor:
    return torch.stack([dataset[int(i)]["image"] for i in indices])


# ------------------------------------------------------------------------------------------- stage 1: the VAE

def autoencoder_stage(config: DictConfig, settings: TrainSettings, output: Path) -> Trainer:
    dataset = instantiate(config.data, "data")
    vae = AutoencoderKL(dataclass_from(AutoencoderConfig, config.get("autoencoder"), "autoencoder"))
    loss = dict(config.get("loss", {}))
    start_posterior_narrow(vae, loss.pop("initial_logvar", -8.0))
    objective = AutoencoderObjective(vae, **loss)
    device = settings.device

    def batch(indices, generator):
        return {"images": _images(dataset, indices).to(device)}

    return Trainer(objective, len(dataset), batch, settings, output, export=lambda folder: save_vae(vae, folder))


# --------------------------------------------------------------------------------- stage 2: text-to-image

def text_to_image_stage(config: DictConfig, settings: TrainSettings, output: Path) -> Trainer:
    dataset = instantiate(config.data, "data")
    vae = load_vae(_vae_folder(Path(config.autoencoder))).requires_grad_(False)
    cache = latent_cache(dataset, vae, output / "latents.pt", config.get("latent_cache", len(dataset)))
    vae.config = replace(vae.config, scaling_factor=cache["scaling_factor"])
    init = load_components(config.init) if config.get("init") else None  # continue from an exported model
    tokenizer = _tokenizer(config, dataset, output)
    # On CPU, PyTorch's fused attention backward is slow for small heads: plain matmul attention trains the shapes
    # model 1.5x faster (measured: UNet step 0.34 s vs 0.57 s, text 0.16 s vs 0.24 s, batch 32, one thread).
    cpu = settings.device == "cpu"
    text_config = CLIPTextConfig(**OmegaConf.to_container(config.text_encoder, resolve=True),
                                 vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                 attn_implementation="eager" if cpu else None)
    text_model = CLIPTextModel(text_config)
    spread_embeddings(text_model, **config.get("text_embedding_std", {}))
    unet = UNet(replace(dataclass_from(UNetConfig, config.get("unet"), "unet"),
                        context_dim=text_config.hidden_size, sample_size=cache["latents"].shape[-1]))
    if init:  # its weights, with a fresh optimiser (a checkpoint.pt in `output`, if any, still wins)
        unet.load_state_dict(init.unet.state_dict())
        carried = transfer_vocabulary(init.text_encoder.model.float(), init.text_encoder.tokenizer, tokenizer)
        text_model.load_state_dict(carried.state_dict())  # tokens both vocabularies share keep their rows
    if cpu:
        set_attention_backend(unet, "math")
    diffusion = dict(config.get("diffusion", {}))
    caption_dropout = diffusion.pop("caption_dropout", 0.1)
    prediction_type = diffusion.pop("prediction_type", "epsilon")
    schedule = NoiseSchedule.from_config(**diffusion)
    labeler, classifier = _token_labeler(config, text_config.hidden_size)
    contradict, contrast = _caption_contrast(config)
    reference_of, consistency = _caption_consistency(config)
    objective = TextToImageObjective(unet, text_model, schedule, prediction_type, classifier, contrast, consistency)
    encoder = CLIPTextEncoder(text_model, tokenizer)
    scaled = cache["latents"] * cache["scaling_factor"]
    device = settings.device

    def batch(indices, generator):
        drop = torch.rand(len(indices), generator=generator) < caption_dropout
        texts = [_pick(cache["captions"][int(i)], generator) if not dropped else ""
                 for i, dropped in zip(indices, drop.tolist())]
        tokens = encoder.tokenize(texts)
        ids, _ = encoder.frame(tokens)
        labels = None if labeler is None else token_labels(encoder, texts, tokens, labeler).to(device)
        contradicted = None if contradict is None else contradicting_captions(encoder, texts, contradict, device)
        referenced = None if reference_of is None else referenced_captions(
            encoder, texts, [cache["captions"][int(i)] for i in indices], reference_of, device)
        return {"latents": scaled[indices].float().to(device), "token_ids": ids.to(device), "token_labels": labels,
                "contradicted": contradicted, "referenced": referenced}

    unet.train(), text_model.train()
    export = _pipeline_exporter(unet, vae, text_model, tokenizer, diffusion, prediction_type)
    return Trainer(objective, len(cache["captions"]), batch, settings, output, export)


def _token_labeler(config: DictConfig, hidden_size: int):
    """The config's `token_labels: {target, params, weight}` as (labeler, TokenClassifier), or (None, None).

    A labeler maps a caption to (a prefix of it, a class index) or None; `token_labels` turns that into labels."""
    spec = config.get("token_labels")
    if not spec:
        return None, None
    labeler = instantiate(spec, "token_labels")
    return labeler, TokenClassifier(hidden_size, labeler.classes, spec.get("weight", 0.1))


def _caption_contrast(config: DictConfig):
    """The config's `caption_contrast: {target, params, weight, margin, min_timestep}` as (contradict,
    CaptionContrast), or (None, None). `contradict` maps a caption to one its image contradicts, or None."""
    spec = config.get("caption_contrast")
    if not spec:
        return None, None
    settings = {key: value for key, value in spec.items() if key not in ("target", "params")}
    return instantiate(spec, "caption_contrast"), dataclass_from(CaptionContrast, settings, "caption_contrast")


def _caption_consistency(config: DictConfig):
    """The config's `caption_consistency: {target, params, weight}` as (reference_of, CaptionConsistency), or (None,
    None). `reference_of(caption, captions of its image)` gives the caption whose prediction it must match, or None."""
    spec = config.get("caption_consistency")
    if not spec:
        return None, None
    settings = {key: value for key, value in spec.items() if key not in ("target", "params")}
    return (instantiate(spec, "caption_consistency"),
            dataclass_from(CaptionConsistency, settings, "caption_consistency"))


def referenced_captions(encoder: CLIPTextEncoder, texts: list[str], captions: list[list[str]], reference_of,
                        device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows, token ids) of the reference captions `reference_of` finds for texts (dropped ones have none)."""
    return _rows_and_ids(encoder, [reference_of(text, image_captions) if text else None
                                   for text, image_captions in zip(texts, captions)], device)


def contradicting_captions(encoder: CLIPTextEncoder, texts: list[str], contradict,
                           device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows, token ids) of the captions `contradict` finds for texts (dropped ones, "", have none); None if none."""
    return _rows_and_ids(encoder, [contradict(text) if text else None for text in texts], device)


def _rows_and_ids(encoder: CLIPTextEncoder, found: list[str | None], device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The rows with a caption found (not None) and those captions' token ids; None if no row has one."""
    rows = [row for row, caption in enumerate(found) if caption is not None]
    if not rows:
        return None
    ids, _ = encoder.frame(encoder.tokenize([found[row] for row in rows]))
    return torch.tensor(rows, device=device), ids.to(device)


def token_labels(encoder: CLIPTextEncoder, texts: list[str], tokens: list[list[int]], labeler) -> torch.Tensor:
    """(B, max_length) class per token, -100 where none: a labelled caption's tokens after its prefix, up to and
    including EOS (the causal encoder lets only those see the whole prefix), carry its class. `tokens`: the texts'
    content ids (`encoder.tokenize(texts)`)."""
    labels = torch.full((len(texts), encoder.max_length), -100, dtype=torch.long)
    for row, text, content in zip(labels, texts, tokens):
        found = labeler(text) if text else None
        if found is None:
            continue
        prefix, label = found
        start = 1 + len(encoder.tokenize([prefix])[0])  # after BOS and the prefix
        eos = min(1 + len(content), encoder.max_length - 1)
        row[start:eos + 1] = label
    return labels


def _pipeline_exporter(unet: UNet, vae: AutoencoderKL, text_model: CLIPTextModel, tokenizer, diffusion: dict,
                       prediction_type: str):
    """Writes the live (EMA-swapped) models as a diffusers folder with a DPM-Solver++ scheduler."""
    def export(folder: Path):
        # clip_sample=False as in Stable Diffusion's configs: DDIM's default clamps the x0 guess to [-1, 1],
        # which suits pixels, not unit-variance latents (sampler="DDIM" drew empty pictures with it).
        scheduler_config = {"_class_name": "DPMSolverMultistepScheduler", "prediction_type": prediction_type,
                            "steps_offset": 1, "clip_sample": False, **diffusion}
        components = Components(unet.eval(), vae, CLIPTextEncoder(text_model.eval(), tokenizer),
                                scheduler_config, {"path": str(folder), "format": "diffusers"})
        save_diffusers_folder(components, folder)
        unet.train(), text_model.train()

    return export


def spread_embeddings(text_model: CLIPTextModel, token: float = 1.0, position: float = 0.3) -> None:
    """Re-draw the token and position tables with these standard deviations.

    CLIP's own init (std 0.02) starts every token at nearly the same output: "red" and "blue" left the untrained
    shapes encoder with cosine similarity 0.94, still 0.91 after 4,000 joint steps, and the UNet learned to ignore
    the colour words. At std 1 they start distinct (cosine 0.07-0.16); position at 0.3 keeps word order visible.
    """
    embeddings = text_model.get_input_embeddings()
    positions = next(module for name, module in text_model.named_modules() if name.endswith("position_embedding"))
    with torch.no_grad():
        embeddings.weight.normal_(std=token)
        positions.weight.normal_(std=position)


def _pick(captions: list[str], generator: torch.Generator) -> str:
    return captions[int(torch.randint(len(captions), (1,), generator=generator))]


def _vae_folder(path: Path) -> Path:
    """Accept a VAE folder or a pipeline folder holding vae/."""
    return path / "vae" if (path / "vae" / "config.json").is_file() else path


def _tokenizer(config: DictConfig, dataset, output: Path):
    """The full CLIP vocabulary, or (vocabulary_items: N) a compact one covering the captions of N items, with
    every non-ASCII character one token when the config says `whole_characters: true`."""
    items = config.get("vocabulary_items")
    max_length = config.text_encoder.get("max_position_embeddings", 77)
    if items is None:
        return clip_tokenizer(max_length)
    return _saved_compact_tokenizer(
        output, lambda: [text for index in range(min(items, len(dataset))) for text in dataset[index]["captions"]],
        max_length, config.get("whole_characters", False))


def _saved_compact_tokenizer(output: Path, texts: Callable[[], list[str]], max_length: int, whole_characters: bool):
    """The run's compact vocabulary: the one saved in `output` (a resumed run must keep its ids), else one built
    from `texts()` and saved there."""
    saved = output / "tokenizer"
    if (saved / "tokenizer_config.json").is_file():
        return load_tokenizer(saved)
    tokenizer = compact_clip_tokenizer(texts(), max_length, whole_characters)
    tokenizer.save_pretrained(saved)
    return tokenizer


@torch.no_grad()
def latent_cache(dataset, vae: AutoencoderKL, path: Path, count: int, batch_size: int = 256) -> dict[str, Any]:
    """Encode the first `count` items once (posterior means) and keep their captions; the latent std measured
    here sets the VAE's scaling_factor, so the UNet sees unit-variance latents as SD's does."""
    if path.is_file():
        return torch.load(path, weights_only=True)
    latents, captions = [], []
    for start in tqdm(range(0, count, batch_size), desc="encoding latents", unit="batch"):
        items = [dataset[index] for index in range(start, min(start + batch_size, count))]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            latents.append(vae.encode(torch.stack([item["image"] for item in items])).mean.float())
        captions += [item["captions"] for item in items]
    latents = torch.cat(latents)
    cache = {"latents": latents.half(), "captions": captions, "scaling_factor": float(1 / latents.std())}
    write_atomically(path, lambda temporary: torch.save(cache, temporary))
    return cache


# ------------------------------------------------------------------------------- stage 3: instruction editing

def instruct_edit_stage(config: DictConfig, settings: TrainSettings, output: Path) -> Trainer:
    """InstructPix2Pix (Brooks et al. 2023) on paired edits, starting from a text-to-image model (`init`).

    Datasets yield {"source", "target": images, "instructions": [str, ...]}. The UNet gains input channels for
    the source image's latents (zero weights, so step 0 behaves as the text-to-image model); as in diffusers'
    pipeline, those latents are the posterior mode without the scaling factor. Conditioning dropout trains all
    three branches of the two-scale guidance: text only, image only and both dropped, `conditioning_dropout` each.
    An optional `caption_contrast:` (e.g. `ldm.data.edits.OppositeDirection`) contrasts instructions as the
    text-to-image stage contrasts captions, beside the same source latents. An optional `changed_region: {weight,
    threshold}` weights the loss in the latent cells the edit changes (`ChangedRegion`).
    """
    if not config.get("init"):
        raise ValueError("task instruct_edit needs init=<text-to-image model folder or name> to start from")
    if config.get("caption_consistency"):
        raise ValueError("caption_consistency applies to task text_to_image only; remove it from this config")
    dataset = instantiate(config.data, "data")
    base = load_components(config.init)
    vae = base.vae.float().requires_grad_(False)
    cache = edit_latent_cache(dataset, vae, output / "latents.pt", config.get("latent_cache", len(dataset)))
    tokenizer = _saved_compact_tokenizer(output, lambda: [text for texts in cache["instructions"] for text in texts],
                                         base.text_encoder.tokenizer.model_max_length,
                                         config.get("whole_characters", False))
    cpu = settings.device == "cpu"
    text_model = transfer_vocabulary(base.text_encoder.model.float(), base.text_encoder.tokenizer, tokenizer,
                                     attn_implementation="eager" if cpu else None)
    # noisy target latents + source latents; an init that is already an edit model keeps its conv_in
    unet = widen_input(base.unet.float(), cache["target"].shape[1] + cache["source"].shape[1])
    unet.config = replace(unet.config, sample_size=cache["target"].shape[-1])  # the default image size
    if cpu:
        set_attention_backend(unet, "math")
    diffusion = dict(config.get("diffusion", {}))
    dropout = diffusion.pop("conditioning_dropout", 0.05)
    prediction_type = diffusion.pop("prediction_type", "epsilon")
    contradict, contrast = _caption_contrast(config)
    objective = TextToImageObjective(unet, text_model, NoiseSchedule.from_config(**diffusion), prediction_type,
                                     caption_contrast=contrast)
    region_spec = config.get("changed_region")
    changed_region = dataclass_from(ChangedRegion, region_spec, "changed_region") if region_spec else None
    encoder = CLIPTextEncoder(text_model, tokenizer)
    targets = cache["target"] * vae.config.scaling_factor
    device = settings.device

    def batch(indices, generator):
        u = torch.rand(len(indices), generator=generator)  # [0, p): text dropped, [p, 2p): both, [2p, 3p): image
        drop_text, drop_image = u < 2 * dropout, (u >= dropout) & (u < 3 * dropout)
        texts = ["" if dropped else _pick(cache["instructions"][int(i)], generator)
                 for i, dropped in zip(indices, drop_text.tolist())]
        ids, _ = encoder.frame(encoder.tokenize(texts))
        edit_source = cache["source"][indices]
        source = edit_source.float() * (~drop_image).float().view(-1, 1, 1, 1)
        contradicted = None if contradict is None else contradicting_captions(encoder, texts, contradict, device)
        weights = None if changed_region is None else changed_region(edit_source, cache["target"][indices]).to(device)
        return {"latents": targets[indices].float().to(device), "token_ids": ids.to(device),
                "image_condition": source.to(device), "contradicted": contradicted, "loss_weights": weights}

    unet.train(), text_model.train()
    export = _pipeline_exporter(unet, vae, text_model, tokenizer, diffusion, prediction_type)
    return Trainer(objective, len(cache["instructions"]), batch, settings, output, export)


def widen_input(unet: UNet, in_channels: int) -> UNet:
    """A copy of `unet` taking `in_channels` inputs; the added channels' conv_in weights are zero."""
    if unet.config.in_channels > in_channels:
        raise ValueError(f"cannot narrow a UNet with in_channels={unet.config.in_channels} to {in_channels}")
    wide = UNet(replace(unet.config, in_channels=in_channels))
    state = unet.state_dict()
    weight = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([weight, weight.new_zeros(weight.shape[0], in_channels - weight.shape[1],
                                                                  *weight.shape[2:])], dim=1)
    wide.load_state_dict(state)
    return wide


def transfer_vocabulary(model: CLIPTextModel, old_tokenizer, new_tokenizer, **config_overrides) -> CLIPTextModel:
    """A copy of `model` for `new_tokenizer`: rows of tokens both vocabularies share are copied by token string,
    new tokens drawn at the scale of the old table; every other weight is copied."""
    config = CLIPTextConfig(**{**model.config.to_dict(), **config_overrides, "vocab_size": len(new_tokenizer),
                               "bos_token_id": new_tokenizer.bos_token_id, "eos_token_id": new_tokenizer.eos_token_id,
                               "pad_token_id": new_tokenizer.pad_token_id})
    new = CLIPTextModel(config)
    old_table = model.get_input_embeddings().weight.detach()
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("token_embedding.weight")}
    table = torch.randn(len(new_tokenizer), old_table.shape[1]) * old_table.std()
    old_vocabulary = old_tokenizer.get_vocab()
    for token, index in new_tokenizer.get_vocab().items():
        if token in old_vocabulary:
            table[index] = old_table[old_vocabulary[token]]
    new.load_state_dict(state, strict=False)
    new.get_input_embeddings().weight.data.copy_(table)
    return new


def edit_latent_cache(dataset, vae: AutoencoderKL, path: Path, count: int, batch_size: int = 256) -> dict[str, Any]:
    """Source and target latents (posterior means, unscaled) of the first `count` edits, with their instructions."""
    if path.is_file():
        return torch.load(path, weights_only=True)
    sources, targets, instructions = [], [], []
    for start in tqdm(range(0, count, batch_size), desc="encoding edit pairs", unit="batch"):
        items = [dataset[index] for index in range(start, min(start + batch_size, count))]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sources.append(vae.encode(torch.stack([item["source"] for item in items])).mean.half())
            targets.append(vae.encode(torch.stack([item["target"] for item in items])).mean.half())
        instructions += [item["instructions"] for item in items]
    cache = {"source": torch.cat(sources), "target": torch.cat(targets), "instructions": instructions}
    write_atomically(path, lambda temporary: torch.save(cache, temporary))
    return cache
