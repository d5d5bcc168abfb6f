"""Generation parameters inside PNG files: A1111's `parameters` text (which many tools read) plus a lossless JSON
of the resolved settings under `ldm`, from which `regenerate_kwargs` rebuilds the exact call."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

PARAMETERS_KEY = "parameters"
SETTINGS_KEY = "ldm"
# Settings that are arguments of LatentDiffusionPipeline.__call__, as stored in the JSON.
CALL_ARGUMENTS = ("prompt", "negative_prompt", "height", "width", "num_inference_steps", "guidance_scale",
                  "guidance_rescale", "sampler", "seed")
# Settings of the editing pipelines (ldm.editing; `pipeline` names the class), arguments of their calls too
# (num_candidates of the text-to-image call as well). The input image and mask are not stored: pass them again with
# the regenerated arguments.
EDITING_ARGUMENTS = ("strength", "image_guidance_scale", "mask_blur", "padding_mask_crop", "keep_unmasked",
                     "num_candidates")


def a1111_parameters(settings: dict[str, Any]) -> str:
    """The three-line `parameters` text A1111 writes: prompt, negative prompt, then `Key: value` pairs."""
    pairs = {
        "Steps": settings["num_inference_steps"],
        "Sampler": settings["sampler"],
        "CFG scale": settings["guidance_scale"],
        "Image CFG scale": settings.get("image_guidance_scale", ""),
        "Seed": settings["seed"],
        "Size": f"{settings['width']}x{settings['height']}",
        "Model hash": settings.get("model_hash") or "",
        "Model": settings.get("model", ""),
        **_a1111_editing(settings),
        "Version": f"ldm {settings.get('ldm_version', '')}",
    }
    lines = [settings["prompt"]]
    if settings.get("negative_prompt"):
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    lines.append(", ".join(f"{key}: {value}" for key, value in pairs.items() if value != ""))
    return "\n".join(lines)


def _a1111_editing(settings: dict[str, Any]) -> dict[str, Any]:
    """A1111's pairs for img2img and inpainting settings, in its order; padding_mask_crop is its "only masked"."""
    pairs = {"Denoising strength": settings.get("strength"), "Mask blur": settings.get("mask_blur")}
    if settings.get("padding_mask_crop") is not None:
        pairs.update({"Inpaint area": "Only masked", "Masked area padding": settings["padding_mask_crop"]})
    return {key: value for key, value in pairs.items() if value is not None}


def save_png(image: Image.Image, path: str | Path, settings: dict[str, Any] | None = None) -> Path:
    """Write `image` with its settings (if any); atomically, so a crash never leaves a half-written PNG."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    if settings is not None:
        info.add_text(PARAMETERS_KEY, a1111_parameters(settings))
        info.add_itxt(SETTINGS_KEY, json.dumps(settings, ensure_ascii=False, sort_keys=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    image.save(temporary, format="PNG", pnginfo=info)
    temporary.replace(path)
    return path


def read_settings(path: str | Path) -> dict[str, Any]:
    """The JSON settings stored by `save_png`; a clear error for a PNG without them."""
    with Image.open(path) as image:
        text = image.text.get(SETTINGS_KEY) if hasattr(image, "text") else None
    if text is None:
        raise ValueError(f"{path}: no ldm generation settings in this image (it was not written by ldm)")
    return json.loads(text)


def regenerate_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for the call of the pipeline that made the image (settings["pipeline"], default
    LatentDiffusionPipeline) that reproduce it; an editing pipeline also needs the input image (and mask) again."""
    return {key: settings[key] for key in CALL_ARGUMENTS + EDITING_ARGUMENTS if key in settings}


@lru_cache(maxsize=16)
def file_hash(path: str) -> str:
    """First 10 hex digits of the file's sha256 (A1111's `Model hash`)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:10]
