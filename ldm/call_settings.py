"""The numeric settings of a pipeline call, one rule each: the pipelines check what a caller passes with them,
and the loader checks a model's recommended settings (`sampling_defaults.json`) with the same rules."""

from __future__ import annotations

import math
from typing import Any


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_scale(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _is_share(value: Any) -> bool:
    return _is_scale(value) and 0 < value <= 1


def _is_optional_pixels(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)


# name -> (test, what a valid value is)
CALL_SETTINGS = {
    "num_inference_steps": (_is_count, "an integer >= 1"),
    "num_images_per_prompt": (_is_count, "an integer >= 1"),
    "guidance_scale": (_is_scale, "a finite number >= 0"),
    "image_guidance_scale": (_is_scale, "a finite number >= 0"),
    "strength": (_is_share, "a number in (0, 1]"),
    "mask_blur": (_is_scale, "a radius in pixels >= 0 (0: no blur)"),
    "padding_mask_crop": (_is_optional_pixels, "None or pixels >= 0 around the mask"),
    "num_candidates": (_is_count, "an integer >= 1"),
}

# The settings a model may recommend (the number of images is the caller's business).
RECOMMENDABLE = ("num_inference_steps", "guidance_scale", "image_guidance_scale", "num_candidates")


def setting_problem(name: str, value: Any) -> str | None:
    """None if `value` is valid for the call setting `name`, else a sentence saying what it must be."""
    valid, expected = CALL_SETTINGS[name]
    return None if valid(value) else f"{name}={value!r} must be {expected}"


def check_setting(name: str, value: Any, hint: str = "") -> None:
    """A ValueError naming the setting when `value` is not valid for it; `hint` says what the value means."""
    problem = setting_problem(name, value)
    if problem:
        raise ValueError(f"{problem} {hint}".rstrip())
