"""Tiny components built in code (random weights), shared by the parity tests."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Replace every parameter with N(0, std): default inits leave zeros (e.g. conv_out) that hide mistakes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return module.eval()


# Tiny diffusers UNet configs shaped like SD1 (conv projections, one head count) and SD2 (linear projections,
# per-level heads, upcast attention), plus the matching settings of our UNetConfig.
TINY_UNETS = {
    "sd1": dict(
        block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=16, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2, sample_size=8,
    ),
    "sd2": dict(
        block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=24, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4, 4), use_linear_projection=True, upcast_attention=True, sample_size=8,
        transformer_layers_per_block=(1, 2, 1),
    ),
}

TINY_VAE = dict(
    block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, layers_per_block=1,
)


@pytest.fixture(params=sorted(TINY_UNETS))
def diffusers_unet(request):
    from diffusers import UNet2DConditionModel

    return randomize(UNet2DConditionModel(**TINY_UNETS[request.param]))


@pytest.fixture
def diffusers_vae():
    from diffusers import AutoencoderKL

    return randomize(AutoencoderKL(**TINY_VAE))


def tiny_diffusers_pipeline(kind: str = "sd1", scheduler_config: dict | None = None):
    """A random-weight StableDiffusionPipeline built by diffusers itself (SD1- or SD2-shaped, v-prediction for SD2)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.models.text_encoders import clip_tokenizer

    unet_kwargs = dict(TINY_UNETS[kind])
    text_config = CLIPTextConfig(
        hidden_size=unet_kwargs["cross_attention_dim"], intermediate_size=37, num_hidden_layers=3,
        num_attention_heads=4, vocab_size=49408, max_position_embeddings=77, projection_dim=16,
        hidden_act="quick_gelu" if kind == "sd1" else "gelu",
    )
    prediction = "epsilon" if kind == "sd1" else "v_prediction"
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False, prediction_type=prediction)
    pipe = StableDiffusionPipeline(
        unet=randomize(UNet2DConditionModel(**unet_kwargs), seed=1),
        vae=randomize(AutoencoderKL(**TINY_VAE), seed=2, std=0.05),
        text_encoder=randomize(CLIPTextModel(text_config), seed=3, std=0.05),
        tokenizer=clip_tokenizer(pad_token="<|endoftext|>" if kind == "sd1" else "!"),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    if scheduler_config is not None:
        pipe.scheduler = scheduler_config
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session", params=["sd1", "sd2"])
def tiny_sd_folder(request, tmp_path_factory):
    """(kind, folder, diffusers pipeline): a tiny pipeline written by diffusers' own save_pretrained."""
    pipe = tiny_diffusers_pipeline(request.param)
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    pipe.save_pretrained(folder)
    return request.param, folder, pipe


def tiny_random_components(seed: int = 0, unet_channels: tuple[int, int] = (32, 64)):
    """A randomly initialised, SD-shaped but tiny model: it exercises every stage in milliseconds."""
    from transformers import CLIPTextConfig

    from ldm.diffusers_schedulers import STABLE_DIFFUSION_CONFIG
    from ldm.loading import Components
    from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
    from ldm.models.text_encoders import CLIPTextEncoder, clip_tokenizer
    from ldm.models.unet import UNet, UNetConfig

    torch.manual_seed(seed)
    unet = UNet(UNetConfig(channels=unet_channels, attention_levels=(True, True), heads=(2, 4),
                           transformer_depth=(1, 1), context_dim=32, norm_groups=8)).eval()
    vae = AutoencoderKL(AutoencoderConfig(channels=(32, 64), norm_groups=8, layers_per_level=1)).eval()
    text_config = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 vocab_size=49408, max_position_embeddings=77)
    text = CLIPTextEncoder.from_config(text_config, clip_tokenizer())
    return Components(unet, vae, text, dict(STABLE_DIFFUSION_CONFIG), {"path": "tiny-random", "format": "code"})


def tiny_random_pipeline(seed: int = 0):
    from ldm.pipeline import LatentDiffusionPipeline

    return LatentDiffusionPipeline(tiny_random_components(seed))


# The diffusers editing pipelines, by task, with the UNet input width each one's checkpoints have.
EDITING_PIPELINES = {
    "img2img": ("StableDiffusionImg2ImgPipeline", 4),
    "inpaint": ("StableDiffusionInpaintPipeline", 9),
    "inpaint-4ch": ("StableDiffusionInpaintPipeline", 4),
    "pix2pix": ("StableDiffusionInstructPix2PixPipeline", 8),
}


def tiny_editing_pipeline(task: str):
    """A random-weight diffusers editing pipeline (see EDITING_PIPELINES), SD1-shaped: tiny_diffusers_pipeline's
    parts, with a UNet of the task's input width."""
    import diffusers
    from diffusers import UNet2DConditionModel

    class_name, in_channels = EDITING_PIPELINES[task]
    parts = tiny_diffusers_pipeline("sd1").components
    parts["unet"] = randomize(UNet2DConditionModel(**TINY_UNETS["sd1"], in_channels=in_channels), seed=1)
    pipe = getattr(diffusers, class_name)(**parts, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_editing_folder(tmp_path_factory):
    """task -> (folder, diffusers pipeline): tiny editing pipelines written by diffusers' own save_pretrained, each
    built on first use."""
    built = {}

    def folder_for(task: str):
        if task not in built:
            pipe = tiny_editing_pipeline(task)
            folder = tmp_path_factory.mktemp(f"tiny-{task}")
            pipe.save_pretrained(folder)
            built[task] = folder, pipe
        return built[task]

    return folder_for
