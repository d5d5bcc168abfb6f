"""Image editing on the text-to-image machinery: image-to-image, inpainting and instruction editing.

Each pipeline is `LatentDiffusionPipeline`'s call with the latents (or the network's input) changed, and each
equals its diffusers counterpart (StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
StableDiffusionInstructPix2PixPipeline) given the same weights, inputs and generators:

- `ImageToImagePipeline`: a VAE posterior sample of the image, noised to the sigma where the last
  int(steps * strength) steps begin, is denoised over those steps.
- `InpaintPipeline`: a 9-channel UNet (SD inpainting) sees the mask and the masked image's latents next to x_t; a
  4-channel UNet sees, outside the mask, the image's latents noised to the current sigma (latent blending).
- `InstructPix2PixPipeline`: an 8-channel UNet sees the image's latents next to x_t, with three-way guidance.

Images are prepared as diffusers' VaeImageProcessor prepares them: PIL images (or paths) are resized with Lanczos
to a multiple of the VAE factor (the size rounded down, or height x width when given), arrays and tensors with
nearest-neighbour interpolation; white mask pixels (>= 0.5 after resizing) are repainted. Seeds follow the repo's
rule: image k draws everything (VAE posterior samples, then noise) from its own generator, in diffusers' order.

Batches: `image` (and `mask_image`) is one input for every prompt, or a list with one per prompt; image k uses its
prompt's. diffusers agrees wherever each of its generators has an image of its own; it differs (and we keep the
repo's rule) when its inpainting gets one image for several outputs (it draws every VAE sample from the first
generator) and when several images meet num_images_per_prompt > 1 (it pairs them with the prompts cyclically).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from ldm.call_settings import check_setting
from ldm.candidates import candidate_generators
from ldm.guidance import Conditioned, InstructPix2PixGuidance, WithConcatenatedLatents
from ldm.pipeline import LatentDiffusionPipeline, PipelineOutput, _convert, _generators, _repeat
from ldm.samplers import TorchNoise

ImageInput = Image.Image | str | Path | np.ndarray | torch.Tensor  # one image, or a list: one per prompt


# ---------------------------------------------------------------------------------------------------- inputs

def open_image(item: Any, name: str = "image") -> Image.Image | np.ndarray | torch.Tensor:
    """A path becomes a PIL image (a clear error for a missing or non-image file); other inputs pass through."""
    if not isinstance(item, (str, Path)):
        if not isinstance(item, (Image.Image, np.ndarray, torch.Tensor)):
            raise ValueError(f"{name} must be a PIL image, a path, a numpy array or a torch tensor, "
                             f"got {type(item).__name__}")
        return item
    try:
        image = Image.open(item)
        image.load()
    except FileNotFoundError:
        raise ValueError(f"{name}: no such file {str(item)!r}") from None
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{name}: {str(item)!r} is not an image file PIL can read ({error})") from None
    return image


def _open_all(images: Any, name: str) -> list:
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise ValueError(f"{name} is an empty list: pass one image, or one per prompt")
    return [open_image(item, name) for item in items]


def _size(item) -> tuple[int, int]:
    """(width, height) of a PIL image, an (H, W[, C]) / (B, H, W, C) array or a ([B,] C, H, W) / (H, W) tensor."""
    if isinstance(item, Image.Image):
        return item.size
    if isinstance(item, np.ndarray):
        return (item.shape[1], item.shape[0]) if item.ndim in (2, 3) else (item.shape[2], item.shape[1])
    return item.shape[-1], item.shape[-2]


def _unit_range(values: torch.Tensor, name: str) -> torch.Tensor:
    """Pixel values as float32 in [0, 1]: integers are 0..255; floats are [0, 1], or [-1, 1] when any is negative
    (diffusers' rule for tensors)."""
    if not torch.is_floating_point(values):
        return values.to(torch.float32) / (1 if values.dtype == torch.bool else 255)
    values = values.to(torch.float32)
    low, high = values.min().item(), values.max().item()
    if high > 1 or low < -1:
        raise ValueError(f"{name} has values in [{low:.3g}, {high:.3g}]: float pixels must lie in [0, 1] or "
                         "[-1, 1] (or pass uint8 0..255)")
    return (values + 1) / 2 if low < 0 else values


def _array_images(item, name: str) -> torch.Tensor:
    """An (H, W, 3) / (B, H, W, 3) array or a (3, H, W) / (B, 3, H, W) tensor -> (B, 3, H, W) in [0, 1]."""
    if isinstance(item, np.ndarray):
        if item.ndim not in (3, 4) or item.shape[-1] != 3:
            raise ValueError(f"{name}: an array image must be (H, W, 3) or (B, H, W, 3), got {item.shape}")
        tensor = torch.tensor(item).movedim(-1, -3)  # a copy: arrays from PIL are read-only
    else:
        if item.ndim not in (3, 4) or item.shape[-3] != 3:
            raise ValueError(f"{name}: a tensor image must be (3, H, W) or (B, 3, H, W), got {tuple(item.shape)}")
        tensor = item.detach().cpu()
    tensor = tensor if tensor.ndim == 4 else tensor[None]
    return _unit_range(tensor, name)


def _array_masks(item, name: str) -> torch.Tensor:
    """An (H, W[, C]) / (B, H, W, C) array or an (H, W) / (C, H, W) / (B, C, H, W) tensor, C = 1 or 3 (a colour
    mask is read as its channel mean) -> (B, 1, H, W) in [0, 1]."""
    if isinstance(item, np.ndarray):
        tensor = torch.tensor(item)
        tensor = tensor.movedim(-1, -3) if tensor.ndim >= 3 else tensor  # channels last -> first
    else:
        tensor = item.detach().cpu()
    tensor = tensor[None, None] if tensor.ndim == 2 else tensor[None] if tensor.ndim == 3 else tensor
    if tensor.ndim != 4 or tensor.shape[1] not in (1, 3):
        raise ValueError(f"{name}: a mask must be (H, W), (H, W, 1|3) or (B, 1, H, W), got {tuple(item.shape)}")
    return _unit_range(tensor, name).mean(dim=1, keepdim=True)


def _resize_pixels(tensor: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return tensor if tensor.shape[-2:] == (height, width) else F.interpolate(tensor, size=(height, width))


def _pil_unit(image: Image.Image) -> torch.Tensor:
    """A PIL image -> (1, C, H, W) float32 in [0, 1] (C = 1 for "L")."""
    array = np.asarray(image, dtype=np.float32) / 255
    return torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1)[None]


def _prepare(items: list, height: int, width: int, mode: str, from_array: Callable, name: str) -> torch.Tensor:
    """PIL images resized with Lanczos, then converted to `mode`; arrays and tensors resized nearest (diffusers)."""
    return torch.cat([
        _pil_unit(item.resize((width, height), Image.LANCZOS).convert(mode)) if isinstance(item, Image.Image)
        else _resize_pixels(from_array(item, name), height, width)
        for item in items
    ])


def prepare_images(items: list, height: int, width: int, name: str = "image") -> torch.Tensor:
    """Images -> (B, 3, height, width) in [0, 1]."""
    return _prepare(items, height, width, "RGB", _array_images, name)


def prepare_masks(items: list, height: int, width: int, name: str = "mask_image") -> torch.Tensor:
    """Masks -> (B, 1, height, width) in [0, 1], not yet binarised (white >= 0.5 is repainted)."""
    return _prepare(items, height, width, "L", _array_masks, name)


def blur_masks(items: list, radius: float) -> list:
    """diffusers' VaeImageProcessor.blur (a PIL Gaussian blur of `radius` pixels) on each mask, as given; array and
    tensor masks become 8-bit grayscale images first."""
    if not radius:
        return items
    images = []
    for item in items:
        if isinstance(item, Image.Image):
            images.append(item.convert("L"))
        else:
            images += [Image.fromarray((mask[0] * 255).round().to(torch.uint8).numpy())
                       for mask in _array_masks(item, "mask_image")]
    return [image.filter(ImageFilter.GaussianBlur(radius)) for image in images]


def _check_strength(strength) -> None:
    check_setting("strength", strength, "(the share of the denoising steps run from the noised image: 0 would "
                  "return it unchanged, 1 noises it fully)")


def _check_count(count: int, prompts: int, name: str) -> None:
    if count not in (1, prompts):
        raise ValueError(f"got {count} {name}s for {prompts} prompts: pass one, or one per prompt")


def _per_image(tensor: torch.Tensor, prompts: int, per_prompt: int, name: str) -> torch.Tensor:
    """One entry per generated image: a single input serves every image, a list one prompt's images each."""
    _check_count(tensor.shape[0], prompts, name)
    return tensor.repeat_interleave(prompts * per_prompt // tensor.shape[0], dim=0)


# ---------------------------------------------------------------------------------------------------- inpainting

class LatentBlend:
    """A denoiser that sees, outside the mask (mask 0), the image's latents noised to the sigma of each call with
    the run's initial noise: diffusers' per-step blending for 4-channel UNets, done before each call instead of
    after each step. With a 0/1 mask the two agree exactly, since samplers update x elementwise: inside the mask x
    is untouched, and outside it the sampler's value is replaced before any call reads it. `skip_first` leaves the
    first call alone when sampling starts from pure noise (diffusers blends only after a step)."""

    def __init__(self, denoiser, mask: torch.Tensor, image_latents: torch.Tensor, noise: torch.Tensor,
                 skip_first: bool):
        self.denoiser = denoiser
        self.mask = mask
        self.image_latents = image_latents
        self.noise = noise
        self.skip_first = skip_first

    def __call__(self, x: torch.Tensor, sigma, **kwargs) -> torch.Tensor:
        if self.skip_first:
            self.skip_first = False
        else:
            reference = self.image_latents + torch.as_tensor(sigma, dtype=x.dtype, device=x.device) * self.noise
            x = self.mask * x + (1 - self.mask) * reference
        return self.denoiser(x, sigma, **kwargs)

    def finish(self, latents: torch.Tensor) -> torch.Tensor:
        """The final latents with the clean image latents outside the mask (diffusers' blend after the last step)."""
        return self.mask * latents + (1 - self.mask) * self.image_latents.to(latents.dtype)


def crop_region(mask: Image.Image, width: int, height: int, pad: int) -> tuple[int, int, int, int]:
    """diffusers' get_crop_region: the box (x1, y1, x2, y2) around the mask's nonzero pixels, padded by `pad`, grown
    about its centre to the aspect ratio width / height, and moved (then clipped) to stay inside the image."""
    values = np.asarray(mask.convert("L"))
    if not values.any():
        raise _empty_mask_error("mask_image")
    rows, columns = np.flatnonzero(values.any(axis=1)), np.flatnonzero(values.any(axis=0))
    x1, x2 = max(int(columns[0]) - pad, 0), min(int(columns[-1]) + 1 + pad, mask.width)
    y1, y2 = max(int(rows[0]) - pad, 0), min(int(rows[-1]) + 1 + pad, mask.height)
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / ratio - (y2 - y1)), mask.height)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * ratio - (x2 - x1)), mask.width)
    return x1, y1, x2, y2


def _grow(low: int, high: int, extra: int, limit: int) -> tuple[int, int]:
    low, high = low - extra // 2, high + extra - extra // 2
    if high >= limit:
        low, high = low - (high - limit), limit
    if low < 0:
        low, high = 0, high - low
    return low, min(high, limit)


def _fitted(image: Image.Image, width: int, height: int, cover: bool) -> Image.Image:
    """`image` resized (Lanczos, aspect kept) to fit inside width x height, or to cover it, as diffusers computes it."""
    ratio, source = width / height, image.width / image.height
    if ratio > source if cover else ratio < source:
        size = (width, image.height * width // image.width)
    else:
        size = (image.width * height // image.height, height)
    return image.resize(size, Image.LANCZOS)


def resize_and_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """diffusers' resize_mode="fill": fit inside, centre, and stretch the edge rows (or columns) over the bands."""
    fitted = _fitted(image, width, height, cover=False)
    out = Image.new("RGB", (width, height))
    out.paste(fitted, box=(width // 2 - fitted.width // 2, height // 2 - fitted.height // 2))
    band_h, band_w = height // 2 - fitted.height // 2, width // 2 - fitted.width // 2
    if fitted.width == width and band_h > 0:  # bands above and below: the first and last rows, stretched
        out.paste(fitted.resize((width, band_h), box=(0, 0, width, 0)), box=(0, 0))
        out.paste(fitted.resize((width, band_h), box=(0, fitted.height, width, fitted.height)),
                  box=(0, band_h + fitted.height))
    elif fitted.height == height and band_w > 0:
        out.paste(fitted.resize((band_w, height), box=(0, 0, 0, height)), box=(0, 0))
        out.paste(fitted.resize((band_w, height), box=(fitted.width, 0, fitted.width, height)),
                  box=(band_w + fitted.width, 0))
    return out


def paste_into(original: Image.Image, mask: Image.Image, generated: Image.Image,
               box: tuple[int, int, int, int]) -> Image.Image:
    """diffusers' apply_overlay: `generated` resized to cover `box` (centre-cropped) and placed there, under the
    original image seen through the inverted mask, so black mask pixels keep the original exactly."""
    x1, y1, x2, y2 = box
    width, height = x2 - x1, y2 - y1
    covering = _fitted(generated, width, height, cover=True)
    cropped = Image.new("RGB", (width, height))
    cropped.paste(covering, box=(width // 2 - covering.width // 2, height // 2 - covering.height // 2))
    canvas = Image.new("RGBA", original.size)
    canvas.paste(cropped, (x1, y1))
    kept = Image.new("RGBa", original.size)
    kept.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    result = canvas.convert("RGB").convert("RGBA")
    result.alpha_composite(kept.convert("RGBA"))
    return result.convert("RGB")


# ---------------------------------------------------------------------------------------------------- pipelines

class _EditingPipeline(LatentDiffusionPipeline):
    """What the editing pipelines share: reading the input images at the processing size, encoding them."""

    def _processing_size(self, items: list, height: int | None, width: int | None, name: str) -> tuple[int, int]:
        """height x width, by default the images' size rounded down to the VAE factor (diffusers' default)."""
        sizes = {_size(item) for item in items}
        if len(sizes) > 1:
            raise ValueError(f"the {name}s have different sizes {sorted(sizes)}: resize them to one size")
        (image_width, image_height), factor = sizes.pop(), self.latent_factor
        return self._check_size(image_height - image_height % factor if height is None else height,
                                image_width - image_width % factor if width is None else width)

    def _posterior_samples(self, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """UNet-scaled latents of each image (B, 3, H, W) in [-1, 1]: a VAE posterior sample drawn from that image's
        generator, one image at a time as diffusers draws them."""
        pixels = pixels.to(self.device, next(self.vae.parameters()).dtype)
        samples = [self.vae.encode(pixels[k:k + 1]).sample(generator) for k, generator in enumerate(generators)]
        return self.vae.scale_latents(torch.cat(samples)).float()

    def _editing_settings(self, prompts, negatives, per_prompt, seeds, **values) -> list[dict]:
        return self._settings(prompts, negatives, per_prompt, seeds, pipeline=type(self).__name__, **values)


class ImageToImagePipeline(_EditingPipeline):
    """Text-guided image-to-image (SDEdit, Meng et al. 2022): noise the image's latents part-way, then denoise."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        image: ImageInput | list[ImageInput],
        strength: float = 0.8,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | None = None,
        sampler: Any = None,
        output_type: str = "pil",
        callback: Callable | None = None,
        height: int | None = None,
        width: int | None = None,
        guidance_rescale: float = 0.0,
    ) -> PipelineOutput:
        # 1. Check inputs and read the image, before any compute.
        num_inference_steps, guidance_scale = self._with_defaults(num_inference_steps=num_inference_steps,
                                                                  guidance_scale=guidance_scale)
        prompts, negatives = self._check_call(prompt, negative_prompt, num_inference_steps, guidance_scale,
                                              num_images_per_prompt, output_type, guidance_rescale)
        _check_strength(strength)
        images = _open_all(image, "image")
        height, width = self._processing_size(images, height, width, "image")
        pixels = prepare_images(images, height, width) * 2 - 1
        pixels = _per_image(pixels, len(prompts), num_images_per_prompt, "image")
        generators, seeds = _generators(generator, seed, pixels.shape[0])
        plan = self._plan(sampler, num_inference_steps).for_strength(strength)

        # 2. Encode prompts.
        net = self._guided(self.unet, prompts, negatives, num_images_per_prompt, guidance_scale, guidance_rescale)

        # 3. Image latents (a posterior sample), then the noise they start from: per generator, as diffusers draws.
        image_latents = self._posterior_samples(pixels, generators)
        noise = TorchNoise(image_latents.shape, generators)()

        # 4. Denoise the last int(steps * strength) steps from the noised image latents.
        latents = self._denoise(plan, plan.denoiser(net, dtype=self.dtype), noise, generators, callback,
                                image_latents=image_latents)

        # 5. Decode and convert.
        settings = self._editing_settings(prompts, negatives, num_images_per_prompt, seeds, height=height,
                                          width=width, num_inference_steps=num_inference_steps,
                                          guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                                          sampler=sampler, strength=strength)
        return self._output(latents, output_type, seeds, settings)


@dataclass
class InpaintingInputs:
    """Image and mask as the model sees them, one per generated image, and what a cropped result is pasted into."""

    image: torch.Tensor  # (B, 3, H, W) in [0, 1]
    mask: torch.Tensor  # (B, 1, H, W) in [0, 1], blurred and resized: feathers keep_unmasked
    crop_box: tuple[int, int, int, int] | None = None  # padding_mask_crop's box in the original image
    original: Image.Image | None = None
    original_mask: Image.Image | None = None

    @property
    def repaint(self) -> torch.Tensor:
        """diffusers' binarised mask: 1 where the mask is at least half white."""
        return (self.mask >= 0.5).float()


class InpaintPipeline(_EditingPipeline):
    """Repaint the white area of a mask. 9-channel UNets (SD inpainting checkpoints) see the mask and the masked
    image's latents; any 4-channel model inpaints by latent blending (see LatentBlend).

    height x width default to the image's size rounded down to the VAE factor (diffusers: the UNet's sample size).
    mask_blur blurs the mask first (the repainted area is still where it is >= 0.5); keep_unmasked pastes the input
    back through the blurred mask after decoding; padding_mask_crop repaints only a box around the mask (plus that
    many pixels, grown to height:width), then pastes the result into the original image (A1111's "only masked")."""

    # diffusers' inpainting pipeline forces PLMS without its Runge-Kutta warm-up, and does not touch clip_sample
    scheduler_fixes = {"steps_offset": 1, "skip_prk_steps": True}

    @classmethod
    def unet_channels(cls, latent_channels: int) -> tuple[int, ...]:
        return latent_channels, 2 * latent_channels + 1  # latents; or latents + mask + masked-image latents

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        image: ImageInput | list[ImageInput],
        mask_image: ImageInput | list[ImageInput],
        strength: float = 1.0,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | None = None,
        sampler: Any = None,
        output_type: str = "pil",
        callback: Callable | None = None,
        height: int | None = None,
        width: int | None = None,
        mask_blur: float = 0,
        padding_mask_crop: int | None = None,
        keep_unmasked: bool = False,
        guidance_rescale: float = 0.0,
    ) -> PipelineOutput:
        # 1. Check inputs and read image and mask, before any compute.
        num_inference_steps, guidance_scale = self._with_defaults(num_inference_steps=num_inference_steps,
                                                                  guidance_scale=guidance_scale)
        prompts, negatives = self._check_call(prompt, negative_prompt, num_inference_steps, guidance_scale,
                                              num_images_per_prompt, output_type, guidance_rescale)
        _check_strength(strength)
        _check_mask_options(mask_blur, padding_mask_crop, keep_unmasked, output_type)
        inputs, height, width = self._read_inputs(image, mask_image, height, width, mask_blur, padding_mask_crop,
                                                  len(prompts), num_images_per_prompt)
        generators, seeds = _generators(generator, seed, inputs.image.shape[0])
        plan = self._plan(sampler, num_inference_steps).for_strength(strength)
        blending = self.unet.config.in_channels == self.latent_channels

        # 2. The image's latents where diffusers draws them (blending needs them; strength < 1 starts from them),
        #    then the noise, then the masked image's latents (a 9-channel UNet sees them next to x_t).
        pixels = inputs.image * 2 - 1
        image_latents = self._posterior_samples(pixels, generators) if blending or strength < 1 else None
        noise = TorchNoise(self._latent_shape(pixels.shape[0], height, width), generators)()
        latent_mask = F.interpolate(inputs.repaint, size=noise.shape[-2:]).to(self.device)  # nearest, as diffusers
        net = self.unet
        if blending:  # diffusers encodes the masked image here too, unused: draw its VAE sample to stay in step
            TorchNoise(noise.shape, generators)()
        else:
            masked_latents = self._posterior_samples(pixels * (inputs.repaint < 0.5), generators)
            net = WithConcatenatedLatents(self.unet, torch.cat([latent_mask, masked_latents], dim=1))

        # 3. Encode prompts; denoise (from the noised image latents when strength < 1).
        net = self._guided(net, prompts, negatives, num_images_per_prompt, guidance_scale, guidance_rescale)
        denoiser = plan.denoiser(net, dtype=self.dtype)
        if blending:
            denoiser = LatentBlend(denoiser, latent_mask, image_latents, noise.to(self.device), strength == 1)
        latents = self._denoise(plan, denoiser, noise, generators, callback,
                                image_latents=image_latents if strength < 1 else None)
        if blending:
            latents = denoiser.finish(latents)

        # 4. Decode; paste the input back outside the mask where asked (always with padding_mask_crop, as diffusers).
        settings = self._editing_settings(prompts, negatives, num_images_per_prompt, seeds, height=height,
                                          width=width, num_inference_steps=num_inference_steps,
                                          guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                                          sampler=sampler, strength=strength, mask_blur=mask_blur,
                                          padding_mask_crop=padding_mask_crop, keep_unmasked=keep_unmasked)
        if output_type == "latent":
            return PipelineOutput(latents, seeds, settings)
        return PipelineOutput(_paste_back(self._decode(latents), inputs, keep_unmasked, output_type), seeds, settings)

    def _read_inputs(self, image, mask_image, height, width, mask_blur, padding, prompts: int, per_prompt: int):
        """Image and mask at the processing size (cut around the mask first with padding_mask_crop), checked."""
        images, masks = _open_all(image, "image"), _open_all(mask_image, "mask_image")
        _check_same_size(images, masks)
        height, width = self._processing_size(images, height, width, "image")
        masks = blur_masks(masks, mask_blur)
        crop = {}
        if padding is not None:
            if len(images) != 1 or len(masks) != 1 or not isinstance(images[0], Image.Image) \
                    or not isinstance(masks[0], Image.Image):
                raise ValueError("padding_mask_crop needs one image and one mask, as PIL images or paths")
            box = crop_region(masks[0], width, height, padding)
            crop = dict(crop_box=box, original=images[0], original_mask=masks[0])
            images, masks = ([resize_and_fill(item.crop(box), width, height)] for item in (images[0], masks[0]))
        image_tensor, mask_tensor = prepare_images(images, height, width), prepare_masks(masks, height, width)
        empty = [k for k, mask in enumerate(mask_tensor) if not (mask >= 0.5).any()]
        if empty:
            raise _empty_mask_error(f"mask_image {empty}" if len(mask_tensor) > 1 else "mask_image")
        inputs = InpaintingInputs(_per_image(image_tensor, prompts, per_prompt, "image"),
                                  _per_image(mask_tensor, prompts, per_prompt, "mask_image"), **crop)
        return inputs, height, width


def _paste_back(images: torch.Tensor, inputs: InpaintingInputs, keep_unmasked: bool, output_type: str):
    """The decoded images (B, 3, H, W) in [0, 1] in the requested type; with padding_mask_crop pasted into the
    original image (diffusers' overlay), with keep_unmasked mixed with the input by the (blurred) mask, so pixels
    where the mask is 0 equal the input exactly."""
    if inputs.crop_box is not None:
        return [paste_into(inputs.original, inputs.original_mask, image, inputs.crop_box)
                for image in _convert(images, "pil")]
    if keep_unmasked:
        mask = inputs.mask.to(images.device)
        images = mask * images + (1 - mask) * inputs.image.to(images.device)
    return _convert(images, output_type)


def _check_mask_options(mask_blur, padding_mask_crop, keep_unmasked, output_type) -> None:
    check_setting("mask_blur", mask_blur)
    check_setting("padding_mask_crop", padding_mask_crop)
    if padding_mask_crop is not None and output_type != "pil":
        raise ValueError(f"padding_mask_crop pastes the result into the original image, which needs "
                         f"output_type='pil', not {output_type!r}")
    if not isinstance(keep_unmasked, bool):
        raise ValueError(f"keep_unmasked={keep_unmasked!r} must be True or False")


def _check_same_size(images: list, masks: list) -> None:
    image_size, mask_sizes = _size(images[0]), {_size(mask) for mask in masks}
    if mask_sizes != {image_size}:
        shown = ", ".join(f"{w}x{h}" for w, h in sorted(mask_sizes))
        raise ValueError(f"mask_image is {shown} but image is {image_size[0]}x{image_size[1]}: give the mask the "
                         "image's size (white = repaint, black = keep)")


def _empty_mask_error(name: str) -> ValueError:
    return ValueError(f"{name} is empty: no pixel is white (>= 0.5) at the processing size, so there is nothing to "
                      "repaint; white marks the area to repaint, black the area to keep")


class InstructPix2PixPipeline(_EditingPipeline):
    """Edit an image by an instruction (InstructPix2Pix, Brooks et al. 2023): an 8-channel UNet sees the image's
    latents next to x_t; guidance_scale pulls towards the instruction, image_guidance_scale towards the image."""

    default_model = "shapes-edit"  # the embedded instruction model, trained from "shapes" on the world's edits
    scheduler_fixes: dict[str, Any] = {}  # diffusers' InstructPix2Pix pipeline uses the scheduler as saved
    call_defaults = {"num_inference_steps": 100, "guidance_scale": 7.5, "image_guidance_scale": 1.5,
                     "num_candidates": 1}

    @classmethod
    def unet_channels(cls, latent_channels: int) -> tuple[int, ...]:
        return (2 * latent_channels,)  # latents + the edited image's latents

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        image: ImageInput | list[ImageInput],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | None = None,
        sampler: Any = None,
        output_type: str = "pil",
        callback: Callable | None = None,
        height: int | None = None,
        width: int | None = None,
        num_candidates: int | None = None,
    ) -> PipelineOutput:
        """`num_candidates` > 1 draws that many edits per image and returns the one the instruction explains best
        in the model's own judgement, the input image seen either way (`ldm.candidates.prompt_fit`)."""
        # 1. Check inputs and read the image, before any compute.
        num_inference_steps, guidance_scale, image_guidance_scale, num_candidates = self._with_defaults(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            image_guidance_scale=image_guidance_scale, num_candidates=num_candidates)
        prompts, negatives = self._check_call(prompt, negative_prompt, num_inference_steps, guidance_scale,
                                              num_images_per_prompt, output_type)
        check_setting("image_guidance_scale", image_guidance_scale, "(below 1 turns guidance off, as in diffusers)")
        check_setting("num_candidates", num_candidates, "(edits drawn per image; 1 draws one)")
        images = _open_all(image, "image")
        height, width = self._processing_size(images, height, width, "image")
        pixels = prepare_images(images, height, width) * 2 - 1
        _check_count(pixels.shape[0], len(prompts), "image")
        batch = len(prompts) * num_images_per_prompt
        generators, seeds = _generators(generator, seed, batch)
        plan = self._plan(sampler, num_inference_steps)

        # 2. The image latents: the posterior's mode, unscaled, as InstructPix2Pix was trained (and diffusers feeds).
        #    Each image's candidates follow it in the batch, each with a generator of its own.
        encoded = self.vae.encode(pixels.to(self.device, next(self.vae.parameters()).dtype)).mode().float()
        image_latents = _per_image(encoded, len(prompts), num_images_per_prompt, "image")
        image_latents = image_latents.repeat_interleave(num_candidates, dim=0)
        per_prompt = num_images_per_prompt * num_candidates
        drawing = candidate_generators(generators, num_candidates)

        # 3. Encode prompts; guidance over (text + image, image, neither) when both scales ask for it (diffusers).
        if guidance_scale > 1.0 and image_guidance_scale >= 1.0:
            negative, positive = self._encode_pair(prompts, negatives, per_prompt)
            net = InstructPix2PixGuidance(self.unet, negative, positive, image_latents, guidance_scale,
                                          image_guidance_scale)
        else:
            net = Conditioned(WithConcatenatedLatents(self.unet, image_latents),
                              self._encode(_repeat(prompts, per_prompt)))

        # 4. Denoise from pure noise, as text-to-image does; keep one candidate per image.
        noise = TorchNoise(self._latent_shape(batch * num_candidates, height, width), drawing)()
        latents = self._denoise(plan, plan.denoiser(net, dtype=self.dtype), noise, drawing, callback)
        if num_candidates > 1:
            latents = self._best_fitting(plan, latents, prompts, negatives, per_prompt, generators,
                                         WithConcatenatedLatents(self.unet, image_latents))

        # 5. Decode and convert.
        settings = self._editing_settings(prompts, negatives, num_images_per_prompt, seeds, height=height,
                                          width=width, num_inference_steps=num_inference_steps,
                                          guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale,
                                          sampler=sampler, num_candidates=num_candidates)
        return self._output(latents, output_type, seeds, settings)
