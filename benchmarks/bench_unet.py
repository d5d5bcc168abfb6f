"""Speed of `ldm` next to diffusers on the same random weights, printed as one side-by-side table.

Rows: one UNet step (no grad) for an SD1.5-shaped UNet and a small one, in fp32 and under bf16 autocast, then
one whole 20-step image from a tiny pipeline folder loaded by both packages, then the demo's work on the embedded
model `shapes` (loading it; its 14-image English/Japanese grid at the model's recommended settings). Each cell is
the median of N timed repeats after warm-up; the ratio column is ldm / diffusers (below 1 means ldm is faster). The
fp32 rows also print the largest output difference, so a fast-but-wrong model cannot hide in the table.

    python benchmarks/bench_unet.py [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ldm import LatentDiffusionPipeline
from ldm.checkpoints.diffusers_folder import unet_config_from_diffusers
from ldm.models.text_encoders import clip_tokenizer
from ldm.models.unet import UNet

LATENT_SIZE = 32  # latent height and width of every UNet row (256x256 pixels for SD1.5)
CFG_BATCH = 2  # classifier-free guidance runs the unconditional and conditional halves as one batch
CONTEXT_TOKENS = 77
PIPELINE_STEPS = 20
PIPELINE_GUIDANCE = 7.5

# diffusers' UNet2DConditionModel defaults are SD1.5's shape (320..1280 channels, context 768, 8 heads).
SD15_UNET: dict = {}
SMALL_UNET = dict(
    block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=32, norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=4, sample_size=LATENT_SIZE,
)
SMALL_VAE = dict(
    block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, layers_per_block=1,
)


@dataclass
class Settings:
    device: torch.device
    repeats: int  # timed calls per cell; the cell shows their median
    warmup: int  # untimed calls first, so one-off costs (allocator, kernel selection) stay out of the median
    pipeline_repeats: int  # whole images are ~PIPELINE_STEPS UNet calls each, so fewer of them


@dataclass
class Row:
    name: str
    ldm_seconds: float
    diffusers_seconds: float
    max_difference: float | None = None  # |ldm - diffusers| on the timed inputs, fp32 rows only

    def cells(self) -> list[str]:
        difference = "" if self.max_difference is None else f"{self.max_difference:.1e}"
        return [self.name, f"{self.ldm_seconds * 1e3:.1f}", f"{self.diffusers_seconds * 1e3:.1f}",
                f"{self.ldm_seconds / self.diffusers_seconds:.2f}", difference]


# ---------------------------------------------------------------------------------------------------- timing

def synchronize(device: torch.device) -> None:
    """CUDA calls return before the work is done; wait for it so the clock measures the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(call: Callable[[], object], settings: Settings, repeats: int) -> float:
    for _ in range(settings.warmup):
        call()
    synchronize(settings.device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        synchronize(settings.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def precision(name: str, device: torch.device):
    """fp32 runs as is; "bf16" runs the fp32 weights under autocast, the cheap way to use bf16 on any device."""
    if name == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------------- models

def randomize(module: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """Give every parameter seeded N(0, std) values: diffusers' default init zeroes some layers (conv_out),
    and a UNet that outputs zeros would time a different amount of work than a trained one."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return module.eval()


def unet_pair(diffusers_kwargs: dict, device: torch.device) -> tuple[UNet, torch.nn.Module]:
    """(ours, theirs): a random diffusers UNet and our UNet loaded from its config and state_dict."""
    from diffusers import UNet2DConditionModel

    theirs = randomize(UNet2DConditionModel(**diffusers_kwargs), seed=0)
    ours = UNet(unet_config_from_diffusers(dict(theirs.config)))
    ours.load_state_dict(theirs.state_dict())
    return ours.eval().to(device), theirs.to(device)


def unet_inputs(theirs: torch.nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A CFG-sized latent batch, one timestep per sample, and text tokens of the UNet's context width."""
    generator = torch.Generator().manual_seed(1)
    config = theirs.config
    latents = torch.randn(CFG_BATCH, config.in_channels, LATENT_SIZE, LATENT_SIZE, generator=generator)
    context = torch.randn(CFG_BATCH, CONTEXT_TOKENS, config.cross_attention_dim, generator=generator)
    timesteps = torch.full((CFG_BATCH,), 500)
    return latents.to(device), timesteps.to(device), context.to(device)


def tiny_pipeline_folder(folder: str) -> None:
    """Write a random-weight SD1-shaped StableDiffusionPipeline with diffusers' own save_pretrained."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_config = CLIPTextConfig(
        hidden_size=SMALL_UNET["cross_attention_dim"], intermediate_size=37, num_hidden_layers=3,
        num_attention_heads=4, vocab_size=49408, max_position_embeddings=CONTEXT_TOKENS, hidden_act="quick_gelu",
    )
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    StableDiffusionPipeline(
        unet=randomize(UNet2DConditionModel(**SMALL_UNET), seed=1),
        vae=randomize(AutoencoderKL(**SMALL_VAE), seed=2),
        text_encoder=randomize(CLIPTextModel(text_config), seed=3),
        tokenizer=clip_tokenizer(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(folder)


# ---------------------------------------------------------------------------------------------------- rows

def unet_rows(label: str, diffusers_kwargs: dict, settings: Settings) -> list[Row]:
    ours, theirs = unet_pair(diffusers_kwargs, settings.device)
    x, t, context = unet_inputs(theirs, settings.device)
    rows = []
    with torch.no_grad():
        difference = (ours(x, t, context) - theirs(x, t, context).sample).abs().max().item()
        for mode in ("fp32", "bf16"):
            def run_ours():
                with precision(mode, settings.device):
                    return ours(x, t, context)

            def run_theirs():
                with precision(mode, settings.device):
                    return theirs(x, t, context).sample

            rows.append(Row(
                f"{label} UNet step, {mode}",
                median_seconds(run_ours, settings, settings.repeats),
                median_seconds(run_theirs, settings, settings.repeats),
                difference if mode == "fp32" else None,
            ))
    return rows


def pipeline_row(settings: Settings) -> Row:
    """One fp32 image of PIPELINE_STEPS steps with CFG, each package loading the same folder, same latents."""
    from diffusers import StableDiffusionPipeline

    with tempfile.TemporaryDirectory() as folder:
        tiny_pipeline_folder(folder)
        theirs = StableDiffusionPipeline.from_pretrained(folder).to(settings.device)
        ours = LatentDiffusionPipeline.from_pretrained(folder).to(settings.device)
    latents = torch.randn(1, 4, LATENT_SIZE, LATENT_SIZE, generator=torch.Generator().manual_seed(0))
    size = LATENT_SIZE * ours.latent_factor
    call = dict(prompt="a red circle", num_inference_steps=PIPELINE_STEPS, guidance_scale=PIPELINE_GUIDANCE,
                height=size, width=size)
    return pipeline_pair_row(f"small pipeline, {PIPELINE_STEPS} steps, {size}px", ours, theirs, latents, call, settings)


def pipeline_pair_row(name: str, ours, theirs, latents: torch.Tensor, call: dict, settings: Settings) -> Row:
    """Both pipelines called alike from the same initial latents: their median times and largest image difference."""
    theirs.set_progress_bar_config(disable=True)
    ours.progress_bar = False

    def run_ours():
        return ours(latents=latents, output_type="pt", **call).images

    def run_theirs():
        return theirs(latents=latents.to(settings.device), output_type="pt", **call).images

    difference = (run_ours().float().cpu() - run_theirs().float().cpu()).abs().max().item()
    return Row(name, median_seconds(run_ours, settings, settings.pipeline_repeats),
               median_seconds(run_theirs, settings, settings.pipeline_repeats), difference)


def shapes_rows(settings: Settings) -> list[Row]:
    """What `ldm demo` times: loading the embedded model, then the grid of ldm.cli.DEMO_PROMPTS (English and
    Japanese, one seed per column) at its recommended steps and guidance, both packages from the same folder and
    the same initial latents, so the two columns time the same images."""
    from diffusers import StableDiffusionPipeline

    from ldm.cli import DEMO_PROMPTS
    from ldm.loading import EMBEDDED_MODELS

    folder = EMBEDDED_MODELS["shapes"]

    def load_ours():
        return LatentDiffusionPipeline.from_pretrained("shapes").to(settings.device)

    def load_theirs():  # the files are fp16; ldm computes in fp32, so diffusers is asked for fp32 too
        return StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32).to(settings.device)

    load = Row("load the embedded model shapes", median_seconds(load_ours, settings, settings.pipeline_repeats),
               median_seconds(load_theirs, settings, settings.pipeline_repeats))
    ours = load_ours()
    english, japanese = zip(*DEMO_PROMPTS)
    shape = (len(english), ours.latent_channels, ours.unet.config.sample_size, ours.unet.config.sample_size)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0)).repeat(2, 1, 1, 1)  # seed per column
    call = dict(prompt=[*english, *japanese], **ours.sampling_defaults)
    return [load, pipeline_pair_row(f"shapes demo grid, {latents.shape[0]} images", ours, load_theirs(), latents,
                                    call, settings)]


# ---------------------------------------------------------------------------------------------------- main

def print_table(rows: list[Row], settings: Settings) -> None:
    header = ["case", "ldm ms", "diffusers ms", "ldm/diff", "max |diff|"]
    table = [header] + [row.cells() for row in rows]
    widths = [max(len(line[column]) for line in table) for column in range(len(header))]
    print(f"device {settings.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {settings.repeats} (UNet) / {settings.pipeline_repeats} (pipeline) after {settings.warmup} "
          f"warm-up; UNet batch {CFG_BATCH}, {LATENT_SIZE}x{LATENT_SIZE} latents, {CONTEXT_TOKENS} tokens")
    for index, line in enumerate(table):
        print("  ".join(cell.ljust(width) if column == 0 else cell.rjust(width)
                        for column, (cell, width) in enumerate(zip(line, widths))))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def parse_settings(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one timed repeat per cell instead of several")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device to time on (default: cuda when available, else cpu)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if args.quick:
        return Settings(device, repeats=1, warmup=1, pipeline_repeats=1)
    return Settings(device, repeats=3, warmup=1, pipeline_repeats=3)


def quiet_libraries() -> None:
    """Saving and loading the pipeline folder draws progress bars that would break up the table."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    quiet_libraries()
    rows = unet_rows("SD1.5", SD15_UNET, settings)
    rows += unet_rows("small", SMALL_UNET, settings)
    rows.append(pipeline_row(settings))
    rows += shapes_rows(settings)
    print_table(rows, settings)


if __name__ == "__main__":
    main()
