"""`ldm sample CONFIG.yaml [key=value ...]`, `ldm sample --from-png IMAGE.png`, `ldm info IMAGE.png`.

Exit codes of `ldm sample`: 0 every image made; 1 some images failed (the manifest says which) or the job is not
finished; 2 the config (or a prompt file, or the model) is invalid, and nothing was written; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm.metadata import PARAMETERS_KEY, SETTINGS_KEY, read_settings, regenerate_kwargs, save_png
from ldm.pipeline import LatentDiffusionPipeline
from ldm.sampling_job.edits import PIPELINES_BY_NAME, describe_edit, regeneration_inputs
from ldm.sampling_job.runner import RunResult, World, resolve_device, run_job
from ldm.sampling_job.work import load_job

OK, FAILED, INVALID, INTERRUPTED = 0, 1, 2, 130


def add_commands(subparsers) -> None:
    """Register `sample` and `info` on an argparse sub-parser set; each sets `handler(args) -> exit code`."""
    sample = subparsers.add_parser("sample", help="make a batch of images from a YAML config (resumable)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sample.add_argument("config", nargs="?", type=Path, help="e.g. configs/sample/batch.yaml")
    sample.add_argument("overrides", nargs="*", help="dotted overrides: steps=20 sampler.name=euler_a seeds=[1,2]")
    sample.add_argument("--from-png", type=Path, metavar="IMAGE.png", help="regenerate an image from its metadata")
    sample.add_argument("--output", type=Path, help="the output folder (same as output=DIR)")
    sample.set_defaults(handler=sample_command)
    info = subparsers.add_parser("info", help="print the generation parameters stored in a PNG")
    info.add_argument("image", type=Path)
    info.add_argument("--json", action="store_true", help="only the lossless JSON settings")
    info.set_defaults(handler=info_command)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ldm")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


# ----------------------------------------------------------------------------------------------------- sample

def sample_command(args: argparse.Namespace) -> int:
    if (args.config is None) == (args.from_png is None):
        return _invalid("give a config file, or --from-png IMAGE.png (not both)")
    try:
        if args.from_png is not None:
            if args.overrides:
                return _invalid(f"--from-png takes no overrides (got {args.overrides})")
            regenerate(args.from_png, args.output or Path("outputs/regenerated"))
            return OK
        overrides = [*args.overrides, *([f"output={args.output}"] if args.output else [])]
        job = load_job(args.config, overrides)
        world = World.from_environment()
        try:
            result = run_job(job, world=world)
        finally:
            world.leave()
    except ValueError as error:  # ConfigError, a model that cannot be loaded, a PNG without settings
        return _invalid(str(error))
    except KeyboardInterrupt:
        print("interrupted; run the same command again to finish the job", file=sys.stderr)
        return INTERRUPTED
    return _summarise(result, world)


def _invalid(message: str) -> int:
    print(f"ldm sample: error: {message}", file=sys.stderr)
    return INVALID


def _summarise(result: RunResult, world: World) -> int:
    who = f"rank {world.rank}: " if world.size > 1 else ""
    print(f"{who}made {result.made} images in {result.seconds:.1f} s (model load {result.load_seconds:.1f} s, then "
          f"{result.images_per_second:.2f} images/s), {result.failed} failed, {result.already_done} already done")
    if result.interrupted:
        print("stopped early; run the same command again to finish the job", file=sys.stderr)
        return INTERRUPTED
    if result.job is None:  # not rank 0: rank 0 reports the job
        return FAILED if result.failed else OK
    tally = result.job
    if tally.missing:
        print(f"the job is not finished: {tally.missing} images are missing (a process stopped?); run the same "
              "command again", file=sys.stderr)
        return FAILED
    print(f"job: {tally.ok} images ok, {tally.failed} failed; manifest: {tally.path}")
    if tally.failed:
        print(f"{tally.failed} images failed: see the lines with \"status\": \"failed\" in {tally.path}; running "
              "the same command again retries them", file=sys.stderr)
        return FAILED
    return OK


def regenerate(png: Path, folder: Path) -> Path:
    """Make the image `png`'s settings describe again (an edit from its input files, still at their recorded
    paths), write it to `folder` and say whether the pixels match."""
    path = folder / png.name
    if not png.is_file():
        raise ValueError(f"--from-png {png}: no such file")
    if path.resolve() == png.resolve():
        raise ValueError(f"--output {folder} would overwrite {png}; choose another folder")
    settings = read_settings(png)
    inputs = regeneration_inputs(settings, png)  # before the model loads: a missing input is a clear error
    request = settings.get("request", {})  # written by `ldm sample`: also the dtype and single-file YAML
    pipeline_class = PIPELINES_BY_NAME.get(settings.get("pipeline"), LatentDiffusionPipeline)
    pipe = pipeline_class.from_pretrained(settings["model"], config=request.get("model_config"),
                                          device=resolve_device("auto", World()),
                                          dtype=getattr(torch, request.get("dtype", "float32")))
    result = pipe(**regenerate_kwargs(settings), **inputs)
    save_png(result.images[0], path, {**settings, **result.settings[0]})
    with Image.open(png) as original:
        difference = np.abs(np.asarray(original.convert("RGB"), dtype=int) - np.asarray(result.images[0], dtype=int))
    verdict = "identical pixels" if difference.max() == 0 else f"differs by up to {difference.max()}/255"
    print(f"{path} ({verdict} to {png})")
    return path


# ------------------------------------------------------------------------------------------------------- info

def info_command(args: argparse.Namespace) -> int:
    try:
        with Image.open(args.image) as image:
            text = dict(getattr(image, "text", {}))
    except OSError as error:
        print(f"ldm info: error: {args.image}: {error}", file=sys.stderr)
        return INVALID
    if SETTINGS_KEY not in text and PARAMETERS_KEY not in text:
        print(f"ldm info: error: {args.image} holds no generation parameters", file=sys.stderr)
        return FAILED
    settings = json.loads(text[SETTINGS_KEY]) if SETTINGS_KEY in text else {}
    if not args.json and PARAMETERS_KEY in text:
        print(text[PARAMETERS_KEY])
    edit = describe_edit(settings)
    if not args.json and edit:
        print(edit)
    if SETTINGS_KEY in text:
        print(json.dumps(settings, indent=2, ensure_ascii=False, sort_keys=True))
    return OK
