"""Editing in a sampling job: image-to-image, inpainting and instruction editing on the text-to-image machinery.

An item's mode follows from what it is given and from the model: no `image` -> text-to-image; `image` and `mask` ->
inpainting (`InpaintPipeline`); `image` alone -> instruction editing (`InstructPix2PixPipeline`, the prompt is the
instruction) on a model whose UNet takes 2 x latent channels (8), else image-to-image (`ImageToImagePipeline`).
A job may mix modes where the model makes them all: a 4-channel model does text-to-image, image-to-image and
latent-blend inpainting; a 9-channel model inpainting only; an 8-channel model instruction editing only.

Input files are checked (readable images, mask of the image's size and not all black) while the job is planned, and
recorded in each request by absolute path and short sha256 (the first 10 hex digits, as A1111's model hash), so a
PNG made from an input whose content has changed since is not done. Settings that the item's mode cannot use are
errors: mask_blur/keep_unmasked without a mask and any edit setting without an image while planning; strength or
guidance_rescale on an instruction model, image_guidance elsewhere, and candidates on image-to-image or inpainting
once the model is loaded (before any image).
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ldm.editing import ImageToImagePipeline, InpaintPipeline, InstructPix2PixPipeline
from ldm.loading import Components
from ldm.metadata import EDITING_ARGUMENTS
from ldm.pipeline import LatentDiffusionPipeline
from ldm.sampling_job.config import ConfigError

TEXT, IMAGE_TO_IMAGE, INPAINTING, INSTRUCTION = "text-to-image", "image-to-image", "inpainting", "instruction editing"
PIPELINES = {TEXT: LatentDiffusionPipeline, IMAGE_TO_IMAGE: ImageToImagePipeline, INPAINTING: InpaintPipeline,
             INSTRUCTION: InstructPix2PixPipeline}
PIPELINES_BY_NAME = {pipeline.__name__: pipeline for pipeline in PIPELINES.values()}
EDIT_FIELDS = ("image", "mask", "strength", "image_guidance", "mask_blur", "keep_unmasked")
SETTINGS_NEEDING_AN_IMAGE = ("mask", "strength", "image_guidance", "mask_blur", "keep_unmasked")
SETTINGS_NEEDING_A_MASK = ("mask_blur", "keep_unmasked")
SHORT_HASH = 10  # hex digits of sha256 kept in requests and file names
# Settings that only some modes use, and which ones.
APPLIES_TO = {"image_guidance": "instruction editing (a UNet with in_channels=8)",
              "candidates": "text-to-image and instruction editing",
              "strength": "image-to-image and inpainting", "guidance_rescale": "every mode but instruction editing"}


def short_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:SHORT_HASH]


# ---------------------------------------------------------------------------------------------- planning

@dataclass(frozen=True)
class InputFile:
    path: str             # absolute
    sha256: str           # short_sha256 of the file's bytes
    size: tuple[int, int]  # (width, height)
    has_white: bool       # some pixel is at least half white (a mask with none repaints nothing)


class InputReader:
    """Reads and checks the input files of one job plan, each file once."""

    def __init__(self):
        self._read: dict[str, InputFile] = {}

    def __call__(self, value: str, folder: Path, field: str, where: str) -> InputFile:
        """The file `value` names; a relative one starts at `folder`."""
        path = os.path.abspath(folder / value)  # abspath, not resolve: the path as the user laid it out
        if path not in self._read:
            self._read[path] = self._check(path, value, field, where)
        return self._read[path]

    @staticmethod
    def _check(path: str, value: str, field: str, where: str) -> InputFile:
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            reason = "no such file" if isinstance(error, FileNotFoundError) else f"cannot be read ({error.strerror})"
            raise ConfigError(f"{where}: {field}={value!r}: {reason} (looked for {path}; a relative path starts at "
                              "the folder of the file that names it, or at the current folder on the command "
                              "line)") from None
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                has_white = image.convert("L").getextrema()[1] >= 128
                size = image.size
        except Exception as error:  # PIL raises many types for damaged or foreign files
            raise ConfigError(f"{where}: {field}={value!r} is not an image PIL can read ({error}); give a PNG "
                              "or JPEG file") from None
        return InputFile(path, short_sha256(data), size, has_white)


def edit_request(fields: dict[str, Any], folders: dict[str, Path], read: InputReader, where: str) -> dict[str, Any]:
    """The edit part of an item's request from its effective edit fields ({} for text-to-image), the image and
    mask read from `folders[field]` when relative; a ConfigError for a setting without what it needs, or a bad
    input file."""
    if fields["image"] is None:
        given = [name for name in SETTINGS_NEEDING_AN_IMAGE if fields[name] is not None]
        if given:
            raise ConfigError(f"{where}: {given[0]}={fields[given[0]]!r} needs an image to edit; give image (a "
                              f"file path), or remove {given[0]}")
        return {}
    if fields["mask"] is None:
        given = [name for name in SETTINGS_NEEDING_A_MASK if fields[name] is not None]
        if given:
            raise ConfigError(f"{where}: {given[0]}={fields[given[0]]!r} applies to inpainting only; give a mask "
                              f"(white = repaint), or remove {given[0]}")
    image = read(fields["image"], folders["image"], "image", where)
    request = {"image": image.path, "image_sha256": image.sha256, "mask": None, "mask_sha256": None}
    if fields["mask"] is not None:
        mask = read(fields["mask"], folders["mask"], "mask", where)
        _check_mask(mask, image, fields, where)
        request.update(mask=mask.path, mask_sha256=mask.sha256)
    return {**request, **{name: fields[name] for name in EDIT_FIELDS if name not in request}}


def _check_mask(mask: InputFile, image: InputFile, fields: dict, where: str) -> None:
    if mask.size != image.size:
        raise ConfigError(f"{where}: mask={fields['mask']!r} is {mask.size[0]}x{mask.size[1]} but image="
                          f"{fields['image']!r} is {image.size[0]}x{image.size[1]}: give the mask the image's size")
    if not mask.has_white:
        raise ConfigError(f"{where}: mask={fields['mask']!r} has no white pixel, so nothing would be repainted; "
                          "white marks the area to repaint, black the area to keep")


# ------------------------------------------------------------------------------------- the model's pipelines

def mode_of(request: dict, instruction_model: bool) -> str:
    if request.get("image") is None:
        return TEXT
    if request["mask"] is not None:
        return INPAINTING
    return INSTRUCTION if instruction_model else IMAGE_TO_IMAGE


@dataclass
class JobPipelines:
    """The pipeline of each mode a job needs, all on one model's weights: chosen once per job."""

    pipes: dict[str, Any]            # mode -> pipeline
    instruction_model: bool = False  # image without mask means instruction editing

    @classmethod
    def build(cls, components: Components, items: list, model: str, given: Any = None) -> JobPipelines:
        """The pipelines `items` need (`given` serves the mode of its own class); a ConfigError, before any
        pipeline is built, for an item the model cannot make."""
        in_channels, latent_channels = components.unet.config.in_channels, components.vae.config.latent_channels
        instruction_model = in_channels == 2 * latent_channels
        modes = set()
        for item in items:
            mode = mode_of(item.request, instruction_model)
            _check_mode(item, mode, in_channels, latent_channels, model)
            modes.add(mode)
        pipes = {mode: given if type(given) is PIPELINES[mode] else PIPELINES[mode](components) for mode in modes}
        for pipe in pipes.values():
            pipe.progress_bar = False  # the job has its own bar
        return cls(pipes, instruction_model)

    @classmethod
    def around(cls, pipeline: Any, items: list) -> JobPipelines:
        """A pipeline given to run_job: it makes the text-to-image items; the editing pipelines share its weights."""
        if all(mode_of(item.request, False) == TEXT for item in items):
            return cls({TEXT: pipeline})  # any callable that draws like the pipeline will do (tests pass fakes)
        return cls.build(pipeline.components(), items, pipeline.source.get("path", ""), given=pipeline)

    @property
    def latent_factor(self) -> int:
        return next(iter(self.pipes.values())).latent_factor

    def to(self, device: str, dtype) -> JobPipelines:
        next(iter(self.pipes.values())).to(device, dtype)  # every pipeline holds the same modules
        return self

    def for_request(self, request: dict) -> tuple[str, Any]:
        mode = mode_of(request, self.instruction_model)
        return mode, self.pipes[mode]


def _check_mode(item, mode: str, in_channels: int, latent_channels: int, model: str) -> None:
    if in_channels not in PIPELINES[mode].unet_channels(latent_channels):
        kind, fix = _model_kind(in_channels, latent_channels)
        raise ConfigError(f"{item.source}: model={model!r} is {kind} (UNet in_channels={in_channels}), which cannot "
                          f"do {mode}: {fix}")
    request = item.request
    if mode == INSTRUCTION:  # guidance_rescale is in every request, 0 meaning off
        given = {"strength": request["strength"], "guidance_rescale": request["guidance_rescale"] or None}
    else:
        given = {"image_guidance": request.get("image_guidance"),
                 "candidates": request["candidates"] if mode != TEXT else None}
    for name, value in given.items():
        if value is not None:
            raise ConfigError(f"{item.source}: {name}={value!r} applies to {APPLIES_TO[name]}, but this item is "
                              f"{mode} on model={model!r} (UNet in_channels={in_channels}): remove {name}")


def _model_kind(in_channels: int, latent_channels: int) -> tuple[str, str]:
    if in_channels == 2 * latent_channels + 1:
        return "an inpainting model", "give every item an image and a mask (white = repaint)"
    if in_channels == 2 * latent_channels:
        return "an instruction-editing model", "give every item an image and no mask (the prompt is the instruction)"
    return "a model no ldm pipeline drives", "use a text-to-image, inpainting or instruction-editing model"


# ------------------------------------------------------------------------------------------------ making

def call_arguments(request: dict, mode: str) -> dict[str, Any]:
    """The mode's own pipeline arguments: the inputs (checked against the plan's hashes) and the edit settings
    that were given (the rest keep the pipeline's defaults)."""
    if mode == TEXT:
        given = {"guidance_rescale": request["guidance_rescale"], "num_candidates": request["candidates"]}
        return {name: value for name, value in given.items() if value is not None}
    arguments = {"image": open_input(request["image"], request["image_sha256"], "image")}
    if mode == INSTRUCTION:  # no guidance_rescale in InstructPix2Pix (checked with the model)
        given = {"image_guidance_scale": request["image_guidance"], "num_candidates": request["candidates"]}
    else:
        given = {"strength": request["strength"], "guidance_rescale": request["guidance_rescale"]}
    if mode == INPAINTING:
        arguments["mask_image"] = open_input(request["mask"], request["mask_sha256"], "mask")
        given.update(mask_blur=request["mask_blur"], keep_unmasked=request["keep_unmasked"])
    return {**arguments, **{name: value for name, value in given.items() if value is not None}}


def open_input(path: str, sha256: str, field: str) -> Image.Image:
    """The input as planned: an image whose bytes changed after planning fails (a rerun plans with the new ones)."""
    data = Path(path).read_bytes()
    if short_sha256(data) != sha256:
        raise ValueError(f"{field} {path} changed while the job ran (sha256 {sha256} when planned, now "
                         f"{short_sha256(data)}); run the job again to make its images from the new content")
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def input_paths(request: dict) -> dict[str, str]:
    """What a PNG stores besides the pipeline's settings: its input files' paths."""
    return {name: request[name] for name in ("image", "mask") if request.get(name)}


# ----------------------------------------------------------------------------------------- reading PNGs

def regeneration_inputs(settings: dict, png: Path) -> dict[str, str]:
    """The input files of an edited image, still at their recorded paths (a ValueError naming one that is not); a
    note on stderr for one whose content changed since."""
    pipeline = settings.get("pipeline", LatentDiffusionPipeline.__name__)
    if pipeline == LatentDiffusionPipeline.__name__:
        return {}
    if "image" not in settings:
        raise ValueError(f"--from-png {png}: made by {pipeline}, but it records no input image path (images made "
                         "by `ldm sample` do); call ldm.editing with the image and the settings `ldm info` prints")
    request = settings.get("request", {})
    inputs = {}
    for field, argument in (("image", "image"), ("mask", "mask_image")):
        if field not in settings:
            continue
        path = Path(settings[field])
        if not path.is_file():
            raise ValueError(f"--from-png {png}: its input {field} {path} is missing; put the file back at that "
                             "path to re-make the image")
        if short_sha256(path.read_bytes()) != request.get(f"{field}_sha256"):
            print(f"note: {field} {path} changed since {png.name} was made; the new image will differ",
                  file=sys.stderr)
        inputs[argument] = str(path)
    return inputs


def describe_edit(settings: dict) -> str | None:
    """One line naming an edited image's pipeline, inputs and edit settings (None for text-to-image)."""
    if "image" not in settings:
        return None
    request = settings.get("request", {})
    parts = [settings.get("pipeline", "?")]
    parts += [f"{field} {settings[field]} (sha256 {request.get(f'{field}_sha256')})" for field in ("image", "mask")
              if field in settings]
    parts += [f"{name} {settings[name]}" for name in EDITING_ARGUMENTS if settings.get(name) is not None]
    return "Edit: " + ", ".join(parts)
