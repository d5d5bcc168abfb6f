"""A job as a deterministic list of work items: prompt item x sweep point x seed, each with a stable file name.

The list depends only on the config and the prompt file, so every run and every torchrun rank builds the same one.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ldm.sampling_job.config import (
    SWEEP_LABELS, Axis, ConfigError, JobConfig, check, check_seeds, effective_sampler, get_field, load_config,
)
from ldm.sampling_job.edits import EDIT_FIELDS, InputReader, edit_request

PROMPT_FILE_KINDS = (".txt", ".jsonl")
# What a prompt item (a JSONL line, or a mapping in the inline list) may set for itself.
ITEM_FIELDS = ("prompt", "negative_prompt", "seeds", "seed", "images_per_prompt", "steps", "guidance",
               "guidance_rescale", "width", "height", "sampler", "candidates", *EDIT_FIELDS)


@dataclass(frozen=True)
class PromptItem:
    number: int              # position among the job's prompt items (blank lines do not count)
    source: str              # where it was written: "prompts[2]" or "prompts.jsonl:4"
    fields: dict             # "prompt" and the item's own settings, checked; sampler as sampler.name/schedule
    folder: Path = Path()    # where its relative image/mask paths start: the folder of the file it is written in
    error: str | None = None  # on_bad_line=record: why the line could not be used


@dataclass(frozen=True)
class WorkItem:
    key: str                 # unique in the job: the image's file name without .png (a bad line: its source)
    number: int              # the prompt item it comes from
    source: str
    point: tuple = ()        # its value on each sweep axis
    request: dict | None = None  # everything that determines the image, JSON-safe; None for a bad line
    error: str | None = None

    @property
    def filename(self) -> str:
        return f"{self.key}.png"


@dataclass(frozen=True)
class Job:
    config: JobConfig
    axes: tuple[Axis, ...]
    items: tuple[WorkItem, ...]

    @property
    def output(self) -> Path:
        return Path(self.config.output)


def load_job(path: str | Path | None, overrides: list[str] = ()) -> Job:
    """Validate the config, its prompt file and its input images, and expand them into work items; raises
    ConfigError."""
    config, axes = load_config(path, overrides)
    return Job(config, axes, tuple(expand(config, axes, path, overrides)))


def folder_of_field(config_path: str | Path | None, overrides: list[str] = ()):
    """`folder(name)`: where a relative path in field `name` starts. A path is read from the folder of the file
    that names it, so a config and its inputs move together; a command-line override names it from the current
    folder, as any path typed in a shell."""
    overridden = {override.partition("=")[0].partition(".")[0] for override in overrides}
    config_folder = Path(config_path).parent if config_path is not None else Path.cwd()
    return lambda name: Path.cwd() if name in overridden else config_folder


# ------------------------------------------------------------------------------------------------ prompt items

def read_prompt_items(prompts, on_bad_line: str = "stop", folder: Path = Path()) -> list[PromptItem]:
    """Inline items, or the non-blank lines of a .txt (one prompt each) or .jsonl file ({"prompt": ..., ...}).
    `folder`: where `prompts` is written (a relative prompt file starts there; so do inline items' paths)."""
    if isinstance(prompts, list):
        entries, recordable = [(f"prompts[{i}]", "inline", entry) for i, entry in enumerate(prompts)], False
    elif isinstance(prompts, str):
        path = Path(os.path.abspath(folder / prompts))
        entries, recordable, folder = _file_entries(Path(prompts), path), on_bad_line == "record", path.parent
    else:
        raise ConfigError(f"prompts={prompts!r} must be a list of prompts or the path of a .txt or .jsonl file")
    items = []
    for number, (source, kind, raw) in enumerate(entries):
        try:
            items.append(PromptItem(number, source, _item_fields(_parse(kind, raw, source), source), folder))
        except ConfigError as error:
            if not recordable:  # the config itself is wrong, or the policy says stop before any work
                raise
            items.append(PromptItem(number, source, {}, folder, str(error)))
    if not items:
        raise ConfigError(f"prompts={prompts!r} holds no prompt")
    return items


def _file_entries(given: Path, path: Path) -> list[tuple[str, str, bytes]]:
    """The lines of prompt file `path`, named in sources by the path as `given`."""
    if path.suffix not in PROMPT_FILE_KINDS:
        raise ConfigError(f"prompts={str(given)!r}: a prompt file ends in {' or '.join(PROMPT_FILE_KINDS)} "
                          "(one prompt per line, or one JSON object per line)")
    if not path.is_file():
        raise ConfigError(f"prompts={str(given)!r}: no such file (looked for {path}; a relative path starts at "
                          "the folder of the config that names it, or at the current folder on the command line)")
    lines = path.read_bytes().split(b"\n")  # bytes: a line that is not UTF-8 is reported by its number
    return [(f"{given}:{number}", path.suffix[1:], line.rstrip(b"\r"))
            for number, line in enumerate(lines, start=1) if line.strip()]


def _parse(kind: str, raw, source: str):
    if kind == "inline":
        return raw
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{source}: the line is not UTF-8 text (byte {error.start + 1}); save the file "
                          "as UTF-8") from None
    if kind == "txt":
        return text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{source}: not a JSON object ({error.msg} at column {error.colno}); each line is "
                          '{"prompt": "...", ...}') from None


def _item_fields(entry, source: str) -> dict:
    if isinstance(entry, str):
        entry = {"prompt": entry}
    if not isinstance(entry, dict):
        raise ConfigError(f"{source}: {entry!r} must be a prompt or an object with a prompt")
    unknown = [key for key in entry if key not in ITEM_FIELDS]
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {unknown}; an item may set {', '.join(ITEM_FIELDS)}")
    prompt = entry.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError(f"{source}: prompt={prompt!r} must be a non-empty string")
    fields = {"prompt": prompt}
    for key, value in entry.items():
        if key == "seeds":
            fields[key] = check_seeds(value, source)
        elif key == "sampler":
            fields.update(_item_sampler(value, source))
        elif key != "prompt":
            fields[key] = check(key, value, source)
    return fields


def _item_sampler(value, source: str) -> dict:
    """Only the sampler fields an item gives (a plain string is the name)."""
    section = {"name": value} if isinstance(value, str) else value
    if not isinstance(section, dict) or not section or set(section) - {"name", "schedule"}:
        raise ConfigError(f"{source}: sampler={value!r} must be a name or a mapping with the fields name, schedule")
    return {f"sampler.{key}": check(f"sampler.{key}", v, source) for key, v in section.items()}


# ------------------------------------------------------------------------------------------------ expansion

def expand(config: JobConfig, axes: tuple[Axis, ...], config_path: str | Path | None = None,
           overrides: list[str] = ()) -> list[WorkItem]:
    """The work items of `config`, read from `config_path` with `overrides` (see `folder_of_field`)."""
    base = {name: get_field(vars(config), name) for name in SWEEP_LABELS}
    folder = folder_of_field(config_path, overrides)
    read = InputReader()
    for name in ("image", "mask"):  # the config's own files, named as the config's
        if getattr(config, name) is not None:
            read(getattr(config, name), folder(name), name, str(config_path or "config"))
    items = []
    for prompt_item in read_prompt_items(config.prompts, config.on_bad_line, folder("prompts")):
        if prompt_item.error:
            items.append(WorkItem(prompt_item.source, prompt_item.number, prompt_item.source,
                                  error=prompt_item.error))
            continue
        _refuse_swept_overrides(prompt_item, axes)
        settings = {**base, **{k: v for k, v in prompt_item.fields.items() if k in SWEEP_LABELS}}
        for point in itertools.product(*(axis.values for axis in axes)):
            at_point = {**settings, **{axis.field: value for axis, value in zip(axes, point)}}
            edit_fields = {name: at_point.get(name, prompt_item.fields.get(name, getattr(config, name)))
                           for name in EDIT_FIELDS}
            folders = {name: prompt_item.folder if name in prompt_item.fields else folder(name)
                       for name in ("image", "mask")}
            edit = edit_request(edit_fields, folders, read, prompt_item.source)
            for seed in _seeds(config, prompt_item.fields):
                request = {**_request(config, prompt_item, at_point, seed), **edit}
                key = _file_stem(config.filename, prompt_item, seed, axes, point, edit)
                items.append(WorkItem(key, prompt_item.number, prompt_item.source, point, request))
    _check_unique(items, config.filename)
    return items


def _refuse_swept_overrides(item: PromptItem, axes: tuple[Axis, ...]) -> None:
    for axis in axes:
        if axis.field in item.fields:
            raise ConfigError(f"{item.source}: sets {axis.field}, which the config sweeps over "
                              f"{list(axis.values)}; remove one of the two")


def _seeds(config: JobConfig, fields: dict) -> list[int]:
    """An item's seeds: its own `seeds`, else its own seed/images_per_prompt over the config's, else the
    config's `seeds`, else images_per_prompt seeds counting up from `seed` (the pipeline's rule)."""
    if "seeds" in fields:
        return fields["seeds"]
    if config.seeds is not None and not {"seed", "images_per_prompt"} & fields.keys():
        return config.seeds
    start = fields.get("seed", config.seed)
    return [start + k for k in range(fields.get("images_per_prompt", config.images_per_prompt))]


def _request(config: JobConfig, item: PromptItem, settings: dict, seed: int) -> dict:
    sampler = effective_sampler(settings["sampler.name"], settings["sampler.schedule"], item.source)
    return {
        "model": config.model, "model_config": config.model_config, "dtype": config.dtype,
        "prompt": item.fields["prompt"], "negative_prompt": settings["negative_prompt"], "seed": seed,
        "width": settings["width"], "height": settings["height"], "steps": settings["steps"],
        "guidance": settings["guidance"], "guidance_rescale": settings["guidance_rescale"], "sampler": sampler,
        "candidates": item.fields.get("candidates", config.candidates),
    }


def _file_stem(template: str, item: PromptItem, seed: int, axes: tuple[Axis, ...], point: tuple,
               edit: dict) -> str:
    sweep = "".join(f"-{axis.label}{value_slug(value)}" for axis, value in zip(axes, point))
    return template.format(item=item.number, slug=slug(item.fields["prompt"]), seed=seed, sweep=sweep,
                           edit=edit_stem(edit))


def edit_stem(edit: dict) -> str:
    """The name's {edit} part: "" for text-to-image, else "-from-<image name>-<sha256>[-mask-<sha256>]", so images
    made from other inputs never take each other's names."""
    if not edit:
        return ""
    stem = f"-from-{slug(Path(edit['image']).stem, limit=24, empty='image')}-{edit['image_sha256']}"
    return stem + (f"-mask-{edit['mask_sha256']}" if edit["mask"] else "")


def slug(text: str, limit: int = 40, empty: str = "prompt") -> str:
    """Lower-case ASCII words joined by '-' ("DPM++ 2M" -> "dpmpp-2m"), whole words up to `limit` characters
    (a first word longer than that is cut); `empty` when nothing is left."""
    words = re.sub(r"[^a-z0-9]+", "-", text.casefold().replace("+", "p")).strip("-")
    if len(words) > limit:
        head = words[:limit + 1]
        words = head.rsplit("-", 1)[0] if "-" in head else words[:limit]
    return words or empty


def value_slug(value) -> str:
    return f"-{slug(value, empty='none')}" if isinstance(value, str) else str(value).lower()


def _check_unique(items: list[WorkItem], template: str) -> None:
    seen: dict[str, WorkItem] = {}
    for item in items:
        other = seen.setdefault(item.key, item)
        if other is not item:
            raise ConfigError(f"filename={template!r} gives two images the same name {item.filename!r} "
                              f"({other.source} and {item.source}); use {{item}}, {{seed}} and {{sweep}} in it")
