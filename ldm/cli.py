"""The `ldm` command line. `ldm demo` generates a labelled grid and prints where it wrote it; `ldm edit` edits an
image by instruction (or, with --mask / --strength, inpaints / redraws it from a prompt)."""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import torch

from ldm.errors import LdmError
from ldm.grids import labelled_grid
from ldm.metadata import save_png
from ldm.pipeline import LatentDiffusionPipeline
from ldm.sampling_job import add_commands as add_sampling_commands
from ldm.sampling_job.work import slug

# (English, Japanese) pairs with the same meaning; the last asks for a colour-shape pair never seen in training.
DEMO_PROMPTS = [
    ("a red circle", "赤い丸"),
    ("a large blue square", "大きい青い四角"),
    ("two yellow triangles", "黄色い三角が二つ"),
    ("a red circle to the left of a blue square", "青い四角の左に赤い丸"),
    ("a blue triangle and a red square", "青い三角と赤い四角"),
    ("a red square on a black background", "黒い背景に赤い四角"),
    ("a purple triangle", "紫の三角"),
]
DEMO_CANDIDATES = 2


def demo(output: Path, steps: int | None, seed: int) -> Path:
    """English prompts in the first row, the same prompts in Japanese in the second, one seed per column."""
    started = time.perf_counter()
    pipe = LatentDiffusionPipeline.from_pretrained()
    english, japanese = zip(*DEMO_PROMPTS)
    prompts = [*english, *japanese]
    seeds = [seed + column for column in range(len(english))] * 2  # a column shares its seed across languages
    # 2 candidates, not the model's 4: the grid must stay under 20 s on 2 cores (README, Candidates)
    result = pipe(prompts, num_inference_steps=steps, num_candidates=DEMO_CANDIDATES,
                  generator=[torch.Generator().manual_seed(s) for s in seeds])
    result.save(output, prefix="demo")  # each image with its generation parameters
    # The default font has no Japanese glyphs, so the second row is labelled by meaning; the exact Japanese
    # prompt is in each image's PNG metadata and printed below.
    labels = [*english, *(f"JA: {text}" for text in english)]
    path = save_png(labelled_grid(result.images, labels, columns=len(english)), output / "demo-grid.png")
    print(f"generated {len(prompts)} images in {time.perf_counter() - started:.1f} s (model load included):")
    for en, ja in DEMO_PROMPTS:
        print(f"  {en}  |  {ja}")
    return path


def _written(report, output: Path | None):
    """The report, after writing its details as JSON to `output` when one is given."""
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(report.to_json(), encoding="utf-8")
    return report


def edit(image: Path, text: str, args: argparse.Namespace) -> list[Path]:
    """By instruction on an instruction model (the default, embedded "shapes-edit"); with --mask, inpainting; with
    --strength alone, image-to-image (both on the text-to-image model "shapes" unless --model says otherwise)."""
    from ldm.editing import ImageToImagePipeline, InpaintPipeline, InstructPix2PixPipeline, open_image

    source = open_image(str(image))  # a missing or non-image file is a clear error before any model loads
    common = {"num_inference_steps": args.steps, "seed": args.seed, "num_images_per_prompt": args.images}
    if args.mask is not None:
        pipe = InpaintPipeline.from_pretrained(args.model)
        result = pipe(text, image=source, mask_image=open_image(str(args.mask), "mask"), keep_unmasked=True,
                      strength=args.strength or 1.0, mask_blur=args.mask_blur, guidance_scale=args.guidance,
                      **common)
    elif args.strength is not None:
        pipe = ImageToImagePipeline.from_pretrained(args.model)
        result = pipe(text, image=source, strength=args.strength, guidance_scale=args.guidance, **common)
    else:
        pipe = InstructPix2PixPipeline.from_pretrained(args.model)
        result = pipe(text, image=source, guidance_scale=args.guidance, image_guidance_scale=args.image_guidance,
                      num_candidates=args.candidates, **common)
    # one file per input and text; the hash tells texts apart that have no ASCII words (Japanese)
    text_hash = hashlib.sha256(text.encode()).hexdigest()[:6]
    return result.save(args.output, prefix=f"{image.stem}-{slug(text, empty='edit')}-{text_hash}")


def convert(source: str, destination: Path, format: str, dtype: torch.dtype, config: str | None) -> None:
    """Any model ldm loads (text-to-image, inpainting or instruction UNets alike), rewritten in `format`."""
    from ldm.loading import load_components

    _save(load_components(source, config=config), destination, format, dtype)


def average(sources: list[str], destination: Path, weights: list[float] | None, format: str,
            dtype: torch.dtype) -> None:
    """The weighted mean of models of one architecture (ldm/averaging.py), the first one's configs kept."""
    from ldm.averaging import average_models
    from ldm.loading import load_components

    _save(average_models([load_components(source) for source in sources], weights), destination, format, dtype)


def _save(components, destination: Path, format: str, dtype: torch.dtype) -> None:
    from ldm.loading import save_diffusers_folder, save_single_file

    for module in components.networks.values():
        module.to(dtype=dtype)
    save = save_diffusers_folder if format == "diffusers" else save_single_file
    save(components, destination)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ldm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="generate a labelled grid of English and Japanese prompts")
    demo_parser.add_argument("--output", type=Path, default=Path("outputs/demo"))
    demo_parser.add_argument("--steps", type=int, default=None, help="default: the model's recommendation")
    demo_parser.add_argument("--seed", type=int, default=0)
    train_parser = commands.add_parser("train", help="train (or resume) a stage from a YAML config")
    train_parser.add_argument("config", type=Path, help="e.g. configs/train/shapes-autoencoder.yaml")
    train_parser.add_argument("overrides", nargs="*", help="dotted overrides such as train.steps=100")
    eval_parser = commands.add_parser("eval", help="ShapeEval: score a model's images with the shapes detector")
    eval_parser.add_argument("--model", default="shapes")
    eval_parser.add_argument("--steps", type=int, default=20)
    eval_parser.add_argument("--guidance", type=float, default=5.0)
    eval_parser.add_argument("--images-per-prompt", type=int, default=4)
    eval_parser.add_argument("--limit", type=int, default=None, help="prompts per category (and split), for a quick run")
    eval_parser.add_argument("--output", type=Path, default=None, help="write per-image results as JSON")
    eval_parser.add_argument("--task", choices=("text_to_image", "edit", "relation_gap"), default="text_to_image",
                             help="edit: success/preservation of an instruction model (default model shapes-edit); "
                             "relation_gap: the UNet's error with a contradicting caption over the true one's, "
                             "per noise level (ldm/relation_gap.py)")
    eval_parser.add_argument("--scenes", type=int, default=64, help="relation_gap task: two-object scenes")
    eval_parser.add_argument("--image-guidance", type=float, default=1.5, help="edit task: image guidance scale")
    eval_parser.add_argument("--candidates", type=int, default=1,
                             help="images drawn per scored image, the one its prompt (or instruction) fits best "
                             "kept (ldm/candidates.py); default 1, the plain draw")
    eval_parser.add_argument("--wording", choices=("original", "extended", "unseen"), default="original",
                             help="edit task: instructions in the original training templates (the reported "
                             "benchmark), the extended ones, or in words no training template uses (single changes)")
    edit_parser = commands.add_parser("edit", help="edit an image by instruction (or inpaint with --mask, "
                                      "redraw with --strength); writes PNGs with their parameters")
    edit_parser.add_argument("image", type=Path)
    edit_parser.add_argument("text", help='the instruction ("make the circle blue", "背景を黒にして"); with '
                             "--mask or --strength, the prompt for the new image")
    edit_parser.add_argument("--mask", type=Path, default=None, help="white = repaint (inpainting)")
    edit_parser.add_argument("--strength", type=float, default=None, help="img2img: share of steps to redo, (0, 1]")
    edit_parser.add_argument("--model", default=None, help="default: shapes-edit (instructions) or shapes")
    edit_parser.add_argument("--steps", type=int, default=None, help="default: the model's recommendation")
    edit_parser.add_argument("--seed", type=int, default=0)
    edit_parser.add_argument("--images", type=int, default=1, help="images to make")
    edit_parser.add_argument("--guidance", type=float, default=None,
                             help="text guidance scale (default: the model's recommendation, else 7.5)")
    edit_parser.add_argument("--image-guidance", type=float, default=None,
                             help="instructions: image guidance (default: the model's recommendation, else 1.5)")
    edit_parser.add_argument("--candidates", type=int, default=None,
                             help="instructions: edits drawn per image, the one the instruction fits best kept "
                             "(default: the model's recommendation, else 1)")
    edit_parser.add_argument("--mask-blur", type=float, default=0, help="inpainting: feather the mask (pixels)")
    edit_parser.add_argument("--output", type=Path, default=Path("outputs/edit"))
    convert_parser = commands.add_parser("convert", help="rewrite a model as a diffusers folder or a single file")
    convert_parser.add_argument("source", help="a model name, diffusers folder or single file")
    convert_parser.add_argument("destination", type=Path)
    convert_parser.add_argument("--config", default=None, help="the CompVis YAML of a single-file source")
    average_parser = commands.add_parser("average", help="average the weights of models of one architecture "
                                         "(fine-tunes of one parent) into a new model")
    average_parser.add_argument("sources", nargs="+", help="two or more model names, diffusers folders or single "
                                "files; the first one's configs and recommended settings are kept")
    average_parser.add_argument("--output", type=Path, required=True)
    average_parser.add_argument("--weights", type=float, nargs="+", default=None,
                                help="one positive weight per source, scaled to sum to 1 (default: equal)")
    for writing_parser in (convert_parser, average_parser):
        writing_parser.add_argument("--format", choices=("diffusers", "single_file"), default="diffusers")
        writing_parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    add_sampling_commands(commands)
    args = parser.parse_args(argv)
    if hasattr(args, "handler"):  # sample, info
        return args.handler(args)
    try:
        _run(args)
    except (LdmError, ValueError) as error:  # bad input: one clear line, not a traceback
        print(f"ldm {args.command}: {error}", file=sys.stderr)
        return 2
    return 0


def _run(args: argparse.Namespace) -> None:
    if args.command == "eval" and args.task == "edit":
        from ldm.edit_evaluation import evaluate_edit_model

        model = "shapes-edit" if args.model == "shapes" else args.model
        report = evaluate_edit_model(model, args.steps, args.guidance, args.image_guidance, args.images_per_prompt,
                                     args.limit or 16, candidates=args.candidates, wording=args.wording)
        print(_written(report, args.output).table())
    elif args.command == "eval" and args.task == "relation_gap":
        from ldm.relation_gap import gap_table, relation_gaps

        print(gap_table(relation_gaps(args.model, args.scenes)))
    elif args.command == "eval":
        from ldm.evaluation import evaluate_model

        report = evaluate_model(args.model, args.steps, args.guidance, args.images_per_prompt, args.limit,
                                candidates=args.candidates)
        print(_written(report, args.output).table())
    elif args.command == "edit":
        for path in edit(args.image, args.text, args):
            print(path.resolve())
    elif args.command == "demo":
        print(demo(args.output, args.steps, args.seed).resolve())
    elif args.command == "convert":
        convert(args.source, args.destination, args.format, getattr(torch, args.dtype), args.config)
        print(args.destination.resolve())
    elif args.command == "average":
        average(args.sources, args.output, args.weights, args.format, getattr(torch, args.dtype))
        print(args.output.resolve())
    elif args.command == "train":
        from ldm.training.stages import train

        print(train(args.config, args.overrides).resolve())
