"""A sampling job's config: omegaconf YAML + dotted overrides -> validated `JobConfig`. No model is touched here.

Every check names the field, the bad value and what is allowed; a field given a list becomes a sweep axis.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.errors import LdmError
from ldm.loading import EMBEDDED_MODELS, resolve_model
from ldm.samplers import SAMPLER_NAMES, resolve_sampler_name

DTYPES = ("float32", "float16", "bfloat16")
# A schedule picks the sigma grid of a sampler; the names below are the suffixes of SAMPLER_NAMES' variants.
SCHEDULES = {"default": "", "karras": " Karras", "exponential": " Exponential"}
BAD_LINE_POLICIES = ("stop", "record")
DEFAULT_FILENAME = "{item:04d}-{slug}-s{seed}{sweep}{edit}"
FILENAME_FIELDS = ("item", "slug", "seed", "sweep", "edit")
# Fields that may be given a list (a sweep axis), with the short label used in file names and grid captions.
SWEEP_LABELS = {
    "sampler.name": "sampler", "sampler.schedule": "schedule", "steps": "steps", "guidance": "cfg",
    "guidance_rescale": "rescale", "width": "w", "height": "h", "negative_prompt": "neg",
    "strength": "strength", "image_guidance": "icfg",
}
MAX_AXES = 3  # X, Y, Z
# Fields checked and normalised like the sweepable ones, but never a list.
SINGLE_FIELDS = ("image", "mask", "mask_blur", "keep_unmasked", "candidates")


class ConfigError(LdmError, ValueError):
    """A sampling config (or a prompt file it names) is invalid; the message names the field and the fix."""


@dataclass(frozen=True)
class JobConfig:
    prompts: Any                    # a list of prompts (or {prompt, ...overrides} items), or a .txt / .jsonl file
    model: str = "shapes"           # an embedded model's name, a diffusers folder, or a single .safetensors/.ckpt
    model_config: str | None = None  # the CompVis YAML of a single file (None: recorded in it, or inferred)
    device: str = "auto"            # auto (CUDA if present, one GPU per torchrun rank) | cpu | cuda | cuda:N | mps
    dtype: str = "float32"          # float32 | float16 | bfloat16
    sampler: dict = field(default_factory=lambda: {"name": None, "schedule": "default"})  # name None: the model's
    steps: Any = 20                 # sampling steps (a list sweeps)
    guidance: Any = 7.5             # classifier-free guidance scale; <= 1 turns it off
    guidance_rescale: Any = 0.0     # in [0, 1]
    width: Any = None               # pixels; None: the model's default size
    height: Any = None
    negative_prompt: Any = ""
    seeds: list | None = None       # each image's seed; or, when None, images_per_prompt seeds from `seed` up
    seed: int = 0
    images_per_prompt: int = 1
    output: str = "outputs/sample"  # the folder of images, manifest.jsonl and grids/
    filename: str = DEFAULT_FILENAME  # fields {item} {slug} {seed} {sweep} {edit}; ".png" is appended
    batch_size: int = 1             # images per pipeline call (same settings only); 1 keeps Ctrl-C per image
    grid: bool = True               # write contact sheets to <output>/grids/
    on_bad_line: str = "stop"       # a bad prompt-file line: stop before any work, or record it as failed and go on
    # Editing (see ldm.sampling_job.edits); None: not given (the pipeline's default where it applies).
    image: str | None = None        # the input image (relative: see ldm.sampling_job, "Paths")
    mask: str | None = None         # white = repaint (inpainting); the image's size
    strength: Any = None            # (0, 1]: the share of the steps redone (image-to-image, inpainting; a list sweeps)
    image_guidance: Any = None      # >= 0: pull towards the input image (instruction editing; a list sweeps)
    mask_blur: float | None = None  # >= 0 pixels: feathers the mask (inpainting)
    keep_unmasked: bool | None = None  # paste the input back where the mask is black (inpainting)
    # >= 1: images drawn per image, the one the prompt (instruction) fits best kept (text-to-image, instructions)
    candidates: int | None = None


@dataclass(frozen=True)
class Axis:
    field: str        # e.g. "steps" or "sampler.name"
    values: tuple     # validated values, in the order given

    @property
    def label(self) -> str:
        return SWEEP_LABELS[self.field]


# --------------------------------------------------------------------------------------------- scalar checks
# Each check takes a value and returns it normalised, or raises ValueError saying what is allowed.

def _integer(value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"must be an integer >= {minimum}")
    return value


def _number(value, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"must be a number in [{low}, {high}]" if high < math.inf else f"must be a number >= {low}")
    return float(value)


def _size(value) -> int | None:
    return None if value is None else _integer(value, 1)


def _text(value) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`check`, letting None (not given) through."""
    return lambda value: None if value is None else check(value)


def _path(value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a file path (a relative one starts at the folder of the file that names it)")
    return value


def _strength(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError("must be a number in (0, 1]: the share of the denoising steps redone from the noised image")
    return float(value)


def _flag(value) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def sampler_name(value) -> str | None:
    """The SAMPLER_NAMES key a spelling means (A1111's name where one exists): `euler_a`, `Euler a`,
    `sample_euler_ancestral` and `EulerAncestralDiscreteScheduler` all give "Euler a". None: the model's own."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"must be a sampler name; valid names: {', '.join(SAMPLER_NAMES)}")
    loose = {_loose(known): known for known in SAMPLER_NAMES}
    try:
        meaning = resolve_sampler_name(loose.get(_loose(value), value))
    except ValueError:
        raise ValueError(f"is not a sampler; valid names: {', '.join(SAMPLER_NAMES)}") from None
    return next(name for name, other in SAMPLER_NAMES.items() if other == meaning)


def _loose(name: str) -> str:
    """Case, spaces, '_' and '-' do not matter, and '+' reads as 'p' (dpmpp_2m_karras = DPM++ 2M Karras)."""
    return re.sub(r"[^0-9a-z]", "", name.casefold().replace("+", "p"))


def _schedule(value) -> str:
    if value not in SCHEDULES:
        raise ValueError(f"must be one of {', '.join(SCHEDULES)}")
    return value


def effective_sampler(name: str | None, schedule: str, where: str) -> str | None:
    """The sampler name a (name, schedule) pair stands for, e.g. ("Euler", "karras") -> "Euler Karras"."""
    if schedule == "default":
        return name
    with_schedule = None if name is None else f"{name}{SCHEDULES[schedule]}"
    if with_schedule not in SAMPLER_NAMES:
        offering = [n[: -len(SCHEDULES[schedule])] for n in SAMPLER_NAMES if n.endswith(SCHEDULES[schedule])]
        raise ConfigError(f"{where}: sampler.schedule={schedule!r} needs a sampler.name with a {schedule} variant "
                          f"(got {name!r}); those with one: {', '.join(offering)}")
    return with_schedule


CHECKS: dict[str, Callable[[Any], Any]] = {
    "sampler.name": sampler_name,
    "sampler.schedule": _schedule,
    "steps": lambda v: _integer(v, 1),
    "guidance": lambda v: _number(v, 0.0),
    "guidance_rescale": lambda v: _number(v, 0.0, 1.0),
    "width": _size,
    "height": _size,
    "negative_prompt": _text,
    "seed": lambda v: _integer(v, 0),
    "images_per_prompt": lambda v: _integer(v, 1),
    "batch_size": lambda v: _integer(v, 1),
    "image": _optional(_path),
    "mask": _optional(_path),
    "strength": _optional(_strength),
    "image_guidance": _optional(lambda v: _number(v, 0.0)),
    "mask_blur": _optional(lambda v: _number(v, 0.0)),
    "keep_unmasked": _optional(_flag),
    "candidates": _optional(lambda v: _integer(v, 1)),
}


def check(field_name: str, value, where: str):
    """`value` normalised by the field's check, or a ConfigError naming where, the field and the value."""
    try:
        return CHECKS[field_name](value)
    except ValueError as error:
        raise ConfigError(f"{where}: {field_name}={value!r} {error}") from None


def check_seeds(value, where: str) -> list[int]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: seeds={value!r} must be a non-empty list of integers >= 0")
    seeds = [check("seed", seed, where) for seed in value]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: seeds={value!r} repeats a seed; each image needs its own")
    return seeds


# -------------------------------------------------------------------------------------------------- loading

def load_config(path: str | Path | None, overrides: list[str] = ()) -> tuple[JobConfig, tuple[Axis, ...]]:
    """Read `path` (None: overrides only), apply `key=value` overrides, validate; returns the config and its
    sweep axes (the listed fields, in the order they appear in the config)."""
    where = str(path) if path is not None else "config"
    raw = _read(path, overrides, where)
    allowed = [f.name for f in fields(JobConfig)]
    unknown = [key for key in raw if key not in allowed]
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; allowed: {', '.join(allowed)}")
    if "prompts" not in raw:
        raise ConfigError(f"{where}: prompts is required: a list of prompts, or a .txt / .jsonl file")
    raw["sampler"] = sampler_section(raw.get("sampler", {}), where)
    axes = _axes(raw, where)
    config = _normalised(JobConfig(**raw), axes, where)
    _check_fields(config, where)
    return config, axes


def _read(path, overrides, where: str) -> dict:
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"{where}: no such config file; see configs/sample/ for examples")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override(s) {bad} must look like key=value, e.g. steps=20 sampler.name=euler_a")
    try:
        base = OmegaConf.load(path) if path is not None else OmegaConf.create({})
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
        raw = OmegaConf.to_container(merged, resolve=True)
    except (OmegaConfBaseException, OSError, ValueError) as error:
        raise ConfigError(f"{where}: cannot read the config: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a sampling config is a mapping of fields, got {type(raw).__name__}")
    return raw


def sampler_section(value, where: str) -> dict:
    """`sampler` as {name, schedule}; a plain string is the name."""
    section = {"name": value} if isinstance(value, str) or value is None else value
    if not isinstance(section, dict) or set(section) - {"name", "schedule"}:
        raise ConfigError(f"{where}: sampler={value!r} must be a name or a mapping with the fields name, schedule")
    return {"name": section.get("name"), "schedule": section.get("schedule", "default")}


def _axes(raw: dict, where: str) -> tuple[Axis, ...]:
    """Each sweepable field holding a list becomes an axis; its values are checked and must differ."""
    axes = []
    for name in _field_order(raw):
        value = get_field(raw, name)
        if name not in SWEEP_LABELS or not isinstance(value, list):
            continue
        if not value:
            raise ConfigError(f"{where}: {name}=[] sweeps nothing; give one value or a non-empty list")
        values = tuple(check(name, v, where) for v in value)
        if len(set(values)) != len(values):
            raise ConfigError(f"{where}: {name}={value!r} lists the same value twice (after normalising: "
                              f"{list(values)}); each sweep value must differ")
        axes.append(Axis(name, values))
    if len(axes) > MAX_AXES:
        raise ConfigError(f"{where}: {len(axes)} fields are lists ({', '.join(a.field for a in axes)}); a sweep "
                          f"has at most {MAX_AXES} axes (X, Y, Z): give the others a single value")
    return tuple(axes)


def _field_order(raw: dict):
    """Field names as written, sampler's two as sampler.name and sampler.schedule."""
    for top in raw:
        if top == "sampler":
            yield from (f"sampler.{key}" for key in raw["sampler"])
        else:
            yield top


def get_field(values: dict, name: str):
    """A field by its dotted name ("steps", "sampler.name") from a config's fields."""
    top, _, sub = name.partition(".")
    return values[top][sub] if sub else values.get(top)


def _normalised(config: JobConfig, axes: tuple[Axis, ...], where: str) -> JobConfig:
    """Single values of sweepable fields (and of the other single-valued fields) checked and normalised (`euler_a` ->
    "Euler a"); lists are the axes'."""
    swept = {axis.field for axis in axes}
    values = {name: check(name, get_field(vars(config), name), where)
              for name in (*SWEEP_LABELS, *SINGLE_FIELDS) if name not in swept}
    sampler = {**config.sampler, **{name[len("sampler."):]: v for name, v in values.items() if "." in name}}
    return replace(config, sampler=sampler, **{name: v for name, v in values.items() if "." not in name})


def _check_fields(config: JobConfig, where: str) -> None:
    for name in ("seed", "images_per_prompt", "batch_size"):
        check(name, getattr(config, name), where)
    if config.seeds is not None:
        check_seeds(config.seeds, where)
    _check_model(config, where)
    _choice(config.dtype, DTYPES, "dtype", where)
    _choice(config.on_bad_line, BAD_LINE_POLICIES, "on_bad_line", where)
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(config.device)):
        raise ConfigError(f"{where}: device={config.device!r} must be auto, cpu, mps, cuda or cuda:N")
    if not isinstance(config.grid, bool):
        raise ConfigError(f"{where}: grid={config.grid!r} must be true or false")
    if not isinstance(config.output, str) or not config.output or Path(config.output).is_file():
        raise ConfigError(f"{where}: output={config.output!r} must name a folder (it is created if missing)")
    check_filename(config.filename, where)


def _choice(value, allowed, name: str, where: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{where}: {name}={value!r} must be one of {', '.join(allowed)}")


def _check_model(config: JobConfig, where: str) -> None:
    if not isinstance(config.model, str) or not config.model:
        raise ConfigError(f"{where}: model={config.model!r} must name an embedded model "
                          f"({', '.join(EMBEDDED_MODELS)}), a diffusers folder or a single checkpoint file")
    try:
        path = resolve_model(config.model)  # an embedded model missing from this installation raises here
    except ValueError as error:
        raise ConfigError(f"{where}: model={config.model!r}: {error}") from None
    if not path.exists():
        raise ConfigError(f"{where}: model={config.model!r} does not exist; give an embedded model's name "
                          f"({', '.join(EMBEDDED_MODELS)}), a diffusers folder or a .safetensors/.ckpt file")
    if config.model_config is not None and not Path(config.model_config).is_file():
        raise ConfigError(f"{where}: model_config={config.model_config!r} is not a file; give the CompVis YAML "
                          "of a single-file model, or null")


def check_filename(template, where: str) -> None:
    """The template must format with the known fields and give a plain file name (no folders, no dot first)."""
    try:
        name = template.format(item=0, slug="a-prompt", seed=0, sweep="-steps20", edit="-from-image-0123456789")
    except (KeyError, IndexError, ValueError, AttributeError) as error:
        raise ConfigError(f"{where}: filename={template!r} cannot be formatted ({error!r}); its fields are "
                          f"{', '.join('{' + f + '}' for f in FILENAME_FIELDS)}") from None
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ConfigError(f"{where}: filename={template!r} must give a plain file name: no '/', no leading '.'")
