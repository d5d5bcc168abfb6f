"""`LatentDiffusionPipeline`: text -> image, composed from a text encoder, a UNet denoiser, a sampler and a VAE.

The call reads as the recipe: check inputs, encode prompts, prepare latents, denoise, decode, post-process.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ldm import __version__
from ldm.call_settings import check_setting
from ldm.candidates import candidate_generators, prompt_fit
from ldm.checkpoints.diffusers_folder import DEFAULT_SAMPLE_SIZE
from ldm.checkpoints.files import find_weights_file
from ldm.decoders import VAEDecoder
from ldm.diffusers_schedulers import SamplingPlan, plan_for, run
from ldm.guidance import ClassifierFreeGuidance, Conditioned
from ldm.loading import (
    DEFAULT_MODEL, Components, load_components, resolve_model, save_diffusers_folder, save_single_file,
    scheduler_from_config,
)
from ldm.metadata import file_hash, save_png
from ldm.prompts import encode_prompt
from ldm.samplers import TorchNoise

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class PipelineOutput:
    images: Any  # list of PIL images, (B, H, W, 3) array in [0, 1], (B, 3, H, W) tensor, or latents
    seeds: list[int | None]  # the seed of each image (None where a passed generator had already been drawn from)
    settings: list[dict[str, Any]]  # the resolved settings of each image, as stored in its PNG

    def save(self, folder: str | Path, prefix: str = "image") -> list[Path]:
        """Write each PIL image as `<prefix>-<k>-<seed>.png` with its generation parameters."""
        if not isinstance(self.images, list):
            raise ValueError("save() writes PIL images: call the pipeline with output_type='pil'")
        return [save_png(image, Path(folder) / f"{prefix}-{k:03d}-{settings['seed']}.png", settings)
                for k, (image, settings) in enumerate(zip(self.images, self.settings))]


class LatentDiffusionPipeline:
    default_model: str | Path = DEFAULT_MODEL  # what from_pretrained() loads when given no path
    # The corrections diffusers' pipeline makes to every scheduler config it is built with (key: forced value):
    # early SD configs lack steps_offset=1, and DDIM-style clip_sample=True (a pixel-space default) ruins latents.
    scheduler_fixes: dict[str, Any] = {"steps_offset": 1, "clip_sample": False}
    # diffusers' call defaults: what a setting the caller leaves None becomes unless the model recommends a value
    call_defaults: dict[str, Any] = {"num_inference_steps": 50, "guidance_scale": 7.5, "num_candidates": 1}

    def __init__(self, components: Components):
        self.unet = components.unet
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.decoder = VAEDecoder(self.vae)  # swappable: TiledVAEDecoder for large images, TAESD for speed
        self.scheduler = scheduler_from_config(self._fixed_scheduler_config(components.scheduler_config))
        self.source = components.source
        self.sampling_defaults = dict(components.sampling_defaults)  # the model's recommendations (weights.md)
        self.progress_bar = True
        self._check_unet_channels()

    # ------------------------------------------------------------------ loading, saving, devices

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, *, config: str | Path | None = None,
                        variant: str | None = None, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None):
        """Load the class's default model (the embedded "shapes"), a diffusers folder, or a CompVis/Stability single
        file (`config`: its YAML, else inferred)."""
        pipe = cls(load_components(cls.default_model if path is None else path, config=config, variant=variant))
        return pipe.to(device, dtype) if device or dtype else pipe

    def components(self) -> Components:
        return Components(self.unet, self.vae, self.text_encoder, dict(self.scheduler.config), self.source,
                          dict(self.sampling_defaults))

    def save_pretrained(self, path: str | Path, *, format: str = "diffusers") -> None:
        """format="diffusers" writes a folder; format="single_file" one CompVis-layout .safetensors/.ckpt file."""
        if format == "diffusers":
            save_diffusers_folder(self.components(), path)
        elif format == "single_file":
            save_single_file(self.components(), path)
        else:
            raise ValueError(f"format={format!r}: choose 'diffusers' or 'single_file'")

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        for module in (self.unet, self.vae, self.text_encoder.model):
            module.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def latent_factor(self) -> int:
        return self.vae.config.downsampling_factor

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @classmethod
    def unet_channels(cls, latent_channels: int) -> tuple[int, ...]:
        """The UNet input widths this pipeline can drive: text-to-image feeds the latents alone."""
        return (latent_channels,)

    # ------------------------------------------------------------------ the call

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        sampler: Any = None,
        output_type: str = "pil",
        callback: Callable | None = None,
        seed: int | None = None,
        guidance_rescale: float = 0.0,
        num_candidates: int | None = None,
    ) -> PipelineOutput:
        """`num_candidates` > 1 draws that many images per image and returns the one its prompt explains best in
        the model's own judgement (`ldm.candidates.prompt_fit`); candidate 0 is the image a plain call makes."""
        # 1. Check inputs, before any compute. Given latents fix the image, so a recommended candidate count does not
        #    apply (an explicit one > 1 is an error below).
        if latents is not None and num_candidates is None:
            num_candidates = 1
        num_inference_steps, guidance_scale, num_candidates = self._with_defaults(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, num_candidates=num_candidates)
        prompts, negatives = self._check_call(prompt, negative_prompt, num_inference_steps, guidance_scale,
                                              num_images_per_prompt, output_type, guidance_rescale)
        check_setting("num_candidates", num_candidates, "(images drawn per image; 1 draws one)")
        batch = len(prompts) * num_images_per_prompt
        height, width = self._check_size(height, width)
        latent_shape = self._latent_shape(batch, height, width)
        generators, seeds = _generators(generator, seed, batch)
        if latents is not None and tuple(latents.shape) != latent_shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; this call needs {latent_shape} "
                             f"(batch, channels, height/{self.latent_factor}, width/{self.latent_factor})")
        if latents is not None and num_candidates > 1:
            raise ValueError(f"num_candidates={num_candidates} draws its own starting noise per candidate, so it "
                             "cannot start from given latents: pass num_candidates=1 with latents")
        plan = self._plan(sampler, num_inference_steps)

        # 2. Encode prompts (each repeated per image and candidate), the negatives too when guidance is on.
        per_prompt = num_images_per_prompt * num_candidates
        net = self._guided(self.unet, prompts, negatives, per_prompt, guidance_scale, guidance_rescale)

        # 3. Prepare latents: each image's (and candidate's) noise comes from its own generator, drawn on the CPU.
        drawing = candidate_generators(generators, num_candidates)
        if latents is None:
            latents = TorchNoise(self._latent_shape(batch * num_candidates, height, width), drawing)()

        # 4. Denoise; keep one candidate per image.
        latents = self._denoise(plan, plan.denoiser(net, dtype=self.dtype), latents, drawing, callback)
        if num_candidates > 1:
            latents = self._best_fitting(plan, latents, prompts, negatives, per_prompt, generators)

        # 5. Decode unless latents were asked for, post-process to [0, 1] and the requested type.
        settings = self._settings(prompts, negatives, num_images_per_prompt, seeds, height=height, width=width,
                                  num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                  guidance_rescale=guidance_rescale, sampler=sampler, num_candidates=num_candidates)
        return self._output(latents, output_type, seeds, settings)

    def _best_fitting(self, plan: SamplingPlan, latents: torch.Tensor, prompts: list[str], negatives: list[str],
                      per_prompt: int, generators: list[torch.Generator], net: Callable | None = None) -> torch.Tensor:
        """Of each image's candidates (image-major in `latents`), the one its prompt fits best as judged by `net`
        (default: the UNet) with the prompt against the negative prompt."""
        count = latents.shape[0] // len(generators)
        negative, positive = self._encode_pair(prompts, negatives, per_prompt)
        denoiser = plan.denoiser(self.unet if net is None else net, dtype=self.dtype)
        fit = prompt_fit(denoiser, latents, count, generators, plan.schedule, positive, negative)
        return latents.unflatten(0, (-1, count))[torch.arange(len(generators)), fit.argmax(-1).to(latents.device)]

    # ------------------------------------------------------------------ the steps every pipeline shares

    def _with_defaults(self, **given) -> list:
        """Each setting as given; where None, the model's recommendation (sampling_defaults), else diffusers'."""
        return [self.sampling_defaults.get(name, self.call_defaults[name]) if value is None else value
                for name, value in given.items()]

    def _check_call(self, prompt, negative_prompt, steps, guidance_scale, images_per_prompt, output_type,
                    guidance_rescale=0.0) -> tuple[list[str], list[str]]:
        """The checks common to every pipeline's call; returns the prompts and one negative prompt each."""
        self._check_unet_channels()  # again: pipe.unet may have been swapped since construction
        prompts = _as_list(prompt, "prompt")
        negatives = _negatives(negative_prompt, len(prompts))
        _check_numbers(steps, guidance_scale, images_per_prompt, output_type)
        if not isinstance(guidance_rescale, (int, float)) or not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale={guidance_rescale!r} must be in [0, 1] (0 turns it off)")
        return prompts, negatives

    def _check_unet_channels(self) -> None:
        accepted = self.unet_channels(self.latent_channels)
        channels = self.unet.config.in_channels
        if channels not in accepted:
            raise ValueError(
                f"{type(self).__name__} needs a UNet with in_channels {' or '.join(map(str, accepted))}, but this "
                f"model's UNet has in_channels={channels}: {_pipeline_for(channels, self.latent_channels)}")

    def _latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        return batch, self.latent_channels, height // self.latent_factor, width // self.latent_factor

    def _plan(self, sampler, num_inference_steps: int) -> SamplingPlan:
        """The sampler the user named (or the model's scheduler) as a plan of sigmas and exact timesteps."""
        return plan_for(sampler if sampler is not None else self.scheduler, num_inference_steps,
                        base_config=dict(self.scheduler.config))

    def _encode_pair(self, prompts: list[str], negatives: list[str], per_prompt: int):
        """(negative, positive) text tokens, each prompt repeated per image. One encoder call keeps both at the same
        number of windows when a prompt is longer than the encoder's window."""
        both = self._encode(_repeat(negatives, per_prompt) + _repeat(prompts, per_prompt))
        return both.chunk(2)

    def _guided(self, net, prompts: list[str], negatives: list[str], per_prompt: int, guidance_scale: float,
                guidance_rescale: float = 0.0):
        """`net` bound to the prompts' text, with classifier-free guidance when guidance_scale > 1 (as in diffusers:
        a scale of 1 or less means no unconditional branch)."""
        if guidance_scale > 1.0:
            negative, positive = self._encode_pair(prompts, negatives, per_prompt)
            return ClassifierFreeGuidance(net, negative, positive, guidance_scale, guidance_rescale)
        return Conditioned(net, self._encode(_repeat(prompts, per_prompt)))

    def _denoise(self, plan: SamplingPlan, denoiser, latents: torch.Tensor, generators: list[torch.Generator],
                 callback: Callable | None, image_latents: torch.Tensor | None = None) -> torch.Tensor:
        """Sample with `plan` from the initial noise `latents` (added to `image_latents` when given): the fresh noise
        some samplers add each step comes from each image's own generator."""
        noise = TorchNoise(latents.shape, generators, device=self.device)
        if image_latents is not None:
            image_latents = image_latents.to(self.device, torch.float32)
        with tqdm(total=plan.num_steps, disable=not self.progress_bar, desc="sampling") as bar:
            def on_step(info):
                bar.update(1)
                if callback is not None:
                    callback(info)
            return run(plan, denoiser, latents.to(self.device, torch.float32), image_latents=image_latents,
                       noise=noise, callback=on_step)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images (B, 3, H, W) in [0, 1]."""
        return (self.decoder.decode(latents).float() / 2 + 0.5).clamp(0, 1)

    def _output(self, latents: torch.Tensor, output_type: str, seeds, settings) -> PipelineOutput:
        if output_type == "latent":
            return PipelineOutput(latents, seeds, settings)
        return PipelineOutput(_convert(self._decode(latents), output_type), seeds, settings)

    def _settings(self, prompts, negatives, per_prompt, seeds, *, sampler, **values) -> list[dict]:
        """Everything needed to regenerate each image (see ldm.metadata.regenerate_kwargs)."""
        if sampler is None:  # the scheduler as a config dict: JSON-safe, and accepted back as `sampler=`
            sampler = {k: v for k, v in dict(self.scheduler.config).items() if not k.startswith("_")}
            sampler["_class_name"] = type(self.scheduler).__name__
        elif not isinstance(sampler, (str, dict)):
            sampler = {**dict(sampler.config), "_class_name": type(sampler).__name__}
        common = {**values, "sampler": sampler, "model": self.source.get("path", ""), "model_hash": self.model_hash,
                  "ldm_version": __version__}
        return [{**common, "prompt": prompts[k // per_prompt], "negative_prompt": negatives[k // per_prompt],
                 "seed": seed} for k, seed in enumerate(seeds)]

    @property
    def model_hash(self) -> str:
        """A1111's short sha256 of the weights the model came from (a folder: its UNet weights)."""
        path = resolve_model(self.source.get("path", ""))
        if path.is_dir():
            path = find_weights_file(path / "unet")
        return file_hash(str(path)) if path.is_file() else ""

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        """Text tokens with A1111 emphasis `(word:1.3)` and chunking of prompts longer than the window."""
        return encode_prompt(self.text_encoder, prompts).tokens.to(self.device)

    def _check_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        default = (self.unet.config.sample_size or DEFAULT_SAMPLE_SIZE) * self.latent_factor  # as diffusers
        height = default if height is None else height
        width = default if width is None else width
        # The UNet halves the latent (len(channels) - 1) times; odd sizes work, but the latent must be whole.
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % self.latent_factor:
                raise ValueError(f"{name}={value} must be a positive multiple of {self.latent_factor} "
                                 f"(the VAE's downsampling factor), e.g. {self.latent_factor * max(1, round(value / self.latent_factor))}")
        return height, width

    @classmethod
    def _fixed_scheduler_config(cls, config: dict) -> dict:
        return {**config, **{key: value for key, value in cls.scheduler_fixes.items() if key in config}}


def _pipeline_for(in_channels: int, latent_channels: int) -> str:
    """Which pipeline drives a UNet with `in_channels` inputs (for error messages)."""
    if in_channels == 2 * latent_channels + 1:
        return "an inpainting UNet (latents + mask + masked-image latents): use ldm.editing.InpaintPipeline"
    if in_channels == 2 * latent_channels:
        return "an instruction-editing UNet (latents + image latents): use ldm.editing.InstructPix2PixPipeline"
    if in_channels == latent_channels:
        return ("a text-to-image UNet: use LatentDiffusionPipeline, ldm.editing.ImageToImagePipeline or "
                "InpaintPipeline (latent blending)")
    return f"no ldm pipeline drives it (the VAE has {latent_channels} latent channels)"


def _as_list(value, name: str) -> list[str]:
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if not items or not all(isinstance(item, str) for item in items):
        raise ValueError(f"{name} must be a string or a non-empty list of strings, got {value!r}")
    return items


def _negatives(negative_prompt, count: int) -> list[str]:
    if negative_prompt is None:
        return [""] * count
    negatives = _as_list(negative_prompt, "negative_prompt")
    if len(negatives) == 1:
        return negatives * count
    if len(negatives) != count:
        raise ValueError(f"negative_prompt has {len(negatives)} entries for {count} prompts: give one, or one each")
    return negatives


def _check_numbers(steps, guidance_scale, images_per_prompt, output_type) -> None:
    check_setting("num_inference_steps", steps)
    check_setting("guidance_scale", guidance_scale, "(1 turns guidance off)")
    check_setting("num_images_per_prompt", images_per_prompt)
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type={output_type!r}: choose one of {OUTPUT_TYPES}")


def _generators(generator, seed: int | None, batch: int) -> tuple[list[torch.Generator], list[int | None]]:
    """One CPU generator per image. A single generator or seed s gives image k the seed s + k (A1111's rule), so
    image k of a batch equals a one-image run with seed s + k; a list is used as given, one per image."""
    if isinstance(generator, list):
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} images: pass one per image, or one")
        return generator, [_seed_of(g) for g in generator]
    if generator is not None and seed is not None:
        raise ValueError("pass either generator or seed, not both")
    if generator is not None:
        base = generator.initial_seed()
        rest = [torch.Generator().manual_seed(base + k) for k in range(1, batch)]
        first = _seed_of(generator)
        return [generator, *rest], [first, *(base + k for k in range(1, batch))]
    base = random.randrange(2**32) if seed is None else seed
    return [torch.Generator().manual_seed(base + k) for k in range(batch)], [base + k for k in range(batch)]


def _seed_of(generator: torch.Generator) -> int | None:
    """The seed that regenerates what `generator` will draw: its initial seed while it is still in that state, None
    once something has drawn from it (its images then cannot be regenerated from a seed)."""
    fresh = torch.Generator(device=generator.device).manual_seed(generator.initial_seed())
    return generator.initial_seed() if torch.equal(fresh.get_state(), generator.get_state()) else None


def _repeat(prompts: list[str], times: int) -> list[str]:
    return [p for p in prompts for _ in range(times)]


def _convert(image: torch.Tensor, output_type: str):
    if output_type == "pt":
        return image.cpu()
    array = image.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    if output_type == "np":
        return array
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]
