"""The `ldm` command line. `ldm demo` generates a labelled grid and prints where it wrote it."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ldm.metadata import save_png

DEMO_PROMPTS = ["a red circle", "a large blue square", "赤い丸", "青い四角の左に赤い丸"]


def tiny_random_pipeline(seed: int = 0):
    """A randomly initialised, SD-shaped but tiny pipeline: it exercises every stage, and draws noise.

    It stands in for the embedded trained model until that model ships with the package."""
    from transformers import CLIPTextConfig

    from ldm.diffusers_schedulers import STABLE_DIFFUSION_CONFIG
    from ldm.loading import Components
    from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
    from ldm.models.text_encoders import CLIPTextEncoder, clip_tokenizer
    from ldm.models.unet import UNet, UNetConfig
    from ldm.pipeline import LatentDiffusionPipeline

    torch.manual_seed(seed)
    unet = UNet(UNetConfig(channels=(32, 64), attention_levels=(True, True), heads=(2, 4), transformer_depth=(1, 1),
                           context_dim=32, norm_groups=8)).eval()
    vae = AutoencoderKL(AutoencoderConfig(channels=(32, 64), norm_groups=8, layers_per_level=1)).eval()
    text_config = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 vocab_size=49408, max_position_embeddings=77)
    text = CLIPTextEncoder.from_config(text_config, clip_tokenizer())
    components = Components(unet, vae, text, dict(STABLE_DIFFUSION_CONFIG), {"path": "tiny-random", "format": "code"})
    return LatentDiffusionPipeline(components)


def labelled_grid(images: list[Image.Image], labels: list[str], columns: int) -> Image.Image:
    width, height = images[0].size
    label_height = 14
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * width, rows * (height + label_height)), "white")
    draw = ImageDraw.Draw(grid)
    for index, (image, label) in enumerate(zip(images, labels)):
        x, y = (index % columns) * width, (index // columns) * (height + label_height)
        grid.paste(image, (x, y))
        draw.text((x + 2, y + height + 1), label, fill="black")
    return grid


def demo(output: Path, steps: int, seed: int) -> Path:
    pipe = tiny_random_pipeline()
    started = time.perf_counter()
    result = pipe(DEMO_PROMPTS, num_inference_steps=steps, height=64, width=64, seed=seed)
    elapsed = time.perf_counter() - started
    result.save(output, prefix="demo")  # each image with its generation parameters
    images = [image.resize((128, 128), Image.NEAREST) for image in result.images]
    grid = labelled_grid(images, [f"{i}: seed {s}" for i, s in enumerate(result.seeds)], columns=len(images))
    path = save_png(grid, output / "demo-grid.png")  # the images above carry the parameters
    print(f"generated {len(images)} images in {elapsed:.1f} s for: " + " | ".join(DEMO_PROMPTS))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ldm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="generate a labelled grid of English and Japanese prompts")
    demo_parser.add_argument("--output", type=Path, default=Path("outputs/demo"))
    demo_parser.add_argument("--steps", type=int, default=20)
    demo_parser.add_argument("--seed", type=int, default=0)
    train_parser = commands.add_parser("train", help="train (or resume) a stage from a YAML config")
    train_parser.add_argument("config", type=Path, help="e.g. configs/train/shapes-autoencoder.yaml")
    train_parser.add_argument("overrides", nargs="*", help="dotted overrides such as train.steps=100")
    args = parser.parse_args(argv)
    if args.command == "demo":
        print(demo(args.output, args.steps, args.seed).resolve())
    elif args.command == "train":
        from ldm.training.stages import train

        print(train(args.config, args.overrides).resolve())
    return 0
